"""SD3 / SD3.5 MMDiT (`jaxdiff.models.mmdit`, read by `jaxdiff.latent.mmdit_weights`): the cropped position table
against a float64 NumPy formula, forward parity with diffusers' SD3Transformer2DModel on the same random weights
(SD3; SD3.5 with RMS QK-norm and a dual-attention block; skip_layers; non-square latents; float16 and sharded
files), SD3-medium's parameter count, bfloat16 compute and remat, and the one-line refusals of bad configs, inputs
and weights."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import ConfigError, UsageError, WeightsError
from jaxdiff.latent.component_weights import param_shapes
from jaxdiff.latent.mmdit_weights import read_mmdit
from jaxdiff.models import mmdit

SD3_MEDIUM_PARAMETERS = 2_028_328_000  # REFERENCE_NEXT.md: diffusers 0.42.1, built on the meta device
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=6)  # fmt: skip
SD35 = dict(TINY, qk_norm="rms_norm", dual_attention_layers=[1])


def relative_error(got, expected) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - expected) / np.linalg.norm(expected))


def numpy_table(dim: int, grid: int, base: int, height: int, width: int) -> np.ndarray:
    """Float64, one token at a time: the centre height×width window of a grid×grid table whose token (row r,
    column c) is [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)] with x = c·base/grid, y = r·base/grid,
    ω_k = 1 / 10000^(k / (dim/4))."""
    omega = np.array([1.0 / 10000 ** (k / (dim // 4)) for k in range(dim // 4)])
    top, left = (grid - height) // 2, (grid - width) // 2
    out = []
    for r in range(top, top + height):
        for c in range(left, left + width):
            x, y = c * base / grid, r * base / grid
            out.append(np.concatenate([np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]))
    return np.array(out)


def test_cropped_position_table_matches_numpy():
    for dim, grid, base, height, width in ((16, 6, 4, 3, 5), (64, 12, 8, 12, 12), (32, 9, 9, 2, 7)):
        got = mmdit.sincos_window(dim, grid, base, height, width)
        np.testing.assert_allclose(got, numpy_table(dim, grid, base, height, width), rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="divisible by 4"):
        mmdit.sincos_window(18, 4, 4, 4, 4)


def test_rms_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(3, 5, 8)) * 3
    scale = np.linspace(0.5, 2, 8)
    expected = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(mmdit.rms_norm(jnp.asarray(x, jnp.float32), scale)), expected, rtol=1e-5)


def test_sd3_medium_parameter_count():
    model = mmdit.create_mmdit(mmdit.sd3_medium_config())
    shapes = param_shapes(model, *mmdit.example_inputs(model, size=2))
    assert sum(math.prod(shape) for shape in shapes.values()) == SD3_MEDIUM_PARAMETERS


def test_sd3_medium_parameter_count_equals_diffusers(torch, diffusers):
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        model = diffusers.SD3Transformer2DModel(**mmdit.SD3_MEDIUM)
    # pos_embed.pos_embed is a buffer, not a parameter
    assert sum(p.numel() for p in model.parameters()) == SD3_MEDIUM_PARAMETERS


# --------------------------------------------------------------------------- parity with diffusers


def diffusers_mmdit(torch, diffusers, seed=0, **config):
    """A tiny SD3Transformer2DModel with random weights (std 0.3, so the zero-initialised layers count)."""
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def random_inputs(config, height=8, width=8, batch=2, tokens=5, seed=1, timesteps=(2.5, 40.0)):
    """(x, timestep, encoder_hidden_states, pooled_projections). diffusers rounds the timestep's frequencies to
    float32 (ours are rounded from float64), which moves the phases of t near 1000 by ~5e-5: parity at 1e-5 is
    checked at small t, large t at 1e-4."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, height, width, config["in_channels"])).astype(np.float32)
    t = np.array(timesteps[:batch], np.float32)
    context = rng.normal(size=(batch, tokens, config["joint_attention_dim"])).astype(np.float32)
    pooled = rng.normal(size=(batch, config["pooled_projection_dim"])).astype(np.float32)
    return x, t, context, pooled


def diffusers_forward(torch, model, x, t, context, pooled, skip_layers=None):
    with torch.no_grad():
        out = model.double()(torch.from_numpy(x.transpose(0, 3, 1, 2)).double(), torch.from_numpy(context).double(),
                             torch.from_numpy(pooled).double(), torch.from_numpy(t).double(), skip_layers=skip_layers)
    return out.sample.numpy().transpose(0, 2, 3, 1)  # fmt: skip


def our_forward(config, params, *inputs, skip_layers=()):
    model = mmdit.create_mmdit(config)
    forward = jax.jit(model.apply, static_argnames="skip_layers")
    with jax.default_matmul_precision("highest"):
        return np.asarray(forward({"params": params}, *inputs, skip_layers=tuple(skip_layers)))


@pytest.mark.parametrize("settings", [TINY, SD35], ids=["sd3", "sd35"])
def test_matches_diffusers(torch, diffusers, tmp_path, settings):
    model = diffusers_mmdit(torch, diffusers, **settings)
    model.save_pretrained(tmp_path)
    config, params = read_mmdit(tmp_path)
    assert config.qk_norm == settings.get("qk_norm") and list(config.dual_attention_layers) == settings.get(
        "dual_attention_layers", [])  # fmt: skip
    inputs = random_inputs(settings)
    expected = diffusers_forward(torch, model, *inputs)
    assert relative_error(our_forward(config, params, *inputs), expected) < 1e-5
    late = random_inputs(settings, timesteps=(250.0, 917.5))
    assert relative_error(our_forward(config, params, *late), diffusers_forward(torch, model, *late)) < 1e-4
    # Skip-layer guidance: the skipped blocks leave both streams as they were.
    skipped = diffusers_forward(torch, model, *inputs, skip_layers=[1])
    assert relative_error(skipped, expected) > 1e-2
    assert relative_error(our_forward(config, params, *inputs, skip_layers=[1]), skipped) < 1e-5


