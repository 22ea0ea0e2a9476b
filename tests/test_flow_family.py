"""The flow family: picked for the flow processes, its loss the flow-matching loss of the network, its denoiser a
FlowModel with guidance in a t interval, config mistakes as one-line errors, and a run trained with `jaxdiff train`
then sampled through `Pipeline.from_checkpoint(...).sample(n, class_label=k, guidance=w)`."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff import images
from jaxdiff.cli import main
from jaxdiff.config import validate
from jaxdiff.config.recipes import digits_edm
from jaxdiff.diffusion.continuous import network_fn
from jaxdiff.diffusion.flow import FlowModel
from jaxdiff.diffusion.losses import flow_matching_loss
from jaxdiff.errors import ConfigError
from jaxdiff.families import ContinuousFamily, FlowFamily, family_of
from jaxdiff.models import create_model
from jaxdiff.processes import FlowProcess, GVPProcess
from jaxdiff.samplers import sample_continuous
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.training.step import init_train_state, make_optimizer

FLOW = dict(process="flow", loss_type="flow_matching", parameterization="velocity", reduce_mean=True)


def tiny_flow(num_classes=0, **diffusion):
    """digits_edm's SongUNet, 16 channels, on the flow process with euler; `diffusion` overrides config.diffusion."""
    config = digits_edm()
    config.model.num_classes = num_classes
    config.model.song_unet.update(model_channels=16, attn_resolutions=(), label_dim=num_classes)
    config.diffusion.update({**FLOW, **diffusion})
    config.sampling.update(sampler="euler", steps=3, batch_size=4)
    return validate(config)


def init(config):
    """The model and parameters moved away from initialisation (whose zero output layer would hide the network)."""
    model = create_model(config.model)
    params = init_train_state(config, model, make_optimizer(config.training)).params
    return model, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)


def test_family_of_the_flow_processes():
    for process, kind in (("flow", FlowProcess), ("gvp", GVPProcess)):
        family = family_of(tiny_flow(process=process))
        assert isinstance(family, FlowFamily) and isinstance(family, ContinuousFamily) and family.name == "flow"
        assert type(family.process) is kind and family.likelihood == "ode" and not family.draws_trajectories
        assert {"euler", "heun", "midpoint", "euler_maruyama", "ode", "dpm_solver++"} <= set(family.samplers)
    family = family_of(tiny_flow(process="gvp", parameterization="v"))
    config = family.config
    config.sampling.update(sampler="euler_maruyama", steps=0, last_step="tweedie", shift=2.0)
    assert family.configured_sampling() == dict(sampler="euler_maruyama", steps=None, eta=0.0, spacing=None, options=dict(
        shift=2.0, diffusion_form="sigma", diffusion_norm=1.0, last_step="tweedie", last_step_size=0.04))  # fmt: skip
    assert family.model_calls("euler_maruyama", None, family.configured_sampling()["options"]) == 250
    assert family.sampling_settings("heun", 4) == ("heun", 4, {"shift": 2.0})


@pytest.mark.parametrize("diffusion", [
    dict(parameterization="velocity"),
    dict(process="gvp", parameterization="x0", t_sampling="logit_normal", logit_std=0.5, shift=3.0, reduce_mean=False),
    dict(parameterization="eps", t_sampling="mode", loss_weighting="edm", sigma_data=0.6, time_scale=1.0,
         train_t_max=0.9),
])  # fmt: skip
def test_loss_is_the_flow_matching_loss_of_the_network(diffusion):
    """The train step's family loss is flow_matching_loss of the network seeing (x_t, t·time_scale), labels dropped
    in, keys: t and noise from t_rng, dropout from dropout_rng."""
    config = tiny_flow(num_classes=10, **diffusion)
    model, params = init(config)
    x_start = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray([0, 3, 10, 7])
    t_rng, noise_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(2), 3)
    got = family_of(config).loss_fn(model)(params, x_start, labels, t_rng, noise_rng, dropout_rng)
    dc = config.diffusion

    def apply_fn(p, x_t, t):
        return model.apply({"params": p}, x_t, dc.time_scale * t, labels, train=False)

    want = flow_matching_loss(apply_fn, params, family_of(config).process, x_start, t_rng,
                              parameterization=dc.parameterization, t_sampling=dc.t_sampling, logit_mean=dc.logit_mean,
                              logit_std=dc.logit_std, mode_scale=dc.mode_scale, shift=dc.shift, t_max=dc.train_t_max,
                              weighting=dc.loss_weighting, sigma_data=dc.sigma_data, reduce_mean=dc.reduce_mean)  # fmt: skip
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)  # two programs (train=True vs False) round apart


