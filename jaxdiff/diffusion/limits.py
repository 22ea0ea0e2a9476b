"""Limits on a predicted x̂_0 before a sampler step uses it: clipping to ±range, or Imagen's dynamic thresholding
(Saharia et al. 2022), as diffusers' schedulers apply them (`clip_sample`, `clip_sample_range`, `thresholding`,
`dynamic_thresholding_ratio`, `sample_max_value`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def dynamic_threshold(x0: Array, ratio: float, max_value: float) -> Array:
    """Imagen's dynamic thresholding of x̂_0 [B, ...]: per example, s = the `ratio` quantile (linear interpolation)
    of |x̂_0| over all its elements, clamped to [1, max_value] (to max_value where max_value < 1); x̂_0 is clipped
    to [−s, s] and divided by s. Computed in float32."""
    flat = jnp.reshape(x0, (x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.minimum(jnp.maximum(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0), max_value)[:, None]
    return jnp.reshape(jnp.clip(flat, -s, s) / s, x0.shape).astype(x0.dtype)


class DenoisedLimit(NamedTuple):
    """How each x̂_0 [B, ...] is limited: dynamic thresholding when `threshold_ratio` is set (it takes precedence,
    as in diffusers' DDPMScheduler and DDIMScheduler), else clipping to [−clip_range, clip_range] when
    `clip_range` is set, else nothing."""

    clip_range: float | None = 1.0
    threshold_ratio: float | None = None
    threshold_max: float = 1.0

    def __call__(self, x0: Array) -> Array:
        if self.threshold_ratio is not None:
            return dynamic_threshold(x0, self.threshold_ratio, self.threshold_max)
        if self.clip_range is not None:
            return jnp.clip(x0, -self.clip_range, self.clip_range)
        return x0


def limit_denoised(x0: Array, clip_denoised: bool | DenoisedLimit) -> Array:
    """x̂_0 limited as `clip_denoised` says: True clips to [−1, 1], False leaves it, a `DenoisedLimit` applies."""
    if isinstance(clip_denoised, DenoisedLimit):
        return clip_denoised(x0)
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0
