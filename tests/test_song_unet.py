"""EDM's SongUNet: resampling filters, embeddings and one UNetBlock against float64 NumPy references written
from EDM's `training/networks.py`; parameter counts and the skip/resolution structure of whole networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import song_unet
from jaxdiff.models.layers import timestep_embedding
from jaxdiff.models.score_layers import GaussianFourierEmbedding
from jaxdiff.models.summary import count_parameters


def close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max())


def edm_filter(taps):
    f = np.asarray(taps, np.float64)
    return np.outer(f, f) / f.sum() ** 2


def np_correlate(x, w, pad, stride=1):
    """x [B,H,W,I] zero-padded by `pad`, correlated with w [k,k,I,O] (I = 1 and O = 1 with depthwise=True)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = w.shape[0]
    out_h, out_w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            out[:, i, j] = np.einsum("bxyi,xyio->bo", x[:, i * stride : i * stride + k, j * stride : j * stride + k], w)
    return out


def np_depthwise(x, f, pad, stride):
    """EDM's grouped conv2d with the filter f on every channel."""
    channels = [np_correlate(x[..., c : c + 1], f[:, :, None, None], pad, stride)[..., 0] for c in range(x.shape[3])]
    return np.stack(channels, -1)


def np_edm_up(x, taps):
    """EDM's conv_transpose2d(x, 4f, stride=2, padding=f_pad, groups=C) by its scatter definition."""
    f = 4 * edm_filter(taps)
    k, pad = f.shape[0], (f.shape[0] - 1) // 2
    b, h, w, c = x.shape
    full = np.zeros((b, 2 * (h - 1) + k, 2 * (w - 1) + k, c))
    for i in range(h):
        for j in range(w):
            full[:, 2 * i : 2 * i + k, 2 * j : 2 * j + k] += x[:, i, j][:, None, None, :] * f[None, :, :, None]
    return full[:, pad : full.shape[1] - pad, pad : full.shape[2] - pad]


def np_edm_down(x, taps):
    f = edm_filter(taps)
    return np_depthwise(x, f, (f.shape[0] - 1) // 2, 2)


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_resample_filters_match_edm(taps):
    rng = np.random.RandomState(0)
    x = rng.randn(2, 8, 8, 3)
    xj = jnp.asarray(x, jnp.float32)
    close(song_unet.ResampleConv(3, 0, taps, up=True).apply({}, xj), np_edm_up(x, taps))
    close(song_unet.ResampleConv(3, 0, taps, down=True).apply({}, xj), np_edm_down(x, taps))
    # EDM's fused_resample down: conv2d(x, w, padding=w_pad + f_pad), then the filter with stride 2.
    layer = song_unet.ResampleConv(5, 3, taps, fused_down=True)
    params = layer.init(jax.random.PRNGKey(0), xj)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # non-zero bias
    w, bias = (np.asarray(params["params"][n], np.float64) for n in ("kernel", "bias"))
    f = edm_filter(taps)
    expected = np_depthwise(np_correlate(x, w, 1 + (f.shape[0] - 1) // 2), f, 0, 2) + bias
    close(layer.apply(params, xj), expected)


def test_embeddings_match_edm():
    x = np.array([-2.5, 0.0, 0.37, 40.0])
    # PositionalEmbedding(256, endpoint=True): freqs (1/10000)^(i/(half-1)), [cos, sin], swapped by SongUNet.
    freqs = (1 / 10000) ** (np.arange(128) / 127)
    expected = np.concatenate([np.sin(np.outer(x, freqs)), np.cos(np.outer(x, freqs))], 1)
    close(timestep_embedding(jnp.asarray(x, jnp.float32), 256), expected)
    # FourierEmbedding: freqs ~ N(0, 16²), [cos(2π x f), sin(2π x f)], swapped.
    layer = GaussianFourierEmbedding(64, 16.0)
    params = layer.init(jax.random.PRNGKey(0), jnp.zeros(4))
    f = np.asarray(params["params"]["W"], np.float64)
    assert 10 < f.std() < 22
    x = np.array([-1.5, 0.0, 0.37, 1.1])  # EDM's c_noise range; beyond it float32 phases of 2π·x·f lose digits
    arg = 2 * np.pi * np.outer(x, f)
    close(layer.apply(params, jnp.asarray(x, jnp.float32)), np.concatenate([np.sin(arg), np.cos(arg)], 1), rtol=1e-4)


def np_group_norm(x, p, eps=1e-6):
    b, h, w, c = x.shape
    g = min(c // 4, 32)
    xg = x.reshape(b, h, w, g, c // g)
    xg = (xg - xg.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(xg.var(axis=(1, 2, 4), keepdims=True) + eps)
    return xg.reshape(x.shape) * p["scale"] + p["bias"]


def silu(x):
    return x / (1 + np.exp(-x))


def conv_params(p):
    p = p.get("conv", p)
    return np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)


def np_conv(x, p):
    w, b = conv_params(p)
    return np_correlate(x, w, w.shape[0] // 2) + b


def np_unet_block(p, x, emb, down, attention, taps):
    """EDM's UNetBlock forward with SongUNet's settings (adaptive_scale False, one head, skip_scale √½)."""
    resample = (lambda v: np_edm_down(v, taps)) if down else (lambda v: v)
    h = np_conv(resample(silu(np_group_norm(x, p["norm0"]))), p["conv0"])
    h = h + (emb @ p["affine"]["kernel"] + p["affine"]["bias"])[:, None, None, :]
    h = np_conv(silu(np_group_norm(h, p["norm1"])), p["conv1"])
    x = (h + (np_conv(resample(x), p["skip"]) if "skip" in p else x)) * np.sqrt(0.5)
    if attention:
        b, height, width, c = x.shape
        qkv = np_conv(np_group_norm(x, p["norm2"]), p["qkv"]).reshape(b, height * width, c, 3)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        logits = np.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = np.einsum("bqk,bkc->bqc", w, v).reshape(b, height, width, c)
        x = (np_conv(a, p["proj"]) + x) * np.sqrt(0.5)
    return x


@pytest.mark.parametrize("down, attention, taps", [(False, True, (1, 1)), (True, False, (1, 3, 3, 1))])
def test_unet_block_matches_numpy(down, attention, taps):
    rng = np.random.RandomState(0)
    x, emb = rng.randn(2, 8, 8, 16), rng.randn(2, 24)
    block = song_unet.UNetBlock(32, taps, 0.0, down=down, attention=attention)
    params = block.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32), jnp.asarray(emb, jnp.float32), False)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))  # zero-initialised layers get random weights too
    params = jax.tree_util.tree_map(lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape), params)
    out = block.apply(params, jnp.asarray(x, jnp.float32), jnp.asarray(emb, jnp.float32), False)
    p64 = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), params)["params"]
    close(out, np_unet_block(p64, x, emb, down, attention, taps), rtol=1e-4)


