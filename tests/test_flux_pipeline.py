"""Flux.1 end to end against diffusers' `FluxPipeline`, `FluxImg2ImgPipeline` and `FluxInpaintPipeline` on tiny
random folders saved by diffusers/transformers (a CLIPTextModel, a T5 encoder, a 16-channel autoencoder with
shift_factor, FlowMatchEulerDiscreteScheduler with use_dynamic_shifting): a dev-like transformer (guidance embeds)
for text-to-image, image-to-image and inpainting, and a schnell-like one (no guidance embeds) with true CFG and
negative prompts; `jaxdiff sample --pretrained` on both families. Torch-free: the pipeline's refusals on models
initialised in JAX."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.flow_scheduler import FlowMatchSettings
from jaxdiff.latent.flux_pipeline import FluxPipeline
from jaxdiff.models.clip_text import clip_text_config
from jaxdiff.models.flux import create_flux, example_inputs, flux_config
from jaxdiff.models.t5_encoder import t5_encoder_config
from tests.test_sd3_pipeline import (
    CLIP_L,
    SIZE,
    T5,
    T5_LENGTH,
    VAE,
    assert_close,
    diffusers_noise,
    half_masks,
    jax_models,
    noise_nhwc,
    nchw,
)

CLIP = dict(CLIP_L, hidden_size=16)
TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=T5["d_model"], pooled_projection_dim=16, axes_dims_rope=[2, 2, 4],
)  # fmt: skip
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)  # fmt: skip
PROMPTS = ["a photo of cat", "the dog in space!"]
NEGATIVE = ["the cat", ""]
STEPS, GUIDANCE, TRUE_CFG = 4, 3.5, 2.5


# --------------------------------------------------------------------------- torch-free: refusals


def jax_flux(guidance_embeds):
    config = flux_config(dict(TRANSFORMER, guidance_embeds=guidance_embeds))
    module = create_flux(config)
    encoders = {"text": (clip_text_config(dict(CLIP)), "clip"), "text_2": (t5_encoder_config(dict(T5)), "t5")}
    return FluxPipeline(jax_models("FluxPipeline", module, config, example_inputs(module), encoders,
                                   FlowMatchSettings(**SCHEDULER)))  # fmt: skip


@pytest.fixture(scope="module")
def jax_pipes():
    return {"dev": jax_flux(True), "schnell": jax_flux(False)}


@pytest.mark.parametrize("which, call, match", [
    ("schnell", lambda p: p.text_to_image("a", guidance=3.5), r"guidance=3.5: this Flux transformer has no guidance"),
    ("dev", lambda p: p.text_to_image("a", height=18, width=16), r"height=18 must be a positive multiple of 4"),
    ("dev", lambda p: p.text_to_image("a", negative_prompts=["b"]), r"negative_prompts need true_cfg > 1"),
    ("dev", lambda p: p.text_to_image("a", true_cfg=2.0), r"true_cfg=2.0 needs negative_prompts"),
    ("dev", lambda p: p.text_to_image("a", guidance=-1.0), r"guidance=-1.0 must be a number in \[0.0, inf\]"),
    ("dev", lambda p: p.text_to_image("a", max_sequence_length=1), r"max_sequence_length=1 must be an int in 2..512"),
    ("dev", lambda p: p.text_to_image("a", output_type="pil"), r"output_type='pil'; expected one of"),
    ("dev", lambda p: p.image_to_image(np.zeros((2, 16, 16, 3)), "a"), r"2 images for 1 prompts"),
    ("dev", lambda p: p.sample(1), r"sample\(\) needs a pixel-space model"),
])  # fmt: skip
def test_pipeline_refusals(jax_pipes, which, call, match):
    with pytest.raises(UsageError, match=match):
        call(jax_pipes[which])


def test_default_size_is_diffusers_default_sample_size(jax_pipes):
    """128 latent pixels × the autoencoder's factor (2 here); checked without running (latents of another size)."""
    with pytest.raises(UsageError, match=r"latents of shape \(1, 4, 4, 16\); expected \(1, 128, 128, 16\)"):
        jax_pipes["dev"].text_to_image("a", latents=np.zeros((1, 4, 4, 16)))


