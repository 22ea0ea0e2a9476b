"""Reading DiT / SiT weights (`jaxdiff.readers.dit_checkpoint`): state-dict pickles written here with `torch.save`
(a plain DiT state dict, SiT's train.py checkpoint {"model", "ema", "opt", "args"}) against a float64 PyTorch
re-implementation of DiT's forward written from the original `models.py`; the refusal of a pickle that would run
code; missing and unused keys; diffusers config keys read or refused in one line."""

from __future__ import annotations

import argparse
import collections
import json
import os
import zipfile

import jax
import numpy as np
import pytest

from jaxdiff.errors import MissingWeightsError, UsageError, WeightsError
from jaxdiff.models.networks import create_model
from jaxdiff.readers.dit_checkpoint import read_diffusers_dit, read_dit_checkpoint
from jaxdiff.weights.torch_pickle import UnsafePickleError
from tests.test_dit import diffusers_dit, diffusers_forward, inputs, numpy_pos_embed, our_forward, relative_error

# A tiny DiT: width 16, 2 heads, 3 blocks, 2×2 patches of 8×8×4 inputs, 5 classes (+ the null row), learned σ.
D, HEADS, DEPTH, P, C, SIZE, CLASSES = 16, 2, 3, 2, 4, 8, 5


def dit_state_dict(seed: int, *, out_channels: int = 2 * C, classes: int = CLASSES) -> dict[str, np.ndarray]:
    """DiT's state-dict names and PyTorch shapes (models.py), random values; pos_embed as DiT computes it."""
    shapes = {"x_embedder.proj.weight": (D, C, P, P), "x_embedder.proj.bias": (D,),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
              "final_layer.linear.weight": (P * P * out_channels, D),
              "final_layer.linear.bias": (P * P * out_channels,)}
    if classes:
        shapes["y_embedder.embedding_table.weight"] = (classes + 1, D)
    for i in range(DEPTH):
        for name, (rows, cols) in {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (4 * D, D),
                                   "mlp.fc2": (D, 4 * D), "adaLN_modulation.1": (6 * D, D)}.items():
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = (rows, cols), (rows,)
    rng = np.random.default_rng(seed)
    tensors = {name: (0.3 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    tensors["pos_embed"] = numpy_pos_embed(D, SIZE // P)[None].astype(np.float32)
    return tensors  # fmt: skip


def reference_forward(torch, sd: dict[str, np.ndarray], x, t, y) -> np.ndarray:
    """DiT.forward (models.py, eval mode) in float64, its timestep sinusoid in float32 as there."""
    F = torch.nn.functional
    w = {name: torch.from_numpy(value).double() for name, value in sd.items()}

    def linear(h, name):
        return F.linear(h, w[f"{name}.weight"], w[f"{name}.bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    h = torch.from_numpy(x.transpose(0, 3, 1, 2)).double()
    b, d = h.shape[0], w["x_embedder.proj.bias"].shape[0]
    p = w["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(h, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + w["pos_embed"]
    freqs = torch.exp(-np.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    args = torch.from_numpy(t)[:, None].float() * freqs[None]
    c = linear(F.silu(linear(torch.cat([torch.cos(args), torch.sin(args)], -1).double(), "t_embedder.mlp.0")),
               "t_embedder.mlp.2")  # fmt: skip
    if "y_embedder.embedding_table.weight" in w:
        c = c + w["y_embedder.embedding_table.weight"][torch.from_numpy(y)]
    n = h.shape[1]
    for i in range(DEPTH):
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), f"blocks.{i}.adaLN_modulation.1").chunk(6, 1)
        qkv = linear(modulate(F.layer_norm(h, (d,), eps=1e-6), shift1, scale1), f"blocks.{i}.attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // HEADS) ** -0.5, -1) @ v
        h = h + gate1.unsqueeze(1) * linear(attn.transpose(1, 2).reshape(b, n, d), f"blocks.{i}.attn.proj")
        mlp = F.gelu(linear(modulate(F.layer_norm(h, (d,), eps=1e-6), shift2, scale2), f"blocks.{i}.mlp.fc1"),
                     approximate="tanh")  # fmt: skip
        h = h + gate2.unsqueeze(1) * linear(mlp, f"blocks.{i}.mlp.fc2")
        shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    h = linear(modulate(F.layer_norm(h, (d,), eps=1e-6), shift, scale), "final_layer.linear")
    grid, out = int(n**0.5), h.shape[-1] // (p * p)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(b, grid, grid, p, p, out)).reshape(b, out, grid * p, grid * p)
    return h.numpy().transpose(0, 2, 3, 1)


def save(torch, obj, path) -> str:
    """torch.save of `obj` with arrays as tensors and dicts as OrderedDicts carrying `_metadata`, as a module's
    `state_dict()` does."""

    def to_torch(value):
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
        if isinstance(value, dict):
            state = collections.OrderedDict((k, to_torch(v)) for k, v in value.items())
            state._metadata = collections.OrderedDict({"": {"version": 1}})
            return state
        return value

    torch.save(to_torch(obj), path)
    return str(path)


@pytest.mark.parametrize("classes", [CLASSES, 0])
def test_dit_state_dict_matches_the_reference(torch, tmp_path, classes):
    sd = dit_state_dict(0, classes=classes)
    config, params = read_dit_checkpoint(save(torch, sd, tmp_path / "DiT-tiny.pt"), num_heads=HEADS)
    section = config.dit
    assert (section.input_size, section.patch_size, section.in_channels, section.hidden_size, section.depth,
            section.num_heads, section.num_classes, section.learn_sigma, section.per_block_embedders,
            section.freq_shift, section.mlp_norm_eps) == (SIZE, P, C, D, DEPTH, HEADS, classes, True, False, 0, 1e-6)
    assert (config.network, config.image_size, config.out_channels, config.num_classes) == ("dit", SIZE, 8, classes)
    x, t, y = inputs()
    y = y if classes else None
    expected = reference_forward(torch, sd, x, t, y)
    assert relative_error(our_forward(config, params, x, t, y), expected) < 1e-4  # fmt: skip


def test_sit_training_checkpoint_reads_its_ema(torch, tmp_path):
    """SiT's train.py saves {"model", "ema", "opt", "args"} (args an argparse.Namespace); find_model takes "ema"."""
    ema, raw = dit_state_dict(1), dit_state_dict(2)
    parameter = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([parameter], lr=1e-4, weight_decay=0)
    parameter.sum().backward()
    opt.step()
    args = argparse.Namespace(model="SiT-XL/2", image_size=256, num_classes=1000, path_type="Linear")
    path = save(torch, {"model": raw, "ema": ema, "opt": opt.state_dict(), "args": args}, tmp_path / "0400000.pt")
    config, params = read_dit_checkpoint(path, num_heads=HEADS)
    assert (config.dit.output_sigma, config.out_channels) == (False, C)  # args.model names a SiT: SiT's forward
    x, t, y = inputs()
    t = np.array([0.0, 0.25, 0.5, 1.0])  # SiT's time in [0, 1]
    expected = reference_forward(torch, ema, x, t, y)[..., :C]
    assert relative_error(our_forward(config, params, x, t, y), expected) < 1e-4
    # The same file as a DiT keeps the σ channels; without num_heads, args.model must describe these weights.
    dit_config, _ = read_dit_checkpoint(path, variant="dit", num_heads=HEADS)
    assert dit_config.out_channels == 2 * C
    with pytest.raises(WeightsError, match="args.model='SiT-XL/2' has depth 28 and width 1152, but the weights have 3"):
        read_dit_checkpoint(path)


def test_code_in_a_pickle_is_refused(torch, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    sd = {**dit_state_dict(0), "payload": Payload()}
    path = save(torch, sd, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError) as err:
        read_dit_checkpoint(path)
    assert f"refusing to load global {os.system.__module__}.system" in str(err.value)  # posix.system on Linux
    assert str(path) in str(err.value) and not marker.exists()


def test_missing_and_unused_keys_are_listed(torch, tmp_path):
    sd = dit_state_dict(0)
    del sd["blocks.1.attn.proj.bias"]
    sd["blocks.1.attn.extra.weight"] = np.zeros((2, 2), np.float32)
    sd["t_embedder.mlp.2.weight"] = np.zeros((D, D + 1), np.float32)
    with pytest.raises(WeightsError) as err:
        read_dit_checkpoint(save(torch, sd, tmp_path / "damaged.pt"), num_heads=HEADS)
    message = str(err.value)
    assert "1 missing:\n    blocks.1.attn.proj.bias" in message
    assert "1 unexpected:\n    blocks.1.attn.extra.weight" in message
    assert f"t_embedder.mlp.2.weight: shape ({D}, {D + 1}), expected ({D}, {D})" in message


def test_checkpoint_refusals(torch, tmp_path):
    with pytest.raises(WeightsError, match="no DiT size"):  # not a preset width: the heads are unknown
        read_dit_checkpoint(save(torch, dit_state_dict(0), tmp_path / "a.pt"))
    shifted = dit_state_dict(0)
    shifted["pos_embed"] = shifted["pos_embed"] * 1.01
    with pytest.raises(WeightsError, match="pos_embed differs from the 2-D sin-cos embedding of a 4×4 grid"):
        read_dit_checkpoint(save(torch, shifted, tmp_path / "b.pt"), num_heads=HEADS)
    with pytest.raises(WeightsError, match="final_layer.linear has 48 outputs"):
        read_dit_checkpoint(save(torch, dit_state_dict(0, out_channels=12), tmp_path / "c.pt"), num_heads=HEADS)
    with pytest.raises(WeightsError, match="not a DiT state dict"):
        read_dit_checkpoint(save(torch, {"weight": np.zeros(3, np.float32)}, tmp_path / "d.pt"))
    with pytest.raises(MissingWeightsError):
        read_dit_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(UsageError, match=r"variant='DiT' is not one of \('dit', 'sit'\)"):
        read_dit_checkpoint(tmp_path / "absent.pt", variant="DiT")  # refused before the file is looked at
    wide = dit_state_dict(0)
    wide["pos_embed"] = np.zeros((1, 16, D + 4), np.float32)
    with pytest.raises(WeightsError, match=r"pos_embed has shape \(1, 16, 20\), expected \(1, 16, 16\)"):
        read_dit_checkpoint(save(torch, wide, tmp_path / "f.pt"), num_heads=HEADS)
    # A storage shorter than its tensors declare is refused before it is read.
    with zipfile.ZipFile(tmp_path / "a.pt") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    storage = next(name for name in members if "/data/" in name and len(members[name]) > 64)
    with zipfile.ZipFile(tmp_path / "e.pt", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data[:-4] if name == storage else data)
    with pytest.raises(WeightsError) as err:
        read_dit_checkpoint(tmp_path / "e.pt", num_heads=HEADS)
    key = storage.rsplit("/", 1)[1]
    assert f"storage '{key}' holds {len(members[storage]) - 4} bytes, but its tensors declare" in str(err.value)
    with pytest.raises(WeightsError, match="unsupported DiT: hidden_size=16 does not split into num_heads=3 heads"):
        read_dit_checkpoint(tmp_path / "a.pt", num_heads=3)


# --------------------------------------------------------------------------- diffusers config.json


def diffusers_folder(torch, diffusers, path, **config) -> tuple:
    model = diffusers_dit(torch, diffusers, shared_embedders=True, **config)
    model.save_pretrained(path)
    return model, json.loads((path / "config.json").read_text())


def rewrite(path, settings: dict) -> None:
    (path / "config.json").write_text(json.dumps(settings))


def test_legacy_transformer2d_config_reads_as_diffusers_does(torch, diffusers, tmp_path):
    """The released DiT folders name the legacy Transformer2DModel, which diffusers loads as a DiT."""
    model, settings = diffusers_folder(torch, diffusers, tmp_path)
    legacy = {**settings, "_class_name": "Transformer2DModel", "cross_attention_dim": None,
              "num_vector_embeds": None, "only_cross_attention": False, "double_self_attention": False,
              "use_linear_projection": False}  # fmt: skip
    rewrite(tmp_path, legacy)
    config, params = read_diffusers_dit(tmp_path)
    assert (config.dit.per_block_embedders, config.dit.freq_shift, config.dit.mlp_norm_eps) == (False, 1, 1e-5)
    x, t, y = inputs()
    assert relative_error(our_forward(config, params, x, t, y), diffusers_forward(torch, model, x, t, y)) < 1e-4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(norm_type="ada_norm"), "unsupported norm_type='ada_norm'; allowed: 'ada_norm_zero'"),
        (dict(activation_fn="geglu"), "unsupported activation_fn='geglu'"),
        (dict(norm_elementwise_affine=True), "unsupported norm_elementwise_affine=True"),
        (dict(attention_bias=False), "unsupported attention_bias=False"),
        (dict(dropout=0.1), "unsupported dropout=0.1"),
        (dict(out_channels=6), "unsupported out_channels=6; allowed: 4 (in_channels) or 8 (learned σ)"),
        (dict(upcast_attention=1), "unsupported upcast_attention=1"),
        (dict(num_layers=0), "unsupported num_layers=0; allowed: an int >= 1"),
        (dict(sample_size=9), "input_size=9 is not divisible by patch_size=2"),
        (dict(pos_embed_max_size=96), "unknown DiTTransformer2DModel setting pos_embed_max_size=96"),
        (dict(_class_name="UNet2DModel"), "unsupported _class_name='UNet2DModel'"),
        (dict(_class_name="Transformer2DModel", cross_attention_dim=768), "unsupported cross_attention_dim=768"),
        (dict(_class_name="Transformer2DModel", interpolation_scale=2), "unsupported interpolation_scale=2"),
    ],
)
def test_diffusers_config_refusals_are_one_line(torch, diffusers, tmp_path, change, message):
    _, settings = diffusers_folder(torch, diffusers, tmp_path)
    rewrite(tmp_path, {**settings, **change})
    with pytest.raises(WeightsError) as err:
        read_diffusers_dit(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_diffusers_settings_without_effect_and_missing_weights(torch, diffusers, tmp_path):
    model, settings = diffusers_folder(torch, diffusers, tmp_path)
    rewrite(tmp_path, {**settings, "upcast_attention": True, "norm_num_groups": 7})
    config, params = read_diffusers_dit(tmp_path)
    x, t, y = inputs()
    assert relative_error(our_forward(config, params, x, t, y), diffusers_forward(torch, model, x, t, y)) < 1e-4
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="no diffusion_pytorch_model.safetensors or diffusion_pytorch_model"):
        read_diffusers_dit(tmp_path)


def test_forward_through_create_model_is_jittable_with_the_null_label(torch, tmp_path):
    sd = dit_state_dict(3)
    config, params = read_dit_checkpoint(save(torch, sd, tmp_path / "DiT.pt"), num_heads=HEADS)
    model = create_model(config)
    assert (model.num_classes, model.null_label) == (CLASSES, True) and config.null_label
    x, t, _ = inputs()
    null = np.full(4, CLASSES)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(model.apply)({"params": params}, x, t, None))
    assert relative_error(out, reference_forward(torch, sd, x, t, null)) < 1e-4
