"""Samplers for a trained denoiser of the discrete schedule, each one `jax.lax.scan` over precomputed per-step tables.

Conventions: images are NHWC float32. The sampler state is x_t in the model's
variance-preserving scale (x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε), starting
from x_T ~ N(0, I). ddim, dpm_solver++ and heun are the σ-grid samplers of the
registry (`jaxdiff.samplers.registry`, written once for every family), run through
the σ bridge: the unscaled x = x_t/sqrt(ᾱ_t) at noise level σ_t = sqrt((1 − ᾱ_t)/ᾱ_t)
(x = x_0 + σ·n), levels decreasing to 0, and D(x; σ) the model's x̂_0 at the step
whose σ_t is σ (`_on_levels`). ddpm stays on the schedule's tables: its posterior
variance (`var_type`, learned variances) and the respaced schedule are DDPM's own,
with no σ-grid counterpart; it is the reference the others are checked against.
`denoise_fn(x_t, t)` returns the model output for x_t
[B, H, W, C] and t int32 [B], the original 0-based step (0..T-1) of the full
schedule, also when a sampler visits a subset of the steps. The model output
is ε, x_0 or v (`mean_type`), with C more channels for learned variances.

The per-step coefficients are computed once in float64 NumPy from the
schedule, which must therefore be concrete (close over it when jitting);
the loop body is traced once, so compile time does not grow with the
number of steps.

Randomness: `init_key, noise_key = jax.random.split(rng)`; x_T =
normal(init_key, shape); the noise of loop iteration i (i = 0 is the first,
noisiest step) is normal(fold_in(noise_key, i), shape).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checks import is_int, is_real
from jaxdiff.diffusion import MEAN_TYPES, VAR_TYPES, p_mean_variance, predict_start, split_model_output
from jaxdiff.diffusion.denoisers import discrete_x0_denoiser
from jaxdiff.diffusion.limits import DenoisedLimit, limit_denoised
from jaxdiff.errors import UsageError
from jaxdiff.samplers.grids import scan_steps
from jaxdiff.samplers.registry import REGISTRY, default_steps, sampler_spec, samplers_for
from jaxdiff.schedule import Schedule, respace

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]

SAMPLERS = samplers_for("discrete")
SPACINGS = ("uniform", "quadratic", "karras")
DEFAULT_STEPS = default_steps("discrete")
DEFAULT_SPACING = {name: REGISTRY[name].spacing for name in SAMPLERS}
KARRAS_RHO = 7.0
TRAJECTORY_FRAMES = 10


def sampling_timesteps(schedule: Schedule, steps: int, spacing: str = "uniform") -> np.ndarray:
    """`steps` strictly increasing 0-based steps from 0 to T-1 (just [T-1] for one step), int64.

    With u_i evenly spaced in [0, 1]: uniform t_i = round(u_i·(T-1)); quadratic
    t_i = round(u_i²·(T-1)); karras: the σ grid of Karras et al. (2022),
    σ_i = (σ(0)^(1/ρ) + u_i·(σ(T-1)^(1/ρ) − σ(0)^(1/ρ)))^ρ with ρ = 7 and
    σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), each σ_i snapped to the step nearest in log σ.
    Where rounding would repeat a step, steps move up (or down near T-1) to stay distinct.
    """
    num_timesteps = schedule.num_timesteps
    if spacing not in SPACINGS:
        raise UsageError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if not is_int(steps) or not 1 <= steps <= num_timesteps:
        raise UsageError(f"steps={steps!r} must be an int in [1, T={num_timesteps}]")
    u = np.linspace(1.0, 0.0, steps)[::-1]
    if spacing == "karras":
        log_sigmas = np.log(_sigmas(_alphas_cumprod(schedule, needs_signal="spacing 'karras'")))
        root_min, root_max = np.exp(log_sigmas[0] / KARRAS_RHO), np.exp(log_sigmas[-1] / KARRAS_RHO)
        grid = (root_min * (1.0 - u) + root_max * u) ** KARRAS_RHO
        nearest = np.argmin(np.abs(np.log(grid)[:, None] - log_sigmas[None, :]), axis=1)
    else:
        nearest = np.floor((u if spacing == "uniform" else u**2) * (num_timesteps - 1) + 0.5).astype(np.int64)
    index = np.arange(steps)
    pushed_up = np.maximum.accumulate(nearest - index) + index
    return np.minimum(pushed_up, num_timesteps - steps + index)


def sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    shape: tuple[int, int, int, int],
    rng: Array,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str | None = None,
    clip_denoised: bool | DenoisedLimit = True,
    var_type: str = "fixedlarge",
    mean_type: str = "eps",
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
    x_T: Array | None = None,
) -> Array | tuple[Array, Array]:
    """Draw images of `shape` = (B, H, W, C): float32 NHWC, in [-1, 1] when `clip_denoised`.

    Every sampler visits the steps `sampling_timesteps(schedule, steps, spacing)`, calling
    the model with those original step indices, and returns x̂_0 (clipped when
    `clip_denoised`) predicted at the last of them, t = 0 (t = T-1 for a single step).
      ddpm          ancestral sampling as the official DDPM code: posterior mean of the
                    (clipped) x̂_0, variance per `var_type`, no noise at the last step; with
                    fewer than T steps, on the respaced schedule (improved DDPM).
      ddim          DDIM with noise scale `eta` (deterministic for eta = 0), ε̂ recomputed
                    from the (clipped) x̂_0.
      dpm_solver++  DPM-Solver++(2M), data prediction, λ = log(α/σ) of the discrete steps,
                    first step first-order; the last step goes from t = 0 to the clean image
                    (first-order, λ = ∞), so the result is x̂_0 at t = 0.
      heun          the probability-flow ODE in σ = sqrt((1 − ᾱ)/ᾱ) by Heun's method (EDM),
                    the model evaluated at the grid's own discrete steps; the last step, to
                    σ = 0, is Euler, so `steps` σ values take 2·steps − 1 model calls.
    steps: the number of steps, default T (ddpm, ddim), 20 (dpm_solver++), 18 (heun).
    spacing: `uniform`, `quadratic` or `karras`; default `uniform` for ddpm and ddim,
      `karras` (ρ = 7) for dpm_solver++ and heun.
    clip_denoised: clip every x̂_0 to [-1, 1], also inside the ODE solvers; a
      `jaxdiff.diffusion.limits.DenoisedLimit` limits each x̂_0 as it says instead.
    var_type: how ddpm reads the variance; the other samplers use only the mean channels.
    return_trajectory: also return the state x_t after steps every-1, 2·every-1, ... and
      after the last step, [ceil(steps / every), B, H, W, C] with every = `trajectory_every`
      (default ceil(steps / 10)); the last entry is the samples.
    x_T: the starting state [B, H, W, C] at the first visited step, instead of normal(init_key, shape).
    """
    steps, spacing, every = _validate(
        schedule, shape, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
        var_type=var_type, mean_type=mean_type, trajectory_every=trajectory_every,
    )  # fmt: skip
    alphas_cumprod = _alphas_cumprod(schedule, needs_signal=None if sampler == "ddpm" else f"sampler {sampler!r}")
    timesteps = sampling_timesteps(schedule, steps, spacing)
    init_key, noise_key = jax.random.split(rng)
    if x_T is None:
        x_T = jax.random.normal(init_key, shape, jnp.float32)
    elif tuple(x_T.shape) != tuple(shape):
        raise UsageError(f"x_T has shape {tuple(x_T.shape)}; expected shape {tuple(shape)}")

    def predict_x0(x: Array, t: Array) -> Array:
        mean_output, _ = split_model_output(_call(denoise_fn, x, t), x, var_type)
        return limit_denoised(predict_start(schedule, mean_output, x, t, mean_type), clip_denoised)

    every = every if return_trajectory else None
    run = sampler_spec(sampler).on_levels
    if run is None:
        step, tables = _ddpm(
            denoise_fn, schedule, timesteps, noise_key,
            var_type=var_type, mean_type=mean_type, clip_denoised=clip_denoised,
        )  # fmt: skip
        (samples, _), trajectory = scan_steps(step, (x_T, ()), tables, every)
    else:
        samples, trajectory = _on_levels(
            run, predict_x0, schedule, alphas_cumprod, timesteps, x_T, noise_key, eta, every
        )  # fmt: skip
    return (samples, trajectory) if return_trajectory else samples


# Validation and shared pieces


def _validate(
    schedule: Schedule, shape, *, sampler, steps, eta, spacing, var_type, mean_type, trajectory_every
) -> tuple[int, str, int]:
    """Check every argument before any work; returns (steps, spacing, trajectory_every), defaults filled in."""
    sampler_spec(sampler, "discrete")
    if spacing is None:
        spacing = DEFAULT_SPACING[sampler]
    if spacing not in SPACINGS:
        raise UsageError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if var_type not in VAR_TYPES:
        raise UsageError(f"unknown var_type {var_type!r}; expected one of {VAR_TYPES}")
    if mean_type not in MEAN_TYPES:
        raise UsageError(f"unknown mean_type {mean_type!r}; expected one of {MEAN_TYPES}")
    shape = tuple(shape)
    if len(shape) != 4 or not all(is_int(n) and n > 0 for n in shape):
        raise UsageError(f"shape must be NHWC (B, H, W, C) of 4 positive ints, got {shape}")
    if not is_real(eta, finite=True) or eta < 0:
        raise UsageError(f"eta={eta!r} must be a finite number >= 0")
    if eta != 0 and sampler != "ddim":
        raise UsageError(f"eta={eta!r} applies only to sampler 'ddim', not {sampler!r}")
    num_timesteps = schedule.num_timesteps
    if steps is None:
        steps = min(DEFAULT_STEPS.get(sampler, num_timesteps), num_timesteps)
    if not is_int(steps) or not 1 <= steps <= num_timesteps:
        raise UsageError(f"steps={steps!r} must be an int in [1, T={num_timesteps}]")
    if trajectory_every is None:
        trajectory_every = -(-steps // TRAJECTORY_FRAMES)
    if not is_int(trajectory_every) or trajectory_every < 1:
        raise UsageError(f"trajectory_every={trajectory_every!r} must be an int >= 1")
    return int(steps), spacing, int(trajectory_every)


def _alphas_cumprod(schedule: Schedule, *, needs_signal: str | None) -> np.ndarray:
    """ᾱ [T] in float64 from the schedule's betas (which must be concrete).

    `needs_signal` names what divides by sqrt(ᾱ_t): then ᾱ_{T-1} = 0 (e.g. the `jsd` schedule) is an error.
    """
    try:
        betas = np.asarray(schedule.betas, dtype=np.float64)
    except jax.errors.TracerArrayConversionError:
        raise UsageError(
            "the schedule is traced (a jit argument, or built inside jit): samplers precompute their "
            "tables from a concrete schedule, so build it outside jit and close over it"
        ) from None
    alphas_cumprod = np.cumprod(1.0 - betas)
    if needs_signal and not alphas_cumprod[-1] > 0:
        raise UsageError(f"{needs_signal} needs ᾱ_t > 0 at every step, but this schedule has ᾱ_(T-1) = 0")
    return alphas_cumprod


def _sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), the noise level of x_t / sqrt(ᾱ_t)."""
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _call(denoise_fn: DenoiseFn, x: Array, t: Array) -> Array:
    """The model output at x [B,H,W,C] and step t [B], as float32."""
    return jnp.asarray(denoise_fn(x, t), jnp.float32)


