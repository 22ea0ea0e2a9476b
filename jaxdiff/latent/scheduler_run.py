"""`SchedulerRun`: one run of a diffusers scheduler's sampler over concrete points — the start state and the
compiled loop around a model `model_fn(x_t, t)` (latents [B, h, w, C], training steps t [B], 0-based; the model's
output in the scheduler's prediction type) — shared by `jaxdiff.latent.pipeline.LatentPipeline` and
`jaxdiff.latent.scheduler_sampling.SchedulerSampling`.

The points are `jaxdiff.latent.schedulers.run_points`': the decreasing training steps of ddim / ddpm (pndm: its
`pndm_points`), stepped in the VP latents x_t by `denoise`; or, for SIGMA_SAMPLERS, the noise levels ending at 0,
stepped in the unscaled x = x_0 + σ·n by `denoise_on_levels` on the model made a denoiser D(x; σ) by
`sigma_denoiser`. `index` is what the loop passes to the denoiser it runs: the step index i [B] into the increasing
steps (the discrete samplers) or the noise level σ [B] (SIGMA_SAMPLERS).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.scheduler_config import SchedulerSettings
from jaxdiff.latent.schedulers import (
    ROUNDED_STEP_SAMPLERS,
    SIGMA_SAMPLERS,
    add_noise,
    denoise,
    denoise_on_levels,
    initial_scale,
    sampler_scheduler,
    sigma_denoiser,
    step_plan,
)

Array = jax.Array
Denoiser = Callable[[Array, Array], Array]  # (x [B,h,w,C], index [B]) -> the sampler's model output


class SchedulerRun:
    """`sampler` of the folder's `scheduler` over `points` (concrete, read outside jit; see the module docstring).
    Build it outside jit; call `start` and the instance inside."""

    def __init__(self, scheduler: SchedulerSettings, sampler: str, points: np.ndarray):
        self.scheduler = sampler_scheduler(scheduler, sampler)
        self.sampler, self.points = sampler, points
        self.on_levels = sampler in SIGMA_SAMPLERS
        self.plan = None if self.on_levels else step_plan(self.scheduler, points, sampler)
        # The discrete loop's step index i -> training step: the points increasing.
        self.increasing = None if self.on_levels else np.asarray(points[::-1], np.int32)
        # The index of the loop's first model call.
        self.first_index = float(points[0]) if self.on_levels else len(points) - 1

    def start(self, noise: Array, image_latents: Array | None = None) -> Array:
        """The loop's initial state: the noise (scaled by diffusers' init_noise_sigma on σ grids), or the image
        latents noised to the first point (VP x_t for the discrete samplers; x_0 + σ·noise on σ grids)."""
        if self.on_levels:
            if image_latents is None:
                return noise * initial_scale(self.scheduler, self.sampler, float(self.points[0]))
            return image_latents + float(self.points[0]) * noise
        return noise if image_latents is None else add_noise(self.scheduler, image_latents, noise, int(self.points[0]))

    def noised(self, image_latents: Array, noise: Array, index: Array) -> Array:
        """The image latents noised to the loop's `index` [B] (as the state it holds there)."""
        if self.on_levels:
            return image_latents + index[:, None, None, None] * noise
        return add_noise(self.scheduler, image_latents, noise, jnp.asarray(self.increasing)[index][:, None, None, None])

    def __call__(self, model_fn: Callable[[Array, Array], Array], x_start: Array, rng: Array,
                 wrap: Callable[[Denoiser], Denoiser] | None = None) -> Array:  # fmt: skip
        """The final latents of the run from `x_start`, with `model_fn(x_t, t)` as the module docstring says and
        `wrap` (when given) applied to the denoiser the loop calls (e.g. inpainting's latent blending)."""
        if self.on_levels:
            fn = sigma_denoiser(model_fn, self.scheduler, rounded=self.sampler in ROUNDED_STEP_SAMPLERS)
        else:
            increasing = jnp.asarray(self.increasing)
            fn = lambda x, i: model_fn(x, increasing[i])  # noqa: E731
        fn = wrap(fn) if wrap else fn
        if self.on_levels:
            return denoise_on_levels(fn, self.points, x_start, sampler=self.sampler, scheduler=self.scheduler, rng=rng)
        return denoise(fn, self.plan, x_start, rng, sampler=self.sampler)
