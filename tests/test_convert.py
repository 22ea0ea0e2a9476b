"""jaxdiff.readers and jaxdiff.convert: official TF checkpoints and diffusers folders in, diffusers out.

The TF checkpoints' tensors are made here from an independent listing of the official variables
(`diffusion_tf/models/unet.py`, `nn.py`) and served by a stand-in for the bundle reader; the forward
references are diffusers' own UNet2DModel run in float64.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shutil

import flax.traverse_util
import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff.training import checkpoint
from jaxdiff.cli import load_config
from jaxdiff.convert.diffusers_export import write_diffusers
from jaxdiff.convert.formats import convert
from jaxdiff.readers.diffusers_format import read_diffusers
from jaxdiff.readers.formats import detect_format
from jaxdiff.sampling.pipeline import load_weights
from jaxdiff.readers.tf_checkpoint import read_official_checkpoint
from jaxdiff.readers import tf_checkpoint
from jaxdiff.readers.architecture import param_shapes
from jaxdiff.models import count_parameters, create_model, timestep_embedding
from tests.helpers import ROOT, TINY_CONFIG

# The google/ddpm-cifar10-32 UNet2DModel settings.
DDPM_CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, act_fn="silu", downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    time_embedding_type="positional",
)  # fmt: skip
# The 256×256 models' layout (6 levels, attention at level 4) at 32×32 with narrower channels, to fit a CPU test.
DDPM_256_LAYOUT_UNET = dict(
    DDPM_CIFAR10_UNET, sample_size=32, block_out_channels=(32, 32, 64, 64, 128, 128),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)  # fmt: skip


def flat(tree):
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def random_params(model_config, seed):
    """Every leaf random: kernels N(0, 1/fan_in), biases N(0, 0.1²), GroupNorm scales 1 + N(0, 0.2²)."""
    rng = np.random.default_rng(seed)
    leaves = {}
    for path, shape in param_shapes(model_config).items():
        if len(shape) > 1:
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.2 * rng.normal(size=shape)
        else:
            value = 0.1 * rng.normal(size=shape)
        leaves[path] = value.astype(np.float32)
    return flax.traverse_util.unflatten_dict(leaves)


def our_forward(config, params, x, t):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(create_model(config.model).apply)({"params": params}, x, t))


def diffusers_forward(torch, unet, x, t):
    """UNet2DModel in float64 on NHWC input; returns NHWC."""
    unet = unet.double().eval()
    with torch.no_grad():
        out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)).double(), torch.from_numpy(t)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def randomized_unet(torch, diffusers, settings, seed):
    """A UNet2DModel with torch's random init and GroupNorm affine parameters moved off (1, 0)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**settings)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return unet


# ---------------------------------------------------------------- forward parity with diffusers


def test_diffusers_positional_embedding_with_ddpm_settings_is_ours(torch, diffusers):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 500, 999])
    half = 64
    freqs = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
    reference = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)  # sin first
    theirs = get_timestep_embedding(torch.from_numpy(t), 2 * half, flip_sin_to_cos=False, downscale_freq_shift=1)
    np.testing.assert_allclose(theirs.numpy(), reference, rtol=0, atol=2e-4)  # float32 arguments up to 999
    np.testing.assert_allclose(np.asarray(timestep_embedding(t, 2 * half)), reference, rtol=0, atol=2e-4)


@pytest.mark.timeout(300)
def test_ddpm_cifar10_unet_matches_diffusers(tmp_path, torch, diffusers):
    unet = randomized_unet(torch, diffusers, DDPM_CIFAR10_UNET, seed=0)
    unet.save_pretrained(tmp_path / "unet")
    config, params = read_diffusers(tmp_path / "unet")
    assert config.data.dataset == "cifar10"  # the released model with this architecture
    assert (config.model.ch, config.model.ch_mult, config.model.attn_resolutions) == (128, (1, 2, 2, 2), (16,))
    assert count_parameters(params) == 35_746_307 == sum(p.numel() for p in unet.parameters())
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    t = np.array([0, 417, 999])
    reference = diffusers_forward(torch, unet, x, t)
    np.testing.assert_allclose(our_forward(config, params, x, t), reference, rtol=0, atol=1e-4)
    assert np.abs(reference).max() > 0.5  # the comparison is not between near-zero outputs


