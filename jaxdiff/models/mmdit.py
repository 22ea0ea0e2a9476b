"""Stable Diffusion 3's MMDiT (Esser et al. 2024; diffusers' `SD3Transformer2DModel`), SD3.5's variant with RMS
QK-norm and dual-attention blocks included, as a Flax Linen module; and the layers Flux's transformer shares with it
(`jaxdiff.models.flux`).

(x [B,H,W,C] NHWC latents, timestep [B], encoder_hidden_states [B,L,joint_attention_dim], pooled_projections
[B,pooled_projection_dim]) -> float32 [B,H,W,out_channels]. The timestep is used as a raw number by the frequency
embedding: diffusers' SD3 pipelines pass 1000·t for the flow time t in [0, 1] (x_t = (1 - t)·x_0 + t·noise), and the
network predicts the velocity noise - x_0.

The network: patchify (a p×p stride-p convolution) + a 2-D sin-cos table of pos_embed_max_size² positions, cropped
at its centre to the latent's (H/p)×(W/p) patches; c = MLP(freq(timestep)) + MLP(pooled) [B, D]; the text
tokens through `context_embedder` [B, L, D]; `num_layers` joint blocks, each with its own adaLN-Zero modulation,
q/k/v projections and MLP for the image and the text stream and one attention over the concatenated [image, text]
tokens (the last block updates only the image stream: `context_pre_only`); SD3.5-medium's dual-attention blocks
add a second, image-only attention with its own modulation; then the final adaptive layer norm, a linear to
p·p·out_channels per patch, unpatchify.

Parameter tree (diffusers' state-dict names, `transformer_blocks.3.ff.net.0.proj` as
`transformer_blocks_3/ff/net_0/proj`; `diffusers_name` maps them):

    pos_embed/proj                                 p×p conv, in_channels -> D (HWIO kernel, bias)
    time_text_embed/timestep_embedder/linear_1, linear_2   256 -> D -> D (SiLU between)
    time_text_embed/text_embedder/linear_1, linear_2       pooled_projection_dim -> D -> D (SiLU between)
    context_embedder                               joint_attention_dim -> D
    transformer_blocks_{i}/norm1/linear            D -> 6·D (9·D in a dual-attention block)
    transformer_blocks_{i}/norm1_context/linear    D -> 6·D (2·D in the last block: scale, shift)
    transformer_blocks_{i}/attn/to_q, to_k, to_v, to_out_0          the image stream's projections, D -> D
    transformer_blocks_{i}/attn/add_q_proj, add_k_proj, add_v_proj, to_add_out   the text stream's (no to_add_out
                                                   in the last block)
    transformer_blocks_{i}/attn/norm_q, norm_k, norm_added_q, norm_added_k   RMS norms over a head (qk_norm)
    transformer_blocks_{i}/attn2/...               the dual-attention block's second attention (image only)
    transformer_blocks_{i}/ff/net_0/proj, ff/net_2 D -> 4·D -> D (GELU, tanh approximation); ff_context/... too
    norm_out/linear                                D -> 2·D (scale, shift)
    proj_out                                       D -> p·p·out_channels (per patch: row, column, channel)

D = num_attention_heads · attention_head_dim. Dense kernels are [in, out]; parameters are float32; `dtype` is the
compute dtype of the matmuls and the convolution, while norms, modulation, the residual streams and the attention
softmax stay float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.checks import is_int, require_bool, require_choice, require_int, unsupported
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.models.dit import ATTENTION_IMPLEMENTATIONS, COMPUTE_DTYPES, layer_norm, modulate, timestep_frequencies
from jaxdiff.models.layers import multi_head_attention

Array = jax.Array

CLASS_NAME = "SD3Transformer2DModel"
NORM_EPS = 1e-6  # every layer norm and RMS norm of the MMDiT and of Flux
QK_NORMS = (None, "rms_norm")  # diffusers' qk_norm values read here
MLP_RATIO = 4  # FeedForward's hidden width over D
# diffusers' config.json keys with their defaults (SD3Transformer2DModel.__init__); then our options'.
DIFFUSERS_DEFAULTS = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64, num_attention_heads=18,
    joint_attention_dim=4096, caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None,
)  # fmt: skip
OPTION_DEFAULTS = dict(dtype="float32", remat=False, attention="auto")
# SD3-medium's transformer/config.json.
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)  # fmt: skip


def mmdit_config(settings: dict, **options: Any) -> ml_collections.ConfigDict:
    """The config of a diffusers SD3Transformer2DModel config.json dict (omitted keys take diffusers' defaults) plus
    our options dtype ("float32" | "bfloat16"), remat (bool) and attention ("auto" | "cudnn"). Every key is read or
    refused: an unknown key or an unsupported value raises ConfigError naming it."""
    owner = f"{CLASS_NAME} config"
    c = diffusers_settings(settings, CLASS_NAME, DIFFUSERS_DEFAULTS, options)
    layers = c["dual_attention_layers"]
    if not isinstance(layers, (list, tuple)) or not all(is_int(i, numpy=False) for i in layers):
        raise unsupported(owner, "dual_attention_layers", layers, "a list of block indices")
    c["dual_attention_layers"] = tuple(sorted(set(layers)))
    config = ml_collections.ConfigDict({**c, **OPTION_DEFAULTS, **options})
    create_mmdit(config)  # checks every field
    return config


def diffusers_settings(settings: dict, class_name: str, defaults: dict, options: dict) -> dict:
    """A diffusers config.json dict checked against its class (`_class_name`, when given), its keys (`defaults`, the
    class's __init__ defaults; `_`-prefixed metadata is ignored) and our option names (`OPTION_DEFAULTS`): the
    settings with defaults filled in, out_channels None replaced by in_channels. ConfigError naming an unknown key,
    option or class."""
    owner = f"{class_name} config"
    if settings.get("_class_name", class_name) != class_name:
        raise unsupported(owner, "_class_name", settings["_class_name"], repr(class_name))
    unknown = sorted(k for k in settings if k not in defaults and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"{owner}: unknown keys {unknown}; known: {sorted(defaults)}")
    bad_options = sorted(set(options) - set(OPTION_DEFAULTS))
    if bad_options:
        raise ConfigError(f"{owner}: unknown options {bad_options}; allowed: {sorted(OPTION_DEFAULTS)}")
    c = {**defaults, **{k: v for k, v in settings.items() if not k.startswith("_")}}
    if c["out_channels"] is None:  # diffusers: `out_channels or in_channels`
        c["out_channels"] = c["in_channels"]
    return c


def check_options(dtype: Any, remat: Any, attention: Any) -> None:
    """ConfigError unless dtype is one of `COMPUTE_DTYPES`, remat a bool and attention one of
    `ATTENTION_IMPLEMENTATIONS` ("cudnn" with bfloat16 only)."""
    require_bool("remat", remat)
    require_choice("dtype", dtype, COMPUTE_DTYPES)
    require_choice("attention", attention, ATTENTION_IMPLEMENTATIONS)
    if attention == "cudnn" and dtype != "bfloat16":
        raise ConfigError(f"attention='cudnn' needs dtype='bfloat16' (cuDNN flash attention), got {dtype!r}")


def check_conditioning(batch: int, timestep: Array, context: Array, pooled: Array, joint_attention_dim: int,
                       pooled_projection_dim: int, attention: str) -> None:  # fmt: skip
    """UsageError unless timestep is numbers [batch], context (encoder_hidden_states) [batch, L,
    joint_attention_dim] and pooled (pooled_projections) [batch, pooled_projection_dim]; ConfigError for cuDNN
    attention off a GPU."""
    if timestep.shape != (batch,) or not jnp.issubdtype(timestep.dtype, jnp.number):
        raise UsageError(f"timestep must be numbers of shape [{batch}], got shape {timestep.shape}")
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != joint_attention_dim:
        raise UsageError(f"encoder_hidden_states must be [{batch}, L, {joint_attention_dim}], got shape "
                         f"{context.shape}")  # fmt: skip
    if pooled.shape != (batch, pooled_projection_dim):
        raise UsageError(f"pooled_projections must be [{batch}, {pooled_projection_dim}], got shape {pooled.shape}")
    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"attention='cudnn' needs a GPU; this process runs on {jax.default_backend()!r}")


def sd3_medium_config(**options: Any) -> ml_collections.ConfigDict:
    """SD3-medium's transformer (24 joint blocks, 24 heads × 64, 2,028,328,000 parameters)."""
    return mmdit_config(SD3_MEDIUM, **options)


def sincos_window(dim: int, grid_size: int, base_size: int, height: int, width: int) -> np.ndarray:
    """The centre height×width window of diffusers' `get_2d_sincos_pos_embed(dim, grid_size, base_size=base_size)`
    table (its `cropped_pos_embed`), float64 [height·width, dim]; height = width = grid_size gives the whole table.

    Token n = row·width + column of the window, which starts at row (G - height) // 2, column (G - width) // 2 of
    the G×G grid; position k along an axis is k·base_size / G. Channels [0, dim/2) embed the column, [dim/2, dim)
    the row, each as [sin(pos·ω_j), cos(pos·ω_j)], ω_j = 10000^(-j / (dim/4)), j < dim/4."""
    if dim % 4:
        raise ConfigError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 10000.0 ** (-np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def axis(start: int, size: int) -> np.ndarray:  # [size, dim/2]
        phase = np.outer(np.arange(start, start + size, dtype=np.float64) * base_size / grid_size, omega)
        return np.concatenate([np.sin(phase), np.cos(phase)], axis=1)

    column = np.tile(axis((grid_size - width) // 2, width), (height, 1))
    row = np.repeat(axis((grid_size - height) // 2, height), width, axis=0)
    return np.concatenate([column, row], axis=1)


def rms_norm(x: Array, scale: Array) -> Array:
    """x · rsqrt(mean(x², last axis) + 1e-6) · scale, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + NORM_EPS) * scale


class RMSNorm(nn.Module):
    """x [..., d] -> rms_norm(x) · weight (`scale`, d, starting at one), float32."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32))


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
    """Dense with float32 parameters and Flax's default initialisation (lecun-normal kernel, zero bias): these
    networks are read from diffusers' weights, not trained from scratch."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


class Modulation(nn.Module):
    """c [B, D'] -> `chunks` float32 arrays [B, features]: linear(silu(c)) split in order (diffusers' adaLN
    `norm1.linear`)."""

    features: int
    chunks: int
    dtype: Any

    @nn.compact
    def __call__(self, c: Array) -> list[Array]:
        mod = dense(self.chunks * self.features, self.dtype, "linear")(nn.silu(c)).astype(jnp.float32)
        return jnp.split(mod, self.chunks, axis=-1)


def continuous_norm(x: Array, c: Array, dtype: Any, name: str) -> Array:
    """diffusers' `AdaLayerNormContinuous` (no affine, eps 1e-6): LN(x) · (1 + scale) + shift with (scale, shift) =
    linear(silu(c)), scale first. x [B,N,D] float32, c [B,D] -> [B,N,D] float32. Call inside a compact method."""
    scale, shift = Modulation(x.shape[-1], 2, dtype, name=name)(c)
    return modulate(layer_norm(x, NORM_EPS), shift, scale)


class TwoLayerEmbedding(nn.Module):
    """x [B, n] -> linear_2(silu(linear_1(x))) [B, features] (diffusers' `TimestepEmbedding` and the SiLU
    `PixArtAlphaTextProjection`)."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(self.features, self.dtype, "linear_1")(x)
        return dense(self.features, self.dtype, "linear_2")(nn.silu(h)).astype(jnp.float32)


class TimeTextEmbedding(nn.Module):
    """c [B, D] float32 = timestep_embedder(freq(timestep)) [+ guidance_embedder(freq(guidance))] +
    text_embedder(pooled): diffusers' `CombinedTimestepTextProjEmbeddings` (and, with `guidance`,
    `CombinedTimestepGuidanceTextProjEmbeddings`). freq is the 256-channel [cos, sin] sinusoid (shift 0)."""

    features: int
    guidance: bool
    dtype: Any

    @nn.compact
    def __call__(self, timestep: Array, pooled: Array, guidance: Array | None = None) -> Array:
        c = TwoLayerEmbedding(self.features, self.dtype, name="timestep_embedder")(timestep_frequencies(timestep, 0))
        if self.guidance:
            c = c + TwoLayerEmbedding(self.features, self.dtype, name="guidance_embedder")(
                timestep_frequencies(guidance, 0))  # fmt: skip
        return c + TwoLayerEmbedding(self.features, self.dtype, name="text_embedder")(pooled)


class GeluProjection(nn.Module):
    """x -> gelu_tanh(proj(x)) (diffusers' `GELU` layer, `net.0.proj`)."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.gelu(dense(self.features, self.dtype, "proj")(x), approximate=True)


class FeedForward(nn.Module):
    """x [B,N,D] -> net_2(gelu_tanh(net_0.proj(x))) [B,N,D] float32, 4·D hidden channels."""

    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = GeluProjection(MLP_RATIO * x.shape[-1], self.dtype, name="net_0")(x)
        return dense(x.shape[-1], self.dtype, "net_2")(h).astype(jnp.float32)


def attend(q: Array, k: Array, v: Array, implementation: str) -> Array:
    """Softmax attention of [B, N, heads, head_dim] queries over keys/values [B, M, heads, head_dim], scale
    head_dim^-½ (`jaxdiff.models.layers.multi_head_attention`: one head at a time on CPU); -> [B, N,
    heads·head_dim]."""
    impl = None if implementation == "auto" else implementation
    out = multi_head_attention(q, k.astype(q.dtype), v.astype(q.dtype), implementation=impl)
    return out.reshape(*out.shape[:2], -1)


class Attention(nn.Module):
    """diffusers' `Attention` with the joint processors of SD3 (`JointAttnProcessor2_0`) and Flux
    (`FluxAttnProcessor`): x [B,N,D] (the image stream) and, with `joint`, context [B,L,D] (the text stream, its own
    add_q_proj / add_k_proj / add_v_proj) attend as one sequence. -> (image [B,N,D], text [B,L,D] or None), float32.

    q and k are RMS-normed per head with `qk_norm` (norm_q, norm_k; the text's norm_added_q, norm_added_k), then
    rotated by `rotary` (cos, sin [N(+L), head_dim], Flux) over the whole sequence. The sequence is [image, text]
    (SD3) or, with `context_first`, [text, image] (Flux). The image output goes through `to_out_0` (none with
    `pre_only`), the text output through `to_add_out` (none with `context_pre_only`: the text output is None)."""

    num_heads: int
    qk_norm: bool
    dtype: Any
    implementation: str
    joint: bool = False
    context_pre_only: bool = False
    pre_only: bool = False
    context_first: bool = False

    def _qkv(self, x: Array, names: tuple[str, str, str], norms: tuple[str, str]) -> tuple[Array, Array, Array]:
        d = x.shape[-1]
        q, k, v = (dense(d, self.dtype, name)(x).reshape(*x.shape[:2], self.num_heads, -1) for name in names)
        if self.qk_norm:
            q, k = RMSNorm(name=norms[0])(q), RMSNorm(name=norms[1])(k)
        return q, k, v

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None,
                 rotary: tuple[Array, Array] | None = None) -> tuple[Array, Array | None]:  # fmt: skip
        q, k, v = self._qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        n = x.shape[1]
        if self.joint:
            text = self._qkv(context, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
            pairs = ((t, i) if self.context_first else (i, t) for i, t in zip((q, k, v), text))
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in pairs)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = attend(q.astype(self.dtype), k, v, self.implementation)
        d = out.shape[-1]
        if not self.joint:
            image, text = out, None
        elif self.context_first:
            text, image = out[:, : out.shape[1] - n], out[:, out.shape[1] - n :]
        else:
            image, text = out[:, :n], out[:, n:]
        if not self.pre_only:
            image = dense(d, self.dtype, "to_out_0")(image)
        if text is not None:
            text = None if self.context_pre_only else dense(d, self.dtype, "to_add_out")(text).astype(jnp.float32)
        return image.astype(jnp.float32), text


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotary embedding of x [B, S, heads, head_dim] with cos, sin [S, head_dim] (each frequency repeated for its
    channel pair): channel pairs (a, b) -> (a·cos - b·sin, b·cos + a·sin), in float32 (diffusers' `apply_rotary_emb`,
    use_real with the pairs interleaved)."""
    x = x.astype(jnp.float32)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


class JointBlock(nn.Module):
    """diffusers' `JointTransformerBlock` (SD3) and `FluxTransformerBlock` (Flux's double-stream block, with
    `context_first` and `rotary`): (x [B,N,D], context [B,L,D], c [B,D], rotary) float32 -> (x, context or None).

    x += gate·attn(modulate(LN(x))) (the joint attention's image output); with `dual_attention` also
    x += gate2·attn2(modulate2(LN(x_in))); x += gate·ff(modulate(LN(x))). The text stream likewise with its own
    modulation (`norm1_context`), attention output and `ff_context`; with `context_pre_only` (SD3's last block) it
    only feeds the attention (AdaLayerNormContinuous modulation) and the block returns None for it."""

    num_heads: int
    qk_norm: bool
    context_pre_only: bool
    dual_attention: bool
    dtype: Any
    attention: str
    context_first: bool = False

    @nn.compact
    def __call__(self, x: Array, context: Array, c: Array,
                 rotary: tuple[Array, Array] | None = None) -> tuple[Array, Array | None]:  # fmt: skip
        d = x.shape[-1]
        mod = Modulation(d, 9 if self.dual_attention else 6, self.dtype, name="norm1")(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        normed = layer_norm(x, NORM_EPS)
        if self.context_pre_only:
            context_in = continuous_norm(context, c, self.dtype, "norm1_context")
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = Modulation(
                d, 6, self.dtype, name="norm1_context")(c)  # fmt: skip
            context_in = modulate(layer_norm(context, NORM_EPS), c_shift_msa, c_scale_msa)
        attn = Attention(self.num_heads, self.qk_norm, self.dtype, self.attention, joint=True,
                         context_pre_only=self.context_pre_only, context_first=self.context_first, name="attn")
        image_out, text_out = attn(modulate(normed, shift_msa, scale_msa), context_in, rotary)
        x = x + gate_msa[:, None] * image_out
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            attn2 = Attention(self.num_heads, self.qk_norm, self.dtype, self.attention, name="attn2")
            x = x + gate_msa2[:, None] * attn2(modulate(normed, shift_msa2, scale_msa2))[0]
        h = modulate(layer_norm(x, NORM_EPS), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(self.dtype, name="ff")(h)
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None] * text_out
        h = modulate(layer_norm(context, NORM_EPS), c_shift_mlp, c_scale_mlp)
        return x, context + c_gate_mlp[:, None] * FeedForward(self.dtype, name="ff_context")(h)


class PatchEmbed(nn.Module):
    """x [B,H,W,C] -> tokens [B, (H/p)(W/p), features] float32 (row-major patches): the p×p stride-p conv `proj`."""

    features: int
    patch_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        h = nn.Conv(self.features, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                    name="proj")(x)  # fmt: skip
        return h.reshape(h.shape[0], -1, self.features).astype(jnp.float32)


def check_skip_layers(skip_layers: Any, num_layers: int) -> tuple[int, ...]:
    """`skip_layers` (block indices, as diffusers' SD3 `skip_layers`) as a sorted tuple; UsageError unless each is an
    int in [0, num_layers)."""
    if not isinstance(skip_layers, (list, tuple)) or not all(
        is_int(i, numpy=False) and 0 <= i < num_layers for i in skip_layers
    ):
        raise UsageError(f"skip_layers={skip_layers!r} must be a list of block indices in [0, {num_layers})")
    return tuple(sorted(set(skip_layers)))


class MMDiT(nn.Module):
    """SD3 / SD3.5's MMDiT. Fields are the keys of a diffusers SD3Transformer2DModel config.json (see
    `mmdit_config`, which builds them from one) and the options dtype, remat, attention; checked on construction."""

    sample_size: int
    patch_size: int
    in_channels: int
    num_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    caption_projection_dim: int
    pooled_projection_dim: int
    out_channels: int
    pos_embed_max_size: int
    dual_attention_layers: tuple[int, ...]
    qk_norm: str | None
    dtype: str
    remat: bool
    attention: str

    def __post_init__(self):
        self._check_fields()
        super().__post_init__()

    def _check_fields(self) -> None:
        owner = f"{CLASS_NAME} config"
        for name in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                     "out_channels", "pos_embed_max_size"):  # fmt: skip
            require_int(name, getattr(self, name), 1)
        check_options(self.dtype, self.remat, self.attention)
        if self.qk_norm not in QK_NORMS:
            raise unsupported(owner, "qk_norm", self.qk_norm, " or ".join(map(repr, QK_NORMS)))
        if self.caption_projection_dim != self.inner_dim:
            raise unsupported(owner, "caption_projection_dim", self.caption_projection_dim,
                              f"num_attention_heads·attention_head_dim = {self.inner_dim}")  # fmt: skip
        if self.inner_dim % 4:
            raise unsupported(owner, "attention_head_dim", self.attention_head_dim,
                              "a width num_attention_heads·attention_head_dim divisible by 4 (sin-cos positions)")
        layers = self.dual_attention_layers
        if not isinstance(layers, tuple) or not all(is_int(i, numpy=False) and 0 <= i < self.num_layers
                                                    for i in layers):  # fmt: skip
            raise unsupported(owner, "dual_attention_layers", layers, f"block indices in [0, {self.num_layers})")
        if self.sample_size % self.patch_size:
            raise unsupported(owner, "sample_size", self.sample_size, f"a multiple of patch_size={self.patch_size}")

    @property
    def inner_dim(self) -> int:
        """D = num_attention_heads · attention_head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    def pos_table(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        """The position table's centre window of height×width patches, float64 [height·width, D]; by default the
        whole pos_embed_max_size² table (diffusers' `pos_embed.pos_embed` buffer)."""
        grid = self.pos_embed_max_size
        return sincos_window(self.inner_dim, grid, self.sample_size // self.patch_size, height or grid, width or grid)

    def _check_inputs(self, x, timestep, context, pooled) -> None:
        p, limit = self.patch_size, self.pos_embed_max_size * self.patch_size
        if (x.ndim != 4 or x.shape[-1] != self.in_channels or not jnp.issubdtype(x.dtype, jnp.floating)
                or x.shape[1] % p or x.shape[2] % p or not 0 < x.shape[1] <= limit or not 0 < x.shape[2] <= limit):
            raise UsageError(f"x must be float latents [B, H, W, {self.in_channels}] (NHWC) with H and W multiples of "
                             f"{p} up to {limit}, got shape {x.shape} dtype {x.dtype}")  # fmt: skip
        check_conditioning(x.shape[0], timestep, context, pooled, self.joint_attention_dim, self.pooled_projection_dim,
                           self.attention)  # fmt: skip

    @nn.compact
    def __call__(self, x: Array, timestep: Array, encoder_hidden_states: Array, pooled_projections: Array,
                 skip_layers: tuple[int, ...] = ()) -> Array:  # fmt: skip
        """x [B,H,W,in_channels] float NHWC latents (H, W multiples of patch_size, at most
        patch_size·pos_embed_max_size); timestep [B] (diffusers' SD3 convention: 1000·t); encoder_hidden_states
        [B,L,joint_attention_dim] (CLIP-L and CLIP-G hidden states joined, then T5's tokens); pooled_projections
        [B,pooled_projection_dim]; skip_layers: indices of the blocks not run (skip-layer guidance; a Python
        sequence, static under jit). Returns float32 [B,H,W,out_channels], the velocity."""
        x, timestep = jnp.asarray(x), jnp.asarray(timestep)
        context, pooled = jnp.asarray(encoder_hidden_states), jnp.asarray(pooled_projections)
        self._check_inputs(x, timestep, context, pooled)
        skip = check_skip_layers(skip_layers, self.num_layers)
        dtype, d, p = jnp.dtype(self.dtype), self.inner_dim, self.patch_size
        batch, height, width = x.shape[0], x.shape[1] // p, x.shape[2] // p
        pos = self.pos_table(height, width)
        h = PatchEmbed(d, p, dtype, name="pos_embed")(x) + jnp.asarray(pos, jnp.float32)
        c = TimeTextEmbedding(d, False, dtype, name="time_text_embed")(timestep, pooled.astype(jnp.float32))
        context = dense(d, dtype, "context_embedder")(context).astype(jnp.float32)
        block_cls = nn.remat(JointBlock) if self.remat else JointBlock
        for i in range(self.num_layers):
            block = block_cls(self.num_attention_heads, self.qk_norm is not None, i == self.num_layers - 1,
                              i in self.dual_attention_layers, dtype, self.attention,
                              name=f"transformer_blocks_{i}")  # fmt: skip
            if i in skip and not self.is_initializing():
                continue
            result = block(h, context, c)  # initialising runs every block: the parameters exist whatever is skipped
            if i not in skip:
                h, context = result
        h = continuous_norm(h, c, dtype, "norm_out")
        h = dense(p * p * self.out_channels, dtype, "proj_out")(h).astype(jnp.float32)
        out = h.reshape(batch, height, width, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(batch, height * p, width * p, self.out_channels)


def create_mmdit(config: ml_collections.ConfigDict) -> MMDiT:
    """The network of a config from `mmdit_config`."""
    return MMDiT(**{k: tuple(v) if k == "dual_attention_layers" else v for k, v in config.to_dict().items()})


def example_inputs(model: MMDiT, batch: int = 1, size: int | None = None, text_tokens: int = 1) -> tuple[Array, ...]:
    """Zero inputs (x, timestep, encoder_hidden_states, pooled_projections) for tracing, x [B,S,S,C] with S = `size`
    (default sample_size)."""
    size = model.sample_size if size is None else size
    return (jnp.zeros((batch, size, size, model.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, text_tokens, model.joint_attention_dim)),
            jnp.zeros((batch, model.pooled_projection_dim)))  # fmt: skip
