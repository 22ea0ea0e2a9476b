"""The U-Net against an independent float64 NumPy implementation of the DDPM network; init, dtypes, input checks."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.config import default_config
from jaxdiff.models import UNet, count_parameters, create_model, model_summary, timestep_embedding
from jaxdiff.models.layers import AttnBlock, Downsample, ResBlock, Upsample

TINY = dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def model_config(**overrides):
    config = default_config().model
    for key, value in {**TINY, **overrides}.items():
        config[key] = value
    return config


# ---------------------------------------------------------------- NumPy float64 reference


def np_swish(x):
    return x / (1.0 + np.exp(-x))


def np_group_norm(x, p, groups=32, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def np_conv3x3(x, p, stride=1):
    """TF "SAME" convolution by explicit taps: out[i, j] = sum_{di, dj} xpad[i·s + di, j·s + dj] @ k[di, dj]."""
    b, h, w, _ = x.shape
    out_h, out_w = -(-h // stride), -(-w // stride)
    pads = []
    for size, out in ((h, out_h), (w, out_w)):
        total = max((out - 1) * stride + 3 - size, 0)
        pads.append((total // 2, total - total // 2))
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    kernel = p["kernel"]
    out = np.zeros((b, out_h, out_w, kernel.shape[-1]))
    for di in range(3):
        for dj in range(3):
            patch = xp[:, di : di + stride * (out_h - 1) + 1 : stride, dj : dj + stride * (out_w - 1) + 1 : stride]
            out += np.einsum("bhwc,co->bhwo", patch, kernel[di, dj])
    return out + p["bias"]


def np_timestep_embedding(t, dim):
    half = dim // 2
    freqs = np.exp(-np.arange(half) * math.log(10000.0) / (half - 1))
    args = np.asarray(t, np.float64)[:, None] * freqs[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def np_resblock(x, temb, p):
    h = np_conv3x3(np_swish(np_group_norm(x, p["norm1"])), p["conv1"])
    h = h + np_dense(np_swish(temb), p["temb_proj"])[:, None, None, :]
    h = np_conv3x3(np_swish(np_group_norm(h, p["norm2"])), p["conv2"])
    if "nin_shortcut" in p:
        x = np_dense(x, p["nin_shortcut"])
    return x + h


def np_attn(x, p):
    b, h, w, c = x.shape
    n = np_group_norm(x, p["norm"])
    q, k, v = (np_dense(n, p[name]).reshape(b, h * w, c) for name in ("q", "k", "v"))
    logits = np.einsum("bic,bjc->bij", q, k) / math.sqrt(c)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    out = np.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)
    return x + np_dense(out, p["proj_out"])


def np_downsample(x, p, with_conv):
    if with_conv:
        return np_conv3x3(x, p["conv"], stride=2)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def np_upsample(x, p, with_conv):
    x = x.repeat(2, axis=1).repeat(2, axis=2)
    return np_conv3x3(x, p["conv"]) if with_conv else x


def np_unet(p, x, t, cfg, y=None):
    """The DDPM U-Net written out from the architecture description (eval mode)."""
    temb = np_timestep_embedding(t, cfg.ch)
    temb = np_dense(np_swish(np_dense(temb, p["temb"]["dense0"])), p["temb"]["dense1"])
    if cfg.num_classes:
        labels = np.full(x.shape[0], cfg.num_classes) if y is None else np.asarray(y)
        temb = temb + p["label_emb"]["embedding"][labels]
    levels = len(cfg.ch_mult)
    hs = [np_conv3x3(x, p["conv_in"])]
    for i in range(levels):
        level = p[f"down_{i}"]
        for j in range(cfg.num_res_blocks):
            h = np_resblock(hs[-1], temb, level[f"block_{j}"])
            if h.shape[1] in cfg.attn_resolutions:
                h = np_attn(h, level[f"attn_{j}"])
            hs.append(h)
        if i != levels - 1:
            hs.append(np_downsample(hs[-1], level.get("downsample"), cfg.resamp_with_conv))
    h = np_resblock(hs[-1], temb, p["mid"]["block_1"])
    h = np_attn(h, p["mid"]["attn_1"])
    h = np_resblock(h, temb, p["mid"]["block_2"])
    for i in reversed(range(levels)):
        level = p[f"up_{i}"]
        for j in range(cfg.num_res_blocks + 1):
            h = np_resblock(np.concatenate([h, hs.pop()], axis=-1), temb, level[f"block_{j}"])
            if h.shape[1] in cfg.attn_resolutions:
                h = np_attn(h, level[f"attn_{j}"])
        if i != 0:
            h = np_upsample(h, level.get("upsample"), cfg.resamp_with_conv)
    assert not hs
    return np_conv3x3(np_swish(np_group_norm(h, p["norm_out"])), p["conv_out"])


# ---------------------------------------------------------------- utilities


def randomize(params, seed=0):
    """Replace every parameter by a random O(1)-scaled value, so no layer is (near) zero as at init."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            value = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.2 * rng.normal(size=shape)
        else:  # bias, embedding
            value = (0.3 if name == "bias" else 1.0) * rng.normal(size=shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


def to_f64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def assert_close(actual, expected, rtol=1e-4):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    rel = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert rel <= rtol, f"relative error {rel:.3e} > {rtol}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def random_params(module, *args, **kwargs):
    """Random parameters with the module's tree, from shapes only (no init run)."""
    return randomize(jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)["params"])