@pytest.mark.timeout(300)
def test_six_level_256_layout_matches_diffusers(tmp_path, torch, diffusers):
    unet = randomized_unet(torch, diffusers, DDPM_256_LAYOUT_UNET, seed=2)
    unet.save_pretrained(tmp_path / "unet")
    config, params = read_diffusers(tmp_path / "unet", dataset="lsun_church256")
    assert config.data.dataset == "lsun_church256" and config.diffusion.var_type == "fixedsmall"
    assert config.model.ch_mult == (1, 1, 2, 2, 4, 4) and config.model.attn_resolutions == (2,)
    x = np.random.default_rng(3).normal(size=(1, 32, 32, 3)).astype(np.float32)
    t = np.array([999])
    reference = diffusers_forward(torch, unet, x, t)
    np.testing.assert_allclose(our_forward(config, params, x, t), reference, rtol=0, atol=1e-4)
    assert np.abs(reference).max() > 0.5


# ---------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(config, params, folder): the tiny model with random weights, exported to diffusers."""
    config = load_config(TINY_CONFIG, [])
    params = random_params(config.model, seed=4)
    folder = tmp_path_factory.mktemp("export") / "tiny"
    write_diffusers(config, params, folder)
    return config, params, folder


@pytest.mark.timeout(300)
def test_jaxdiff_diffusers_jaxdiff_round_trip(tmp_path, torch, diffusers):
    config = load_config(TINY_CONFIG, [])
    params, ema_params = random_params(config.model, seed=5), random_params(config.model, seed=6)
    checkpoint.save_model(tmp_path / "run", config, params, ema_params)
    (tmp_path / "exported").mkdir()  # an empty destination is fine
    convert(tmp_path / "run", tmp_path / "exported", target_format="diffusers")
    assert detect_format(tmp_path / "exported") == "diffusers"
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "jaxdiff_config.json", "model_index.json", "scheduler", "unet"]  # fmt: skip

    read_config, read_params = read_diffusers(tmp_path / "exported")
    assert read_config.to_dict() == config.to_dict()
    expected = flat(ema_params)  # the export holds the EMA weights
    got = flat(read_params)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=str(key))

    convert(tmp_path / "exported", tmp_path / "back")
    assert detect_format(tmp_path / "back") == "jaxdiff"
    back_config, back_params = load_weights(tmp_path / "back")
    assert back_config.to_dict() == config.to_dict()
    assert flat(back_params).keys() == expected.keys()
    for key, value in flat(back_params).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=str(key))

    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported", subfolder="unet")
    x = np.random.default_rng(7).normal(size=(2, 16, 16, 3)).astype(np.float32)
    t = np.array([0, 999])
    reference = diffusers_forward(torch, unet, x, t)
    np.testing.assert_allclose(our_forward(config, ema_params, x, t), reference, rtol=0, atol=1e-4)

    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "exported", subfolder="scheduler")
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    np.testing.assert_allclose(scheduler.betas.numpy(), betas, rtol=1e-6)
    assert scheduler.config.variance_type == "fixed_large" and scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.clip_sample is True and scheduler.config.num_train_timesteps == 1000


def test_pipeline_layout_scheduler_and_old_attention_names(tmp_path, tiny_export):
    config, params, folder = tiny_export
    pipeline = tmp_path / "pipeline"
    shutil.copytree(folder / "scheduler", pipeline / "scheduler")
    (pipeline / "unet").mkdir()
    shutil.copy(folder / "unet" / "config.json", pipeline / "unet")
    tensors = safetensors.numpy.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, value in tensors.items():
        for new, previous in old.items():
            name = name.replace(f".{new}.", f".{previous}.")
        renamed[name] = value
    assert "down_blocks.1.attentions.0.query.weight" in renamed
    safetensors.numpy.save_file(renamed, pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    scheduler_file = pipeline / "scheduler" / "scheduler_config.json"
    settings = json.loads(scheduler_file.read_text())
    settings.update(variance_type="fixed_small", beta_schedule="scaled_linear")
    scheduler_file.write_text(json.dumps(settings))

    assert detect_format(pipeline) == "diffusers"
    read_config, read_params = read_diffusers(pipeline, dataset="cifar10")  # no jaxdiff_config.json here
    assert read_config.data.dataset == "cifar10" and read_config.model.image_size == 16
    assert read_config.diffusion.var_type == "fixedsmall" and read_config.diffusion.schedule == "quad"
    expected = flat(params)
    for key, value in flat(read_params).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=str(key))


