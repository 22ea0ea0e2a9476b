"""Every latent sampler against diffusers' schedulers: the steps and noise levels each visits, and end to end on a
tiny StableDiffusionPipeline saved by diffusers (same prompts, initial latents and guidance 7.5; DDPM with the
same per-step noise, handed to diffusers' scheduler)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.latent.pipeline import LatentPipeline
from jaxdiff.latent.schedulers import (
    LATENT_SAMPLERS,
    dpm_solver_timesteps,
    initial_scale,
    sampler_scheduler,
    sigma_levels,
    step_of_sigma,
)
from tests.test_stable_diffusion import (
    GUIDANCE,
    NEGATIVE,
    PROMPTS,
    SD1_SCHEDULER,
    STEPS,
    UNET_SD2,
    assert_close,
    components,
    nchw,
    random_noise,
    save,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULERS = {"dpm_solver++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
              "heun": "HeunDiscreteScheduler", "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}  # fmt: skip
SPACINGS = [("leading", 1), ("trailing", 0), ("linspace", 0)]


def diffusers_scheduler(sampler, config, karras=False):
    options = dict(use_karras_sigmas=True) if karras else {}
    return getattr(diffusers, SCHEDULERS[sampler]).from_config(config, **options)


# --------------------------------------------------------------------------- steps and noise levels


@pytest.mark.parametrize("spacing, offset", SPACINGS)
@pytest.mark.parametrize("steps", [1, 5, 20])
def test_dpm_solver_steps_match_diffusers(spacing, offset, steps):
    config = dict(SD1_SCHEDULER, timestep_spacing=spacing, steps_offset=offset)
    settings = scheduler_settings(config, "test")
    theirs = diffusers_scheduler("dpm_solver++", config)
    theirs.set_timesteps(steps)
    np.testing.assert_array_equal(dpm_solver_timesteps(settings, steps), theirs.timesteps.numpy())
    levels = sigma_levels(settings, steps, sampler="dpm_solver++", karras=False)
    np.testing.assert_allclose(levels, theirs.sigmas.numpy(), rtol=5e-6)  # diffusers computes σ from float32 ᾱ
    t = step_of_sigma(settings, jnp.asarray(levels[:-1]), rounded=True)
    np.testing.assert_array_equal(np.asarray(t), theirs.timesteps.numpy())


@pytest.mark.parametrize("sampler", ["dpm_solver++", "euler", "heun"])
@pytest.mark.parametrize("karras", [False, True], ids=["schedule", "karras"])
@pytest.mark.parametrize("spacing, offset", SPACINGS)
def test_noise_levels_model_steps_and_initial_scale_match_diffusers(sampler, karras, spacing, offset):
    """Heun's scheduler lists each inner level twice (two evaluations); its distinct levels are ours."""
    config = dict(SD1_SCHEDULER, timestep_spacing=spacing, steps_offset=offset)
    settings = scheduler_settings(config, "test")
    theirs = diffusers_scheduler(sampler, config, karras)
    theirs.set_timesteps(STEPS)
    levels = sigma_levels(settings, STEPS, sampler=sampler, karras=karras)
    sigmas, timesteps = theirs.sigmas.numpy(), theirs.timesteps.numpy()
    if sampler == "heun":
        sigmas, timesteps = np.append(sigmas[::2], 0.0), timesteps[::2]
    np.testing.assert_allclose(levels, sigmas, rtol=5e-6)  # diffusers computes σ from float32 ᾱ
    ours_t = np.asarray(step_of_sigma(settings, jnp.asarray(levels[:-1]), rounded=sampler == "dpm_solver++"))
    np.testing.assert_allclose(ours_t, timesteps, rtol=0, atol=2e-3)
    assert levels[0] > 5 and np.all(np.diff(levels) < 0)
    # DPMSolverMultistepScheduler's state is x_t, Euler's and Heun's the unscaled x = x_t·sqrt(1 + σ²)
    to_unscaled = np.sqrt(1.0 + np.float64(levels[0]) ** 2) if sampler == "dpm_solver++" else 1.0
    expected = float(theirs.init_noise_sigma) * to_unscaled
    np.testing.assert_allclose(initial_scale(settings, sampler, levels[0]), expected, rtol=1e-6)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    """SD 1.x-style, its scheduler config without timestep_spacing as SD 1.x releases ship it: diffusers' DDIM and
    DDPM then take "leading" steps (with steps_offset 1), DPM-Solver++, Euler and Heun "linspace"."""
    folder = tmp_path_factory.mktemp("samplers_sd1")
    save(diffusers.StableDiffusionPipeline, components(folder=folder), folder / "pipe")
    config_file = folder / "pipe" / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    del config["timestep_spacing"]
    config_file.write_text(json.dumps(config))
    return folder / "pipe"


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, LatentPipeline.from_pretrained(sd1_folder)


