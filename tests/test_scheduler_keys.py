"""The diffusers scheduler keys rescale_betas_zero_snr, thresholding (dynamic_thresholding_ratio, sample_max_value),
solver_order 3 and clip_sample_range: their formulas against float64 NumPy, full sampling loops against diffusers'
own schedulers in PyTorch on CPU (the same closed-form model, initial noise and steps), one tiny Stable Diffusion
pipeline run per kind of key, and the refusals."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff.diffusion.limits import DenoisedLimit, dynamic_threshold
from jaxdiff.diffusion.scheduler_config import apply_scheduler_config, scheduler_settings
from jaxdiff.errors import WeightsError
from jaxdiff.latent.schedulers import (
    SIGMA_SAMPLERS,
    ROUNDED_STEP_SAMPLERS,
    denoise,
    denoise_on_levels,
    initial_scale,
    sampler_levels,
    sampler_scheduler,
    sigma_denoiser,
    step_plan,
    visited_timesteps,
)
from jaxdiff.samplers.grids import step_noise
from jaxdiff.schedule import beta_schedule, rescale_zero_terminal_snr

# Stable Diffusion 1.x's scheduler config (as tests/test_stable_diffusion.py's, which needs torch to import)
SD1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1)  # fmt: skip
SHAPE = (2, 6, 6, 4)  # the model is elementwise, so the layout is the same in both frameworks
CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm_solver++": "DPMSolverMultistepScheduler",
           "dpm_solver++_sde": "DPMSolverMultistepScheduler",
           "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
           "heun": "HeunDiscreteScheduler", "unipc": "UniPCMultistepScheduler", "deis": "DEISMultistepScheduler",
           "lms": "LMSDiscreteScheduler"}  # fmt: skip


# --------------------------------------------------------------------------- formulas, float64


def test_zero_terminal_snr_betas():
    betas = beta_schedule("quad", 1000, beta_start=0.00085, beta_end=0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    root = np.sqrt(np.cumprod(1.0 - betas))
    expected_root = (root - root[-1]) / (root[0] - root[-1]) * root[0]  # Lin et al. 2023, Algorithm 1
    got_root = np.sqrt(np.cumprod(1.0 - rescaled))
    np.testing.assert_allclose(got_root, expected_root, rtol=1e-12, atol=1e-15)
    assert got_root[-1] == 0.0 and rescaled[-1] == 1.0
    assert abs(got_root[0] - root[0]) < 1e-15  # sqrt(ᾱ_0) kept
    assert np.all(np.diff(got_root) < 0)


def test_dynamic_thresholding_quantile_math():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 5, 4, 2)) * np.array([0.3, 2.0, 5.0])[:, None, None, None]
    for ratio, max_value in ((0.995, 1.5), (0.5, 10.0), (0.9, 0.8)):
        flat = np.abs(x0.reshape(3, -1))
        s = np.array([np.quantile(row, ratio) for row in flat])  # linear interpolation, as torch.quantile
        s = np.minimum(np.maximum(s, 1.0), max_value)[:, None, None, None]
        expected = np.clip(x0, -s, s) / s
        got = np.asarray(dynamic_threshold(jnp.asarray(x0, jnp.float32), ratio, max_value), np.float64)
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-7)
    x = jnp.asarray(x0, jnp.float32)
    np.testing.assert_array_equal(DenoisedLimit(1.5)(x), np.clip(np.asarray(x), -1.5, 1.5))
    np.testing.assert_array_equal(DenoisedLimit(1.5, 0.9, 2.0)(x), dynamic_threshold(x, 0.9, 2.0))  # precedence
    np.testing.assert_array_equal(DenoisedLimit(None)(x), x)


# --------------------------------------------------------------------------- full loops against diffusers

def model(x, t, lib):
    """A closed-form stand-in for a U-Net, elementwise in x [B, ...] and t [B] (or a scalar)."""
    t = lib.reshape(t, (-1,) + (1,) * (x.ndim - 1)) if getattr(t, "ndim", 0) else t
    return 0.8 * x * lib.cos(t / 400.0) + 0.6 * lib.tanh(1.5 * x) + 0.002 * t


def theirs_run(torch, diffusers, sampler, config, steps, noise, step_noise=None, monkeypatch=None):
    options = {"algorithm_type": "sde-dpmsolver++"} if sampler == "dpm_solver++_sde" else {}
    scheduler = getattr(diffusers, CLASSES[sampler]).from_config(config, **options)
    scheduler.set_timesteps(steps)
    if step_noise is not None:
        draws = iter(step_noise)
        module = __import__(type(scheduler).__module__, fromlist=["randn_tensor"])
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(np.array(next(draws))).reshape(shape))
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(model_input, t.float(), torch), t, x).prev_sample
    return x.numpy()


def ours_run(sampler, config, steps, noise, seed=0):
    settings = scheduler_settings(config, "test")
    scheduler = sampler_scheduler(settings, sampler)
    fn = lambda x, t: model(x, t.astype(jnp.float32), jnp)  # noqa: E731
    rng = jax.random.PRNGKey(seed)
    if sampler in SIGMA_SAMPLERS:
        levels = sampler_levels(scheduler, steps, sampler=sampler, karras=False)
        denoiser = sigma_denoiser(fn, scheduler, rounded=sampler in ROUNDED_STEP_SAMPLERS)
        x_start = jnp.asarray(noise) * initial_scale(scheduler, sampler, float(levels[0]))
        return np.asarray(denoise_on_levels(denoiser, levels, x_start, sampler=sampler, scheduler=scheduler, rng=rng))
    timesteps = visited_timesteps(scheduler, steps)
    increasing = jnp.asarray(timesteps[::-1].copy(), jnp.int32)
    plan = step_plan(scheduler, timesteps)
    return np.asarray(denoise(lambda x, i: fn(x, increasing[i]), plan, jnp.asarray(noise), rng, sampler=sampler))


def sde_step_noise(seed, steps):
    """The noise dpm_solver++_sde adds at step i: `step_noise(sampler key, i, x)`."""
    return [np.asarray(step_noise(jax.random.PRNGKey(seed), i, jnp.zeros(SHAPE))) for i in range(steps)]


def ddpm_step_noise(seed, steps):
    """The noise jaxdiff's ddpm adds at loop iteration i: `samplers.sample` splits the rng into (x_T, per-step
    noise) keys and draws step i from fold_in(noise key, i)."""
    _, noise_key = jax.random.split(jax.random.PRNGKey(seed))
    return [np.asarray(jax.random.normal(jax.random.fold_in(noise_key, i), SHAPE, jnp.float32)) for i in range(steps)]


BASE = dict(SD1_SCHEDULER, timestep_spacing="trailing", steps_offset=0)
ZERO_SNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")
OFF = {"rescale_betas_zero_snr": False, "thresholding": False, "clip_sample": False, "solver_order": 2}
THRESHOLD = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.3)
LOOPS = [  # (sampler, keys, steps): the max abs differences measured on the 2-core CPU are in the ids' comments
    ("ddim", ZERO_SNR, 10),
    ("ddim", dict(ZERO_SNR, **THRESHOLD), 10),
    ("ddim", dict(clip_sample=True, clip_sample_range=1.2), 10),
    ("ddim", dict(THRESHOLD, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False), 10),
    ("ddpm", ZERO_SNR, 10),
    ("ddpm", dict(THRESHOLD, prediction_type="v_prediction"), 10),
    ("ddpm", dict(clip_sample=True, clip_sample_range=1.2), 10),
    ("dpm_solver++", dict(solver_order=3), 10),
    ("dpm_solver++", dict(solver_order=3), 20),
    ("dpm_solver++", dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False), 8),
    ("dpm_solver++", dict(solver_order=3, solver_type="heun", final_sigmas_type="sigma_min"), 20),
    ("dpm_solver++", dict(THRESHOLD, solver_order=3), 12),
    ("dpm_solver++_sde", dict(solver_order=3), 10),
    ("dpm_solver++_sde", dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False), 16),
    ("dpm_solver++", ZERO_SNR, 10),
    ("euler", ZERO_SNR, 10),
    ("euler", dict(ZERO_SNR, timestep_spacing="linspace"), 10),
    ("unipc", dict(ZERO_SNR, **THRESHOLD), 10),
    ("deis", THRESHOLD, 10),
    ("heun", dict(clip_sample=True, clip_sample_range=0.9), 6),
    ("heun", ZERO_SNR, 6),  # HeunDiscreteScheduler has no rescale_betas_zero_snr: from_config drops it
    ("lms", dict(THRESHOLD, clip_sample=True), 6),  # neither key is LMSDiscreteScheduler's
]


@pytest.mark.parametrize("sampler, keys, steps", LOOPS, ids=lambda v: v if isinstance(v, (str, int)) else
                         "-".join(f"{k}={v}" for k, v in v.items()) or "plain")  # fmt: skip
def test_sampling_loop_matches_diffusers(torch, diffusers, monkeypatch, sampler, keys, steps):
    config = dict(BASE, **keys)
    noise = np.random.default_rng(steps).standard_normal(SHAPE).astype(np.float32)
    draws = {"ddpm": ddpm_step_noise, "dpm_solver++_sde": sde_step_noise}.get(sampler, lambda *_: None)(7, steps)
    theirs = theirs_run(torch, diffusers, sampler, config, steps, noise, draws, monkeypatch)
    mine = ours_run(sampler, config, steps, noise, seed=7)
    scale = float(np.max(np.abs(theirs)))
    assert scale > 0.1 and np.all(np.isfinite(mine))
    # Euler's zero-SNR run starts at σ = 4096 (ᾱ = 2**-24) in the unscaled x, where float32 rounding of x·4096 and
    # diffusers' float32 rescale (ours is float64) leave 2.3e-5 of the scale; the SDE's third-order steps weigh
    # the second divided difference of x̂_0 by about −1 (the ODE's by about h/6), which leaves 1.1e-5
    relative = {"euler": 5e-5 if keys.get("rescale_betas_zero_snr") else 1e-5, "dpm_solver++_sde": 3e-5}
    relative = relative.get(sampler, 1e-5)
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=relative * max(scale, 1.0))
    plain = ours_run(sampler, dict(config, **{k: OFF[k] for k in keys if k in OFF}), steps, noise, seed=7)
    if sampler in ("heun", "lms") and "clip_sample_range" not in keys:  # keys the class does not take
        np.testing.assert_array_equal(plain, mine)
    else:
        assert np.max(np.abs(plain - mine)) > 1e-3, "the keys change the samples"


# --------------------------------------------------------------------------- a tiny Stable Diffusion pipeline


@pytest.fixture(scope="module")
def sd2_v(tmp_path_factory, diffusers):
    """(diffusers pipeline, jaxdiff pipeline) of a tiny SD 2.x-style folder (tests/test_stable_diffusion.py's
    components): v-prediction, "trailing" steps, so a zero-SNR run starts at ᾱ = 0."""
    from jaxdiff.latent.pipeline import LatentPipeline
    from tests.test_stable_diffusion import UNET_SD2, components, save

    folder = tmp_path_factory.mktemp("scheduler_keys")
    scheduler = dict(SD1_SCHEDULER, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)
    pipe = save(diffusers.StableDiffusionPipeline, components(unet_settings=UNET_SD2, scheduler=scheduler,
                                                              folder=folder, seed=5), folder / "pipe")  # fmt: skip
    return pipe, LatentPipeline.from_pretrained(folder / "pipe")


PIPELINE_CASES = [
    ("ddim", dict(rescale_betas_zero_snr=True, clip_sample=True, clip_sample_range=1.5)),
    ("dpm_solver++", dict(THRESHOLD, rescale_betas_zero_snr=True, solver_order=3)),
    ("ddpm", dict(THRESHOLD, rescale_betas_zero_snr=True)),
]


@pytest.mark.parametrize("sampler, options", PIPELINE_CASES, ids=[case[0] for case in PIPELINE_CASES])
def test_stable_diffusion_pipeline_with_the_keys_matches_diffusers(sd2_v, monkeypatch, sampler, options):
    from tests.test_scheduler_settings import run_both
    from tests.test_stable_diffusion import assert_close, nchw

    from tests.test_stable_diffusion import STEPS, random_noise

    _, loop_rng = jax.random.split(jax.random.PRNGKey(0))
    _, noise_key = jax.random.split(loop_rng)  # ddpm's step noise, from text_to_image's sampler key (seed 0)
    step_noise = [np.asarray(jax.random.normal(jax.random.fold_in(noise_key, i), random_noise(10).shape))
                  for i in range(STEPS)]  # fmt: skip

    def both(options):
        draws = iter(step_noise)  # handed to diffusers' DDPMScheduler, one per step
        monkeypatch.setattr(diffusers_module("scheduling_ddpm"), "randn_tensor",
                            lambda shape, **_: nchw(next(draws)).reshape(shape))  # fmt: skip
        return run_both(sd2_v, sampler, options)

    mine, theirs = both(options)
    assert_close(mine, theirs)
    plain, _ = both({})
    assert np.max(np.abs(mine - plain)) > 1e-3, "the keys change the images"


def diffusers_module(name):
    import importlib

    return importlib.import_module(f"diffusers.schedulers.{name}")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("key, value, need", [
    ("thresholding", "yes", "true or false"), ("rescale_betas_zero_snr", 1, "true or false"),
    ("dynamic_thresholding_ratio", 1.5, "a number in [0, 1]"), ("sample_max_value", 0.0, "a finite number > 0"),
    ("clip_sample_range", -1.0, "a finite number > 0"), ("solver_order", 4, "supported: 1, 2, 3"),
])  # fmt: skip
def test_bad_values_are_refused_in_one_line(key, value, need):
    keys = {"thresholding": True} if key in ("dynamic_thresholding_ratio", "sample_max_value") else {}
    with pytest.raises(WeightsError) as caught:
        scheduler_settings(dict(SD1_SCHEDULER, clip_sample=True, **keys, **{key: value}), "s.json")
    assert str(caught.value) == f"s.json: unsupported setting {key}={value!r} ({need})"


def test_values_without_effect_are_not_checked():
    settings = scheduler_settings(dict(SD1_SCHEDULER, clip_sample=False, clip_sample_range=-1.0,
                                       dynamic_thresholding_ratio=7, sample_max_value="x"), "s.json")  # fmt: skip
    assert settings.clip_sample is False and settings.thresholding is False


@pytest.mark.parametrize("key, value", [("thresholding", True), ("rescale_betas_zero_snr", True),
                                        ("clip_sample_range", 2.0)])  # fmt: skip
def test_pixel_space_pipelines_refuse_the_keys(key, value):
    """The pixel-space DDPM and DDIM pipelines' samplers (`config.sampling`) have none of these settings."""
    config = ml_collections.ConfigDict({"diffusion": {}, "sampling": {}})
    with pytest.raises(WeightsError, match=rf"^model_index\.json: unsupported setting {key}={value!r} \("):
        apply_scheduler_config(config, {"_class_name": "DDIMScheduler", key: value}, "model_index.json")
