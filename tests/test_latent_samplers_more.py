"""The latent samplers euler_ancestral, lms, unipc and deis against diffusers' EulerAncestralDiscreteScheduler,
LMSDiscreteScheduler, UniPCMultistepScheduler and DEISMultistepScheduler: their noise levels, model steps and
initial scale; their steps on a closed-form model; end to end on the tiny StableDiffusionPipelines of
tests/test_latent_samplers.py (ε and v prediction, with and without Karras σ; euler_ancestral with the same
per-step noise handed to diffusers); the LMS coefficients against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.errors import WeightsError
from jaxdiff.latent.schedulers import (
    KARRAS_SAMPLERS,
    LATENT_SAMPLERS,
    ROUNDED_STEP_SAMPLERS,
    check_multistep_config,
    denoise_on_levels,
    initial_scale,
    sampler_levels,
    sampler_scheduler,
    sigma_denoiser,
    step_of_sigma,
)
from jaxdiff.samplers.grids import step_noise
from jaxdiff.samplers.lms import lms_coefficients
from tests.test_latent_samplers import SPACINGS, sd1, sd1_folder, sd2_v  # noqa: F401 (module fixtures)
from tests.test_stable_diffusion import (
    GUIDANCE,
    NEGATIVE,
    PROMPTS,
    SD1_SCHEDULER,
    STEPS,
    assert_close,
    nchw,
    random_noise,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULERS = {"euler_ancestral": "EulerAncestralDiscreteScheduler", "lms": "LMSDiscreteScheduler",
              "unipc": "UniPCMultistepScheduler", "deis": "DEISMultistepScheduler"}  # fmt: skip
NEW = list(SCHEDULERS)
# (sampler, karras): EulerAncestralDiscreteScheduler has no use_karras_sigmas
RUNS = [(s, k) for s in NEW for k in (False, True) if not k or s in KARRAS_SAMPLERS]
IDS = [f"{s}{'-karras' if k else ''}" for s, k in RUNS]
CLOSED_FORM_RUNS = [(s, k, 6) for s, k in RUNS] + [("unipc", False, 2), ("deis", False, 16), ("deis", True, 16)]
CLOSED_FORM_IDS = [f"{s}{'-karras' if k else ''}-{n}" for s, k, n in CLOSED_FORM_RUNS]


def diffusers_scheduler(sampler, config, karras=False):
    options = dict(use_karras_sigmas=True) if karras else {}
    return getattr(diffusers, SCHEDULERS[sampler]).from_config(config, **options)


def sampler_noise(seed, steps, shape):
    """The noise euler_ancestral adds at step i in text_to_image (NHWC): PRNGKey(seed) splits into (initial noise,
    sampler) keys; step i draws `step_noise(sampler key, i, x)`."""
    _, loop_rng = jax.random.split(jax.random.PRNGKey(seed))
    like = jnp.zeros(shape, jnp.float32)
    return [np.asarray(step_noise(loop_rng, i, like)) for i in range(steps)]


# --------------------------------------------------------------------------- grids


@pytest.mark.parametrize("sampler, karras", RUNS, ids=IDS)
@pytest.mark.parametrize("spacing, offset", SPACINGS)
def test_noise_levels_model_steps_and_initial_scale_match_diffusers(sampler, karras, spacing, offset):
    config = dict(SD1_SCHEDULER, timestep_spacing=spacing, steps_offset=offset)
    settings = scheduler_settings(config, "test")
    theirs = diffusers_scheduler(sampler, config, karras)
    theirs.set_timesteps(STEPS)
    levels = sampler_levels(settings, STEPS, sampler=sampler, karras=karras)
    np.testing.assert_allclose(levels, theirs.sigmas.numpy(), rtol=5e-6)  # diffusers computes σ from float32 ᾱ
    ours_t = np.asarray(step_of_sigma(settings, jnp.asarray(levels[:-1]), rounded=sampler in ROUNDED_STEP_SAMPLERS))
    if sampler in ROUNDED_STEP_SAMPLERS:
        np.testing.assert_array_equal(ours_t, theirs.timesteps.numpy())
    else:
        np.testing.assert_allclose(ours_t, theirs.timesteps.numpy(), rtol=0, atol=2e-3)
    # the state of the Euler-type schedulers is the unscaled x = x_t·sqrt(1 + σ²), the multistep ones' x_t
    to_unscaled = 1.0 if sampler in ("euler_ancestral", "lms") else np.sqrt(1.0 + np.float64(levels[0]) ** 2)
    expected = float(theirs.init_noise_sigma) * to_unscaled
    np.testing.assert_allclose(initial_scale(settings, sampler, levels[0]), expected, rtol=1e-6)


def test_class_default_spacing_and_names():
    settings = scheduler_settings(SD1_SCHEDULER, "test")
    assert "timestep_spacing" not in settings.config
    for sampler in NEW:
        assert sampler in LATENT_SAMPLERS
        default = getattr(diffusers, SCHEDULERS[sampler])().config.timestep_spacing
        assert sampler_scheduler(settings, sampler).timestep_spacing == default


# --------------------------------------------------------------------------- steps on a closed-form model


def toy_model(x, t):
    """A smooth stand-in for the U-Net, elementwise (so NCHW and NHWC agree): output at x_t and step t."""
    return 0.6 * np.tanh(x) + 0.05 * np.cos(np.float32(t) / 97.0)


def toy_model_jax(x_t, t):
    """`toy_model` in JAX, t [B]."""
    return 0.6 * jnp.tanh(x_t) + 0.05 * jnp.cos(t[:, None, None, None] / 97.0)


@pytest.mark.parametrize("sampler, karras, steps", CLOSED_FORM_RUNS, ids=CLOSED_FORM_IDS)
def test_steps_on_a_closed_form_model_match_diffusers(sampler, karras, steps, monkeypatch):
    """Six steps; UniPC also two (no corrector but its last first-order step), DEIS 16, where diffusers' last
    step stays second order (lower_order_final only below 15 steps). ε prediction (v: end to end below)."""
    config = dict(SD1_SCHEDULER, timestep_spacing="trailing", steps_offset=0)
    settings = scheduler_settings(config, "test")
    shape, seed = (2, 3, 3, 4), 4
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    draws = iter(sampler_noise(seed, steps, shape))
    module = diffusers.schedulers.scheduling_euler_ancestral_discrete
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(next(draws)).reshape(shape))
    theirs = diffusers_scheduler(sampler, config, karras)
    theirs.set_timesteps(steps)
    x = torch.from_numpy(noise) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        output = toy_model(theirs.scale_model_input(x, t).numpy(), t.item())
        x = theirs.step(torch.from_numpy(output), t, x).prev_sample
    levels = sampler_levels(settings, steps, sampler=sampler, karras=karras)
    denoiser = sigma_denoiser(toy_model_jax, settings, rounded=sampler in ROUNDED_STEP_SAMPLERS)
    x_start = jnp.asarray(noise) * initial_scale(settings, sampler, float(levels[0]))
    _, loop_rng = jax.random.split(jax.random.PRNGKey(seed))
    mine = denoise_on_levels(denoiser, levels, x_start, sampler=sampler, scheduler=settings, rng=loop_rng)
    np.testing.assert_allclose(np.asarray(mine), x.numpy(), rtol=0, atol=2e-5 * max(1.0, float(np.abs(x).max())))


# --------------------------------------------------------------------------- LMS coefficients


def test_lms_coefficients_match_a_float64_reference():
    """Against the Lagrange basis integrated by Simpson's rule (exact for cubics) in float64, and the
    closed forms of the first two orders: c = [σ' − σ] at step 0, the trapezoid-like pair at step 1."""
    levels = np.array([14.6, 6.1, 2.4, 0.9, 0.3, 0.0])
    table = lms_coefficients(levels)
    assert table.shape == (5, 4) and table.dtype == np.float64

    def reference(i, j, order):
        nodes = levels[i - np.arange(order)]

        def basis(tau):
            others = np.delete(nodes, j)
            return np.prod((tau - others) / (nodes[j] - others))

        a, b = levels[i], levels[i + 1]
        return (b - a) / 6.0 * (basis(a) + 4.0 * basis((a + b) / 2.0) + basis(b))

    for i in range(5):
        order = min(i + 1, 4)
        expected = [reference(i, j, order) for j in range(order)] + [0.0] * (4 - order)
        np.testing.assert_allclose(table[i], expected, rtol=1e-12, atol=1e-14)
    h, h_prev = levels[2] - levels[1], levels[1] - levels[0]
    np.testing.assert_allclose(table[0], [levels[1] - levels[0], 0, 0, 0], rtol=1e-14)
    np.testing.assert_allclose(table[1, :2], [h + h**2 / (2 * h_prev), -(h**2) / (2 * h_prev)], rtol=1e-12)
    assert np.allclose(table.sum(axis=1), np.diff(levels))  # the basis sums to 1


# --------------------------------------------------------------------------- end to end


def use_scheduler(pipe, sampler, karras=False):
    if not hasattr(pipe, "folder_scheduler"):
        pipe.folder_scheduler = pipe.scheduler
    pipe.scheduler = diffusers_scheduler(sampler, pipe.folder_scheduler.config, karras)


def compare(pair, sampler, karras, noise_seed, monkeypatch, seed=3):
    pipe, ours = pair
    noise = random_noise(noise_seed)
    draws = iter(sampler_noise(seed, STEPS, noise.shape))
    module = diffusers.schedulers.scheduling_euler_ancestral_discrete
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: nchw(next(draws)).reshape(shape))
    use_scheduler(pipe, sampler, karras)
    theirs = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=nchw(noise), output_type="np").images  # fmt: skip
    if sampler == "euler_ancestral":
        assert next(draws, None) is None  # diffusers drew once per step
    mine = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler=sampler,
                              karras=karras, seed=seed, latents=noise, output_type="float")  # fmt: skip
    assert_close(mine, theirs)
    return mine, theirs


