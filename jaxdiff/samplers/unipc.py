"""UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler with its Stable Diffusion defaults
(predict_x0, solver_type "bh2", solver_order 2, lower_order_final, corrector at every step), in the unscaled
x = x_t·sqrt(1 + σ²) at noise level σ, where x = x_0 + σ·n.

With D_i = D(x̃_i; σ_i) at the predicted state x̃_i, r = σ_{i+1}/σ_i and h_i = ln(σ_i/σ_{i+1}):
  predictor (UniP-2, bh2 = DPM-Solver++(2M)):
      x̃_{i+1} = r·x_i + (1 − r)·(D_i + p_i·(D_i − D_{i−1})),   p_i = h_i/(2·h_{i−1}),
      first order (p = 0) at the first step and, lower_order_final, at the last;
  corrector (UniC, using D_{i+1} without another evaluation; not after the last step):
      x_{i+1} = r·x_i + (1 − r)·(D_i + a_{i+1}·(D_{i−1} − D_i) + b_{i+1}·(D_{i+1} − D_i)),
      a = 0, b = 1/2 after a first-order predictor step; after a second-order one, (ρ_0, ρ_1) solves
      [[1, 1], [q, 1]]·ρ = (g_1/B, 2·g_2/B) and a = ρ_0/q, b = ρ_1, where q = −h_{i−1}/h_i, B = e^{−h_i} − 1,
      g_1 = B/(−h_i) − 1, g_2 = g_1/(−h_i) − 1/2.
The last level may be 0 (the last step then lands on x̂_0 = D_{N−1}) or positive.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.samplers.grids import batch, scan_steps


def unipc_coefficients(levels):
    """Per-step tables [N] float32 for the decreasing levels [N + 1] (all positive but maybe the last): p of the
    predictor step from σ_i, a and b of the corrector applied on arriving at σ_i (0 at i = 0)."""
    steps = levels.shape[0] - 1
    log_levels = jnp.log(levels[:-1])
    h = log_levels[:-1] - log_levels[1:]  # h_i between the positive levels, [N − 1]
    p = jnp.zeros(steps).at[1:-1].set(h[1:] / (2.0 * h[:-1]))
    # the corrector on arriving at σ_i (i >= 1) after the step i − 1, of order 2 when i >= 2
    neg_h = -h  # −h_{i−1}, i = 1..N−1
    big_b = jnp.expm1(neg_h)
    g1 = big_b / neg_h - 1.0
    g2 = g1 / neg_h - 0.5
    b1, b2 = g1 / big_b, 2.0 * g2 / big_b
    q = -h[:-1] / h[1:]  # −h_{i−2}/h_{i−1}, i = 2..N−1
    rho0 = (b1[1:] - b2[1:]) / (1.0 - q)
    a = jnp.zeros(steps).at[2:].set(rho0 / q)
    b = jnp.zeros(steps).at[1:].set(0.5).at[2:].set(b1[1:] - rho0)
    return p, a, b


def unipc_steps(denoiser, x, levels, noise_key=None):
    """The unscaled x [B, ...] float32 at σ = levels[-1] from x at σ = levels[0], through the decreasing noise
    levels `levels` [N + 1] (x̂_0 where the last is 0): N evaluations. noise_key is unused (deterministic)."""
    del noise_key
    levels = jnp.asarray(levels, jnp.float32)
    p, a, b = unipc_coefficients(levels)

    def step(carry, row):
        x_pred, x_prev, d_prev, d_prev2 = carry  # x̃_i, x_{i−1}, D_{i−1}, D_{i−2}
        d = denoiser(x_pred, batch(row["sigma"], x_pred))
        r_in = row["sigma"] / row["sigma_prev"]  # of the step i − 1 that arrived here
        # the corrector; row 0 (a = b = 0, σ_prev = σ, x_prev = x̃_0) leaves x̃_0
        x = r_in * x_prev + (1.0 - r_in) * (d_prev + row["a"] * (d_prev2 - d_prev) + row["b"] * (d - d_prev))
        r = row["sigma_next"] / row["sigma"]
        x_next = r * x + (1.0 - r) * (d + row["p"] * (d - d_prev))
        return x_next, x, d, d_prev

    rows = {"sigma": levels[:-1], "sigma_next": levels[1:], "sigma_prev": jnp.concatenate([levels[:1], levels[:-2]]),
            "p": p, "a": a, "b": b}  # fmt: skip
    zeros = jnp.zeros_like(x)
    (x_last, _, _, _), _ = scan_steps(step, (x, x, zeros, zeros), rows)
    return x_last
