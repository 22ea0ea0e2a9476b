"""The latent samplers of `jaxdiff.latent.pipeline`, matched step for step to diffusers' schedulers: which
training steps or noise levels a run visits, how each sampler steps through them, and the noising of image
latents to a step.

The steps visited are those of diffusers' DDIMScheduler for the folder's scheduler config (`timestep_spacing`
leading / trailing / linspace, `steps_offset`); the loop runs on the schedule respaced to those steps, so
jaxdiff's discrete samplers step between consecutive visited steps, and DDIM's last step ends at ᾱ = 1 or, without
`set_alpha_to_one`, at ᾱ of step 0, as diffusers' does. (diffusers' DDIMScheduler steps from t to t − T // steps,
which is the next visited step for "leading" spacing, and for "trailing" when steps divides T, but not always
otherwise; we always step to the next visited step.)

Samplers (`sampler=`), each as the diffusers scheduler named, made `from_config` of the folder's scheduler config
(`sampler_scheduler`: where the config names no timestep_spacing, each class takes its own default):
  ddim           DDIMScheduler (η = 0), on the steps above (`ddim_denoise`);
  ddpm           DDPMScheduler (ancestral, "fixed_small" variance), on the same steps;
  dpm_solver++   DPMSolverMultistepScheduler, with the config's algorithm_type, solver_order (1, 2, 3), solver_type,
                 final_sigmas_type, lower_order_final and euler_at_final (defaults: dpmsolver++, 2, midpoint, 0);
  dpm_solver++_sde  the same with algorithm_type="sde-dpmsolver++" ("DPM++ 2M SDE"): step i adds
                 σ'·sqrt(1 − (σ'/σ)²)·z_i, z_i = `jaxdiff.samplers.grids.step_noise(rng, i, x)`;
  euler, heun    EulerDiscreteScheduler, HeunDiscreteScheduler;
  euler_ancestral  EulerAncestralDiscreteScheduler (Euler's grid, noise at every step; no Karras option);
  lms            LMSDiscreteScheduler (order 4, Euler's grid);
  unipc          UniPCMultistepScheduler (bh2, order 2, corrector at every step, DPM-Solver++'s grid);
  deis           DEISMultistepScheduler (order 2, DPM-Solver++'s steps, ending at σ of step 0, not 0);
  pndm           PNDMScheduler (`jaxdiff.samplers.pndm`): PLMS with skip_prk_steps (the model called at DDIM's steps
                 with the second one twice), after its Runge–Kutta warm-up without (`pndm_points`); ε or v
                 prediction, each step to t − T // steps, the last to ᾱ = 1 or, without set_alpha_to_one (the
                 class's default), to ᾱ of step 0.
`sampler=None` is the folder's own class (`folder_sampler`, from the table FOLDER_SAMPLERS), read with the config's
settings as the class reads them (algorithm_type, solver_order, use_karras_sigmas, ...).
All but ddim and ddpm (SIGMA_SAMPLERS) step on diffusers' grid of noise levels σ = sqrt((1 − ᾱ)/ᾱ)
(`sampler_levels`, from `sigma_levels`; `karras=True` is `use_karras_sigmas`, for KARRAS_SAMPLERS), ending at
σ = 0 on x̂_0, with the U-Net called at diffusers' step for each σ (`step_of_sigma`, integer for
ROUNDED_STEP_SAMPLERS). Their initial latents are scaled by diffusers' `init_noise_sigma`. euler_ancestral draws
the noise of step i as `jaxdiff.samplers.grids.step_noise(rng, i, x)` from the run's sampler key `rng`.

Each x̂_0 is limited as the sampler's class does (`denoised_limit`): clip_sample to ±clip_sample_range (ddim, ddpm,
heun), dynamic thresholding (ddim, ddpm, dpm_solver++, dpm_solver++_sde, unipc, deis); with rescale_betas_zero_snr
each class steps on its own schedule (`sampler_scheduler`), ddim and ddpm from ᾱ = 0 with "trailing" steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checks import is_int
from jaxdiff.diffusion import predict_start
from jaxdiff.diffusion.denoisers import discrete_x0_denoiser
from jaxdiff.diffusion.limits import DenoisedLimit
from jaxdiff.diffusion.scheduler_config import SchedulerSettings, class_schedule
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.samplers import sample
from jaxdiff.samplers.ddim_dpm import ddim_steps
from jaxdiff.samplers.grids import karras_sigmas
from jaxdiff.samplers.pndm import pndm_calls, pndm_steps, pndm_table
from jaxdiff.samplers.registry import REGISTRY, samplers_for
from jaxdiff.schedule import Schedule, respace

Array = jax.Array

# Generated from the sampler registry (`jaxdiff.samplers.registry`, each entry's `LatentSpec`).
LATENT_SAMPLERS = samplers_for("latent")
_LATENT = {name: REGISTRY[name].latent for name in LATENT_SAMPLERS}
# The samplers on σ grids (the others, ddim and ddpm, on the respaced training steps).
SIGMA_SAMPLERS = tuple(name for name, spec in _LATENT.items() if spec.run)
# DPMSolverMultistepScheduler's, ODE and SDE.
DPM_SAMPLERS = tuple(name for name, spec in _LATENT.items() if spec.scheduler_class == "DPMSolverMultistepScheduler")
# The σ-grid samplers whose diffusers scheduler has `use_karras_sigmas`.
KARRAS_SAMPLERS = tuple(name for name in SIGMA_SAMPLERS if _LATENT[name].karras)
# The grid (as `sigma_levels` names it) that each other σ-grid sampler's scheduler builds in `set_timesteps`.
GRID_OF = {name: spec.grid for name, spec in _LATENT.items() if spec.grid}
# The σ-grid samplers whose scheduler calls the U-Net at integer steps (the others at fractional ones).
ROUNDED_STEP_SAMPLERS = tuple(name for name in SIGMA_SAMPLERS if _LATENT[name].rounded_steps)
# The σ-grid samplers whose scheduler's state is the unscaled x (init_noise_sigma σ_max, or sqrt(1 + σ_max²) with
# "leading" spacing); the others' state is x_t = x/sqrt(1 + σ²) (init_noise_sigma 1).
UNSCALED_STATE_SAMPLERS = tuple(name for name in SIGMA_SAMPLERS if _LATENT[name].unscaled_state)
# The timestep_spacing default of each sampler's diffusers scheduler class, which diffusers' `from_config` uses
# when the folder's scheduler config has none (as SD 1.x's released configs).
CLASS_DEFAULT_SPACING = {name: spec.default_spacing for name, spec in _LATENT.items()}
# The clip_sample default of the scheduler classes that take the key (diffusers' default when the config has none).
CLASS_DEFAULT_CLIP = {name: spec.default_clip for name, spec in _LATENT.items() if spec.default_clip is not None}
# The set_alpha_to_one default of the classes whose default is not DDIMScheduler's True.
CLASS_DEFAULT_ALPHA_TO_ONE = {"pndm": False}
# diffusers scheduler class (a folder's `_class_name`) -> the sampler that steps as it: each class's first registered
# sampler, which reads the config's settings as the class does (DPMSolverMultistepScheduler's algorithm_type
# sde-dpmsolver++ included). A config without `_class_name` (a jaxdiff training run's) is DDIMScheduler's.
FOLDER_SAMPLERS = {spec.scheduler_class: name for name, spec in reversed(_LATENT.items())}
DEFAULT_SCHEDULER_CLASS = "DDIMScheduler"


def folder_sampler(scheduler: SchedulerSettings, source: str) -> str:
    """The latent sampler that steps as the scheduler config's `_class_name` (FOLDER_SAMPLERS); a WeightsError in
    one line naming the class and the supported ones for a class no sampler is."""
    kind = scheduler.config.get("_class_name", DEFAULT_SCHEDULER_CLASS)
    if kind not in FOLDER_SAMPLERS:
        raise WeightsError(f"{source}: unsupported scheduler _class_name={kind!r}; supported: "
                           f"{', '.join(sorted(FOLDER_SAMPLERS))}; an explicit sampler runs on its settings")  # fmt: skip
    return FOLDER_SAMPLERS[kind]


# --------------------------------------------------------------------------- steps


def visited_timesteps(scheduler: SchedulerSettings, steps: int) -> np.ndarray:
    """The training steps diffusers' DDIMScheduler visits for `steps` inference steps, decreasing, int64:
    leading: k·(T // steps) + steps_offset; trailing: round(T − k·T/steps) − 1; linspace: round(linspace(0, T−1))."""
    num_train = scheduler.schedule.num_timesteps
    if not is_int(steps, numpy=False) or not 1 <= steps <= num_train:
        raise UsageError(f"steps={steps!r} must be an int in [1, {num_train}]")
    if scheduler.timestep_spacing == "leading":
        increasing = np.arange(steps) * (num_train // steps) + scheduler.steps_offset
    elif scheduler.timestep_spacing == "trailing":
        increasing = np.round(np.arange(num_train, 0, -num_train / steps))[::-1] - 1
    else:
        increasing = np.round(np.linspace(0, num_train - 1, steps))
    increasing = increasing.astype(np.int64)
    if increasing[-1] >= num_train or np.any(np.diff(increasing) <= 0):
        raise UsageError(f"steps={steps} with steps_offset={scheduler.steps_offset} gives steps outside 0..{num_train - 1}")
    return increasing[::-1]


def sampler_scheduler(scheduler: SchedulerSettings, sampler: str) -> SchedulerSettings:
    """`scheduler` as `sampler`'s diffusers scheduler, made `from_config` of this config, reads it: the config's
    timestep_spacing, else its class default (`CLASS_DEFAULT_SPACING`); clip_sample likewise (`CLASS_DEFAULT_CLIP`,
    False for the classes without the key); thresholding only for the classes with the key; with
    rescale_betas_zero_snr, the class's schedule (`class_schedule`: ᾱ_{T-1} = 0 for ddim and ddpm, 2**-24 for
    the classes that keep σ finite, not rescaled for those without the key); dpm_solver++_sde sets
    algorithm_type="sde-dpmsolver++"; set_alpha_to_one is the config's, else the class default
    (CLASS_DEFAULT_ALPHA_TO_ONE)."""
    spec = _LATENT[sampler]
    spacing = scheduler.config.get("timestep_spacing", CLASS_DEFAULT_SPACING[sampler])
    clip = CLASS_DEFAULT_CLIP.get(sampler, False) if scheduler.clip_sample is None else scheduler.clip_sample
    clip = clip and sampler in CLASS_DEFAULT_CLIP
    algorithm = "sde-dpmsolver++" if sampler == "dpm_solver++_sde" else scheduler.algorithm_type
    schedule = scheduler.schedule
    if scheduler.unrescaled_betas is not None and spec.zero_snr_last != 0.0:
        schedule = class_schedule(scheduler.unrescaled_betas, spec.zero_snr_last)
    alpha_to_one = scheduler.set_alpha_to_one
    if "set_alpha_to_one" not in scheduler.config:
        alpha_to_one = CLASS_DEFAULT_ALPHA_TO_ONE.get(sampler, alpha_to_one)
    return scheduler._replace(timestep_spacing=spacing, clip_sample=clip, algorithm_type=algorithm, schedule=schedule,
                              thresholding=scheduler.thresholding and spec.thresholding,
                              set_alpha_to_one=alpha_to_one)  # fmt: skip


def denoised_limit(scheduler: SchedulerSettings) -> DenoisedLimit | None:
    """How the sampler of `scheduler` (from `sampler_scheduler`) limits each x̂_0: dynamic thresholding, else
    clipping to ±clip_sample_range, as diffusers' schedulers; None: not at all."""
    if scheduler.thresholding:
        return DenoisedLimit(None, scheduler.dynamic_thresholding_ratio, scheduler.sample_max_value)
    return DenoisedLimit(scheduler.clip_sample_range) if scheduler.clip_sample else None


def dpm_solver_timesteps(scheduler: SchedulerSettings, steps: int) -> np.ndarray:
    """The training steps diffusers' DPMSolverMultistepScheduler visits, decreasing, int64: leading:
    k·(T // (steps + 1)) + steps_offset for k = steps..1; trailing as DDIM; linspace: round(linspace(0, T−1,
    steps + 1)) without its 0."""
    num_train = scheduler.schedule.num_timesteps
    visited_timesteps(scheduler, steps)  # checks steps
    if scheduler.timestep_spacing == "leading":
        increasing = np.arange(1, steps + 1) * (num_train // (steps + 1)) + scheduler.steps_offset
    elif scheduler.timestep_spacing == "trailing":
        return visited_timesteps(scheduler, steps)
    else:
        increasing = np.round(np.linspace(0, num_train - 1, steps + 1))[1:]
    increasing = increasing.astype(np.int64)
    if increasing[-1] >= num_train or np.any(np.diff(increasing) <= 0):
        raise UsageError(f"steps={steps} is too many for dpm_solver++ with {scheduler.timestep_spacing} spacing "
                         f"on {num_train} training steps")  # fmt: skip
    return increasing[::-1]


def training_sigmas(scheduler: SchedulerSettings) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) of the training steps t = 0..T-1, float64, increasing."""
    alphas_cumprod = np.asarray(scheduler.schedule.alphas_cumprod, np.float64)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigma_levels(scheduler: SchedulerSettings, steps: int, *, sampler: str, karras: bool) -> np.ndarray:
    """diffusers' noise levels for `sampler` in SIGMA_SAMPLERS: [steps + 1] float32, decreasing, the last 0, or
    σ_min = σ(0) with final_sigmas_type="sigma_min" (dpm_solver++, dpm_solver++_sde, euler). σ is the noise level
    of the unscaled x = x_0 + σ·n.

    dpm_solver++: σ at `dpm_solver_timesteps`, or with karras the Karras grid (ρ = 7) from σ(T−1) to σ(0).
    euler, heun: σ interpolated linearly at EulerDiscreteScheduler's steps (DDIM's, but "linspace" is not
    rounded), or with karras the Karras grid between the first and last of those σ. `karras` or the config's
    use_karras_sigmas selects the Karras grid.
    """
    sigmas = training_sigmas(scheduler)
    karras = karras or scheduler.use_karras_sigmas
    sigma_min_final = scheduler.final_sigmas_type == "sigma_min" and sampler in (*DPM_SAMPLERS, "euler")
    if sampler in DPM_SAMPLERS and karras:
        levels = karras_sigmas(sigmas[-1], sigmas[0], steps)
    elif sampler in DPM_SAMPLERS:
        levels = sigmas[dpm_solver_timesteps(scheduler, steps)]
    else:
        if scheduler.timestep_spacing == "linspace":
            visited = np.linspace(0.0, len(sigmas) - 1.0, steps)[::-1]
        else:
            visited = visited_timesteps(scheduler, steps).astype(np.float64)
        levels = np.interp(visited, np.arange(len(sigmas)), sigmas)
        if karras:
            levels = karras_sigmas(levels[0], levels[-1], steps)
    return np.append(levels, sigmas[0] if sigma_min_final else 0.0).astype(np.float32)


def sampler_levels(scheduler: SchedulerSettings, steps: int, *, sampler: str, karras: bool) -> np.ndarray:
    """The noise levels of `sampler` in SIGMA_SAMPLERS: [steps + 1] float32, decreasing: `sigma_levels` of the
    grid its scheduler builds (GRID_OF), read with the config keys its class has: euler_ancestral has no
    use_karras_sigmas, euler_ancestral, lms and deis no final_sigmas_type. deis ends, as DEISMultistepScheduler,
    at σ of training step 0 (karras: at the last Karras level again, a step that changes nothing), not at 0."""
    if sampler not in GRID_OF:
        return sigma_levels(scheduler, steps, sampler=sampler, karras=karras)
    if sampler != "unipc":
        scheduler = scheduler._replace(final_sigmas_type="zero")
    if sampler == "euler_ancestral":
        scheduler = scheduler._replace(use_karras_sigmas=False)
    levels = sigma_levels(scheduler, steps, sampler=GRID_OF[sampler], karras=karras)
    if sampler == "deis":
        levels[-1] = levels[-2] if karras or scheduler.use_karras_sigmas else training_sigmas(scheduler)[0]
    return levels


def check_multistep_config(scheduler: SchedulerSettings, sampler: str) -> None:
    """Refuses (WeightsError) the config values that would make diffusers' UniPC, DEIS or PNDM step otherwise than
    jaxdiff's unipc, deis and pndm: solver_order other than 2, lower_order_final false, and for UniPC solver_type
    "bh1" (diffusers reads midpoint, heun and logrho as bh2; DEIS reads every solver_type as logrho); for PNDM,
    prediction_type sample (which PNDMScheduler refuses)."""
    if sampler == "pndm" and scheduler.mean_type == "x_start":
        raise WeightsError("unsupported setting prediction_type='sample' for sampler 'pndm' (PNDMScheduler reads "
                           "epsilon or v_prediction)")  # fmt: skip
    if sampler not in ("unipc", "deis"):
        return
    refused = {"solver_order": scheduler.solver_order != 2, "lower_order_final": not scheduler.lower_order_final,
               "solver_type": sampler == "unipc" and scheduler.config.get("solver_type") == "bh1"}  # fmt: skip
    for key, bad in refused.items():
        if bad:
            raise WeightsError(f"unsupported setting {key}={scheduler.config.get(key)!r} for sampler {sampler!r} "
                               "(jaxdiff's unipc and deis are diffusers' defaults: solver_order 2, lower_order_final, "
                               "UniPC's bh2)")  # fmt: skip


def initial_scale(scheduler: SchedulerSettings, sampler: str, sigma_max: float) -> float:
    """diffusers' `init_noise_sigma` in the unscaled space x = x_t·sqrt(1 + σ²): sqrt(1 + σ_max²), except for
    UNSCALED_STATE_SAMPLERS with "linspace" or "trailing" spacing, where diffusers takes σ_max."""
    if sampler in UNSCALED_STATE_SAMPLERS and scheduler.timestep_spacing != "leading":
        return float(sigma_max)
    return math.sqrt(1.0 + float(sigma_max) ** 2)


def step_of_sigma(scheduler: SchedulerSettings, sigma: Array, *, rounded: bool) -> Array:
    """The training step at noise level σ [B] as diffusers' `_sigma_to_t`: linear in log σ between the steps'
    log σ_t, clipped to [0, T−1], float32 [B]; rounded (ROUNDED_STEP_SAMPLERS) or fractional (the others)."""
    log_sigmas = jnp.asarray(np.log(training_sigmas(scheduler)), jnp.float32)
    t = jnp.interp(jnp.log(sigma), log_sigmas, jnp.arange(log_sigmas.shape[0], dtype=jnp.float32))
    return jnp.round(t) if rounded else t


def sigma_denoiser(model_fn: Callable[[Array, Array], Array], scheduler: SchedulerSettings, *,
                   rounded: bool) -> Callable[[Array, Array], Array]:  # fmt: skip
    """EDM's D(x; σ) of the U-Net `model_fn(x_t, t)` as diffusers' σ-grid schedulers use it: the U-Net sees
    x_t = x/sqrt(1 + σ²) at `step_of_sigma(σ)`; its ε, v or x_0 output becomes x̂_0 with this σ
    (ε: x − σ·ε̂; v: (x_t − σ·v̂)/sqrt(1 + σ²))."""
    mean_type = scheduler.mean_type

    def denoiser(x: Array, sigma: Array) -> Array:
        s = sigma[:, None, None, None]
        x_t = x / jnp.sqrt(1.0 + s**2)
        output = model_fn(x_t, step_of_sigma(scheduler, sigma, rounded=rounded))
        if mean_type == "eps":
            return x - s * output
        if mean_type == "v":
            return (x_t - s * output) / jnp.sqrt(1.0 + s**2)
        return output

    return denoiser


def denoise_on_levels(denoiser: Callable[[Array, Array], Array], levels: np.ndarray, x_start: Array, *,
                      sampler: str, scheduler: SchedulerSettings | None = None, rng: Array | None = None) -> Array:  # fmt: skip
    """The final latents from the unscaled x_start at σ = levels[0], by `sampler` in SIGMA_SAMPLERS through
    `levels`: x̂_0 where levels end at 0, else the state at σ_min (DPM-Solver's VP x_t = x/sqrt(1 + σ_min²),
    Euler's unscaled x), as diffusers' schedulers end. The DPM samplers read `scheduler` (from
    `sampler_scheduler`) and draw the SDE's noise from `rng` (the registry's `LatentSpec.run`). Each x̂_0 is
    limited as the scheduler's class does (`denoised_limit`: heun's clip_sample, the multistep classes'
    thresholding)."""
    limit = None if scheduler is None else denoised_limit(scheduler)
    if limit is not None:
        unlimited = denoiser

        def denoiser(x: Array, sigma: Array) -> Array:
            return limit(unlimited(x, sigma))

    return _LATENT[sampler].run(denoiser, levels, x_start, scheduler, rng)


def img2img_timesteps(timesteps: np.ndarray, strength: float) -> np.ndarray:
    """The last int(steps·strength) of `timesteps`, where diffusers' image-to-image starts (SDEdit)."""
    kept = min(int(len(timesteps) * strength), len(timesteps))
    if kept < 1:
        raise UsageError(f"strength={strength} with steps={len(timesteps)} leaves no step: need steps·strength >= 1")
    return timesteps[len(timesteps) - kept :]