# --------------------------------------------------------------------------- whole networks


def edm_count(c) -> int:
    """Parameters of EDM's SongUNet constructor, by arithmetic on its channel bookkeeping (buffers such as the
    Fourier frequencies are not parameters there)."""
    mc, emb = c.model_channels, c.model_channels * c.channel_mult_emb
    noise = mc * c.channel_mult_noise

    def conv(i, o, k):
        return k * k * i * o + o

    def block(i, o, attention=False, resample=False):
        total = 2 * i + conv(i, o, 3) + emb * o + o + 2 * o + conv(o, o, 3)
        total += conv(i, o, 1) if i != o or resample else 0
        return total + (2 * o + conv(o, 3 * o, 1) + conv(o, o, 1) if attention else 0)

    total = (c.label_dim * noise + noise if c.label_dim else 0) + c.augment_dim * noise
    total += noise * emb + emb + emb * emb + emb
    cout, caux, skips, last = c.in_channels, c.in_channels, [], len(c.channel_mult) - 1
    for level, mult in enumerate(c.channel_mult):
        res = c.img_resolution >> level
        if level == 0:
            total += conv(cout, mc, 3)
            cout = mc
        else:
            total += block(cout, cout, resample=True)
            total += conv(caux, cout, 1) if c.encoder_type == "skip" else 0
            if c.encoder_type == "residual":
                total += conv(caux, cout, 3)
                caux = cout
        skips.append(cout)
        for _ in range(c.num_blocks):
            total += block(cout, mc * mult, res in c.attn_resolutions)
            cout = mc * mult
            skips.append(cout)
    for level, mult in reversed(list(enumerate(c.channel_mult))):
        res = c.img_resolution >> level
        total += block(cout, cout, True) + block(cout, cout) if level == last else block(cout, cout, resample=True)
        for idx in range(c.num_blocks + 1):
            total += block(cout + skips.pop(), mc * mult, idx == c.num_blocks and res in c.attn_resolutions)
            cout = mc * mult
        if c.decoder_type == "skip" or level == 0:
            total += 2 * cout + conv(cout, c.out_channels, 3)
    return total


# Exact counts of EDM's CIFAR-10 networks at 32×32 (`edm_count`, checked below): they round to the published
# 55.73 M (DDPM++) and 56.40 M (NCSN++). augment_dim 9 adds 9·noise_channels (EDM's map_augment maps to the
# noise embedding): 1,152 for DDPM++, 2,304 for NCSN++. Our NCSN++ also holds the 128 fixed Fourier
# frequencies as a parameter (EDM's buffer `freqs`).
EXPECTED = {("ddpmpp", 0): 55_732_739, ("ddpmpp", 9): 55_733_891, ("ncsnpp", 0): 56_395_523, ("ncsnpp", 9): 56_397_827}
FIXED_FREQUENCIES = {"ddpmpp": 0, "ncsnpp": 128}


def param_shapes(config):
    model = song_unet.create_song_unet(config)
    size = config.img_resolution
    x = jnp.zeros((1, size, size, config.in_channels))
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.ones((1,)))["params"]


