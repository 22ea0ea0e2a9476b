"""`SchedulerSampling`: a class-conditional model of the discrete schedule sampled step for step as a diffusers
pipeline's scheduler steps it (DiTPipeline: its folder's `scheduler/scheduler_config.json`, read by
`jaxdiff.diffusion.scheduler_config.scheduler_settings`).

The samplers are the latent ones (`jaxdiff.latent.schedulers.LATENT_SAMPLERS`, each as the diffusers scheduler class
it names, made `from_config` of the folder's config); the default is the folder's own scheduler class. The denoiser is
the model family's (classifier-free guidance included); the scheduler sees only its first C output channels, as
DiTPipeline splits off a learned σ before `scheduler.step`. The initial latents are N(0, I) noise [B, h, w, C]
(scaled by diffusers' `init_noise_sigma` for the σ-grid samplers); the run returns the final latents.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.scheduler_config import SchedulerSettings
from jaxdiff.errors import UsageError
from jaxdiff.latent.scheduler_run import SchedulerRun
from jaxdiff.latent.schedulers import (
    KARRAS_SAMPLERS,
    LATENT_SAMPLERS,
    check_multistep_config,
    folder_sampler,
    pndm_points,
    run_points,
    sampler_scheduler,
    visited_timesteps,
)

Array = jax.Array

DEFAULT_STEPS = 50  # DiTPipeline's num_inference_steps


class SchedulerSampling:
    """The sampling methods of a `jaxdiff.families.Family` (`samplers`, `default_sampler`, `sampling_settings`,
    `model_calls`, `sampler_fn`) for a discrete-schedule `family` stepped by a diffusers scheduler (module
    docstring). `source` names the folder in messages."""

    draws_trajectories = False
    samplers = LATENT_SAMPLERS

    def __init__(self, scheduler: SchedulerSettings, family, source: str):
        self.scheduler = scheduler
        self.family = family
        self.default_sampler = folder_sampler(scheduler, source)

    def sampling_settings(self, sampler, steps, *, eta=0.0, spacing=None, **options) -> tuple[str, int, dict]:
        """(sampler, steps, {}) checked before any work: `sampler` None is the folder's, `steps` None is
        DiTPipeline's 50; the scheduler config sets the timestep spacing, so `spacing` may only be "karras" (the
        Karras σ grid, `use_karras_sigmas`, for KARRAS_SAMPLERS); no eta or other options."""
        sampler = sampler or self.default_sampler
        if sampler not in self.samplers:
            raise UsageError(f"unknown sampler {sampler!r}; a diffusers pipeline folder steps as one of "
                             f"{self.samplers}")  # fmt: skip
        if eta:
            raise UsageError(f"eta={eta}: the scheduler samplers take none (ddim is DDIMScheduler's η = 0)")
        if spacing not in (None, "karras") or (spacing == "karras" and sampler not in KARRAS_SAMPLERS):
            raise UsageError(f"spacing={spacing!r}: the folder's scheduler config sets the timestep spacing; only "
                             f"'karras' (Karras σ) may be given, for {KARRAS_SAMPLERS}")  # fmt: skip
        if options:
            raise UsageError(f"sampler options {sorted(options)} are for continuous-time models")
        steps = DEFAULT_STEPS if steps is None else steps
        self._points(sampler, steps, spacing == "karras")
        return sampler, steps, {}

    def model_calls(self, sampler: str, steps: int, options: dict) -> int:
        """Model evaluations of one batch: `steps`, 2·steps − 1 for heun (HeunDiscreteScheduler's last step is
        Euler's), pndm's calls (`pndm_points`: steps + 1 from 2 steps, steps + 9 with the Runge–Kutta warm-up)."""
        if sampler == "pndm":
            return len(pndm_points(sampler_scheduler(self.scheduler, sampler), steps)) - 1
        return 2 * steps - 1 if sampler == "heun" else steps

    def _points(self, sampler: str, steps: int, karras: bool) -> np.ndarray:
        """The decreasing training steps (ddim, ddpm; pndm: `pndm_points`) or noise levels ending at 0
        (SIGMA_SAMPLERS) of a run, after checking `steps` and the scheduler config's settings for `sampler`."""
        scheduler = sampler_scheduler(self.scheduler, sampler)
        check_multistep_config(scheduler, sampler)
        visited_timesteps(scheduler, steps)  # checks steps
        return run_points(scheduler, sampler, steps, karras)

    def sampler_fn(self, model, shape: tuple[int, ...], *, guidance: float = 0.0, wrap: Callable | None = None,
                   sampler: str, steps: int, spacing: str | None, **_) -> Callable:  # fmt: skip
        """draw(params, rng, labels, noise=None) -> the final latents `shape` of the run; the family's denoiser
        of `model`, wrapped by `wrap` when given. `rng` splits into the noise's key and the sampler's."""
        scheduler_run = SchedulerRun(self.scheduler, sampler, self._points(sampler, steps, spacing == "karras"))
        channels = shape[-1]

        def draw(params, rng, labels, noise=None):
            fn = self.family.denoiser(model, params, labels=labels, guidance=guidance)
            fn = wrap(fn) if wrap else fn
            model_fn = lambda x, t: fn(x, t)[..., :channels]  # noqa: E731 - the learned σ split off
            noise_key, loop_key = jax.random.split(rng)
            noise = jax.random.normal(noise_key, shape, jnp.float32) if noise is None else noise
            return scheduler_run(model_fn, scheduler_run.start(noise), loop_key)

        return draw
