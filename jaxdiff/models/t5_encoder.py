"""T5's encoder (transformers `T5EncoderModel`: T5 v1.1 / T5-XXL as SD3 and Flux use it, and the original T5) as a
Flax Linen module.

Token ids [B, L] -> the shared token embedding (no position embedding) -> `num_layers` pre-norm blocks, each
x + SelfAttention(layer_norm(x)) then x + DenseReluDense(layer_norm(x)) -> final_layer_norm -> [B, L, d_model].

- Layer norms are T5's RMS norm: x / sqrt(mean(x²) + layer_norm_epsilon) · scale, no mean subtracted, no bias.
- Self-attention has `num_heads` heads of width `d_kv` (q, k, v, o without biases) and does not scale its logits by
  d_kv^-½; a relative position bias [1, num_heads, L, L] is added to them instead. The bias is a learned table
  [relative_attention_num_buckets, num_heads] (in the first block only) indexed by `relative_position_bucket(key
  position - query position)`, computed once in the first block and added by every block, as T5 does.
- `feed_forward_proj` "gated-gelu" (v1.1): wo(gelu_tanh(wi_0(x)) · wi_1(x)); "relu" (original T5): wo(relu(wi(x))).
- Dropout is absent (inference only).

The parameter tree mirrors transformers' names with `.{i}` written `_{i}`:

    shared/embedding [vocab_size, d_model]
    encoder/block_{i}/layer_0/{layer_norm/scale [d_model], SelfAttention/{q, k, v, o}/kernel}
    encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding [relative_attention_num_buckets, num_heads]
    encoder/block_{i}/layer_1/{layer_norm/scale, DenseReluDense/{wi_0, wi_1, wo}/kernel}   ({wi, wo} for "relu")
    encoder/final_layer_norm/scale

Dense kernels are [in, out]; q, k, v are [d_model, num_heads · d_kv], o is [num_heads · d_kv, d_model].

Precision: parameters are float32. `dtype` ("float32" | "bfloat16") is the compute dtype of every dense layer (q, k,
v, o, wi_0, wi_1 / wi, wo, their inputs cast to it) and of the attention's value product; the token embedding, the
residual stream, the RMS norms (transformers also keeps T5's norm in float32), the attention logits with their
position bias and mask, and the softmax are float32, and so is the output. (transformers, in half precision, also
keeps `wo`'s weight and input float32 against float16 overflow; in bfloat16 here `wo` computes in bfloat16.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.checks import is_int, is_real, unsupported
from jaxdiff.errors import ConfigError, UsageError

_unsupported = functools.partial(unsupported, "T5 encoder config")

Array = jax.Array

COMPUTE_DTYPES = ("float32", "bfloat16")
# feed_forward_proj -> (gated, activation); transformers derives `dense_act_fn` and `is_gated_act` from it.
FEED_FORWARD = {
    "gated-gelu": (True, "gelu_new"),
    "relu": (False, "relu"),
}
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
# transformers' T5Config defaults, used for keys a config.json omits.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}
# Keys of a T5 config.json that change nothing in the encoder's forward pass, with why.
ACCEPTED_NO_OPS = {
    "_name_or_path": "provenance",
    "transformers_version": "provenance",
    "torch_dtype": "the stored weights' dtype; weights are read as float32",
    "dtype": "the stored weights' dtype (not the `dtype` option); weights are read as float32",
    "dropout_rate": "dropout is absent at inference",
    "classifier_dropout": "classification head only",
    "initializer_factor": "initialisation only",
    "use_cache": "decoder only",
    "is_encoder_decoder": "the full model's layout; only the encoder is built",
    "num_decoder_layers": "decoder only",
    "decoder_start_token_id": "decoder only",
    "output_past": "decoder only",
    "scale_decoder_outputs": "decoder only",
    "tie_word_embeddings": "the encoder's token embedding is always `shared`",
    "bos_token_id": "tokenizer settings; the encoder takes token ids",
    "eos_token_id": "tokenizer settings; the encoder takes token ids",
    "pad_token_id": "tokenizer settings; the encoder takes token ids",
    "n_positions": "relative positions set no length limit",
    "task_specific_params": "generation settings",
    "gradient_checkpointing": "training setting; see the `remat` option",
}
ARCHITECTURES = ("T5EncoderModel",)
OPTION_DEFAULTS = {"dtype": "float32", "remat": False}
MIN_BUCKETS = 4  # bidirectional: half the buckets per direction, half of those exact


def t5_encoder_config(settings: dict, **options: Any) -> ml_collections.ConfigDict:
    """The ConfigDict of a transformers T5 `config.json` dict (omitted keys take transformers' defaults): the
    model's keys plus `gated` and `activation` (from `feed_forward_proj`) and our options `dtype` ("float32" |
    "bfloat16") and `remat` (bool). Every key is honoured, accepted as a no-op (`ACCEPTED_NO_OPS`) or refused:
    a ConfigError (a ValueError) naming it."""
    if settings.get("model_type", "t5") != "t5":
        raise _unsupported("model_type", settings["model_type"], "'t5'")
    architectures = settings.get("architectures") or list(ARCHITECTURES)
    if architectures != list(ARCHITECTURES):
        raise _unsupported("architectures", architectures, f"{list(ARCHITECTURES)} (a folder saved by T5EncoderModel)")
    if settings.get("is_decoder", False) is not False:
        raise _unsupported("is_decoder", settings["is_decoder"], "false (the encoder)")
    known = {*TRANSFORMERS_DEFAULTS, *ACCEPTED_NO_OPS, "model_type", "architectures", "is_decoder", "dense_act_fn",
             "is_gated_act"}  # fmt: skip
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"T5 encoder config: unknown keys {unknown}; jaxdiff cannot honour them")
    bad_options = sorted(set(options) - set(OPTION_DEFAULTS))
    if bad_options:
        raise ConfigError(f"T5 encoder config: unknown options {bad_options}; allowed: {sorted(OPTION_DEFAULTS)}")
    c = {key: settings.get(key, default) for key, default in TRANSFORMERS_DEFAULTS.items()}
    c.update({**OPTION_DEFAULTS, **options})

    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        if not is_int(c[key], numpy=False) or c[key] < 1:
            raise _unsupported(key, c[key], "a positive int")
    buckets, distance = c["relative_attention_num_buckets"], c["relative_attention_max_distance"]
    if not is_int(buckets, numpy=False) or buckets < MIN_BUCKETS:
        raise _unsupported("relative_attention_num_buckets", buckets, f"an int >= {MIN_BUCKETS}")
    if not is_int(distance, numpy=False) or distance <= buckets // 4:
        raise _unsupported("relative_attention_max_distance", distance, f"an int > num_buckets // 4 = {buckets // 4}")
    if not is_real(c["layer_norm_epsilon"], finite=True, numpy=False) or not c["layer_norm_epsilon"] > 0:
        raise _unsupported("layer_norm_epsilon", c["layer_norm_epsilon"], "a positive number")
    if c["feed_forward_proj"] not in FEED_FORWARD:
        raise _unsupported("feed_forward_proj", c["feed_forward_proj"], " or ".join(map(repr, FEED_FORWARD)))
    c["gated"], c["activation"] = FEED_FORWARD[c["feed_forward_proj"]]
    for key, derived in (("dense_act_fn", c["activation"]), ("is_gated_act", c["gated"])):
        if settings.get(key, derived) != derived:
            raise _unsupported(key, settings[key], f"{derived!r} (what feed_forward_proj={c['feed_forward_proj']!r} "
                                                   "implies)")  # fmt: skip
    if c["dtype"] not in COMPUTE_DTYPES:
        raise _unsupported("dtype", c["dtype"], " or ".join(map(repr, COMPUTE_DTYPES)))
    if not isinstance(c["remat"], bool):
        raise _unsupported("remat", c["remat"], "true or false")
    return ml_collections.ConfigDict(c)


def relative_position_bucket(relative_position: Array, *, num_buckets: int, max_distance: int) -> Array:
    """T5's bidirectional bucket [same shape, int32] of each relative position (key position − query position,
    int). Half the buckets are for positive positions (offset num_buckets // 2); within a half of n buckets, |p| <
    n // 2 is its own bucket and larger |p| fall into n // 2 + ⌊log(|p| / (n // 2)) / log(max_distance / (n // 2))
    · (n − n // 2)⌋, capped at n − 1 (every |p| >= max_distance shares the last bucket). Computed in float32, as
    transformers and Mesh TensorFlow do."""
    half = num_buckets // 2
    exact = half // 2
    offset = jnp.where(relative_position > 0, half, 0)
    distance = jnp.abs(relative_position)
    scaled = jnp.log(jnp.maximum(distance, exact).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    large = jnp.minimum(exact + (scaled * (half - exact)).astype(jnp.int32), half - 1)
    return (offset + jnp.where(distance < exact, distance, large)).astype(jnp.int32)


def rms_norm(epsilon: float, name: str) -> nn.RMSNorm:
    """T5's layer norm: x / sqrt(mean(x²) + epsilon) · scale in float32, no mean, no bias."""
    return nn.RMSNorm(epsilon=epsilon, dtype=jnp.float32, name=name)


class SelfAttention(nn.Module):
    """T5 self-attention: x [B, L, d_model] float32, mask [B, L] bool (the keys that may be attended to),
    position_bias [1, num_heads, L, L] float32 or None -> (output [B, L, d_model] in `dtype`, the position bias
    used). With `has_relative_attention_bias` (the first block) the bias is computed here from its table."""

    num_heads: int
    d_kv: int
    num_buckets: int
    max_distance: int
    has_relative_attention_bias: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask: Array, position_bias: Array | None) -> tuple[Array, Array]:
        b, length, width = x.shape
        inner = self.num_heads * self.d_kv
        q, k, v = (
            nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(x).reshape(b, length, -1, self.d_kv)
            for name in ("q", "k", "v")
        )
        if self.has_relative_attention_bias:
            positions = jnp.arange(length)
            buckets = relative_position_bucket(
                positions[None, :] - positions[:, None], num_buckets=self.num_buckets, max_distance=self.max_distance
            )  # [L queries, L keys]
            table = nn.Embed(self.num_buckets, self.num_heads, name="relative_attention_bias")
            position_bias = table(buckets).transpose(2, 0, 1)[None]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + position_bias
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, inner)
        return nn.Dense(width, use_bias=False, dtype=self.dtype, name="o")(h), position_bias


