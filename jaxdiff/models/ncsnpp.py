"""score_sde's NCSN++ / DDPM++ networks (Song et al. 2021, `models/ncsnpp.py`) and its "DDPM" model, in Flax Linen.

The network maps (x [B,S,S,C] float, noise_labels [B]) to [B,S,S,C]. With `embedding_type="fourier"`
the labels are noise levels σ > 0 and the network embeds log σ with Gaussian Fourier features
(scale `fourier_scale`); with "positional" they are used as raw numbers in the DDPM sinusoid
(score_sde feeds t·999 for continuous VP/sub-VP and the 0-based step index for discrete models).
The network knows nothing of the diffusion: score_sde's `scale_by_sigma` (dividing the output by σ)
and its [0, 1] -> [-1, 1] input centring belong to the caller.

Parameter tree (score_sde's layers, in the order its code creates them):

    fourier_embedding/W                       embedding_type "fourier" (fixed, no gradient)
    temb_dense0, temb_dense1                  conditional: embedding -> 4·nf -> 4·nf
    conv_in                                   3×3, C -> nf
    down_{i}/block_{j}                        ResnetBlock: norm1, conv1, temb_proj, norm2, conv2[, shortcut]
    down_{i}/attn_{j}                         AttnBlock: norm, q, k, v, proj_out (at attention resolutions)
    down_{i}/downsample                       all levels but the last: ResnetBlock(down) ("biggan") or Resample ("ddpm")
    down_{i}/pyramid_combine                  progressive_input "input_skip": 1×1 conv C -> channels of h
    down_{i}/pyramid_downsample               progressive_input "residual": Resample with a 3×3 conv
    mid_block_1, mid_attn_1, mid_block_2
    up_{i}/block_{j}  (j < num_res_blocks+1), up_{i}/attn (one per level, after the blocks)
    up_{i}/pyramid_norm, up_{i}/pyramid_conv  progressive "output_skip" (every level), "residual" (lowest level)
    up_{i}/pyramid_upsample                   progressive "residual", all levels but the lowest
    up_{i}/upsample                           all levels but level 0
    norm_out, conv_out                        unless progressive is "output_skip"

Convolutions are HWIO (1×1 ones too), dense kernels [in, out]; GroupNorm has min(C//4, 32) groups, eps 1e-6.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.models.layers import single_head_attention, timestep_embedding
from jaxdiff.models.resample import conv_downsample_2d, downsample_2d, upsample_2d, upsample_conv_2d
from jaxdiff.checks import require_choice, require_int
from jaxdiff.models.score_layers import (
    GaussianFourierEmbedding,
    conv,
    group_norm,
    module_fields,
    residual_sum,
    scaled_init,
)

Array = jax.Array

RESBLOCK_TYPES = ("biggan", "ddpm")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
COMBINE = ("sum", "cat")
EMBEDDINGS = ("fourier", "positional")
NIN_INIT_SCALE = 0.1  # score_sde's NIN (1×1 "network in network") layers default to this init scale


class BlockOptions(NamedTuple):
    """The options every block of one network shares."""

    resblock_type: str
    fir: bool
    fir_kernel: tuple[int, ...]
    resamp_with_conv: bool
    dropout: float
    skip_rescale: bool
    init_scale: float


def resample(x: Array, direction: str, fir: bool, fir_kernel: tuple[int, ...]) -> Array:
    """×2 up or down without parameters: FIR filter, or nearest-neighbour / 2×2 mean."""
    b, h, w, c = x.shape
    if direction == "up":
        return upsample_2d(x, fir_kernel) if fir else jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return downsample_2d(x, fir_kernel) if fir else x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class FIRConv(nn.Module):
    """3×3 convolution fused with FIR ×2 resampling (score_sde's `up_or_down_sampling.Conv2d`): kernel, bias."""

    features: int
    direction: str
    fir_kernel: tuple[int, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", scaled_init(1.0), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        fused = upsample_conv_2d if self.direction == "up" else conv_downsample_2d
        return fused(x, kernel, self.fir_kernel) + bias


class Resample(nn.Module):
    """score_sde's `Upsample`/`Downsample`: ×2 resampling, with a 3×3 conv `conv` to `out_ch` when with_conv."""

    direction: str
    with_conv: bool
    fir: bool
    fir_kernel: tuple[int, ...]
    out_ch: int | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.with_conv:
            return resample(x, self.direction, self.fir, self.fir_kernel)
        if self.fir:
            return FIRConv(out_ch, self.direction, self.fir_kernel, name="conv")(x)
        if self.direction == "up":
            return conv(out_ch, 3, name="conv")(resample(x, "up", False, self.fir_kernel))
        down = nn.Conv(out_ch, (3, 3), strides=(2, 2), padding="SAME", kernel_init=scaled_init(1.0), name="conv")
        return down(x)  # TF "SAME": pad 0 before, 1 after


class ResnetBlock(nn.Module):
    """score_sde's ResnetBlockBigGANpp / ResnetBlockDDPMpp, x [B,H,W,C] -> [B,H',W',out_ch]:
    h = conv1(resample(swish(norm1(x)))) + temb_proj(swish(temb)); h = conv2(dropout(swish(norm2(h))));
    returns residual_sum(shortcut(resample(x)), h) with a 1×1 `shortcut` when channels change or it resamples.
    """

    out_ch: int
    opts: BlockOptions
    direction: str = "none"  # "up" / "down": BigGAN-style resampling inside the block

    @nn.compact
    def __call__(self, x: Array, temb: Array | None, train: bool) -> Array:
        opts = self.opts
        h = nn.swish(group_norm(x, name="norm1"))
        if self.direction != "none":
            h = resample(h, self.direction, opts.fir, opts.fir_kernel)
            x = resample(x, self.direction, opts.fir, opts.fir_kernel)
        h = conv(self.out_ch, 3, name="conv1")(h)
        if temb is not None:
            proj = nn.Dense(self.out_ch, kernel_init=scaled_init(1.0), name="temb_proj")(nn.swish(temb))
            h = h + proj[:, None, None, :]
        h = nn.swish(group_norm(h, name="norm2"))
        h = nn.Dropout(opts.dropout, deterministic=not train)(h)
        h = conv(self.out_ch, 3, scale=opts.init_scale, name="conv2")(h)
        if x.shape[-1] != self.out_ch or self.direction != "none":
            scale = 1.0 if opts.resblock_type == "biggan" else NIN_INIT_SCALE
            x = conv(self.out_ch, 1, scale=scale, name="shortcut")(x)
        return residual_sum(x, h, opts.skip_rescale)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions: residual_sum(x, proj_out(attn(q, k, v of norm(x))))."""

    opts: BlockOptions

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = group_norm(x, name="norm")
        q, k, v = (
            nn.Dense(c, kernel_init=scaled_init(NIN_INIT_SCALE), name=n)(h).reshape(b, height * width, 1, c)
            for n in ("q", "k", "v")
        )
        h = single_head_attention(q, k, v).reshape(b, height, width, c)
        h = nn.Dense(c, kernel_init=scaled_init(self.opts.init_scale), name="proj_out")(h)
        return residual_sum(x, h, self.opts.skip_rescale)


class DownLevel(nn.Module):
    """One resolution going down. Returns (the skips it pushes, the input pyramid)."""

    out_ch: int
    num_res_blocks: int
    use_attn: bool
    downsample: bool
    progressive_input: str
    combine: str
    opts: BlockOptions

    @nn.compact
    def __call__(self, h: Array, pyramid: Array | None, temb: Array | None, train: bool):
        opts, skips = self.opts, []
        for j in range(self.num_res_blocks):
            h = ResnetBlock(self.out_ch, opts, name=f"block_{j}")(h, temb, train)
            if self.use_attn:
                h = AttnBlock(opts, name=f"attn_{j}")(h)
            skips.append(h)
        if not self.downsample:
            return skips, pyramid
        if opts.resblock_type == "biggan":
            h = ResnetBlock(h.shape[-1], opts, "down", name="downsample")(h, temb, train)
        else:
            h = Resample("down", opts.resamp_with_conv, opts.fir, opts.fir_kernel, name="downsample")(h)
        if self.progressive_input == "input_skip":
            pyramid = resample(pyramid, "down", opts.fir, opts.fir_kernel)
            projected = conv(h.shape[-1], 1, name="pyramid_combine")(pyramid)
            h = jnp.concatenate([projected, h], axis=-1) if self.combine == "cat" else projected + h
        elif self.progressive_input == "residual":
            down = Resample("down", True, opts.fir, opts.fir_kernel, h.shape[-1], name="pyramid_downsample")
            h = pyramid = residual_sum(down(pyramid), h, opts.skip_rescale)
        skips.append(h)
        return skips, pyramid


class UpLevel(nn.Module):
    """One resolution going up: block j takes concat([h, skips[j]]), then one attention block, the output
    pyramid step and the upsampling. Returns (h, pyramid)."""

    out_ch: int
    use_attn: bool
    lowest: bool
    upsample: bool
    progressive: str
    image_channels: int
    opts: BlockOptions

    @nn.compact
    def __call__(self, h: Array, skips: tuple[Array, ...], pyramid: Array | None, temb: Array | None, train: bool):
        opts = self.opts
        for j, skip in enumerate(skips):
            h = ResnetBlock(self.out_ch, opts, name=f"block_{j}")(jnp.concatenate([h, skip], axis=-1), temb, train)
        if self.use_attn:
            h = AttnBlock(opts, name="attn")(h)
        if self.progressive == "output_skip":
            out = nn.swish(group_norm(h, name="pyramid_norm"))
            out = conv(self.image_channels, 3, scale=opts.init_scale, name="pyramid_conv")(out)
            pyramid = out if self.lowest else resample(pyramid, "up", opts.fir, opts.fir_kernel) + out
        elif self.progressive == "residual":
            if self.lowest:
                pyramid = conv(h.shape[-1], 3, name="pyramid_conv")(nn.swish(group_norm(h, name="pyramid_norm")))
            else:
                up = Resample("up", True, opts.fir, opts.fir_kernel, h.shape[-1], name="pyramid_upsample")
                h = pyramid = residual_sum(up(pyramid), h, opts.skip_rescale)
        if self.upsample:
            if opts.resblock_type == "biggan":
                h = ResnetBlock(h.shape[-1], opts, "up", name="upsample")(h, temb, train)
            else:
                h = Resample("up", opts.resamp_with_conv, opts.fir, opts.fir_kernel, name="upsample")(h)
        return h, pyramid


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ / score_sde's DDPM: (x [B,S,S,C], noise_labels [B]) -> float32 [B,S,S,C].

    Fields are the keys of `default_config()`; they are checked on construction.
    """

    image_size: int
    num_channels: int
    nf: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    resamp_with_conv: bool
    conditional: bool
    fir: bool
    fir_kernel: tuple[int, ...]
    skip_rescale: bool
    resblock_type: str
    progressive: str
    progressive_input: str
    progressive_combine: str
    init_scale: float
    embedding_type: str
    fourier_scale: float

    def __post_init__(self):
        self._check_fields()
        super().__post_init__()

    def _check_fields(self) -> None:
        for name in ("image_size", "num_channels", "nf", "num_res_blocks"):
            require_int(name, getattr(self, name), 1)
        require_choice("resblock_type", self.resblock_type, RESBLOCK_TYPES)
        require_choice("progressive", self.progressive, PROGRESSIVE)
        require_choice("progressive_input", self.progressive_input, PROGRESSIVE_INPUT)
        require_choice("progressive_combine", self.progressive_combine, COMBINE)
        require_choice("embedding_type", self.embedding_type, EMBEDDINGS)
        if not isinstance(self.ch_mult, tuple) or not self.ch_mult:
            raise ConfigError(f"ch_mult={self.ch_mult!r} must be a non-empty tuple of ints")
        for mult in self.ch_mult:
            require_int("ch_mult entry", mult, 1)
        if self.nf % 4:
            raise ConfigError(f"nf={self.nf} must be divisible by 4 (GroupNorm uses min(C // 4, 32) groups)")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ConfigError(f"image_size={self.image_size} is not divisible by 2^(len(ch_mult)-1) = {factor}")
        resolutions = self.resolutions
        for res in self.attn_resolutions:
            if res not in resolutions:
                raise ConfigError(f"attn_resolutions entry {res!r} never occurs; the resolutions are {resolutions}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        if not self.fir_kernel or any(not isinstance(t, (int, float)) for t in self.fir_kernel):
            raise ConfigError(f"fir_kernel={self.fir_kernel!r} must be a non-empty tuple of numbers")
        if self.embedding_type == "fourier" and not self.fourier_scale > 0:
            raise ConfigError(f"fourier_scale={self.fourier_scale!r} must be > 0")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map side length at each level i: image_size / 2^i."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    def _check_inputs(self, x: Array, noise_labels: Array, class_labels) -> None:
        expected = (self.image_size, self.image_size, self.num_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise UsageError(f"x must have shape [B, {', '.join(map(str, expected))}] (NHWC), got {x.shape}")
        if noise_labels.shape != (x.shape[0],):
            raise UsageError(f"noise_labels must have shape [{x.shape[0]}], got {noise_labels.shape}")
        if class_labels is not None:
            raise UsageError("NCSN++ is not class-conditional: class_labels must be None")

    @nn.compact
    def __call__(self, x: Array, noise_labels: Array, class_labels: Array | None = None, train: bool = False) -> Array:
        """x [B,S,S,C] float; noise_labels [B]: σ > 0 for "fourier", raw numbers (t·999, step index) for
        "positional". Dropout is active only with train=True (rngs={"dropout": key})."""
        x, noise_labels = jnp.asarray(x, jnp.float32), jnp.asarray(noise_labels, jnp.float32)
        self._check_inputs(x, noise_labels, class_labels)
        opts = BlockOptions(
            self.resblock_type, self.fir, tuple(self.fir_kernel), self.resamp_with_conv, self.dropout,
            self.skip_rescale, self.init_scale,
        )  # fmt: skip

        if self.embedding_type == "fourier":  # created even when unconditional, as score_sde does
            emb = GaussianFourierEmbedding(self.nf, self.fourier_scale, name="fourier_embedding")(jnp.log(noise_labels))
        else:
            emb = timestep_embedding(noise_labels, self.nf)
        temb = None
        if self.conditional:
            temb = nn.Dense(4 * self.nf, kernel_init=scaled_init(1.0), name="temb_dense0")(emb)
            temb = nn.Dense(4 * self.nf, kernel_init=scaled_init(1.0), name="temb_dense1")(nn.swish(temb))

        num_levels, resolutions = len(self.ch_mult), self.resolutions
        pyramid = x if self.progressive_input != "none" else None
        hs = [conv(self.nf, 3, name="conv_in")(x)]
        for i, mult in enumerate(self.ch_mult):
            skips, pyramid = DownLevel(
                self.nf * mult, self.num_res_blocks, resolutions[i] in self.attn_resolutions, i != num_levels - 1,
                self.progressive_input, self.progressive_combine, opts, name=f"down_{i}",
            )(hs[-1], pyramid, temb, train)  # fmt: skip
            hs += skips

        h = ResnetBlock(hs[-1].shape[-1], opts, name="mid_block_1")(hs[-1], temb, train)
        h = AttnBlock(opts, name="mid_attn_1")(h)
        h = ResnetBlock(h.shape[-1], opts, name="mid_block_2")(h, temb, train)

        pyramid = None
        for i in reversed(range(num_levels)):
            skips = tuple(hs.pop() for _ in range(self.num_res_blocks + 1))
            h, pyramid = UpLevel(
                self.nf * self.ch_mult[i], resolutions[i] in self.attn_resolutions, i == num_levels - 1, i != 0,
                self.progressive, self.num_channels, opts, name=f"up_{i}",
            )(h, skips, pyramid, temb, train)  # fmt: skip

        if self.progressive == "output_skip":
            return pyramid
        h = nn.swish(group_norm(h, name="norm_out"))
        return conv(self.num_channels, 3, scale=self.init_scale, name="conv_out")(h)


def default_config() -> ml_collections.ConfigDict:
    """DDPM++ (continuous VP) for CIFAR-10: the keys of `NCSNpp` with score_sde's values."""
    return ml_collections.ConfigDict(
        dict(
            image_size=32, num_channels=3, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
            dropout=0.1, resamp_with_conv=True, conditional=True, fir=False, fir_kernel=(1, 3, 3, 1),
            skip_rescale=True, resblock_type="biggan", progressive="none", progressive_input="none",
            progressive_combine="sum", init_scale=0.0, embedding_type="positional", fourier_scale=16.0,
        )
    )  # fmt: skip


CIFAR10_VARIANTS = ("ddpmpp", "ddpmpp_deep", "ncsnpp", "ncsnpp_deep", "ncsnpp_discrete", "ddpm")


def cifar10_config(variant: str) -> ml_collections.ConfigDict:
    """score_sde's CIFAR-10 networks: "ddpmpp" (VP/sub-VP cont.), "ddpmpp_deep", "ncsnpp" (VE cont.),
    "ncsnpp_deep", "ncsnpp_discrete" (SMLD, positional embedding) and "ddpm" (its `models/ddpm.py`:
    DDPM ResBlocks, no rescaling, one attention block per up level; its GroupNorms have 32 groups, which is
    min(C // 4, 32) for every width of this config)."""
    require_choice("variant", variant, CIFAR10_VARIANTS)
    config = default_config()
    if variant.startswith("ncsnpp"):
        config.update(fir=True, progressive_input="residual")
        config.embedding_type = "positional" if variant == "ncsnpp_discrete" else "fourier"
    if variant.endswith("_deep"):
        config.num_res_blocks = 8
    if variant == "ddpm":
        config.update(num_res_blocks=2, resblock_type="ddpm", skip_rescale=False)
    return config


def create_ncsnpp(config: ml_collections.ConfigDict) -> NCSNpp:
    """The network of a config with the keys of `default_config()`; unknown or missing keys raise ValueError."""
    return NCSNpp(**module_fields(config, default_config(), ("ch_mult", "attn_resolutions", "fir_kernel"), "NCSN++"))