@pytest.mark.parametrize("sampler, karras", RUNS, ids=IDS)
def test_samplers_match_diffusers(sd1, sampler, karras, monkeypatch):  # noqa: F811
    compare(sd1, sampler, karras, 10, monkeypatch)


@pytest.mark.parametrize("sampler, karras", RUNS, ids=IDS)
def test_v_prediction_samplers_match_diffusers(sd2_v, sampler, karras, monkeypatch):  # noqa: F811
    compare(sd2_v, sampler, karras, 11, monkeypatch)


def test_samplers_differ_and_euler_ancestral_noise_matters(sd1):  # noqa: F811
    """The parity above is not one image matched by every sampler: those on the same grid differ."""
    _, ours = sd1
    run = dict(negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, latents=random_noise(10), output_type="float")
    images = {name: ours.text_to_image(PROMPTS, sampler=name, **run) for name in NEW}
    assert np.max(np.abs(images["lms"] - images["euler_ancestral"])) > 1e-2
    assert np.max(np.abs(images["unipc"] - images["deis"])) > 1e-2
    other_seed = ours.text_to_image(PROMPTS, sampler="euler_ancestral", seed=1, **run)
    assert np.max(np.abs(other_seed - images["euler_ancestral"])) > 1e-2


def test_euler_ancestral_refuses_karras(sd1):  # noqa: F811
    _, ours = sd1
    with pytest.raises(ValueError, match=r"^karras=True is for the samplers .* not 'euler_ancestral'$"):
        ours.text_to_image(PROMPTS, sampler="euler_ancestral", karras=True, steps=2)


def test_cli_takes_the_new_sampler_names(sd1, sd1_folder, tmp_path):  # noqa: F811
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.cli import main

    _, ours = sd1
    out = tmp_path / "grid.png"
    flags = ["--prompt", PROMPTS[0], "--num", "2", "--steps", str(STEPS), "--seed", "2", "--sampler", "unipc",
             "--spacing", "karras", "--out", str(out)]  # fmt: skip
    assert main(["sample", "--pretrained", str(sd1_folder), *flags]) == 0
    expected = ours.text_to_image(PROMPTS[:1] * 2, steps=STEPS, seed=2, sampler="unipc", karras=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))


@pytest.mark.parametrize("key, value", [("solver_order", 1), ("lower_order_final", False), ("solver_type", "bh1")])
def test_multistep_settings_jaxdiff_does_not_implement_are_refused(key, value):
    settings = scheduler_settings(dict(SD1_SCHEDULER, **{key: value}), "test")
    with pytest.raises(WeightsError, match=rf"^unsupported setting {key}={value!r} for sampler 'unipc'"):
        check_multistep_config(sampler_scheduler(settings, "unipc"), "unipc")
    check_multistep_config(sampler_scheduler(settings, "lms"), "lms")
