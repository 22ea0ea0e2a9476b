"""`sampler=None`: the latent pipelines step as their folder's own scheduler class (`FOLDER_SAMPLERS`), PNDM
(PLMS, `jaxdiff.samplers.pndm`) included: PLMS against a float64 NumPy reference and diffusers' PNDMScheduler on a
closed-form model, then tiny StableDiffusionPipeline / SDXL folders saved with PNDM, Euler and DPM-Solver++ (Karras)
against diffusers' pipelines with the folder's scheduler; the refusals; the CLI's default."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.errors import WeightsError
from jaxdiff.latent.schedulers import (
    FOLDER_SAMPLERS,
    check_multistep_config,
    denoise,
    folder_sampler,
    pndm_points,
    sampler_scheduler,
    step_plan,
)
from tests.test_sdxl_pipeline import saved  # noqa: F401  (the SDXL base and refiner folders, a fixture)

T = 1000
PNDM_SD1 = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")  # fmt: skip
SPACINGS = [("leading", 1), ("trailing", 0), ("linspace", 0)]


def model_np(x, t):
    """A closed-form 'network' (ε or v) of the latents x and the training step t."""
    return (0.3 + 0.5 * t / T) * x + 0.2 * np.cos(t / 100.0) * np.sin(x)


def model_jax(x, t):
    t = jnp.asarray(t, jnp.float32)[:, None, None, None]
    return (0.3 + 0.5 * t / T) * x + 0.2 * jnp.cos(t / 100.0) * jnp.sin(x)


def alphas_cumprod_np(config):
    """ᾱ of the scaled-linear schedule, float64."""
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def transfer(base, e, t, t_next, alphas_cumprod, final, mean_type):
    """One step from t to t_next with the model output e, written as DDIM's x̂_0 then re-noising (float64)."""
    a, a_next = alphas_cumprod[t], (alphas_cumprod[t_next] if t_next >= 0 else final)
    eps = e if mean_type == "eps" else math.sqrt(a) * e + math.sqrt(1 - a) * base
    return math.sqrt(a_next) * (base - math.sqrt(1 - a) * eps) / math.sqrt(a) + math.sqrt(1 - a_next) * eps


def runge_kutta_reference(x, visited, stride, alphas_cumprod, final, mean_type):
    """PNDM's warm-up in float64: three pseudo Runge–Kutta steps (midpoint h = stride // 2 past each next step),
    then fourth-order PLMS on the outputs at each step's start."""
    step = lambda base, e, t, t_next: transfer(base, e, t, t_next, alphas_cumprod, final, mean_type)  # noqa: E731
    kept, half = [], stride // 2
    for a, b in zip(visited[:3], visited[1:4]):
        e1 = model_np(x, a)
        e2 = model_np(step(x, e1, a, a - half), b + half)
        e3 = model_np(step(x, e2, a, b + half), b + half)
        e4 = model_np(step(x, e3, a, b), b)
        x, kept = step(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, a, b), kept + [e1]
    for t in visited[3:]:
        kept.append(model_np(x, t))
        combined = (55 * kept[-1] - 59 * kept[-2] + 37 * kept[-3] - 9 * kept[-4]) / 24
        x = step(x, combined, t, t - stride)
    return x


def plms_reference(x, calls, stride, alphas_cumprod, final, mean_type):
    """PLMS in float64 from the paper's description."""
    first, kept = x, []
    for k, t in enumerate(calls):
        e = model_np(x, t)
        if k == 1:  # step 0 redone from the first state with the mean of the two slopes
            combined, start, end, base = (e + kept[-1]) / 2, t + stride, t, first
        else:
            kept.append(e)
            weights = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12]}.get(len(kept),
                                                                               [55 / 24, -59 / 24, 37 / 24, -9 / 24])
            combined = sum(w * kept[-1 - j] for j, w in enumerate(weights))
            start, end, base = t, t - stride, x
        x = transfer(base, combined, start, end, alphas_cumprod, final, mean_type)
    return x


