"""Building blocks of the DDPM U-Net and its diffusers `UNet2DModel` variants (Flax Linen).

Conventions: feature maps are NHWC; `temb` is the timestep embedding [B, E];
`dtype` is the compute dtype of convolutions, dense layers and attention
matmuls, while parameters stay float32 and GroupNorm statistics and the
attention softmax are computed in float32. Parameter names follow the
official DDPM TensorFlow code (`norm1`, `conv1`, `temb_proj`, `q`, `proj_out`, ...).
Every option defaults to the official DDPM behaviour.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import ConfigError
from jaxdiff.models import cpu_conv

Array = jax.Array

NUM_GROUPS = 32
GROUP_NORM_EPS = 1e-6
# The official code initialises "zero" layers with this scale instead of 0.
ZERO_INIT_SCALE = 1e-10


def mish(x: Array) -> Array:
    """x·tanh(softplus(x))."""
    return x * jnp.tanh(jax.nn.softplus(x))


# Activation names as diffusers spells them (`act_fn`); "silu" and "swish" are the same function.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": nn.swish,
    "swish": nn.swish,
    "mish": mish,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}
RESAMPLES = ("none", "down", "up")


def fan_avg_uniform(scale: float = 1.0) -> nn.initializers.Initializer:
    """`variance_scaling(scale, "fan_avg", "uniform")`: U(-l, l) with l = sqrt(3·scale / ((fan_in + fan_out) / 2))."""
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def timestep_embedding(t: Array, dim: int, *, flip_sin_to_cos: bool = False, freq_shift: int = 1) -> Array:
    """Sinusoidal embedding [B, dim] float32 of steps t [B] (0-based, used as raw numbers).

    half = dim // 2, freq_i = exp(-i·ln(10000) / (half - freq_shift)), output [sin(t·freq), cos(t·freq)],
    or [cos, sin] with flip_sin_to_cos. The defaults are the official DDPM embedding; diffusers'
    `UNet2DModel` defaults are flip_sin_to_cos=True, freq_shift=0.
    """
    if dim < 4 or dim % 2:
        raise ConfigError(f"timestep embedding dim={dim} must be even and at least 4")
    half = dim // 2
    if half - freq_shift <= 0:
        raise ConfigError(f"freq_shift={freq_shift} must be below half the embedding dim ({half})")
    freqs = np.exp(-np.arange(half, dtype=np.float64) * np.log(10000.0) / (half - freq_shift)).astype(np.float32)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    return jnp.concatenate(parts, axis=1)


def dense(features: int, dtype: Any, *, scale: float = 1.0, name: str) -> nn.Dense:
    """Dense (also used as the 1×1 "nin" layer over channels) with fan_avg-uniform kernel, zero bias."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=fan_avg_uniform(scale), name=name)


