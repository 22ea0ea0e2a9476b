"""score_sde's NCSN++ / DDPM++ / "DDPM" networks: FIR resampling, parameter counts, diffusers parity."""

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # parity with the PyTorch originals; skipped where torch is absent

from jaxdiff.readers import score_diffusers
from jaxdiff.models import ncsnpp
from jaxdiff.models.resample import (
    conv_downsample_2d,
    downsample_2d,
    fir_filter,
    upfirdn2d,
    upsample_2d,
    upsample_conv_2d,
)
from jaxdiff.models.summary import count_parameters


def np_upfirdn(x, kernel, up, down, pad0, pad1):
    """float64 reference by definition: insert up-1 zeros after each pixel, pad (crop if negative),
    true 2-D convolution with `kernel` (valid part), keep every down-th pixel. x [B,H,W,C]."""
    b, h, w, c = x.shape
    z = np.zeros((b, h * up, w * up, c))
    z[:, ::up, ::up] = x
    z = np.pad(z, ((0, 0), (max(pad0, 0), max(pad1, 0)), (max(pad0, 0), max(pad1, 0)), (0, 0)))
    z = z[:, max(-pad0, 0) : z.shape[1] - max(-pad1, 0), max(-pad0, 0) : z.shape[2] - max(-pad1, 0)]
    k = kernel.shape[0]
    out = np.zeros((b, z.shape[1] - k + 1, z.shape[2] - k + 1, c))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            window = z[:, i : i + k, j : j + k]  # convolution: window[a, b] meets kernel[k-1-a, k-1-b]
            out[:, i, j] = np.einsum("bxyc,xy->bc", window, kernel[::-1, ::-1])
    return out[:, ::down, ::down]


