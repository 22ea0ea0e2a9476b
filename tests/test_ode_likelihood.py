"""The probability-flow ODE likelihood with the exact denoiser of Gaussian data against the analytic
log-density, the Hutchinson estimates against the exact trace, bits/dim, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.evaluation import ode_log_likelihood
from jaxdiff.evaluation.ode_likelihood import bits_per_dim, dequantize, ode_bits_per_dim
from jaxdiff.processes import make_process

MU, S = np.array([0.5, -0.3]), np.array([0.4, 0.7])


def gaussian_denoiser(x, sigma):
    """The exact D(x; σ) of x_0 ~ N(MU, diag(S²)), x [B, 2]."""
    s2, sg2 = jnp.asarray(S**2, jnp.float32), sigma[:, None] ** 2
    return (s2 * x + sg2 * jnp.asarray(MU, jnp.float32)) / (s2 + sg2)


def marginal(process, t):
    """(mean, variance) per dimension of the state x_t for Gaussian data: N(α·MU, α²S² + σ²), float64."""
    a, s = float(process.alpha(t)), float(process.sigma(t))
    return a * MU, a**2 * S**2 + s**2


def log_normal(x, mean, var):
    return np.sum(-0.5 * np.log(2 * np.pi * var) - 0.5 * (x - mean) ** 2 / var, axis=1)


def analytic_log_p(process, x):
    """What the ODE computes with the exact score: log p_{t_min}(x) + log prior(x_T) − log p_{t_max}(x_T).

    The flow is affine per dimension here: x_T = m_T + (x − m_min)·sqrt(v_T/v_min). The last two terms are
    the (small) error of the prior standing in for p_{t_max}.
    """
    m0, v0 = marginal(process, process.t_min)
    m1, v1 = marginal(process, process.t_max)
    x_T = m1 + (x - m0) * np.sqrt(v1 / v0)
    prior_var = float(process.prior_std()) ** 2
    return log_normal(x, m0, v0) + log_normal(x_T, 0.0, prior_var) - log_normal(x_T, m1, v1)


X = np.random.default_rng(0).normal(size=(6, 2)) * S + MU


@pytest.mark.parametrize("name", ["ve", "vp", "subvp", "edm"])
def test_exact_divergence_equals_the_analytic_log_density(name):
    process = make_process(name)
    log_p, nfe = ode_log_likelihood(gaussian_denoiser, process, jnp.asarray(X, jnp.float32), jax.random.key(0), divergence="exact")
    np.testing.assert_allclose(log_p, analytic_log_p(process, X), atol=1e-3)
    assert int(nfe) > 0 and int(nfe) % 3 == 0  # (D + 1) per solver evaluation


@pytest.mark.parametrize("divergence", ["rademacher", "gaussian"])
def test_hutchinson_estimate_agrees_within_its_standard_error(divergence):
    """Data N(R·MU, R·diag(S²)·Rᵀ) with R a rotation, so the Jacobian has off-diagonal terms to vary."""
    process = make_process("vp")
    angle = 0.6
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    r = jnp.asarray(rotation, jnp.float32)
    rotated = lambda x, sigma: gaussian_denoiser(x @ r, sigma) @ r.T  # R·D(Rᵀx); rows are examples
    point = X[:1] @ rotation.T
    x = jnp.asarray(np.repeat(point, 256, axis=0), jnp.float32)  # each copy draws its own probe
    log_p, _ = ode_log_likelihood(rotated, process, x, jax.random.key(1), divergence=divergence)
    log_p = np.asarray(log_p, np.float64)
    exact = analytic_log_p(process, X[:1])[0]  # the density is rotation invariant
    exact_trace, _ = ode_log_likelihood(rotated, process, x[:1], jax.random.key(1), divergence="exact")
    np.testing.assert_allclose(exact_trace, [exact], atol=1e-3)
    se = log_p.std() / math.sqrt(log_p.size)
    assert log_p.std() > 1e-3  # the probes do vary
    assert abs(log_p.mean() - exact) < 4 * se + 1e-3, (log_p.mean(), exact, se)


def test_bits_per_dim_convention():
    # Uniform data on [-1, 1]^D: log p = −D·ln 2, and 256 equally likely values carry 8 bits each.
    np.testing.assert_allclose(bits_per_dim(jnp.asarray([-3 * math.log(2.0)]), 3), [8.0], rtol=1e-6)
    np.testing.assert_allclose(bits_per_dim(jnp.asarray([0.0]), 5), [7.0])
    np.testing.assert_allclose(bits_per_dim(jnp.asarray([0.0]), 5, data_width=1.0), [8.0])


def test_dequantize_fills_each_pixel_cell():
    images = np.array([[0, 1, 254, 255]], np.uint8)
    x = np.asarray(dequantize(jnp.asarray(images), jax.random.key(0)), np.float64)
    low = 2 * images.astype(np.float64) / 256 - 1
    assert np.all(x >= low) and np.all(x < low + 2 / 256)


def test_bad_input():
    process = make_process("vp")
    x = jnp.asarray(X, jnp.float32)
    with pytest.raises(ValueError, match="unknown divergence 'hutchinson'"):
        ode_log_likelihood(gaussian_denoiser, process, x, jax.random.key(0), divergence="hutchinson")
    with pytest.raises(ValueError, match="atol=2 must be a number in"):
        ode_log_likelihood(gaussian_denoiser, process, x, jax.random.key(0), atol=2)
    with pytest.raises(RuntimeError, match=r"stopped at t=0\.\d+ before t=1"):
        ode_log_likelihood(gaussian_denoiser, process, x, jax.random.key(0), max_steps=2)


def test_ode_bits_per_dim_of_images():
    """uint8 pixels scored by the exact denoiser of N(0, 0.3²) data in [-1, 1]: bpd = −log p/(D ln 2) + 7."""
    mean, std = 0.0, 0.3
    images = np.clip(np.random.default_rng(2).normal(127.5, 127.5 * std, size=(3, 2, 2, 1)), 0, 255).astype(np.uint8)

    def denoiser(x, sigma):
        s2 = sigma[:, None, None, None] ** 2
        return (std**2 * x + s2 * mean) / (std**2 + s2)

    process = make_process("ve")
    bpd, _ = ode_bits_per_dim(denoiser, process, jnp.asarray(images), jax.random.key(3), divergence="exact")
    dq_key, _ = jax.random.split(jax.random.key(3))
    x = np.asarray(dequantize(jnp.asarray(images), dq_key), np.float64).reshape(3, -1)
    var = std**2 + float(process.sigma(process.t_min)) ** 2
    log_p = np.sum(-0.5 * np.log(2 * np.pi * var) - 0.5 * (x - mean) ** 2 / var, axis=1)
    np.testing.assert_allclose(bpd, -log_p / (4 * np.log(2)) + 7, atol=2e-3)
