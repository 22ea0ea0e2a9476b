"""DEIS (Zhang & Chen 2023), the "logρ" multistep variant of diffusers' DEISMultistepScheduler (algorithm
"deis", solver_order 2, lower_order_final), in the unscaled x = x_t·sqrt(1 + σ²) at noise level σ = ρ,
where x = x_0 + σ·n.

The ODE dx/dσ = ε(x, σ) = (x − D(x; σ))/σ is integrated from σ_i to σ_{i+1} with ε extrapolated linearly in
log σ through ε_i and ε_{i−1}:
  x_{i+1} = x_i + c0_i·ε_i + c1_i·ε_{i−1},   c0 = ∫_{σ_i}^{σ_{i+1}} ℓ_0,  c1 = ∫_{σ_i}^{σ_{i+1}} ℓ_1,
  ℓ_0(τ) = ln(τ/σ_{i−1})/ln(σ_i/σ_{i−1}), ℓ_1 = 1 − ℓ_0  (∫ τ·ln τ in closed form).
The first step, and the last when there are fewer than 15 steps, are Euler's: x_{i+1} = x_i + (σ_{i+1} − σ_i)·ε_i.
diffusers' DEIS grid ends at a positive level (σ of training step 0, or the last Karras level repeated, a
step that changes nothing); the result is x at that level.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import xlogy

from jaxdiff.samplers.grids import batch, scan_steps

LOWER_ORDER_FINAL_BELOW = 15  # diffusers' DEIS takes its last step first order only for fewer steps than this


def deis_coefficients(levels):
    """(c0, c1) [N] float32 of the module docstring for the decreasing levels [N + 1] (all positive but maybe
    the last); first-order steps have c0 = σ_{i+1} − σ_i, c1 = 0."""
    steps = levels.shape[0] - 1
    sigma, sigma_next = levels[:-1], levels[1:]
    sigma_prev = jnp.concatenate([levels[:1], levels[:-2]])
    log_ratio = jnp.log(sigma) - jnp.log(sigma_prev)  # ln(σ_i/σ_{i−1}); 0 at i = 0 (first order there)

    def integral(tau, log_root):  # ∫ ln(τ/root) dτ = τ·ln τ − τ·(ln root + 1)
        return xlogy(tau, tau) - tau * (log_root + 1.0)

    second = jnp.arange(steps) > 0
    if steps < LOWER_ORDER_FINAL_BELOW:
        second = second & (jnp.arange(steps) < steps - 1)
    safe = jnp.where(second, log_ratio, 1.0)
    log_prev, log_now = jnp.log(sigma_prev), jnp.log(sigma)
    c0 = (integral(sigma_next, log_prev) - integral(sigma, log_prev)) / safe
    c1 = -(integral(sigma_next, log_now) - integral(sigma, log_now)) / safe
    return jnp.where(second, c0, sigma_next - sigma), jnp.where(second, c1, 0.0)


def deis_steps(denoiser, x, levels, noise_key=None):
    """The unscaled x [B, ...] float32 at σ = levels[-1] from x at σ = levels[0], through the decreasing noise
    levels `levels` [N + 1] (the last may repeat the one before, or be 0): N evaluations. noise_key is unused."""
    del noise_key
    levels = jnp.asarray(levels, jnp.float32)
    c0, c1 = deis_coefficients(levels)

    def step(carry, row):
        x, eps_prev = carry
        eps = (x - denoiser(x, batch(row["sigma"], x))) / row["sigma"]
        return x + row["c0"] * eps + row["c1"] * eps_prev, eps

    rows = {"sigma": levels[:-1], "c0": c0, "c1": c1}
    (x_last, _), _ = scan_steps(step, (x, jnp.zeros_like(x)), rows)
    return x_last