def close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("up, down, pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (2, 1, (3, -1)), (1, 1, (0, 2))])
def test_upfirdn2d_matches_numpy_definition(up, down, pad):
    rng = np.random.RandomState(0)
    x = rng.randn(2, 6, 6, 3)
    kernel = rng.randn(3, 3)  # asymmetric: catches a missing flip
    close(upfirdn2d(jnp.asarray(x, jnp.float32), kernel.astype(np.float32), up=up, down=down, pad=pad),
          np_upfirdn(x, kernel, up, down, *pad))  # fmt: skip


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 1), (1, 2, 1)])
def test_fir_up_and_down_sampling_match_numpy(taps):
    x = np.random.RandomState(1).randn(2, 8, 8, 3)
    k = np.outer(taps, taps) / np.sum(taps) ** 2
    p = len(taps) - 2  # score_sde / StyleGAN2 padding of upsample_2d and downsample_2d
    close(upsample_2d(jnp.asarray(x, jnp.float32), taps), np_upfirdn(x, 4 * k, 2, 1, (p + 1) // 2 + 1, p // 2))
    close(downsample_2d(jnp.asarray(x, jnp.float32), taps), np_upfirdn(x, k, 1, 2, (p + 1) // 2, p // 2))


def test_box_filter_is_nearest_upsampling_and_mean_pooling():
    x = np.random.RandomState(2).randn(1, 4, 4, 2).astype(np.float32)
    close(upsample_2d(x, (1, 1)), x.repeat(2, 1).repeat(2, 2))
    close(downsample_2d(x, (1, 1)), x.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4)))


def test_fir_filter_rejects_bad_taps():
    with pytest.raises(ValueError, match="taps"):
        fir_filter([1, -1])


def test_fused_conv_resampling_matches_diffusers():
    """score_sde's fused `Conv2d(up/down=True)` = diffusers' FirUpsample2D / FirDownsample2D with use_conv."""
    from diffusers.models.downsampling import FirDownsample2D
    from diffusers.models.upsampling import FirUpsample2D

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for layer, fused in ((FirUpsample2D(4, 6, use_conv=True), upsample_conv_2d),
                         (FirDownsample2D(4, 6, use_conv=True), conv_downsample_2d)):  # fmt: skip
        with torch.no_grad():
            expected = layer(x).numpy().transpose(0, 2, 3, 1)
        weight = layer.Conv2d_0.weight.detach().numpy().transpose(2, 3, 1, 0)
        ours = fused(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(weight), (1, 3, 3, 1))
        close(ours + layer.Conv2d_0.bias.detach().numpy(), expected)


# --------------------------------------------------------------------------- parameter counts


def score_sde_count(variant_config) -> int:
    """Parameters of score_sde's NCSNpp / DDPM constructors, by arithmetic on their channel bookkeeping
    (`models/ncsnpp.py`, `layerspp.py`): independent of our Flax code."""
    c = variant_config
    nf, temb, last = c.nf, 4 * c.nf, len(c.ch_mult) - 1

    def conv(i, o, k):
        return k * k * i * o + o

    def res(i, o, resample=False):  # GroupNorm, conv3x3, Dense(temb), GroupNorm, conv3x3[, 1×1 shortcut]
        shortcut = conv(i, o, 1) if i != o or resample else 0
        return 2 * i + conv(i, o, 3) + temb * o + o + 2 * o + conv(o, o, 3) + shortcut

    def attn(ch):
        return 2 * ch + 4 * (ch * ch + ch)

    def resample(ch):
        return res(ch, ch, True) if c.resblock_type == "biggan" else conv(ch, ch, 3)

    fourier = c.embedding_type == "fourier"
    total = (nf if fourier else 0) + (2 * nf if fourier else nf) * temb + temb + temb * temb + temb
    total += conv(3, nf, 3)
    hs, ch, pyramid = [nf], nf, 3
    for level, mult in enumerate(c.ch_mult):
        for _ in range(c.num_res_blocks):
            total += res(ch, nf * mult)
            ch = nf * mult
            total += attn(ch) if c.image_size >> level in c.attn_resolutions else 0
            hs.append(ch)
        if level != last:
            total += resample(ch)
            if c.progressive_input == "input_skip":
                total += conv(pyramid, ch, 1)
            elif c.progressive_input == "residual":
                total += conv(pyramid, ch, 3)
                pyramid = ch
            hs.append(ch)
    total += 2 * res(ch, ch) + attn(ch)
    for level in reversed(range(last + 1)):
        for _ in range(c.num_res_blocks + 1):
            total += res(ch + hs.pop(), nf * c.ch_mult[level])
            ch = nf * c.ch_mult[level]
        total += attn(ch) if c.image_size >> level in c.attn_resolutions else 0
        total += 2 * ch + conv(ch, 3, 3) if c.progressive == "output_skip" else 0
        total += resample(ch) if level != 0 else 0
    return total + (0 if c.progressive == "output_skip" else 2 * ch + conv(ch, 3, 3))


# Exact counts of score_sde's CIFAR-10 models: `score_sde_count` of each config (checked below), which round to
# the published figures 61.80 M, 106.63 M, 62.76 M, 107.59 M, 62.69 M and 35.22 M (REFERENCE_CONTINUOUS.md).
EXPECTED_COUNTS = {
    "ddpmpp": 61_804_419,
    "ddpmpp_deep": 106_632_579,
    "ncsnpp": 62_758_915,
    "ncsnpp_deep": 107_587_075,
    "ncsnpp_discrete": 62_693_251,
    "ddpm": 35_218_947,
}
PUBLISHED_MILLIONS = {"ddpmpp": 61.80, "ddpmpp_deep": 106.63, "ncsnpp": 62.76, "ncsnpp_deep": 107.59,
                      "ncsnpp_discrete": 62.69, "ddpm": 35.22}  # fmt: skip


def param_shapes(config):
    model = ncsnpp.create_ncsnpp(config)
    size = config.image_size
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.ones((1,)))["params"]


@pytest.mark.parametrize("variant", ncsnpp.CIFAR10_VARIANTS)
def test_cifar10_parameter_counts(variant):
    config = ncsnpp.cifar10_config(variant)
    assert score_sde_count(config) == EXPECTED_COUNTS[variant]
    assert round(EXPECTED_COUNTS[variant] / 1e6, 2) == PUBLISHED_MILLIONS[variant]
    assert count_parameters(param_shapes(config)) == EXPECTED_COUNTS[variant]


def diffusers_ncsnpp(**overrides):
    from diffusers import UNet2DModel

    settings = dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=4,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
        time_embedding_type="fourier", mid_block_scale_factor=2**0.5, norm_num_groups=None, norm_eps=1e-6,
        attention_head_dim=None, act_fn="silu",
    )  # fmt: skip
    return UNet2DModel(**{**settings, **overrides})


