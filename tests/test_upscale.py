"""The x4 upscaler: `UpscalePipeline.upscale` against diffusers' `StableDiffusionUpscalePipeline` on a tiny random
folder saved by diffusers (the same latents and augmentation noise), the noise augmentation against a float64
NumPy reference, tiled decoding against whole decoding, a NumPy blend of the decoded tiles and diffusers'
`AutoencoderKL.tiled_decode`, the reader's and the pipeline's refusals, and the CLI.

The parity tests need torch (the `torch`/`diffusers` fixtures skip them where it is absent); the NumPy ones run
everywhere."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.tiled_decode import TileSettings, check_tiles, decode_tiled, tile_settings
from jaxdiff.latent.upscale import MAX_LOW_RES_PIXELS, UpscalePipeline, low_res_condition
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder

UNET = dict(
    sample_size=8, in_channels=7, out_channels=4, block_out_channels=[8, 8, 16], norm_num_groups=4,
    layers_per_block=1, cross_attention_dim=32, attention_head_dim=2, use_linear_projection=True,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    only_cross_attention=[True, True, False], num_class_embeds=400,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[8, 8, 16], layers_per_block=1, latent_channels=4,
    norm_num_groups=4, sample_size=32, scaling_factor=0.08333, down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
)  # fmt: skip
LOW_RES_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)
SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
PROMPTS = ["hello the cat", "the cat of hello!!"]
NEGATIVE = ["", "hello"]
TOLERANCE = 1e-4  # on decoded float images in [0, 1]


def random_uint8(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def nchw(torch, array):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array, np.float32).transpose(0, 3, 1, 2)))


# --------------------------------------------------------------------------- the noise augmentation (NumPy)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_noise_augmentation_is_the_ddpm_marginal_in_float64(schedule):
    settings = scheduler_settings(dict(LOW_RES_SCHEDULER, beta_schedule=schedule, _class_name="DDPMScheduler"), "t")
    start, end = LOW_RES_SCHEDULER["beta_start"], LOW_RES_SCHEDULER["beta_end"]
    if schedule == "linear":
        betas = np.linspace(start, end, 1000, dtype=np.float64)
    else:
        betas = np.linspace(start**0.5, end**0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas)
    images = random_uint8(0, (2, 4, 4, 3))
    noise = np.random.default_rng(1).standard_normal(images.shape)
    for level in (0, 20, 350, 999):
        ours = low_res_condition(settings, images.astype(np.float32) / 255, jnp.asarray(noise, jnp.float32), level)
        x = images.astype(np.float64) / 255 * 2 - 1
        reference = np.sqrt(alpha_bar[level]) * x + np.sqrt(1 - alpha_bar[level]) * noise
        np.testing.assert_allclose(np.asarray(ours, np.float64), reference, rtol=0, atol=1e-5, err_msg=str(level))


# --------------------------------------------------------------------------- tiled decoding (NumPy)


@pytest.fixture(scope="module")
def tiny_vae():
    """A jaxdiff VAE of 3 levels (factor 4) with random parameters and its jitted decoder of unscaled latents."""
    config = autoencoder_config(VAE)
    vae = create_autoencoder(config)
    params = vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    decode = jax.jit(lambda z: vae.apply({"params": params}, z, method=vae.decode))
    return config, decode


def numpy_blend(tiles, settings):
    """diffusers' tiled_decode blend written out in float64 NumPy: tiles[i][j] [B, H, W, C] blended in place with
    the (already blended) tile above, then the one to the left, row by row; the kept corners concatenated."""
    tiles = [[np.array(t, np.float64) for t in row] for row in tiles]
    extent, kept = settings.blend_extent(), settings.kept()
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            if i > 0:
                above = tiles[i - 1][j]
                e = min(above.shape[1], tile.shape[1], extent)
                for y in range(e):
                    tile[:, y] = above[:, above.shape[1] - e + y] * (1 - y / e) + tile[:, y] * (y / e)
            if j > 0:
                left = row[j - 1]
                e = min(left.shape[2], tile.shape[2], extent)
                for x in range(e):
                    tile[:, :, x] = left[:, :, left.shape[2] - e + x] * (1 - x / e) + tile[:, :, x] * (x / e)
    return np.concatenate([np.concatenate([t[:, :kept, :kept] for t in row], 2) for row in tiles], 1)


def test_tiled_decoding_blends_the_tiles_as_diffusers_does(tiny_vae):
    config, decode = tiny_vae
    settings = TileSettings(16, 4)  # stride 3, blend over 4 image pixels, 12 kept
    z = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 8, 4))  # 3 × 3 tiles, those at the far edges cut short
    tiles = [[decode(z[:, i : i + 4, j : j + 4]) for j in range(0, 8, 3)] for i in range(0, 7, 3)]
    ours = decode_tiled(decode, z, settings, 4)
    assert ours.shape == (2, 28, 32, 3)
    np.testing.assert_allclose(ours, numpy_blend(tiles, settings), rtol=0, atol=1e-5)
    assert np.abs(ours - np.asarray(decode(z))).max() > 1e-3  # tiles do differ from the whole decode


def test_one_tile_covering_the_latents_is_the_whole_decode(tiny_vae):
    config, decode = tiny_vae
    settings = tile_settings(config, 4)
    assert settings == (32, 8, 0.25) and settings.stride() == 6
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 5, 4))  # h, w <= the stride: one tile
    np.testing.assert_allclose(decode_tiled(decode, z, settings, 4), np.asarray(decode(z)), rtol=0, atol=1e-6)


def test_tile_settings_that_do_not_tile_are_refused():
    for settings, message in [(TileSettings(30, 7), "the 23 rows kept per tile must be the stride 5 × the"),
                              (TileSettings(16, 4, 1.0), "overlap_factor=1.0 must be a number in [0, 1)"),
                              (TileSettings(0, 4), "must be positive ints")]:  # fmt: skip
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace(")", r"\)")):
            check_tiles(settings, 4)


# --------------------------------------------------------------------------- against diffusers


def test_tiled_decode_matches_diffusers(diffusers, torch, tmp_path):
    from jaxdiff.latent.component_weights import read_autoencoder
    from tests.test_stable_diffusion import randomized

    vae = randomized(diffusers.AutoencoderKL(**VAE), 5)
    vae.save_pretrained(tmp_path / "vae")
    config, params = read_autoencoder(tmp_path / "vae")
    assert tile_settings(config, 4) == (vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    module = create_autoencoder(config)
    decode = jax.jit(lambda z: module.apply({"params": params}, z, method=module.decode))
    z = np.random.default_rng(6).standard_normal((2, 7, 8, 4)).astype(np.float32)
    vae.tile_sample_min_size, vae.tile_latent_min_size = 16, 4
    with torch.no_grad():
        theirs = vae.tiled_decode(nchw(torch, z)).sample.numpy().transpose(0, 2, 3, 1)
    ours = decode_tiled(decode, jnp.asarray(z), TileSettings(16, 4), 4)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory, diffusers):
    """(diffusers pipeline, its saved folder, our UpscalePipeline of it) of tiny random components; the VAE's
    posterior is unused (the upscaler only decodes)."""
    transformers = pytest.importorskip("transformers")
    from tests.test_clip_text import write_tokenizer_folder
    from tests.test_stable_diffusion import CLIP, randomized

    folder = tmp_path_factory.mktemp("upscaler")
    write_tokenizer_folder(folder / "tokenizer_source", "<|endoftext|>")
    pipe = diffusers.StableDiffusionUpscalePipeline(
        unet=randomized(diffusers.UNet2DConditionModel(**UNET), 0), vae=randomized(diffusers.AutoencoderKL(**VAE), 1),
        text_encoder=randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 2),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_source"),
        low_res_scheduler=diffusers.DDPMScheduler(**LOW_RES_SCHEDULER), scheduler=diffusers.DDIMScheduler(**SCHEDULER),
        max_noise_level=350,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    return pipe, folder / "pipe", UpscalePipeline.from_pretrained(folder / "pipe")


def diffusers_upscale(torch, pipe, images, latents, **settings):
    """diffusers' float images (NHWC) and the augmentation noise it drew (NHWC), captured from its
    low_res_scheduler."""
    from PIL import Image

    drawn = []
    add_noise = pipe.low_res_scheduler.add_noise

    def capture(original, noise, timesteps):
        drawn.append(noise.numpy().transpose(0, 2, 3, 1))
        return add_noise(original, noise, timesteps)

    pipe.low_res_scheduler.add_noise = capture
    try:
        out = pipe(image=[Image.fromarray(image) for image in images], latents=nchw(torch, latents),
                   generator=torch.Generator().manual_seed(0), output_type="np", **settings).images  # fmt: skip
    finally:
        del pipe.low_res_scheduler.add_noise
    return out, drawn[0]


def test_upscale_matches_diffusers_with_guidance(upscaler, torch):
    pipe, _, ours = upscaler
    images = random_uint8(10, (2, 8, 8, 3))
    latents = np.random.default_rng(11).standard_normal((2, 8, 8, 4)).astype(np.float32)
    theirs, noise = diffusers_upscale(torch, pipe, images, latents, prompt=PROMPTS, negative_prompt=NEGATIVE,
                                      num_inference_steps=3, guidance_scale=6.0, noise_level=20)  # fmt: skip
    result = ours.upscale(images, PROMPTS, negative_prompts=NEGATIVE, steps=3, guidance=6.0, noise_level=20,
                          latents=latents, noise=noise, output_type="float")  # fmt: skip
    assert result.shape == theirs.shape == (2, 32, 32, 3) and np.std(theirs) > 0.01
    np.testing.assert_allclose(result, theirs, rtol=0, atol=TOLERANCE)
    other_level = ours.upscale(images, PROMPTS, negative_prompts=NEGATIVE, steps=3, guidance=6.0, noise_level=200,
                               latents=latents, noise=noise, output_type="float")  # fmt: skip
    assert np.abs(other_level - theirs).max() > 1e-2  # the noise level reaches the U-Net


def test_tiled_none_tiles_latents_above_the_size_bound(upscaler, monkeypatch):
    from jaxdiff.latent import upscale

    _, _, ours = upscaler
    settings = dict(steps=3, guidance=1.0, sampler="euler", seed=4, output_type="float")  # the euler test's loop
    images = random_uint8(14, (1, 12, 12, 3))  # latents of 144 pixels, 2 × 2 tiles of 8²
    whole, tiled = (ours.upscale(images, PROMPTS[:1], tiled=flag, **settings) for flag in (False, True))
    np.testing.assert_array_equal(ours.upscale(images, PROMPTS[:1], **settings), whole)
    monkeypatch.setattr(upscale, "UNTILED_MAX_LATENT_PIXELS", 143)
    np.testing.assert_array_equal(ours.upscale(images, PROMPTS[:1], **settings), tiled)
    assert np.abs(tiled - whole).max() > 1e-3


def test_upscale_matches_diffusers_euler_tiled_without_guidance(upscaler, torch, diffusers):
    pipe, folder, ours = upscaler
    default_scheduler = pipe.scheduler
    # From the saved config, as ours reads it ("leading" steps; the in-memory config would give Euler its default).
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    pipe.vae.enable_tiling()  # latents of 12² > the 8² tiles: decoded in 2 × 2 tiles
    try:
        images = random_uint8(12, (1, 12, 12, 3))
        latents = np.random.default_rng(13).standard_normal((1, 12, 12, 4)).astype(np.float32)
        theirs, noise = diffusers_upscale(torch, pipe, images, latents, prompt=PROMPTS[:1], num_inference_steps=3,
                                          guidance_scale=1.0, noise_level=150)  # fmt: skip
    finally:
        pipe.scheduler = default_scheduler
        pipe.vae.disable_tiling()
    result = ours.upscale(images, PROMPTS[:1], steps=3, guidance=1.0, noise_level=150, latents=latents, noise=noise,
                          sampler="euler", tiled=True, output_type="float")  # fmt: skip
    assert result.shape == theirs.shape == (1, 48, 48, 3) and np.std(theirs) > 0.01
    np.testing.assert_allclose(result, theirs, rtol=0, atol=TOLERANCE)


# --------------------------------------------------------------------------- refusals


def test_pipeline_refuses_bad_input_in_one_line(upscaler):
    _, _, ours = upscaler
    images = random_uint8(0, (2, 8, 8, 3))
    side = int(MAX_LOW_RES_PIXELS**0.5) + 4
    bad = [
        (dict(noise_level=351), "noise_level=351 must be an int in [0, 350]"),
        (dict(noise_level=-1), "noise_level=-1 must be an int in [0, 350]"),
        (dict(noise_level=2.5), "noise_level=2.5 must be an int"),
        (dict(images=images.astype(np.float32) / 255), "images must be uint8"),
        (dict(images=images[:1]), "1 images for 2 prompts"),
        (dict(images=random_uint8(0, (2, 10, 8, 3))), "height 10: the upscaler takes sides that are positive "
                                                       "multiples of 4"),
        (dict(images=np.zeros((2, side, side, 3), np.uint8)), f"would upscale to {4 * side}×{4 * side}"),
        (dict(noise=np.zeros((2, 8, 8, 4), np.float32)), "noise of shape (2, 8, 8, 4); expected (2, 8, 8, 3)"),
        (dict(latents=np.zeros((2, 32, 32, 4), np.float32)), "latents of shape (2, 32, 32, 4); expected (2, 8, 8, 4)"),
        (dict(tiled="yes"), "tiled='yes' must be True, False or None"),
        (dict(sampler="plms"), "unknown sampler 'plms'"),
    ]  # fmt: skip
    for change, message in bad:
        settings = {"images": images, "steps": 2, **change}
        with pytest.raises(UsageError) as info:
            ours.upscale(settings.pop("images"), PROMPTS, **settings)
        assert message in str(info.value) and "\n" not in str(info.value), (change, str(info.value))
    with pytest.raises(UsageError, match=r"text_to_image\(\) needs a text-to-image model .*; this pipeline holds an"):
        ours.text_to_image(PROMPTS)


def test_loaders_route_the_upscaler(upscaler):
    from jaxdiff import Pipeline
    from jaxdiff.latent.pipeline import LatentPipeline

    _, folder, ours = upscaler
    assert isinstance(Pipeline.from_pretrained(folder), UpscalePipeline)
    assert ours.default_sampler == "ddim" and ours.max_noise_level == 350
    with pytest.raises(UsageError, match="LatentPipeline does not run StableDiffusionUpscalePipeline weights"):
        LatentPipeline.from_pretrained(folder)
    with pytest.raises(UsageError, match=r"upscale\(\) needs an x4 upscaler \(a StableDiffusionUpscalePipeline"):
        LatentPipeline.upscale(ours, [], [])  # what every other pipeline's upscale is


def edited_copy(folder, target, component, **changes):
    """A copy of the folder with `changes` made to `component`'s JSON (model_index.json for None; a None value
    deletes the key)."""
    shutil.copytree(folder, target)
    path = target / "model_index.json" if component is None else next((target / component).glob("*config.json"))
    settings = json.loads(path.read_text())
    settings.update(changes)
    path.write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    return target


def test_reader_refuses_what_it_cannot_honour(upscaler, tmp_path):
    from jaxdiff.latent.stable_diffusion import read_stable_diffusion

    _, folder, _ = upscaler
    index = json.loads((folder / "model_index.json").read_text())
    assert set(index) <= {"_class_name", "_diffusers_version", "_name_or_path", "max_noise_level", "unet", "vae",
                          "text_encoder", "tokenizer", "scheduler", "low_res_scheduler", "safety_checker",
                          "feature_extractor", "watermarker"}  # fmt: skip
    cases = [
        (None, dict(requires_safety_checker=True), "unknown key requires_safety_checker=True"),
        (None, dict(watermarker=["x", "Watermarker"]), "watermarker=['x', 'Watermarker']; jaxdiff runs no watermarker"),
        (None, dict(max_noise_level=400), "max_noise_level=400 must be an int in [0, 399]"),
        (None, dict(max_noise_level=-3), "max_noise_level=-3 must be an int in [0, 399]"),
        (None, dict(low_res_scheduler=["diffusers", "DDIMScheduler"]), "low_res_scheduler=['diffusers', 'DDIM"),
        (None, dict(unet=["diffusers", "UNet2DModel"]), "unet=['diffusers', 'UNet2DModel']"),
        (None, dict(scheduler=["diffusers", "PNDMScheduler"]), "names scheduler 'PNDMScheduler'"),
        ("vae", dict(scaling_factor=0.18215), "scaling_factor=0.18215; the x4 upscaler's VAE has 0.08333"),
        ("unet", dict(num_class_embeds=None), "num_class_embeds=None; the upscaler's U-Net takes the noise level"),
        ("low_res_scheduler", dict(beta_schedule="cosine"), "beta_schedule='cosine'"),
    ]  # fmt: skip
    for k, (component, changes, message) in enumerate(cases):
        with pytest.raises(WeightsError) as info:
            read_stable_diffusion(edited_copy(folder, tmp_path / str(k), component, **changes))
        assert message in str(info.value) and "\n" not in str(info.value), (changes, str(info.value))
    no_level = edited_copy(folder, tmp_path / "default", None, max_noise_level=None)
    assert read_stable_diffusion(no_level).max_noise_level == 350  # the pipeline's default


# --------------------------------------------------------------------------- CLI


@pytest.mark.timeout(300)
def test_cli_upscales_and_refuses_flags_by_name(upscaler, tmp_path, capsys):
    from PIL import Image

    from jaxdiff.cli import main

    _, folder, ours = upscaler
    image = random_uint8(20, (8, 8, 3))
    Image.fromarray(image).save(tmp_path / "low.png")
    base = ["sample", "--pretrained", str(folder), "--init-image", str(tmp_path / "low.png"), "--prompt", "hello",
            "--steps", "2", "--seed", "3"]  # fmt: skip
    assert main([*base, "--noise-level", "30", "--out", str(tmp_path / "big.png")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"1 image of 8×8 upscaled to 32×32 -> {tmp_path / 'big.png'}"]
    expected = ours.upscale(image[None], ["hello"], steps=2, seed=3, noise_level=30)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "big.png")), expected)

    for flags, message in [
        (["--strength", "0.5"], "--strength: options of text-to-image, image-to-image and inpainting"),
        (["--height", "16"], "--height: options of text-to-image"),
        (["--eta", "0.5"], "--eta: options of pixel-space sampling"),
        (["--noise-level", "351"], "noise_level=351 must be an int in [0, 350]"),
        (["--num", "0"], "--num 0: give at least one image"),
    ]:
        assert main([*base, *flags, "--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)
    missing = [flag for flag in base if flag not in ("--init-image", str(tmp_path / "low.png"))]
    assert main([*missing, "--out", str(tmp_path / "bad.png")]) == 2
    assert "needs --init-image" in capsys.readouterr().err
    assert main(["sample", "--workdir", str(tmp_path / "run"), "--noise-level", "5", "--out", "x.png"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--noise-level: for an x4 upscaler" in line
    assert not (tmp_path / "bad.png").exists()
