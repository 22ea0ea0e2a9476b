"""`jaxdiff.families`: the family of a config, and each family's loss, denoiser and sampler against the lower-level
functions they stand for; the one set of pipeline methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers
from jaxdiff.config.recipes import digits, digits_edm
from jaxdiff.diffusion import q_sample, training_losses
from jaxdiff.diffusion import continuous
from jaxdiff.diffusion.denoisers import model_denoiser
from jaxdiff.diffusion.losses import dsm_loss, edm_loss
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.families import ContinuousFamily, DiscreteFamily, family_of
from jaxdiff.latent.pipeline import LatentPipeline
from jaxdiff.models import create_model
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.training.diffusion_step import make_loss_fn
from jaxdiff.training.step import init_train_state, make_optimizer
from tests.test_continuous_training import tiny_digits


def init(config):
    """The model and parameters moved away from initialisation (whose zero output layer would hide the network)."""
    model = create_model(config.model)
    params = init_train_state(config, model, make_optimizer(config.training)).params
    return model, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)


@pytest.fixture(scope="module")
def discrete():
    config = digits()
    config.model.dropout = 0.1  # the loss must use the dropout key it is given
    model, params = init(config)
    return config, model, params


@pytest.fixture(scope="module")
def edm():
    config = tiny_digits()
    model, params = init(config)
    return config, model, params


def images(n=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)), jnp.float32)


def keys(seed=0):
    return jax.random.split(jax.random.PRNGKey(seed), 3)


def test_family_of_picks_the_family_of_the_process():
    config = digits()
    family = family_of(config)
    assert isinstance(family, DiscreteFamily) and family.name == "discrete" and family.process is None
    assert family.likelihood == "vlb" and family.draws_trajectories
    with config.unlocked():
        del config.diffusion["process"]  # configs written before the key are discrete
    assert isinstance(family_of(config), DiscreteFamily)
    for process in ("ve", "vp", "subvp", "edm"):
        config = digits_edm()
        config.diffusion.process = process
        family = family_of(config)
        assert isinstance(family, ContinuousFamily) and family.name == "continuous"
        assert type(family.process) is type(continuous.process_from_config(config.diffusion))
        assert family.likelihood == "ode" and not family.draws_trajectories
    config.diffusion.process = "rectified"
    with pytest.raises(ConfigError, match=r"diffusion.process='rectified' is not a process of any family"):
        family_of(config)


def test_discrete_loss_is_the_ddpm_training_loss(discrete):
    config, model, params = discrete
    x_start, labels = images(), None
    t_rng, noise_rng, dropout_rng = keys(1)
    got = family_of(config).loss_fn(model)(params, x_start, labels, t_rng, noise_rng, dropout_rng)

    schedule, dc = family_of(config).schedule, config.diffusion
    t = jax.random.randint(t_rng, (4,), 0, schedule.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_rng, x_start.shape, jnp.float32)
    x_t = q_sample(schedule, x_start, t, noise)
    output = model.apply({"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_rng})
    want = jnp.mean(training_losses(schedule, output, x_start=x_start, x_t=x_t, t=t, noise=noise,
                                    mean_type=dc.mean_type, var_type=dc.var_type, loss_type=dc.loss_type,
                                    hybrid_lambda=dc.hybrid_lambda, min_snr_gamma=dc.min_snr_gamma))  # fmt: skip
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    other = family_of(config).loss_fn(model)(params, x_start, labels, t_rng, noise_rng, keys(2)[2])
    assert float(other) != float(got)  # dropout is on: the dropout key matters


def test_continuous_edm_loss_is_the_edm_loss(edm):
    config, model, params = edm
    x_start = images()
    t_rng, noise_rng, dropout_rng = keys(3)
    got = family_of(config).loss_fn(model)(params, x_start, None, t_rng, noise_rng, dropout_rng)

    process, dc = continuous.process_from_config(config.diffusion), config.diffusion
    denoise = continuous.conditioned_denoiser(config, model, process)
    want = edm_loss(lambda p, x, sigma: denoise(p, x, sigma, None), params, x_start, t_rng, p_mean=dc.p_mean,
                    p_std=dc.p_std, sigma_data=dc.sigma_data, reduce_mean=dc.reduce_mean)  # fmt: skip
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_continuous_dsm_loss_is_the_dsm_loss_on_uncentred_data():
    config = tiny_digits(process="ve", loss_type="dsm", parameterization="score")
    config.data.centered = False
    model, params = init(config)
    x_start = images()
    t_rng, noise_rng, dropout_rng = keys(4)
    got = family_of(config).loss_fn(model)(params, x_start, None, t_rng, noise_rng, dropout_rng)

    process, dc = continuous.process_from_config(config.diffusion), config.diffusion
    denoise = continuous.conditioned_denoiser(config, model, process)
    want = dsm_loss(lambda p, x, sigma: denoise(p, x, sigma, None), params, process, (x_start + 1) / 2, t_rng,
                    eps=dc.t_eps, reduce_mean=dc.reduce_mean, likelihood_weighting=dc.likelihood_weighting)  # fmt: skip
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_the_train_step_loss_is_the_family_loss_after_flips_and_label_dropout(edm):
    config, model, params = edm
    uint8 = jnp.asarray(np.random.default_rng(5).integers(0, 256, (4, 8, 8, 1)), jnp.uint8)
    rng = jax.random.PRNGKey(6)
    got = make_loss_fn(config, model)(params, uint8, jnp.zeros(4, jnp.int32), rng)
    _, t_rng, noise_rng, dropout_rng, _ = jax.random.split(rng, 5)
    x_start = uint8.astype(jnp.float32) / 127.5 - 1  # digits: no flips, unconditional
    want = family_of(config).loss_fn(model)(params, x_start, None, t_rng, noise_rng, dropout_rng)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_discrete_sampler_is_samplers_sample(discrete):
    config, model, params = discrete
    family, rng, shape = family_of(config), jax.random.PRNGKey(7), (3, 8, 8, 1)
    got = family.sampler_fn(model, shape, sampler="ddim", steps=4, eta=0.5, spacing=None, options={})(params, rng, None)
    dc = config.diffusion
    want = samplers.sample(model_denoiser(model, params), family.schedule, shape, rng, sampler="ddim", steps=4, eta=0.5,
                           clip_denoised=config.sampling.clip_denoised, var_type=dc.var_type,
                           mean_type=dc.mean_type)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    assert family.model_calls("heun", 4, {}) == 7 and family.model_calls("ddim", None, {}) == 1000


def test_continuous_sampler_is_sample_continuous(edm):
    config, model, params = edm
    family, rng, shape = family_of(config), jax.random.PRNGKey(8), (3, 8, 8, 1)
    settings = family.configured_sampling()
    assert settings == dict(sampler="heun", steps=18, eta=0.0, spacing=None, options={})
    got = family.sampler_fn(model, shape, **{**settings, "steps": 3})(params, rng, None)
    denoiser = continuous.model_denoiser(config, model, params, family.process)
    want = samplers.sample_continuous(denoiser, family.process, shape, rng, sampler="heun", steps=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    assert family.model_calls("heun", 3, {}) == 5


def test_pipeline_samples_are_the_family_sampler_s(discrete):
    config, model, params = discrete
    pipe = Pipeline(config, params)
    rng = jax.random.PRNGKey(9)
    got, _, _ = pipe.sample_batch(2, rng, sampler="ddim", steps=3)
    want = family_of(config).sampler_fn(model, (2, 8, 8, 1), sampler="ddim", steps=3, eta=0.0, spacing=None,
                                        options={})(params, rng, None)  # fmt: skip
    want = np.asarray(jnp.clip(jnp.round((want + 1) * 127.5), 0, 255), np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # jit vs eager rounding


def test_each_family_checks_its_denoise_inputs(discrete, edm):
    x = np.zeros((1, 8, 8, 1), np.float32)
    with pytest.raises(UsageError, match="t has dtype float32; the model expects 0-based step indices"):
        family_of(discrete[0]).denoise_inputs(x, np.array([3.0], np.float32))
    with pytest.raises(UsageError, match="t must hold noise levels σ > 0 for a continuous-time model, got 0.0"):
        family_of(edm[0]).denoise_inputs(x, np.array([0.0]))
    _, sigma = family_of(edm[0]).denoise_inputs(x, [0.5])
    assert sigma.dtype == jnp.float32


@pytest.mark.parametrize("method, args", [("text_to_image", (["a cat"],)), ("image_to_image", (None, ["a cat"])),
                                          ("inpaint", (None, None, ["a cat"]))])  # fmt: skip
def test_a_pixel_pipeline_refuses_the_text_methods_in_one_line(edm, method, args):
    config, _, params = edm
    with pytest.raises(UsageError) as info:
        getattr(Pipeline(config, params), method)(*args)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{method}() needs a text-to-image model")
    assert message.endswith("this pipeline holds an unconditional pixel-space model of the continuous family "
                            "(no text conditioning)")  # fmt: skip


@pytest.mark.parametrize("method", ["sample", "denoise"])
def test_a_text_to_image_pipeline_refuses_sample_and_denoise_in_one_line(method):
    pipe = LatentPipeline.__new__(LatentPipeline)  # the refusal needs no weights
    with pytest.raises(UsageError) as info:
        getattr(pipe, method)(4)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{method}() needs a pixel-space model")
    assert message.endswith("this pipeline holds a text-to-image latent model")
    if method == "sample":
        assert "text_to_image([''] * n)" in message
