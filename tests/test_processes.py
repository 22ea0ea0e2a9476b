"""Noise processes against float64 NumPy references of the papers' formulas, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.processes import from_schedule, make_process
from jaxdiff.schedule import make_schedule

T_GRID = np.array([1e-3, 0.05, 0.3, 0.5, 0.77, 1.0])


def vp_reference(t, b0=0.1, b1=20.0):
    log_alpha = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    beta = b0 + t * (b1 - b0)
    return np.exp(log_alpha), beta


def reference(name, t):
    """(alpha, sigma, drift coefficient, diffusion g) in float64, from score_sde's sde_lib formulas."""
    if name == "ve":
        sigma = 0.01 * (50.0 / 0.01) ** t
        return np.ones_like(t), sigma, np.zeros_like(t), sigma * np.sqrt(2 * np.log(50.0 / 0.01))
    if name == "edm":
        return np.ones_like(t), t, np.zeros_like(t), np.sqrt(2 * t)
    alpha, beta = vp_reference(t)
    if name == "vp":
        return alpha, np.sqrt(1 - alpha**2), -0.5 * beta, np.sqrt(beta)
    discount = 1 - np.exp(-2 * 0.1 * t - (20 - 0.1) * t**2)
    return alpha, 1 - alpha**2, -0.5 * beta, np.sqrt(beta * discount)


@pytest.mark.parametrize("name", ["ve", "vp", "subvp", "edm"])
def test_marginals_drift_diffusion(name):
    process = make_process(name)
    t = T_GRID * (80.0 if name == "edm" else 1.0) + (0.002 if name == "edm" else 0.0)
    alpha, sigma, coef, g = reference(name, t)
    tj = jnp.asarray(t, jnp.float32)
    np.testing.assert_allclose(process.alpha(tj), alpha, rtol=2e-5)
    np.testing.assert_allclose(process.sigma(tj), sigma, rtol=2e-5)
    np.testing.assert_allclose(process.drift_coefficient(tj), coef, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(process.diffusion(tj), g, rtol=1e-4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(t.size, 3)), jnp.float32)
    np.testing.assert_allclose(process.drift(x, tj), coef[:, None] * np.asarray(x, np.float64), rtol=2e-5, atol=1e-6)
    level = process.noise_level(tj)
    np.testing.assert_allclose(level, sigma / alpha, rtol=2e-5)
    np.testing.assert_allclose(process.t_from_noise_level(level), t, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["ve", "vp", "subvp", "edm"])
def test_prior(name):
    process = make_process(name)
    std = {"ve": 50.0, "edm": 80.0}.get(name, 1.0)
    z = np.random.default_rng(1).normal(size=(4, 2, 3, 1)) * std
    expected = -0.5 * 6 * np.log(2 * np.pi * std**2) - 0.5 * np.sum(z.reshape(4, -1) ** 2, 1) / std**2
    np.testing.assert_allclose(process.prior_logp(jnp.asarray(z, jnp.float32)), expected, rtol=1e-5)
    sample = np.asarray(process.prior_sample(jax.random.key(0), (4000, 2)))
    assert abs(sample.std() / std - 1) < 0.05


def test_papers_defaults_and_overrides():
    assert make_process("ve").sigma_max == 50.0 and make_process("vp").beta_max == 20.0
    edm = make_process("edm")
    assert (edm.t_min, edm.t_max) == (0.002, 80.0)
    ve = make_process("ve", sigma_max=100.0)
    np.testing.assert_allclose(ve.sigma(1.0), 100.0, rtol=1e-6)


def test_discrete_schedule_is_a_special_case():
    schedule = make_schedule("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    ac = np.cumprod(1 - betas)
    process = from_schedule(schedule)
    t = jnp.arange(1000, dtype=jnp.float32)
    np.testing.assert_allclose(process.alpha(t), np.sqrt(ac), rtol=2e-5)
    np.testing.assert_allclose(process.sigma(t), np.sqrt(1 - ac), rtol=2e-4)
    level = np.sqrt((1 - ac) / ac)
    np.testing.assert_allclose(process.t_from_noise_level(jnp.asarray(level, jnp.float32)), np.arange(1000), atol=2e-3)
    # Between steps log(σ/α) is linear, and the SDE is the VP one with β from d log α/dt (≈ β_t per step).
    mid = 0.5 * (np.log(level[10]) + np.log(level[11]))
    np.testing.assert_allclose(np.log(process.noise_level(10.5)), mid, rtol=1e-5)
    assert (process.t_min, process.t_max) == (0.0, 999.0)
    g = np.asarray(process.diffusion(jnp.asarray([100.5, 700.5])))
    np.testing.assert_allclose(g**2, betas[[101, 701]], rtol=2e-2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_process("cosine"), "unknown process 'cosine'"),
        (lambda: make_process("ve", sigma_min=50.0, sigma_max=10.0), r"need 0 < sigma_min < sigma_max, got sigma_min=50.0, sigma_max=10.0"),
        (lambda: make_process("vp", beta_min=-0.1), r"need betas >= 0, got beta_min=-0.1, beta_max=20.0"),
        (lambda: make_process("vp", sigma_max=3.0), "unknown parameter"),
        (lambda: make_process("subvp", t_min=0.0), "0 < t_min < t_max"),
        (lambda: make_process("edm", sigma_max=math.inf), "must be finite"),
        (lambda: from_schedule(make_schedule("jsd", 10)), "every beta in"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_process_is_a_pytree_through_jit():
    process = make_process("vp")
    np.testing.assert_allclose(jax.jit(lambda p: p.sigma(0.5))(process), process.sigma(0.5), rtol=1e-6)