def pndm_points(scheduler: SchedulerSettings, steps: int, strength: float = 1.0) -> np.ndarray:
    """PNDMScheduler's run for `steps` (`scheduler` from `sampler_scheduler`): the training steps of its model
    calls (`pndm_calls` of `visited_timesteps`, with the Runge–Kutta warm-up unless skip_prk_steps; with
    strength < 1 the last int(steps·strength) + 1 of the PLMS calls, where diffusers' image-to-image starts), then
    the last call's step − T // steps, from which `step_plan` reads the stride: int64 [calls + 1], the last entry
    possibly negative. The warm-up needs steps >= 4 and strength 1 (a UsageError naming the value otherwise)."""
    visited = visited_timesteps(scheduler, steps)
    stride = scheduler.schedule.num_timesteps // steps
    warm_up = not scheduler.skip_prk_steps
    if warm_up and steps < 4:
        raise UsageError(f"steps={steps}: PNDM's Runge–Kutta warm-up (skip_prk_steps=false) needs steps >= 4")
    if warm_up and strength != 1.0:
        raise UsageError(f"strength={strength}: image-to-image with PNDM's Runge–Kutta warm-up (skip_prk_steps=false) "
                         "is not implemented; use a config with skip_prk_steps=true or another sampler")  # fmt: skip
    calls = pndm_calls(visited, warm_up=warm_up, half=stride // 2)
    calls = calls[-(len(img2img_timesteps(visited, strength)) + 1) :] if not warm_up else calls
    return np.append(calls, calls[-1] - stride)


def run_points(
    scheduler: SchedulerSettings, sampler: str, steps: int, karras: bool, strength: float = 1.0
) -> np.ndarray:
    """What `sampler` steps through in a run of `steps` (`scheduler` from `sampler_scheduler`): the decreasing
    training steps (ddim, ddpm), `pndm_points` (pndm), or the noise levels ending at 0 (SIGMA_SAMPLERS); with
    strength < 1 only the last int(steps·strength) steps, where diffusers' image-to-image starts."""
    if sampler == "pndm":
        return pndm_points(scheduler, steps, strength)
    if sampler not in SIGMA_SAMPLERS:
        return img2img_timesteps(visited_timesteps(scheduler, steps), strength)
    levels = sampler_levels(scheduler, steps, sampler=sampler, karras=karras)
    return np.append(img2img_timesteps(levels[:-1], strength), levels[-1])


def add_noise(scheduler: SchedulerSettings, latents: Array, noise: Array, t: int) -> Array:
    """q(z_t | z_0): sqrt(ᾱ_t)·z_0 + sqrt(1 − ᾱ_t)·noise at training step t."""
    alpha_bar = scheduler.schedule.alphas_cumprod[t]
    return jnp.sqrt(alpha_bar) * latents + jnp.sqrt(1.0 - alpha_bar) * noise


# --------------------------------------------------------------------------- the discrete samplers' run


class StepPlan(NamedTuple):
    """The steps of one run, built outside jit: `timesteps` the decreasing training steps visited, `schedule`
    the training schedule respaced to them (index i <-> timesteps[::-1][i]), `final_alpha_bar` where DDIM's last
    step ends (1 with set_alpha_to_one, else ᾱ of step 0), `mean_type` the U-Net's prediction, `limit` how each
    x̂_0 is limited (`denoised_limit`; None: not at all), `level_schedule` the steps DDIM finds by their noise
    level (`schedule` without its last step where that is at ᾱ = 0, which `ddim_denoise` takes by hand). For pndm,
    `timesteps` are the model calls' steps, `schedule` and `level_schedule` the training schedule and `pndm_rows`
    PNDM's table (`jaxdiff.samplers.pndm.pndm_table`; None for ddim and ddpm)."""

    timesteps: np.ndarray
    schedule: Schedule
    final_alpha_bar: float
    mean_type: str
    limit: DenoisedLimit | None
    level_schedule: Schedule
    pndm_rows: dict | None = None


def step_plan(scheduler: SchedulerSettings, timesteps: np.ndarray, sampler: str = "ddim") -> StepPlan:
    """The `StepPlan` of `sampler` (ddim, ddpm: the decreasing training steps `timesteps`; pndm: `pndm_points`)
    under `scheduler` (from `sampler_scheduler`)."""
    alphas_cumprod = np.asarray(scheduler.schedule.alphas_cumprod, np.float64)
    final = 1.0 if scheduler.set_alpha_to_one else float(alphas_cumprod[0])
    if sampler == "pndm":
        calls = np.asarray(timesteps[:-1], np.int64)
        rows = pndm_table(calls, int(calls[-1] - timesteps[-1]), alphas_cumprod, final,
                          warm_up=not scheduler.skip_prk_steps)  # fmt: skip
        return StepPlan(calls, scheduler.schedule, final, scheduler.mean_type, None, scheduler.schedule, rows)
    schedule = respace(scheduler.schedule, timesteps[::-1])
    pure_noise = len(timesteps) > 1 and alphas_cumprod[timesteps[0]] == 0
    level_schedule = respace(schedule, np.arange(len(timesteps) - 1)) if pure_noise else schedule
    return StepPlan(timesteps, schedule, final, scheduler.mean_type, denoised_limit(scheduler), level_schedule)


def denoise(denoise_fn: Callable[[Array, Array], Array], plan: StepPlan, x_start: Array, rng: Array, *,
            sampler: str) -> Array:  # fmt: skip
    """Run `sampler` (ddim, ddpm or pndm) from latents `x_start` at plan.timesteps[0] through all of plan.timesteps
    as one scan; `denoise_fn` gets step indices into plan.timesteps[::-1] (pndm: into `pndm_points`[::-1], call k
    at len(plan.timesteps) − k). Returns the final latents: ddpm's x̂_0; DDIM's x = sqrt(ᾱ_final)·x̂_0 +
    sqrt(1 − ᾱ_final)·ε̂ from its last state, as diffusers' DDIMScheduler (`ddim_denoise`); PNDM's last state."""
    if sampler == "pndm":
        count = len(plan.timesteps)
        return pndm_steps(lambda x, k: denoise_fn(x, count - k), x_start, plan.pndm_rows, mean_type=plan.mean_type)
    if sampler == "ddim":
        return ddim_denoise(denoise_fn, plan, x_start)
    return sample(
        denoise_fn, plan.schedule, tuple(x_start.shape), rng, sampler=sampler, steps=len(plan.timesteps),
        spacing="uniform", clip_denoised=plan.limit or False, var_type="fixedsmall", mean_type=plan.mean_type,
        x_T=x_start,
    )  # fmt: skip


def ddim_denoise(denoise_fn: Callable[[Array, Array], Array], plan: StepPlan, x_start: Array) -> Array:
    """diffusers' DDIMScheduler (η = 0) from the VP latents x_start [B, h, w, C] at plan.timesteps[0] to
    ᾱ_final: `ddim_steps` in the unscaled x on σ_k = sqrt((1 − ᾱ_k)/ᾱ_k) of the visited steps, then σ of
    ᾱ_final; ε̂ is the model's and x̂_0 is limited by plan.limit (`use_clipped_model_output` off). A first step
    at ᾱ = 0 (zero terminal SNR, "trailing" steps) starts from pure noise: ε̂ = x_start there (exactly, for v and
    x_0 predictions; ε-prediction gives NaN, as in diffusers) and x' = x̂_0 + σ'·x_start. Returns the VP latents
    x·sqrt(ᾱ_final)."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(plan.schedule.betas, np.float64))[::-1]  # the visited steps
    with np.errstate(divide="ignore"):
        sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
    sigma_final = math.sqrt((1.0 - plan.final_alpha_bar) / plan.final_alpha_bar)
    levels = np.append(sigmas, sigma_final).astype(np.float32)

    def predict_x0(x_t: Array, k: Array) -> Array:
        output = jnp.asarray(denoise_fn(x_t, k), jnp.float32)
        return predict_start(plan.schedule, output, x_t, k, plan.mean_type)

    count = len(plan.timesteps)
    if alphas_cumprod[0] > 0:
        x = x_start / np.float32(math.sqrt(alphas_cumprod[0]))
    else:  # pure noise: the first step by hand, the rest on the schedule without its last step
        x0 = predict_x0(x_start, jnp.full((x_start.shape[0],), count - 1, jnp.int32))
        x = (x0 if plan.limit is None else plan.limit(x0)) + levels[1] * x_start
        levels = levels[1:]
        if count == 1:
            return x / math.sqrt(1.0 + sigma_final**2)
    denoiser = discrete_x0_denoiser(predict_x0, plan.level_schedule)
    x = ddim_steps(denoiser, x, jnp.asarray(levels), limit=plan.limit)
    return x / math.sqrt(1.0 + sigma_final**2)