def test_non_square_latents_crop_the_table_at_its_centre(torch, diffusers, tmp_path):
    model = diffusers_mmdit(torch, diffusers, seed=3, **TINY)
    model.save_pretrained(tmp_path)
    config, params = read_mmdit(tmp_path)
    for height, width in ((4, 12), (12, 2)):
        inputs = random_inputs(TINY, height, width, batch=1, tokens=3)
        assert relative_error(our_forward(config, params, *inputs), diffusers_forward(torch, model, *inputs)) < 1e-5


def test_float16_and_sharded_files(torch, diffusers, tmp_path):
    model = diffusers_mmdit(torch, diffusers, **SD35)
    model.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    model.float().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    config, half = read_mmdit(tmp_path / "fp16", variant="fp16")
    _, sharded = read_mmdit(tmp_path / "sharded")
    inputs = random_inputs(SD35)
    expected = diffusers_forward(torch, model, *inputs)
    assert relative_error(our_forward(config, sharded, *inputs), expected) < 1e-5
    assert relative_error(our_forward(config, half, *inputs), expected) < 1e-5  # model is float16-rounded itself


def test_bfloat16_compute_and_remat():
    small = dict(SD35, num_layers=2)
    model = mmdit.create_mmdit(mmdit.mmdit_config(small))
    inputs = random_inputs(small)
    params = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]
    reference = np.asarray(jax.jit(model.apply)({"params": params}, *inputs))
    for options in (dict(dtype="bfloat16"), dict(remat=True)):
        other = mmdit.create_mmdit(mmdit.mmdit_config(small, **options))
        out = np.asarray(jax.jit(other.apply)({"params": params}, *inputs))
        assert out.dtype == np.float32
        assert relative_error(out, reference) < (3e-2 if "dtype" in options else 1e-6)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(qk_norm="layer_norm"), "unsupported qk_norm='layer_norm'"),
        (dict(caption_projection_dim=24), "unsupported caption_projection_dim=24"),
        (dict(dual_attention_layers=[3]), "unsupported dual_attention_layers=\\(3,\\)"),
        (dict(dual_attention_layers=5), "unsupported dual_attention_layers=5"),
        (dict(in_channels=0), "in_channels=0 must be an int >= 1"),
        (dict(sample_size=7), "unsupported sample_size=7"),
        (dict(use_flash=True), "unknown keys \\['use_flash'\\]"),
        (dict(_class_name="FluxTransformer2DModel"), "unsupported _class_name='FluxTransformer2DModel'"),
    ],
)
def test_bad_config_is_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        mmdit.mmdit_config({**TINY, **settings})


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="unknown options \\['precision'\\]"):
        mmdit.mmdit_config(TINY, precision="high")
    with pytest.raises(ConfigError, match="dtype='float16'"):
        mmdit.mmdit_config(TINY, dtype="float16")


def test_bad_inputs_are_one_line():
    model = mmdit.create_mmdit(mmdit.mmdit_config(TINY))
    x, t, context, pooled = random_inputs(TINY)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, context, pooled)
    bad = [
        ((x[:, :7], t, context, pooled), {}, "x must be float latents"),
        ((np.zeros((2, 14, 8, 4)), t, context, pooled), {}, "multiples of 2 up to 12"),
        ((x, t[:1], context, pooled), {}, "timestep must be numbers of shape \\[2\\]"),
        ((x, t, context[..., :4], pooled), {}, "encoder_hidden_states must be \\[2, L, 12\\]"),
        ((x, t, context, pooled[:, :3]), {}, "pooled_projections must be \\[2, 10\\]"),
        ((x, t, context, pooled), dict(skip_layers=[3]), "skip_layers=\\[3\\] must be a list of block indices"),
    ]
    for inputs, kwargs, message in bad:
        with pytest.raises(UsageError, match=message):
            jax.eval_shape(lambda p, *a: model.apply(p, *a, **kwargs), params, *inputs)


def test_bad_weights_are_listed_in_one_error(torch, diffusers, tmp_path):
    model = diffusers_mmdit(torch, diffusers, **TINY)
    model.save_pretrained(tmp_path)
    from safetensors.numpy import load_file, save_file

    file = tmp_path / "diffusion_pytorch_model.safetensors"
    original = load_file(file)
    tensors = dict(original)
    tensors["extra.weight"] = np.zeros(3, np.float32)
    del tensors["transformer_blocks.0.attn.to_q.weight"]
    tensors["proj_out.bias"] = np.zeros(5, np.float32)
    save_file(tensors, file)
    with pytest.raises(WeightsError) as info:
        read_mmdit(tmp_path)
    message = str(info.value)
    for part in ("1 missing", "transformer_blocks.0.attn.to_q.weight", "proj_out.bias: shape (5,), expected (16,)",
                 "1 unexpected", "extra.weight"):  # fmt: skip
        assert part in message
    save_file(original, file)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "qk_norm": "l2"}))
    with pytest.raises(WeightsError, match="config.json: .*unsupported qk_norm='l2'"):
        read_mmdit(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "sample_size": 12}))  # another position table
    with pytest.raises(WeightsError, match="pos_embed.pos_embed differs from the one its config gives"):
        read_mmdit(tmp_path)
