"""2-D convolutions for the CPU backend: small ones as one GEMM, large 3×3 ones by Winograd's F(2×2, 3×3), and an
optional GEMM weight gradient.

XLA:CPU's convolution kernel is slow when the output has few rows (batch · Ho · Wo) and many channels: a
3×3 convolution 8×8×1280, batch 2, took 124 ms here where the same sum written as one GEMM over its im2col
windows, [B·Ho·Wo, kh·kw·C] · [kh·kw·C, O], took 37 ms (PyTorch's oneDNN 87–103 ms); at 16×16 the GEMM took
0.6–0.85× XLA's time, at 32×32 and above 1.1–2.6× (`benchmarks/conv_cpu.py --forward` measures them). So on the
CPU backend `conv_general_dilated` computes convolutions with at most GEMM_MAX_ROWS output rows, and every 1×1
convolution (a plain matmul over channels, 0.6–0.8× XLA's time at every size measured), as that GEMM. It is slow
too on large maps with many channels (a 128×128×512 3×3 convolution at 70 GFLOP/s where 64×64×512 runs at 108):
there 3×3 convolutions at stride 1 with "same" padding, at least WINOGRAD_MIN_PIXELS output pixels per image and
WINOGRAD_MIN_VALUES input values per image take Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray, 2016: 16
multiplications per 2×2 outputs instead of 36, as 16 GEMMs over channels), in bands of WINOGRAD_BAND_ROWS output
rows so that the transformed tiles stay small: 1.4–2.5× XLA's speed on the SD VAE decoder's 128² to 512² levels
and 1.0–1.3× on the U-Net's 64² level (`benchmarks/conv_cpu.py --forward [--vae]`); its tangents, and so training's
gradients, stay XLA's convolutions. Everything else keeps XLA's kernel, and so does every convolution of fewer than
CPU_FORM_MIN_MACS multiply-adds (a tiny model's: it compiles faster). `lax.platform_dependent` makes the
choice when the program is lowered, so GPUs and TPUs keep XLA's native convolution; `xla_convolutions()` makes the
CPU trace it too (for figures that should not depend on the CPU's formulation, such as XLA's FLOP count).

The weight gradient. XLA-CPU computes a convolution's weight gradient as a second convolution over the
batch·pixel axis. The same gradient is exactly Σ over kernel offsets (i, j) of one GEMM each, contracting that axis:
    ∂L/∂k[i, j, c, o] = Σ_{b,p,q} x_pad[b, s_h·p + i, s_w·q + j, c] · ∂L/∂y[b, p, q, o].
With the environment variable JAXDIFF_CPU_CONV_WGRAD=1 (read when a convolution is traced),
`conv_general_dilated` is a `jax.custom_jvp` whose tangent in the kernel is that sum of shifted GEMMs for outputs
of at most GEMM_MAX_OUTPUT_PIXELS pixels (Ho·Wo), so reverse mode transposes it into the GEMMs above (and forward
mode still works). On a loaded 2-core AMD EPYC (Zen 5) the GEMMs took 0.3–1.5× XLA's time at 8×8 and 4×4 outputs
and 1.1–3× at 16×16 and 32×32; whole training steps measured no steady gain (1.11× and 0.92× for the digits
model in two loaded runs), so it is off by default. Without it, gradients are the automatic ones of the forward
above.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdiff.errors import ConfigError

Array = jax.Array

ENV_VAR = "JAXDIFF_CPU_CONV_WGRAD"
# Output maps of at most this many pixels (Ho·Wo) take the shifted-GEMM weight gradient on CPU.
GEMM_MAX_OUTPUT_PIXELS = 64
# Convolutions with at most this many output rows (batch · Ho · Wo) run as one im2col GEMM on CPU.
GEMM_MAX_ROWS = 512
# 3×3 "same" convolutions at stride 1 whose outputs have at least WINOGRAD_MIN_PIXELS pixels per image and whose
# input holds at least WINOGRAD_MIN_VALUES values per image (C · H · W) run by Winograd's F(2×2, 3×3) on CPU,
# WINOGRAD_BAND_ROWS output rows of every image at a time. XLA's time / Winograd's here (min of 3): 2 × 64² × 320
# 1.33, 2 × 128² × 320 1.76, 1 × 128² × 512 1.97, 1 × 256² × 256 2.47, 1 × 256² × 128 1.22, 1 × 512² × 128 1.40,
# 1 × 64² × 512 1.01; below the bounds 2 × 64² × 128 0.57, 32 × 32² × 128 0.65, 32 × 16² × 256 0.80, 128 × 16² × 256
# 0.92, 2 × 32² × 640 0.79.
WINOGRAD_MIN_PIXELS = 64 * 64
WINOGRAD_MIN_VALUES = 2**20
WINOGRAD_BAND_ROWS = 16
# Convolutions of fewer multiply-adds (B·Ho·Wo · kh·kw·C · O) keep XLA's kernel on CPU too: they take a few
# milliseconds either way (SD 1.5's smallest, its 1×1 convolutions at 8×8×1280 and batch 2, have 2.1·10⁸), and XLA
# compiles its one operation faster than the GEMM's windows or Winograd's bands (tiny U-Nets' tests: 12% slower
# with the forms).
CPU_FORM_MIN_MACS = 10**8
# False within `xla_convolutions()`: the CPU traces XLA's convolution, as accelerators run it.
CPU_FORMS = True
# F(2×2, 3×3): Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A for a 4×4 input tile d, a 3×3 filter g and a 2×2 output tile Y.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
_NHWC = ("NHWC", "HWIO", "NHWC")


def enabled() -> bool:
    """Whether JAXDIFF_CPU_CONV_WGRAD ("0" by default) asks for the shifted-GEMM weight gradient on CPU."""
    value = os.environ.get(ENV_VAR, "0")
    if value not in ("0", "1"):
        raise ConfigError(f"{ENV_VAR}={value!r} must be 0 or 1")
    return value == "1"


def _native(x: Array, kernel: Array, strides, pads, precision) -> Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC, precision=precision)


def _windows(x: Array, kernel_shape: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]]) -> list:
    """The kh·kw windows of x [B, H, W, C] that meet kernel offsets (i, j), row-major: each [B, Ho, Wo, C].

    `pads` are lax's ((lo, hi), (lo, hi)) (negative crops); no dilation."""
    kh, kw = kernel_shape[:2]
    (sh, sw) = strides
    if all(p == (0, 0) for p in pads):
        x_pad = x
    else:
        x_pad = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    ho, wo = (x_pad.shape[1] - kh) // sh + 1, (x_pad.shape[2] - kw) // sw + 1
    if (kh, kw, ho, wo) == (1, 1, *x_pad.shape[1:3]):
        return [x_pad]
    return [
        lax.slice(x_pad, (0, i, j, 0), (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, x.shape[3]),
                  (1, sh, sw, 1))  # fmt: skip
        for i in range(kh)
        for j in range(kw)
    ]


