"""Linear multistep (diffusers' LMSDiscreteScheduler, k-diffusion's `sample_lms`) in the unscaled
x = x_t·sqrt(1 + σ²) at noise level σ, where x = x_0 + σ·n.

The ODE dx/dσ = d(x, σ) = (x − D(x; σ))/σ is integrated from σ_i to σ_{i+1} with the Lagrange polynomial
through the last k = min(i + 1, order) slopes d_i, d_{i−1}, …, d_{i−k+1} at σ_i, σ_{i−1}, …:
  x_{i+1} = x_i + Σ_j c_{ij}·d_{i−j},   c_{ij} = ∫_{σ_i}^{σ_{i+1}} Π_{m<k, m≠j} (τ − σ_{i−m})/(σ_{i−j} − σ_{i−m}) dτ.
The coefficients are exact integrals of these polynomials, computed in float64 NumPy outside jit
(`lms_coefficients`; diffusers integrates them numerically with scipy's quad).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from numpy.polynomial import Polynomial

from jaxdiff.samplers.grids import batch, scan_steps

DEFAULT_LMS_ORDER = 4  # diffusers' LMSDiscreteScheduler.step default


def lms_coefficients(levels, order: int = DEFAULT_LMS_ORDER) -> np.ndarray:
    """The coefficients c_{ij} of the module docstring for the decreasing noise levels `levels` [N + 1]
    (concrete, any float dtype): float64 [N, order], row i holding c_{i0..i(k−1)} then zeros."""
    sigmas = np.asarray(levels, np.float64)
    steps = sigmas.shape[0] - 1
    table = np.zeros((steps, order), np.float64)
    for i in range(steps):
        nodes = sigmas[i - np.arange(min(i + 1, order))]  # σ_i, σ_{i−1}, …
        for j, node in enumerate(nodes):
            basis = Polynomial([1.0])
            for other in np.delete(nodes, j):
                basis = basis * Polynomial([-other, 1.0]) / (node - other)
            antiderivative = basis.integ()
            table[i, j] = antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])
    return table


def lms_steps(denoiser, x, levels, noise_key=None, *, coefficients):
    """The unscaled x [B, ...] float32 at σ = levels[-1] from x at σ = levels[0], through the decreasing noise
    levels `levels` [N + 1] (last 0, where it is LMS's estimate of x̂_0): N evaluations. `coefficients`
    [N, order] is `lms_coefficients(levels, order)`. noise_key is unused (deterministic)."""
    del noise_key
    coefficients = jnp.asarray(coefficients, jnp.float32)
    order = coefficients.shape[1]

    def step(carry, row):
        x, slopes = carry  # slopes [order, B, ...]: d_{i−1}, d_{i−2}, … (zeros before the first step)
        slope = (x - denoiser(x, batch(row["sigma"], x))) / row["sigma"]
        slopes = jnp.concatenate([slope[None], slopes[:-1]])
        return x + jnp.tensordot(row["c"], slopes, axes=1), slopes

    rows = {"sigma": jnp.asarray(levels[:-1], jnp.float32), "c": coefficients}
    (x_last, _), _ = scan_steps(step, (x, jnp.zeros((order, *x.shape), x.dtype)), rows)
    return x_last
