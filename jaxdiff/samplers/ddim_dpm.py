"""DDIM and DPM-Solver++(2M) on any process, in the unscaled x = x_t/α at noise level σ = σ_t/α_t.

Both visit the `karras_noise_levels` grid (steps levels, then 0) with one evaluation per level and
end on x̂_0. With ε̂ = (x − D(x; σ))/σ and ᾱ = 1/(1 + σ²) (the VP view of the same marginals):
  ddim           x' = D + sqrt(σ'² − τ²)·ε̂ + τ·z, τ = η·σ'·sqrt(σ² − σ'²)/σ: DDIM's
                 x'_vp = sqrt(ᾱ')·D + sqrt(1 − ᾱ' − c²)·ε̂ + c·z,
                 c = η·sqrt((1 − ᾱ')/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ'), divided by sqrt(ᾱ') (η = 0: x' = D + σ'·ε̂, deterministic);
  dpm_solver++   x' = (σ'/σ)·x + (1 − σ'/σ)·((1 + c_i)·D_i − c_i·D_{i−1}), c_i = h_i/(2·h_{i−1}),
                 h_i = ln(σ_i/σ_{i+1}); c = 0 at the first and the last step (to σ = 0, where x' = D).
`dpm_solver_pp_steps` runs DPM-Solver++(2M) on any grid of levels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers.grids import batch, karras_noise_levels, step_noise


def ddim_sample(denoiser, process, x_T, noise_key, steps, *, rho=7.0, eta=0.0):
    """Returns (x̂_0, steps)."""
    levels = karras_noise_levels(process, steps, rho)
    x = x_T / process.alpha(process.t_max)

    def body(x, row):
        sigma, sigma_next = row["sigma"], row["sigma_next"]
        x0 = denoiser(x, batch(sigma, x))
        eps = (x - x0) / sigma
        noise = eta * sigma_next * jnp.sqrt(sigma**2 - sigma_next**2) / sigma
        x = x0 + jnp.sqrt(sigma_next**2 - noise**2) * eps
        if eta > 0:
            x = x + noise * step_noise(noise_key, row["i"], x)
        return x, None

    rows = {"sigma": levels[:-1], "sigma_next": levels[1:], "i": jnp.arange(steps)}
    x0, _ = jax.lax.scan(body, x, rows)
    return x0, steps


def dpm_solver_pp_sample(denoiser, process, x_T, noise_key, steps, *, rho=7.0):
    """Returns (x̂_0, steps)."""
    del noise_key
    levels = karras_noise_levels(process, steps, rho)
    return dpm_solver_pp_steps(denoiser, x_T / process.alpha(process.t_max), levels), steps


def dpm_solver_pp_steps(denoiser, x, levels):
    """x̂_0 from the unscaled x at σ = levels[0] through the decreasing noise levels `levels` [N + 1] (last 0):
    N evaluations."""
    steps = levels.shape[0] - 1
    log_levels = jnp.log(levels[:-1])
    h = log_levels[:-1] - log_levels[1:]  # h_i for the steps between positive levels
    c = jnp.zeros(steps).at[1:-1].set(h[1:] / (2.0 * h[:-1]))

    def body(carry, row):
        x, prev_x0 = carry
        x0 = denoiser(x, batch(row["sigma"], x))
        d = (1.0 + row["c"]) * x0 - row["c"] * prev_x0
        ratio = row["sigma_next"] / row["sigma"]
        return (ratio * x + (1.0 - ratio) * d, x0), None

    rows = {"sigma": levels[:-1], "sigma_next": levels[1:], "c": c}
    (x0, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), rows)
    return x0
