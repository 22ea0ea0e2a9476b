"""CLIP's text transformer (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`) as a Flax Linen module.

Token ids [B, L] (L <= max_position_embeddings, 77 for Stable Diffusion) -> token embeddings plus learned
position embeddings -> pre-LayerNorm encoder layers with causal multi-head self-attention -> final LayerNorm.

The parameter tree mirrors transformers' names with `.{i}` written `_{i}`:

    embeddings/token_embedding/embedding [vocab_size, D], embeddings/position_embedding/embedding [P, D]
    encoder/layers_{i}/{layer_norm1, self_attn/{q_proj, k_proj, v_proj, out_proj}, layer_norm2, mlp/{fc1, fc2}}
    final_layer_norm
    text_projection/kernel [D, projection_dim]   only with projection (no bias)

Dense kernels are [in, out]. LayerNorms and the residual stream are float32; `dtype` is the compute dtype of
the dense layers and attention matmuls (parameters stay float32).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.checks import is_int, unsupported
from jaxdiff.errors import ConfigError, UsageError

_unsupported = functools.partial(unsupported, "CLIP text config")

Array = jax.Array

COMPUTE_DTYPES = ("float32", "bfloat16")
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# transformers' CLIPTextConfig defaults, used for keys a config.json omits.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}  # -> has text_projection
OPTION_DEFAULTS = {"dtype": "float32", "remat": False}
LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773: pool at the largest id instead


def clip_text_config(settings: dict, **options: Any) -> ml_collections.ConfigDict:
    """The ConfigDict of a transformers CLIP text `config.json` dict (omitted keys take transformers' defaults):
    its keys plus `with_projection` (from `architectures`) and our options `dtype` ("float32" | "bfloat16")
    and `remat` (bool). Unsupported values raise ValueError naming the key."""
    if settings.get("model_type", "clip_text_model") != "clip_text_model":
        raise _unsupported("model_type", settings["model_type"], "'clip_text_model' (the text encoder's own config.json)")
    architectures = settings.get("architectures") or ["CLIPTextModel"]
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise _unsupported("architectures", architectures, " or ".join(f"[{a!r}]" for a in ARCHITECTURES))
    bad_options = sorted(set(options) - set(OPTION_DEFAULTS))
    if bad_options:
        raise ConfigError(f"CLIP text config: unknown options {bad_options}; allowed: {sorted(OPTION_DEFAULTS)}")
    c = {key: settings.get(key, default) for key, default in TRANSFORMERS_DEFAULTS.items()}
    c.update({**OPTION_DEFAULTS, **options, "with_projection": ARCHITECTURES[architectures[0]]})

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "projection_dim"):  # fmt: skip
        value = c[key]
        if not is_int(value, numpy=False) or value < 1:
            raise _unsupported(key, value, "a positive int")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise _unsupported("num_attention_heads", c["num_attention_heads"], f"a divisor of hidden_size={c['hidden_size']}")
    if c["hidden_act"] not in ACTIVATIONS:
        raise _unsupported("hidden_act", c["hidden_act"], " or ".join(map(repr, ACTIVATIONS)))
    if not isinstance(c["layer_norm_eps"], (int, float)) or not c["layer_norm_eps"] > 0:
        raise _unsupported("layer_norm_eps", c["layer_norm_eps"], "a positive number")
    eos = c["eos_token_id"]
    if not is_int(eos, numpy=False) or not 0 <= eos < c["vocab_size"]:
        raise _unsupported("eos_token_id", eos, f"a token id in 0..{c['vocab_size'] - 1}")
    if c["dtype"] not in COMPUTE_DTYPES:
        raise _unsupported("dtype", c["dtype"], " or ".join(map(repr, COMPUTE_DTYPES)))
    if not isinstance(c["remat"], bool):
        raise _unsupported("remat", c["remat"], "true or false")
    return ml_collections.ConfigDict(c)


class CLIPTextOutput(NamedTuple):
    """Outputs, float32. last_hidden_state [B, L, D] is after the final LayerNorm; hidden_states holds
    num_hidden_layers + 1 arrays [B, L, D] (the embeddings, then each layer's output, without the final
    LayerNorm); pooled_output [B, D] is last_hidden_state at the EOS token; text_embeds [B, projection_dim]
    is text_projection(pooled_output), None without projection; prompt_embeds [B, L, D] is
    final_layer_norm(hidden_states[-(clip_skip + 1)]), what diffusers' `encode_prompt(clip_skip=...)`
    gives the U-Net (equal to last_hidden_state for clip_skip 0)."""

    last_hidden_state: Array
    hidden_states: tuple[Array, ...]
    pooled_output: Array
    text_embeds: Array | None
    prompt_embeds: Array


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (q_proj, k_proj, v_proj, out_proj with biases, scale head_dim^-½);
    `mask` [B, L] bool marks the keys that may be attended to."""

    num_heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        b, length, width = x.shape
        head_dim = width // self.num_heads
        q, k, v = (
            nn.Dense(width, dtype=self.dtype, name=name)(x).reshape(b, length, self.num_heads, head_dim)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        h = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], is_causal=True, implementation=None)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(h.reshape(b, length, width))


