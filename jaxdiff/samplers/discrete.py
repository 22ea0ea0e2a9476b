"""Samplers for a trained denoiser, each one `jax.lax.scan` over precomputed per-step tables.

Conventions: images are NHWC float32. The sampler state is x_t in the model's
variance-preserving scale (x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε), starting
from x_T ~ N(0, I). `denoise_fn(x_t, t)` returns the model output for x_t
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
from jaxdiff.diffusion import (
    MEAN_TYPES,
    VAR_TYPES,
    p_mean_variance,
    predict_noise_from_start,
    predict_start,
    split_model_output,
)
from jaxdiff.errors import UsageError
from jaxdiff.schedule import Schedule, respace

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]

SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "heun")
SPACINGS = ("uniform", "quadratic", "karras")
DEFAULT_STEPS = {"dpm_solver++": 20, "heun": 18}
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpm_solver++": "karras", "heun": "karras"}
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
    clip_denoised: bool = True,
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
    clip_denoised: clip every x̂_0 to [-1, 1], also inside the ODE solvers.
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
        x0 = predict_start(schedule, mean_output, x, t, mean_type)
        return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

    if sampler == "ddpm":
        step, tables, extra = _ddpm(
            denoise_fn, schedule, timesteps, noise_key,
            var_type=var_type, mean_type=mean_type, clip_denoised=clip_denoised,
        )  # fmt: skip
    elif sampler == "ddim":
        step, tables, extra = _ddim(predict_x0, schedule, alphas_cumprod, timesteps, noise_key, eta)
    elif sampler == "dpm_solver++":
        step, tables, extra = _dpm_solver_pp(predict_x0, alphas_cumprod, timesteps, x_T)
    else:
        step, tables, extra = _heun(predict_x0, alphas_cumprod, timesteps)

    samples, trajectory = _scan(step, (x_T, extra), tables, steps, every if return_trajectory else None)
    return (samples, trajectory) if return_trajectory else samples


# Validation and shared pieces


def _validate(
    schedule: Schedule, shape, *, sampler, steps, eta, spacing, var_type, mean_type, trajectory_every
) -> tuple[int, str, int]:
    """Check every argument before any work; returns (steps, spacing, trajectory_every), defaults filled in."""
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
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


_TABLE_DTYPES = {"b": np.bool_, "i": np.int32, "f": np.float32}


def _scan(step, carry, tables: dict[str, np.ndarray], steps: int, every: int | None) -> tuple[Array, Array | None]:
    """Run `step(carry, xs) -> carry` over the rows of `tables` (plus xs["i"] = 0..steps-1).

    carry[0] is the state x; with `every`, also returns the states after steps
    every-1, 2·every-1, ... and the last, stacked to [ceil(steps/every), *x.shape].
    """
    xs = {name: np.asarray(v, _TABLE_DTYPES[np.asarray(v).dtype.kind]) for name, v in tables.items()}
    xs["i"] = np.arange(steps, dtype=np.int32)
    if every is None:
        carry, _ = jax.lax.scan(lambda c, row: (step(c, row), None), carry, xs)
        return carry[0], None

    def body(c, row):
        state, frames = c
        state = step(state, row)
        return (state, frames.at[row["i"] // every].set(state[0])), None

    x = carry[0]
    frames = jnp.zeros((-(-steps // every),) + x.shape, x.dtype)
    (carry, frames), _ = jax.lax.scan(body, (carry, frames), xs)
    return carry[0], frames


# The samplers: each returns (step, per-step tables, initial extra carry)


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

    tables = {"k": np.arange(num_steps)[::-1], "t": timesteps[::-1]}
    return step, tables, ()


def _ddim(predict_x0, schedule, alphas_cumprod, timesteps, noise_key, eta):
    """x_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1 − ᾱ_prev − σ²)·ε̂ + σ·z, ε̂ recomputed from the (clipped) x̂_0.

    σ = eta·sqrt((1 − ᾱ_prev)/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ_prev); ᾱ_prev = 1 after the last step.
    """
    t = timesteps[::-1]
    ac = alphas_cumprod[t]
    ac_prev = np.append(ac[1:], 1.0)
    sigma = eta * np.sqrt((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev))
    direction = 1.0 - ac_prev - sigma**2
    if np.any(direction < 0):
        bad = int(np.flatnonzero(direction < 0)[0])
        raise UsageError(f"eta={eta} is too large: the DDIM noise exceeds 1 − ᾱ_prev at step t={int(t[bad])}")

    def step(carry, row):
        x, extra = carry
        t_b = _batch(row["t"], x)
        x0 = predict_x0(x, t_b)
        eps = predict_noise_from_start(schedule, x, t_b, x0)
        x = row["c_x0"] * x0 + row["c_eps"] * eps
        if eta > 0:
            x = x + row["c_noise"] * _noise(noise_key, row["i"], x)
        return x, extra

    tables = {"t": t, "c_x0": np.sqrt(ac_prev), "c_eps": np.sqrt(direction), "c_noise": sigma}
    return step, tables, ()


def _dpm_solver_pp(predict_x0, alphas_cumprod, timesteps, x_T):
    """DPM-Solver++(2M) (Lu et al. 2022): x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h})·D_i.

    D_i = (1 + c_i)·x̂_0(i) − c_i·x̂_0(i-1), c_i = h_i / (2·h_{i-1}), h_i = λ_{i+1} − λ_i;
    c_0 = 0 (first order). The last step goes to α = 1, σ = 0 (λ = ∞): x = x̂_0.
    """
    t = timesteps[::-1]
    alpha = np.sqrt(alphas_cumprod[t])
    sigma = np.sqrt(1.0 - alphas_cumprod[t])
    h = np.diff(np.log(alpha) - np.log(sigma))
    c = np.zeros(t.size)
    c[1:-1] = h[1:] / (2.0 * h[:-1])
    tables = {
        "t": t,
        "a": np.append(sigma[1:] / sigma[:-1], 0.0),
        "b": np.append(alpha[1:] * -np.expm1(-h), 1.0),
        "c": c,
    }

    def step(carry, row):
        x, prev_x0 = carry
        x0 = predict_x0(x, _batch(row["t"], x))
        d = (1.0 + row["c"]) * x0 - row["c"] * prev_x0
        return row["a"] * x + row["b"] * d, x0

    return step, tables, jnp.zeros_like(x_T)


def _heun(predict_x0, alphas_cumprod, timesteps):
    """EDM Heun steps on x_σ = x_t / sqrt(ᾱ_t): dx/dσ = (x_σ − D(x_σ; σ))/σ with D = x̂_0.

    The state is carried in the VP scale x_t = x_σ·sqrt(ᾱ_t) (scale 1 at σ = 0).
    """
    t = timesteps[::-1]
    sigma = _sigmas(alphas_cumprod[t])
    scale = np.sqrt(alphas_cumprod[t])
    tables = {
        "t": t,
        "t_next": np.append(t[1:], t[-1]),
        "sigma": sigma,
        "sigma_next": np.append(sigma[1:], 0.0),
        "scale": scale,
        "scale_next": np.append(scale[1:], 1.0),
        "last": np.arange(t.size) == t.size - 1,
    }

    def step(carry, row):
        x, extra = carry
        x_sigma = x / row["scale"]
        x0 = predict_x0(x, _batch(row["t"], x))
        slope = (x_sigma - x0) / row["sigma"]
        dsigma = row["sigma_next"] - row["sigma"]

        def heun():
            euler = x_sigma + dsigma * slope
            x0_next = predict_x0(euler * row["scale_next"], _batch(row["t_next"], x))
            slope_next = (euler - x0_next) / row["sigma_next"]
            return (x_sigma + dsigma * 0.5 * (slope + slope_next)) * row["scale_next"]

        # The Euler step to σ = 0 lands exactly on x̂_0.
        return jax.lax.cond(row["last"], lambda: x0, heun), extra

    return step, tables, ()