def conv3x3(
    features: int, dtype: Any, *, scale: float = 1.0, strides: int = 1, padding: Any = "SAME", name: str
) -> nn.Conv:
    """3×3 convolution, fan_avg-uniform kernel, zero bias; padding as `nn.Conv` takes it (default TF "SAME").

    Computed by `cpu_conv.conv_general_dilated`: XLA's convolution, on the CPU backend one GEMM for small outputs and
    Winograd's F(2×2, 3×3) for large maps (and with JAXDIFF_CPU_CONV_WGRAD=1 the shifted-GEMM weight gradient); same
    parameters, same values to rounding."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=fan_avg_uniform(scale),
        conv_general_dilated=cpu_conv.conv_general_dilated,
        name=name,
    )


def conv1x1(features: int, dtype: Any, *, name: str) -> nn.Conv:
    """1×1 convolution with flax's default initialisers (diffusers' `conv_shortcut`, `proj_in` / `proj_out`,
    `quant_conv`): a matmul over channels, which `cpu_conv` computes as one on the CPU backend."""
    return nn.Conv(features, (1, 1), dtype=dtype, param_dtype=jnp.float32,
                   conv_general_dilated=cpu_conv.conv_general_dilated, name=name)  # fmt: skip


def group_norm(x: Array, *, name: str, num_groups: int = NUM_GROUPS, eps: float = GROUP_NORM_EPS) -> Array:
    """GroupNorm (default 32 groups, eps 1e-6) computed in float32; returns float32.

    Call only inside a compact method: the layer becomes a submodule `name` of the caller.
    """
    norm = nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=jnp.float32, name=name)
    return norm(x.astype(jnp.float32))


def upsample_nearest(x: Array) -> Array:
    """[B,H,W,C] -> [B,2H,2W,C], each pixel repeated 2×2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: Array) -> Array:
    """[B,H,W,C] -> [B,H/2,W/2,C], mean of each 2×2 patch."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class TimestepEmbed(nn.Module):
    """t [B] -> Dense(4·ch)(swish(Dense(4·ch)(sinusoid(t, ch)))) [B, 4·ch]; params `dense0`, `dense1`."""

    ch: int
    dtype: Any = jnp.float32
    flip_sin_to_cos: bool = False
    freq_shift: int = 1

    @nn.compact
    def __call__(self, t: Array) -> Array:
        emb = timestep_embedding(t, self.ch, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        h = dense(4 * self.ch, self.dtype, name="dense0")(emb)
        return dense(4 * self.ch, self.dtype, name="dense1")(nn.swish(h))


class ResBlock(nn.Module):
    """x [B,H,W,C] -> [B,H',W',out_ch]: h = conv1(act(norm1(x))); h = act(norm2(h + temb_proj(act(temb))));
    h = conv2(dropout(h)); returns nin_shortcut(x) + h (shortcut only when C != out_ch).

    With scale_shift, temb_proj gives 2·out_ch channels (scale, shift) and the middle becomes
    act(norm2(h)·(1 + scale) + shift). resample "down"/"up" average-pools / nearest-upsamples both
    act(norm1(x)) and the shortcut input by 2 before conv1 (diffusers' ResnetBlock2D down/up).
    """

    out_ch: int
    dropout: float
    dtype: Any = jnp.float32
    num_groups: int = NUM_GROUPS
    eps: float = GROUP_NORM_EPS
    act: str = "silu"
    scale_shift: bool = False
    resample: str = "none"

    @nn.compact
    def __call__(self, x: Array, temb: Array, train: bool) -> Array:
        if self.resample not in RESAMPLES:
            raise ConfigError(f"ResBlock resample={self.resample!r} is not one of {RESAMPLES}")
        act = ACTIVATIONS[self.act]
        norm = lambda v, name: group_norm(v, name=name, num_groups=self.num_groups, eps=self.eps)  # noqa: E731
        h = act(norm(x, "norm1"))
        if self.resample != "none":
            resample = avg_pool2 if self.resample == "down" else upsample_nearest
            x, h = resample(x), resample(h)
        h = conv3x3(self.out_ch, self.dtype, name="conv1")(h)
        width = 2 * self.out_ch if self.scale_shift else self.out_ch
        emb = dense(width, self.dtype, name="temb_proj")(act(temb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = norm(h, "norm2") * (1 + scale) + shift
        else:
            h = norm(h + emb, "norm2")
        h = nn.Dropout(self.dropout, deterministic=not train)(act(h))
        h = conv3x3(self.out_ch, self.dtype, scale=ZERO_INIT_SCALE, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = dense(self.out_ch, self.dtype, name="nin_shortcut")(x)
        return x + h


# Query rows per block of `multi_head_attention` on CPU; None: XLA's whole attention on CPU too (what an accelerator's
# XLA attention holds, e.g. to compare memory estimates with).
QUERY_CHUNK: int | None = 512
# The smallest score matrix of one head (queries × keys) that `multi_head_attention` computes one head at a time on
# CPU: below it the loop's per-head cost can outweigh what it saves (a DiT-XL/2 block's 256 tokens, 16 heads: 1.7x
# slower a head at a time; the tests' tiny networks).
CPU_HEAD_LOOP_MIN_SCORES = 512 * 512


def multi_head_attention(q: Array, k: Array, v: Array, query_chunk: int | None = None,
                         implementation: str | None = None) -> Array:  # fmt: skip
    """softmax(q·kᵀ / sqrt(D)) · v per head for q [B, N, heads, D] over k, v [B, M, heads, D]; returns
    [B, N, heads, D].

    Logits and softmax are float32 whatever the input dtype; the probabilities are cast to v's dtype for the
    product with v, whose dtype the output has. `jax.nn.dot_product_attention` runs it with `implementation`
    (None: the backend's choice; "cudnn": cuDNN's fused kernel). On the CPU backend with implementation None and
    N·M of at least CPU_HEAD_LOOP_MIN_SCORES it runs one head at a time instead (`jax.lax.map` over the B·heads
    pairs, each two 2-D matrix products), queries longer than `query_chunk` (None: QUERY_CHUNK, read at trace time)
    taken `query_chunk` rows at a time (the last block padded with zero queries whose rows are dropped): XLA:CPU
    runs the products batched over heads 2-4x slower than one head's and holds the whole [B, heads, N, M] score
    matrix (BUILD_NOTES.md, "Memory and loading"). With both chunk sizes None (`whole_attention`), the CPU computes
    the whole attention at once, as accelerators do.
    """
    query_chunk = QUERY_CHUNK if query_chunk is None else query_chunk
    scale = q.shape[-1] ** -0.5
    b, n, heads = q.shape[:3]
    whole = query_chunk is None or n * k.shape[1] < CPU_HEAD_LOOP_MIN_SCORES
    if whole or implementation is not None or jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)

    def one_head(queries: Array, keys: Array, values: Array) -> Array:  # [n, D], [M, D], [M, D_v] -> [n, D_v]
        logits = jnp.einsum("nd,md->nm", queries, keys, preferred_element_type=jnp.float32) * scale
        return jnp.dot(jax.nn.softmax(logits, axis=-1).astype(values.dtype), values)

    blocks = -(-n // query_chunk)

    def head(qkv: tuple[Array, Array, Array]) -> Array:
        queries, keys, values = qkv
        if blocks == 1:
            return one_head(queries, keys, values)
        padded = jnp.pad(queries, ((0, blocks * query_chunk - n), (0, 0))).reshape(blocks, query_chunk, -1)
        out = jax.lax.map(lambda block: one_head(block, keys, values), padded)
        return out.reshape(blocks * query_chunk, -1)[:n]

    by_head = (a.transpose(0, 2, 1, 3).reshape(b * heads, a.shape[1], a.shape[3]) for a in (q, k, v))
    out = jax.lax.map(head, tuple(by_head))
    return out.reshape(b, heads, n, out.shape[-1]).transpose(0, 2, 1, 3)


@contextlib.contextmanager
def whole_attention() -> Iterator[None]:
    """Within it, `multi_head_attention` traces the whole attention on the CPU backend too (QUERY_CHUNK None), as
    accelerators compute it: for figures that should not depend on the CPU's loops (XLA's FLOP count of a forward,
    memory estimates of an accelerator's program). Only what is traced within it: a jitted function already
    traced for the same arguments keeps its compiled program."""
    global QUERY_CHUNK
    saved, QUERY_CHUNK = QUERY_CHUNK, None
    try:
        yield
    finally:
        QUERY_CHUNK = saved


# The official DDPM attention is the one-head case ([B, N, 1, C]).
single_head_attention = multi_head_attention


class AttnBlock(nn.Module):
    """Self-attention over all H·W positions, x [B,H,W,C] -> x + proj_out(attn(norm(x))).

    Channels are split into `num_heads` heads of C / num_heads (head-major, as diffusers' `Attention`);
    with norm=False there is no GroupNorm (diffusers' mid-block attention of `scale_shift` models).
    """

    dtype: Any = jnp.float32
    num_heads: int = 1
    num_groups: int = NUM_GROUPS
    eps: float = GROUP_NORM_EPS
    norm: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        if c % self.num_heads:
            raise ConfigError(f"AttnBlock: {c} channels do not split into num_heads={self.num_heads} heads")
        h = group_norm(x, name="norm", num_groups=self.num_groups, eps=self.eps) if self.norm else x
        shape = (b, height * width, self.num_heads, c // self.num_heads)
        q, k, v = (dense(c, self.dtype, name=n)(h).reshape(shape) for n in ("q", "k", "v"))
        h = multi_head_attention(q, k, v).reshape(b, height, width, c)
        return x + dense(c, self.dtype, scale=ZERO_INIT_SCALE, name="proj_out")(h)


class Downsample(nn.Module):
    """[B,H,W,C] -> [B,H/2,W/2,C]: 3×3 stride-2 conv `conv` or 2×2 average pool.

    padding 0 pads 0 before and 1 after (TF "SAME", the official code); padding 1 pads 1 on each side
    (PyTorch, diffusers' default `downsample_padding`).
    """

    with_conv: bool
    dtype: Any = jnp.float32
    padding: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.with_conv:
            padding = "SAME" if self.padding == 0 else ((self.padding, self.padding),) * 2
            return conv3x3(x.shape[-1], self.dtype, strides=2, padding=padding, name="conv")(x)
        return avg_pool2(x)


class Upsample(nn.Module):
    """[B,H,W,C] -> [B,2H,2W,C]: nearest-neighbour ×2 (pixel repeat), then a 3×3 conv `conv` if with_conv."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = upsample_nearest(x)
        if self.with_conv:
            x = conv3x3(x.shape[-1], self.dtype, name="conv")(x)
        return x