class MLP(nn.Module):
    """fc2(act(fc1(x))), fc1 to `intermediate_size`, fc2 back to the input width."""

    intermediate_size: int
    hidden_act: str
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(ACTIVATIONS[self.hidden_act](h))


class EncoderLayer(nn.Module):
    """x + self_attn(layer_norm1(x)), then + mlp(layer_norm2(·)); the residual stream stays float32."""

    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32, name=name)  # noqa: E731
        x = x + SelfAttention(self.num_heads, self.dtype, name="self_attn")(norm("layer_norm1")(x), mask)
        h = MLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(norm("layer_norm2")(x))
        return x + h.astype(jnp.float32)


class Embeddings(nn.Module):
    """ids [B, L] -> token_embedding(ids) + position_embedding(0..L-1), float32 [B, L, D]."""

    vocab_size: int
    max_position_embeddings: int
    hidden_size: int

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        init = nn.initializers.normal(0.02)
        tokens = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init, name="token_embedding")
        positions = nn.Embed(
            self.max_position_embeddings, self.hidden_size, embedding_init=init, name="position_embedding"
        )
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[1]))[None]


class Encoder(nn.Module):
    """`layers_{i}` EncoderLayers; returns [x, output of layer 0, ..., output of the last layer]."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Any
    remat: bool

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> list[Array]:
        layer_class = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        hidden_states = [x]
        for i in range(self.num_layers):
            layer = layer_class(
                self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps, self.dtype,
                name=f"layers_{i}",
            )  # fmt: skip
            hidden_states.append(layer(hidden_states[-1], mask))
        return hidden_states


class CLIPTextTransformer(nn.Module):
    """input_ids [B, L] int -> CLIPTextOutput. Build it with `create_clip_text(config)`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    projection_dim: int | None = None
    dtype: str = "float32"
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *, clip_skip: int = 0) -> CLIPTextOutput:
        """input_ids [B, L] int; attention_mask [B, L] (1 = attend, 0 = padding; None = all ones) on top of
        the causal mask; clip_skip in 0..num_hidden_layers picks the layer of `prompt_embeds`."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise UsageError(f"input_ids must be an int array [B, L], got {input_ids.dtype} {input_ids.shape}")
        length = input_ids.shape[1]
        if length > self.max_position_embeddings:
            raise UsageError(f"input_ids length {length} > max_position_embeddings={self.max_position_embeddings}")
        if not isinstance(clip_skip, int) or not 0 <= clip_skip <= self.num_hidden_layers:
            raise UsageError(f"clip_skip={clip_skip!r} must be an int in 0..{self.num_hidden_layers}")
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        x = Embeddings(self.vocab_size, self.max_position_embeddings, self.hidden_size, name="embeddings")(input_ids)
        hidden_states = Encoder(
            self.num_hidden_layers, self.num_attention_heads, self.intermediate_size, self.hidden_act,
            self.layer_norm_eps, jnp.dtype(self.dtype), self.remat, name="encoder",
        )(x, mask)  # fmt: skip
        final_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32, name="final_layer_norm")
        last = final_norm(hidden_states[-1])
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos_positions = jnp.argmax(input_ids, axis=-1)
        else:  # the first EOS (padding may repeat it)
            eos_positions = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_positions[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if self.projection_dim is not None:
            dtype = jnp.dtype(self.dtype)
            projection = nn.Dense(self.projection_dim, use_bias=False, dtype=dtype, name="text_projection")
            text_embeds = projection(pooled).astype(jnp.float32)
        prompt_embeds = last if clip_skip == 0 else final_norm(hidden_states[-(clip_skip + 1)])
        return CLIPTextOutput(last, tuple(hidden_states), pooled, text_embeds, prompt_embeds)


def create_clip_text(config: ml_collections.ConfigDict) -> CLIPTextTransformer:
    """The module of a `clip_text_config` ConfigDict."""
    return CLIPTextTransformer(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act,
        layer_norm_eps=float(config.layer_norm_eps),
        eos_token_id=config.eos_token_id,
        projection_dim=config.projection_dim if config.with_projection else None,
        dtype=config.dtype,
        remat=config.remat,
    )
