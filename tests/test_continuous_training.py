"""Continuous-time models through the train step: the losses against NumPy, and a tiny EDM model that learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.config import validate
from jaxdiff.diffusion.continuous import model_denoiser, process_from_config
from jaxdiff.data.sources import load_digits
from jaxdiff.models import create_model
from jaxdiff.config.recipes import digits_edm
from jaxdiff.samplers import sample_continuous
from jaxdiff.schedule import schedule_from_config
from jaxdiff.training.diffusion_step import make_loss_fn, make_train_step
from jaxdiff.training.step import init_train_state, make_optimizer, preprocess


def tiny_digits(network="song_unet", **diffusion):
    """digits_edm with a smaller network; `diffusion` overrides config.diffusion."""
    config = digits_edm()
    config.model.song_unet.update(model_channels=16, attn_resolutions=())
    if network == "ncsnpp":
        config.model.network = "ncsnpp"
        config.model.ncsnpp.update(image_size=8, num_channels=1, nf=16, ch_mult=(1, 2), num_res_blocks=1,
                                   attn_resolutions=(4,), dropout=0.0)  # fmt: skip
    config.diffusion.update(diffusion)
    return validate(config)


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)), jnp.zeros((n,), jnp.int32)


def draws(rng):
    """The keys of the loss's noise level and noise: the step's `t_rng` (as `make_loss_fn` splits it), split."""
    t_rng = jax.random.split(rng, 5)[1]
    t_key, noise_key = jax.random.split(t_rng)
    return t_key, noise_key


def network(config, model, params, x, labels):
    return np.asarray(model.apply({"params": params}, x, labels, None, train=False), np.float64)


def init(config):
    model = create_model(config.model)
    return model, init_train_state(config, model, make_optimizer(config.training)).params


def test_vp_eps_dsm_loss_is_the_epsilon_matching_loss():
    """VP ε-model: σ·score + z = z − ε̂, with the network shown x_t and labels t·999."""
    config = tiny_digits("ncsnpp", process="vp", loss_type="dsm", parameterization="eps", t_eps=1e-3)
    config.data.random_flip = False
    model, params = init(config)
    images, labels = batch()
    rng = jax.random.PRNGKey(3)
    loss = float(make_loss_fn(config, model)(params, images, labels, rng))

    t_key, noise_key = draws(rng)
    t = np.asarray(jax.random.uniform(t_key, (8,), jnp.float32, 1e-3, 1.0), np.float64)
    z = np.asarray(jax.random.normal(noise_key, (8, 8, 8, 1), jnp.float32), np.float64)
    x0 = np.asarray(images, np.float64) / 127.5 - 1.0
    log_alpha = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    alpha, sigma = np.exp(log_alpha), np.sqrt(1.0 - np.exp(2 * log_alpha))
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * z
    eps_hat = network(config, model, params, jnp.asarray(x_t, jnp.float32), jnp.asarray(999.0 * t, jnp.float32))
    expected = np.mean(np.sum((z - eps_hat) ** 2, axis=(1, 2, 3)))
    assert loss == pytest.approx(expected, rel=2e-4)


def test_ve_score_dsm_loss_with_mean_reduction():
    """VE score model: the network's output over σ is the score; σ·score + z = F(x_t, σ) + z, averaged per image."""
    config = tiny_digits("ncsnpp", process="ve", loss_type="dsm", parameterization="score", reduce_mean=True)
    config.model.ncsnpp.embedding_type = "fourier"
    config.data.random_flip = False
    model, params = init(config)
    images, labels = batch(seed=1)
    rng = jax.random.PRNGKey(4)
    loss = float(make_loss_fn(config, model)(params, images, labels, rng))

    t_key, noise_key = draws(rng)
    t = np.asarray(jax.random.uniform(t_key, (8,), jnp.float32, 1e-5, 1.0), np.float64)
    z = np.asarray(jax.random.normal(noise_key, (8, 8, 8, 1), jnp.float32), np.float64)
    sigma = 0.01 * (50.0 / 0.01) ** t
    x_t = np.asarray(images, np.float64) / 127.5 - 1.0 + sigma[:, None, None, None] * z
    out = network(config, model, params, jnp.asarray(x_t, jnp.float32), jnp.asarray(sigma, jnp.float32))
    expected = np.mean(np.mean((out + z) ** 2, axis=(1, 2, 3)))
    assert loss == pytest.approx(expected, rel=2e-4)


