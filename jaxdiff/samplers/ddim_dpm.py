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
(`algorithm_type` dpmsolver++ or sde-dpmsolver++, `solver_order` 1 or 2, `solver_type` midpoint or heun): in
the unscaled x, with r = σ'/σ, h = ln(σ/σ') and the SDE's a = r², q = 2 (the ODE's a = r, q = 1),
  x' = a·x + (1 − a)·((1 + c_i)·D_i − c_i·D_{i−1}) + σ'·sqrt(1 − r²)·z_i   (the noise term for the SDE only),
  c_i = h_i/(2·h_{i−1}) (midpoint) or (1 − (1 − a)/(q·h_i))·h_i/(h_{i−1}·(1 − a)) (heun); c_i = 0 at the
first step, everywhere for order 1, and at the last step where it is first order.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.samplers.grids import batch, karras_noise_levels, scan_steps, step_noise


def ddim_sample(denoiser, process, x_T, noise_key, steps, *, rho=7.0, eta=0.0):
    """Returns (x̂_0, steps)."""
    levels = karras_noise_levels(process, steps, rho)
    return ddim_steps(denoiser, x_T / process.alpha(process.t_max), levels, noise_key, eta=eta), steps


def ddim_steps(denoiser, x, levels, noise_key=None, *, eta=0.0, noise=step_noise, every=None):
    """x̂_0 from the unscaled x at σ = levels[0] through the decreasing noise levels `levels` [N + 1] (last 0):
    N evaluations. Step i draws z = `noise(noise_key, i, x)` (standard normal) when eta > 0. With `every`,
    returns (x̂_0, frames): the unscaled states after steps every−1, 2·every−1, ... and the last (`scan_steps`)."""

    def step(carry, row):
        x, extra = carry
        sigma, sigma_next = row["sigma"], row["sigma_next"]
        x0 = denoiser(x, batch(sigma, x))
        eps = (x - x0) / sigma
        tau = eta * sigma_next * jnp.sqrt(sigma**2 - sigma_next**2) / sigma
        x = x0 + jnp.sqrt(sigma_next**2 - tau**2) * eps
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
                        noise_key=None, every=None):
    """The unscaled x at σ = levels[-1] from x at σ = levels[0], through the decreasing noise levels `levels`
    [N + 1] (the last 0, where x is x̂_0, or σ_min > 0): N evaluations. `noise_key` given: the SDE variant
    (DPM-Solver++ 2M SDE), step i drawing z_i = `step_noise(noise_key, i, x)`. A last step to σ = 0 must be first
    order (`first_order_last`). With `every`, returns (x, frames) as `ddim_steps`."""
    steps = levels.shape[0] - 1
    sigma, sigma_next = levels[:-1], levels[1:]
    ratio = sigma_next / sigma
    a = ratio if noise_key is None else ratio**2
    h = jnp.log(sigma) - jnp.log(sigma_next)  # h_i (inf for a step to σ = 0)
    if order == 1 or steps < 2:
        c = jnp.zeros(steps)
    elif solver_type == "midpoint":
        c = jnp.zeros(steps).at[1:].set(h[1:] / (2.0 * h[:-1]))
    else:
        q = 1.0 if noise_key is None else 2.0
        weight = (1.0 - (1.0 - a[1:]) / (q * h[1:])) * h[1:] / (h[:-1] * (1.0 - a[1:]))
        c = jnp.zeros(steps).at[1:].set(weight)
    if first_order_last:
        c = c.at[-1].set(0.0)
    noise_scale = jnp.zeros(steps) if noise_key is None else sigma_next * jnp.sqrt(1.0 - ratio**2)

    def step(carry, row):
        x, prev_x0 = carry
        x0 = denoiser(x, batch(row["sigma"], x))
        d = (1.0 + row["c"]) * x0 - row["c"] * prev_x0
        x_next = row["a"] * x + (1.0 - row["a"]) * d
        if noise_key is not None:
            x_next = x_next + row["noise_scale"] * step_noise(noise_key, row["i"], x)
        return x_next, x0

    rows = {"sigma": sigma, "a": a, "c": c, "noise_scale": noise_scale}
    (x, _), frames = scan_steps(step, (x, jnp.zeros_like(x)), rows, every)
    return x if every is None else (x, frames)
