"""Inference with parameters sharded over devices, and per-device memory estimates of the networks of the SD3 / Flux
pipelines (the MMDiT, Flux's transformer, T5's and CLIP's text encoders, the VAE).

Parameters are split by the training FSDP rule (`jaxdiff.sharding.state_sharding`) on a mesh whose "fsdp" axis
spans the devices: a leaf of at least `min_size` elements is split along its largest dimension divisible by the
device count, smaller leaves are replicated. `shard_params` places a host (NumPy) or device tree leaf by leaf, each
device receiving only its slice; `sharded_forward` runs `model.apply` under jit on such parameters with the inputs
replicated or split along their batch axis. The compiler gathers each weight where it is used, so the result is
the unsharded forward's up to float rounding.

`estimate_memory` gives the bytes one device holds in one forward, from shapes alone (`jax.eval_shape`, nothing
allocated): the parameters as the rule splits them (a replicated leaf counts in full on every device), stored in
the compute dtype (parameters cast for inference), the inputs, and the activation peak of the largest block at the
forward's token count. The peak of a transformer block is its float32 residual stream (input and output) plus the
larger of its attention temporaries (normed input, q, k, v and output in the compute dtype, and with the XLA
attention the float32 logits, their float32 exponentials and the probabilities in the compute dtype, [B, heads,
S, S]; cuDNN's flash attention keeps no S×S array; on the CPU backend jaxdiff takes one head and a block of
queries at a time, `jaxdiff.models.layers.multi_head_attention`, so XLA:CPU holds less than this estimate of an
accelerator's) and its MLP temporaries (input and output, hidden activation before and after the nonlinearity;
three hidden arrays for T5's gated MLP). Flux's single-stream block holds its attention and its MLP at once. With
several devices the weights of one block are gathered in full while it runs.
The VAE's decode: the larger of its mid-block attention at latent resolution and four float32 activations at full
resolution with the first block's width. With `batch_sharded` each device holds batch / devices rows of every
activation (FSDP); with replicated inputs the whole batch's activations are counted on every device, an upper
bound: XLA's partitioner may instead split activations along the sharded weights' axes (measured on 8 CPU devices:
0.13-0.36 of the estimate). `compiled_memory` reads XLA's own figure (`memory_analysis`) for the compiled forward,
to check the estimate against.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from jaxdiff import sharding
from jaxdiff.checks import is_int, require_choice
from jaxdiff.errors import UsageError
from jaxdiff.models import flux, mmdit
from jaxdiff.models.autoencoder import AutoencoderKL
from jaxdiff.models.clip_text import CLIPTextTransformer
from jaxdiff.models.dit import COMPUTE_DTYPES
from jaxdiff.models.t5_encoder import T5Encoder
from jaxdiff.xla_options import inference_jit

FLOAT32_BYTES = 4
SD3_TEXT_TOKENS = 77 + 256  # CLIP's 77 tokens joined with T5's 256 (SD3 pipelines' max_sequence_length)
FLUX_TEXT_TOKENS = 512  # T5 tokens (Flux.1-dev's max_sequence_length)
LATENT_FACTOR = 8  # the SD3 / Flux VAEs' downsampling: pixels per latent along an axis
VAE_FULL_RESOLUTION_COPIES = 4  # float32 arrays at full resolution alive at once in the decoder's last blocks


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one forward: `parameters` (the count, whole network), `param_bytes` (this device's
    share under the sharding rule), `input_bytes`, `gathered_bytes` (one block's weights gathered in full, 0 on one
    device), `activation_bytes` (the peak of the temporaries) and their sum `total_bytes`."""

    parameters: int
    param_bytes: int
    input_bytes: int
    gathered_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.input_bytes + self.gathered_bytes + self.activation_bytes


def inference_mesh(devices: int | None = None) -> Mesh:
    """`jaxdiff.sharding.make_mesh` with the "fsdp" axis over all devices (a (1, N) mesh); `devices`, when given,
    must equal the device count."""
    count = jax.device_count()
    if devices is not None and devices != count:
        raise UsageError(f"devices={devices!r}: this process sees {count} devices")
    return sharding.make_mesh(count)


def abstract_mesh(devices: int) -> AbstractMesh:
    """The (1, devices) ("data", "fsdp") mesh of `inference_mesh` without devices, for shapes and estimates."""
    if not is_int(devices, numpy=False) or devices < 1:
        raise UsageError(f"devices={devices!r} must be a positive integer")
    return AbstractMesh((1, devices), (sharding.DATA_AXIS, sharding.FSDP_AXIS),
                        axis_types=(AxisType.Auto, AxisType.Auto))  # fmt: skip