@pytest.fixture(scope="module")
def sd2_v(tmp_path_factory):
    """SD 2.x-style: linear projections, per-level heads, v-prediction, "trailing" steps."""
    folder = tmp_path_factory.mktemp("samplers_sd2v")
    scheduler = dict(SD1_SCHEDULER, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)
    parts = components(unet_settings=UNET_SD2, scheduler=scheduler, folder=folder, seed=5)
    pipe = save(diffusers.StableDiffusionPipeline, parts, folder / "pipe")
    ours = LatentPipeline.from_pretrained(folder / "pipe")
    assert ours.scheduler.mean_type == "v"
    return pipe, ours


def use_scheduler(pipe, sampler, karras=False):
    """Swap the pipeline's scheduler as diffusers' documentation does: `from_config` of the folder's one."""
    if not hasattr(pipe, "folder_scheduler"):
        pipe.folder_scheduler = pipe.scheduler
    pipe.scheduler = diffusers_scheduler(sampler, pipe.folder_scheduler.config, karras)


def compare(pair, sampler, karras, noise_seed):
    pipe, ours = pair
    noise = random_noise(noise_seed)
    use_scheduler(pipe, sampler, karras)
    theirs = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=nchw(noise), output_type="np").images  # fmt: skip
    mine = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler=sampler,
                              karras=karras, latents=noise, output_type="float")  # fmt: skip
    assert_close(mine, theirs)
    return mine


DETERMINISTIC = [("dpm_solver++", False), ("dpm_solver++", True), ("euler", True), ("heun", True),
                 ("euler", False), ("heun", False)]  # fmt: skip
IDS = [f"{s}{'-karras' if k else ''}" for s, k in DETERMINISTIC]


@pytest.mark.parametrize("sampler, karras", DETERMINISTIC, ids=IDS)
def test_deterministic_samplers_match_diffusers(sd1, sampler, karras):
    compare(sd1, sampler, karras, noise_seed=10)


@pytest.mark.parametrize("sampler, karras", DETERMINISTIC, ids=IDS)
def test_v_prediction_samplers_match_diffusers(sd2_v, sampler, karras):
    compare(sd2_v, sampler, karras, noise_seed=11)


def test_samplers_differ_from_each_other(sd1):
    """The parity above is not one image matched by every sampler: the samplers' images differ from DDIM's."""
    _, ours = sd1
    run = dict(negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, latents=random_noise(10), output_type="float")
    ddim = ours.text_to_image(PROMPTS, sampler="ddim", **run)
    for sampler, karras in DETERMINISTIC[:4]:
        assert np.max(np.abs(ours.text_to_image(PROMPTS, sampler=sampler, karras=karras, **run) - ddim)) > 1e-2


def jaxdiff_step_noise(seed, steps, shape):
    """The noise jaxdiff's ddpm adds at loop iteration i (NHWC): text_to_image splits PRNGKey(seed) into
    (initial noise, sampler) keys; `samplers.sample` splits the sampler key into (x_T, per-step noise) keys and
    draws step i from fold_in(noise key, i)."""
    _, loop_rng = jax.random.split(jax.random.PRNGKey(seed))
    _, noise_key = jax.random.split(loop_rng)
    return [np.asarray(jax.random.normal(jax.random.fold_in(noise_key, i), shape, jnp.float32)) for i in range(steps)]


def test_ddpm_with_the_same_step_noise_matches_diffusers(sd1, monkeypatch):
    """diffusers' DDPMScheduler draws its step noise with `randn_tensor`; the test hands it jaxdiff's draws.
    At its last step (t = 1 with steps_offset 1) diffusers adds noise of std 1e-10 (its variance floor),
    where jaxdiff adds none."""
    pipe, ours = sd1
    seed, noise = 3, random_noise(12)
    draws = iter(jaxdiff_step_noise(seed, STEPS, noise.shape))
    module = diffusers.schedulers.scheduling_ddpm
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: nchw(next(draws)).reshape(shape))
    use_scheduler(pipe, "ddpm")
    theirs = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=nchw(noise), output_type="np").images  # fmt: skip
    assert next(draws, None) is None  # diffusers drew once per step
    mine = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="ddpm",
                              seed=seed, latents=noise, output_type="float")  # fmt: skip
    assert_close(mine, theirs)
    other_seed = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
                                    sampler="ddpm", seed=seed + 1, latents=noise, output_type="float")  # fmt: skip
    assert np.max(np.abs(other_seed - theirs)) > 1e-2  # the step noise matters


