"""The DDPM U-Net (Ho et al. 2020, official TensorFlow code) as a Flax Linen module, with the options
of diffusers' `UNet2DModel` built from DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D, their up
counterparts and UNetMidBlock2D. Every option defaults to the official DDPM network.

Parameter tree (scopes mirror the official `model/...` variables, so official checkpoints convert
by renaming leaves: W/b -> kernel/bias, gamma/beta -> scale/bias):

    temb/dense0, temb/dense1              timestep MLP, ch -> 4·ch -> 4·ch
    label_emb/embedding                   [num_classes (+1 with null_label), 4·ch], only when num_classes > 0
    conv_in                               3×3, in_channels -> ch
    down_{i}/block_{j}                    ResBlock: norm1, conv1, temb_proj, norm2, conv2[, nin_shortcut]
    down_{i}/attn_{j}                     AttnBlock: norm, q, k, v, proj_out (at attention resolutions)
    down_{i}/downsample                   every level but the last: `conv` (with resamp_with_conv), or a
                                          ResBlock for the levels in resblock_down_levels
    mid/block_1, mid/attn_1, mid/block_2  (no attn_1 without mid_attn)
    up_{i}/block_{j}, up_{i}/attn_{j}     j < num_res_blocks + 1
    up_{i}/upsample                       every level but level 0: `conv` (with resamp_with_conv), or a
                                          ResBlock for the levels in resblock_up_levels
    norm_out, conv_out                    GroupNorm, 3×3 conv -> out_channels

Each layer holds `kernel`/`bias` (GroupNorm: `scale`/`bias`); conv kernels are HWIO, dense kernels [in, out].
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.checks import is_int, is_real, require_bool, require_int
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.models.layers import (
    ACTIVATIONS,
    ZERO_INIT_SCALE,
    AttnBlock,
    Downsample,
    ResBlock,
    TimestepEmbed,
    Upsample,
    conv3x3,
    group_norm,
)

Array = jax.Array
DTYPES = ("float32", "bfloat16")  # compute dtypes; parameters stay float32

MODEL_KEYS = (
    "image_size",
    "in_channels",
    "out_channels",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "resamp_with_conv",
    "num_classes",
    "dtype",
    "remat",
    "null_label",
    "flip_sin_to_cos",
    "freq_shift",
    "norm_groups",
    "norm_eps",
    "act",
    "attn_head_dim",
    "temb_scale_shift",
    "downsample_padding",
    "resblock_down_levels",
    "resblock_up_levels",
    "mid_attn",
    "mid_attn_norm",
)


class BlockOptions(NamedTuple):
    """What every ResBlock and AttnBlock of one network shares."""

    dropout: float
    dtype: jnp.dtype
    remat: bool
    num_groups: int
    eps: float
    act: str
    scale_shift: bool
    attn_head_dim: int  # 0: one head over all channels

    def resblock(self, out_ch: int, name: str, resample: str = "none") -> nn.Module:
        """A ResBlock with these options; with remat its activations are recomputed in the backward pass
        (`nn.remat`: same parameters and outputs, less memory, about one more forward of compute)."""
        cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock  # arg 3 of __call__ is `train`
        return cls(
            out_ch, self.dropout, self.dtype, num_groups=self.num_groups, eps=self.eps, act=self.act,
            scale_shift=self.scale_shift, resample=resample, name=name,
        )  # fmt: skip

    def attention(self, channels: int, name: str, norm: bool = True) -> AttnBlock:
        """An AttnBlock over `channels` with heads of attn_head_dim channels (one head when 0)."""
        heads = channels // self.attn_head_dim if self.attn_head_dim else 1
        return AttnBlock(self.dtype, num_heads=heads, num_groups=self.num_groups, eps=self.eps, norm=norm, name=name)


class DownLevel(nn.Module):
    """One resolution going down. Returns the skips it pushes: each ResBlock's output (after its
    attention block, if any), then the downsampler's output unless this is the last level.
    `downsample` is "" (none), "conv" (`Downsample`) or "resblock" (a ResBlock that average-pools).
    """

    out_ch: int
    num_res_blocks: int
    use_attn: bool
    downsample: str
    resamp_with_conv: bool
    downsample_padding: int
    options: BlockOptions

    @nn.compact
    def __call__(self, h: Array, temb: Array, train: bool) -> list[Array]:
        skips = []
        for j in range(self.num_res_blocks):
            h = self.options.resblock(self.out_ch, f"block_{j}")(h, temb, train)
            if self.use_attn:
                h = self.options.attention(self.out_ch, f"attn_{j}")(h)
            skips.append(h)
        if self.downsample == "resblock":
            skips.append(self.options.resblock(self.out_ch, "downsample", "down")(h, temb, train))
        elif self.downsample == "conv":
            down = Downsample(self.resamp_with_conv, self.options.dtype, self.downsample_padding, name="downsample")
            skips.append(down(h))
        return skips


class MidLevel(nn.Module):
    """The bottleneck: ResBlock `block_1`, AttnBlock `attn_1` (if use_attn), ResBlock `block_2` (channels unchanged)."""

    use_attn: bool
    attn_norm: bool
    options: BlockOptions

    @nn.compact
    def __call__(self, h: Array, temb: Array, train: bool) -> Array:
        c = h.shape[-1]
        h = self.options.resblock(c, "block_1")(h, temb, train)
        if self.use_attn:
            h = self.options.attention(c, "attn_1", norm=self.attn_norm)(h)
        return self.options.resblock(c, "block_2")(h, temb, train)


class UpLevel(nn.Module):
    """One resolution going up: block j consumes skips[j] by channel concat [h, skip]; then the upsampler:
    `upsample` is "" (none), "conv" (`Upsample`) or "resblock" (a ResBlock that upsamples by repetition).
    """

    out_ch: int
    use_attn: bool
    upsample: str
    resamp_with_conv: bool
    options: BlockOptions

    @nn.compact
    def __call__(self, h: Array, skips: tuple[Array, ...], temb: Array, train: bool) -> Array:
        for j, skip in enumerate(skips):
            h = self.options.resblock(self.out_ch, f"block_{j}")(jnp.concatenate([h, skip], axis=-1), temb, train)
            if self.use_attn:
                h = self.options.attention(self.out_ch, f"attn_{j}")(h)
        if self.upsample == "resblock":
            h = self.options.resblock(self.out_ch, "upsample", "up")(h, temb, train)
        elif self.upsample == "conv":
            h = Upsample(self.resamp_with_conv, self.options.dtype, name="upsample")(h)
        return h


def level_resolutions(image_size: int, num_levels: int) -> tuple[int, ...]:
    """Feature-map side length at each level i: image_size / 2^i."""
    return tuple(image_size // 2**i for i in range(num_levels))


def _check_levels(name: str, levels, first: int, num_levels: int) -> None:
    if not isinstance(levels, tuple) or any(
        not is_int(i, numpy=False) or not first <= i < num_levels for i in levels
    ):
        raise ConfigError(f"{name}={levels!r} must be a tuple of level indices in {first}..{num_levels - 1}")


def _check_widths(m: UNet) -> None:
    """Every width must split into the GroupNorm groups and, with attn_head_dim, into heads."""
    widths = sorted({m.ch * mult for mult in m.ch_mult})
    bad = [w for w in widths if w % m.norm_groups]
    if bad:
        raise ConfigError(
            f"ch={m.ch} with ch_mult={m.ch_mult} gives channel counts {bad}, "
            f"not divisible by norm_groups={m.norm_groups}"
        )
    if m.attn_head_dim:
        resolutions = level_resolutions(m.image_size, len(m.ch_mult))
        attn_widths = {m.ch * mult for mult, res in zip(m.ch_mult, resolutions) if res in m.attn_resolutions}
        attn_widths |= {m.ch * m.ch_mult[-1]} if m.mid_attn else set()
        bad = sorted(w for w in attn_widths if w % m.attn_head_dim)
        if bad:
            raise ConfigError(f"attention widths {bad} are not divisible by attn_head_dim={m.attn_head_dim}")


def _check_fields(m: UNet) -> None:
    """Raise ValueError naming the first invalid field of `m`."""
    for name in ("image_size", "in_channels", "ch", "num_res_blocks", "norm_groups"):
        require_int(name, getattr(m, name), 1)
    for name in ("num_classes", "attn_head_dim", "freq_shift"):
        require_int(name, getattr(m, name), 0)
    if not isinstance(m.ch_mult, tuple) or not m.ch_mult:
        raise ConfigError(f"ch_mult={m.ch_mult!r} must be a non-empty tuple of ints")
    for mult in m.ch_mult:
        require_int("ch_mult entry", mult, 1)
    if m.out_channels not in (m.in_channels, 2 * m.in_channels):
        raise ConfigError(
            f"out_channels={m.out_channels!r} must be in_channels ({m.in_channels}) "
            f"or 2·in_channels ({2 * m.in_channels}, learned variances)"
        )
    factor = 2 ** (len(m.ch_mult) - 1)
    if m.image_size % factor:
        raise ConfigError(
            f"image_size={m.image_size} is not divisible by 2^(len(ch_mult)-1) = {factor} "
            f"(ch_mult={m.ch_mult} downsamples {len(m.ch_mult) - 1} times)"
        )
    if not isinstance(m.attn_resolutions, tuple):
        raise ConfigError(f"attn_resolutions={m.attn_resolutions!r} must be a tuple of ints")
    resolutions = level_resolutions(m.image_size, len(m.ch_mult))
    for res in m.attn_resolutions:
        if res not in resolutions:
            raise ConfigError(
                f"attn_resolutions entry {res!r} never occurs in the network; its resolutions are {resolutions}"
            )
    if not isinstance(m.dropout, (int, float)) or not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"dropout={m.dropout!r} must be a number in [0, 1)")
    if not is_real(m.norm_eps, numpy=False) or not m.norm_eps > 0:
        raise ConfigError(f"norm_eps={m.norm_eps!r} must be a number > 0")
    for name in ("resamp_with_conv", "remat", "null_label", "flip_sin_to_cos", "temb_scale_shift", "mid_attn",
                 "mid_attn_norm"):  # fmt: skip
        require_bool(name, getattr(m, name))
    if m.act not in ACTIVATIONS:
        raise ConfigError(f"act={m.act!r} is not one of {tuple(ACTIVATIONS)}")
    if m.downsample_padding not in (0, 1) or isinstance(m.downsample_padding, bool):
        raise ConfigError(f"downsample_padding={m.downsample_padding!r} must be 0 (TF: 0 before, 1 after) or 1")
    if m.freq_shift >= m.ch // 2:
        raise ConfigError(f"freq_shift={m.freq_shift} must be below ch/2 = {m.ch // 2}")
    _check_levels("resblock_down_levels", m.resblock_down_levels, 0, len(m.ch_mult) - 1)
    _check_levels("resblock_up_levels", m.resblock_up_levels, 1, len(m.ch_mult))
    _check_widths(m)
    if m.dtype not in DTYPES:
        raise ConfigError(f"dtype={m.dtype!r} is not one of {DTYPES}")


class UNet(nn.Module):
    """The DDPM ε-network: (x [B,S,S,in_channels], t [B], y [B] or None) -> float32 [B,S,S,out_channels].

    Fields are the keys of `config.model` (see `jaxdiff.config`); they are checked on construction.
    Beyond the official network: `flip_sin_to_cos`/`freq_shift` (timestep embedding), `norm_groups`,
    `norm_eps`, `act` (the ResBlocks' activation), `attn_head_dim` (channels per attention head, 0: one
    head), `temb_scale_shift` (the timestep embedding scales and shifts norm2), `downsample_padding`,
    `resblock_down_levels`/`resblock_up_levels` (levels resampled by ResBlocks), `mid_attn`,
    `mid_attn_norm`, and `null_label` (class-conditional models: a label num_classes meaning "none").
    """

    image_size: int
    in_channels: int
    out_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    resamp_with_conv: bool
    num_classes: int
    dtype: str
    remat: bool = False
    null_label: bool = True
    flip_sin_to_cos: bool = False
    freq_shift: int = 1
    norm_groups: int = 32
    norm_eps: float = 1e-6
    act: str = "silu"
    attn_head_dim: int = 0
    temb_scale_shift: bool = False
    downsample_padding: int = 0
    resblock_down_levels: tuple[int, ...] = ()
    resblock_up_levels: tuple[int, ...] = ()
    mid_attn: bool = True
    mid_attn_norm: bool = True

    def __post_init__(self):
        _check_fields(self)
        super().__post_init__()

    def _check_inputs(self, x: Array, t: Array, y: Array | None) -> None:
        expected = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            size, _, channels = expected
            raise UsageError(f"x must have shape [B, {size}, {size}, {channels}] (NHWC), got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise UsageError(f"x must be a float array in [-1, 1], got dtype {x.dtype}")
        batch = x.shape[0]
        if t.shape != (batch,) or not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
            raise UsageError(f"t must be a numeric array of shape [{batch}], got shape {t.shape} dtype {t.dtype}")
        if y is None:
            if self.num_classes and not self.null_label:
                raise UsageError("y is required: this class-conditional model has no null label (null_label=False)")
            return
        if self.num_classes == 0:
            raise UsageError("y was given but the model is unconditional (num_classes=0)")
        if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise UsageError(f"y must be an int array of shape [{batch}], got shape {y.shape} dtype {y.dtype}")

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False) -> Array:
        """x [B,S,S,C] float in [-1,1]; t [B] steps, 0-based (0..T-1; floats are accepted for solvers
        that evaluate between steps); y [B] int labels in 0..num_classes-1, or num_classes, the null
        label (null_label=True only), where None means all null (unconditional models take no y).
        Dropout is active only with train=True, which needs rngs={"dropout": key}.
        Returns float32 [B,S,S,out_channels].
        """
        x, t = jnp.asarray(x), jnp.asarray(t)
        y = None if y is None else jnp.asarray(y)
        self._check_inputs(x, t, y)
        dtype = jnp.dtype(self.dtype)
        options = BlockOptions(
            dropout=self.dropout, dtype=dtype, remat=self.remat, num_groups=self.norm_groups, eps=self.norm_eps,
            act=self.act, scale_shift=self.temb_scale_shift, attn_head_dim=self.attn_head_dim,
        )  # fmt: skip

        temb = TimestepEmbed(self.ch, dtype, self.flip_sin_to_cos, self.freq_shift, name="temb")(t)
        if self.num_classes:
            if y is None:
                y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
            temb = temb + nn.Embed(
                self.num_classes + int(self.null_label),
                4 * self.ch,
                dtype=dtype,
                embedding_init=nn.initializers.normal(stddev=1.0),
                name="label_emb",
            )(y)

        num_levels = len(self.ch_mult)
        resolutions = level_resolutions(self.image_size, num_levels)
        hs = [conv3x3(self.ch, dtype, name="conv_in")(x)]
        for i, mult in enumerate(self.ch_mult):
            last = i == num_levels - 1
            hs += DownLevel(
                out_ch=self.ch * mult,
                num_res_blocks=self.num_res_blocks,
                use_attn=resolutions[i] in self.attn_resolutions,
                downsample="" if last else "resblock" if i in self.resblock_down_levels else "conv",
                resamp_with_conv=self.resamp_with_conv,
                downsample_padding=self.downsample_padding,
                options=options,
                name=f"down_{i}",
            )(hs[-1], temb, train)

        h = MidLevel(self.mid_attn, self.mid_attn_norm, options, name="mid")(hs[-1], temb, train)

        for i in reversed(range(num_levels)):
            skips = tuple(hs.pop() for _ in range(self.num_res_blocks + 1))
            h = UpLevel(
                out_ch=self.ch * self.ch_mult[i],
                use_attn=resolutions[i] in self.attn_resolutions,
                upsample="" if i == 0 else "resblock" if i in self.resblock_up_levels else "conv",
                resamp_with_conv=self.resamp_with_conv,
                options=options,
                name=f"up_{i}",
            )(h, skips, temb, train)

        h = nn.swish(group_norm(h, name="norm_out", num_groups=self.norm_groups, eps=self.norm_eps))
        h = conv3x3(self.out_channels, dtype, scale=ZERO_INIT_SCALE, name="conv_out")(h)
        return h.astype(jnp.float32)


def create_model(model_config: ml_collections.ConfigDict) -> UNet:
    """Build the U-Net from `config.model` (keys in `jaxdiff.config`); invalid values raise ValueError."""
    missing = [key for key in MODEL_KEYS if key not in model_config]
    if missing:
        raise ConfigError(f"model config lacks keys {missing}; pass config.model, not the whole config")
    fields = {key: model_config[key] for key in MODEL_KEYS}
    for key in ("ch_mult", "attn_resolutions", "resblock_down_levels", "resblock_up_levels"):
        if isinstance(fields[key], (list, tuple)):
            fields[key] = tuple(fields[key])
    return UNet(**fields)