def test_edm_loss_of_the_preconditioned_network():
    """EDM: λ(σ)·‖c_skip·x + c_out·F(c_in·x, ln σ/4) − x_0‖², ln σ ~ N(−1.2, 1.2²), summed per image."""
    config = tiny_digits(sigma_data=0.6, p_mean=-1.0, p_std=1.5)
    config.data.random_flip = False
    model, params = init(config)
    params = jax.tree.map(lambda p: p + 0.02, params)  # the zero-initialised output layer would hide F
    images, labels = batch(seed=2)
    rng = jax.random.PRNGKey(5)
    loss = float(make_loss_fn(config, model)(params, images, labels, rng))

    sigma_key, noise_key = draws(rng)
    sigma = np.exp(-1.0 + 1.5 * np.asarray(jax.random.normal(sigma_key, (8,), jnp.float32), np.float64))
    n = np.asarray(jax.random.normal(noise_key, (8, 8, 8, 1), jnp.float32), np.float64)
    x0 = np.asarray(images, np.float64) / 127.5 - 1.0
    s, sd = sigma[:, None, None, None], 0.6
    x = x0 + s * n
    f = network(config, model, params, jnp.asarray(x / np.sqrt(s**2 + sd**2), jnp.float32),
                jnp.asarray(np.log(sigma) / 4, jnp.float32))  # fmt: skip
    denoised = sd**2 / (s**2 + sd**2) * x + s * sd / np.sqrt(s**2 + sd**2) * f
    weight = (s**2 + sd**2) / (s * sd) ** 2
    expected = np.mean(np.sum(weight * (denoised - x0) ** 2, axis=(1, 2, 3)))
    assert loss == pytest.approx(expected, rel=2e-4)


def statistics_error(samples, data):
    """(RMS error of the per-pixel mean image, mean distance of each sample to its nearest data image)."""
    flat_samples, flat_data = samples.reshape(len(samples), -1), data.reshape(len(data), -1)
    mean_error = np.sqrt(np.mean((flat_samples.mean(0) - flat_data.mean(0)) ** 2))
    distances = np.sqrt(((flat_samples[:, None, :] - flat_data[None, :, :]) ** 2).sum(-1))
    return mean_error, distances.min(1).mean()


@pytest.mark.slow
def test_a_tiny_edm_model_learns_the_digits():
    """300 steps on the 8×8 digits lower the loss, and Heun samples match the data's statistics better."""
    config = tiny_digits()
    config.training.update(batch_size=64, learning_rate=2e-3, warmup_steps=20, ema_decay=0.95)
    model = create_model(config.model)
    tx = make_optimizer(config.training)
    state = init_train_state(config, model, tx)
    step = jax.jit(make_train_step(config, model, tx))
    source = load_digits("train")
    order = np.random.default_rng(0).integers(0, source.num_examples, (300, 64))
    losses = []
    for indices in order:
        images, labels = source.get(indices)
        state, metrics = step(state, {"image": jnp.asarray(images), "label": jnp.asarray(labels)})
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:20])

    data = np.asarray(preprocess(jnp.asarray(source.images), None))
    process = process_from_config(config.diffusion)
    errors = []
    for params in (init_train_state(config, model, tx).ema_params, state.ema_params):
        denoiser = model_denoiser(config, model, params, process)
        samples = sample_continuous(denoiser, process, (128, 8, 8, 1), jax.random.PRNGKey(7), sampler="heun",
                                    steps=18)  # fmt: skip
        errors.append(statistics_error(np.clip(np.asarray(samples), -1, 1), data))
    (mean_before, nearest_before), (mean_after, nearest_after) = errors
    assert mean_after < 0.5 * mean_before
    assert nearest_after < 0.7 * nearest_before