def test_count_matches_diffusers_ncsnpp_layout():
    """diffusers' NCSN++ (output_skip / input_skip, as in score_sde's CelebA-HQ and FFHQ configs) at CIFAR-10
    width, built shape-only on the meta device: 61,894,924 parameters, equal to ours and to `score_sde_count`."""
    with torch.device("meta"):
        reference = diffusers_ncsnpp()
    expected = sum(p.numel() for p in reference.parameters())
    config = score_diffusers.config_from_diffusers(dict(reference.config))
    assert expected == 61_894_924 == score_sde_count(config)
    assert count_parameters(param_shapes(config)) == expected


# --------------------------------------------------------------------------- diffusers parity


def score_sde_group_counts(model):
    """Give every GroupNorm of a diffusers model score_sde's min(C // 4, 32) groups (see score_diffusers)."""
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.num_groups = min(module.num_channels // 4, 32)


def test_outputs_match_diffusers_ncsnpp():
    torch.manual_seed(0)
    reference = diffusers_ncsnpp(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
    ).eval()  # fmt: skip
    score_sde_group_counts(reference)
    with torch.no_grad():  # random weights everywhere, norms included
        for name, p in reference.named_parameters():
            offset = 1.0 if "norm" in name and "weight" in name else 0.0
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.5) + offset)
    config = score_diffusers.config_from_diffusers(dict(reference.config))
    params = score_diffusers.params_from_diffusers(config, {k: v.numpy() for k, v in reference.state_dict().items()})
    x = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
    sigma = np.array([0.3, 7.0], np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(sigma)).sample.numpy().transpose(0, 2, 3, 1)
    ours = ncsnpp.create_ncsnpp(config).apply({"params": params}, x.transpose(0, 2, 3, 1), sigma)
    close(np.asarray(ours) / sigma[:, None, None, None], expected, rtol=1e-4)  # diffusers divides by σ


