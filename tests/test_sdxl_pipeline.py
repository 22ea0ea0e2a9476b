"""SDXL base and refiner end to end against diffusers' `StableDiffusionXLPipeline` and
`StableDiffusionXLImg2ImgPipeline` on tiny random models saved by diffusers/transformers (two CLIP text encoders,
the second with projection, a "text_time" U-Net with per-level transformer layers, EulerDiscreteScheduler as SDXL
ships): text-to-image with and without negative prompts (force_zeros_for_empty_prompt), guidance_rescale,
clip_skip and micro-conditioning; image-to-image; a refiner folder (aesthetic scores); the base -> refiner
hand-off at denoising_end / denoising_start. Torch-free parts: the folder reader's and the pipeline's refusals on
config-only folders and models initialised in JAX, the hand-off's cut against the uncut run, guidance rescale
against float64 NumPy."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.bundle import LatentModels
from jaxdiff.latent.pipeline import LatentPipeline
from jaxdiff.latent.prompt_conditioning import rescale_guided
from jaxdiff.latent.stable_diffusion import is_stable_diffusion, read_stable_diffusion
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition, example_inputs
from jaxdiff.models.unet_condition_config import config_from_diffusers

# Two levels, transformer layers 1 and 2 (the middle block 2), text_time with 4-wide time-id sinusoids:
# P = 6·4 + 8 (base) or 5·4 + 8 (refiner); context width 32 + 16 (base) or 16 (refiner, text_encoder_2 only).
UNET_BASE = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2], attention_head_dim=[1, 2], use_linear_projection=True,
    cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=32,
)  # fmt: skip
UNET_REFINER = dict(UNET_BASE, cross_attention_dim=16, projection_class_embeddings_input_dim=28)
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
    norm_num_groups=4, sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.13025,
)  # fmt: skip
CLIP_L = dict(
    vocab_size=526, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=524, eos_token_id=525, pad_token_id=525,
)  # fmt: skip
CLIP_G = dict(CLIP_L, hidden_size=16, num_hidden_layers=3, projection_dim=8, hidden_act="gelu", pad_token_id=0)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 timestep_spacing="leading", num_train_timesteps=1000)  # fmt: skip
PROMPTS = ["hello the cat", "the cat of hello!!"]
NEGATIVE = ["", "hello"]
STEPS, GUIDANCE, SIZE = 5, 5.0, 16
TOLERANCE = 1e-4  # on float images in [0, 1]
MICRO = dict(original_size=(24, 20), crops_coords_top_left=(2, 3), target_size=(16, 12),
             negative_original_size=(8, 8), negative_crops_coords_top_left=(1, 0), negative_target_size=(16, 16))  # fmt: skip


# --------------------------------------------------------------------------- torch-free: folders and models in JAX


def write_config_folder(folder, *, refiner=False, **index_changes):
    """An SDXL folder of configs only (the reader checks them before any weights)."""
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
             "_diffusers_version": "0.42.1", "feature_extractor": [None, None], "image_encoder": [None, None],
             "force_zeros_for_empty_prompt": not refiner, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    if refiner:
        index["requires_aesthetics_score"] = True
    index.update(index_changes)
    configs = {"unet/config.json": UNET_REFINER if refiner else UNET_BASE, "vae/config.json": VAE,
               "text_encoder_2/config.json": dict(CLIP_G, architectures=["CLIPTextModelWithProjection"]),
               "scheduler/scheduler_config.json": dict(SCHEDULER, _class_name="EulerDiscreteScheduler")}  # fmt: skip
    if not refiner:
        configs["text_encoder/config.json"] = dict(CLIP_L, architectures=["CLIPTextModel"])
    for name, settings in {**configs, "model_index.json": index}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(settings))
    for name in ("tokenizer", "tokenizer_2"):
        if index.get(name) not in (None, [None, None]):
            (folder / name).mkdir(exist_ok=True)
    return folder


class HashTokenizer:
    """Prompts -> 77 ids: BOS, one id per word, EOS, EOS padding (a stand-in for CLIP's BPE without files)."""

    def __call__(self, prompts):
        ids = np.full((len(prompts), 77), 525, np.int32)
        ids[:, 0] = 524
        for row, prompt in enumerate(prompts):
            words = [sum(map(ord, word)) % 500 for word in prompt.split()]
            ids[row, 1 : 1 + len(words)] = words
        return type("Tokenized", (), {"input_ids": ids})


def init_params(module, *args, **kwargs):
    return jax.tree.map(np.asarray, module.init(jax.random.PRNGKey(0), *args, **kwargs)["params"])


@pytest.fixture(scope="module")
def jax_base():
    """An SDXL base pipeline on networks initialised in JAX (no torch): for refusals and the hand-off's cut."""
    unet_config = config_from_diffusers(UNET_BASE)
    vae_config = autoencoder_config(VAE)
    texts = [clip_text_config(dict(CLIP_L)), clip_text_config(dict(CLIP_G, architectures=["CLIPTextModelWithProjection"]))]
    args, kwargs = example_inputs(unet_config)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    ids = jnp.zeros((1, 77), jnp.int32)
    model = LatentModels(
        pipeline_class="StableDiffusionXLPipeline", unet_config=unet_config,
        unet_params=init_params(create_unet_condition(unet_config), *zeros(args), **zeros(kwargs)),
        vae_config=vae_config, vae_params=init_params(create_autoencoder(vae_config), jnp.zeros((1, 16, 16, 3))),
        text_config=texts[0], text_params=init_params(create_clip_text(texts[0]), ids), tokenizer=HashTokenizer(),
        text_config_2=texts[1], text_params_2=init_params(create_clip_text(texts[1]), ids), tokenizer_2=HashTokenizer(),
        scheduler=scheduler_settings(dict(SCHEDULER, _class_name="EulerDiscreteScheduler"), "scheduler"),
        force_zeros_for_empty_prompt=True,
    )  # fmt: skip
    return LatentPipeline(model)


def test_handoff_cut_continues_the_uncut_run(jax_base):
    """Euler stopped at denoising_end and continued from denoising_start (same model) is the uncut run."""
    noise = np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    common = dict(steps=STEPS, guidance=GUIDANCE, sampler="euler", output_type="latent")
    whole = jax_base.text_to_image(PROMPTS, latents=noise, **common)
    cut = jax_base.text_to_image(PROMPTS, latents=noise, denoising_end=0.6, **common)
    resumed = jax_base.image_to_image(cut, PROMPTS, denoising_start=0.6, **common)
    assert np.abs(cut - whole).max() > 0.1  # stopped part-way: still noisy
    np.testing.assert_allclose(resumed, whole, rtol=0, atol=1e-5)


def test_guidance_rescale_matches_numpy():
    rng = np.random.default_rng(1)
    guided, conditional = 3.0 * rng.standard_normal((3, 4, 2, 4)), rng.standard_normal((3, 4, 2, 4))
    ratio = conditional.reshape(3, -1).std(axis=1, ddof=1) / guided.reshape(3, -1).std(axis=1, ddof=1)
    expected = 0.7 * guided * ratio[:, None, None, None] + 0.3 * guided
    ours = rescale_guided(jnp.asarray(guided, jnp.float32), jnp.asarray(conditional, jnp.float32), 0.7)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda p: p.text_to_image("a", original_size=(0, 8)), r"original_size=\(0, 8\) must be a pair of ints >= 1"),
    (lambda p: p.text_to_image("a", aesthetic_score=5.0), r"aesthetic_score applies to SDXL folders with requires_"),
    (lambda p: p.text_to_image("a", crop=(0, 0)), r"unknown keyword 'crop'"),
    (lambda p: p.text_to_image("a", negative_original_size=(8, 8)),
     r"negative_original_size applies \(in text_to_image, as diffusers\) only with both"),
    (lambda p: p.text_to_image("a", sampler="euler", denoising_end=1.0), r"denoising_end=1.0 must be a number in \(0, 1\)"),
    (lambda p: p.text_to_image("a", sampler="ddim", denoising_end=0.5), r"denoising_end needs a sampler in .*not 'ddim'"),
    (lambda p: p.text_to_image("a", guidance_rescale=1.5), r"guidance_rescale=1.5 must be a number in \[0.0, 1.0\]"),
    (lambda p: p.text_to_image("a", clip_skip=3), r"clip_skip=3 must be an int in 0..2"),
    (lambda p: p.image_to_image(np.zeros((1, 16, 16, 3)), "a"), r"needs strength in \(0, 1\]"),
    (lambda p: p.image_to_image(np.zeros((1, 16, 16, 3), np.float32), "a", sampler="euler", denoising_start=0.5),
     r"with denoising_start, images must be float latents \[B, h, w, 4\]"),
    (lambda p: p.image_to_image(np.zeros((1, 8, 8, 4), np.float32), "a", strength=0.5, sampler="euler",
                                denoising_start=0.5), r"strength does not apply with denoising_start"),
])  # fmt: skip
def test_pipeline_refusals(jax_base, call, match):
    with pytest.raises(UsageError, match=match):
        call(jax_base)


