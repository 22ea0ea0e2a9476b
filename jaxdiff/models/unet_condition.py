"""Stable Diffusion's text-conditional U-Net (diffusers `UNet2DConditionModel`, SD 1.x / 2.x) in Flax Linen.

The model is configured by a ConfigDict of diffusers `config.json` keys, read and checked by
`jaxdiff.models.unet_condition_config` (`config_from_diffusers`).

Parameter tree (diffusers' module names with the list index separators `.{i}` written `_{i}`):

    conv_in                                       3×3, in_channels -> C_0
    time_embedding/linear_1, linear_2             sinusoid(C_0) -> 4·C_0 -> 4·C_0
    down_blocks_{i}/resnets_{j}                   norm1, conv1, time_emb_proj, norm2, conv2[, conv_shortcut]
    down_blocks_{i}/attentions_{j}                norm, proj_in, transformer_blocks_0, proj_out
    down_blocks_{i}/downsamplers_0/conv           3×3 stride 2, every level but the last
    mid_block/resnets_0, attentions_0, resnets_1
    up_blocks_{k}/resnets_{j}, attentions_{j}     j < layers + 1; up block k works at level L-1-k
    up_blocks_{k}/upsamplers_0/conv               every up block but the last
    conv_norm_out, conv_out

A transformer block holds norm1, attn1 (self), norm2, attn2 (cross), norm3 and ff (net_0/proj: GEGLU, net_2);
attentions hold to_q, to_k, to_v (no bias) and to_out_0. Conv kernels are HWIO (the 1×1 `proj_in`/`proj_out`
too, unless `use_linear_projection`, which makes them dense), dense kernels [in, out].
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.errors import UsageError
from jaxdiff.models.layers import Downsample, conv3x3, group_norm, multi_head_attention, timestep_embedding
from jaxdiff.models.unet_condition_config import DOWN_BLOCKS, UP_BLOCKS, check_config, num_heads_per_level, per_level

Array = jax.Array


def create_unet_condition(config: ml_collections.ConfigDict) -> UNetCondition:
    """The U-Net of a model config (checked first; invalid settings raise ValueError)."""
    check_config(config)
    levels = len(config.block_out_channels)
    return UNetCondition(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(config.block_out_channels),
        down_attention=tuple(DOWN_BLOCKS[t] for t in config.down_block_types),
        up_attention=tuple(UP_BLOCKS[t] for t in config.up_block_types),
        layers_per_block=per_level("layers_per_block", config.layers_per_block, levels),
        num_heads=num_heads_per_level(config),
        cross_attention_dim=config.cross_attention_dim,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
        flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=float(config.freq_shift),
        norm_num_groups=config.norm_num_groups,
        norm_eps=float(config.norm_eps),
        dtype=config.dtype,
        remat=config.remat,
    )


# --------------------------------------------------------------------------- layers


def nearest_resize(x: Array, size: tuple[int, int]) -> Array:
    """Nearest-neighbour resize of x [B,H,W,C] to [B, size[0], size[1], C] with PyTorch's index rule
    (output i reads input floor(i·H/size[0]), scale in float32); ×2 is plain pixel repetition."""
    for axis, (n_in, n_out) in enumerate(zip(x.shape[1:3], size), start=1):
        scale = np.float32(n_in) / np.float32(n_out)
        index = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)
        x = jnp.take(x, index, axis=axis)
    return x


def _dense(features: int, dtype: Any, name: str, *, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _conv1x1(features: int, dtype: Any, name: str) -> nn.Conv:
    return nn.Conv(features, (1, 1), dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(x: Array, name: str) -> Array:
    """LayerNorm (eps 1e-5, PyTorch's default) as a submodule `name`, computed in float32."""
    norm = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False, name=name)
    return norm(x.astype(jnp.float32))


