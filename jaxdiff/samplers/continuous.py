"""`sample_continuous`: every continuous-time sampler, written once against EDM's denoiser D(x; σ).

Randomness: `init_key, noise_key = jax.random.split(rng)`; x_T = process.prior_sample(init_key, shape);
loop iteration i draws from fold_in(fold_in(noise_key, i), j) (`grids.step_noise`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff.checks import is_int, is_real
from jaxdiff.errors import UsageError
from jaxdiff.samplers.ddim_dpm import ddim_sample, dpm_solver_pp_sample
from jaxdiff.samplers.edm import edm_sample
from jaxdiff.samplers.ode import check_solver, check_tolerance, ode_sample
from jaxdiff.samplers.pc import CORRECTORS, PREDICTORS, pc_sample

Array = jax.Array

CONTINUOUS_SAMPLERS = (
    "euler_maruyama", "reverse_diffusion", "ancestral", "pc", "ode", "heun", "edm_stochastic", "dpm_solver++", "ddim"
)  # fmt: skip
DEFAULT_CONTINUOUS_STEPS = {"heun": 18, "edm_stochastic": 18, "dpm_solver++": 20, "ddim": 50}
_SDE_STEPS = 1000
_OPTIONS = {
    "euler_maruyama": {},
    "reverse_diffusion": {},
    "ancestral": {},
    "pc": {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16, "n_corrector": 1},
    "ode": {"rtol": 1e-5, "atol": 1e-5, "solver": "tsit5", "max_steps": 4096},
    "heun": {"rho": 7.0},
    "edm_stochastic": {"rho": 7.0, "s_churn": 0.0, "s_min": 0.0, "s_max": math.inf, "s_noise": 1.0},
    "dpm_solver++": {"rho": 7.0},
    "ddim": {"rho": 7.0, "eta": 0.0},
}


def sample_continuous(
    denoiser,
    process,
    shape,
    rng: Array,
    *,
    sampler: str,
    steps: int | None = None,
    clip_denoised: bool = False,
    return_nfe: bool = False,
    **options,
):
    """Samples x_0 [shape] float32 from `denoiser(x, sigma) -> x̂_0` (EDM's D, x = x_0 + σ·n, σ [B]).

    Samplers (defaults in parentheses):
      euler_maruyama, reverse_diffusion, ancestral   a predictor alone (steps 1000);
      pc          predictor (reverse_diffusion) + corrector `langevin` | `ald` | `none` (langevin),
                  snr (0.16), n_corrector (1) per step (steps 1000) — see `samplers.pc`;
      ode         the probability-flow ODE by diffrax, solver `tsit5` | `dopri5`, rtol = atol = 1e-5,
                  max_steps (4096; reaching it is an error naming the time reached) — see `samplers.ode`;
      heun        EDM's deterministic sampler (steps 18 = 35 evaluations, rho 7);
      edm_stochastic  EDM's stochastic sampler: s_churn (0), s_min (0), s_max (∞), s_noise (1);
      dpm_solver++    DPM-Solver++(2M) (steps 20, rho 7);  ddim  DDIM with eta (0) (steps 50, rho 7).
    Every sampler ends on x̂_0 = D at the process's t_min (σ = σ_t/α_t there). `clip_denoised` clips
    every x̂_0 to [-1, 1]. With `return_nfe`, returns (x_0, the number of denoiser evaluations).
    """
    shape = tuple(shape)
    steps, options = _validate(sampler, steps, shape, options)
    if clip_denoised:
        denoiser = _clipped(denoiser)
    init_key, noise_key = jax.random.split(rng)
    x_T = process.prior_sample(init_key, shape)
    if sampler in ("euler_maruyama", "reverse_diffusion", "ancestral"):
        run, options = pc_sample, {"predictor": sampler, "corrector": "none"}
    else:
        run = {"pc": pc_sample, "ode": ode_sample, "heun": edm_sample, "edm_stochastic": edm_sample,
               "dpm_solver++": dpm_solver_pp_sample, "ddim": ddim_sample}[sampler]  # fmt: skip
    x0, nfe = run(denoiser, process, x_T, noise_key, steps, **options)
    x0 = jnp.asarray(x0, jnp.float32)
    return (x0, nfe) if return_nfe else x0


def _clipped(denoiser):
    return lambda x, sigma: jnp.clip(denoiser(x, sigma), -1.0, 1.0)


def _validate(sampler, steps, shape, options) -> tuple[int, dict]:
    """Checks every argument before any work; returns (steps, options with defaults filled in)."""
    if sampler not in CONTINUOUS_SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; expected one of {CONTINUOUS_SAMPLERS}")
    if len(shape) < 2 or not all(is_int(n) and n > 0 for n in shape):
        raise UsageError(f"shape must be (B, ...) of at least 2 positive ints, got {shape}")
    allowed = _OPTIONS[sampler]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UsageError(f"unknown option(s) {unknown} for sampler {sampler!r}; allowed: {sorted(allowed)}")
    options = {**allowed, **options}
    if sampler == "ode" and steps is not None:
        raise UsageError(f"steps={steps!r}: sampler 'ode' chooses its own steps (set rtol, atol); pass steps=None")
    if steps is None:
        steps = DEFAULT_CONTINUOUS_STEPS.get(sampler, _SDE_STEPS)
    if not is_int(steps) or steps < 1:
        raise UsageError(f"steps={steps!r} must be an int >= 1")
    for name in ("snr", "rho", "s_churn", "s_min", "s_noise", "eta"):
        if name in options and not (is_real(options[name], finite=True) and options[name] >= 0):
            raise UsageError(f"{name}={options[name]!r} must be a finite number >= 0")
    if "rho" in options and options["rho"] == 0:
        raise UsageError("rho=0 is not allowed; expected a number > 0")
    if "s_max" in options and not (is_real(options["s_max"]) and options["s_max"] >= options["s_min"]):
        raise UsageError(f"s_max={options['s_max']!r} must be a number >= s_min={options['s_min']!r}")
    if "eta" in options and options["eta"] > 1:
        raise UsageError(f"eta={options['eta']!r} must lie in [0, 1]")
    if sampler == "pc":
        if options["predictor"] not in PREDICTORS:
            raise UsageError(f"unknown predictor {options['predictor']!r}; expected one of {PREDICTORS}")
        if options["corrector"] not in CORRECTORS:
            raise UsageError(f"unknown corrector {options['corrector']!r}; expected one of {CORRECTORS}")
        if not is_int(options["n_corrector"]) or options["n_corrector"] < 0:
            raise UsageError(f"n_corrector={options['n_corrector']!r} must be an int >= 0")
    if sampler == "ode":
        check_solver(options["solver"])
        check_tolerance("rtol", options["rtol"])
        check_tolerance("atol", options["atol"])
        if not is_int(options["max_steps"]) or options["max_steps"] < 1:
            raise UsageError(f"max_steps={options['max_steps']!r} must be an int >= 1")
    return int(steps), options