def inputs(batch=2, size=16, channels=3, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1, 1, size=(batch, size, size, channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, size=batch), jnp.int32)
    return x, t


@pytest.fixture(scope="module")
def tiny():
    """(model, random params, x, t, eval-mode forward) of the unconditional tiny U-Net."""
    model = create_model(model_config())
    x, t = inputs()
    params = random_params(model, x, t)
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    return model, params, x, t, forward


@pytest.fixture(scope="module")
def conditional():
    """The tiny U-Net with 3 classes: (model, x, t, real init params, forward(p, y))."""
    model = create_model(model_config(num_classes=3))
    x, t = inputs(seed=6)
    key = jax.random.key(0)
    # Compiling the init's many random draws would dominate this file's run time; XLA's backend
    # optimisation level 0 compiles it severalfold faster (only the drawn values are tested here).
    init = jax.jit(model.init).lower(key, x, t).compile({"xla_backend_optimization_level": 0})
    forward = jax.jit(lambda p, y: model.apply({"params": p}, x, t, y))
    return model, x, t, init(key, x, t)["params"], forward


# ---------------------------------------------------------------- building blocks


def test_timestep_embedding_matches_float64_reference():
    t = np.array([0, 1, 7, 250, 500, 999])
    emb = timestep_embedding(jnp.asarray(t, jnp.int32), 128)
    assert emb.shape == (6, 128) and emb.dtype == jnp.float32
    # float32 rounding of t·freq (|t·freq| <= 999) bounds the error by ~6e-5.
    np.testing.assert_allclose(np.asarray(emb), np_timestep_embedding(t, 128), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(emb[0]), np.r_[np.zeros(64), np.ones(64)])  # sin first
    np.testing.assert_array_equal(timestep_embedding(jnp.asarray(t, jnp.float32), 128), emb)


@pytest.mark.parametrize("dim", [2, 3, 33])
def test_timestep_embedding_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match=f"dim={dim}"):
        timestep_embedding(jnp.zeros(2, jnp.int32), dim)