class DenseReluDense(nn.Module):
    """T5's feed-forward [B, L, d_model] -> [B, L, d_model]: wo(act(wi_0(x)) · wi_1(x)) when `gated`, else
    wo(act(wi(x))); wi* to d_ff, no biases."""

    d_ff: int
    gated: bool
    activation: str
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        act = ACTIVATIONS[self.activation]
        if self.gated:
            h = act(dense(self.d_ff, "wi_0")(x)) * dense(self.d_ff, "wi_1")(x)
        else:
            h = act(dense(self.d_ff, "wi")(x))
        return dense(x.shape[-1], "wo")(h)


class AttentionLayer(nn.Module):
    """`layer_0` of a block: x + SelfAttention(layer_norm(x)); returns (x, position_bias)."""

    attention: dict
    layer_norm_epsilon: float

    @nn.compact
    def __call__(self, x: Array, mask: Array, position_bias: Array | None) -> tuple[Array, Array]:
        normed = rms_norm(self.layer_norm_epsilon, "layer_norm")(x)
        h, position_bias = SelfAttention(**self.attention, name="SelfAttention")(normed, mask, position_bias)
        return x + h.astype(jnp.float32), position_bias


class FeedForwardLayer(nn.Module):
    """`layer_1` of a block: x + DenseReluDense(layer_norm(x))."""

    feed_forward: dict
    layer_norm_epsilon: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        normed = rms_norm(self.layer_norm_epsilon, "layer_norm")(x)
        return x + DenseReluDense(**self.feed_forward, name="DenseReluDense")(normed).astype(jnp.float32)