def visited_reference(spacing, offset, steps):
    """diffusers' DDIM-family steps, decreasing (as the paper's Table 2 of 2305.08891)."""
    if spacing == "leading":
        return (np.arange(steps) * (T // steps) + offset)[::-1]
    if spacing == "trailing":
        return (np.round(np.arange(T, 0, -T / steps)) - 1).astype(np.int64)
    return np.round(np.linspace(0, T - 1, steps)).astype(np.int64)[::-1]


def run_jaxdiff(config, steps, x, strength=1.0):
    scheduler = sampler_scheduler(scheduler_settings(config, "test"), "pndm")
    check_multistep_config(scheduler, "pndm")
    points = pndm_points(scheduler, steps, strength)
    increasing = jnp.asarray(points[::-1].copy(), jnp.int32)
    plan = step_plan(scheduler, points, "pndm")
    out = denoise(lambda z, i: model_jax(z, increasing[i]), plan, jnp.asarray(x), jax.random.PRNGKey(0), sampler="pndm")
    return points, np.asarray(out)


CASES = [(spacing, offset, steps, prediction, alpha_to_one) for spacing, offset in SPACINGS for steps in (1, 2, 3, 5, 12)
         for prediction, alpha_to_one in (("epsilon", False), ("v_prediction", True))]  # fmt: skip


@pytest.mark.parametrize("spacing, offset, steps, prediction, alpha_to_one", CASES)
def test_plms_matches_a_float64_reference(spacing, offset, steps, prediction, alpha_to_one):
    config = dict(PNDM_SD1, timestep_spacing=spacing, steps_offset=offset, prediction_type=prediction,
                  set_alpha_to_one=alpha_to_one)  # fmt: skip
    x = np.random.default_rng(steps).standard_normal((2, 3, 3, 4)).astype(np.float32)
    points, ours = run_jaxdiff(config, steps, x)
    visited = visited_reference(spacing, offset, steps)
    calls = np.concatenate([visited[:2], visited[1:]]) if steps > 1 else visited
    np.testing.assert_array_equal(points, np.append(calls, calls[-1] - T // steps))
    alphas_cumprod = alphas_cumprod_np(config)
    final = 1.0 if alpha_to_one else alphas_cumprod[0]
    mean_type = "eps" if prediction == "epsilon" else "v"
    expected = plms_reference(x.astype(np.float64), calls, T // steps, alphas_cumprod, final, mean_type)
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=2e-5)
    ddim = x.astype(np.float64)
    for t, t_next in zip(visited, [*visited[1:], -1]):
        ddim = transfer(ddim, model_np(ddim, t), t, t_next, alphas_cumprod, final, mean_type)
    assert steps == 1 or np.max(np.abs(ddim - expected)) > 1e-3  # PLMS is not DDIM on the visited steps
    if steps >= 4:  # the Runge–Kutta warm-up (skip_prk_steps=False)
        points, ours = run_jaxdiff(dict(config, skip_prk_steps=False), steps, x)
        half = T // steps // 2
        warm_up = [visited[0]] + [s for j in (1, 2, 3) for s in (visited[j] + half,) * 2 + (visited[j],) * 2][:-1]
        np.testing.assert_array_equal(points, [*warm_up, *visited[3:], visited[-1] - T // steps])
        expected_rk = runge_kutta_reference(x.astype(np.float64), visited, T // steps, alphas_cumprod, final, mean_type)
        np.testing.assert_allclose(ours, expected_rk, rtol=2e-5, atol=2e-5)
        assert np.max(np.abs(expected_rk - expected)) > 1e-3


@pytest.mark.parametrize("spacing, offset", SPACINGS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps, strength, skip_prk", [(1, 1.0, True), (2, 1.0, True), (7, 1.0, True), (25, 1.0, True),
                                                      (10, 0.75, True), (10, 0.15, True), (4, 1.0, False),
                                                      (9, 1.0, False), (30, 1.0, False)])  # fmt: skip
def test_pndm_matches_diffusers_pndm_scheduler_step_for_step(diffusers, torch, spacing, offset, prediction, steps,
                                                            strength, skip_prk):  # fmt: skip
    """Every model call at the same training step, and the final state, as diffusers' PNDMScheduler (with
    strength < 1: the calls diffusers' image-to-image keeps, `timesteps[t_start:]`, its counter from 0), PLMS
    alone or after the Runge–Kutta warm-up."""
    config = dict(PNDM_SD1, timestep_spacing=spacing, steps_offset=offset, prediction_type=prediction,
                  skip_prk_steps=skip_prk)  # fmt: skip
    theirs = diffusers.PNDMScheduler(**config)
    theirs.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    x = np.random.default_rng(3).standard_normal((2, 3, 3, 4)).astype(np.float32)
    sample, seen = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), []
    for t in theirs.timesteps[t_start:]:
        seen.append(int(t))
        output = torch.from_numpy(model_np(sample.double().numpy(), int(t)).astype(np.float32))
        sample = theirs.step(output, t, sample).prev_sample
    points, ours = run_jaxdiff(config, steps, x, strength)
    np.testing.assert_array_equal(points[:-1], seen)
    np.testing.assert_allclose(ours, sample.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_scheduler_sampling_defaults_to_the_folders_pndm():
    """A DiTPipeline-style folder with PNDMScheduler: `SchedulerSampling` picks pndm, counts its N + 1 model calls
    and draws what the latent path does (a closed-form family; the scheduler sees the first C channels)."""
    from jaxdiff.latent.scheduler_sampling import SchedulerSampling

    class Family:
        def denoiser(self, model, params, *, labels, guidance):
            return lambda x, t: jnp.concatenate([model_jax(x, t), jnp.ones_like(x)], axis=-1)  # + a "learned σ"

    config = dict(PNDM_SD1, _class_name="PNDMScheduler", timestep_spacing="trailing", steps_offset=0)
    sampling = SchedulerSampling(scheduler_settings(config, "scheduler"), Family(), "folder")
    sampler, steps, options = sampling.sampling_settings(None, 6)
    assert (sampler, steps, options) == ("pndm", 6, {})
    assert [sampling.model_calls("pndm", n, {}) for n in (1, 2, 6)] == [1, 3, 7]
    noise = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float32)
    draw = sampling.sampler_fn(None, noise.shape, sampler="pndm", steps=6, spacing=None)
    _, expected = run_jaxdiff(config, 6, noise)
    np.testing.assert_allclose(np.asarray(draw(None, jax.random.PRNGKey(0), None, jnp.asarray(noise))), expected,
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def test_the_folder_class_table_and_its_refusal():
    assert FOLDER_SAMPLERS == {
        "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpm_solver++",
        "EulerDiscreteScheduler": "euler", "HeunDiscreteScheduler": "heun",
        "EulerAncestralDiscreteScheduler": "euler_ancestral", "LMSDiscreteScheduler": "lms",
        "UniPCMultistepScheduler": "unipc", "DEISMultistepScheduler": "deis", "PNDMScheduler": "pndm",
    }  # fmt: skip
    settings = lambda **keys: scheduler_settings(dict(PNDM_SD1, **keys), "scheduler")  # noqa: E731
    assert folder_sampler(settings(_class_name="PNDMScheduler"), "s") == "pndm"
    assert folder_sampler(settings(), "s") == "ddim"  # no class (a jaxdiff training run's): DDIMScheduler
    with pytest.raises(WeightsError) as err:
        folder_sampler(settings(_class_name="KDPM2DiscreteScheduler"), "sd/scheduler")
    message = str(err.value)
    assert message.startswith("sd/scheduler: unsupported scheduler _class_name='KDPM2DiscreteScheduler'; supported: ")
    assert "PNDMScheduler" in message and "EulerDiscreteScheduler" in message and "\n" not in message


def test_pndm_settings_are_refused_in_one_line():
    from jaxdiff.errors import UsageError

    sample = sampler_scheduler(scheduler_settings(dict(PNDM_SD1, prediction_type="sample"), "t"), "pndm")
    with pytest.raises(WeightsError) as err:
        check_multistep_config(sample, "pndm")
    assert "prediction_type='sample' for sampler 'pndm'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(WeightsError, match=r"skip_prk_steps='yes' \(true or false\)"):
        scheduler_settings(dict(PNDM_SD1, skip_prk_steps="yes"), "t")
    ddim_config = sampler_scheduler(scheduler_settings({"beta_schedule": "scaled_linear"}, "t"), "pndm")
    assert not ddim_config.skip_prk_steps  # PNDMScheduler's default: the warm-up
    for steps, strength, message in [(3, 1.0, r"^steps=3: PNDM's Runge–Kutta warm-up \(skip_prk_steps=false\) needs "
                                               r"steps >= 4$"),
                                     (10, 0.5, r"^strength=0.5: image-to-image with PNDM's Runge–Kutta warm-up")]:
        with pytest.raises(UsageError, match=message):
            pndm_points(ddim_config, steps, strength)
    # set_alpha_to_one: the config's, else PNDMScheduler's default False (DDIM's True for ddim)
    no_key = scheduler_settings({k: v for k, v in PNDM_SD1.items() if k != "set_alpha_to_one"}, "t")
    assert not sampler_scheduler(no_key, "pndm").set_alpha_to_one and sampler_scheduler(no_key, "ddim").set_alpha_to_one


# --------------------------------------------------------------------------- pipelines saved by diffusers


def sd_folder(diffusers, folder, scheduler, **settings):
    """(pipeline, folder) of a tiny StableDiffusionPipeline saved with `scheduler` (a diffusers scheduler);
    `settings` go to `components` (unet_settings, seed)."""
    from tests.test_stable_diffusion import components, save

    parts = components(folder=folder, **settings)
    parts["scheduler"] = scheduler
    return save(diffusers.StableDiffusionPipeline, parts, folder / "pipe"), folder / "pipe"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, diffusers):
    """name -> (diffusers pipeline, folder): SD 1.x with PNDM as released (ε, leading, steps_offset 1); SD 2.x-style
    v-prediction with PNDM "trailing"; PNDM with its Runge–Kutta warm-up; DPM-Solver++ with use_karras_sigmas."""
    from tests.test_stable_diffusion import SD1_SCHEDULER, UNET_SD2

    make = lambda name: tmp_path_factory.mktemp(name)  # noqa: E731
    dpm = {k: v for k, v in SD1_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}
    return {
        "pndm": sd_folder(diffusers, make("pndm"), diffusers.PNDMScheduler(**PNDM_SD1)),
        "pndm_v": sd_folder(diffusers, make("pndm_v"), diffusers.PNDMScheduler(**dict(
            PNDM_SD1, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)),
            unet_settings=UNET_SD2, seed=5),
        "pndm_rk": sd_folder(diffusers, make("pndm_rk"), diffusers.PNDMScheduler(**dict(PNDM_SD1, skip_prk_steps=False))),
        "dpm_karras": sd_folder(diffusers, make("dpm"),
                                diffusers.DPMSolverMultistepScheduler(**dpm, use_karras_sigmas=True)),
    }  # fmt: skip


def run_pair(pipe, folder, steps, noise_seed, expected_sampler):
    from jaxdiff.latent.pipeline import LatentPipeline
    from tests.test_stable_diffusion import GUIDANCE, NEGATIVE, PROMPTS, nchw, random_noise

    noise = random_noise(noise_seed)
    theirs = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                  latents=nchw(noise), output_type="np").images  # fmt: skip
    ours = LatentPipeline.from_pretrained(folder)
    assert ours.default_sampler == expected_sampler
    mine = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=steps, guidance=GUIDANCE, latents=noise,
                              output_type="float")  # fmt: skip
    return ours, mine, theirs, noise


@pytest.mark.parametrize("name, sampler, steps", [
    ("pndm", "pndm", 2),  # the fast case; the others over 10 s each on 2 CPU cores
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [("pndm", "pndm", 5), ("pndm_v", "pndm", 6),
                                                               ("pndm_rk", "pndm", 5), ("dpm_karras", "dpm_solver++", 5)]),
])  # fmt: skip
def test_text_to_image_without_a_sampler_is_the_folders_scheduler(folders, name, sampler, steps):
    from tests.test_stable_diffusion import GUIDANCE, NEGATIVE, PROMPTS, assert_close

    pipe, folder = folders[name]
    ours, mine, theirs, noise = run_pair(pipe, folder, steps, 20 + steps, sampler)
    assert_close(mine, theirs)
    ddim = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=steps, guidance=GUIDANCE, latents=noise,
                              sampler="ddim", output_type="float")  # fmt: skip
    assert np.max(np.abs(ddim - theirs)) > 1e-2  # an explicit sampler is still that sampler


@pytest.mark.slow
def test_pndm_image_to_image_and_inpainting_match_diffusers(folders, diffusers, torch):
    """PNDM's cut run (image-to-image, strength 0.6) and latent-blending inpainting (4-channel U-Net) from the
    folder's scheduler, as diffusers' pipelines built on the same components."""
    from jaxdiff.latent.pipeline import LatentPipeline
    from tests.test_stable_diffusion import (
        GUIDANCE, NEGATIVE, PROMPTS, assert_close, diffusers_noise, half_masks, nchw, random_images, random_noise,
    )  # fmt: skip

    pipe, folder = folders["pndm"]
    ours = LatentPipeline.from_pretrained(folder)
    parts = dict(pipe.components)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**parts)
    inpaint = diffusers.StableDiffusionInpaintPipeline(**parts)
    for p in (img2img, inpaint):
        p.set_progress_bar_config(disable=True)
    images, steps = random_images(1), 7
    theirs = img2img(prompt=PROMPTS, image=images, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=steps,
                     guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), output_type="np").images
    mine = ours.image_to_image(images, PROMPTS, strength=0.6, negative_prompts=NEGATIVE, steps=steps,
                               guidance=GUIDANCE, latents=diffusers_noise(1), output_type="float")  # fmt: skip
    assert_close(mine, theirs)
    masks, noise = half_masks(), random_noise(3)
    theirs = inpaint(prompt=PROMPTS, image=images, mask_image=masks, negative_prompt=NEGATIVE, height=16, width=16,
                     num_inference_steps=steps, guidance_scale=GUIDANCE, latents=nchw(noise),
                     generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    mine = ours.inpaint(images, masks, PROMPTS, negative_prompts=NEGATIVE, steps=steps, guidance=GUIDANCE,
                        latents=noise, output_type="float")  # fmt: skip
    assert_close(mine, theirs)


@pytest.mark.slow
def test_an_unsupported_class_is_refused_only_without_a_sampler(folders, tmp_path):
    import shutil

    from jaxdiff.latent.pipeline import LatentPipeline

    folder = tmp_path / "pipe"
    shutil.copytree(folders["pndm"][1], folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), _class_name="KDPM2DiscreteScheduler")))
    ours = LatentPipeline.from_pretrained(folder)
    with pytest.raises(WeightsError) as err:
        ours.text_to_image(["a cat"], steps=2)
    assert "unsupported scheduler _class_name='KDPM2DiscreteScheduler'; supported: " in str(err.value)
    assert "PNDMScheduler" in str(err.value) and "\n" not in str(err.value)
    assert ours.text_to_image(["a cat"], steps=2, sampler="pndm").shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_sdxl_base_and_refiner_without_a_sampler_step_as_euler(saved, torch):
    """SDXL folders ship EulerDiscreteScheduler: sampler=None is euler, base text-to-image and refiner
    image-to-image as diffusers' pipelines."""
    from tests.test_sdxl_pipeline import GUIDANCE, PROMPTS, STEPS, assert_close, diffusers_noise, nchw, noise_nhwc

    pair = saved
    base, refiner = pair["ours"]["base"], pair["ours"]["refiner"]
    assert base.default_sampler == refiner.default_sampler == "euler"
    noise = noise_nhwc(0)
    theirs = pair["base"](prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          latents=nchw(torch, noise), output_type="np").images  # fmt: skip
    assert_close(base.text_to_image(PROMPTS, steps=STEPS, guidance=GUIDANCE, latents=noise, output_type="float"),
                 theirs)  # fmt: skip
    images = np.random.default_rng(1).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    generator = torch.Generator().manual_seed(0)
    theirs = pair["refiner"](prompt=PROMPTS, image=images, strength=0.6, num_inference_steps=STEPS,
                             guidance_scale=GUIDANCE, generator=generator, output_type="np").images  # fmt: skip
    mine = refiner.image_to_image(images, PROMPTS, strength=0.6, steps=STEPS, guidance=GUIDANCE,
                                  latents=diffusers_noise(torch, 1), output_type="float")  # fmt: skip
    assert_close(mine, theirs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_sample_without_sampler_is_the_folders_scheduler(folders, tmp_path):
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.cli import main
    from jaxdiff.latent.pipeline import LatentPipeline

    folder = folders["pndm"][1]
    out = tmp_path / "grid.png"
    assert main(["sample", "--pretrained", str(folder), "--prompt", "a cat", "--num", "1", "--steps", "3", "--seed",
                 "2", "--out", str(out)]) == 0  # fmt: skip
    ours = LatentPipeline.from_pretrained(folder)
    expected = ours.text_to_image(["a cat"], steps=3, seed=2)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
    assert not np.array_equal(expected, ours.text_to_image(["a cat"], steps=3, seed=2, sampler="ddim"))