def _batch(t: Array, x: Array) -> Array:
    """The scalar step t repeated for each of x's images: int32 [B]."""
    return jnp.full((x.shape[0],), t, jnp.int32)


def _noise(noise_key: Array, i: Array, like: Array) -> Array:
    return jax.random.normal(jax.random.fold_in(noise_key, i), like.shape, like.dtype)


# The samplers: DDPM's ancestral steps on the tables, the others on σ grids through the σ bridge


def _ddpm(denoise_fn, schedule, timesteps, noise_key, *, var_type, mean_type, clip_denoised):
    """Ancestral steps k = K-1..0 of the (respaced) schedule; the model sees timesteps[k]."""
    num_steps = timesteps.size
    sub = schedule if num_steps == schedule.num_timesteps else respace(schedule, timesteps)

    def step(carry, row):
        x, extra = carry
        k = _batch(row["k"], x)
        output = _call(denoise_fn, x, _batch(row["t"], x))
        mean, _, log_variance, _ = p_mean_variance(
            sub, output, x, k, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
        )
        scale = jnp.where(row["k"] > 0, jnp.exp(0.5 * log_variance), 0.0)
        return mean + scale * _noise(noise_key, row["i"], x), extra

    tables = {"k": np.arange(num_steps, dtype=np.int32)[::-1], "t": timesteps[::-1].astype(np.int32)}
    return step, tables