def test_diffusers_layouts_are_transposed_per_layer_kind(tiny_export):
    _, params, folder = tiny_export
    tensors = safetensors.numpy.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    ours = flat(params)
    np.testing.assert_array_equal(tensors["conv_in.weight"], ours[("conv_in", "kernel")].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(tensors["time_embedding.linear_1.weight"], ours[("temb", "dense0", "kernel")].T)
    shortcut = ours[("down_1", "block_0", "nin_shortcut", "kernel")]  # 32 -> 64 channels
    np.testing.assert_array_equal(tensors["down_blocks.1.resnets.0.conv_shortcut.weight"], shortcut.T[:, :, None, None])
    # up_1 (8×8, 64 channels) is diffusers' first up block; up_0 its last.
    pairs = {
        "up_blocks.0.attentions.1.to_q.weight": ours[("up_1", "attn_1", "q", "kernel")].T,
        "up_blocks.0.upsamplers.0.conv.bias": ours[("up_1", "upsample", "conv", "bias")],
        "up_blocks.1.resnets.1.norm1.weight": ours[("up_0", "block_1", "norm1", "scale")],
        "mid_block.attentions.0.to_out.0.bias": ours[("mid", "attn_1", "proj_out", "bias")],
    }
    for name, value in pairs.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    np.testing.assert_array_equal(tensors["conv_norm_out.bias"], ours[("norm_out", "bias")])


# ---------------------------------------------------------------- official TF checkpoints


def official_variables(*, ch, ch_mult, num_res_blocks, attn_levels, in_ch=3, out_ch=3):
    """name -> shape of every model variable the official `unet.model(..., name='model')` creates."""
    shapes = {}

    def conv(name, cin, cout):
        shapes[f"model/{name}/W"], shapes[f"model/{name}/b"] = (3, 3, cin, cout), (cout,)

    def dense(name, cin, cout):
        shapes[f"model/{name}/W"], shapes[f"model/{name}/b"] = (cin, cout), (cout,)

    def norm(name, c):
        shapes[f"model/{name}/gamma"], shapes[f"model/{name}/beta"] = (c,), (c,)

    def resnet_block(name, cin, cout):
        norm(f"{name}/norm1", cin)
        conv(f"{name}/conv1", cin, cout)
        dense(f"{name}/temb_proj", 4 * ch, cout)
        norm(f"{name}/norm2", cout)
        conv(f"{name}/conv2", cout, cout)
        if cin != cout:
            dense(f"{name}/nin_shortcut", cin, cout)

    def attn_block(name, c):
        norm(f"{name}/norm", c)
        for layer in ("q", "k", "v", "proj_out"):
            dense(f"{name}/{layer}", c, c)

    dense("temb/dense0", ch, 4 * ch)
    dense("temb/dense1", 4 * ch, 4 * ch)
    conv("conv_in", in_ch, ch)
    skips, c = [ch], ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet_block(f"down_{i}/block_{j}", c, ch * mult)
            c = ch * mult
            if i in attn_levels:
                attn_block(f"down_{i}/attn_{j}", c)
            skips.append(c)
        if i != len(ch_mult) - 1:
            conv(f"down_{i}/downsample/conv", c, c)
            skips.append(c)
    resnet_block("mid/block_1", c, c)
    attn_block("mid/attn_1", c)
    resnet_block("mid/block_2", c, c)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            resnet_block(f"up_{i}/block_{j}", c + skips.pop(), ch * ch_mult[i])
            c = ch * ch_mult[i]
            if i in attn_levels:
                attn_block(f"up_{i}/attn_{j}", c)
        if i != 0:
            conv(f"up_{i}/upsample/conv", c, c)
    norm("norm_out", c)
    conv("conv_out", c, out_ch)
    return shapes


class StoredTensors:
    """Stands in for `tf_bundle.TFCheckpoint` (checked on files TensorFlow wrote in test_tf_bundle.py):
    serves the tensors `write_tf_checkpoint` stored for a prefix."""

    def __init__(self, prefix):
        with np.load(f"{prefix}.tensors.npz") as stored:
            self.tensors = {name: stored[name] for name in stored.files}

    def shapes(self):
        return {name: value.shape for name, value in self.tensors.items()}

    def tensor(self, name):
        return self.tensors[name]


@pytest.fixture(autouse=True)
def stored_tensor_checkpoints(monkeypatch):
    monkeypatch.setattr(tf_checkpoint, "TFCheckpoint", StoredTensors)


def write_tf_checkpoint(prefix, tensors):
    """A checkpoint `prefix` (its `.index` file marks it) holding `tensors` under exactly these names."""
    pathlib.Path(f"{prefix}.index").write_bytes(b"")
    np.savez(f"{prefix}.tensors.npz", **tensors)


SMALL_OFFICIAL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_levels=(1,))