@pytest.mark.parametrize("in_ch,out_ch,x_std", [(32, 64, 1.0), (64, 64, 3e-3)])
def test_resblock_matches_reference(in_ch, out_ch, x_std):
    """x_std 3e-3 gives group variances near 1e-5, where GroupNorm's eps (1e-6) matters."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(x_std * rng.normal(size=(2, 8, 8, in_ch)), jnp.float32)
    temb = jnp.asarray(rng.normal(size=(2, 128)), jnp.float32)
    block = ResBlock(out_ch, dropout=0.1)
    params = random_params(block, x, temb, train=False)
    assert ("nin_shortcut" in params) == (in_ch != out_ch)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(functools.partial(block.apply, train=False))({"params": params}, x, temb)
    assert_close(out, np_resblock(np.asarray(x, np.float64), np.asarray(temb, np.float64), to_f64(params)))


def test_attention_matches_reference():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 64)), jnp.float32)
    block = AttnBlock()
    params = random_params(block, x)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(block.apply)({"params": params}, x)
    assert_close(out, np_attn(np.asarray(x, np.float64), to_f64(params)))


@pytest.mark.parametrize("with_conv", [True, False])
@pytest.mark.parametrize("resample,reference", [(Downsample, np_downsample), (Upsample, np_upsample)])
def test_resampling_matches_reference(resample, reference, with_conv):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6, 6, 32)), jnp.float32)
    layer = resample(with_conv)
    params = random_params(layer, x) if with_conv else {}
    assert bool(params) == with_conv
    with jax.default_matmul_precision("highest"):
        out = jax.jit(layer.apply)({"params": params}, x)
    expected = reference(np.asarray(x, np.float64), to_f64(params), with_conv)
    assert out.shape == expected.shape == ((2, 3, 3, 32) if resample is Downsample else (2, 12, 12, 32))
    assert_close(out, expected)


# ---------------------------------------------------------------- the whole network


def test_tiny_unet_matches_reference(tiny):
    model, params, x, t, forward = tiny
    with jax.default_matmul_precision("highest"):
        out = forward(params, x, t)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    assert_close(out, np_unet(to_f64(params), np.asarray(x, np.float64), np.asarray(t), model))


def test_resampling_without_conv_has_no_conv_params():
    model = create_model(model_config(resamp_with_conv=False))
    x, t = inputs()
    params = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    assert set(params["down_0"]) == {"block_0"} and set(params["up_1"]) == {"block_0", "attn_0", "block_1", "attn_1"}


def test_parameter_tree_uses_official_names(tiny):
    _, params, *_ = tiny
    assert set(params) == {"temb", "conv_in", "down_0", "down_1", "mid", "up_0", "up_1", "norm_out", "conv_out"}
    assert set(params["temb"]) == {"dense0", "dense1"}
    assert set(params["down_0"]) == {"block_0", "downsample"}
    assert set(params["down_1"]) == {"block_0", "attn_0"}
    assert set(params["down_1"]["block_0"]) == {"norm1", "conv1", "temb_proj", "norm2", "conv2", "nin_shortcut"}
    assert set(params["down_1"]["attn_0"]) == {"norm", "q", "k", "v", "proj_out"}
    assert set(params["mid"]) == {"block_1", "attn_1", "block_2"}
    assert set(params["up_1"]) == {"block_0", "attn_0", "block_1", "attn_1", "upsample"}
    assert set(params["up_0"]) == {"block_0", "block_1"}
    assert params["up_1"]["block_0"]["conv1"]["kernel"].shape == (3, 3, 128, 64)  # concat of h and skip
    assert params["down_0"]["downsample"]["conv"]["kernel"].shape == (3, 3, 32, 32)


def test_init_scales(conditional):
    """Kernels ~ U(-l, l), l = sqrt(3·scale / ((fan_in + fan_out) / 2)); scale 1e-10 for conv2, proj_out, conv_out."""
    _, _, _, params, _ = conditional
    tiny_layers = {"conv2", "proj_out", "conv_out"}
    kernels = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [entry.key for entry in path]
        value = np.asarray(leaf, np.float64)
        if names[-1] == "kernel":
            kernels += 1
            receptive = math.prod(value.shape[:-2])
            fan_avg = receptive * (value.shape[-2] + value.shape[-1]) / 2
            scale = 1e-10 if names[-2] in tiny_layers else 1.0
            limit = math.sqrt(3 * scale / fan_avg)
            where = "/".join(names)
            assert np.abs(value).max() <= limit, where
            assert np.abs(value).max() >= 0.9 * limit, where  # uniform fills its range
            assert abs(value.std() / (limit / math.sqrt(3)) - 1) < 0.08, where
        elif names[-1] == "scale":
            np.testing.assert_array_equal(value, 1.0)
        elif names[-1] == "bias":
            np.testing.assert_array_equal(value, 0.0)
        else:
            assert names == ["label_emb", "embedding"] and value.shape == (4, 128)
            assert abs(value.std() - 1.0) < 0.1
    assert kernels == 51
    # The "zero" layers are tiny but not exactly zero, so their gradients are not degenerate.
    assert 0 < np.abs(np.asarray(params["conv_out"]["kernel"])).max() < 1e-5


def test_count_parameters_matches_closed_form(tiny):
    _, params, *_ = tiny

    def conv(i, o):
        return 9 * i * o + o

    def dense(i, o):
        return i * o + o

    def res(i, o):
        return 2 * i + conv(i, o) + dense(128, o) + 2 * o + conv(o, o) + (dense(i, o) if i != o else 0)

    def attn(c):
        return 2 * c + 4 * dense(c, c)

    expected = (
        dense(32, 128) + dense(128, 128) + conv(3, 32)
        + res(32, 32) + conv(32, 32)  # down_0
        + res(32, 64) + attn(64)  # down_1
        + 2 * res(64, 64) + attn(64)  # mid
        + res(128, 64) + attn(64) + res(96, 64) + attn(64) + conv(64, 64)  # up_1: skips 64, 32
        + res(96, 32) + res(64, 32)  # up_0: skips 32, 32
        + 2 * 32 + conv(32, 3)
    )
    assert count_parameters(params) == expected == 702_499


# ---------------------------------------------------------------- modes and dtypes


def test_dropout_only_in_training(tiny):
    model, params, x, t, forward = tiny
    train = jax.jit(lambda p, key: model.apply({"params": p}, x, t, train=True, rngs={"dropout": key}))
    evaluated = forward(params, x, t)
    np.testing.assert_array_equal(evaluated, forward(params, x, t))
    a, a_again, b = (train(params, jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, a_again)
    assert np.abs(np.asarray(a - b)).mean() > 1e-3 * np.abs(np.asarray(a)).mean()
    assert np.abs(np.asarray(a - evaluated)).mean() > 1e-3 * np.abs(np.asarray(a)).mean()


def test_bfloat16_close_to_float32(tiny):
    model, params, x, t, forward = tiny
    model_bf16 = create_model(model_config(dtype="bfloat16"))
    bf16_params = jax.eval_shape(model_bf16.init, jax.random.key(0), x, t)["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(lambda p: model_bf16.apply({"params": p}, x, t))(params)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    reference = np.asarray(forward(params, x, t), np.float64)
    rel = np.linalg.norm(np.asarray(out, np.float64) - reference) / np.linalg.norm(reference)
    assert 1e-4 < rel < 3e-2  # bf16 rounding is visible but small


def test_class_conditional_model(conditional):
    model, x, t, init, forward = conditional
    assert init["label_emb"]["embedding"].shape == (4, 4 * 32)  # 3 classes + the null label 3
    params = randomize(init)
    with jax.default_matmul_precision("highest"):
        out_01, out_10, out_null = (forward(params, jnp.array(y)) for y in ([0, 1], [1, 0], [3, 3]))
        out_none = forward(params, None)
    reference = to_f64(params)
    assert_close(out_01, np_unet(reference, np.asarray(x, np.float64), np.asarray(t), model, y=[0, 1]))
    assert_close(out_null, np_unet(reference, np.asarray(x, np.float64), np.asarray(t), model, y=None))
    assert_close(out_none, out_null, rtol=1e-6)  # y=None is the null label
    assert np.abs(np.asarray(out_01[0] - out_10[0])).max() > 1e-3
    assert np.abs(np.asarray(out_01 - out_null)).max() > 1e-3


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(attn_resolutions=(5,)), "attn_resolutions entry 5"),
        (dict(attn_resolutions=(32,)), "attn_resolutions entry 32"),
        (dict(ch=48), "ch=48"),
        (dict(image_size=18, ch_mult=(1, 2, 2)), "image_size=18"),
        (dict(dtype="float16"), "dtype='float16'"),
        (dict(out_channels=5), "out_channels=5"),
        (dict(ch_mult=()), r"ch_mult=\(\)"),
        (dict(ch_mult=(1, 0)), "ch_mult entry=0"),
        (dict(num_res_blocks=0), "num_res_blocks=0"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(num_classes=-1), "num_classes=-1"),
    ],
)
def test_bad_model_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        create_model(model_config(**overrides))


def test_direct_construction_is_validated_and_whole_config_rejected():
    fields = dict(TINY, in_channels=3, out_channels=3, dropout=0.0, resamp_with_conv=True, num_classes=0)
    fields["dtype"] = "float32"
    UNet(**fields)
    with pytest.raises(ValueError, match=r"ch_mult=\[1, 2\]"):
        UNet(**{**fields, "ch_mult": [1, 2]})
    with pytest.raises(ValueError, match="resamp_with_conv=1"):
        UNet(**{**fields, "resamp_with_conv": 1})
    with pytest.raises(ValueError, match="config.model"):
        create_model(default_config())


def test_out_channels_for_learned_variance():
    model = create_model(model_config(out_channels=6, ch_mult=(1,), attn_resolutions=()))
    x, t = inputs()
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, t)[0])
    assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "x_shape,x_dtype,t_shape,match",
    [
        ((16, 16, 3), jnp.float32, (2,), r"got \(16, 16, 3\)"),
        ((2, 8, 8, 3), jnp.float32, (2,), r"got \(2, 8, 8, 3\)"),
        ((2, 16, 16, 1), jnp.float32, (2,), r"got \(2, 16, 16, 1\)"),
        ((2, 16, 16, 3), jnp.uint8, (2,), "uint8"),
        ((2, 16, 16, 3), jnp.float32, (2, 1), r"got shape \(2, 1\)"),
        ((2, 16, 16, 3), jnp.float32, (3,), r"got shape \(3,\)"),
    ],
)
def test_bad_inputs_raise(tiny, x_shape, x_dtype, t_shape, match):
    model, params, *_ = tiny
    with pytest.raises(ValueError, match=match):
        model.apply({"params": params}, jnp.zeros(x_shape, x_dtype), jnp.zeros(t_shape, jnp.int32))


def test_bad_labels_raise(tiny):
    model, params, x, t, _ = tiny
    with pytest.raises(ValueError, match="num_classes=0"):
        model.apply({"params": params}, x, t, jnp.array([0, 1]))
    conditional = create_model(model_config(num_classes=3))
    cond_params = jax.eval_shape(conditional.init, jax.random.key(0), x, t)["params"]
    for y, match in ((jnp.array([0, 1, 2]), r"got shape \(3,\)"), (jnp.array([0.0, 1.0]), "float32")):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(lambda p: conditional.apply({"params": p}, x, t, y), cond_params)


# ---------------------------------------------------------------- summary


def test_cifar10_summary():
    summary = model_summary(default_config().model)
    assert summary["parameters"] == 35_746_307
    assert 12.2 <= summary["gflops"] <= 12.7
    # Closed form: 2 × multiply-adds of every conv (all 9 taps) and matmul, attention included.
    ch, temb = 128, 512
    macs = ch * temb + temb * temb + 32 * 32 * 9 * 3 * ch + 32 * 32 * 9 * ch * 3  # temb MLP, conv_in, conv_out

    def res(s, i, o):
        return s * s * 9 * i * o + temb * o + s * s * 9 * o * o + (s * s * i * o if i != o else 0)

    def attn(s, c):
        return 4 * s * s * c * c + 2 * (s * s) ** 2 * c

    # down: level 0 at 32 (128), then 256 channels at 16 (attention), 8, 4; stride-2 convs count output pixels
    macs += 2 * res(32, 128, 128) + 16 * 16 * 9 * 128 * 128
    macs += res(16, 128, 256) + res(16, 256, 256) + 2 * attn(16, 256) + 8 * 8 * 9 * 256 * 256
    macs += 2 * res(8, 256, 256) + 4 * 4 * 9 * 256 * 256 + 2 * res(4, 256, 256)
    macs += 2 * res(4, 256, 256) + attn(4, 256)  # mid
    macs += 3 * res(4, 512, 256) + 8 * 8 * 9 * 256 * 256  # up_3, then upsample conv at 8
    macs += 3 * res(8, 512, 256) + 16 * 16 * 9 * 256 * 256  # up_2
    macs += 2 * res(16, 512, 256) + res(16, 384, 256) + 3 * attn(16, 256) + 32 * 32 * 9 * 256 * 256  # up_1
    macs += res(32, 384, 128) + 2 * res(32, 256, 128)  # up_0
    assert macs == 6_221_856_768
    assert summary["gflops"] == pytest.approx(2 * macs / 1e9, rel=1e-12)
    # XLA skips taps on zero padding, so its count is a few percent lower.
    assert 0.85 * summary["gflops"] < summary["xla_gflops"] < summary["gflops"]