def im2col_conv(x: Array, kernel: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]],
                precision: Any = None) -> Array:  # fmt: skip
    """conv(x, kernel) [B, Ho, Wo, O] as one GEMM: [windows of x side by side] · kernel as [kh·kw·C, O].

    x [B, H, W, C] NHWC, kernel [kh, kw, C, O] HWIO, no dilation; `pads` as `_windows` takes them."""
    windows = _windows(x, kernel.shape, strides, pads)
    columns = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    matrix = kernel.reshape(-1, kernel.shape[-1])
    return lax.dot_general(columns, matrix, (((3,), (0,)), ((), ())), precision=precision)


def shifted_gemm_conv(x: Array, kernel: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]]) -> Array:
    """conv(x, kernel) [B, Ho, Wo, O] as Σ_{i,j} window_ij(x) · kernel[i, j]: one GEMM per kernel offset.

    x [B, H, W, C] NHWC, kernel [kh, kw, C, O] HWIO, no dilation; `pads` are lax's ((lo, hi), (lo, hi))
    (negative crops). Linear in `kernel`: its transpose is `shifted_gemm_weight_grad`.
    """
    kh, kw = kernel.shape[:2]
    windows = _windows(x, kernel.shape, strides, pads)
    terms = [lax.dot_general(windows[i * kw + j], kernel[i, j], (((3,), (0,)), ((), ()))) for i in range(kh)
             for j in range(kw)]  # fmt: skip
    return sum(terms[1:], terms[0])


