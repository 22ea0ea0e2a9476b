"""The flow processes (rectified flow's linear interpolant and SiT's GVP) against float64 NumPy references, and bad
input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import ConfigError
from jaxdiff.processes import FLOW_PROCESSES, PROCESSES, FlowProcess, GVPProcess, make_process

# float32 times, read back in float64 so that the references see the values the process sees
T = np.float32([0.0, 1e-3, 0.05, 0.3, 0.5, 0.77, 0.999]).astype(np.float64)


def reference(name, t):
    """(α, σ, α', σ') in float64: flow α = 1 − t, σ = t; gvp α = cos(πt/2), σ = sin(πt/2)."""
    if name == "flow":
        return 1 - t, t, -np.ones_like(t), np.ones_like(t)
    half = np.pi / 2
    return np.cos(half * t), np.sin(half * t), -half * np.sin(half * t), half * np.cos(half * t)


@pytest.mark.parametrize("name", FLOW_PROCESSES)
def test_marginals_and_derivatives(name):
    process = make_process(name)
    assert isinstance(process, FlowProcess) and (process.t_min, process.t_max) == (1e-3, 1 - 1e-3)
    alpha, sigma, d_alpha, d_sigma = reference(name, T)
    t = jnp.asarray(T, jnp.float32)
    for got, want in [(process.alpha(t), alpha), (process.sigma(t), sigma), (process.d_alpha(t), d_alpha),
                      (process.d_sigma(t), d_sigma)]:  # fmt: skip
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-6, atol=1e-7)
    # the derivatives are those of α and σ
    np.testing.assert_allclose(jax.vmap(jax.grad(process.alpha))(t), d_alpha, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(process.sigma))(t), d_sigma, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FLOW_PROCESSES)
def test_noise_level_and_its_inverse(name):
    process = make_process(name)
    alpha, sigma, _, _ = reference(name, T)
    level = process.noise_level(jnp.asarray(T, jnp.float32))
    np.testing.assert_allclose(level, sigma / alpha, rtol=2e-5)
    np.testing.assert_allclose(process.t_from_noise_level(level), T, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(process.alpha_from_noise_level(jnp.asarray(sigma / alpha, jnp.float32)), alpha,
                               rtol=1e-6, atol=1e-8)  # fmt: skip
    # the ends: level 0 is t = 0 (α = 1), level ∞ is t = 1 (α = 0) — α(1) exactly 0 for gvp too
    ends = jnp.asarray([0.0, np.inf], jnp.float32)
    np.testing.assert_array_equal(process.t_from_noise_level(ends), [0.0, 1.0])
    np.testing.assert_array_equal(process.alpha_from_noise_level(ends), [1.0, 0.0])
    assert float(process.alpha(1.0)) == 0.0 and float(process.sigma(0.0)) == 0.0


@pytest.mark.parametrize("name", FLOW_PROCESSES)
def test_drift_and_diffusion(name):
    """f = (α'/α)·x and g² = α²·d(σ/α)²/dt = 2σ(σ'α − σα')/α (flow: g² = 2t/(1 − t))."""
    process = make_process(name)
    alpha, sigma, d_alpha, d_sigma = reference(name, T)
    t = jnp.asarray(T, jnp.float32)
    np.testing.assert_allclose(process.drift_coefficient(t), d_alpha / alpha, rtol=2e-5, atol=1e-6)
    g2 = 2 * sigma * (d_sigma * alpha - sigma * d_alpha) / alpha
    np.testing.assert_allclose(process.diffusion(t), np.sqrt(g2), rtol=2e-5, atol=1e-7)
    if name == "flow":
        np.testing.assert_allclose(g2, 2 * T / (1 - T), rtol=1e-12)
    x = np.random.default_rng(0).normal(size=(T.size, 3))
    np.testing.assert_allclose(process.drift(jnp.asarray(x, jnp.float32), t), (d_alpha / alpha)[:, None] * x,
                               rtol=2e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("name", FLOW_PROCESSES)
def test_prior_is_the_standard_normal(name):
    process = make_process(name)
    z = np.random.default_rng(1).normal(size=(4, 2, 3, 1))
    expected = -0.5 * 6 * np.log(2 * np.pi) - 0.5 * np.sum(z.reshape(4, -1) ** 2, 1)
    np.testing.assert_allclose(process.prior_logp(jnp.asarray(z, jnp.float32)), expected, rtol=1e-6)
    sample = np.asarray(process.prior_sample(jax.random.key(0), (4000, 2)))
    assert abs(sample.mean()) < 0.05 and abs(sample.std() - 1) < 0.03


def test_parameters_and_classes():
    assert set(FLOW_PROCESSES) <= set(PROCESSES)
    process = make_process("gvp", t_min=0.01, t_max=0.9)
    assert type(process) is GVPProcess and (process.t_min, process.t_max) == (0.01, 0.9)
    assert type(make_process("flow")) is FlowProcess


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("flow", {"t_max": 1.0}, "need t_max < 1 (σ/α is infinite at t = 1), got t_min=0.001, t_max=1.0"),
        ("gvp", {"t_min": 0.0}, "need 0 < t_min < t_max, got t_min=0.0, t_max=0.999"),
        ("flow", {"t_min": 0.5, "t_max": 0.4}, "need 0 < t_min < t_max, got t_min=0.5, t_max=0.4"),
        ("flow", {"sigma_max": 80.0}, "unknown parameter(s) ['sigma_max'] for process 'flow'; allowed: ['t_max', 't_min']"),
        ("gvp", {"t_min": float("nan")}, "t_min=nan must be a real number"),
        ("rectified", {}, "unknown process 'rectified'; expected one of ('ve', 'vp', 'subvp', 'edm', 'flow', 'gvp')"),
    ],
)
def test_bad_parameters_are_one_line_config_errors(name, params, message):
    with pytest.raises(ConfigError) as err:
        make_process(name, **params)
    assert str(err.value) == message