def shard_params(params: Any, mesh: Mesh, *, dtype: Any = None,
                 min_size: int = sharding.DEFAULT_MIN_SHARDED_SIZE) -> Any:  # fmt: skip
    """The parameter tree (NumPy or jax arrays) placed on `mesh` by `state_sharding`'s rule, one leaf at a time
    (`jax.device_put` with the leaf's NamedSharding sends each device its slice; no device holds a whole tree),
    each leaf cast to `dtype` when given (on the host for NumPy leaves)."""
    shardings = sharding.state_sharding(mesh, params, min_size=min_size)

    def place(leaf, leaf_sharding):
        if dtype is not None:
            leaf = leaf.astype(dtype) if isinstance(leaf, jax.Array) else np.asarray(leaf).astype(jnp.dtype(dtype))
        return jax.device_put(leaf, leaf_sharding)

    return jax.tree.map(place, params, shardings)


def sharded_forward(model: nn.Module, mesh: Mesh, *, batch_argnums: Sequence[int] = (),
                    method: str | None = None) -> Callable[..., Any]:  # fmt: skip
    """forward(params, *inputs) = model.apply({"params": params}, *inputs) (or its `method`), jitted, with params as
    placed (`shard_params`); input i split along its leading (batch) axis over all the mesh's devices when i is in
    `batch_argnums` (its batch must divide evenly), otherwise replicated; None inputs stay None."""
    apply = inference_jit(lambda params, *inputs: model.apply({"params": params}, *inputs, method=method))

    def forward(params: Any, *inputs: Any) -> Any:
        placed = [
            None if x is None else jax.device_put(
                x, sharding.batch_sharding(mesh) if i in batch_argnums else sharding.replicated_sharding(mesh))
            for i, x in enumerate(inputs)
        ]  # fmt: skip
        return apply(params, *placed)

    return forward


def init_inputs(model: nn.Module) -> tuple:
    """The smallest inputs `model.init` traces with (shapes only matter), for `param_shapes`."""
    if isinstance(model, mmdit.MMDiT):
        return mmdit.example_inputs(model, size=model.patch_size)
    if isinstance(model, flux.FluxTransformer):
        return flux.example_inputs(model)
    if isinstance(model, (T5Encoder, CLIPTextTransformer)):
        return (jax.ShapeDtypeStruct((1, 1), jnp.int32),)
    if isinstance(model, AutoencoderKL):
        side = 2 ** (len(model.block_out_channels) - 1)
        return (jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32),)
    raise UsageError(f"no memory estimate for {type(model).__name__}; known: MMDiT, FluxTransformer, T5Encoder, "
                     "CLIPTextTransformer, AutoencoderKL")  # fmt: skip


def param_shapes(model: nn.Module, dtype: Any = jnp.float32) -> Any:
    """The params tree of `model` as `jax.ShapeDtypeStruct`s in `dtype` (`jax.eval_shape` of init; the attention
    implementation, which sets no parameter, traced as XLA's so that cuDNN's is counted off a GPU too)."""
    traced = model.clone(attention="auto") if isinstance(model, (mmdit.MMDiT, flux.FluxTransformer)) else model
    shapes = jax.eval_shape(traced.init, jax.random.PRNGKey(0), *init_inputs(model))["params"]
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype)), shapes)