def shifted_gemm_weight_grad(
    x: Array, g: Array, kernel_shape: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> Array:
    """∂L/∂kernel [kh, kw, C, O] of y = conv(x, kernel) from x [B, H, W, C] and g = ∂L/∂y [B, Ho, Wo, O]:
    the transpose of `shifted_gemm_conv` in the kernel, i.e. one GEMM over B·Ho·Wo per kernel offset."""
    zeros = jnp.zeros(kernel_shape, x.dtype)
    (grad,) = jax.linear_transpose(lambda k: shifted_gemm_conv(x, k, strides, pads), zeros)(g)
    return grad


def _combine(coefficients: Sequence[int], terms: Sequence[Array]) -> Array:
    """Σ c·t for coefficients of 0 or ±1 (Bᵀ's and Aᵀ's entries): additions and subtractions only."""
    out = None
    for c, term in zip(coefficients, terms):
        if c == 0:
            continue
        term = term if c == 1 else -term
        out = term if out is None else out + term
    return out


def _winograd_valid(x_pad: Array, filters: Array) -> Array:
    """F(2×2, 3×3) of x_pad [B, H + 2, W + 2, C] (H, W even) with transformed filters [16, C, O]: [B, H, W, O]."""
    b, h, w, c = x_pad.shape[0], x_pad.shape[1] - 2, x_pad.shape[2] - 2, x_pad.shape[3]
    h2, w2 = h // 2, w // 2
    # d[i][j] [B, h2, w2, C]: input pixel (i, j) of every 4×4 tile (tiles overlap by 2)
    d = [[lax.slice(x_pad, (0, i, j, 0), (b, i + 2 * h2 - 1, j + 2 * w2 - 1, c), (1, 2, 2, 1)) for j in range(4)]
         for i in range(4)]  # fmt: skip
    rows = [[_combine(_WINOGRAD_BT[a], [d[i][j] for i in range(4)]) for j in range(4)] for a in range(4)]
    tiles = jnp.stack([_combine(_WINOGRAD_BT[e], rows[a]) for a in range(4) for e in range(4)])  # Bᵀ d B
    products = jnp.einsum("knc,kco->kno", tiles.reshape(16, b * h2 * w2, c), filters)
    products = products.reshape(4, 4, b, h2, w2, -1)
    half = [[_combine(_WINOGRAD_AT[r], [products[a][e] for a in range(4)]) for e in range(4)] for r in range(2)]
    out = jnp.stack([jnp.stack([_combine(_WINOGRAD_AT[q], half[r]) for q in range(2)], axis=3) for r in range(2)],
                    axis=2)  # fmt: skip  [B, h2, 2 (r), w2, 2 (q), O]
    return out.reshape(b, h, w, -1)


def winograd_conv(x: Array, kernel: Array, band_rows: int = WINOGRAD_BAND_ROWS) -> Array:
    """The 3×3 convolution of x [B, H, W, C] with kernel [3, 3, C, O] (HWIO) at stride 1, zero padding 1 on every
    side, by F(2×2, 3×3), `band_rows` output rows of every image at a time (a `lax.fori_loop` over the bands, so the
    temporaries are one band's): [B, H, W, O].

    H must be a multiple of `band_rows` (even) and W even. Computed in float32, returned in x's dtype."""
    b, h, w, c = x.shape
    if kernel.shape[:2] != (3, 3) or h % band_rows or band_rows % 2 or w % 2:
        raise ValueError(f"winograd_conv needs a 3x3 kernel, H a multiple of an even band and W even; got x {x.shape},"
                         f" kernel {kernel.shape}, band_rows {band_rows}")  # fmt: skip
    g = np.asarray(_WINOGRAD_G, np.float32)
    filters = jnp.einsum("ai,ijco,ej->aeco", g, kernel.astype(jnp.float32), g).reshape(16, c, -1)  # G g Gᵀ
    dtype, x = x.dtype, x.astype(jnp.float32)
    pad_columns = ((0, 0), (0, 0), (1, 1), (0, 0))
    if h == band_rows:
        return _winograd_valid(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), filters).astype(dtype)

    def band(index: Array, out: Array) -> Array:
        """Output rows [index·band_rows, +band_rows) from input rows index·band_rows − 1 to +band_rows + 1 (zero
        beyond the image), without a padded copy of the whole input."""
        wanted = index * band_rows - 1
        start = jnp.clip(wanted, 0, h - band_rows - 2)  # the first band starts one row early, the last one late
        rows = jnp.pad(lax.dynamic_slice_in_dim(x, start, band_rows + 2, axis=1), ((0, 0), (1, 1), (0, 0), (0, 0)))
        rows = jnp.pad(lax.dynamic_slice_in_dim(rows, 1 + wanted - start, band_rows + 2, axis=1), pad_columns)
        return lax.dynamic_update_slice_in_dim(out, _winograd_valid(rows, filters), index * band_rows, axis=1)

    # The output starts as a broadcast of a value read from x (zero, or NaN where x[0, 0, 0, 0] is not finite, which
    # every band overwrites): a constant broadcast would be one buffer that XLA shares between every convolution of
    # the same shape, live from the first to the last of them.
    init = jnp.broadcast_to(x[0, 0, 0, 0] * 0, (b, h, w, kernel.shape[-1]))
    out = lax.fori_loop(0, h // band_rows, band, init)
    return out.astype(dtype)


@jax.custom_jvp
def _winograd_with_xla_tangents(x: Array, kernel: Array) -> Array:
    """`winograd_conv`, differentiated as XLA's convolution: its tangents (and so the gradients of training) are
    XLA's own convolutions, as they were before the CPU took Winograd's forward."""
    return winograd_conv(x, kernel)


def _winograd_jvp(primals, tangents):
    (x, kernel), (x_dot, kernel_dot) = primals, tangents
    same = functools.partial(_native, strides=(1, 1), pads=((1, 1), (1, 1)), precision=None)
    terms = [same(x_dot, kernel)] if not isinstance(x_dot, jax.custom_derivatives.SymbolicZero) else []
    if not isinstance(kernel_dot, jax.custom_derivatives.SymbolicZero):
        terms.append(same(x, kernel_dot))
    y = winograd_conv(x, kernel)
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_winograd_with_xla_tangents.defjvp(_winograd_jvp, symbolic_zeros=True)


def cpu_form(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
             pads: Sequence[tuple[int, int]]) -> str:  # fmt: skip
    """How the CPU backend computes this convolution: "gemm" (`im2col_conv`: a 1×1 kernel at stride 1 without
    padding, or at most GEMM_MAX_ROWS output rows), "winograd" (`winograd_conv`: see WINOGRAD_MIN_PIXELS) or "xla"
    (always below CPU_FORM_MIN_MACS multiply-adds)."""
    (kh, kw), (sh, sw) = kernel_shape[:2], strides
    ho = (x_shape[1] + sum(pads[0]) - kh) // sh + 1
    wo = (x_shape[2] + sum(pads[1]) - kw) // sw + 1
    if not CPU_FORMS or x_shape[0] * ho * wo * kh * kw * x_shape[3] * kernel_shape[3] < CPU_FORM_MIN_MACS:
        return "xla"
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and all(p == (0, 0) for p in pads):
        return "gemm"
    if x_shape[0] * ho * wo <= GEMM_MAX_ROWS:
        return "gemm"
    winograd = (
        (kh, kw, sh, sw) == (3, 3, 1, 1) and tuple(pads) == ((1, 1), (1, 1)) and ho * wo >= WINOGRAD_MIN_PIXELS
        and x_shape[3] * ho * wo >= WINOGRAD_MIN_VALUES and ho % WINOGRAD_BAND_ROWS == 0 and wo % 2 == 0
    )  # fmt: skip
    return "winograd" if winograd else "xla"


def _forward(x: Array, kernel: Array, strides, pads, precision) -> Array:
    """XLA's convolution, or on the CPU backend `im2col_conv` or `winograd_conv` where `cpu_form` says so."""
    form = cpu_form(x.shape, kernel.shape, strides, pads)
    if form == "xla":
        return _native(x, kernel, strides, pads, precision)
    if form == "gemm":
        cpu = lambda x, k: im2col_conv(x, k, strides, pads, precision)  # noqa: E731
    else:
        cpu = _winograd_with_xla_tangents
    return lax.platform_dependent(x, kernel, cpu=cpu, default=lambda x, k: _native(x, k, strides, pads, precision))


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Within it, `conv_general_dilated` traces XLA's convolution on the CPU backend too (CPU_FORMS False), as
    accelerators compute it. Only what is traced within it: a jitted function already traced for the same
    arguments keeps its compiled program."""
    global CPU_FORMS
    saved, CPU_FORMS = CPU_FORMS, False
    try:
        yield
    finally:
        CPU_FORMS = saved


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, kernel: Array, strides, pads, precision) -> Array:
    return _forward(x, kernel, strides, pads, precision)


def _conv_jvp(strides, pads, precision, primals, tangents):
    """Tangent conv(ẋ, k) + conv(x, k̇), the second by shifted GEMMs on CPU for small outputs; zero
    tangents (symbolic) are skipped, so no convolution is spent on an input that is not differentiated."""
    x, kernel = primals
    x_dot, kernel_dot = tangents
    y = _forward(x, kernel, strides, pads, precision)
    terms = []
    if not isinstance(x_dot, jax.custom_derivatives.SymbolicZero):
        terms.append(_forward(x_dot, kernel, strides, pads, precision))
    if not isinstance(kernel_dot, jax.custom_derivatives.SymbolicZero):
        if y.shape[1] * y.shape[2] > GEMM_MAX_OUTPUT_PIXELS:
            terms.append(_forward(x, kernel_dot, strides, pads, precision))
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
    `flax.linen.Conv(conv_general_dilated=...)` calls): on the CPU backend small ones as a GEMM and large 3×3 ones by
    Winograd's F(2×2, 3×3) (`cpu_form`), and with JAXDIFF_CPU_CONV_WGRAD=1 the shifted-GEMM weight gradient there."""
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
    return (_conv if enabled() else _forward)(lhs, rhs, strides, pads, precision)
