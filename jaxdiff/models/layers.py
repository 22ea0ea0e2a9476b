"""Building blocks of the DDPM U-Net (Flax Linen).

Conventions: feature maps are NHWC; `temb` is the timestep embedding [B, E];
`dtype` is the compute dtype of convolutions, dense layers and attention
matmuls, while parameters stay float32 and GroupNorm statistics and the
attention softmax are computed in float32. Parameter names follow the
official DDPM TensorFlow code (`norm1`, `conv1`, `temb_proj`, `q`, `proj_out`, ...).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NUM_GROUPS = 32
GROUP_NORM_EPS = 1e-6
# The official code initialises "zero" layers with this scale instead of 0.
ZERO_INIT_SCALE = 1e-10


def fan_avg_uniform(scale: float = 1.0) -> nn.initializers.Initializer:
    """`variance_scaling(scale, "fan_avg", "uniform")`: U(-l, l) with l = sqrt(3·scale / ((fan_in + fan_out) / 2))."""
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def timestep_embedding(t: Array, dim: int) -> Array:
    """Sinusoidal embedding [B, dim] float32 of steps t [B] (0-based, used as raw numbers).

    half = dim // 2, freq_i = exp(-i·ln(10000) / (half - 1)), output [sin(t·freq), cos(t·freq)].
    """
    if dim < 4 or dim % 2:
        raise ValueError(f"timestep embedding dim={dim} must be even and at least 4")
    half = dim // 2
    freqs = np.exp(-np.arange(half, dtype=np.float64) * np.log(10000.0) / (half - 1)).astype(np.float32)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)


def dense(features: int, dtype: Any, *, scale: float = 1.0, name: str) -> nn.Dense:
    """Dense (also used as the 1×1 "nin" layer over channels) with fan_avg-uniform kernel, zero bias."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=fan_avg_uniform(scale), name=name)


def conv3x3(features: int, dtype: Any, *, scale: float = 1.0, strides: int = 1, name: str) -> nn.Conv:
    """3×3 convolution, TF "SAME" padding, fan_avg-uniform kernel, zero bias."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(strides, strides),
        padding="SAME",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=fan_avg_uniform(scale),
        name=name,
    )


def group_norm(x: Array, *, name: str) -> Array:
    """GroupNorm (32 groups, eps 1e-6) computed in float32; returns float32.

    Call only inside a compact method: the layer becomes a submodule `name` of the caller.
    """
    norm = nn.GroupNorm(num_groups=NUM_GROUPS, epsilon=GROUP_NORM_EPS, dtype=jnp.float32, name=name)
    return norm(x.astype(jnp.float32))


class TimestepEmbed(nn.Module):
    """t [B] -> Dense(4·ch)(swish(Dense(4·ch)(sinusoid(t, ch)))) [B, 4·ch]; params `dense0`, `dense1`."""

    ch: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        h = dense(4 * self.ch, self.dtype, name="dense0")(timestep_embedding(t, self.ch))
        return dense(4 * self.ch, self.dtype, name="dense1")(nn.swish(h))


class ResBlock(nn.Module):
    """x [B,H,W,C] -> [B,H,W,out_ch]: h = conv1(swish(norm1(x))) + temb_proj(swish(temb));
    h = conv2(dropout(swish(norm2(h)))); returns nin_shortcut(x) + h (shortcut only when C != out_ch).
    """

    out_ch: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array, train: bool) -> Array:
        h = conv3x3(self.out_ch, self.dtype, name="conv1")(nn.swish(group_norm(x, name="norm1")))
        h = h + dense(self.out_ch, self.dtype, name="temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(group_norm(h, name="norm2"))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.out_ch, self.dtype, scale=ZERO_INIT_SCALE, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = dense(self.out_ch, self.dtype, name="nin_shortcut")(x)
        return x + h


def single_head_attention(q: Array, k: Array, v: Array) -> Array:
    """softmax(q·kᵀ / sqrt(C)) · v for q, k, v [B, N, 1, C] (one head over N positions); returns [B, N, 1, C].

    Logits and softmax are float32 whatever the input dtype; the output has the dtype of v.
    `jax.nn.dot_product_attention` picks the backend's implementation (`implementation=None`).
    """
    return jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, implementation=None)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, x [B,H,W,C] -> x + proj_out(attn(norm(x)))."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = group_norm(x, name="norm")
        q, k, v = (dense(c, self.dtype, name=n)(h).reshape(b, height * width, 1, c) for n in ("q", "k", "v"))
        h = single_head_attention(q, k, v).reshape(b, height, width, c)
        return x + dense(c, self.dtype, scale=ZERO_INIT_SCALE, name="proj_out")(h)


class Downsample(nn.Module):
    """[B,H,W,C] -> [B,H/2,W/2,C]: 3×3 stride-2 conv `conv` (TF SAME: pad 0 before, 1 after) or 2×2 average pool."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.with_conv:
            return conv3x3(x.shape[-1], self.dtype, strides=2, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """[B,H,W,C] -> [B,2H,2W,C]: nearest-neighbour ×2 (pixel repeat), then a 3×3 conv `conv` if with_conv."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = conv3x3(x.shape[-1], self.dtype, name="conv")(x)
        return x
