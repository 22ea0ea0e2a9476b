"""EDM's samplers (Karras et al. 2022, Algorithms 1 and 2) in the unscaled x = x_t/α at noise level σ = σ_t/α_t.

The probability-flow ODE of every process is dx/dσ = (x − D(x; σ))/σ in these terms. The grid is
`karras_noise_levels` (steps levels from σ(t_max) down to σ(t_min), ρ = 7 by default, then 0); each step
is Heun's method with an Euler last step to σ = 0 (which lands on x̂_0): 2·steps − 1 evaluations.
The stochastic sampler first raises σ_i to σ̂ = (1 + γ)·σ_i, γ = min(S_churn/steps, √2 − 1) when
S_min <= σ_i <= S_max (else 0), adding noise of std sqrt(σ̂² − σ_i²)·S_noise, then takes the Heun step
from σ̂; S_churn = 0 is the deterministic sampler. `heun_steps` runs the steps on any grid of levels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff.samplers.grids import batch, karras_noise_levels, scan_steps, step_noise


def edm_sample(
    denoiser, process, x_T, noise_key, steps, *, rho=7.0, s_churn=0.0, s_min=0.0, s_max=math.inf, s_noise=1.0
):
    """Returns (x̂_0, 2·steps − 1) from the prior sample x_T (the process state at t_max)."""
    levels = karras_noise_levels(process, steps, rho)
    x = x_T / process.alpha(process.t_max)
    gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0)
    churn = dict(gamma=gamma, s_min=s_min, s_max=s_max, s_noise=s_noise)
    return heun_steps(denoiser, x, levels, noise_key, churn=churn), 2 * steps - 1


def heun_steps(denoiser, x, levels, noise_key=None, *, churn=None, second_order=True, every=None):
    """x̂_0 from the unscaled x at σ = levels[0] through the decreasing noise levels `levels` [N + 1] (last 0).

    Each step is Heun's (Euler's with second_order=False); the last one, to σ = 0, is Euler and lands on
    x̂_0, so Heun takes 2·N − 1 evaluations and Euler N. `churn` (EDM's stochastic sampler): dict of gamma,
    s_min, s_max, s_noise, drawing from `noise_key`. With `every`, returns (x̂_0, frames): the unscaled states
    after steps every−1, 2·every−1, ... and the last (`grids.scan_steps`).
    """
    gamma = churn["gamma"] if churn else 0.0

    def slope(x, sigma):
        return (x - denoiser(x, batch(sigma, x))) / sigma

    def step(carry, row):
        x, extra = carry
        sigma, sigma_next = row["sigma"], row["sigma_next"]
        if gamma > 0:
            boost = jnp.where((churn["s_min"] <= sigma) & (sigma <= churn["s_max"]), gamma, 0.0)
            noise = sigma * jnp.sqrt(boost * (2.0 + boost)) * churn["s_noise"] * step_noise(noise_key, row["i"], x)
            x, sigma = x + noise, sigma * (1.0 + boost)
        d = slope(x, sigma)
        euler = x + (sigma_next - sigma) * d
        if not second_order:
            return euler, extra

        def heun():
            return x + (sigma_next - sigma) * 0.5 * (d + slope(euler, sigma_next))

        return jax.lax.cond(sigma_next > 0, heun, lambda: euler), extra

    (x0, _), frames = scan_steps(step, (x, ()), {"sigma": levels[:-1], "sigma_next": levels[1:]}, every)
    return x0 if every is None else (x0, frames)