def forward_inputs(model: nn.Module, *, batch: int, height: int, width: int, text_tokens: int) -> tuple:
    """Abstract inputs (`jax.ShapeDtypeStruct`, float32 / int32) of one forward: for the transformers the latents of
    a height×width image (`LATENT_FACTOR`) with `text_tokens` text tokens; for the text encoders
    `text_tokens` token ids; for the VAE its decode's latents."""
    abstract = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    if isinstance(model, mmdit.MMDiT):
        return (abstract(batch, height // LATENT_FACTOR, width // LATENT_FACTOR, model.in_channels), abstract(batch),
                abstract(batch, text_tokens, model.joint_attention_dim), abstract(batch, model.pooled_projection_dim))
    if isinstance(model, flux.FluxTransformer):
        tokens, axes = flux_image_tokens(height, width), len(model.axes_dims_rope)
        return (abstract(batch, tokens, model.in_channels), abstract(batch),
                abstract(batch, text_tokens, model.joint_attention_dim), abstract(batch, model.pooled_projection_dim),
                abstract(tokens, axes), abstract(text_tokens, axes),
                abstract(batch) if model.guidance_embeds else None)  # fmt: skip
    if isinstance(model, (T5Encoder, CLIPTextTransformer)):
        return (abstract(batch, text_tokens, dtype=jnp.int32),)
    factor = 2 ** (len(model.block_out_channels) - 1)
    return (abstract(batch, height // factor, width // factor, model.latent_channels),)


def flux_image_tokens(height: int, width: int) -> int:
    """Flux's packed latent tokens of a height×width image: 8× latents packed 2×2."""
    return (height // (LATENT_FACTOR * flux.PACK)) * (width // (LATENT_FACTOR * flux.PACK))


def batch_argnums(model: nn.Module) -> tuple[int, ...]:
    """The positions of `forward_inputs(model, ...)` that have a leading batch axis (all but Flux's img_ids and
    txt_ids), for `sharded_forward`."""
    if isinstance(model, flux.FluxTransformer):
        return (0, 1, 2, 3, 6)
    if isinstance(model, mmdit.MMDiT):
        return (0, 1, 2, 3)
    return (0,)


def default_text_tokens(model: nn.Module) -> int:
    """The text length a pipeline gives `model`: SD3's 77 + 256, Flux's 512, CLIP's max_position_embeddings,
    T5's 512 (the longest of the two pipelines); unused by the VAE."""
    if isinstance(model, CLIPTextTransformer):
        return model.max_position_embeddings
    return SD3_TEXT_TOKENS if isinstance(model, mmdit.MMDiT) else FLUX_TEXT_TOKENS


def _block_bytes(batch: int, tokens: int, width: int, heads: int, hidden: int, itemsize: int, quadratic: bool, *,
                 hidden_arrays: int = 2, parallel: bool = False, bias_bytes: int = 0) -> int:  # fmt: skip
    """The activation peak of one transformer block (see the module doc) over `tokens` tokens; `parallel`: attention
    and MLP alive together (Flux's single block); `bias_bytes`: an attention bias carried through every block."""
    streams = 2 * batch * tokens * width * FLOAT32_BYTES
    attention = 5 * batch * tokens * width * itemsize
    if quadratic:
        attention += batch * heads * tokens * tokens * (2 * FLOAT32_BYTES + itemsize)
    mlp = 2 * batch * tokens * width * itemsize + hidden_arrays * batch * tokens * hidden * itemsize
    return streams + bias_bytes + (attention + mlp if parallel else max(attention, mlp))


def activation_bytes(model: nn.Module, *, batch: int, height: int, width: int, text_tokens: int,
                     dtype: Any) -> int:  # fmt: skip
    """The activation peak of one forward of `model` in the compute dtype `dtype` (see the module doc)."""
    itemsize = jnp.dtype(dtype).itemsize
    if isinstance(model, (mmdit.MMDiT, flux.FluxTransformer)):
        quadratic = model.attention != "cudnn"
        d, heads = model.inner_dim, model.num_attention_heads
        if isinstance(model, mmdit.MMDiT):
            p = LATENT_FACTOR * model.patch_size
            tokens = (height // p) * (width // p) + text_tokens
        else:
            tokens = flux_image_tokens(height, width) + text_tokens
        peak = _block_bytes(batch, tokens, d, heads, mmdit.MLP_RATIO * d, itemsize, quadratic)
        if isinstance(model, flux.FluxTransformer) and model.num_single_layers:
            single = _block_bytes(batch, tokens, d, heads, mmdit.MLP_RATIO * d, itemsize, quadratic, parallel=True)
            peak = max(peak, single)
        return peak
    if isinstance(model, T5Encoder):
        bias = model.num_heads * text_tokens**2 * FLOAT32_BYTES
        return _block_bytes(batch, text_tokens, model.d_model, model.num_heads, model.d_ff, itemsize, True,
                            hidden_arrays=3 if model.gated else 2, bias_bytes=bias)  # fmt: skip
    if isinstance(model, CLIPTextTransformer):
        return _block_bytes(batch, text_tokens, model.hidden_size, model.num_attention_heads, model.intermediate_size,
                            itemsize, True)  # fmt: skip
    factor = 2 ** (len(model.block_out_channels) - 1)
    latent_tokens = (height // factor) * (width // factor)
    mid_width = model.block_out_channels[-1]
    attention = 5 * batch * latent_tokens * mid_width * itemsize
    if model.mid_block_add_attention:
        attention += batch * latent_tokens**2 * (2 * FLOAT32_BYTES + itemsize)
    full = VAE_FULL_RESOLUTION_COPIES * batch * height * width * model.block_out_channels[0] * FLOAT32_BYTES
    return max(attention, full)


def _nbytes(leaf: Any) -> int:
    return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize


def _largest_block_bytes(shapes: Any) -> int:
    """Bytes of the largest top-level module whose name ends in an index (a block), or of the largest leaf."""
    flat = flax.traverse_util.flatten_dict(shapes)
    blocks: dict[str, int] = {}
    for path, leaf in flat.items():
        key = "/".join(path[:2]) if path[0] in ("encoder", "decoder") else path[0]
        blocks[key] = blocks.get(key, 0) + _nbytes(leaf)
    indexed = [size for name, size in blocks.items() if name.rsplit("_", 1)[-1].isdigit()]
    return max(indexed or [max(_nbytes(leaf) for leaf in flat.values())])


def estimate_memory(model: nn.Module, *, batch: int = 1, height: int = 1024, width: int = 1024,
                    text_tokens: int | None = None, dtype: Any = "bfloat16", devices: int = 1,
                    batch_sharded: bool = False,
                    min_size: int = sharding.DEFAULT_MIN_SHARDED_SIZE) -> MemoryEstimate:  # fmt: skip
    """Per-device bytes of one forward of `model` (an MMDiT, FluxTransformer, T5Encoder, CLIPTextTransformer or
    AutoencoderKL; the VAE's decode) at batch × height × width pixels and `text_tokens` (default
    `default_text_tokens`), parameters stored and computed in `dtype` ("float32" | "bfloat16"), split over
    `devices` by `state_sharding`'s rule, the inputs replicated or, with `batch_sharded`, split along their batch
    axis (which `devices` must divide); see the module doc. Nothing is allocated."""
    require_choice("dtype", str(jnp.dtype(dtype)), COMPUTE_DTYPES)
    for name, value in (("batch", batch), ("height", height), ("width", width)):
        if not is_int(value, numpy=False) or value < 1:
            raise UsageError(f"{name}={value!r} must be a positive integer")
    mesh = abstract_mesh(devices)
    if batch_sharded and batch % devices:
        raise UsageError(f"batch={batch} does not split evenly over {devices} devices (batch_sharded)")
    rows = batch // devices if batch_sharded else batch
    text_tokens = default_text_tokens(model) if text_tokens is None else text_tokens
    shapes = param_shapes(model, dtype)
    shardings = sharding.state_sharding(mesh, shapes, min_size=min_size)
    per_device = [
        math.prod(s.shard_shape(leaf.shape)) * jnp.dtype(dtype).itemsize
        for leaf, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings))
    ]
    inputs = forward_inputs(model, batch=rows, height=height, width=width, text_tokens=text_tokens)
    return MemoryEstimate(
        parameters=sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)),
        param_bytes=sum(per_device),
        input_bytes=sum(_nbytes(x) for x in jax.tree.leaves(inputs)),
        gathered_bytes=_largest_block_bytes(shapes) if devices > 1 else 0,
        activation_bytes=activation_bytes(model, batch=rows, height=height, width=width, text_tokens=text_tokens,
                                          dtype=dtype),  # fmt: skip
    )


def compiled_memory(model: nn.Module, mesh: Mesh, *, batch: int = 1, height: int = 1024, width: int = 1024,
                    text_tokens: int | None = None, dtype: Any = "float32", batch_sharded: bool = False,
                    min_size: int = sharding.DEFAULT_MIN_SHARDED_SIZE) -> dict[str, int]:  # fmt: skip
    """XLA's per-device bytes of the forward `estimate_memory` describes, compiled on `mesh` (parameters abstract in
    `dtype`, sharded by the rule; inputs replicated, or split along their batch axis with `batch_sharded`):
    "argument", "output", "temp", "alias" and "total" = argument + output + temp − alias
    (`Compiled.memory_analysis`)."""
    text_tokens = default_text_tokens(model) if text_tokens is None else text_tokens
    shapes = param_shapes(model, dtype)
    param_shardings = sharding.state_sharding(mesh, shapes, min_size=min_size)
    inputs = forward_inputs(model, batch=batch, height=height, width=width, text_tokens=text_tokens)
    method = "decode" if isinstance(model, AutoencoderKL) else None
    split = batch_argnums(model) if batch_sharded else ()
    input_shardings = [None if x is None else sharding.batch_sharding(mesh) if i in split
                       else sharding.replicated_sharding(mesh) for i, x in enumerate(inputs)]  # fmt: skip
    apply = inference_jit(lambda params, *args: model.apply({"params": params}, *args, method=method),
                          in_shardings=(param_shardings, *input_shardings))
    analysis = apply.lower(shapes, *inputs).compile().memory_analysis()
    sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes")) for name in ("argument", "output", "temp", "alias")}
    return {**sizes, "total": sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]}
