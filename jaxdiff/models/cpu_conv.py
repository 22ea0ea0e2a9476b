"""A 2-D convolution whose weight gradient on the CPU backend is computed as shifted GEMMs (opt-in).

XLA-CPU computes a convolution's weight gradient as a second convolution over the batch·pixel axis.
The same gradient is exactly Σ over kernel offsets (i, j) of one GEMM each, contracting that axis:
    ∂L/∂k[i, j, c, o] = Σ_{b,p,q} x_pad[b, s_h·p + i, s_w·q + j, c] · ∂L/∂y[b, p, q, o].
Which is faster depends on the CPU (`benchmarks/conv_cpu.py` measures both in one process): on a
2-core AMD EPYC (Zen 5) XLA's own kernel wins, so this path is off unless the environment variable
JAXDIFF_CPU_CONV_WGRAD=1 is set when a model is built. `lax.platform_dependent` picks the shifted GEMMs
only when the computation runs on the CPU; GPUs and TPUs keep XLA's native weight gradient. The forward
and the input gradient are XLA's own. Being a `jax.custom_vjp`, the enabled path supports reverse-mode
differentiation only (no `jax.jvp` through the network).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

ENV_VAR = "JAXDIFF_CPU_CONV_WGRAD"
_NHWC = ("NHWC", "HWIO", "NHWC")


def enabled() -> bool:
    """Whether JAXDIFF_CPU_CONV_WGRAD asks for the shifted-GEMM weight gradient ("1"; default "0")."""
    value = os.environ.get(ENV_VAR, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={value!r} must be 0 or 1")
    return value == "1"


def shifted_gemm_weight_grad(
    x: Array, g: Array, kernel_shape: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> Array:
    """∂L/∂kernel [kh, kw, C, O] of y = conv(x, kernel) from x [B, H, W, C] and g = ∂L/∂y [B, Ho, Wo, O].

    NHWC input, HWIO kernel, no dilation; `pads` are lax's ((lo, hi), (lo, hi)) (negative crops).
    One GEMM per kernel offset over the B·Ho·Wo axis, accumulated in float32, returned in x's dtype.
    """
    kh, kw, channels, features = kernel_shape
    (sh, sw), (_, ho, wo, _) = strides, g.shape
    x_pad = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    per_offset = []
    for i in range(kh):
        for j in range(kw):
            limit = (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, channels)
            window = lax.slice(x_pad, (0, i, j, 0), limit, (1, sh, sw, 1))
            contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
            per_offset.append(lax.dot_general(window, g, contract, preferred_element_type=jnp.float32))
    return jnp.stack(per_offset).reshape(kh, kw, channels, features).astype(x.dtype)


def _native(x: Array, kernel: Array, strides, pads, precision) -> Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, kernel: Array, strides, pads, precision) -> Array:
    return _native(x, kernel, strides, pads, precision)


def _conv_fwd(x, kernel, strides, pads, precision):
    return _native(x, kernel, strides, pads, precision), (x, kernel)


def _conv_bwd(strides, pads, precision, residuals, g):
    x, kernel = residuals
    dx = jax.vjp(lambda x_: _native(x_, kernel, strides, pads, precision), x)[1](g)[0]

    def native_weight_grad(x, g):
        return jax.vjp(lambda k: _native(x, k, strides, pads, precision), kernel)[1](g)[0]

    def cpu_weight_grad(x, g):
        return shifted_gemm_weight_grad(x, g, kernel.shape, strides, pads).astype(kernel.dtype)

    return dx, lax.platform_dependent(x, g, cpu=cpu_weight_grad, default=native_weight_grad)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
) -> Array:
    """`lax.conv_general_dilated` for 2-D NHWC·HWIO convolutions without dilation or groups (what
    `flax.linen.Conv(conv_general_dilated=...)` calls), with the shifted-GEMM weight gradient on CPU."""
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if lhs.ndim != 4 or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != expected:
        raise ValueError(f"cpu_conv supports 2-D NHWC·HWIO convolutions only, got dimension_numbers={dimension_numbers}")
    dilations = {"lhs_dilation": lhs_dilation, "rhs_dilation": rhs_dilation}
    for name, dilation in dilations.items():
        if dilation is not None and any(d != 1 for d in dilation):
            raise ValueError(f"cpu_conv supports no dilation, got {name}={tuple(dilation)}")
    if feature_group_count != 1:
        raise ValueError(f"cpu_conv supports feature_group_count=1 only, got {feature_group_count}")
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _conv(lhs, rhs, strides, pads, precision)
