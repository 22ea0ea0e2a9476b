"""Continuous-time losses against float64 NumPy references that redraw the same randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.losses import dsm_loss, edm_loss, edm_weight
from jaxdiff.processes import make_process

X0 = np.random.default_rng(0).uniform(-1, 1, size=(5, 2, 2, 3))
PARAMS = {"w": jnp.float32(0.8)}


def toy_apply(params, x, sigma, xp=jnp):
    """A nonlinear σ-dependent denoiser x̂_0 = tanh(w·x/sqrt(1 + σ²)) + 0.1·σ/(1 + σ)."""
    s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    return xp.tanh(params["w"] * x / xp.sqrt(1 + s**2)) + 0.1 * s / (1 + s)


def numpy_apply(x, sigma):
    return toy_apply({"w": 0.8}, x, sigma, xp=np)


def reference_reduce(per_element, reduce_mean):
    flat = per_element.reshape(per_element.shape[0], -1)
    return np.mean(flat.mean(1) if reduce_mean else flat.sum(1))


def vp_numpy(t, b0=0.1, b1=20.0):
    log_alpha = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    return np.exp(log_alpha), np.sqrt(1 - np.exp(2 * log_alpha)), b0 + t * (b1 - b0)


@pytest.mark.parametrize("reduce_mean", [False, True])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_dsm_loss_matches_numpy(reduce_mean, likelihood_weighting):
    """score_sde's loss on the VP SDE: ‖σ·s + z‖², or β(t)·‖s + z/σ‖² with likelihood weighting."""
    process = make_process("vp")
    rng = jax.random.key(4)
    loss = dsm_loss(toy_apply, PARAMS, process, jnp.asarray(X0, jnp.float32), rng,
                    reduce_mean=reduce_mean, likelihood_weighting=likelihood_weighting)  # fmt: skip
    t_key, noise_key = jax.random.split(rng)
    t = np.asarray(jax.random.uniform(t_key, (5,), jnp.float32, 1e-5, 1.0), np.float64)
    z = np.asarray(jax.random.normal(noise_key, X0.shape, jnp.float32), np.float64)
    alpha, sigma, beta = (v[:, None, None, None] for v in vp_numpy(t))
    x_t = alpha * X0 + sigma * z
    denoised = numpy_apply(x_t / alpha, (sigma / alpha).reshape(-1))
    score = (alpha * denoised - x_t) / sigma**2
    per_element = beta * (score + z / sigma) ** 2 if likelihood_weighting else (score * sigma + z) ** 2
    np.testing.assert_allclose(loss, reference_reduce(per_element, reduce_mean), rtol=2e-4)


@pytest.mark.parametrize("reduce_mean", [False, True])
def test_edm_loss_matches_numpy(reduce_mean):
    rng = jax.random.key(5)
    loss = edm_loss(toy_apply, PARAMS, jnp.asarray(X0, jnp.float32), rng, reduce_mean=reduce_mean)
    sigma_key, noise_key = jax.random.split(rng)
    sigma = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(sigma_key, (5,), jnp.float32), np.float64))
    n = np.asarray(jax.random.normal(noise_key, X0.shape, jnp.float32), np.float64) * sigma[:, None, None, None]
    weight = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2)[:, None, None, None]
    per_element = weight * (numpy_apply(X0 + n, sigma) - X0) ** 2
    np.testing.assert_allclose(loss, reference_reduce(per_element, reduce_mean), rtol=2e-4)


def test_edm_weight_times_c_out_squared_is_one():
    sigma = np.geomspace(0.002, 80.0, 50)
    c_out = sigma * 0.5 / np.sqrt(sigma**2 + 0.25)
    np.testing.assert_allclose(np.asarray(edm_weight(jnp.asarray(sigma, jnp.float32)), np.float64) * c_out**2, 1.0, rtol=1e-5)


def test_exact_denoiser_gives_the_irreducible_loss():
    """For Gaussian data the DSM loss of the exact D is Σ_dims E[σ̃²s²/(s² + σ̃²)]/σ̃² > 0; a wrong D is worse."""
    s = 0.5
    process = make_process("ve")
    x0 = jnp.asarray(np.random.default_rng(1).normal(size=(4096, 1)) * s, jnp.float32)
    exact = lambda params, x, sigma: s**2 * x / (s**2 + sigma[:, None] ** 2)
    shrunk = lambda params, x, sigma: 0.9 * exact(params, x, sigma)
    rng = jax.random.key(0)
    loss = float(dsm_loss(exact, {}, process, x0, rng))
    t = np.linspace(1e-5, 1, 200001)
    level = 0.01 * 5000.0**t
    np.testing.assert_allclose(loss, np.mean(s**2 / (s**2 + level**2)), rtol=0.05)
    assert float(dsm_loss(shrunk, {}, process, x0, rng)) > loss


def test_bad_input():
    x0 = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="eps=0 must be a number in"):
        dsm_loss(toy_apply, PARAMS, make_process("vp"), x0, jax.random.key(0), eps=0)
    with pytest.raises(ValueError, match="p_std=-1.0 must be a finite number > 0"):
        edm_loss(toy_apply, PARAMS, x0, jax.random.key(0), p_std=-1.0)
