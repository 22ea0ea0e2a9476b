"""FIR resampling of NHWC feature maps (StyleGAN2's `upfirdn2d`, as used by NCSN++ and EDM's SongUNet).

`upfirdn2d` upsamples by inserting `up - 1` zeros after every pixel, pads (negative pads crop), convolves
each channel with a 2-D FIR filter and keeps every `down`-th pixel, all in one depthwise
`lax.conv_general_dilated`. Filters are given by their 1-D taps (e.g. (1, 3, 3, 1)); the 2-D filter is
the outer product normalised to sum 1, times `factor²` when upsampling so that constant images keep
their value. Every function preserves batch and channels; H and W must be divisible by `factor` when
downsampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import ConfigError

Array = jax.Array


def fir_filter(taps: Sequence[float], gain: float = 1.0) -> np.ndarray:
    """The separable 2-D filter outer(taps, taps) / sum(taps)², times `gain` (float32 [K, K])."""
    taps = np.asarray(taps, dtype=np.float64)
    if taps.ndim != 1 or taps.size == 0 or taps.sum() == 0:
        raise ConfigError(f"FIR taps {tuple(taps)} must be a non-empty 1-D sequence with a non-zero sum")
    return (np.outer(taps, taps) / taps.sum() ** 2 * gain).astype(np.float32)


def upfirdn2d(x: Array, kernel: np.ndarray, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Array:
    """x [B,H,W,C] -> [B, (H·up + pad0 + pad1 - K) // down + 1, (same for W), C]: zero-insertion upsampling,
    padding (pad0 before, pad1 after, on both axes), true convolution with `kernel` [K, K], decimation."""
    channels = x.shape[-1]
    flipped = np.ascontiguousarray(kernel[::-1, ::-1])
    weights = jnp.asarray(np.tile(flipped[:, :, None, None], (1, 1, 1, channels)), x.dtype)
    pad0, pad1 = pad
    return jax.lax.conv_general_dilated(
        x,
        weights,
        window_strides=(down, down),
        padding=((pad0, pad1 + up - 1), (pad0, pad1 + up - 1)),  # lhs dilation leaves out the trailing zeros
        lhs_dilation=(up, up),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def upsample_2d(x: Array, taps: Sequence[float], factor: int = 2) -> Array:
    """[B,H,W,C] -> [B,factor·H,factor·W,C]: FIR upsampling (taps (1, 1) is nearest-neighbour)."""
    kernel = fir_filter(taps, gain=factor**2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, taps: Sequence[float], factor: int = 2) -> Array:
    """[B,H,W,C] -> [B,H/factor,W/factor,C]: FIR downsampling (taps (1, 1) is 2×2 average pooling)."""
    kernel = fir_filter(taps)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def conv_downsample_2d(x: Array, weight: Array, taps: Sequence[float], factor: int = 2) -> Array:
    """Fused FIR downsampling and convolution with `weight` [k,k,C_in,C_out] (k odd): the filter and the
    strided convolution share one padding, [B,H,W,C_in] -> [B,H/factor,W/factor,C_out] (StyleGAN2's
    `conv_downsample_2d`, EDM's `fused_resample` down)."""
    kernel = fir_filter(taps)
    p = kernel.shape[0] - factor + weight.shape[0] - 1
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return jax.lax.conv_general_dilated(
        x, weight.astype(x.dtype), (factor, factor), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def upsample_conv_2d(x: Array, weight: Array, taps: Sequence[float], factor: int = 2) -> Array:
    """Fused convolution with `weight` [k,k,C_in,C_out] (k odd) and FIR upsampling: a stride-`factor`
    transposed convolution, then the filter, [B,H,W,C_in] -> [B,factor·H,factor·W,C_out]
    (StyleGAN2's `upsample_conv_2d`)."""
    kernel = fir_filter(taps, gain=factor**2)
    k = weight.shape[0]
    p = kernel.shape[0] - factor - (k - 1)
    # Transposed convolution, VALID: zero-insert, pad k-1 on both sides, correlate with the kernel.
    x = jax.lax.conv_general_dilated(
        x,
        weight.astype(x.dtype),
        (1, 1),
        ((k - 1, k - 1), (k - 1, k - 1)),
        lhs_dilation=(factor, factor),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))
