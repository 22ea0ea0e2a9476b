"""DDIM and DPM-Solver++(2M) on any process, in the unscaled x = x_t/α at noise level σ = σ_t/α_t.

Both visit the `karras_noise_levels` grid (steps levels, then 0) with one evaluation per level and
end on x̂_0. With ε̂ = (x − D(x; σ))/σ and ᾱ = 1/(1 + σ²) (the VP view of the same marginals):
  ddim           x' = D + sqrt(σ'² − τ²)·ε̂ + τ·z, τ = η·σ'·sqrt(σ² − σ'²)/σ: DDIM's
                 x'_vp = sqrt(ᾱ')·D + sqrt(1 − ᾱ' − c²)·ε̂ + c·z,
                 c = η·sqrt((1 − ᾱ')/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ'), divided by sqrt(ᾱ') (η = 0: x' = D + σ'·ε̂, deterministic);
  dpm_solver++   x' = (σ'/σ)·x + (1 − σ'/σ)·((1 + c_i)·D_i − c_i·D_{i−1}), c_i = h_i/(2·h_{i−1}),
                 h_i = ln(σ_i/σ_{i+1}); c = 0 at the first and the last step (to σ = 0, where x' = D).
`ddim_steps` runs DDIM on any grid of levels (the discrete family's through the σ bridge included);
`dpm_solver_pp_steps` runs DPM-Solver++ on any grid of levels, as diffusers' DPMSolverMultistepScheduler
(`algorithm_type` dpmsolver++ or sde-dpmsolver++, `solver_order` 1, 2 or 3 (its third-order steps in the
function's docstring), `solver_type` midpoint or heun): in
the unscaled x, with r = σ'/σ, h = ln(σ/σ') and the SDE's a = r², q = 2 (the ODE's a = r, q = 1),
  x' = a·x + (1 − a)·((1 + c_i)·D_i − c_i·D_{i−1}) + σ'·sqrt(1 − r²)·z_i   (the noise term for the SDE only),
  c_i = h_i/(2·h_{i−1}) (midpoint) or (1 − (1 − a)/(q·h_i))·h_i/(h_{i−1}·(1 − a)) (heun); c_i = 0 at the
first step, everywhere for order 1, and at the last step where it is first order.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.grids import batch, karras_noise_levels, scan_steps, step_noise


def ddim_sample(denoiser, process, x_T, noise_key, steps, *, rho=7.0, eta=0.0):
    """Returns (x̂_0, steps)."""
    levels = karras_noise_levels(process, steps, rho)
    return ddim_steps(denoiser, x_T / process.alpha(process.t_max), levels, noise_key, eta=eta), steps


def ddim_steps(denoiser, x, levels, noise_key=None, *, eta=0.0, noise=step_noise, every=None, limit=None):
    """x̂_0 from the unscaled x at σ = levels[0] through the decreasing noise levels `levels` [N + 1] (last 0,
    where x is x̂_0, or σ > 0, where x is the unscaled state there): N evaluations. Step i draws
    z = `noise(noise_key, i, x)` (standard normal) when eta > 0. `limit` (x̂_0 -> x̂_0, e.g. a
    `jaxdiff.diffusion.limits.DenoisedLimit`) limits D after ε̂ is taken from the unlimited D, as diffusers'
    DDIMScheduler (a denoiser that limits its own output gives the DDIM paper's ε̂ of the limited x̂_0). With
    `every`, returns (x, frames): the unscaled states after steps every−1, 2·every−1, ... and the last
    (`scan_steps`)."""

    def step(carry, row):
        x, extra = carry
        sigma, sigma_next = row["sigma"], row["sigma_next"]
        x0 = denoiser(x, batch(sigma, x))
        eps = (x - x0) / sigma
        tau = eta * sigma_next * jnp.sqrt(sigma**2 - sigma_next**2) / sigma
        x = (x0 if limit is None else limit(x0)) + jnp.sqrt(sigma_next**2 - tau**2) * eps
        if eta > 0:
            x = x + tau * noise(noise_key, row["i"], x)
        return x, extra

    (x0, _), frames = scan_steps(step, (x, ()), {"sigma": levels[:-1], "sigma_next": levels[1:]}, every)
    return x0 if every is None else (x0, frames)


def dpm_solver_pp_sample(denoiser, process, x_T, noise_key, steps, *, rho=7.0):
    """Returns (x̂_0, steps)."""
    del noise_key
    levels = karras_noise_levels(process, steps, rho)
    return dpm_solver_pp_steps(denoiser, x_T / process.alpha(process.t_max), levels), steps


def dpm_solver_pp_steps(denoiser, x, levels, *, order=2, solver_type="midpoint", first_order_last=True,
                        second_order_second_last=False, noise_key=None, every=None):
    """The unscaled x at σ = levels[-1] from x at σ = levels[0], through the decreasing noise levels `levels`
    [N + 1] (the last 0, where x is x̂_0, or σ_min > 0): N evaluations. `noise_key` given: the SDE variant
    (DPM-Solver++ 2M SDE), step i drawing z_i = `step_noise(noise_key, i, x)`. A last step to σ = 0 must be first
    order (`first_order_last`). With `every`, returns (x, frames) as `ddim_steps`.

    Step i is of order min(order, i + 1) (`order` 1, 2 or 3), at most 2 at the second-to-last step with
    `second_order_second_last`, 1 at the last with `first_order_last`: diffusers' DPMSolverMultistepScheduler.
    Third order (DPM-Solver++(3M)), with r0 = h_{i−1}/h_i, r1 = h_{i−2}/h_i, Δ0 = (D_i − D_{i−1})/r0,
    Δ1 = (D_{i−1} − D_{i−2})/r1, D' = Δ0 + r0·(Δ0 − Δ1)/(r0 + r1), D'' = (Δ0 − Δ1)/(r0 + r1):
      x' = a·x + (1 − a)·D_i + b1·D' + b2·D'' (+ the SDE's noise term),
      b1 = 1 − (1 − a)/(q·h), b2 = ±1/2 − (q·h − (1 − a))/(q·h)² (+ for the ODE, − for the SDE, as diffusers).
    """
    steps = levels.shape[0] - 1
    sigma, sigma_next = levels[:-1], levels[1:]
    ratio = sigma_next / sigma
    a = ratio if noise_key is None else ratio**2
    q = 1.0 if noise_key is None else 2.0
    h = jnp.log(sigma) - jnp.log(sigma_next)  # h_i (inf for a step to σ = 0)
    orders = np.minimum(order, np.arange(steps) + 1)
    if second_order_second_last and steps >= 2:
        orders[-2] = min(orders[-2], 2)
    if first_order_last:
        orders[-1] = 1
    second, third = jnp.asarray(orders == 2), jnp.asarray(orders == 3)
    if solver_type == "midpoint":
        c = h[1:] / (2.0 * h[:-1])
    else:
        c = (1.0 - (1.0 - a[1:]) / (q * h[1:])) * h[1:] / (h[:-1] * (1.0 - a[1:]))
    c = jnp.where(second, jnp.append(0.0, c), 0.0)
    # third-order rows: r0, r1 and b1, b2 (r = 1, b = 0 elsewhere, so those rows add exactly 0)
    h_prev = jnp.append(jnp.ones(1), h[:-1])
    h_prev2 = jnp.append(jnp.ones(2), h[:-2])[:steps]
    r0, r1 = jnp.where(third, h_prev / h, 1.0), jnp.where(third, h_prev2 / h, 1.0)
    qh = q * h
    b1 = jnp.where(third, 1.0 - (1.0 - a) / qh, 0.0)
    b2 = jnp.where(third, (0.5 if noise_key is None else -0.5) - (qh - (1.0 - a)) / qh**2, 0.0)
    noise_scale = jnp.zeros(steps) if noise_key is None else sigma_next * jnp.sqrt(1.0 - ratio**2)

    def step(carry, row):
        x, prev_x0, prev2_x0 = carry
        x0 = denoiser(x, batch(row["sigma"], x))
        d = (1.0 + row["c"]) * x0 - row["c"] * prev_x0
        x_next = row["a"] * x + (1.0 - row["a"]) * d
        if order == 3:
            r0, r1 = row["r0"], row["r1"]
            slope0, slope1 = (x0 - prev_x0) / r0, (prev_x0 - prev2_x0) / r1
            d1 = slope0 + (r0 / (r0 + r1)) * (slope0 - slope1)
            d2 = (1.0 / (r0 + r1)) * (slope0 - slope1)
            x_next = x_next + row["b1"] * d1 + row["b2"] * d2
        if noise_key is not None:
            x_next = x_next + row["noise_scale"] * step_noise(noise_key, row["i"], x)
        return x_next, x0, prev_x0

    rows = {"sigma": sigma, "a": a, "c": c, "noise_scale": noise_scale, "r0": r0, "r1": r1, "b1": b1, "b2": b2}
    (x, _, _), frames = scan_steps(step, (x, jnp.zeros_like(x), jnp.zeros_like(x)), rows, every)
    return x if every is None else (x, frames)