def _on_levels(run, predict_x0, schedule, alphas_cumprod, timesteps, x_T, noise_key, eta, every):
    """The σ-grid sampler `run` (a `SamplerSpec.on_levels`) on the visited steps, through the σ bridge
    (`jaxdiff.processes.from_schedule`): the unscaled x = x_t/sqrt(ᾱ_t) at σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) of the
    visited steps, decreasing, then σ = 0; D(x; σ) is the (clipped) x̂_0 of the model at x_t = x/sqrt(1 + σ²) and
    the step whose σ_t is σ. DDIM's noise of loop iteration i is `_noise(noise_key, i, x)`. Returns (x̂_0, the
    trajectory in the VP scale x_t = x·sqrt(ᾱ) (ᾱ = 1 at σ = 0), or None without `every`)."""
    t = timesteps[::-1]
    sigma = _sigmas(alphas_cumprod[t])
    sigma_next = np.append(sigma[1:], 0.0)
    # DDIM's noise τ = η·σ'·sqrt(1 − σ'²/σ²) must not exceed σ' (the noise 1 − ᾱ_prev of the VP view).
    too_noisy = (sigma_next > 0) & (eta**2 * (1.0 - (sigma_next / sigma) ** 2) > 1.0)
    if np.any(too_noisy):
        bad = int(np.flatnonzero(too_noisy)[0])
        raise UsageError(f"eta={eta} is too large: the DDIM noise exceeds 1 − ᾱ_prev at step t={int(t[bad])}")
    levels = jnp.asarray(np.append(sigma, 0.0), jnp.float32)
    x = x_T / np.float32(np.sqrt(alphas_cumprod[t[0]]))
    options = {"eta": eta, "noise": _noise} if eta > 0 else {}
    denoiser = discrete_x0_denoiser(predict_x0, schedule)
    if every is None:
        return run(denoiser, x, levels, noise_key, **options), None
    x0, frames = run(denoiser, x, levels, noise_key, every=every, **options)
    after = np.minimum(np.arange(every - 1, t.size - 1 + every, every), t.size - 1)  # the step of each frame
    scale = np.append(np.sqrt(alphas_cumprod[t[1:]]), 1.0)[after]
    return x0, frames * jnp.asarray(scale, jnp.float32).reshape((-1,) + (1,) * (frames.ndim - 1))