def test_kohya_lora_adapts_the_second_text_encoder(jax_base, tmp_path):
    """`lora_te2_` keys adapt text_encoder_2 (params "text_2"): W + (alpha / r)·(up @ down)ᵀ in our [in, out]."""
    import safetensors.numpy

    rng = np.random.default_rng(3)
    down, up = rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((16, 2)).astype(np.float32)
    module = "lora_te2_text_model_encoder_layers_1_self_attn_q_proj"
    safetensors.numpy.save_file({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                                 f"{module}.alpha": np.array(1.0, np.float32)}, tmp_path / "te2.safetensors")  # fmt: skip
    kernel = np.asarray(jax_base.params["text_2"]["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"], np.float64)
    jax_base.load_lora(tmp_path / "te2.safetensors", scale=0.5)
    try:
        adapted = jax_base._run_params["text_2"]["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
        expected = kernel + 0.5 * 0.5 * (up.astype(np.float64) @ down.astype(np.float64)).T
        np.testing.assert_allclose(np.asarray(adapted), expected, rtol=0, atol=1e-6)
        assert jax_base._run_params["text"] is jax_base.params["text"]  # the first encoder untouched
    finally:
        jax_base._init_lora()


@pytest.mark.parametrize("refiner, change, match", [
    (False, {"text_encoder": [None, None]}, r"text_encoder is missing or null; StableDiffusionXLPipeline needs it"),
    (False, {"watermarker": [None, None]}, r"unknown key watermarker=\[None, None\] for StableDiffusionXLPipeline"),
    (False, {"requires_aesthetics_score": True}, r"unknown key requires_aesthetics_score=True"),
    (False, {"image_encoder": ["transformers", "CLIPVisionModelWithProjection"]}, r"runs no image encoder"),
    (False, {"force_zeros_for_empty_prompt": "yes"}, r"force_zeros_for_empty_prompt='yes' must be true or false"),
    (True, {"tokenizer": ["transformers", "CLIPTokenizer"]}, r"text_encoder and tokenizer must both be given or both null"),
    (True, {"requires_aesthetics_score": False}, r"requires_aesthetics_score=False gives 6 time ids"),
    (True, {"scheduler": ["diffusers", "DDIMScheduler"]}, r"_class_name='EulerDiscreteScheduler' but model_index.json"),
])  # fmt: skip
def test_folder_refusals(tmp_path, refiner, change, match):
    folder = write_config_folder(tmp_path / "pipe", refiner=refiner, **change)
    assert is_stable_diffusion(folder)
    with pytest.raises(WeightsError, match=match):
        read_stable_diffusion(folder)


def test_mismatched_encoder_widths_are_refused(tmp_path):
    folder = write_config_folder(tmp_path / "pipe")
    (folder / "unet" / "config.json").write_text(json.dumps(dict(UNET_BASE, cross_attention_dim=32)))
    with pytest.raises(WeightsError, match=r"cross_attention_dim=32 but the text encoders' hidden sizes \[32, 16\]"):
        read_stable_diffusion(folder)


# --------------------------------------------------------------------------- against diffusers


@pytest.fixture(scope="module")
def saved(tmp_path_factory, torch, diffusers):
    """(diffusers base text-to-image, base img2img, refiner pipelines; jaxdiff base and refiner) of tiny random
    components saved by diffusers."""
    transformers = pytest.importorskip("transformers")
    from tests.test_clip_text import write_tokenizer_folder
    from tests.test_stable_diffusion import randomized

    folder = tmp_path_factory.mktemp("sdxl")
    vae = randomized(diffusers.AutoencoderKL(**VAE), 1)
    with torch.no_grad():  # log-variances at -30: a posterior sample is its mean (diffusers draws other noise)
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -30.0
    text_encoder = randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)), 2)
    text_encoder_2 = randomized(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_G)), 3)
    write_tokenizer_folder(folder / "tokenizer", "<|endoftext|>")
    write_tokenizer_folder(folder / "tokenizer_2", "!")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER)
    base_parts = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                      tokenizer_2=tokenizer_2, unet=randomized(diffusers.UNet2DConditionModel(**UNET_BASE), 0),
                      scheduler=scheduler, add_watermarker=False)  # fmt: skip
    base = diffusers.StableDiffusionXLPipeline(**base_parts)
    base_img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**base_parts)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=randomized(diffusers.UNet2DConditionModel(**UNET_REFINER), 4), scheduler=scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip
    for pipe, name in ((base, "base"), (refiner, "refiner")):
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(folder / name)
    base_img2img.set_progress_bar_config(disable=True)
    ours = {name: LatentPipeline.from_pretrained(folder / name) for name in ("base", "refiner")}
    return dict(base=base, base_img2img=base_img2img, refiner=refiner, ours=ours, folder=folder)


