"""Euler ancestral steps (diffusers' EulerAncestralDiscreteScheduler, k-diffusion's `sample_euler_ancestral`
with η = 1) in the unscaled x = x_t·sqrt(1 + σ²) at noise level σ, where x = x_0 + σ·n.

Each step from σ to σ' splits σ' into the noise the step adds, σ_up = sqrt(σ'²·(σ² − σ'²)/σ²), and the level
the deterministic Euler step reaches, σ_down = sqrt(σ'² − σ_up²):
  x' = x + (σ_down − σ)·(x − D(x; σ))/σ + σ_up·z,   z ~ N(0, I) drawn per step.
The last step, to σ' = 0, has σ_up = σ_down = 0 and lands on x̂_0 = D(x; σ).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.errors import UsageError
from jaxdiff.samplers.grids import batch, scan_steps, step_noise


def euler_ancestral_steps(denoiser, x, levels, noise_key=None):
    """x̂_0 [B, ...] float32 from the unscaled x [B, ...] at σ = levels[0] through the decreasing noise levels
    `levels` [N + 1] (last 0): N evaluations. The noise of step i is `step_noise(noise_key, i, x)`
    (standard normal, shaped like x); noise_key may be None only when every step adds none (N = 1)."""
    steps = levels.shape[0] - 1

    def step(carry, row):
        (x,) = carry
        sigma, sigma_next = row["sigma"], row["sigma_next"]
        sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
        slope = (x - denoiser(x, batch(sigma, x))) / sigma
        x = x + (sigma_down - sigma) * slope
        if noise_key is not None:
            x = x + sigma_up * step_noise(noise_key, row["i"], x)
        return (x,)

    if noise_key is None and steps > 1:
        raise UsageError("euler_ancestral adds noise at every step but the last: it needs a noise_key")
    ((x0,), _) = scan_steps(step, (x,), {"sigma": levels[:-1], "sigma_next": levels[1:]})
    return x0