def test_lora_on_the_transformer_and_clip_equals_the_adapted_weights(jax_pipes):
    """A diffusers-named LoRA on a double block's q projection (transformer) and a CLIP layer's q_proj, and a
    kohya-named one on BFL's fused single-block linear1: the run equals a pipeline whose weights were changed by
    hand (float64 NumPy W + scale·c·up @ down, split by rows for the fused module); unfused back bitwise."""
    import pathlib

    import flax.traverse_util

    from jaxdiff.weights.lora_files import LoraFile, LoraModule

    pipe = jax_pipes["dev"]
    rng = np.random.default_rng(0)
    run = dict(steps=2, height=16, width=16, max_sequence_length=8, output_type="float")
    before = pipe.text_to_image(PROMPTS[:1], **run)

    def factors(out, inp, rank=2):
        return rng.normal(size=(rank, inp)).astype(np.float32), rng.normal(size=(out, rank)).astype(np.float32) * 0.05

    d = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    q_down, q_up = factors(d, d)
    c_down, c_up = factors(CLIP["hidden_size"], CLIP["hidden_size"])
    l_down, l_up = factors(7 * d, d)  # linear1: q, k, v (d rows each) and the MLP input (4·d)
    peft = LoraFile(pathlib.Path("peft.safetensors"), {
        ("transformer", "transformer_blocks.0.attn.to_q"): LoraModule(q_down, q_up, 0.5, ("a",)),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"): LoraModule(c_down, c_up, 1.0, ("b",)),
    }, underscored=False)  # fmt: skip
    kohya = LoraFile(pathlib.Path("kohya.safetensors"), {
        ("unet", "single_blocks_0_linear1"): LoraModule(l_down, l_up, 2.0, ("c",))}, underscored=True)
    expected = flax.traverse_util.flatten_dict(jax.tree.map(lambda a: np.asarray(a, np.float64), pipe.params))

    def add(path, down, up, scale):  # ΔW [out, in] -> our dense kernel [in, out]
        expected[path] = expected[path] + scale * (up.astype(np.float64) @ down).T

    add(("transformer", "transformer_blocks_0", "attn", "to_q", "kernel"), q_down, q_up, 0.5 * 0.5)
    add(("text", "encoder", "layers_0", "self_attn", "q_proj", "kernel"), c_down, c_up, 0.5)
    block = ("transformer", "single_transformer_blocks_0")
    for (start, stop), module in zip([(0, d), (d, 2 * d), (2 * d, 3 * d), (3 * d, 7 * d)],
                                     [("attn", "to_q"), ("attn", "to_k"), ("attn", "to_v"), ("proj_mlp",)]):  # fmt: skip
        add((*block, *module, "kernel"), l_down, l_up[start:stop], 2.0)
    pipe.load_lora(peft, scale=0.5, name="peft")
    pipe.load_lora(kohya, name="kohya")
    try:
        adapted = pipe.text_to_image(PROMPTS[:1], **run)
        for path, value in flax.traverse_util.flatten_dict(pipe._run_params).items():
            np.testing.assert_allclose(value, expected[path], rtol=1e-5, atol=1e-6, err_msg=str(path))
        assert np.max(np.abs(adapted - before)) > 1e-4  # the adapters change the image
        original = pipe.params
        pipe.fuse_lora()
        np.testing.assert_array_equal(pipe.text_to_image(PROMPTS[:1], **run), adapted)
        pipe.unfuse_lora()
        assert pipe.params is original
    finally:
        pipe._init_lora()  # the module's other tests run without adapters
    np.testing.assert_array_equal(pipe.text_to_image(PROMPTS[:1], **run), before)


# --------------------------------------------------------------------------- against diffusers


@pytest.fixture(scope="module")
def saved(tmp_path_factory, torch, diffusers):
    """diffusers' Flux pipelines (dev-like and schnell-like transformers) on tiny random components, and jaxdiff's of
    the saved folders."""
    transformers = pytest.importorskip("transformers")
    from tests.test_clip_text import write_tokenizer_folder
    from tests.test_stable_diffusion import randomized
    from tests.test_t5_encoder import write_t5_tokenizer_json

    folder = tmp_path_factory.mktemp("flux")
    vae = randomized(diffusers.AutoencoderKL(**VAE), 1)
    with torch.no_grad():  # log-variances at -30: a posterior sample is its mean (diffusers draws other noise)
        vae.encoder.conv_out.weight[16:] = 0.0
        vae.encoder.conv_out.bias[16:] = -30.0
    write_tokenizer_folder(folder / "clip_tokenizer", "<|endoftext|>")
    write_t5_tokenizer_json(folder / "t5_tokenizer")
    parts = dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 2),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "clip_tokenizer"),
        text_encoder_2=randomized(transformers.T5EncoderModel(transformers.T5Config(**T5)), 3),
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(folder / "t5_tokenizer"),
    )  # fmt: skip
    dev = dict(parts, transformer=randomized(diffusers.FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=True), 0))
    schnell = dict(parts, transformer=randomized(diffusers.FluxTransformer2DModel(**TRANSFORMER), 4))
    pipes = {"dev": diffusers.FluxPipeline(**dev), "schnell": diffusers.FluxPipeline(**schnell),
             "img2img": diffusers.FluxImg2ImgPipeline(**dev), "inpaint": diffusers.FluxInpaintPipeline(**dev)}
    for name in ("dev", "schnell"):
        pipes[name].save_pretrained(folder / name)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    ours = {name: FluxPipeline.from_pretrained(folder / name) for name in ("dev", "schnell")}
    return dict(theirs=pipes, ours=ours, folder=folder)