def noise_nhwc(seed):
    return np.random.default_rng(seed).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)


def nchw(torch, array):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))


def assert_close(ours, theirs):
    assert ours.shape == theirs.shape
    assert np.std(theirs) > 0.01  # not a constant image
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


def diffusers_noise(torch, draw, shape=(2, 4, SIZE // 2, SIZE // 2)):
    """NHWC: the `draw`-th normal tensor diffusers draws from a generator seeded 0 (the posterior sample of the
    autoencoder takes one, the noise added the next)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(draw):
        torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("case", ["negative", "force_zeros_rescale_micro"])
def test_text_to_image_matches_diffusers(saved, torch, case):
    """The second case runs one prompt: with several, diffusers' StableDiffusionXLPipeline repeats the stacked
    [negative; positive] time ids per prompt, pairing negative ids with some conditional rows (jaxdiff gives
    every unconditional row the negative ids and every conditional row the positive ones)."""
    prompts, noise = PROMPTS, noise_nhwc(0)
    if case == "negative":
        theirs_args, ours_args = dict(negative_prompt=NEGATIVE, clip_skip=1), dict(negative_prompts=NEGATIVE, clip_skip=1)
    else:
        prompts, noise = PROMPTS[:1], noise[:1]
        theirs_args, ours_args = dict(guidance_rescale=0.7, **MICRO), dict(guidance_rescale=0.7, **MICRO)
    theirs = saved["base"](prompt=prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           latents=nchw(torch, noise), height=SIZE, width=SIZE, output_type="np",
                           **theirs_args).images  # fmt: skip
    ours = saved["ours"]["base"].text_to_image(prompts, steps=STEPS, guidance=GUIDANCE, sampler="euler",
                                               latents=noise, output_type="float", **ours_args)  # fmt: skip
    assert_close(ours, theirs)


@pytest.mark.parametrize("which", ["base_img2img", "refiner"])
def test_image_to_image_matches_diffusers(saved, torch, which):
    images = np.random.default_rng(1).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    extra = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0) if which == "refiner" else MICRO
    theirs = saved[which](prompt=PROMPTS, image=images, strength=0.6, num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), output_type="np",
                          **extra).images  # fmt: skip
    pipe = saved["ours"]["base" if which == "base_img2img" else "refiner"]
    ours = pipe.image_to_image(images, PROMPTS, strength=0.6, steps=STEPS, guidance=GUIDANCE, sampler="euler",
                               latents=diffusers_noise(torch, 1), output_type="float", **extra)  # fmt: skip
    assert_close(ours, theirs)


@pytest.mark.parametrize("karras", [False, True], ids=["leading", "karras"])
def test_base_to_refiner_handoff_matches_diffusers(saved, torch, diffusers, karras):
    """Leading steps 801, 601, 401, 201, 1 cut at 0.6 (training step 400): the base runs 3, the refiner 2; on the
    Karras grid the cut falls by diffusers' fractional timesteps."""
    noise, schedulers = noise_nhwc(2), {name: saved[name].scheduler for name in ("base", "refiner")}
    for name, scheduler in schedulers.items():
        saved[name].scheduler = diffusers.EulerDiscreteScheduler.from_config(scheduler.config, use_karras_sigmas=karras)
    try:
        theirs_latents = saved["base"](prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                                       guidance_scale=GUIDANCE, latents=nchw(torch, noise), height=SIZE, width=SIZE,
                                       denoising_end=0.6, output_type="latent").images  # fmt: skip
        theirs = saved["refiner"](prompt=PROMPTS, negative_prompt=NEGATIVE, image=theirs_latents,
                                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, denoising_start=0.6,
                                  output_type="np").images  # fmt: skip
    finally:
        for name, scheduler in schedulers.items():
            saved[name].scheduler = scheduler
    common = dict(negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="euler", karras=karras)
    ours_latents = saved["ours"]["base"].text_to_image(PROMPTS, latents=noise, denoising_end=0.6,
                                                       output_type="latent", **common)  # fmt: skip
    np.testing.assert_allclose(ours_latents, theirs_latents.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-4)
    ours = saved["ours"]["refiner"].image_to_image(ours_latents, PROMPTS, denoising_start=0.6, output_type="float",
                                                   **common)  # fmt: skip
    assert_close(ours, theirs)


def test_refiner_refuses_text_to_image(saved):
    with pytest.raises(UsageError, match=r"refiner \(requires_aesthetics_score\): it runs image_to_image"):
        saved["ours"]["refiner"].text_to_image("a")


def test_cli_samples_sdxl_and_refuses_what_does_not_apply(saved, tmp_path, capsys):
    from jaxdiff import images
    from jaxdiff.cli import main
    from PIL import Image

    base, refiner = str(saved["folder"] / "base"), str(saved["folder"] / "refiner")
    out = tmp_path / "t2i.png"
    flags = ["--prompt", "hello the cat", "--num", "2", "--steps", "3", "--seed", "4"]
    assert main(["sample", "--pretrained", base, *flags, "--out", str(out)]) == 0
    expected = saved["ours"]["base"].text_to_image(["hello the cat"] * 2, steps=3, seed=4)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
    bad = {(refiner,): "is an SDXL refiner (requires_aesthetics_score): it needs --init-image"}
    for (folder, *more), message in bad.items():
        capsys.readouterr()
        assert main(["sample", "--pretrained", folder, *flags, *more, "--out", str(tmp_path / "bad.png")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line
    assert not (tmp_path / "bad.png").exists()
