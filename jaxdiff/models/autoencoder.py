"""Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`) as a Flax Linen module.

Images are NHWC float in [-1, 1]; latents are NHWC with `latent_channels` channels at 1/2^(L-1) of the
image side for L = len(block_out_channels). The encoder returns the parameters of a diagonal Gaussian
posterior q(z | x); the latent diffusion model sees (z - shift_factor)·scaling_factor, both kept in the
config (shift_factor None means 0).

The parameter tree mirrors diffusers' module names with `.{i}` written `_{i}`:

    encoder/conv_in, encoder/down_blocks_{i}/resnets_{j}, encoder/down_blocks_{i}/downsamplers_0/conv,
    encoder/mid_block/{resnets_0, attentions_0, resnets_1}, encoder/conv_norm_out, encoder/conv_out
    quant_conv, post_quant_conv                                    1×1 convolutions (optional)
    decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_{i}/resnets_{j} (j <= layers_per_block),
    decoder/up_blocks_{i}/upsamplers_0/conv, decoder/conv_norm_out, decoder/conv_out

ResNet blocks hold norm1, conv1, norm2, conv2 and, when the width changes, the 1×1 conv_shortcut;
attention blocks hold group_norm, to_q, to_k, to_v, to_out_0. Conv kernels are HWIO, dense kernels
[in, out]. Every GroupNorm uses `norm_num_groups` groups and eps 1e-6, computed in float32.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.checks import is_int, unsupported
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.models.layers import Downsample, Upsample, conv1x1, conv3x3, dense, group_norm, single_head_attention

_unsupported = functools.partial(unsupported, "AutoencoderKL config")

Array = jax.Array

LOGVAR_RANGE = (-30.0, 20.0)
COMPUTE_DTYPES = ("float32", "bfloat16")

# diffusers' AutoencoderKL defaults, used for keys a config.json omits.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
OPTION_DEFAULTS = {"dtype": "float32", "remat": False}  # ours: compute dtype (params stay float32), remat

log = logging.getLogger(__name__)


def _positive_int(key: str, value: Any) -> int:
    if not is_int(value, numpy=False) or value < 1:
        raise _unsupported(key, value, "a positive int")
    return value


def autoencoder_config(settings: dict, **options: Any) -> ml_collections.ConfigDict:
    """The ConfigDict of a diffusers `AutoencoderKL` config.json dict (omitted keys take diffusers' defaults),
    plus our options `dtype` ("float32" | "bfloat16") and `remat` (bool). Unsupported values raise
    ValueError naming the key; unknown keys are logged and ignored."""
    if settings.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise _unsupported("_class_name", settings["_class_name"], "'AutoencoderKL'")
    unknown = sorted(k for k in settings if k not in DIFFUSERS_DEFAULTS and not k.startswith("_"))
    if unknown:
        log.info("AutoencoderKL config: ignoring unknown keys %s", unknown)
    bad_options = sorted(set(options) - set(OPTION_DEFAULTS))
    if bad_options:
        raise ConfigError(f"AutoencoderKL config: unknown options {bad_options}; allowed: {sorted(OPTION_DEFAULTS)}")
    c = {**DIFFUSERS_DEFAULTS, **{k: settings[k] for k in DIFFUSERS_DEFAULTS if k in settings}}
    c.update({**OPTION_DEFAULTS, **options})

    for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
        _positive_int(key, c[key])
    widths = c["block_out_channels"]
    if not isinstance(widths, (list, tuple)) or not widths:
        raise _unsupported("block_out_channels", widths, "a non-empty list of ints")
    for width in widths:
        if _positive_int("block_out_channels", width) % c["norm_num_groups"]:
            need = f"a divisor of every block_out_channels entry {widths}"
            raise _unsupported("norm_num_groups", c["norm_num_groups"], need)
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = c[key]
        if not isinstance(types, (list, tuple)) or list(types) != [block] * len(widths):
            raise _unsupported(key, types, f"{block!r} once per entry of block_out_channels ({len(widths)})")
        c[key] = tuple(types)
    c["block_out_channels"] = tuple(widths)
    if c["act_fn"] not in ("silu", "swish"):
        raise _unsupported("act_fn", c["act_fn"], "'silu' or 'swish'")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast", "remat"):
        if not isinstance(c[key], bool):
            raise _unsupported(key, c[key], "true or false")
    for key in ("scaling_factor", "shift_factor"):
        if (c[key] is not None or key == "scaling_factor") and not isinstance(c[key], (int, float)):
            raise _unsupported(key, c[key], "a number")
    if c["dtype"] not in COMPUTE_DTYPES:
        raise _unsupported("dtype", c["dtype"], " or ".join(map(repr, COMPUTE_DTYPES)))
    return ml_collections.ConfigDict(c)


class DiagonalGaussian(NamedTuple):
    """Posterior q(z | x) = N(mean, exp(logvar)), both float32 NHWC [B, h, w, latent_channels];
    logvar is clipped to [-30, 20] as in diffusers."""

    mean: Array
    logvar: Array

    def mode(self) -> Array:
        return self.mean

    def sample(self, rng: Array) -> Array:
        """mean + exp(logvar / 2)·n, n ~ N(0, I) drawn from `rng`."""
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def kl(self) -> Array:
        """KL(q || N(0, I)) in nats per example [B]: ½·Σ(mean² + exp(logvar) − 1 − logvar) over h, w, C."""
        terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


def posterior_from_moments(moments: Array) -> DiagonalGaussian:
    """Split [B, h, w, 2·latent_channels] (mean first, as diffusers' channel chunk) into a DiagonalGaussian."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, *LOGVAR_RANGE))


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding: x [B,H,W,C] -> [B,H,W,out_ch],
    h = conv2(silu(norm2(conv1(silu(norm1(x)))))); returns conv_shortcut(x) + h (1×1, only when C != out_ch)."""

    out_ch: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = conv3x3(self.out_ch, self.dtype, name="conv1")(nn.silu(group_norm(x, name="norm1", num_groups=self.groups)))
        h = conv3x3(self.out_ch, self.dtype, name="conv2")(nn.silu(group_norm(h, name="norm2", num_groups=self.groups)))
        if x.shape[-1] != self.out_ch:
            x = conv1x1(self.out_ch, self.dtype, name="conv_shortcut")(x)
        return x + h


class SpatialAttention(nn.Module):
    """diffusers' single-head VAE attention over all H·W positions: x + to_out_0(attn(group_norm(x)))."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = group_norm(x, name="group_norm", num_groups=self.groups)
        q, k, v = (dense(c, self.dtype, name=n)(h).reshape(b, height * width, 1, c) for n in ("to_q", "to_k", "to_v"))
        h = single_head_attention(q, k, v).reshape(b, height, width, c)
        return x + dense(c, self.dtype, name="to_out_0")(h)


def _resnet_block(remat: bool) -> type[nn.Module]:
    return nn.remat(ResnetBlock) if remat else ResnetBlock


class MidBlock(nn.Module):
    """resnets_0, attentions_0 (if with_attention), resnets_1; channels unchanged."""

    groups: int
    with_attention: bool
    dtype: Any
    remat: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        block = _resnet_block(self.remat)
        x = block(x.shape[-1], self.groups, self.dtype, name="resnets_0")(x)
        if self.with_attention:
            x = SpatialAttention(self.groups, self.dtype, name="attentions_0")(x)
        return block(x.shape[-1], self.groups, self.dtype, name="resnets_1")(x)


class ResolutionBlock(nn.Module):
    """diffusers' DownEncoderBlock2D / UpDecoderBlock2D: `num_layers` ResNet blocks `resnets_{j}` to `out_ch`,
    then `downsamplers_0` (pad (0, 1, 0, 1) and a stride-2 3×3 conv: TF "SAME" on even sizes) or
    `upsamplers_0` (nearest ×2, 3×3 conv) when `resample` is "down" or "up"."""

    out_ch: int
    num_layers: int
    groups: int
    resample: str | None
    dtype: Any
    remat: bool

    @nn.compact
    def __call__(self, h: Array) -> Array:
        for j in range(self.num_layers):
            h = _resnet_block(self.remat)(self.out_ch, self.groups, self.dtype, name=f"resnets_{j}")(h)
        if self.resample == "down":
            h = Downsample(True, self.dtype, name="downsamplers_0")(h)
        elif self.resample == "up":
            h = Upsample(True, self.dtype, name="upsamplers_0")(h)
        return h


class Encoder(nn.Module):
    """x [B,H,W,in_channels] -> posterior moments [B, H/2^(L-1), W/2^(L-1), 2·latent_channels] (float32)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_block_add_attention: bool
    dtype: Any
    remat: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = conv3x3(self.block_out_channels[0], self.dtype, name="conv_in")(x)
        last = len(self.block_out_channels) - 1
        for i, width in enumerate(self.block_out_channels):
            resample = "down" if i != last else None
            h = ResolutionBlock(
                width, self.layers_per_block, self.groups, resample, self.dtype, self.remat, name=f"down_blocks_{i}"
            )(h)
        h = MidBlock(self.groups, self.mid_block_add_attention, self.dtype, self.remat, name="mid_block")(h)
        h = nn.silu(group_norm(h, name="conv_norm_out", num_groups=self.groups))
        return conv3x3(2 * self.latent_channels, self.dtype, name="conv_out")(h).astype(jnp.float32)


class Decoder(nn.Module):
    """z [B,h,w,latent_channels] -> image [B, h·2^(L-1), w·2^(L-1), out_channels] (float32)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool
    dtype: Any
    remat: bool

    @nn.compact
    def __call__(self, z: Array) -> Array:
        widths = self.block_out_channels[::-1]
        h = conv3x3(widths[0], self.dtype, name="conv_in")(z)
        h = MidBlock(self.groups, self.mid_block_add_attention, self.dtype, self.remat, name="mid_block")(h)
        last = len(widths) - 1
        for i, width in enumerate(widths):
            resample = "up" if i != last else None
            h = ResolutionBlock(
                width, self.layers_per_block + 1, self.groups, resample, self.dtype, self.remat, name=f"up_blocks_{i}"
            )(h)
        h = nn.silu(group_norm(h, name="conv_norm_out", num_groups=self.groups))
        return conv3x3(self.out_channels, self.dtype, name="conv_out")(h).astype(jnp.float32)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. `encode(x)` -> DiagonalGaussian, `decode(z)` -> image; `__call__(x)` reconstructs
    from the posterior mode (or a sample, given `rng`). Build it with `create_autoencoder(config)`."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"
    remat: bool = False

    def setup(self):
        dtype = jnp.dtype(self.dtype)
        shared = dict(
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            dtype=dtype,
            remat=self.remat,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **shared)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)
        if self.use_quant_conv:
            self.quant_conv = conv1x1(2 * self.latent_channels, dtype, name="quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = conv1x1(self.latent_channels, dtype, name="post_quant_conv")

    def encode(self, x: Array) -> DiagonalGaussian:
        """x [B,H,W,in_channels] in [-1, 1], H and W divisible by 2^(L-1) -> posterior q(z | x)."""
        factor = 2 ** (len(self.block_out_channels) - 1)
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % factor or x.shape[2] % factor:
            need = f"[B, H, W, {self.in_channels}] (NHWC) with H and W multiples of {factor}"
            raise UsageError(f"x must have shape {need}, got {x.shape}")
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return posterior_from_moments(moments)

    def decode(self, z: Array) -> Array:
        """z [B,h,w,latent_channels] (unscaled latents) -> float32 image [B, h·2^(L-1), w·2^(L-1), out_channels]."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise UsageError(f"z must have shape [B, h, w, {self.latent_channels}] (NHWC), got {z.shape}")
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: Array, rng: Array | None = None) -> Array:
        posterior = self.encode(x)
        return self.decode(posterior.mode() if rng is None else posterior.sample(rng))


def create_autoencoder(config: ml_collections.ConfigDict) -> AutoencoderKL:
    """The module of an `autoencoder_config` ConfigDict."""
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_post_quant_conv,
        mid_block_add_attention=config.mid_block_add_attention,
        dtype=config.dtype,
        remat=config.remat,
    )


def autoencoder_model_config(section) -> ml_collections.ConfigDict:
    """The `autoencoder_config` of a run config's `autoencoder` section (diffusers keys plus dtype and remat;
    one DownEncoderBlock2D / UpDecoderBlock2D per level). ValueError names an unsupported value."""
    settings = {key: value for key, value in dict(section).items() if key not in OPTION_DEFAULTS}
    levels = len(settings["block_out_channels"])
    settings.update(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)
    return autoencoder_config(settings, **{key: section[key] for key in OPTION_DEFAULTS})
