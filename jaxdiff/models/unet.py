"""The DDPM U-Net (Ho et al. 2020, official TensorFlow code) as a Flax Linen module.

Parameter tree (scopes mirror the official `model/...` variables, so official checkpoints convert
by renaming leaves: W/b -> kernel/bias, gamma/beta -> scale/bias):

    temb/dense0, temb/dense1              timestep MLP, ch -> 4·ch -> 4·ch
    label_emb/embedding                   [num_classes + 1, 4·ch], only when num_classes > 0
    conv_in                               3×3, in_channels -> ch
    down_{i}/block_{j}                    ResBlock: norm1, conv1, temb_proj, norm2, conv2[, nin_shortcut]
    down_{i}/attn_{j}                     AttnBlock: norm, q, k, v, proj_out (at attention resolutions)
    down_{i}/downsample/conv              every level but the last (with resamp_with_conv)
    mid/block_1, mid/attn_1, mid/block_2
    up_{i}/block_{j}, up_{i}/attn_{j}     j < num_res_blocks + 1
    up_{i}/upsample/conv                  every level but level 0 (with resamp_with_conv)
    norm_out, conv_out                    GroupNorm, 3×3 conv -> out_channels

Each layer holds `kernel`/`bias` (GroupNorm: `scale`/`bias`); conv kernels are HWIO, dense kernels [in, out].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.config import DTYPES
from jaxdiff.models.layers import (
    NUM_GROUPS,
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
)


def resblock_class(remat: bool) -> type[nn.Module]:
    """ResBlock, or with remat=True a ResBlock whose activations are recomputed in the backward pass
    (`nn.remat`: same parameters and outputs, less memory, about one more forward of compute)."""
    return nn.remat(ResBlock, static_argnums=(3,)) if remat else ResBlock  # arg 3 of __call__ is `train`


class DownLevel(nn.Module):
    """One resolution going down. Returns the skips it pushes: each ResBlock's output (after its
    attention block, if any), then the Downsample output unless this is the last level.
    """

    out_ch: int
    num_res_blocks: int
    use_attn: bool
    downsample: bool
    resamp_with_conv: bool
    dropout: float
    dtype: jnp.dtype
    remat: bool

    @nn.compact
    def __call__(self, h: Array, temb: Array, train: bool) -> list[Array]:
        skips = []
        for j in range(self.num_res_blocks):
            h = resblock_class(self.remat)(self.out_ch, self.dropout, self.dtype, name=f"block_{j}")(h, temb, train)
            if self.use_attn:
                h = AttnBlock(self.dtype, name=f"attn_{j}")(h)
            skips.append(h)
        if self.downsample:
            skips.append(Downsample(self.resamp_with_conv, self.dtype, name="downsample")(h))
        return skips


class MidLevel(nn.Module):
    """The bottleneck: ResBlock `block_1`, AttnBlock `attn_1`, ResBlock `block_2` (channels unchanged)."""

    dropout: float
    dtype: jnp.dtype
    remat: bool

    @nn.compact
    def __call__(self, h: Array, temb: Array, train: bool) -> Array:
        c = h.shape[-1]
        block = resblock_class(self.remat)
        h = block(c, self.dropout, self.dtype, name="block_1")(h, temb, train)
        h = AttnBlock(self.dtype, name="attn_1")(h)
        return block(c, self.dropout, self.dtype, name="block_2")(h, temb, train)


class UpLevel(nn.Module):
    """One resolution going up: block j consumes skips[j] by channel concat [h, skip]; then an optional Upsample."""

    out_ch: int
    use_attn: bool
    upsample: bool
    resamp_with_conv: bool
    dropout: float
    dtype: jnp.dtype
    remat: bool

    @nn.compact
    def __call__(self, h: Array, skips: tuple[Array, ...], temb: Array, train: bool) -> Array:
        for j, skip in enumerate(skips):
            h = resblock_class(self.remat)(self.out_ch, self.dropout, self.dtype, name=f"block_{j}")(
                jnp.concatenate([h, skip], axis=-1), temb, train
            )
            if self.use_attn:
                h = AttnBlock(self.dtype, name=f"attn_{j}")(h)
        if self.upsample:
            h = Upsample(self.resamp_with_conv, self.dtype, name="upsample")(h)
        return h


def _require_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


def level_resolutions(image_size: int, num_levels: int) -> tuple[int, ...]:
    """Feature-map side length at each level i: image_size / 2^i."""
    return tuple(image_size // 2**i for i in range(num_levels))


def _check_fields(m: UNet) -> None:
    """Raise ValueError naming the first invalid field of `m`."""
    for name in ("image_size", "in_channels", "ch", "num_res_blocks"):
        _require_int(name, getattr(m, name), 1)
    _require_int("num_classes", m.num_classes, 0)
    if not isinstance(m.ch_mult, tuple) or not m.ch_mult:
        raise ValueError(f"ch_mult={m.ch_mult!r} must be a non-empty tuple of ints")
    for mult in m.ch_mult:
        _require_int("ch_mult entry", mult, 1)
    if m.out_channels not in (m.in_channels, 2 * m.in_channels):
        raise ValueError(
            f"out_channels={m.out_channels!r} must be in_channels ({m.in_channels}) "
            f"or 2·in_channels ({2 * m.in_channels}, learned variances)"
        )
    if m.ch % NUM_GROUPS:
        raise ValueError(
            f"ch={m.ch} is not divisible by the {NUM_GROUPS} GroupNorm groups (every channel count ch·mult must be)"
        )
    factor = 2 ** (len(m.ch_mult) - 1)
    if m.image_size % factor:
        raise ValueError(
            f"image_size={m.image_size} is not divisible by 2^(len(ch_mult)-1) = {factor} "
            f"(ch_mult={m.ch_mult} downsamples {len(m.ch_mult) - 1} times)"
        )
    if not isinstance(m.attn_resolutions, tuple):
        raise ValueError(f"attn_resolutions={m.attn_resolutions!r} must be a tuple of ints")
    resolutions = level_resolutions(m.image_size, len(m.ch_mult))
    for res in m.attn_resolutions:
        if res not in resolutions:
            raise ValueError(
                f"attn_resolutions entry {res!r} never occurs in the network; its resolutions are {resolutions}"
            )
    if not isinstance(m.dropout, (int, float)) or not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"dropout={m.dropout!r} must be a number in [0, 1)")
    if not isinstance(m.resamp_with_conv, bool):
        raise ValueError(f"resamp_with_conv={m.resamp_with_conv!r} must be a bool")
    if not isinstance(m.remat, bool):
        raise ValueError(f"remat={m.remat!r} must be a bool")
    if m.dtype not in DTYPES:
        raise ValueError(f"dtype={m.dtype!r} is not one of {DTYPES}")


class UNet(nn.Module):
    """The DDPM ε-network: (x [B,S,S,in_channels], t [B], y [B] or None) -> float32 [B,S,S,out_channels].

    Fields are the keys of `config.model` (see `jaxdiff.config`); they are checked on construction.
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

    def __post_init__(self):
        _check_fields(self)
        super().__post_init__()

    def _check_inputs(self, x: Array, t: Array, y: Array | None) -> None:
        expected = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            size, _, channels = expected
            raise ValueError(f"x must have shape [B, {size}, {size}, {channels}] (NHWC), got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be a float array in [-1, 1], got dtype {x.dtype}")
        batch = x.shape[0]
        if t.shape != (batch,) or not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
            raise ValueError(f"t must be a numeric array of shape [{batch}], got shape {t.shape} dtype {t.dtype}")
        if y is None:
            return
        if self.num_classes == 0:
            raise ValueError("y was given but the model is unconditional (num_classes=0)")
        if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"y must be an int array of shape [{batch}], got shape {y.shape} dtype {y.dtype}")

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False) -> Array:
        """x [B,S,S,C] float in [-1,1]; t [B] steps, 0-based (0..T-1; floats are accepted for solvers
        that evaluate between steps); y [B] int labels in 0..num_classes, where num_classes is the null
        label and None means all null (unconditional models take no y). Dropout is active only with
        train=True, which needs rngs={"dropout": key}. Returns float32 [B,S,S,out_channels].
        """
        x, t = jnp.asarray(x), jnp.asarray(t)
        y = None if y is None else jnp.asarray(y)
        self._check_inputs(x, t, y)
        dtype = jnp.dtype(self.dtype)

        temb = TimestepEmbed(self.ch, dtype, name="temb")(t)
        if self.num_classes:
            if y is None:
                y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
            temb = temb + nn.Embed(
                self.num_classes + 1,
                4 * self.ch,
                dtype=dtype,
                embedding_init=nn.initializers.normal(stddev=1.0),
                name="label_emb",
            )(y)

        num_levels = len(self.ch_mult)
        resolutions = level_resolutions(self.image_size, num_levels)
        hs = [conv3x3(self.ch, dtype, name="conv_in")(x)]
        for i, mult in enumerate(self.ch_mult):
            hs += DownLevel(
                out_ch=self.ch * mult,
                num_res_blocks=self.num_res_blocks,
                use_attn=resolutions[i] in self.attn_resolutions,
                downsample=i != num_levels - 1,
                resamp_with_conv=self.resamp_with_conv,
                dropout=self.dropout,
                dtype=dtype,
                remat=self.remat,
                name=f"down_{i}",
            )(hs[-1], temb, train)

        h = MidLevel(self.dropout, dtype, self.remat, name="mid")(hs[-1], temb, train)

        for i in reversed(range(num_levels)):
            skips = tuple(hs.pop() for _ in range(self.num_res_blocks + 1))
            h = UpLevel(
                out_ch=self.ch * self.ch_mult[i],
                use_attn=resolutions[i] in self.attn_resolutions,
                upsample=i != 0,
                resamp_with_conv=self.resamp_with_conv,
                dropout=self.dropout,
                dtype=dtype,
                remat=self.remat,
                name=f"up_{i}",
            )(h, skips, temb, train)

        h = nn.swish(group_norm(h, name="norm_out"))
        h = conv3x3(self.out_channels, dtype, scale=ZERO_INIT_SCALE, name="conv_out")(h)
        return h.astype(jnp.float32)


def create_model(model_config: ml_collections.ConfigDict) -> UNet:
    """Build the U-Net from `config.model` (keys in `jaxdiff.config`); invalid values raise ValueError."""
    missing = [key for key in MODEL_KEYS if key not in model_config]
    if missing:
        raise ValueError(f"model config lacks keys {missing}; pass config.model, not the whole config")
    fields = {key: model_config[key] for key in MODEL_KEYS}
    for key in ("ch_mult", "attn_resolutions"):
        if isinstance(fields[key], (list, tuple)):
            fields[key] = tuple(fields[key])
    return UNet(**fields)
