"""Time and noise-level grids of the continuous samplers, and their per-step noise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def time_grid(process, steps: int) -> Array:
    """steps + 1 times from t_max down to t_min, evenly spaced (score_sde's predictor grid): float32."""
    return jnp.linspace(jnp.float32(process.t_max), jnp.float32(process.t_min), steps + 1)


def karras_sigmas(sigma_max, sigma_min, steps: int, rho: float = 7.0):
    """steps levels σ_i = (σ_max^(1/ρ) + i/(steps−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ (one step: [σ_max]), in
    σ_max's array type (NumPy float64 for Python floats)."""
    u = np.linspace(0.0, 1.0, steps)
    return (sigma_max ** (1.0 / rho) + u * (sigma_min ** (1.0 / rho) - sigma_max ** (1.0 / rho))) ** rho


def karras_noise_levels(process, steps: int, rho: float = 7.0) -> Array:
    """`karras_sigmas` from σ_max to σ_min, then 0: float32 [steps + 1]. σ_max, σ_min are the process's noise
    levels σ/α at t_max and t_min (EDM's grid)."""
    low, high = process.noise_level(process.t_min), process.noise_level(process.t_max)
    levels = jnp.asarray(karras_sigmas(high, low, steps, rho), jnp.float32)
    return jnp.append(levels, jnp.float32(0.0))


def step_noise(noise_key: Array, i, like: Array, j=0) -> Array:
    """The standard normal noise of loop iteration i (sub-step j), shaped like `like`."""
    key = jax.random.fold_in(jax.random.fold_in(noise_key, i), j)
    return jax.random.normal(key, like.shape, jnp.float32)


def scan_steps(step, carry, rows: dict, every: int | None = None):
    """Runs `step(carry, row) -> carry` over the rows of `rows` (dict of [N, ...] arrays; row["i"] = 0..N-1 is
    added) in one `lax.scan`; carry[0] is the state x. Returns (final carry, frames): without `every`, frames is
    None; with it, the states after steps every−1, 2·every−1, ... and the last, [ceil(N / every), *x.shape]."""
    steps = next(iter(rows.values())).shape[0]
    rows = {**rows, "i": jnp.arange(steps, dtype=jnp.int32)}
    if every is None:
        carry, _ = jax.lax.scan(lambda c, row: (step(c, row), None), carry, rows)
        return carry, None

    def body(c, row):
        state, frames = c
        state = step(state, row)
        return (state, frames.at[row["i"] // every].set(state[0])), None

    x = carry[0]
    frames = jnp.zeros((-(-steps // every),) + x.shape, x.dtype)
    (carry, frames), _ = jax.lax.scan(body, (carry, frames), rows)
    return carry, frames


def batch(value, x: Array) -> Array:
    """A scalar repeated for each example of x: float32 [B]."""
    return jnp.full((x.shape[0],), value, jnp.float32)