@pytest.mark.parametrize("variant, augment_dim", sorted(EXPECTED))
def test_cifar10_parameter_counts(variant, augment_dim):
    config = song_unet.cifar10_config(variant, augment_dim=augment_dim)
    assert edm_count(config) == EXPECTED[variant, augment_dim]
    assert round(EXPECTED[variant, 0] / 1e6, 2) == {"ddpmpp": 55.73, "ncsnpp": 56.40}[variant]
    assert count_parameters(param_shapes(config)) == EXPECTED[variant, augment_dim] + FIXED_FREQUENCIES[variant]


def test_conditional_count_and_skip_encoder_decoder_count():
    config = song_unet.cifar10_config("ddpmpp", label_dim=10)
    config.update(encoder_type="skip", decoder_type="skip", img_resolution=64, channel_mult=(1, 2, 2, 2))
    assert count_parameters(param_shapes(config)) == edm_count(config)


def tiny_config(**overrides):
    config = song_unet.default_config()
    config.update(img_resolution=16, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                  dropout=0.0, encoder_type="skip", decoder_type="skip")  # fmt: skip
    config.update(overrides)
    return config


def test_skip_and_resolution_structure():
    """Blocks, attention placement and the channels every decoder block receives from the skips (mc = 16):
    skips are conv (mc), enc_16x16_block0 (mc), enc_8x8_down (mc), enc_8x8_block0 (2mc), popped in reverse."""
    params = param_shapes(tiny_config())
    names = sorted(k for k in params if not k.startswith("map_"))
    assert names == sorted([
        "enc_16x16_conv", "enc_16x16_block0", "enc_8x8_down", "enc_8x8_aux_skip", "enc_8x8_block0",
        "dec_8x8_in0", "dec_8x8_in1", "dec_8x8_block0", "dec_8x8_block1", "dec_8x8_aux_norm", "dec_8x8_aux_conv",
        "dec_16x16_up", "dec_16x16_block0", "dec_16x16_block1", "dec_16x16_aux_norm", "dec_16x16_aux_conv",
    ])  # fmt: skip
    with_attention = sorted(k for k, v in params.items() if isinstance(v, dict) and "qkv" in v)
    assert with_attention == ["dec_8x8_block1", "dec_8x8_in0", "enc_8x8_block0"]
    inputs = {k: params[k]["norm0"]["scale"].shape[0] for k in names if "block" in k}
    assert inputs == {"enc_16x16_block0": 16, "enc_8x8_block0": 16, "dec_8x8_block0": 64, "dec_8x8_block1": 48,
                      "dec_16x16_block0": 48, "dec_16x16_block1": 32}  # fmt: skip
    assert params["enc_8x8_aux_skip"]["conv"]["kernel"].shape == (1, 1, 3, 16)
    assert params["dec_8x8_aux_conv"]["conv"]["kernel"].shape == (3, 3, 32, 3)


def test_class_labels_ints_equal_one_hot_and_none_equals_zeros():
    config = tiny_config(label_dim=4, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                         resample_filter=(1, 3, 3, 1), img_resolution=8, attn_resolutions=())  # fmt: skip
    model = song_unet.create_song_unet(config)
    x = np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32)
    sigma = np.array([0.1, 3.0], np.float32)
    labels = np.array([1, 3])
    params = model.init(jax.random.PRNGKey(0), x, sigma, labels)
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # zero-initialised output layers
    out = np.asarray(model.apply(params, x, sigma, labels))
    close(model.apply(params, x, sigma, np.eye(4, dtype=np.float32)[labels]), out)
    unconditional = np.asarray(model.apply(params, x, sigma, None))
    close(model.apply(params, x, sigma, np.zeros((2, 4), np.float32)), unconditional)
    assert np.abs(unconditional - out).max(axis=(1, 2, 3)).min() > 1e-4  # the labels reach the output


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(encoder_type="residuals"), "encoder_type='residuals' is not one of"),
        (dict(decoder_type="residual"), "decoder_type='residual' is not one of"),
        (dict(attn_resolutions=(4,)), "attn_resolutions entry 4 never occurs"),
        (dict(label_dim=-1), "label_dim=-1 must be an int >= 0"),
        (dict(img_resolution=15), "img_resolution=15 is not divisible"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        song_unet.create_song_unet(tiny_config(**overrides))


def test_bad_inputs_raise():
    model = song_unet.create_song_unet(tiny_config())
    x, sigma = jnp.zeros((2, 16, 16, 3)), jnp.ones((2,))
    with pytest.raises(ValueError, match="unconditional"):
        model.init(jax.random.PRNGKey(0), x, sigma, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 16, 16, 3\]"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)), sigma)
    with pytest.raises(ValueError, match="augment_dim=0"):
        model.init(jax.random.PRNGKey(0), x, sigma, None, False, jnp.zeros((2, 9)))
    conditional = song_unet.create_song_unet(tiny_config(label_dim=3))
    with pytest.raises(ValueError, match=r"class_labels must be ints of shape \[2\]"):
        conditional.init(jax.random.PRNGKey(0), x, sigma, jnp.zeros((2, 5)))
