"""Time and noise-level grids of the continuous samplers, and their per-step noise."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def time_grid(process, steps: int) -> Array:
    """steps + 1 times from t_max down to t_min, evenly spaced (score_sde's predictor grid): float32."""
    return jnp.linspace(jnp.float32(process.t_max), jnp.float32(process.t_min), steps + 1)


def karras_noise_levels(process, steps: int, rho: float = 7.0) -> Array:
    """steps noise levels σ_i = (σ_max^(1/ρ) + i/(steps−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0: [steps + 1].

    σ_max, σ_min are the process's noise levels σ/α at t_max and t_min (EDM's grid; one step: [σ_max, 0]).
    """
    low, high = process.noise_level(process.t_min), process.noise_level(process.t_max)
    u = jnp.linspace(0.0, 1.0, steps) if steps > 1 else jnp.zeros(1)
    levels = (high ** (1.0 / rho) + u * (low ** (1.0 / rho) - high ** (1.0 / rho))) ** rho
    return jnp.append(levels.astype(jnp.float32), jnp.float32(0.0))


def step_noise(noise_key: Array, i, like: Array, j=0) -> Array:
    """The standard normal noise of loop iteration i (sub-step j), shaped like `like`."""
    key = jax.random.fold_in(jax.random.fold_in(noise_key, i), j)
    return jax.random.normal(key, like.shape, jnp.float32)


def batch(value, x: Array) -> Array:
    """A scalar repeated for each example of x: float32 [B]."""
    return jnp.full((x.shape[0],), value, jnp.float32)
