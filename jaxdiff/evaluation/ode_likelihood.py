"""Exact log-likelihood of continuous data through the probability-flow ODE, and bits/dim of images on it.

log p(x) = log p_prior(x(t_max)) + ∫_{t_min}^{t_max} ∇·F(x(t), t) dt, with F the probability-flow drift
integrated from x(t_min) = x (score_sde's `likelihood.py`; the data are read as the process state at
t_min). The divergence is Hutchinson–Skilling's vᵀ(∂F/∂x)v with one probe v per solve (Rademacher or
Gaussian, fixed along the path) or, for small dimensions, the exact trace (one JVP per dimension).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxdiff.checks import is_int
from jaxdiff.diffusion.denoisers import probability_flow_drift
from jaxdiff.errors import UsageError
from jaxdiff.samplers.ode import check_solver, check_tolerance, raise_if_failed, solve

Array = jax.Array

DIVERGENCES = ("rademacher", "gaussian", "exact")


def ode_log_likelihood(
    denoiser, process, x: Array, rng: Array, *, divergence: str = "rademacher", rtol: float = 1e-5,
    atol: float = 1e-5, solver: str = "tsit5", max_steps: int = 4096,
) -> tuple[Array, Array]:  # fmt: skip
    """(log p(x) in nats per example [B], the number of denoiser evaluations) for x [B, ...] float32.

    nfe counts denoiser calls: one JVP (forward mode: the value with its directional derivative) per
    solver evaluation, or the value and D JVPs for the exact divergence (nfe = solver evaluations·(D + 1)).
    Reaching `max_steps` is an error naming the time reached.
    """
    if divergence not in DIVERGENCES:
        raise UsageError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    check_tolerance("rtol", rtol)
    check_tolerance("atol", atol)
    check_solver(solver)
    if not is_int(max_steps, numpy=False) or max_steps < 1:
        raise UsageError(f"max_steps={max_steps!r} must be an int >= 1")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise UsageError(f"x must be a batch [B, ...] of at least 2 dimensions, got shape {x.shape}")
    log_p, nfe, ok, t_reached = _log_likelihood(
        denoiser, divergence, rtol, atol, solver, max_steps, process, x, rng
    )
    raise_if_failed(ok, t_reached, process.t_max, max_steps, "ode_log_likelihood")
    return log_p, nfe


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _log_likelihood(denoiser, divergence, rtol, atol, solver, max_steps, process, x, rng):
    dims = math.prod(x.shape[1:])

    def drift(t, x_t):
        return probability_flow_drift(denoiser, process, x_t, t)

    if divergence == "exact":
        basis = jnp.eye(dims, dtype=jnp.float32).reshape((dims, 1) + x.shape[1:])

        def exact_divergence(t, x_t):
            # The drift acts on each example alone, so one JVP along e_k serves the whole batch.
            def diagonal(e_k):
                tangent = jnp.broadcast_to(e_k, x_t.shape)
                jvp = jax.jvp(lambda y: drift(t, y), (x_t,), (tangent,))[1]
                return jnp.sum((jvp * tangent).reshape(x_t.shape[0], -1), axis=1)

            return jnp.sum(jax.lax.map(diagonal, basis), axis=0)

    else:
        if divergence == "rademacher":
            probe = jax.random.rademacher(rng, x.shape, jnp.float32)
        else:
            probe = jax.random.normal(rng, x.shape, jnp.float32)

    def vector_field(t, state):
        x_t, _ = state
        if divergence == "exact":
            return drift(t, x_t), exact_divergence(t, x_t)
        value, jvp = jax.jvp(lambda y: drift(t, y), (x_t,), (probe,))
        return value, jnp.sum((jvp * probe).reshape(x_t.shape[0], -1), axis=1)

    t0, t1 = jnp.float32(process.t_min), jnp.float32(process.t_max)
    (x_T, delta), nfe, ok, t_reached = solve(
        vector_field, (x, jnp.zeros(x.shape[0], jnp.float32)), t0, t1,
        rtol=rtol, atol=atol, solver=solver, max_steps=max_steps,
    )  # fmt: skip
    log_p = process.prior_logp(x_T) + delta
    return log_p, nfe * (dims + 1 if divergence == "exact" else 1), ok, t_reached


def dequantize(images: Array, rng: Array) -> Array:
    """uint8 images → continuous data in [-1, 1]: 2·(k + u)/256 − 1, u ~ U[0, 1) (score_sde's dequantization)."""
    k = jnp.asarray(images, jnp.float32)
    return 2.0 * (k + jax.random.uniform(rng, k.shape, jnp.float32)) / 256.0 - 1.0


def bits_per_dim(log_p: Array, num_dims: int, *, data_width: float = 2.0) -> Array:
    """bits/dim of 8-bit data from log p (nats) of its dequantized values in a range of width `data_width`.

    A pixel value k occupies a cell of width data_width/256 in data space, so
    bpd = −log p/(D·ln 2) + 8 − log2(data_width) — score_sde's offset log2(inverse-scaler gradient) + 8,
    7 for data in [-1, 1] (width 2), 8 for [0, 1].
    """
    return -log_p / (num_dims * math.log(2.0)) + 8.0 - math.log2(data_width)


def ode_bits_per_dim(denoiser, process, images: Array, rng: Array, *, centered: bool = True,
                     **options) -> tuple[Array, Array]:  # fmt: skip
    """(bits/dim [B], nfe) of uint8 images [B, H, W, C] for a model of data in [-1, 1], or in [0, 1]
    when not `centered` (score_sde's data.centered=False).

    `dequantize` with the first half of `split(rng)` (then y = (x + 1)/2 = (k + u)/256 for [0, 1]),
    `ode_log_likelihood` (with `options`) with the second, then `bits_per_dim`: bpd = −log p/(D·ln 2) + 7,
    or + 8 for [0, 1] (score_sde's offset 7 − inverse_scaler(−1)).
    """
    dequantize_key, probe_key = jax.random.split(rng)
    x = dequantize(images, dequantize_key)
    if not centered:
        x = (x + 1.0) / 2.0
    log_p, nfe = ode_log_likelihood(denoiser, process, x, probe_key, **options)
    return bits_per_dim(log_p, math.prod(x.shape[1:]), data_width=2.0 if centered else 1.0), nfe