def small_official_checkpoint(directory, *, seed=8):
    """(prefix, raw values, EMA values) of a small official-layout checkpoint with Adam slots and counters."""
    rng = np.random.default_rng(seed)
    raw = {n: rng.normal(size=s).astype(np.float32) for n, s in official_variables(**SMALL_OFFICIAL).items()}
    ema = {n: rng.normal(size=v.shape).astype(np.float32) for n, v in raw.items()}
    tensors = {**raw, **{f"{n}/ExponentialMovingAverage": v for n, v in ema.items()}}
    tensors.update({f"{n}/Adam": v + 1 for n, v in raw.items()} | {f"{n}/Adam_1": v + 2 for n, v in raw.items()})
    tensors.update(global_step=np.int64(790_000), beta1_power=np.float32(0.5), beta2_power=np.float32(0.9))
    directory.mkdir(exist_ok=True)
    prefix = directory / "model.ckpt-790000"
    write_tf_checkpoint(prefix, tensors)
    return prefix, raw, ema


def official_name(path):
    """Our path -> official name, written out here independently of the converter."""
    *layers, leaf = path
    if layers[-1].startswith("norm"):
        leaf_name = {"scale": "gamma", "bias": "beta"}[leaf]
    else:
        leaf_name = {"kernel": "W", "bias": "b"}[leaf]
    return "model/" + "/".join(layers) + "/" + leaf_name


def test_official_checkpoint_every_variable_lands_in_place(tmp_path):
    prefix, raw, ema = small_official_checkpoint(tmp_path / "tf")
    assert detect_format(prefix) == "tf" and detect_format(tmp_path / "tf") == "tf"
    config, params, ema_params = read_official_checkpoint(tmp_path / "tf", dataset="cifar10", image_size=16)
    assert config.data.dataset == "cifar10" and config.model.image_size == 16
    assert (config.model.ch, config.model.ch_mult, config.model.num_res_blocks) == (32, (1, 2), 2)
    assert config.model.attn_resolutions == (8,)
    for tree, values in ((params, raw), (ema_params, ema)):
        leaves = flat(tree)
        assert sorted(official_name(p) for p in leaves) == sorted(values)  # a bijection onto the model variables
        for path, value in leaves.items():
            np.testing.assert_array_equal(value, values[official_name(path)], err_msg=str(path))


def test_official_checkpoint_converts_to_a_workdir(tmp_path):
    prefix, _, ema = small_official_checkpoint(tmp_path / "tf")
    with pytest.raises(ValueError, match="matches no released DDPM model"):
        convert(prefix, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    convert(prefix, tmp_path / "run", dataset="cifar10")
    config, ema_params = load_weights(tmp_path / "run")
    assert config.model.image_size == 32 and config.model.attn_resolutions == (16,)  # the recipe's size
    for path, value in flat(ema_params).items():
        np.testing.assert_array_equal(value, ema[official_name(path)], err_msg=str(path))


def test_official_cifar10_names_and_recipe_without_ema(tmp_path, caplog):
    shapes = official_variables(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,))
    tensors = {n: np.full(s, i, np.float32) for i, (n, s) in enumerate(sorted(shapes.items()))}
    write_tf_checkpoint(tmp_path / "model.ckpt-790000", {**tensors, "global_step": np.int64(790_000)})
    with caplog.at_level(logging.WARNING):
        config, params, ema_params = read_official_checkpoint(tmp_path / "model.ckpt-790000")
    assert "ExponentialMovingAverage" in caplog.text
    assert config.to_dict() == load_config(str(ROOT / "configs" / "cifar10.py"), []).to_dict()
    assert count_parameters(params) == 35_746_307
    for path, value in flat(ema_params).items():
        assert value.flat[0] == tensors[official_name(path)].flat[0], path


