"""Stable Diffusion end to end against diffusers' pipelines on tiny random models saved by diffusers/transformers:
text-to-image, image-to-image and inpainting (9-channel and latent blending) from the same noise; the
folder reader's and the pipeline's checks of bad input."""

import json
import shutil

import numpy as np
import pytest

from jaxdiff.convert.stable_diffusion import read_stable_diffusion, write_stable_diffusion
from jaxdiff.latent_pipeline import LatentPipeline, add_noise, visited_timesteps
from tests.test_clip_text import write_tokenizer_folder

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

UNET_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16], norm_num_groups=4,
    layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)  # fmt: skip
UNET_SD2 = dict(UNET_SD1, attention_head_dim=[1, 2], use_linear_projection=True, upcast_attention=True)
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
    norm_num_groups=4, sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
)  # fmt: skip
CLIP = dict(
    vocab_size=526, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=524, eos_token_id=525, pad_token_id=525,
)  # fmt: skip
SD1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1)  # fmt: skip
PROMPTS = ["hello the cat", "the cat of hello!!"]
NEGATIVE = ["", "hello"]
STEPS, GUIDANCE, SIZE = 5, 7.5, 16
TOLERANCE = 1e-3  # on decoded float images in [0, 1]


def randomized(module, seed):
    """Every parameter moved off its initial value (norms off (1, 0)), float32, eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.float().eval()


def components(*, unet_settings=UNET_SD1, scheduler=SD1_SCHEDULER, folder, seed=0):
    """Tiny random SD components. The VAE's log-variances are pinned at −30 so that a posterior sample is its
    mean (to ~1e-7): diffusers and jaxdiff then encode images alike although they draw different noise."""
    unet = randomized(diffusers.UNet2DConditionModel(**unet_settings), seed)
    vae = randomized(diffusers.AutoencoderKL(**VAE), seed + 1)
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -30.0
    text_encoder = randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), seed + 2)
    write_tokenizer_folder(folder / "tokenizer_source", "<|endoftext|>")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_source")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=diffusers.DDIMScheduler(**scheduler), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)  # fmt: skip


def save(pipeline_class, parts, folder):
    pipeline = pipeline_class(**parts)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(folder)
    return pipeline


def nchw(array):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))


def random_noise(seed, channels=4):
    return np.random.default_rng(seed).standard_normal((2, SIZE // 2, SIZE // 2, channels)).astype(np.float32)


def random_images(seed):
    return np.random.default_rng(seed).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)


def assert_close(ours, theirs):
    assert ours.shape == theirs.shape
    assert np.std(theirs) > 0.01  # not a constant image
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    pipe = save(diffusers.StableDiffusionPipeline, components(folder=folder), folder / "pipe")
    return pipe, folder / "pipe"


# --------------------------------------------------------------------------- against diffusers


def test_scheduler_steps_match_ddim_scheduler():
    for spacing, offset in (("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)):
        scheduler = diffusers.DDIMScheduler(**dict(SD1_SCHEDULER, timestep_spacing=spacing, steps_offset=offset))
        settings = read_scheduler(scheduler.config)
        for steps in (1, 5, 7, 50):
            scheduler.set_timesteps(steps)
            np.testing.assert_array_equal(visited_timesteps(settings, steps), scheduler.timesteps.numpy())


def read_scheduler(config):
    from jaxdiff.convert.stable_diffusion import scheduler_settings

    settings = scheduler_settings(dict(config), "test")
    reference = diffusers.DDIMScheduler.from_config(config).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(np.asarray(settings.schedule.alphas_cumprod, np.float64), reference, rtol=1e-6)
    return settings


def test_text_to_image_matches_diffusers(sd1):
    pipe, folder = sd1
    noise = random_noise(0)
    theirs = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=nchw(noise), height=SIZE, width=SIZE, output_type="np").images  # fmt: skip
    ours = LatentPipeline.from_pretrained(folder).text_to_image(
        PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, latents=noise, output_type="float"
    )
    assert_close(ours, theirs)


def test_text_to_image_uint8_from_seed_is_reproducible(sd1):
    _, folder = sd1
    ours = LatentPipeline.from_pretrained(folder)
    first = ours.text_to_image(PROMPTS[:1], steps=2, seed=3)
    assert first.dtype == np.uint8 and first.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, ours.text_to_image(PROMPTS[:1], steps=2, seed=3))
    assert not np.array_equal(first, ours.text_to_image(PROMPTS[:1], steps=2, seed=4))


def test_image_to_image_matches_diffusers(tmp_path):
    parts = components(folder=tmp_path)
    pipe = save(diffusers.StableDiffusionImg2ImgPipeline, parts, tmp_path / "pipe")
    images, strength = random_images(1), 0.6
    # diffusers draws the posterior sample's noise, then the added noise, from the generator
    generator = torch.Generator().manual_seed(0)
    shape = (2, 4, SIZE // 2, SIZE // 2)
    torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator).numpy().transpose(0, 2, 3, 1)
    theirs = pipe(prompt=PROMPTS, image=images, strength=strength, negative_prompt=NEGATIVE,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # fmt: skip
    ours = LatentPipeline.from_pretrained(tmp_path / "pipe").image_to_image(
        images, PROMPTS, strength=strength, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
        latents=noise, output_type="float",
    )  # fmt: skip
    assert_close(ours, theirs)


def half_masks():
    """The left half of image 0 and a square of image 1 are repainted."""
    masks = np.zeros((2, SIZE, SIZE, 1), np.float32)
    masks[0, :, : SIZE // 2] = 1.0
    masks[1, 4:12, 2:10] = 0.8
    return masks


@pytest.mark.parametrize("unet_settings", [dict(UNET_SD1, in_channels=9), UNET_SD1], ids=["9-channel", "blending"])
def test_inpainting_matches_diffusers(tmp_path, unet_settings):
    pipe = save(diffusers.StableDiffusionInpaintPipeline, components(unet_settings=unet_settings, folder=tmp_path),
                tmp_path / "pipe")  # fmt: skip
    images, masks, noise = random_images(2), half_masks(), random_noise(3)
    theirs = pipe(prompt=PROMPTS, image=images, mask_image=masks, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=nchw(noise),
                  generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    ours = LatentPipeline.from_pretrained(tmp_path / "pipe").inpaint(
        images, masks, PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, latents=noise,
        output_type="float",
    )  # fmt: skip
    assert_close(ours, theirs)


def test_v_prediction_sd2_trailing_matches_diffusers(tmp_path):
    scheduler = dict(SD1_SCHEDULER, prediction_type="v_prediction", timestep_spacing="trailing")
    parts = components(unet_settings=UNET_SD2, scheduler=scheduler, folder=tmp_path, seed=5)
    pipe = save(diffusers.StableDiffusionPipeline, parts, tmp_path / "pipe")
    noise = random_noise(4)
    theirs = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=nchw(noise), output_type="np").images  # fmt: skip
    ours = LatentPipeline.from_pretrained(tmp_path / "pipe")
    assert ours.scheduler.mean_type == "v"
    assert_close(ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
                                    latents=noise, output_type="float"), theirs)  # fmt: skip


def test_noising_matches_ddim_scheduler_add_noise(sd1):
    pipe, folder = sd1
    settings = read_stable_diffusion(folder).scheduler
    latents, noise = random_noise(5), random_noise(6)
    theirs = pipe.scheduler.add_noise(nchw(latents), nchw(noise), torch.tensor([601])).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(add_noise(settings, latents, noise, 601)), theirs, rtol=0, atol=1e-6)


def test_export_is_a_folder_diffusers_loads(sd1, tmp_path):
    pipe, folder = sd1
    write_stable_diffusion(read_stable_diffusion(folder), tmp_path / "export")
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "export", safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        theirs, ours = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert sorted(ours) == sorted(theirs), name
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key].numpy(), value.numpy(), err_msg=key)
    assert isinstance(loaded.scheduler, diffusers.DDIMScheduler)
    assert loaded.scheduler.config.steps_offset == 1 and loaded.scheduler.config.set_alpha_to_one is False
    with pytest.raises(FileExistsError, match="already exists"):
        write_stable_diffusion(read_stable_diffusion(folder), tmp_path / "export")


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def loaded(sd1):
    return LatentPipeline.from_pretrained(sd1[1])


@pytest.mark.parametrize("size", [dict(height=12), dict(width=20), dict(height=0)])
def test_sizes_must_be_multiples_of_8(loaded, size):
    name, value = next(iter(size.items()))
    with pytest.raises(ValueError, match=rf"^{name}={value} must be a positive multiple of 8$"):
        loaded.text_to_image(PROMPTS, steps=2, **size)


@pytest.mark.parametrize("strength", [0, 0.0, -0.5, 1.5, float("nan")])
def test_strength_must_lie_in_0_1(loaded, strength):
    with pytest.raises(ValueError, match=r"^strength=.* must be a number in \(0.0, 1.0\]$"):
        loaded.image_to_image(random_images(0), PROMPTS, strength=strength, steps=2)


def test_strength_leaving_no_step_is_refused(loaded):
    with pytest.raises(ValueError, match=r"strength=0.1 with steps=5 leaves no step"):
        loaded.image_to_image(random_images(0), PROMPTS, strength=0.1, steps=5)


def test_mask_must_match_the_images(loaded):
    with pytest.raises(ValueError, match=r"masks have shape \(2, 8, 16\); expected \[B, H, W\] = \(2, 16, 16\)"):
        loaded.inpaint(random_images(0), np.ones((2, 8, 16), np.float32), PROMPTS, steps=2)


def test_long_prompts_are_truncated_with_a_warning(loaded, caplog):
    with caplog.at_level("WARNING", logger="jaxdiff"):
        loaded.text_to_image([" ".join(["cat"] * 100)], steps=1)
    assert any("truncated" in record.getMessage() for record in caplog.records)


def test_folder_missing_a_component_is_refused(sd1, tmp_path):
    shutil.copytree(sd1[1], tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "vae")
    with pytest.raises(ValueError, match=r"lacks the component folders \['vae'\]"):
        LatentPipeline.from_pretrained(tmp_path / "pipe")


def test_sdxl_unet_is_not_supported_yet(sd1, tmp_path):
    shutil.copytree(sd1[1], tmp_path / "pipe")
    config_file = tmp_path / "pipe" / "unet" / "config.json"
    settings = json.loads(config_file.read_text())
    settings.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=2816)
    config_file.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"not supported yet.*addition_embed_type='text_time'"):
        LatentPipeline.from_pretrained(tmp_path / "pipe")


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "v1-5-pruned.ckpt"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"v1-5-pruned.ckpt is a pickle .*v1-5-pruned.safetensors"):
        LatentPipeline.from_pretrained(path)


def test_batch_guard_and_unknown_sampler(loaded):
    with pytest.raises(ValueError, match=r"1 negative_prompts for 2 prompts"):
        loaded.text_to_image(PROMPTS, negative_prompts=["x"], steps=2)
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'"):
        loaded.text_to_image(PROMPTS, sampler="euler", steps=2)
    with pytest.raises(ValueError, match=r"1 images for 2 prompts"):
        loaded.image_to_image(random_images(0)[:1], PROMPTS, strength=0.5, steps=2)