def test_image_to_image_on_noise_levels_matches_diffusers(tmp_path):
    """SDEdit on a σ grid: the image latents plus σ·noise at the first level kept (DPM-Solver++, Karras)."""
    from tests.test_stable_diffusion import diffusers_noise, random_images

    pipe = save(diffusers.StableDiffusionImg2ImgPipeline, components(folder=tmp_path), tmp_path / "pipe")
    use_scheduler(pipe, "dpm_solver++", karras=True)
    images, strength, noise = random_images(1), 0.6, diffusers_noise(1)
    theirs = pipe(prompt=PROMPTS, image=images, strength=strength, negative_prompt=NEGATIVE,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # fmt: skip
    mine = LatentPipeline.from_pretrained(tmp_path / "pipe").image_to_image(
        images, PROMPTS, strength=strength, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
        sampler="dpm_solver++", karras=True, latents=noise, output_type="float",
    )  # fmt: skip
    assert_close(mine, theirs)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_latent_blending_inpainting_on_noise_levels_matches_diffusers(tmp_path, sampler):
    """A 4-channel U-Net: diffusers blends the image latents plus σ·noise at the next level after each scheduler
    step (Heun: each half step), jaxdiff before each model call; inside the mask the states agree."""
    from tests.test_stable_diffusion import half_masks, random_images

    save(diffusers.StableDiffusionInpaintPipeline, components(folder=tmp_path), tmp_path / "pipe")
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    use_scheduler(pipe, sampler, karras=True)  # "leading" steps, as the saved config says
    images, masks, noise = random_images(2), half_masks(), random_noise(3)
    theirs = pipe(prompt=PROMPTS, image=images, mask_image=masks, negative_prompt=NEGATIVE, height=16, width=16,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=nchw(noise),
                  generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    mine = LatentPipeline.from_pretrained(tmp_path / "pipe").inpaint(
        images, masks, PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler=sampler,
        karras=True, latents=noise, output_type="float",
    )  # fmt: skip
    assert_close(mine, theirs)


# --------------------------------------------------------------------------- bad input


def test_sampler_names_and_karras_are_checked(sd1):
    _, ours = sd1
    assert LATENT_SAMPLERS == ("ddim", "ddpm", "dpm_solver++", "dpm_solver++_sde", "euler", "heun", "euler_ancestral",
                               "lms", "unipc", "deis", "pndm")  # fmt: skip
    with pytest.raises(ValueError, match=r"^unknown sampler 'plms'; expected one of \('ddim', 'ddpm', 'dpm_solver\+\+', "):
        ours.text_to_image(PROMPTS, sampler="plms", steps=2)
    with pytest.raises(ValueError, match=r"^karras=True is for the samplers .* not 'ddim'$"):
        ours.text_to_image(PROMPTS, sampler="ddim", karras=True, steps=2)
    with pytest.raises(ValueError, match=r"^karras='yes' must be True or False$"):
        ours.text_to_image(PROMPTS, sampler="euler", karras="yes", steps=2)
    leading = scheduler_settings(dict(SD1_SCHEDULER, timestep_spacing="leading"), "test")
    with pytest.raises(ValueError, match=r"^steps=999 is too many for dpm_solver\+\+ with leading spacing"):
        dpm_solver_timesteps(leading, 999)


def test_spacing_is_the_configs_or_else_each_scheduler_class_default(sd1):
    _, ours = sd1
    assert "timestep_spacing" not in ours.scheduler.config
    spacings = {name: sampler_scheduler(ours.scheduler, name).timestep_spacing for name in LATENT_SAMPLERS}
    assert spacings == {"ddim": "leading", "ddpm": "leading", "dpm_solver++": "linspace", "euler": "linspace",
                        "heun": "linspace", "dpm_solver++_sde": "linspace", "euler_ancestral": "linspace",
                        "lms": "linspace", "unipc": "linspace", "deis": "linspace", "pndm": "leading"}  # fmt: skip
    leading = scheduler_settings(dict(SD1_SCHEDULER, timestep_spacing="leading"), "test")
    assert sampler_scheduler(leading, "euler").timestep_spacing == "leading"


def test_cli_sampler_and_karras_flags(sd1, sd1_folder, tmp_path):
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.cli import main

    _, ours = sd1
    out = tmp_path / "grid.png"
    flags = ["--prompt", PROMPTS[0], "--num", "1", "--steps", "3", "--seed", "2", "--sampler", "euler",
             "--spacing", "karras", "--out", str(out)]  # fmt: skip
    assert main(["sample", "--pretrained", str(sd1_folder), *flags]) == 0
    expected = ours.text_to_image(PROMPTS[:1], steps=3, seed=2, sampler="euler", karras=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
    assert not np.array_equal(expected, ours.text_to_image(PROMPTS[:1], steps=3, seed=2, sampler="euler"))