class Block(nn.Module):
    """One T5 encoder block: x [B, L, d_model] float32 -> (x, the position bias it used)."""

    attention: dict
    feed_forward: dict
    layer_norm_epsilon: float

    @nn.compact
    def __call__(self, x: Array, mask: Array, position_bias: Array | None) -> tuple[Array, Array]:
        attention = AttentionLayer(self.attention, self.layer_norm_epsilon, name="layer_0")
        x, position_bias = attention(x, mask, position_bias)
        return FeedForwardLayer(self.feed_forward, self.layer_norm_epsilon, name="layer_1")(x), position_bias


class Stack(nn.Module):
    """The `encoder`: `block_{i}` Blocks (block_0 holding the relative position bias table), then
    final_layer_norm; x [B, L, d_model] float32, mask [B, L] bool -> [B, L, d_model] float32."""

    num_layers: int
    attention: dict
    feed_forward: dict
    layer_norm_epsilon: float
    remat: bool

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        block_class = nn.remat(Block) if self.remat else Block
        position_bias = None
        for i in range(self.num_layers):
            attention = {**self.attention, "has_relative_attention_bias": i == 0}
            block = block_class(attention, self.feed_forward, self.layer_norm_epsilon, name=f"block_{i}")
            x, position_bias = block(x, mask, position_bias)
        return rms_norm(self.layer_norm_epsilon, "final_layer_norm")(x)


