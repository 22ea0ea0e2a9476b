"""The flow-matching recipes (`digits_flow`, `rectified_flow_cifar10`) and the DiT-XL/2 / SiT-XL/2 configs: they
validate and build, carry the published settings, and the digits demo learns and samples the requested class."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import Pipeline, data
from jaxdiff.cli import load_config
from jaxdiff.config.recipes import RECIPES, recipe
from jaxdiff.config.validation import validate
from jaxdiff.diffusion.continuous import flow_network, process_from_config
from jaxdiff.models import count_parameters, create_model
from jaxdiff.models.summary import parameter_shapes
from jaxdiff.training.diffusion_step import make_train_step
from jaxdiff.training.step import init_train_state, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
FREQUENCY_CHANNELS = 256  # DiT's timestep sinusoid


def dit_parameters(section, per_block_embedders: bool = False) -> int:
    """DiT's parameter count in closed form from its sizes (DiT's models.py: patch embed, timestep MLP, label
    table with the null row when labels are dropped, adaLN-Zero blocks, final layer; the σ half of the output
    computed with learn_sigma)."""
    d, p, c = section.hidden_size, section.patch_size, section.in_channels
    out = c * (2 if section.learn_sigma else 1)
    mlp = int(d * section.mlp_ratio)
    embed = FREQUENCY_CHANNELS * d + d + d * d + d + (section.num_classes + (section.class_dropout_prob > 0)) * d
    block = (d * 6 * d + 6 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    final = (d * 2 * d + 2 * d) + (d * p * p * out + p * p * out)
    return p * p * c * d + d + embed + section.depth * block + final


def counted(config) -> int:
    """Parameters of config.model's network through `jax.eval_shape` (nothing allocated)."""
    return count_parameters(parameter_shapes(config.model))


# ---------------------------------------------------------------- the recipes and configs


def test_the_recipes_are_listed_and_validate():
    for name in ("digits_flow", "rectified_flow_cifar10"):
        assert name in RECIPES
        config = validate(recipe(name))
        assert (config.diffusion.process, config.diffusion.loss_type, config.diffusion.parameterization) == (
            "flow", "flow_matching", "velocity")  # fmt: skip
        assert validate(load_config(str(ROOT / "configs" / f"{name}.py"), [])).to_dict() == config.to_dict()


def test_digits_flow_builds_the_small_dit():
    config = validate(recipe("digits_flow"))
    section = config.model.dit
    assert (config.model.network, config.model.num_classes, config.data.dataset) == ("dit", 10, "digits")
    assert (section.input_size, section.in_channels, section.patch_size, section.hidden_size, section.depth) == (
        8, 1, 2, 64, 4)  # fmt: skip
    assert (section.class_dropout_prob, config.training.label_dropout, section.learn_sigma) == (0.1, 0.0, False)
    assert counted(config) == dit_parameters(section) == 328_964
    assert (config.sampling.sampler, config.sampling.steps) == ("euler", 32)


def test_rectified_flow_has_the_papers_settings():
    """RectifiedFlow's cifar10_rf_gaussian_ddpmpp.py on default_cifar10_configs.py."""
    config = validate(recipe("rectified_flow_cifar10"))
    tc, dc, sc, net = config.training, config.diffusion, config.sampling, config.model.ncsnpp
    assert (tc.batch_size, tc.learning_rate, tc.warmup_steps, tc.grad_clip_norm) == (128, 2e-4, 5000, 1.0)
    assert (tc.adam_b1, tc.adam_b2, tc.adam_eps, tc.ema_decay, tc.num_train_steps) == (
        0.9, 0.999, 1e-8, 0.999999, 1_300_000)  # fmt: skip
    assert (config.data.centered, config.data.random_flip, dc.reduce_mean, dc.t_sampling) == (
        True, True, True, "uniform")  # fmt: skip
    assert (net.nf, net.ch_mult, net.num_res_blocks, net.attn_resolutions, net.dropout) == (
        128, (1, 2, 2, 2), 4, (16,), 0.15)  # fmt: skip
    assert (net.resblock_type, net.embedding_type, net.fir, net.progressive) == ("biggan", "positional", False, "none")
    # their sampler: RK45 with rtol = atol = 1e-5 from τ = eps = 1e-3 (t = 1 − eps) to the data
    assert (sc.sampler, sc.rtol, sc.atol, sc.clip_denoised) == ("ode", 1e-5, 1e-5, False)
    assert process_from_config(dc).t_max == pytest.approx(1.0 - 1e-3, abs=1e-12)
    assert round(counted(config) / 1e6, 2) == 61.80  # DDPM++ (cont.), as score_sde's VP recipe