def packed(torch, diffusers, noise):
    """NHWC noise as the packed tokens diffusers' FluxPipeline takes as `latents`."""
    b, h, w, c = noise.shape
    return diffusers.FluxPipeline._pack_latents(nchw(torch, noise), b, c, h, w)


THEIRS = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, max_sequence_length=T5_LENGTH, output_type="np")
COMMON = dict(steps=STEPS, max_sequence_length=T5_LENGTH, output_type="float")


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_text_to_image_matches_diffusers(saved, torch, diffusers, which):
    """dev: the embedded guidance; schnell-like: none, true CFG with negative prompts instead."""
    noise = noise_nhwc(0)
    if which == "dev":
        theirs_args, ours_args = dict(guidance_scale=GUIDANCE), dict(guidance=GUIDANCE)
    else:
        theirs_args = dict(true_cfg_scale=TRUE_CFG, negative_prompt=NEGATIVE)
        ours_args = dict(true_cfg=TRUE_CFG, negative_prompts=NEGATIVE)
    theirs = saved["theirs"][which](prompt=PROMPTS, latents=packed(torch, diffusers, noise), **THEIRS,
                                    **theirs_args).images  # fmt: skip
    ours = saved["ours"][which].text_to_image(PROMPTS, latents=noise, height=SIZE, width=SIZE, **COMMON, **ours_args)
    assert_close(ours, theirs)


def test_image_to_image_matches_diffusers(saved, torch):
    images = np.random.default_rng(1).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    theirs = saved["theirs"]["img2img"](prompt=PROMPTS, image=images, strength=0.6, guidance_scale=GUIDANCE,
                                        generator=torch.Generator().manual_seed(0), **THEIRS).images  # fmt: skip
    ours = saved["ours"]["dev"].image_to_image(images, PROMPTS, strength=0.6, guidance=GUIDANCE,
                                               latents=diffusers_noise(torch, 1), **COMMON)  # fmt: skip
    assert_close(ours, theirs)


def test_inpaint_matches_diffusers(saved, torch):
    images = np.random.default_rng(2).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    theirs = saved["theirs"]["inpaint"](prompt=PROMPTS, image=images, mask_image=half_masks(), strength=0.6,
                                        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0),
                                        **THEIRS).images  # fmt: skip
    ours = saved["ours"]["dev"].inpaint(images, half_masks(), PROMPTS, strength=0.6, guidance=GUIDANCE,
                                        latents=diffusers_noise(torch, 1), **COMMON)  # fmt: skip
    assert_close(ours, theirs)


def test_cli_samples_and_refuses_what_does_not_apply(saved, tmp_path, capsys):
    """`jaxdiff sample --pretrained` of a Flux (schnell-like: no guidance) folder draws what the pipeline draws;
    --sampler and --guidance are refused in one line."""
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.cli import main

    out = tmp_path / "grid.png"
    args = ["sample", "--pretrained", str(saved["folder"] / "schnell"), "--prompt", "a cat", "--num", "1", "--steps",
            "2", "--seed", "4", "--height", str(SIZE), "--width", str(SIZE), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    expected = saved["ours"]["schnell"].text_to_image(["a cat"], steps=2, seed=4, height=SIZE, width=SIZE)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
    for extra, message in ((["--sampler", "euler"], "--sampler: options of the Stable Diffusion / SDXL pipelines"),
                           (["--guidance", "3"], "guidance=3.0: this Flux transformer has no guidance embedding")):
        capsys.readouterr()
        assert main([*args, *extra]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line


def test_float16_variant_folder_through_pipeline_from_pretrained(saved, tmp_path):
    """A folder whose weights are only `*.fp16.safetensors` (float16 tensors, as diffusers' variant="fp16" saves) is
    read with variant="fp16": every parameter is the float32 folder's rounded to float16."""
    import shutil

    import jax
    import safetensors.numpy

    from jaxdiff import Pipeline

    folder = shutil.copytree(saved["folder"] / "dev", tmp_path / "fp16")
    for file in folder.glob("*/*.safetensors"):
        tensors = {name: value.astype(np.float16) for name, value in safetensors.numpy.load_file(file).items()}
        safetensors.numpy.save_file(tensors, file.with_suffix(".fp16.safetensors"))
        file.unlink()
    pipe = Pipeline.from_pretrained(folder, variant="fp16")
    assert isinstance(pipe, FluxPipeline)
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), saved["ours"]["dev"].params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, pipe.params), rounded)


