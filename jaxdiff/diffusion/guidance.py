"""Classifier-free guidance (Ho & Salimans 2022): a class-conditional model as a `denoise_fn`."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.checks import is_int, is_real
from jaxdiff.errors import ConfigError, UsageError

Array = jax.Array
ApplyFn = Callable[[object, Array, Array, Array], Array]


def guided_denoiser(
    apply_fn: ApplyFn, params, labels, *, guidance: float, null_label: int, channels: int = 0
) -> Callable[[Array, Array], Array]:
    """`denoise_fn(x_t, t)` for `jaxdiff.samplers.sample` from `apply_fn(params, x_t, t, labels) -> output`.

    x_t [B, H, W, C], t int32 [B] (0-based steps), labels int [B]; the output has C
    channels (the mean part: ε, x_0 or v) or 2C (mean part, then a learned variance).
    guidance w >= 0 (a Python number) gives (1 + w)·out(labels) − w·out(null_label)
    on the mean part and the conditional variance part, from one forward pass on
    the batch [x_t; x_t] with labels [labels; null_label]. Since ε, x_0 and v are
    affine in one another at fixed (x_t, t), guiding any of them guides x̂_0 alike.
    w = 0 is the plain conditional call. `channels` > 0 guides only the first `channels` channels of the mean
    part, the others conditional as the variance part (DiT's sample.py guides 3 of its 4 latent channels, "for
    exact reproducibility"); 0 guides the whole mean part. For the U-Net:
    `apply_fn = lambda p, x, t, y: model.apply({"params": p}, x, t, y)`, null_label = num_classes.
    """
    if not is_real(guidance):
        raise UsageError(f"guidance={guidance!r} must be a number")
    if not math.isfinite(guidance) or guidance < 0:
        raise UsageError(f"guidance={guidance!r} must be finite and >= 0")
    if not is_int(null_label):
        raise UsageError(f"null_label={null_label!r} must be an int")
    if not is_int(channels) or channels < 0:
        raise UsageError(f"channels={channels!r} must be an int >= 0 (0: guide every mean channel)")
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise UsageError(f"labels must be a 1-D int array [B], got shape {labels.shape} dtype {labels.dtype}")

    def denoise_fn(x_t: Array, t: Array) -> Array:
        if labels.shape[0] != x_t.shape[0]:
            raise UsageError(f"{labels.shape[0]} labels for a batch of {x_t.shape[0]} images")
        if guidance == 0:
            return apply_fn(params, x_t, t, labels)
        null = jnp.full_like(labels, null_label)
        both = apply_fn(
            params,
            jnp.concatenate([x_t, x_t]),
            jnp.concatenate([t, t]),
            jnp.concatenate([labels, null]),
        )
        cond, uncond = jnp.split(both, 2)
        x_channels = x_t.shape[-1]
        if cond.shape[-1] not in (x_channels, 2 * x_channels):
            raise ConfigError(
                f"model output has {cond.shape[-1]} channels; expected {x_channels} or {2 * x_channels} "
                f"(learned variances) for x_t with {x_channels}"
            )
        if channels > x_channels:
            raise ConfigError(f"guidance on the first {channels} channels, but x_t has {x_channels}")
        guided = channels or x_channels
        mean = (1.0 + guidance) * cond[..., :guided] - guidance * uncond[..., :guided]
        return jnp.concatenate([mean, cond[..., guided:]], axis=-1)

    return denoise_fn
