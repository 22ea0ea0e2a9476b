"""`sample_continuous`: every continuous-time sampler, written once against EDM's denoiser D(x; σ).

Randomness: `init_key, noise_key = jax.random.split(rng)`; x_T = process.prior_sample(init_key, shape);
loop iteration i draws from fold_in(fold_in(noise_key, i), j) (`grids.step_noise`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.checks import is_int
from jaxdiff.diffusion.flow import clipped_denoiser
from jaxdiff.errors import UsageError
from jaxdiff.samplers.registry import check_options, default_steps, run_of, samplers_for

Array = jax.Array

CONTINUOUS_SAMPLERS = samplers_for("continuous")
DEFAULT_CONTINUOUS_STEPS = default_steps("continuous")
# The most steps a fixed-step sampler takes: 50 times the longest published schedule (score_sde's 2000 predictor
# steps), so that a mistyped count (e.g. 100000000, days of compute) is refused before any work.
MAX_STEPS = 100_000


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
    noise: Array | None = None,
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
      dpm_solver++    DPM-Solver++(2M) (steps 20, rho 7);  ddim  DDIM with eta (0) (steps 50, rho 7);
      euler, midpoint the probability-flow ODE in t on the uniform time grid (steps 100, 50) — see `samplers.flow`.
    Every sampler ends on x̂_0 = D at the process's t_min (σ = σ_t/α_t there). `clip_denoised` clips
    every x̂_0 to [-1, 1]. With `return_nfe`, returns (x_0, the number of denoiser evaluations). `noise`
    (float32 `shape`), if given, is the N(0, I) draw the prior sample is made of: x_T = prior_std·noise.

    On a flow process (`flow`, `gvp`) euler, heun, midpoint and euler_maruyama run in the interpolant's time from
    t = 1 to t = 0 itself, on the model's velocity (`samplers.flow`; option shift (1), euler_maruyama also SiT's
    diffusion_form (sigma), diffusion_norm (1), last_step (mean), last_step_size (0.04); steps 50, 25, 25, 250);
    the others run as above between its t_max and t_min.
    """
    shape = tuple(shape)
    steps, options = _validate(sampler, steps, shape, options, process)
    if clip_denoised:
        denoiser = clipped_denoiser(denoiser, -1.0, 1.0)
    init_key, noise_key = jax.random.split(rng)
    x_T = process.prior_sample(init_key, shape) if noise is None else process.prior_std() * noise
    x0, nfe = run_of(sampler, process).run(denoiser, process, x_T, noise_key, steps, **options)
    x0 = jnp.asarray(x0, jnp.float32)
    return (x0, nfe) if return_nfe else x0


def _validate(sampler, steps, shape, options, process) -> tuple[int | None, dict]:
    """Checks every argument before any work; returns (steps, options with defaults filled in)."""
    default = run_of(sampler, process).steps
    if len(shape) < 2 or not all(is_int(n) and n > 0 for n in shape):
        raise UsageError(f"shape must be (B, ...) of at least 2 positive ints, got {shape}")
    options = check_options(sampler, options, process)
    if default is None:
        if steps is not None:
            raise UsageError(f"steps={steps!r}: sampler {sampler!r} chooses its own steps (set rtol, atol); "
                             "pass steps=None")  # fmt: skip
        return None, options
    if steps is None:
        steps = default
    if not is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"steps={steps!r} must be an int in [1, {MAX_STEPS}]")
    return int(steps), options