def test_bfloat16_holds_bfloat16_weights_and_is_as_close_as_diffusers_bfloat16(saved, torch, diffusers, tmp_path):
    """`dtype="bfloat16"`: the transformer's and text encoders' weights are rounded to bfloat16 as they are read, the
    VAE (force_upcast, diffusers' default) stays float32; the images are as far from float32 diffusers' as
    diffusers' own bfloat16 pipeline's."""
    import jax
    import ml_dtypes

    from jaxdiff import Pipeline

    folder = saved["folder"] / "dev"
    pipe = Pipeline.from_pretrained(folder, dtype="bfloat16")
    exact = saved["ours"]["dev"].params
    assert sorted(pipe.params) == sorted(exact) and "vae" in exact
    for key, tree in exact.items():
        dtype = np.float32 if key == "vae" else ml_dtypes.bfloat16
        rounded = jax.tree.map(lambda a, d=dtype: np.asarray(a).astype(d).astype(np.float32), tree)
        assert {np.dtype(a.dtype) for a in jax.tree.leaves(pipe.params[key])} == {np.dtype(dtype)}, key
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda a: np.asarray(a, np.float32),
                                                                 pipe.params[key]), rounded)  # fmt: skip
    noise = noise_nhwc(0)
    exact_images = saved["theirs"]["dev"](prompt=PROMPTS, latents=packed(torch, diffusers, noise), **THEIRS,
                                          guidance_scale=GUIDANCE).images  # fmt: skip
    half = diffusers.FluxPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    theirs = half(prompt=PROMPTS, latents=packed(torch, diffusers, noise).to(torch.bfloat16), **THEIRS,
                  guidance_scale=GUIDANCE).images  # fmt: skip
    ours = pipe.text_to_image(PROMPTS, latents=noise, height=SIZE, width=SIZE, guidance=GUIDANCE, **COMMON)
    ours_error, their_error = np.abs(ours - exact_images).mean(), np.abs(theirs - exact_images).mean()
    assert 2e-5 < ours_error < 1.25 * their_error  # measured 4.4e-4 against diffusers' 0.016 (float32 VAE, norms)
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.cli import main

    out = tmp_path / "grid.png"  # the CLI's --dtype is the same setting
    assert main(["sample", "--pretrained", str(folder), "--prompt", "a cat", "--num", "1", "--steps", "2", "--seed",
                 "4", "--height", str(SIZE), "--width", str(SIZE), "--dtype", "bfloat16", "--out", str(out)]) == 0
    expected = pipe.text_to_image(["a cat"], steps=2, seed=4, height=SIZE, width=SIZE)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))


def test_original_single_file_with_the_folder_matches_diffusers(saved, torch, diffusers, tmp_path):
    """BFL's layout (`flux1-dev.safetensors`) with the dev folder's other components: jaxdiff's images equal those of
    diffusers' pipeline holding the file's transformer as diffusers' own converter reads it; the schnell folder,
    whose transformer has no guidance embedder, is refused naming the setting."""
    from tests.test_transformer_single_file import bfl_names, diffusers_flux_from, random_state_dict, save

    settings = dict(TRANSFORMER, guidance_embeds=True)
    state = random_state_dict(bfl_names(settings), seed=7)
    save(tmp_path / "flux1-tiny.safetensors", state)
    _, model = diffusers_flux_from(torch, diffusers, settings, state)
    theirs = diffusers.FluxPipeline(**{**saved["theirs"]["dev"].components, "transformer": model})
    theirs.set_progress_bar_config(disable=True)
    ours = FluxPipeline.from_pretrained(tmp_path / "flux1-tiny.safetensors", config_folder=saved["folder"] / "dev")
    noise = noise_nhwc(5)
    expected = theirs(prompt=PROMPTS, latents=packed(torch, diffusers, noise), guidance_scale=GUIDANCE, **THEIRS).images
    got = ours.text_to_image(PROMPTS, latents=noise, guidance=GUIDANCE, height=SIZE, width=SIZE, **COMMON)
    assert_close(got, expected)
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.cli import main

    out = tmp_path / "one.png"
    assert main(["sample", "--pretrained", str(tmp_path / "flux1-tiny.safetensors"), "--config-folder",
                 str(saved["folder"] / "dev"), "--prompt", "a cat", "--num", "1", "--steps", "2", "--height", str(SIZE),
                 "--width", str(SIZE), "--out", str(out)]) == 0  # fmt: skip
    expected = ours.text_to_image(["a cat"], steps=2, height=SIZE, width=SIZE)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
    with pytest.raises(WeightsError, match=r"differs from .*schnell's: guidance_embeds=True \(folder: False\)"):
        FluxPipeline.from_pretrained(tmp_path / "flux1-tiny.safetensors", config_folder=saved["folder"] / "schnell")