class ResnetBlock(nn.Module):
    """diffusers' `ResnetBlock2D` ("default" time embedding): x [B,H,W,C_in], temb [B,E] -> [B,H,W,out_ch].

    h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb)); h = conv2(silu(norm2(h)));
    returns conv_shortcut(x) + h, the 1×1 shortcut only when C_in != out_ch.
    """

    out_ch: int
    groups: int
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        norm = lambda v, name: group_norm(v, name=name, num_groups=self.groups, eps=self.eps)  # noqa: E731
        h = conv3x3(self.out_ch, self.dtype, name="conv1")(nn.silu(norm(x, "norm1")))
        h = h + _dense(self.out_ch, self.dtype, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = conv3x3(self.out_ch, self.dtype, name="conv2")(nn.silu(norm(h, "norm2")))
        if x.shape[-1] != self.out_ch:
            x = _conv1x1(self.out_ch, self.dtype, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention of x [B,N,D] over context [B,M,D_ctx] (x itself when None) -> [B,N,D].

    to_q/to_k/to_v (no bias) project to heads·head_dim, softmax(q·kᵀ/√head_dim)·v per head, to_out_0
    back to D. With `upcast` the scores are computed from float32 q, k, v whatever the compute dtype.
    """

    num_heads: int
    head_dim: int
    upcast: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        context = x if context is None else context
        inner = self.num_heads * self.head_dim
        q, k, v = (
            _dense(inner, self.dtype, name, use_bias=False)(source)
            for name, source in (("to_q", x), ("to_k", context), ("to_v", context))
        )
        q, k, v = (a.reshape(*a.shape[:2], self.num_heads, self.head_dim) for a in (q, k, v))
        if self.upcast:
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        out = multi_head_attention(q, k, v).reshape(*x.shape[:2], inner).astype(self.dtype)
        return _dense(x.shape[-1], self.dtype, "to_out_0")(out)


class GEGLU(nn.Module):
    """x [..., D] -> a · gelu(g) [..., width] where [a, g] = proj(x) (exact, erf-based GELU)."""

    width: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        a, gate = jnp.split(_dense(2 * self.width, self.dtype, "proj")(x), 2, axis=-1)
        return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' `FeedForward` with GEGLU: x [..., D] -> net_2(net_0(x)), hidden width 4·D."""

    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        return _dense(dim, self.dtype, "net_2")(GEGLU(4 * dim, self.dtype, name="net_0")(x))


class TransformerBlock(nn.Module):
    """diffusers' `BasicTransformerBlock`: x [B,N,D], context [B,M,D_ctx] -> [B,N,D].

    x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)) (LayerNorms eps 1e-5).
    """

    num_heads: int
    head_dim: int
    upcast: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        settings = (self.num_heads, self.head_dim, self.upcast, self.dtype)
        x = x + Attention(*settings, name="attn1")(_layer_norm(x, "norm1"))
        x = x + Attention(*settings, name="attn2")(_layer_norm(x, "norm2"), context)
        return x + FeedForward(self.dtype, name="ff")(_layer_norm(x, "norm3"))


class BlockSettings(NamedTuple):
    """Settings every block shares."""

    groups: int
    eps: float
    use_linear_projection: bool
    upcast_attention: bool
    dtype: Any
    remat: bool


def _resnet(s: BlockSettings, out_ch: int, name: str) -> nn.Module:
    cls = nn.remat(ResnetBlock) if s.remat else ResnetBlock
    return cls(out_ch, s.groups, s.eps, s.dtype, name=name)


def _projection(features: int, s: BlockSettings, name: str) -> nn.Module:
    """A transformer's proj_in/proj_out over channels: dense with `use_linear_projection`, else a 1×1 convolution
    (the same map; the weights differ only in layout)."""
    return _dense(features, s.dtype, name) if s.use_linear_projection else _conv1x1(features, s.dtype, name)


class SpatialTransformer(nn.Module):
    """diffusers' `Transformer2DModel` (continuous input, one block): x [B,H,W,C], context [B,M,D_ctx] -> [B,H,W,C].

    x + proj_out(transformer_blocks_0(proj_in(norm(x)))), the block attending over the H·W positions;
    GroupNorm eps 1e-6; inner width heads·(C // heads).
    """

    num_heads: int
    settings: BlockSettings

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        s = self.settings
        b, height, width, c = x.shape
        head_dim = c // self.num_heads
        inner = self.num_heads * head_dim
        h = _projection(inner, s, "proj_in")(group_norm(x, name="norm", num_groups=s.groups, eps=1e-6))
        block = nn.remat(TransformerBlock) if s.remat else TransformerBlock
        h = block(self.num_heads, head_dim, s.upcast_attention, s.dtype, name="transformer_blocks_0")(
            h.reshape(b, height * width, inner), context
        )
        return x + _projection(c, s, "proj_out")(h.reshape(b, height, width, inner))


class Upsampler(nn.Module):
    """[B,h,w,C] -> [B,H,W,C]: nearest resize to `size` = (H, W) (PyTorch's rule), then a 3×3 convolution `conv`."""

    dtype: Any

    @nn.compact
    def __call__(self, x: Array, size: tuple[int, int]) -> Array:
        return conv3x3(x.shape[-1], self.dtype, name="conv")(nearest_resize(x, size))


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (attention=True) or `DownBlock2D`: returns (h, skips), the skips being each
    resnet's output (after its transformer) and the downsampled h unless this is the last level."""

    out_ch: int
    num_layers: int
    num_heads: int
    attention: bool
    downsample: bool
    settings: BlockSettings

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array) -> tuple[Array, list[Array]]:
        skips = []
        for j in range(self.num_layers):
            h = _resnet(self.settings, self.out_ch, f"resnets_{j}")(h, temb)
            if self.attention:
                h = SpatialTransformer(self.num_heads, self.settings, name=f"attentions_{j}")(h, context)
            skips.append(h)
        if self.downsample:
            h = Downsample(True, self.settings.dtype, padding=1, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnets_0, attentions_0, resnets_1 at constant width."""

    num_heads: int
    settings: BlockSettings

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array) -> Array:
        c = h.shape[-1]
        h = _resnet(self.settings, c, "resnets_0")(h, temb)
        h = SpatialTransformer(self.num_heads, self.settings, name="attentions_0")(h, context)
        return _resnet(self.settings, c, "resnets_1")(h, temb)


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` (attention=True) or `UpBlock2D`: resnet j takes [h, skips[-1-j]] concatenated on
    channels (skips are consumed from the last); then, given `upsample_size`, an `Upsampler` to that size."""

    out_ch: int
    num_heads: int
    attention: bool
    settings: BlockSettings

    @nn.compact
    def __call__(self, h: Array, skips: list[Array], temb: Array, context: Array,
                 upsample_size: tuple[int, int] | None) -> Array:  # fmt: skip
        for j, skip in enumerate(reversed(skips)):
            h = _resnet(self.settings, self.out_ch, f"resnets_{j}")(jnp.concatenate([h, skip], axis=-1), temb)
            if self.attention:
                h = SpatialTransformer(self.num_heads, self.settings, name=f"attentions_{j}")(h, context)
        if upsample_size is not None:
            h = Upsampler(self.settings.dtype, name="upsamplers_0")(h, upsample_size)
        return h


class TimestepEmbedding(nn.Module):
    """t [B] -> linear_2(silu(linear_1(sinusoid(t)))) [B, 4·C_0]; sinusoid of width C_0 (diffusers' `Timesteps`)."""

    width: int
    flip_sin_to_cos: bool
    freq_shift: float
    dtype: Any

    @nn.compact
    def __call__(self, t: Array) -> Array:
        emb = timestep_embedding(t, self.width, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        emb = nn.silu(_dense(4 * self.width, self.dtype, "linear_1")(emb))
        return _dense(4 * self.width, self.dtype, "linear_2")(emb)


class UNetCondition(nn.Module):
    """The text-conditional U-Net: (sample [B,H,W,in_channels], timesteps [B] or scalar, encoder_hidden_states
    [B,M,cross_attention_dim]) -> float32 [B,H,W,out_channels]. Build it with `create_unet_condition`.

    Fields are the config resolved per level (level i: width block_out_channels[i], layers_per_block[i],
    num_heads[i]; down_attention[i] for down block i, up_attention[k] for up block k = level L-1-k).
    `dtype` is the compute dtype of convolutions, dense layers and attention (parameters, norms and the
    softmax stay float32); `remat` recomputes each resnet and transformer block in the backward pass.
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    layers_per_block: tuple[int, ...]
    num_heads: tuple[int, ...]
    cross_attention_dim: int
    use_linear_projection: bool
    upcast_attention: bool
    flip_sin_to_cos: bool
    freq_shift: float
    norm_num_groups: int
    norm_eps: float
    dtype: str = "float32"
    remat: bool = False

    def _check_inputs(self, sample: Array, timesteps: Array, context: Array) -> None:
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels or not jnp.issubdtype(sample.dtype, jnp.floating):
            raise UsageError(
                f"sample must be a float array [B, H, W, {self.in_channels}] (NHWC), got {sample.dtype} {sample.shape}"
            )
        batch = sample.shape[0]
        if timesteps.shape not in ((), (batch,)) or not jnp.issubdtype(timesteps.dtype, jnp.number):
            got = f"{timesteps.dtype} {timesteps.shape}"
            raise UsageError(f"timesteps must be a number or an array [{batch}], got {got}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.cross_attention_dim:
            raise UsageError(
                f"encoder_hidden_states must have shape [{batch}, L, {self.cross_attention_dim}], got {context.shape}"
            )

    @nn.compact
    def __call__(self, sample: Array, timesteps: Array, encoder_hidden_states: Array) -> Array:
        """timesteps are the scheduler's raw step numbers (ints or floats), one per example or one for all."""
        sample, timesteps, context = map(jnp.asarray, (sample, timesteps, encoder_hidden_states))
        self._check_inputs(sample, timesteps, context)
        dtype = jnp.dtype(self.dtype)
        s = BlockSettings(self.norm_num_groups, self.norm_eps, self.use_linear_projection, self.upcast_attention,
                          dtype, self.remat)  # fmt: skip
        widths, levels = self.block_out_channels, len(self.block_out_channels)

        t = jnp.broadcast_to(timesteps, sample.shape[:1])
        temb = TimestepEmbedding(widths[0], self.flip_sin_to_cos, self.freq_shift, dtype, name="time_embedding")(t)

        h = conv3x3(widths[0], dtype, name="conv_in")(sample)
        skips = [h]
        for i in range(levels):
            h, level_skips = DownBlock(widths[i], self.layers_per_block[i], self.num_heads[i], self.down_attention[i],
                                       i < levels - 1, s, name=f"down_blocks_{i}")(h, temb, context)  # fmt: skip
            skips += level_skips

        h = MidBlock(self.num_heads[-1], s, name="mid_block")(h, temb, context)

        for k in range(levels):
            level = levels - 1 - k
            n = self.layers_per_block[level] + 1
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = tuple(skips[-1].shape[1:3]) if k < levels - 1 else None
            h = UpBlock(widths[level], self.num_heads[level], self.up_attention[k], s, name=f"up_blocks_{k}")(
                h, block_skips, temb, context, upsample_size
            )

        h = nn.silu(group_norm(h, name="conv_norm_out", num_groups=self.norm_num_groups, eps=self.norm_eps))
        return conv3x3(self.out_channels, dtype, name="conv_out")(h).astype(jnp.float32)
