"""Flux.1's transformer (Black Forest Labs; diffusers' `FluxTransformer2DModel`) as a Flax Linen module, with the
packing of NHWC latents into its tokens. Layers shared with SD3's MMDiT come from `jaxdiff.models.mmdit`.

(tokens [B,N,in_channels], timestep [B], encoder_hidden_states [B,L,joint_attention_dim], pooled_projections
[B,pooled_projection_dim], img_ids [N,3], txt_ids [L,3], guidance [B] or None) -> float32 [B,N,p²·out_channels].
The tokens are 2×2 patches of 16-channel latents packed by `pack_latents` (64 channels, N = (H/2)(W/2)); img_ids
give each token's (0, row, column) in that grid (`latent_image_ids`), txt_ids the text tokens' (zeros in
diffusers' pipelines). timestep is the flow time t in [0, 1] (x_t = (1 - t)·x_0 + t·noise) and guidance the
distilled guidance scale of Flux.1-dev (guidance_embeds); both are multiplied by 1000 before their frequency
embedding, as diffusers' forward does. The output is the velocity noise - x_0, in the same packed layout.

The network: x_embedder and context_embedder (linear); c = MLP(freq(1000·t)) [+ MLP(freq(1000·guidance))] +
MLP(pooled); `num_layers` double-stream blocks (`jaxdiff.models.mmdit.JointBlock` over the [text, image] sequence);
`num_single_layers` single-stream blocks over the joined sequence, each x += gate·proj_out([attn(h), gelu(proj_mlp(h))])
with h = modulate(LN(x)) and one adaLN (shift, scale, gate); attention q and k RMS-normed per head and rotated by the
3-axis rotary embedding of the ids; then the final adaptive layer norm and proj_out on the image tokens.

Parameter tree (diffusers' names, as `jaxdiff.latent.mmdit_weights.diffusers_name` maps them):

    x_embedder, context_embedder                   in_channels -> D, joint_attention_dim -> D
    time_text_embed/timestep_embedder, guidance_embedder (dev), text_embedder   each linear_1, linear_2
    transformer_blocks_{i}/...                     as SD3's joint blocks (norm1, norm1_context, attn with norm_q,
                                                   norm_k, norm_added_q, norm_added_k, to_add_out; ff, ff_context)
    single_transformer_blocks_{i}/norm/linear      D -> 3·D (shift, scale, gate)
    single_transformer_blocks_{i}/attn/to_q, to_k, to_v, norm_q, norm_k   (no output projection)
    single_transformer_blocks_{i}/proj_mlp, proj_out   D -> 4·D, 5·D -> D
    norm_out/linear, proj_out                      D -> 2·D (scale, shift), D -> p²·out_channels

D = num_attention_heads · attention_head_dim. Parameters are float32; `dtype` is the compute dtype of the matmuls,
while norms, modulation, rotation, the residual streams and the attention softmax stay float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.checks import is_int, require_bool, require_int, unsupported
from jaxdiff.errors import UsageError
from jaxdiff.models.dit import layer_norm, modulate
from jaxdiff.models.mmdit import (
    MLP_RATIO, NORM_EPS, OPTION_DEFAULTS, Attention, JointBlock, Modulation, TimeTextEmbedding, check_conditioning,
    check_options, continuous_norm, dense, diffusers_settings,
)  # fmt: skip

Array = jax.Array

CLASS_NAME = "FluxTransformer2DModel"
ROPE_THETA = 10000.0  # diffusers' FluxPosEmbed
TIME_SCALE = 1000.0  # the forward's factor on timestep and guidance
PACK = 2  # latents are packed 2×2 into tokens
# diffusers' config.json keys with their defaults (FluxTransformer2DModel.__init__).
DIFFUSERS_DEFAULTS = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
FLUX_DEV = dict(DIFFUSERS_DEFAULTS, guidance_embeds=True)  # Flux.1-dev's transformer/config.json
FLUX_SCHNELL = dict(DIFFUSERS_DEFAULTS)  # Flux.1-schnell's


def flux_config(settings: dict, **options: Any) -> ml_collections.ConfigDict:
    """The config of a diffusers FluxTransformer2DModel config.json dict (omitted keys take diffusers' defaults)
    plus our options dtype, remat, attention (as `jaxdiff.models.mmdit.mmdit_config`). An unknown key or an
    unsupported value raises ConfigError naming it."""
    c = diffusers_settings(settings, CLASS_NAME, DIFFUSERS_DEFAULTS, options)
    axes = c["axes_dims_rope"]
    if not isinstance(axes, (list, tuple)) or not all(is_int(a, numpy=False) for a in axes):
        raise unsupported(f"{CLASS_NAME} config", "axes_dims_rope", axes, "a list of ints")
    c["axes_dims_rope"] = tuple(axes)
    config = ml_collections.ConfigDict({**c, **OPTION_DEFAULTS, **options})
    create_flux(config)  # checks every field
    return config


def rotary_embedding(ids: Array, axes_dims: tuple[int, ...]) -> tuple[Array, Array]:
    """Flux's rotary embedding of positions ids [S, len(axes_dims)] -> (cos, sin), float32 [S, sum(axes_dims)].

    Axis a takes axes_dims[a] channels: frequencies ω_j = θ^(-2j / axes_dims[a]), j < axes_dims[a]/2, θ = 10000;
    channels 2j and 2j+1 of the axis both hold cos(id_a·ω_j) (resp. sin), diffusers' `FluxPosEmbed`. Phases are
    computed in float32 from float64 frequencies."""
    ids = jnp.asarray(ids, jnp.float32)
    cos, sin = [], []
    for a, dim in enumerate(axes_dims):
        omega = (ROPE_THETA ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
        phase = jnp.repeat(ids[:, a, None] * omega[None], 2, axis=1)
        cos.append(jnp.cos(phase))
        sin.append(jnp.sin(phase))
    return jnp.concatenate(cos, axis=1), jnp.concatenate(sin, axis=1)


def pack_latents(latents: Array) -> Array:
    """NHWC latents [B,H,W,C] (H, W even) -> Flux's tokens [B, (H/2)(W/2), 4·C]: token (r, c) row-major holds the
    2×2 patch at rows 2r..2r+1, columns 2c..2c+1, channels ordered (channel, row in patch, column in patch), as
    diffusers' `FluxPipeline._pack_latents` of NCHW latents."""
    b, h, w, c = latents.shape
    if h % PACK or w % PACK:
        raise UsageError(f"latents [B, H, W, C] need an even H and W to pack into 2×2 tokens, got shape "
                         f"{latents.shape}")  # fmt: skip
    x = latents.reshape(b, h // PACK, PACK, w // PACK, PACK, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: Array, height: int, width: int) -> Array:
    """The inverse of `pack_latents`: tokens [B, (H/2)(W/2), 4·C] -> NHWC latents [B, H, W, C]."""
    b, n, channels = tokens.shape
    if height % PACK or width % PACK or n != (height // PACK) * (width // PACK) or channels % (PACK * PACK):
        raise UsageError(f"tokens of shape {tokens.shape} are not the 2×2 packing of {height}×{width} latents")
    c = channels // (PACK * PACK)
    x = tokens.reshape(b, height // PACK, width // PACK, c, PACK, PACK).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, c)


def latent_image_ids(height: int, width: int) -> np.ndarray:
    """img_ids [(H/2)(W/2), 3] float32 of the tokens of H×W latents: (0, row, column) of each token, row-major
    (diffusers' `FluxPipeline._prepare_latent_image_ids`)."""
    rows, columns = np.meshgrid(np.arange(height // PACK), np.arange(width // PACK), indexing="ij")
    return np.stack([np.zeros_like(rows), rows, columns], axis=-1).reshape(-1, 3).astype(np.float32)


class SingleBlock(nn.Module):
    """diffusers' `FluxSingleTransformerBlock` over the joined [text, image] sequence x [B,S,D] float32:
    h = modulate(LN(x), shift, scale); x += gate·proj_out([attn(h), gelu_tanh(proj_mlp(h))]). -> [B,S,D]."""

    num_heads: int
    dtype: Any
    attention: str

    @nn.compact
    def __call__(self, x: Array, c: Array, rotary: tuple[Array, Array]) -> Array:
        d = x.shape[-1]
        shift, scale, gate = Modulation(d, 3, self.dtype, name="norm")(c)
        h = modulate(layer_norm(x, NORM_EPS), shift, scale)
        mlp = nn.gelu(dense(MLP_RATIO * d, self.dtype, "proj_mlp")(h), approximate=True)
        attn, _ = Attention(self.num_heads, True, self.dtype, self.attention, pre_only=True, name="attn")(h, None,
                                                                                                         rotary)
        joined = jnp.concatenate([attn.astype(mlp.dtype), mlp], axis=-1)
        return x + gate[:, None] * dense(d, self.dtype, "proj_out")(joined).astype(jnp.float32)


class FluxTransformer(nn.Module):
    """Flux.1's transformer. Fields are the keys of a diffusers FluxTransformer2DModel config.json (see
    `flux_config`, which builds them from one) and the options dtype, remat, attention; checked on construction."""

    patch_size: int
    in_channels: int
    out_channels: int
    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance_embeds: bool
    axes_dims_rope: tuple[int, ...]
    dtype: str
    remat: bool
    attention: str

    def __post_init__(self):
        self._check_fields()
        super().__post_init__()

    def _check_fields(self) -> None:
        owner = f"{CLASS_NAME} config"
        for name in ("patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "pooled_projection_dim"):  # fmt: skip
            require_int(name, getattr(self, name), 1)
        for name in ("num_layers", "num_single_layers"):
            require_int(name, getattr(self, name), 0)
        require_bool("guidance_embeds", self.guidance_embeds)
        check_options(self.dtype, self.remat, self.attention)
        axes = self.axes_dims_rope
        if (not isinstance(axes, tuple) or not all(is_int(a, numpy=False) and a > 0 and a % 2 == 0 for a in axes)
                or sum(axes) != self.attention_head_dim):  # fmt: skip
            raise unsupported(owner, "axes_dims_rope", axes,
                              f"positive even ints summing to attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        """D = num_attention_heads · attention_head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    def _check_inputs(self, x, timestep, context, pooled, img_ids, txt_ids, guidance) -> None:
        if x.ndim != 3 or x.shape[-1] != self.in_channels or not jnp.issubdtype(x.dtype, jnp.floating):
            raise UsageError(f"hidden_states must be float tokens [B, N, {self.in_channels}] (`pack_latents`), got "
                             f"shape {x.shape} dtype {x.dtype}")  # fmt: skip
        batch, n = x.shape[:2]
        check_conditioning(batch, timestep, context, pooled, self.joint_attention_dim, self.pooled_projection_dim,
                           self.attention)  # fmt: skip
        axes = len(self.axes_dims_rope)
        for name, ids, length in (("img_ids", img_ids, n), ("txt_ids", txt_ids, context.shape[1])):
            if ids.shape != (length, axes):
                raise UsageError(f"{name} must be [{length}, {axes}] (one id per token and rotary axis), got shape "
                                 f"{ids.shape}")  # fmt: skip
        if self.guidance_embeds and (guidance is None or guidance.shape != (batch,)):
            raise UsageError(f"guidance must be numbers of shape [{batch}] (guidance_embeds: Flux.1-dev), got "
                             f"{None if guidance is None else guidance.shape}")  # fmt: skip
        if not self.guidance_embeds and guidance is not None:
            raise UsageError("guidance was given but this transformer has no guidance embedder (guidance_embeds=false)")

    @nn.compact
    def __call__(self, hidden_states: Array, timestep: Array, encoder_hidden_states: Array, pooled_projections: Array,
                 img_ids: Array, txt_ids: Array, guidance: Array | None = None) -> Array:  # fmt: skip
        """hidden_states [B,N,in_channels] packed latent tokens; timestep [B] the flow time in [0, 1];
        encoder_hidden_states [B,L,joint_attention_dim] (T5's tokens); pooled_projections [B,pooled_projection_dim]
        (CLIP's pooled output); img_ids [N, axes] and txt_ids [L, axes] the rotary positions; guidance [B] the
        guidance scale (with guidance_embeds only). Returns float32 [B,N,patch_size²·out_channels], the velocity."""
        x, timestep = jnp.asarray(hidden_states), jnp.asarray(timestep)
        context, pooled = jnp.asarray(encoder_hidden_states), jnp.asarray(pooled_projections)
        img_ids, txt_ids = jnp.asarray(img_ids), jnp.asarray(txt_ids)
        guidance = None if guidance is None else jnp.asarray(guidance)
        self._check_inputs(x, timestep, context, pooled, img_ids, txt_ids, guidance)
        dtype, d, text_tokens = jnp.dtype(self.dtype), self.inner_dim, context.shape[1]
        h = dense(d, dtype, "x_embedder")(x).astype(jnp.float32)
        scaled_guidance = None if guidance is None else guidance.astype(jnp.float32) * TIME_SCALE
        c = TimeTextEmbedding(d, self.guidance_embeds, dtype, name="time_text_embed")(
            timestep.astype(jnp.float32) * TIME_SCALE, pooled.astype(jnp.float32), scaled_guidance)  # fmt: skip
        context = dense(d, dtype, "context_embedder")(context).astype(jnp.float32)
        rotary = rotary_embedding(jnp.concatenate([txt_ids, img_ids], axis=0), self.axes_dims_rope)
        double_cls = nn.remat(JointBlock) if self.remat else JointBlock
        for i in range(self.num_layers):
            block = double_cls(self.num_attention_heads, True, False, False, dtype, self.attention, context_first=True,
                               name=f"transformer_blocks_{i}")  # fmt: skip
            h, context = block(h, context, c, rotary)
        single_cls = nn.remat(SingleBlock) if self.remat else SingleBlock
        joined = jnp.concatenate([context, h], axis=1)
        for i in range(self.num_single_layers):
            joined = single_cls(self.num_attention_heads, dtype, self.attention,
                                name=f"single_transformer_blocks_{i}")(joined, c, rotary)  # fmt: skip
        h = continuous_norm(joined[:, text_tokens:], c, dtype, "norm_out")
        return dense(self.patch_size**2 * self.out_channels, dtype, "proj_out")(h).astype(jnp.float32)


def create_flux(config: ml_collections.ConfigDict) -> FluxTransformer:
    """The network of a config from `flux_config`."""
    return FluxTransformer(**{k: tuple(v) if k == "axes_dims_rope" else v for k, v in config.to_dict().items()})


def example_inputs(model: FluxTransformer, batch: int = 1, tokens: int = 1, text_tokens: int = 1) -> tuple:
    """Zero inputs (hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance)
    for tracing; guidance is None without guidance_embeds."""
    axes = len(model.axes_dims_rope)
    return (jnp.zeros((batch, tokens, model.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, text_tokens, model.joint_attention_dim)), jnp.zeros((batch, model.pooled_projection_dim)),
            jnp.zeros((tokens, axes)), jnp.zeros((text_tokens, axes)),
            jnp.zeros((batch,)) if model.guidance_embeds else None)  # fmt: skip