class T5Encoder(nn.Module):
    """input_ids [B, L] int (any L: positions are relative) -> last hidden state [B, L, d_model] float32 after the
    final layer norm (transformers' `last_hidden_state`). Build it with `create_t5_encoder(config)`."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    gated: bool
    activation: str
    dtype: str = "float32"
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """input_ids [B, L] int; attention_mask [B, L] (1 = a token, 0 = padding that no token attends to; None =
        all ones: SD3 and Flux encode their padded prompts without a mask). Padding positions still get outputs."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise UsageError(f"input_ids must be an int array [B, L], got {input_ids.dtype} {input_ids.shape}")
        if attention_mask is None:
            mask = jnp.ones(input_ids.shape, bool)
        else:
            mask = jnp.asarray(attention_mask)
            if mask.shape != input_ids.shape:
                raise UsageError(f"attention_mask shape {mask.shape} must equal input_ids shape {input_ids.shape}")
            mask = mask.astype(bool)
        dtype = jnp.dtype(self.dtype)
        shared = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(1.0), name="shared")
        x = shared(input_ids)
        attention = dict(
            num_heads=self.num_heads, d_kv=self.d_kv, num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance, dtype=dtype,
        )  # fmt: skip
        feed_forward = dict(d_ff=self.d_ff, gated=self.gated, activation=self.activation, dtype=dtype)
        stack = Stack(self.num_layers, attention, feed_forward, self.layer_norm_epsilon, self.remat, name="encoder")
        return stack(x, mask)


def create_t5_encoder(config: ml_collections.ConfigDict) -> T5Encoder:
    """The module of a `t5_encoder_config` ConfigDict (whose keys name every field of `T5Encoder`)."""
    fields = [f.name for f in dataclasses.fields(T5Encoder) if f.name not in ("parent", "name")]
    settings = {name: config[name] for name in fields}
    return T5Encoder(**{**settings, "layer_norm_epsilon": float(config.layer_norm_epsilon)})