def test_denoiser_is_a_flow_model_with_guidance_in_its_interval():
    """Inside [guidance_t_min, guidance_t_max]: (1 + w)·out(y) − w·out(null); outside: out(y); D(x; σ) the
    velocity model's x̂_0 = x_t − t·u at t = σ/(1 + σ), x_t = x/(1 + σ)."""
    config = tiny_flow(num_classes=10)
    config.sampling.update(guidance_t_min=0.3, guidance_t_max=0.6)
    model, params = init(config)
    family = family_of(config)
    labels = jnp.asarray([1, 2])
    denoiser = family.denoiser(model, params, labels=labels, guidance=2.0)
    assert isinstance(denoiser, FlowModel)
    x_t = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 1)), jnp.float32)
    network = jax.jit(lambda t, y: network_fn(model, params, y)(x_t, 1000.0 * t))
    velocity, denoise = jax.jit(denoiser.velocity), jax.jit(denoiser)

    def out(t, y):
        return np.asarray(network(jnp.broadcast_to(jnp.float32(t), (2,)), y), np.float64)

    for t, guided in ((0.2, False), (0.3, True), (0.5, True), (0.7, False), (1.0, False)):
        want = 3 * out(t, labels) - 2 * out(t, None) if guided else out(t, labels)
        np.testing.assert_allclose(velocity(x_t, jnp.full((2,), t)), want, rtol=1e-4, atol=1e-5)
    sigma = jnp.asarray([0.5, 1.0])  # t = 1/3, 1/2: inside
    t = np.array([1 / 3, 1 / 2])
    u = 3 * out(t, labels) - 2 * out(t, None)
    x = x_t * (1.0 + sigma[:, None, None, None])
    np.testing.assert_allclose(denoise(x, sigma), np.asarray(x_t) - t[:, None, None, None] * u, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("diffusion", dict(t_sampling="cosmap"), "config diffusion.t_sampling='cosmap' is not allowed: expected one of "
                                                 "('uniform', 'logit_normal', 'mode')"),
        ("diffusion", dict(logit_std=0.0), "config diffusion.logit_std=0.0 is not allowed: expected a number > 0"),
        ("diffusion", dict(shift=0.0), "config diffusion.shift=0.0 is not allowed: expected a number > 0"),
        ("diffusion", dict(mode_scale=2.0), "config diffusion.mode_scale=2.0 is not allowed: expected a number in "
                                            "[-1, 1.75194]"),
        ("diffusion", dict(process="rectified"), "config diffusion.process='rectified' is not allowed"),
        ("diffusion", dict(loss_type="dsm"), "config diffusion.loss_type='dsm' is not a loss of diffusion.process="
                                             "'flow'; expected one of ('flow_matching',)"),
        ("diffusion", dict(parameterization="edm"), "config diffusion.parameterization='edm' is not one of "
                                                    "diffusion.process='flow'; expected one of ('velocity', 'x0', "
                                                    "'eps', 'v')"),
        ("diffusion", dict(loss_type="mse"), "config diffusion.loss_type='mse' is a discrete-schedule loss; "
                                             "diffusion.process='flow' needs one of ('flow_matching',)"),
        ("diffusion", dict(time_scale=0.0), "config diffusion.time_scale=0.0 is not allowed: expected a number > 0"),
        ("sampling", dict(shift=-1.0), "config sampling.shift=-1.0 is not allowed: expected a number > 0"),
        ("sampling", dict(diffusion_form="SBDM"), "config sampling.diffusion_form='SBDM' is not allowed: expected one "
                                                  "of ('constant', 'sigma', 'linear', 'decreasing', "
                                                  "'increasing-decreasing')"),
        ("sampling", dict(guidance_t_min=0.7, guidance_t_max=0.5), "config sampling.guidance_t_min=0.7 must be <= "
                                                                   "sampling.guidance_t_max=0.5"),
    ],
)
def test_config_mistakes_are_one_line_config_errors(section, values, message):
    config = ml_collections.ConfigDict(tiny_flow().to_dict(), type_safe=False)
    config[section].update(values)
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_flow_settings_are_refused_on_the_other_processes():
    config = digits_edm()
    config.diffusion.update(process="ve", loss_type="flow_matching", parameterization="score")
    with pytest.raises(ConfigError, match=r"^config diffusion.loss_type='flow_matching' is not a loss of "
                                          r"diffusion.process='ve'; expected one of \('dsm', 'edm'\)$"):  # fmt: skip
        validate(config)
    config = digits_edm()
    config.diffusion.parameterization = "velocity"
    with pytest.raises(ConfigError, match=r"^config diffusion.parameterization='velocity' is not one of "
                                          r"diffusion.process='edm'; expected one of \('eps', 'score', 'edm'\)$"):  # fmt: skip
        validate(config)
    for key, value in (("shift", 3.0), ("last_step", "tweedie"), ("guidance_t_max", 0.5)):
        config = digits_edm()
        config.sampling[key] = value
        with pytest.raises(ConfigError, match=rf"^config sampling.{key}={value!r} is a setting of the flow processes"):
            validate(config)
    config = digits_edm()
    config.diffusion.update(FLOW)
    config.diffusion.process = "discrete"
    config.model.network = "ddpm_unet"
    with pytest.raises(ConfigError, match=r"^config diffusion.loss_type='flow_matching' needs a continuous"):
        validate(config)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_with_the_cli_then_sample_the_pipeline(tmp_path, capsys):
    """A class-conditional flow run of a few steps through `jaxdiff train` (a large learning rate and no EMA, so that
    three steps move the zero-initialised output layer); the pipeline draws what `sample_continuous` draws with the
    family's guided FlowModel, also with a progress bar (a wrapped network)."""
    workdir = tmp_path / "run"
    overrides = [
        "--config.model.num_classes=10", "--config.model.song_unet.label_dim=10",
        "--config.model.song_unet.model_channels=16", "--config.model.song_unet.attn_resolutions=()",
        "--config.training.label_dropout=0.1", "--config.diffusion.process=gvp",
        "--config.diffusion.loss_type=flow_matching", "--config.diffusion.parameterization=velocity",
        "--config.diffusion.reduce_mean=True", "--config.diffusion.t_sampling=logit_normal",
        "--config.sampling.sampler=heun", "--config.sampling.steps=3", "--config.sampling.guidance_t_max=0.8",
        "--config.training.batch_size=8", "--config.training.num_train_steps=3",
        "--config.training.checkpoint_every_steps=3", "--config.training.sample_every_steps=3",
        "--config.training.num_sample_images=2", "--config.training.log_every_steps=1",
        "--config.training.learning_rate=0.05", "--config.training.warmup_steps=0", "--config.training.ema_decay=0.0",
    ]  # fmt: skip
    assert main(["train", "--config", "digits_edm", "--workdir", str(workdir), *overrides]) == 0
    assert "finished at step 3" in capsys.readouterr().out
    assert (workdir / "samples" / "step_00000003.png").is_file()
    pipe = Pipeline.from_checkpoint(workdir)
    assert pipe.step == 3 and pipe.continuous and isinstance(pipe.family, FlowFamily)
    assert pipe.default_sampler == "heun" and pipe.model_calls() == 6
    got = pipe.sample(3, class_label=4, guidance=1.5, seed=2)
    assert got.dtype == np.uint8 and got.shape == (3, 8, 8, 1)
    denoiser = pipe.family.denoiser(pipe.model, pipe.params, labels=jnp.full((3,), 4, jnp.int32), guidance=1.5)
    x = sample_continuous(denoiser, pipe.process, (3, 8, 8, 1), jax.random.fold_in(jax.random.PRNGKey(2), 0),
                          sampler="heun", steps=3, shift=1.0)  # fmt: skip
    np.testing.assert_array_equal(got, images.to_uint8(np.asarray(x)))
    np.testing.assert_array_equal(pipe.sample(3, class_label=4, guidance=1.5, seed=2, progress=True), got)
    assert not np.array_equal(pipe.sample(3, class_label=4, seed=2), got)  # the guidance matters
    other = pipe.sample(2, sampler="euler_maruyama", steps=4, class_label=[1, 2], last_step="tweedie")
    assert other.shape == (2, 8, 8, 1)