def test_rectified_flow_network_sees_their_time_and_predicts_their_velocity():
    """RectifiedFlow: x_τ = τ·x_0 + (1 − τ)·ε, the network at τ·999 predicts dx/dτ = x_0 − ε; in jaxdiff's time
    t = 1 − τ the model's velocity dx/dt is its negation."""
    dc = recipe("rectified_flow_cifar10").diffusion
    seen = {}

    def net_fn(x, labels):
        seen["labels"] = np.asarray(labels, np.float64)
        return x * 2.0

    t = jnp.asarray([0.0, 0.25, 0.999], jnp.float32)
    x = jnp.ones((3, 2, 2, 1), jnp.float32)
    out = flow_network(net_fn, dc)(x, t)
    np.testing.assert_allclose(seen["labels"], (1.0 - np.asarray(t, np.float64)) * 999.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), -2.0 * np.ones((3, 2, 2, 1)))


@pytest.mark.parametrize("name, process, sampler, steps", [
    ("dit_xl2_imagenet256", "discrete", "ddpm", 250),
    ("sit_xl2_imagenet256", "flow", "euler_maruyama", 250),
])  # fmt: skip
def test_xl2_configs_build_the_papers_network(name, process, sampler, steps):
    config = validate(load_config(str(ROOT / "configs" / f"{name}.py"), []))
    section = config.model.dit
    assert name not in RECIPES  # no latent-space ImageNet training: configs, not recipes
    assert (section.depth, section.hidden_size, section.num_heads, section.patch_size) == (28, 1152, 16, 2)
    assert (config.model.image_size, config.model.in_channels, config.model.num_classes) == (32, 4, 1000)
    assert counted(config) == dit_parameters(section) == 674_834_720  # the paper's 675M
    assert (config.diffusion.process, config.sampling.sampler, config.sampling.steps) == (process, sampler, steps)
    assert (config.sampling.guidance, config.sampling.guidance_channels) == (0.5, 3)  # cfg scale 1.5


# ---------------------------------------------------------------- the digits demo learns


@pytest.mark.slow
def test_a_few_digits_flow_steps_lower_the_loss():
    """digits_flow's network, 25 steps at batch 32 (2 warm-up steps): the loss falls (≈ 1.7 -> 1.4)."""
    config = recipe("digits_flow")
    config.training.update(batch_size=32, num_train_steps=25, warmup_steps=2)
    config = validate(config)
    source = data.load_dataset(config.data)
    rng = np.random.default_rng(0)
    model, tx = create_model(config.model), make_optimizer(config.training)
    state = init_train_state(config, model, tx)
    step = jax.jit(make_train_step(config, model, tx))
    losses = []
    for _ in range(config.training.num_train_steps):
        images, labels = source.get(rng.choice(source.num_examples, config.training.batch_size, replace=False))
        state, metrics = step(state, {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32)})
        losses.append(float(metrics["loss"]))
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.9 * losses[:5].mean(), losses


def test_conditional_samples_follow_the_class_and_the_guidance():
    """A one-block digits_flow DiT with random weights (DiT's init zeroes the output layers, which would make
    every class alike): samples from the same noise differ between classes and between guidance scales."""
    config = recipe("digits_flow")
    config.model.dit.update(hidden_size=16, depth=1, num_heads=2)
    config = validate(config)
    shapes = parameter_shapes(config.model)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten([0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
    pipe = Pipeline(config, params)
    draw = {(k, w): pipe.sample(4, class_label=k, guidance=w, steps=3, seed=0) for k in (1, 7) for w in (0.0, 3.0)}
    for images in draw.values():
        assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    differ = lambda a, b: np.abs(draw[a].astype(int) - draw[b].astype(int)).mean()  # noqa: E731
    assert differ((1, 0.0), (7, 0.0)) > 2.0
    assert differ((1, 3.0), (7, 3.0)) > 2.0
    assert differ((7, 0.0), (7, 3.0)) > 2.0
    again = pipe.sample(4, class_label=7, guidance=3.0, steps=3, seed=0)
    np.testing.assert_array_equal(again, draw[7, 3.0])  # the differences are the labels', not the draws'