def test_conversion_lists_every_problem():
    config = ncsnpp.default_config()
    config.update(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), fir=True,
                  progressive="output_skip", progressive_input="input_skip", embedding_type="fourier")  # fmt: skip
    names = {
        score_diffusers.diffusers_names(p, 2)[0]: s.shape
        for p, s in flax.traverse_util.flatten_dict(param_shapes(config)).items()
    }
    tensors = {n: np.zeros(s[::-1] if len(s) == 2 else s) for n, s in names.items()}  # wrong layouts for 4-D
    tensors.pop("conv_in.weight")
    tensors["extra.weight"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing:\n    conv_in.weight(.|\n)*unexpected:\n    extra.weight"):
        score_diffusers.params_from_diffusers(config, tensors)


def test_diffusers_config_with_other_blocks_is_refused():
    with pytest.raises(ValueError, match="down_block_types"):
        score_diffusers.config_from_diffusers(
            dict(time_embedding_type="fourier", mid_block_scale_factor=2**0.5, norm_eps=1e-6, sample_size=32,
                 block_out_channels=[32, 64], down_block_types=["DownBlock2D", "SkipDownBlock2D"])  # fmt: skip
        )
    with pytest.raises(ValueError, match="time_embedding_type='positional'"):
        score_diffusers.config_from_diffusers(dict(time_embedding_type="positional"))


# --------------------------------------------------------------------------- options and errors


def tiny_config(**overrides):
    config = ncsnpp.default_config()
    config.update(image_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "overrides",
    [
        dict(fir=True, resblock_type="ddpm", progressive="residual", progressive_input="residual"),
        dict(fir=False, progressive="output_skip", progressive_input="input_skip", progressive_combine="cat",
             embedding_type="fourier"),  # fmt: skip
    ],
)
def test_progressive_options_run_and_depend_on_every_input(overrides):
    config = tiny_config(**overrides)
    model = ncsnpp.create_ncsnpp(config)
    x = np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32)
    labels = np.array([0.5, 2.0], np.float32)
    params = model.init(jax.random.PRNGKey(0), x, labels)["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    out = np.asarray(model.apply({"params": params}, x, labels))
    assert out.shape == (2, 8, 8, 3) and np.isfinite(out).all()
    other = np.asarray(model.apply({"params": params}, x, labels[::-1].copy()))
    assert np.abs(other - out).max() > 1e-3  # the noise label reaches the output
    x2 = x.copy()
    x2[0, 0, 0, 0] += 1.0
    assert np.abs(np.asarray(model.apply({"params": params}, x2, labels))[1] - out[1]).max() == 0  # no batch mixing


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(progressive="skip"), "progressive='skip' is not one of"),
        (dict(resblock_type="resnet"), "resblock_type='resnet'"),
        (dict(attn_resolutions=(3,)), "attn_resolutions entry 3 never occurs"),
        (dict(image_size=10, ch_mult=(1, 2, 2)), "image_size=10 is not divisible"),
        (dict(nf=18), "nf=18 must be divisible by 4"),
        (dict(dropout=1.0), r"dropout=1.0 must be a number in \[0, 1\)"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        ncsnpp.create_ncsnpp(tiny_config(**overrides))


def test_bad_inputs_raise():
    model = ncsnpp.create_ncsnpp(tiny_config())
    with pytest.raises(ValueError, match=r"x must have shape \[B, 8, 8, 3\]"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.ones((1,)))
    with pytest.raises(ValueError, match=r"noise_labels must have shape \[1\]"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.ones((2,)))
    with pytest.raises(ValueError, match="not class-conditional"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="variant='ddpm\\+\\+' is not one of"):
        ncsnpp.cifar10_config("ddpm++")
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        ncsnpp.create_ncsnpp(tiny_config(extra=1))


def test_unconditional_network_has_no_time_layers_but_keeps_fourier_frequencies():
    flat = flax.traverse_util.flatten_dict(param_shapes(tiny_config(conditional=False, embedding_type="fourier")))
    assert ("fourier_embedding", "W") in flat
    assert not [p for p in flat if "temb_proj" in p or p[0].startswith("temb_dense")]


def torch_layer(tensors, name):
    """A PyTorch layer in our layout: GroupNorm scale/bias, conv OIHW -> HWIO, Linear [out, in] -> [in, out]."""
    weight, bias = tensors[f"{name}.weight"], tensors[f"{name}.bias"]
    if "norm" in name:
        return {"scale": weight, "bias": bias}
    return {"kernel": weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T, "bias": bias}


@pytest.mark.parametrize("direction", ["up", "down"])
def test_ddpmpp_resampling_resblock_matches_diffusers(direction):
    """DDPM++'s BigGAN block without FIR (nearest up / 2×2 mean down) = diffusers' ResnetBlock2D(kernel="sde_vp")."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    reference = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=12, groups=4, eps=1e-6,
                              output_scale_factor=2**0.5, use_in_shortcut=True, kernel="sde_vp",
                              up=direction == "up", down=direction == "down").eval()  # fmt: skip
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 12)
    with torch.no_grad():
        expected = reference(x, temb).numpy().transpose(0, 2, 3, 1)
    tensors = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = {ours: torch_layer(tensors, theirs) for ours, theirs in score_diffusers.RESBLOCK_LAYERS.items()}
    opts = ncsnpp.BlockOptions("biggan", False, (1, 3, 3, 1), True, 0.0, True, 0.0)
    block = ncsnpp.ResnetBlock(16, opts, direction)
    ours = block.apply({"params": params}, x.numpy().transpose(0, 2, 3, 1), temb.numpy(), False)
    close(ours, expected, rtol=1e-5)
