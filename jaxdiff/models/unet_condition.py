"""Stable Diffusion's text-conditional U-Net (diffusers `UNet2DConditionModel`: SD 1.x / 2.x, SDXL, the x4
upscaler) in Flax Linen.

The model is configured by a ConfigDict of diffusers `config.json` keys, read and checked by
`jaxdiff.models.unet_condition_config` (`config_from_diffusers`).

Parameter tree (diffusers' module names with the list index separators `.{i}` written `_{i}`):

    conv_in                                       3×3, in_channels -> C_0
    time_embedding/linear_1, linear_2             sinusoid(C_0) -> 4·C_0 -> 4·C_0
    class_embedding/embedding                     [num_class_embeds, 4·C_0], with num_class_embeds
    class_embedding/linear_1, linear_2            sinusoid(C_0) or P -> 4·C_0 -> 4·C_0, with class_embed_type
                                                  "timestep" or "projection"
    add_embedding/linear_1, linear_2              P -> 4·C_0 -> 4·C_0 (P = projection_class_embeddings_input_dim),
                                                  with addition_embed_type "text_time"
    down_blocks_{i}/resnets_{j}                   norm1, conv1, time_emb_proj, norm2, conv2[, conv_shortcut]
    down_blocks_{i}/attentions_{j}                norm, proj_in, transformer_blocks_{n} (n < layers of level i),
                                                  proj_out
    down_blocks_{i}/downsamplers_0/conv           3×3 stride 2, every level but the last
    mid_block/resnets_0, attentions_0, resnets_1
    up_blocks_{k}/resnets_{j}, attentions_{j}     j < layers + 1; up block k works at level L-1-k
    up_blocks_{k}/upsamplers_0/conv               every up block but the last
    conv_norm_out, conv_out

A transformer block holds norm1, attn1 (self; cross with `only_cross_attention`), norm2, attn2 (cross), norm3
and ff (net_0/proj: GEGLU, net_2); attentions hold to_q, to_k, to_v (no bias) and to_out_0. Conv kernels are
HWIO (the 1×1 `proj_in`/`proj_out` too, unless `use_linear_projection`, which makes them dense), dense kernels
[in, out]; the label table [num_class_embeds, 4·C_0] as in PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.errors import UsageError
from jaxdiff.models.layers import (
    Downsample,
    conv1x1,
    conv3x3,
    group_norm,
    multi_head_attention,
    timestep_embedding,
)
from jaxdiff.models.unet_condition_config import DOWN_BLOCKS, UP_BLOCKS, check_config, num_heads_per_level, per_level

ADDED_COND_KEYS = ("text_embeds", "time_ids")  # added_cond of an addition_embed_type "text_time" U-Net

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
        transformer_layers=per_level("transformer_layers_per_block", config.transformer_layers_per_block, levels),
        only_cross_attention=per_level("only_cross_attention", config.only_cross_attention, levels),
        cross_attention_dim=config.cross_attention_dim,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
        flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=float(config.freq_shift),
        norm_num_groups=config.norm_num_groups,
        norm_eps=float(config.norm_eps),
        num_class_embeds=config.num_class_embeds,
        class_embed_type=config.class_embed_type,
        addition_time_embed_dim=config.addition_time_embed_dim,
        addition_input_dim=config.projection_class_embeddings_input_dim,
        dtype=config.dtype,
        remat=config.remat,
    )


def class_labels_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], Any] | None:
    """(shape after the batch axis, dtype) of the class_labels the U-Net of `config` takes, None if it takes none."""
    return _class_labels_spec(config.class_embed_type, config.num_class_embeds, 4 * config.block_out_channels[0],
                              config.projection_class_embeddings_input_dim)  # fmt: skip


def _class_labels_spec(kind: str | None, num_class_embeds: int | None, time_width: int,
                       projection_width: int | None) -> tuple[tuple[int, ...], Any] | None:  # fmt: skip
    """class_labels per example: an int row of a label table (num_class_embeds), a number embedded as a timestep
    ("timestep"), a float vector of the time embedding's width 4·C_0 ("identity") or of projection_width
    ("projection"); None for none."""
    if kind is None:
        return None if num_class_embeds is None else ((), jnp.int32)
    widths = {"timestep": (), "identity": (time_width,), "projection": (projection_width,)}
    return widths[kind], jnp.float32


def example_inputs(config: ml_collections.ConfigDict, batch: int = 1, size: int = 8) -> tuple[tuple, dict]:
    """(args, kwargs) of abstract inputs (`jax.ShapeDtypeStruct`s) that trace the U-Net of `config`, for `init` or
    `jax.eval_shape`: float32 sample [batch, size, size, in_channels], timesteps [batch], encoder_hidden_states
    [batch, 1, cross_attention_dim]; class_labels as `class_labels_shape` says where the config takes them; with
    text_time, added_cond {"time_ids": [batch, n], "text_embeds": [batch, P - n·addition_time_embed_dim]} (P =
    projection_class_embeddings_input_dim, n = min(6, P // addition_time_embed_dim): SDXL base's split)."""
    args = (
        jax.ShapeDtypeStruct((batch, size, size, config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch, 1, config.cross_attention_dim), jnp.float32),
    )
    kwargs = {}
    labels = class_labels_shape(config)
    if labels is not None:
        kwargs["class_labels"] = jax.ShapeDtypeStruct((batch, *labels[0]), labels[1])
    if config.addition_embed_type == "text_time":
        width, time_width = config.projection_class_embeddings_input_dim, config.addition_time_embed_dim
        n = min(6, width // time_width)
        kwargs["added_cond"] = {
            "text_embeds": jax.ShapeDtypeStruct((batch, width - n * time_width), jnp.float32),
            "time_ids": jax.ShapeDtypeStruct((batch, n), jnp.float32),
        }
    return args, kwargs


def text_time_input(text_embeds: Array, time_ids: Array, width: int, *, flip_sin_to_cos: bool,
                    freq_shift: float) -> Array:  # fmt: skip
    """The input of SDXL's add_embedding, float32 [B, P_text + N·width]: text_embeds [B, P_text] followed by the
    sinusoid of width `width` (diffusers' `Timesteps`, as the U-Net's own timestep) of each of time_ids [B, N]."""
    batch = time_ids.shape[0]
    time_emb = timestep_embedding(time_ids.reshape(-1), width, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift)
    return jnp.concatenate([text_embeds.astype(jnp.float32), time_emb.reshape(batch, -1)], axis=-1)


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
            x = conv1x1(self.out_ch, self.dtype, name="conv_shortcut")(x)
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

    x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)) (LayerNorms eps 1e-5). attn1 attends
    to x itself, or to the context with `only_cross` (diffusers' `only_cross_attention`).
    """

    num_heads: int
    head_dim: int
    upcast: bool
    only_cross: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        settings = (self.num_heads, self.head_dim, self.upcast, self.dtype)
        first_context = context if self.only_cross else None
        x = x + Attention(*settings, name="attn1")(_layer_norm(x, "norm1"), first_context)
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


class TransformerSettings(NamedTuple):
    """One level's `SpatialTransformer`s: heads, transformer blocks, and whether attn1 attends to the context."""

    num_heads: int
    num_layers: int
    only_cross: bool


def _resnet(s: BlockSettings, out_ch: int, name: str) -> nn.Module:
    cls = nn.remat(ResnetBlock) if s.remat else ResnetBlock
    return cls(out_ch, s.groups, s.eps, s.dtype, name=name)


def _projection(features: int, s: BlockSettings, name: str) -> nn.Module:
    """A transformer's proj_in/proj_out over channels: dense with `use_linear_projection`, else a 1×1 convolution
    (the same map; the weights differ only in layout)."""
    return _dense(features, s.dtype, name) if s.use_linear_projection else conv1x1(features, s.dtype, name=name)


class SpatialTransformer(nn.Module):
    """diffusers' `Transformer2DModel` (continuous input): x [B,H,W,C], context [B,M,D_ctx] -> [B,H,W,C].

    x + proj_out(blocks(proj_in(norm(x)))), blocks being transformer_blocks_0 .. _{n-1} in turn (n =
    `transformer.num_layers`), each attending over the H·W positions; GroupNorm eps 1e-6; inner width
    heads·(C // heads).
    """

    transformer: TransformerSettings
    settings: BlockSettings

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        s, heads = self.settings, self.transformer.num_heads
        b, height, width, c = x.shape
        head_dim = c // heads
        inner = heads * head_dim
        h = _projection(inner, s, "proj_in")(group_norm(x, name="norm", num_groups=s.groups, eps=1e-6))
        h = h.reshape(b, height * width, inner)
        block = nn.remat(TransformerBlock) if s.remat else TransformerBlock
        for n in range(self.transformer.num_layers):
            h = block(heads, head_dim, s.upcast_attention, self.transformer.only_cross, s.dtype,
                      name=f"transformer_blocks_{n}")(h, context)  # fmt: skip
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
    transformer: TransformerSettings
    attention: bool
    downsample: bool
    settings: BlockSettings

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array) -> tuple[Array, list[Array]]:
        skips = []
        for j in range(self.num_layers):
            h = _resnet(self.settings, self.out_ch, f"resnets_{j}")(h, temb)
            if self.attention:
                h = SpatialTransformer(self.transformer, self.settings, name=f"attentions_{j}")(h, context)
            skips.append(h)
        if self.downsample:
            h = Downsample(True, self.settings.dtype, padding=1, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnets_0, attentions_0, resnets_1 at constant width."""

    transformer: TransformerSettings
    settings: BlockSettings

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array) -> Array:
        c = h.shape[-1]
        h = _resnet(self.settings, c, "resnets_0")(h, temb)
        h = SpatialTransformer(self.transformer, self.settings, name="attentions_0")(h, context)
        return _resnet(self.settings, c, "resnets_1")(h, temb)


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` (attention=True) or `UpBlock2D`: resnet j takes [h, skips[-1-j]] concatenated on
    channels (skips are consumed from the last); then, given `upsample_size`, an `Upsampler` to that size."""

    out_ch: int
    transformer: TransformerSettings
    attention: bool
    settings: BlockSettings

    @nn.compact
    def __call__(self, h: Array, skips: list[Array], temb: Array, context: Array,
                 upsample_size: tuple[int, int] | None) -> Array:  # fmt: skip
        for j, skip in enumerate(reversed(skips)):
            h = _resnet(self.settings, self.out_ch, f"resnets_{j}")(jnp.concatenate([h, skip], axis=-1), temb)
            if self.attention:
                h = SpatialTransformer(self.transformer, self.settings, name=f"attentions_{j}")(h, context)
        if upsample_size is not None:
            h = Upsampler(self.settings.dtype, name="upsamplers_0")(h, upsample_size)
        return h


class TimestepEmbedding(nn.Module):
    """diffusers' `TimestepEmbedding` (silu): e [B, D_in] -> linear_2(silu(linear_1(e))) [B, features]."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, e: Array) -> Array:
        e = nn.silu(_dense(self.features, self.dtype, "linear_1")(e))
        return _dense(self.features, self.dtype, "linear_2")(e)


class UNetCondition(nn.Module):
    """The text-conditional U-Net: (sample [B,H,W,in_channels], timesteps [B] or scalar, encoder_hidden_states
    [B,M,cross_attention_dim], and where the config takes them the keywords class_labels and added_cond) ->
    float32 [B,H,W,out_channels]. Build it with `create_unet_condition`.

    Fields are the config resolved per level (level i: width block_out_channels[i], layers_per_block[i],
    num_heads[i], transformer_layers[i] transformer blocks per attention, only_cross_attention[i]; down_attention[i]
    for down block i, up_attention[k] for up block k = level L-1-k; the middle block takes the last level's heads
    and transformer layers and always attends to itself first). `num_class_embeds` (a label table) or
    `class_embed_type`: the class embedding added to the time embedding (both None: none). `addition_time_embed_dim`
    and `addition_input_dim` (diffusers' projection_class_embeddings_input_dim P, also the input width of the
    "projection" class embedding): SDXL's "text_time" embedding (None: none).
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
    transformer_layers: tuple[int, ...]
    only_cross_attention: tuple[bool, ...]
    cross_attention_dim: int
    use_linear_projection: bool
    upcast_attention: bool
    flip_sin_to_cos: bool
    freq_shift: float
    norm_num_groups: int
    norm_eps: float
    num_class_embeds: int | None = None
    class_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    addition_input_dim: int | None = None
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

    def _class_labels(self, class_labels: Any, batch: int) -> Array | None:
        """class_labels with the batch axis (a scalar label or timestep broadcast), None for a U-Net without a class
        embedding; labels of a table are checked against [0, num_class_embeds) when concrete (under jit an
        outside label reads a row of NaNs)."""
        time_width = 4 * self.block_out_channels[0]
        spec = _class_labels_spec(self.class_embed_type, self.num_class_embeds, time_width, self.addition_input_dim)
        if spec is None:
            if class_labels is not None:
                raise UsageError("class_labels were given but this U-Net has no class embedding (num_class_embeds, "
                                 "class_embed_type)")  # fmt: skip
            return None
        what = f"class_embed_type={self.class_embed_type!r}" if self.class_embed_type else (
            f"num_class_embeds={self.num_class_embeds}")  # fmt: skip
        if class_labels is None:
            raise UsageError(f"class_labels are required: this U-Net embeds them ({what})")
        labels = jnp.asarray(class_labels)
        shape = spec[0]
        table = self.class_embed_type is None
        shapes = ((batch, *shape), *([()] if not shape else []))  # a scalar label or timestep is one for all
        if labels.shape not in shapes or not jnp.issubdtype(labels.dtype, jnp.integer if table else jnp.number):
            kind = "an int" if table else "a number"
            form = f"{kind} array {list(shapes[0])}" + ("" if shape else f" or {kind}")
            raise UsageError(f"class_labels must be {form} ({what}), got {labels.dtype} {labels.shape}")
        if table:
            try:
                values = np.asarray(labels)
            except jax.errors.TracerArrayConversionError:
                values = None
            if values is not None and ((values < 0) | (values >= self.num_class_embeds)).any():
                bad = values[(values < 0) | (values >= self.num_class_embeds)].ravel()
                raise UsageError(f"class_labels must lie in [0, {self.num_class_embeds}), got {int(bad[0])}")
        return jnp.broadcast_to(labels, (batch, *shape))

    def _added_cond(self, added_cond: Mapping[str, Any] | None, batch: int) -> tuple[Array, Array] | None:
        """(text_embeds [B, P_text], time_ids [B, N]) of SDXL's added conditioning, None for a U-Net without it."""
        if self.addition_time_embed_dim is None:
            if added_cond is not None:
                raise UsageError("added_cond was given but this U-Net has no added embedding (addition_embed_type)")
            return None
        if not isinstance(added_cond, Mapping):
            raise UsageError(f"added_cond must be a dict with {list(ADDED_COND_KEYS)} (addition_embed_type "
                             f"'text_time'), got {type(added_cond).__name__}")  # fmt: skip
        missing = [key for key in ADDED_COND_KEYS if key not in added_cond]
        surplus = sorted(str(key) for key in added_cond if key not in ADDED_COND_KEYS)
        if missing or surplus:
            raise UsageError(f"added_cond must hold exactly {list(ADDED_COND_KEYS)}: missing {missing}, "
                             f"surplus {surplus}")  # fmt: skip
        text, time_ids = (jnp.asarray(added_cond[key]) for key in ADDED_COND_KEYS)
        for key, value in zip(ADDED_COND_KEYS, (text, time_ids)):
            if value.ndim != 2 or value.shape[0] != batch or not jnp.issubdtype(value.dtype, jnp.number):
                raise UsageError(f"added_cond[{key!r}] must be a number array [{batch}, N], got {value.dtype} "
                                 f"{value.shape}")  # fmt: skip
        width = text.shape[1] + time_ids.shape[1] * self.addition_time_embed_dim
        if width != self.addition_input_dim:
            raise UsageError(
                f"added_cond: text_embeds [B, {text.shape[1]}] and time_ids [B, {time_ids.shape[1]}] give "
                f"{text.shape[1]} + {time_ids.shape[1]}·{self.addition_time_embed_dim} = {width} inputs, but the "
                f"add_embedding takes projection_class_embeddings_input_dim={self.addition_input_dim}"
            )
        return text, time_ids

    def _class_embedding(self, labels: Array, time_width: int, dtype: Any, sinusoid: dict) -> Array:
        """The class embedding [B, 4·C_0] of labels as `_class_labels` returns them, by class_embed_type."""
        if self.class_embed_type is None:
            table = nn.Embed(self.num_class_embeds, time_width, dtype=dtype, param_dtype=jnp.float32,
                             name="class_embedding")  # fmt: skip
            return table(labels)
        if self.class_embed_type == "identity":
            return labels.astype(dtype)
        if self.class_embed_type == "timestep":
            labels = timestep_embedding(labels, self.block_out_channels[0], **sinusoid)
        return TimestepEmbedding(time_width, dtype, name="class_embedding")(labels)

    @nn.compact
    def __call__(self, sample: Array, timesteps: Array, encoder_hidden_states: Array, *,
                 class_labels: Array | None = None, added_cond: Mapping[str, Array] | None = None,
                 ) -> Array:  # fmt: skip
        """timesteps are the scheduler's raw step numbers (ints or floats), one per example or one for all.

        class_labels: required exactly with a class embedding: int [B] (or one int for all) rows of the label
        table with num_class_embeds (the x4 upscaler's noise level); with class_embed_type "timestep" numbers [B]
        (or one) embedded as timesteps, "identity" float [B, 4·C_0] added as they are, "projection" float [B, P]
        (SD 2.1 unCLIP's noised image embedding and its noise level's sinusoid).

        added_cond: diffusers' `added_cond_kwargs`, required exactly with addition_embed_type "text_time":
        {"text_embeds": [B, P_text] pooled text,
        "time_ids": [B, N] numbers (SDXL base: original size, crop top-left, target size, N = 6; the refiner:
        original size, crop, aesthetic score, N = 5)}, each time id embedded by a sinusoid of width
        addition_time_embed_dim, so that P_text + N·addition_time_embed_dim must be the `add_embedding` input P.
        """
        sample, timesteps, context = map(jnp.asarray, (sample, timesteps, encoder_hidden_states))
        self._check_inputs(sample, timesteps, context)
        batch = sample.shape[0]
        labels = self._class_labels(class_labels, batch)
        added = self._added_cond(added_cond, batch)
        dtype = jnp.dtype(self.dtype)
        s = BlockSettings(self.norm_num_groups, self.norm_eps, self.use_linear_projection, self.upcast_attention,
                          dtype, self.remat)  # fmt: skip
        widths, levels = self.block_out_channels, len(self.block_out_channels)
        sinusoid = dict(flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)

        t = jnp.broadcast_to(timesteps, (batch,))
        time_width = 4 * widths[0]
        temb = TimestepEmbedding(time_width, dtype, name="time_embedding")(timestep_embedding(t, widths[0], **sinusoid))
        if labels is not None:
            temb = temb + self._class_embedding(labels, time_width, dtype, sinusoid)
        if added is not None:
            add_input = text_time_input(*added, self.addition_time_embed_dim, **sinusoid)
            temb = temb + TimestepEmbedding(time_width, dtype, name="add_embedding")(add_input)

        transformers = [TransformerSettings(*level) for level in
                        zip(self.num_heads, self.transformer_layers, self.only_cross_attention)]  # fmt: skip
        h = conv3x3(widths[0], dtype, name="conv_in")(sample)
        skips = [h]
        for i in range(levels):
            h, level_skips = DownBlock(widths[i], self.layers_per_block[i], transformers[i], self.down_attention[i],
                                       i < levels - 1, s, name=f"down_blocks_{i}")(h, temb, context)  # fmt: skip
            skips += level_skips

        # diffusers' UNetMidBlock2DCrossAttn attends to itself first whatever only_cross_attention says
        mid = transformers[-1]._replace(only_cross=False)
        h = MidBlock(mid, s, name="mid_block")(h, temb, context)

        for k in range(levels):
            level = levels - 1 - k
            n = self.layers_per_block[level] + 1
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = tuple(skips[-1].shape[1:3]) if k < levels - 1 else None
            h = UpBlock(widths[level], transformers[level], self.up_attention[k], s, name=f"up_blocks_{k}")(
                h, block_skips, temb, context, upsample_size
            )

        h = nn.silu(group_norm(h, name="conv_norm_out", num_groups=self.norm_num_groups, eps=self.norm_eps))
        return conv3x3(self.out_channels, dtype, name="conv_out")(h).astype(jnp.float32)