def test_official_checkpoint_problems_are_all_listed(tmp_path):
    rng = np.random.default_rng(9)
    clean = {n: rng.normal(size=s).astype(np.float32) for n, s in official_variables(**SMALL_OFFICIAL).items()}
    tensors = dict(clean)
    del tensors["model/up_0/block_2/temb_proj/b"]
    tensors["model/mid/attn_1/k/W"] = np.zeros((64, 32), np.float32)
    tensors["model/down_1/block_0/extra/W"] = np.zeros((3,), np.float32)
    write_tf_checkpoint(tmp_path / "model.ckpt-1", tensors)
    with pytest.raises(ValueError) as err:
        read_official_checkpoint(tmp_path / "model.ckpt-1", dataset="cifar10", image_size=16)
    message = str(err.value)
    assert "model/up_0/block_2/temb_proj/b" in message
    assert "model/mid/attn_1/k/W: shape (64, 32), expected (64, 64)" in message
    assert "model/down_1/block_0/extra/W" in message

    partial_ema = {**clean, "model/conv_in/W/ExponentialMovingAverage": clean["model/conv_in/W"]}
    write_tf_checkpoint(tmp_path / "model.ckpt-2", partial_ema)
    with pytest.raises(ValueError, match="model/conv_out/W/ExponentialMovingAverage"):
        read_official_checkpoint(tmp_path / "model.ckpt-2", dataset="cifar10", image_size=16)


# ---------------------------------------------------------------- bad input and failure safety


@pytest.mark.parametrize(
    "change, named",
    [
        ({"attention_head_dim": 24}, "attention_head_dim=24"),  # divides no attention width
        ({"downsample_padding": 2}, "downsample_padding=2"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
        ({"act_fn": "tanh"}, "act_fn='tanh'"),
        ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift='spatial'"),
        ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "up_block_types"),
        ({"block_out_channels": [32, 48]}, "block_out_channels=[32, 48]"),
    ],
)
def test_unsupported_diffusers_settings_are_named(tmp_path, tiny_export, change, named):
    folder = shutil.copytree(tiny_export[2], tmp_path / "src")
    settings = json.loads((folder / "unet" / "config.json").read_text())
    settings.update(change)
    (folder / "unet" / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=re.escape(f"unsupported setting {named}")):
        convert(folder, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial output left beside dst


def test_unsupported_scheduler_setting_is_named(tmp_path, tiny_export):
    folder = shutil.copytree(tiny_export[2], tmp_path / "src")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "variance_type": "fixed_small_log"}))
    with pytest.raises(ValueError, match="variance_type='fixed_small_log'"):
        read_diffusers(folder)


def test_missing_and_misshaped_diffusers_tensors_are_named(tmp_path, tiny_export):
    folder = shutil.copytree(tiny_export[2], tmp_path / "src")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    del tensors["mid_block.resnets.1.conv2.weight"]
    tensors["conv_out.bias"] = np.zeros((4,), np.float32)
    safetensors.numpy.save_file(tensors, weights)
    with pytest.raises(ValueError) as err:
        convert(folder, tmp_path / "dst")
    assert "mid_block.resnets.1.conv2.weight" in str(err.value)
    assert "conv_out.bias: shape (4,), expected (3,)" in str(err.value)
    assert not (tmp_path / "dst").exists()


def test_nonempty_destination_is_refused_and_untouched(tmp_path, tiny_export):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        convert(tiny_export[2], tmp_path / "dst")
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_no_destination(tmp_path, tiny_export, monkeypatch):
    def failing_save(workdir, *args, **kwargs):
        (workdir / "half_written").write_text("")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert(tiny_export[2], tmp_path / "out" / "dst")
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_arguments_are_rejected(tmp_path, tiny_export):
    config, params, folder = tiny_export
    with pytest.raises(ValueError, match="unknown weights format"):
        detect_format(tmp_path)
    with pytest.raises(ValueError, match="target_format='tf'"):
        convert(folder, tmp_path / "dst", target_format="tf")
    with pytest.raises(ValueError, match="step=3 applies to jaxdiff workdirs only"):
        convert(folder, tmp_path / "dst", step=3)
    with pytest.raises(ValueError, match="already in the 'diffusers' format"):
        convert(folder, tmp_path / "dst", target_format="diffusers")
    with pytest.raises(ValueError, match="no recipe named 'imagenet'"):
        read_diffusers(folder, dataset="imagenet")
    nearest = load_config(TINY_CONFIG, ["--config.model.resamp_with_conv=False"])
    with pytest.raises(ValueError, match="resamp_with_conv=False"):
        write_diffusers(nearest, params, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
