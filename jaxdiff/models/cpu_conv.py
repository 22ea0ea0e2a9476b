"""A 2-D convolution whose weight gradient on the CPU backend is computed as shifted GEMMs for small maps.

XLA-CPU computes a convolution's weight gradient as a second convolution over the batch·pixel axis.
The same gradient is exactly Σ over kernel offsets (i, j) of one GEMM each, contracting that axis:
    ∂L/∂k[i, j, c, o] = Σ_{b,p,q} x_pad[b, s_h·p + i, s_w·q + j, c] · ∂L/∂y[b, p, q, o].
`conv_general_dilated` is a `jax.custom_jvp` whose tangent in the kernel is that sum of shifted GEMMs,
so reverse mode transposes it into the GEMMs above (and forward mode still works); the forward value
and the input gradient are XLA's own convolutions. Which weight gradient is faster depends on the map
size and the CPU (`benchmarks/conv_cpu.py` measures both in one process): on a loaded 2-core AMD EPYC
(Zen 5) the GEMMs took 0.3–1.5× XLA's time at 8×8 and 4×4 outputs and 1.1–3× at 16×16 and 32×32, so they
are used for outputs of at most GEMM_MAX_OUTPUT_PIXELS pixels. `lax.platform_dependent` picks them only when the computation runs on
the CPU: GPUs and TPUs keep XLA's native weight gradient. The U-Nets' 3×3 convolutions use this when the
environment variable JAXDIFF_CPU_CONV_WGRAD=1 is set as a model is built; it is off by default because
whole training steps measured no steady gain (1.11× and 0.92× for the digits model in two loaded runs).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff.errors import ConfigError

Array = jax.Array

ENV_VAR = "JAXDIFF_CPU_CONV_WGRAD"
# Output maps of at most this many pixels (Ho·Wo) take the shifted-GEMM weight gradient on CPU.
GEMM_MAX_OUTPUT_PIXELS = 64
_NHWC = ("NHWC", "HWIO", "NHWC")


def enabled() -> bool:
    """Whether JAXDIFF_CPU_CONV_WGRAD ("0" by default) asks for the shifted-GEMM weight gradient on CPU."""
    value = os.environ.get(ENV_VAR, "0")
    if value not in ("0", "1"):
        raise ConfigError(f"{ENV_VAR}={value!r} must be 0 or 1")
    return value == "1"


def _native(x: Array, kernel: Array, strides, pads, precision) -> Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC, precision=precision)


def shifted_gemm_conv(x: Array, kernel: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]]) -> Array:
    """conv(x, kernel) [B, Ho, Wo, O] as Σ_{i,j} window_ij(x) · kernel[i, j]: one GEMM per kernel offset.

    x [B, H, W, C] NHWC, kernel [kh, kw, C, O] HWIO, no dilation; `pads` are lax's ((lo, hi), (lo, hi))
    (negative crops). Linear in `kernel`: its transpose is `shifted_gemm_weight_grad`.
    """
    kh, kw, channels, _ = kernel.shape
    (sh, sw) = strides
    x_pad = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    ho, wo = (x_pad.shape[1] - kh) // sh + 1, (x_pad.shape[2] - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            limit = (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, channels)
            window = lax.slice(x_pad, (0, i, j, 0), limit, (1, sh, sw, 1))
            term = lax.dot_general(window, kernel[i, j], (((3,), (0,)), ((), ())))
            out = term if out is None else out + term
    return out


def shifted_gemm_weight_grad(
    x: Array, g: Array, kernel_shape: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> Array:
    """∂L/∂kernel [kh, kw, C, O] of y = conv(x, kernel) from x [B, H, W, C] and g = ∂L/∂y [B, Ho, Wo, O]:
    the transpose of `shifted_gemm_conv` in the kernel, i.e. one GEMM over B·Ho·Wo per kernel offset."""
    zeros = jnp.zeros(kernel_shape, x.dtype)
    (grad,) = jax.linear_transpose(lambda k: shifted_gemm_conv(x, k, strides, pads), zeros)(g)
    return grad


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, kernel: Array, strides, pads, precision) -> Array:
    return _native(x, kernel, strides, pads, precision)


def _conv_jvp(strides, pads, precision, primals, tangents):
    """Tangent conv(ẋ, k) + conv(x, k̇), the second by shifted GEMMs on CPU for small outputs; zero
    tangents (symbolic) are skipped, so no convolution is spent on an input that is not differentiated."""
    x, kernel = primals
    x_dot, kernel_dot = tangents
    y = _native(x, kernel, strides, pads, precision)
    terms = []
    if not isinstance(x_dot, jax.custom_derivatives.SymbolicZero):
        terms.append(_native(x_dot, kernel, strides, pads, precision))
    if not isinstance(kernel_dot, jax.custom_derivatives.SymbolicZero):
        if y.shape[1] * y.shape[2] > GEMM_MAX_OUTPUT_PIXELS:
            terms.append(_native(x, kernel_dot, strides, pads, precision))
        else:
            terms.append(
                lax.platform_dependent(
                    x, kernel_dot,
                    cpu=lambda x, k: shifted_gemm_conv(x, k, strides, pads),
                    default=lambda x, k: _native(x, k, strides, pads, precision),
                )
            )  # fmt: skip
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


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
