"""SDXL beyond text-to-image and image-to-image, against diffusers on tiny random models saved by
diffusers/transformers (the components of tests/test_sdxl_pipeline.py): `prompts_2` / `negative_prompts_2` (what the
second text encoder reads, diffusers' prompt_2 / negative_prompt_2) in text_to_image, image_to_image and inpaint and
on the CLI; inpainting as `StableDiffusionXLInpaintPipeline` on a base folder (4-channel U-Net: latent blending)
and on an inpainting folder (9-channel U-Net: mask and masked-image latents concatenated), with strength < 1 and
denoising_end; original single files (sgm layout: base and refiner) written from the diffusers pipelines by
mapping the names back (the OpenCLIP part checked with diffusers' own converter), read with the folder as
config_folder into the folder's parameters. Torch-free: the refusals, on models initialised in JAX."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdiff.errors import UsageError
from jaxdiff.latent.pipeline import LatentPipeline
from tests import test_sdxl_pipeline
from tests.test_sdxl_pipeline import (
    CLIP_G,
    GUIDANCE,
    MICRO,
    NEGATIVE,
    PROMPTS,
    SIZE,
    STEPS,
    UNET_BASE,
    assert_close,
    diffusers_noise,
    nchw,
    noise_nhwc,
)

# test_sdxl_pipeline's fixtures: an SDXL base initialised in JAX (no torch); its pipelines saved by diffusers
jax_base, saved = test_sdxl_pipeline.jax_base, test_sdxl_pipeline.saved

PROMPTS_2 = ["a dog of the hello", "cat"]
NEGATIVE_2 = ["the", "cat cat"]


# --------------------------------------------------------------------------- torch-free refusals


@pytest.mark.parametrize("call, match", [
    (lambda p: p.text_to_image("a", negative_prompts_2="b"), r"negative_prompts_2 needs negative_prompts: without"),
    (lambda p: p.text_to_image(["a", "b"], prompts_2=["c"]), r"1 prompts_2 for 2 prompts; give one per prompt"),
    (lambda p: p.text_to_image("a", negative_prompts="n", negative_prompts_2=["x", "y"]),
     r"2 negative_prompts_2 for 1 prompts"),
    (lambda p: p.text_to_image("a", prompts_2=3), r"prompts_2 must be a string or a non-empty list of strings"),
    (lambda p: p.inpaint(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16)), "a", sampler="ddim",
                         denoising_end=0.5), r"denoising_end needs a sampler in .*not 'ddim'"),
    (lambda p: p.inpaint(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16)), "a", sampler="euler", strength=0.2,
                         steps=5, denoising_end=0.5), r"denoising_end=0.5 leaves none of the 5 steps"),
    (lambda p: p.inpaint(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16)), "a", aesthetic_score=6.0),
     r"aesthetic_score applies to SDXL folders with requires_aesthetics_score=True"),
    (lambda p: p.inpaint(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16)), "a", guidance_rescale=2.0),
     r"guidance_rescale=2.0 must be a number in \[0.0, 1.0\]"),
    (lambda p: p.inpaint(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16)), "a", denoising_start=0.5),
     r"inpaint\(\) takes no denoising_start"),
])  # fmt: skip
def test_refusals(jax_base, call, match):
    with pytest.raises(UsageError, match=match):
        call(jax_base)


def test_prompts_2_reach_only_the_second_encoder(jax_base):
    """The context's first 32 features (text_encoder) follow `prompts`, its last 16 and the pooled embedding
    (text_encoder_2) follow `prompts_2`; the unconditional side likewise `negative_prompts` / `_2`."""
    encode = lambda first, second, negative, negative_2: jax_base._embeddings(  # noqa: E731
        [first], [negative], prompts_2=[second], negative_prompts_2=[negative_2], time_ids=(np.zeros(6),) * 2)
    cond, uncond = encode("hello the cat", "a dog", "the", "cat cat")
    cond_a, uncond_a = encode("hello the cat", "hello the cat", "the", "the")
    cond_b, uncond_b = encode("a dog", "a dog", "cat cat", "cat cat")
    for mixed, a, b in ((cond, cond_a, cond_b), (uncond, uncond_a, uncond_b)):
        np.testing.assert_array_equal(np.asarray(mixed.context[..., :32]), np.asarray(a.context[..., :32]))
        np.testing.assert_array_equal(np.asarray(mixed.context[..., 32:]), np.asarray(b.context[..., 32:]))
        np.testing.assert_array_equal(np.asarray(mixed.added_cond["text_embeds"]), np.asarray(b.added_cond["text_embeds"]))
        assert np.abs(np.asarray(a.context[..., 32:]) - np.asarray(b.context[..., 32:])).max() > 1e-3


# --------------------------------------------------------------------------- against diffusers


@pytest.fixture(scope="module")
def pipes(saved, torch, diffusers):
    """diffusers' SDXL pipelines on tiny random components (test_sdxl_pipeline's base and refiner, an inpainting
    pipeline on the base's components and one with a 9-channel U-Net) and jaxdiff's of the saved folders (base,
    refiner, inpainting)."""
    from tests.test_stable_diffusion import randomized

    parts = dict(saved["base"].components, add_watermarker=False)
    nine = randomized(diffusers.UNet2DConditionModel(**dict(UNET_BASE, in_channels=9)), 5)
    theirs = {"base": saved["base"], "base_img2img": saved["base_img2img"], "refiner": saved["refiner"],
              "base_inpaint": diffusers.StableDiffusionXLInpaintPipeline(**parts),
              "inpainting": diffusers.StableDiffusionXLInpaintPipeline(**dict(parts, unet=nine))}  # fmt: skip
    for pipe in theirs.values():
        pipe.set_progress_bar_config(disable=True)
    theirs["inpainting"].save_pretrained(saved["folder"] / "inpainting")
    ours = dict(saved["ours"], inpainting=LatentPipeline.from_pretrained(saved["folder"] / "inpainting"))
    return dict(theirs=theirs, ours=ours, folder=saved["folder"])


def images_and_masks():
    """Two random images; the left half of image 0 and a square of image 1 repainted."""
    images = np.random.default_rng(1).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((2, SIZE, SIZE, 1), np.float32)
    masks[0, :, : SIZE // 2] = 1.0
    masks[1, 4:12, 2:10] = 0.8
    return images, masks


def test_text_to_image_with_prompts_2_matches_diffusers(pipes, torch):
    noise = noise_nhwc(5)
    theirs = pipes["theirs"]["base"](prompt=PROMPTS, prompt_2=PROMPTS_2, negative_prompt=NEGATIVE,
                                     negative_prompt_2=NEGATIVE_2, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                     latents=nchw(torch, noise), height=SIZE, width=SIZE, output_type="np").images  # fmt: skip
    common = dict(negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="euler", latents=noise,
                  output_type="float")  # fmt: skip
    ours = pipes["ours"]["base"].text_to_image(PROMPTS, prompts_2=PROMPTS_2, negative_prompts_2=NEGATIVE_2, **common)
    assert_close(ours, theirs)
    assert np.abs(pipes["ours"]["base"].text_to_image(PROMPTS, **common) - theirs).max() > 1e-3  # prompt_2 matters


def test_image_to_image_with_prompts_2_matches_diffusers(pipes, torch):
    images, _ = images_and_masks()
    theirs = pipes["theirs"]["base_img2img"](prompt=PROMPTS, prompt_2=PROMPTS_2, image=images, strength=0.6,
                                             num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                             generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    ours = pipes["ours"]["base"].image_to_image(images, PROMPTS, prompts_2=PROMPTS_2, strength=0.6, steps=STEPS,
                                                guidance=GUIDANCE, sampler="euler", latents=diffusers_noise(torch, 1),
                                                output_type="float")  # fmt: skip
    assert_close(ours, theirs)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("which", ["base", "inpainting"], ids=["4-channel", "9-channel"])
def test_inpaint_matches_diffusers(pipes, torch, which, strength):
    """strength 1: from given noise; strength 0.6: from the image noised with diffusers' second draw (the first
    encodes the image). With prompts_2, negative prompts (both encoders) and micro-conditioning."""
    images, masks = images_and_masks()
    noise = noise_nhwc(3) if strength == 1.0 else diffusers_noise(torch, 1)
    theirs = pipes["theirs"]["base_inpaint" if which == "base" else which](
        prompt=PROMPTS, prompt_2=PROMPTS_2, negative_prompt=NEGATIVE, image=images, mask_image=masks, height=SIZE,
        width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, strength=strength,
        latents=nchw(torch, noise) if strength == 1.0 else None, generator=torch.Generator().manual_seed(0),
        output_type="np", **MICRO).images  # fmt: skip
    ours = pipes["ours"][which].inpaint(images, masks, PROMPTS, prompts_2=PROMPTS_2, negative_prompts=NEGATIVE,
                                        strength=strength, steps=STEPS, guidance=GUIDANCE, sampler="euler",
                                        latents=noise, output_type="float", **MICRO)  # fmt: skip
    assert_close(ours, theirs)


@pytest.mark.parametrize("which", ["base", "inpainting"], ids=["4-channel", "9-channel"])
def test_inpaint_denoising_end_matches_diffusers(pipes, torch, which):
    """Leading steps 801, 601, 401, 201, 1; strength 0.6 keeps the last 3, denoising_end 0.8 (training step 200)
    stops after 401 and 201: the latents, with the clean image latents outside the mask (4-channel)."""
    images, masks = images_and_masks()
    theirs = pipes["theirs"]["base_inpaint" if which == "base" else which](
        prompt=PROMPTS, negative_prompt=NEGATIVE, image=images, mask_image=masks, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, strength=0.6, denoising_end=0.8, guidance_rescale=0.5,
        generator=torch.Generator().manual_seed(0), output_type="latent").images.numpy().transpose(0, 2, 3, 1)  # fmt: skip
    ours = pipes["ours"][which].inpaint(images, masks, PROMPTS, negative_prompts=NEGATIVE, strength=0.6, steps=STEPS,
                                        guidance=GUIDANCE, sampler="euler", latents=diffusers_noise(torch, 1),
                                        denoising_end=0.8, guidance_rescale=0.5, output_type="latent")  # fmt: skip
    assert np.std(theirs) > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_refiner_refuses_prompts_2(pipes):
    with pytest.raises(UsageError, match=r"prompts_2 is what SDXL's second text encoder reads; a refiner's only"):
        pipes["ours"]["refiner"].image_to_image(np.zeros((1, SIZE, SIZE, 3)), "a", strength=0.5, prompts_2="b")


def test_cli_prompt_2_and_mask(pipes, tmp_path, capsys):
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.cli import main

    folder = pipes["folder"]
    flags = ["--prompt", "hello the cat", "--num", "2", "--steps", "3", "--seed", "4", "--sampler", "euler"]
    more = ["--prompt-2", "a dog", "--negative-prompt", "the", "--negative-prompt-2", "cat cat"]
    out = tmp_path / "t2i.png"
    assert main(["sample", "--pretrained", str(folder / "base"), *flags, *more, "--out", str(out)]) == 0
    expected = pipes["ours"]["base"].text_to_image(["hello the cat"] * 2, prompts_2=["a dog"] * 2,
                                                   negative_prompts=["the"] * 2, negative_prompts_2=["cat cat"] * 2,
                                                   steps=3, seed=4, sampler="euler")  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
    init, mask = images_and_masks()
    Image.fromarray((init[0] * 255).round().astype(np.uint8)).save(tmp_path / "init.png")
    Image.fromarray((mask[0, ..., 0] * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    masked = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    assert main(["sample", "--pretrained", str(folder / "inpainting"), *flags, *masked, "--prompt-2", "a dog",
                 "--out", str(out)]) == 0  # fmt: skip
    pixels = np.repeat(np.asarray(Image.open(tmp_path / "init.png"))[None], 2, 0)
    expected = pipes["ours"]["inpainting"].inpaint(pixels, np.repeat(mask[:1], 2, 0), ["hello the cat"] * 2,
                                                   prompts_2=["a dog"] * 2, steps=3, seed=4, sampler="euler")  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
    bad = {(str(folder / "refiner"), *masked, "--prompt-2", "x"): "--prompt-2: the prompts of SDXL's second text "
                                                                   "encoder; an SDXL refiner's only text encoder",
           (str(tmp_path), "--negative-prompt-2", "x"): "--negative-prompt-2: the prompts of SDXL's second"}  # fmt: skip
    for (pretrained, *rest), message in bad.items():
        capsys.readouterr()
        assert main(["sample", "--pretrained", pretrained, *flags, *rest, "--out", str(tmp_path / "bad.png")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line
    assert not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------- original single files


def original_sdxl_tensors(pipe, single_file_utils, torch):
    """The sgm single file of a diffusers SDXL pipeline (base: CLIP-L and bigG; refiner: bigG only), names
    mapped back from diffusers'; the OpenCLIP part checked against diffusers' own converter."""
    from tests.test_stable_diffusion import original_vae_name
    from tests.test_unet_xl import original_unet_names

    state = {name: {k: v.detach().numpy().copy() for k, v in getattr(pipe, name).state_dict().items()}
             for name in ("unet", "vae", "text_encoder_2")}  # fmt: skip
    tensors = {original: state["unet"][name] for name, original in
               original_unet_names(state["unet"], pipe.unet.config).items()}  # fmt: skip
    for name, value in state["vae"].items():
        original, conv = original_vae_name(name, len(pipe.vae.config.block_out_channels))
        tensors[original] = value.reshape(*value.shape, 1, 1) if conv else value
    if pipe.text_encoder is not None:
        clip = pipe.text_encoder.state_dict()  # named under `text_model.`, as the release (and transformers of its time)
        tensors.update({"conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.")
                        + k: v.numpy().copy() for k, v in clip.items()})  # fmt: skip
        tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    prefix = "conditioner.embedders.1.model." if pipe.text_encoder is not None else "conditioner.embedders.0.model."
    renames = [("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
               ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
               ("text_model.final_layer_norm.", "ln_final."), ("text_model.encoder.layers.", "transformer.resblocks."),
               ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
               ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]  # fmt: skip
    bigg = {}
    for name, value in state["text_encoder_2"].items():
        if name == "text_projection.weight":
            bigg[prefix + "text_projection"] = value.T.copy()  # applied as x @ P
            continue
        if "self_attn." in name and "_proj." in name and "out_proj" not in name:
            continue
        for new, old in renames:
            name = name.replace(new, old)
        bigg[prefix + name] = value
    for i in range(CLIP_G["num_hidden_layers"]):
        for leaf in ("weight", "bias"):
            fused = [state["text_encoder_2"][f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            bigg[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate(fused)
    bigg[prefix + "logit_scale"] = np.array(4.6, np.float32)
    back = single_file_utils.convert_open_clip_checkpoint(
        pipe.text_encoder_2, {k: torch.from_numpy(v) for k, v in bigg.items()}, prefix=prefix)
    assert sorted(back) == sorted(state["text_encoder_2"])
    for key, value in back.items():
        np.testing.assert_array_equal(value.numpy(), state["text_encoder_2"][key], err_msg=key)
    return {**tensors, **bigg}


@pytest.fixture(scope="module")
def single_files(pipes, torch, tmp_path_factory):
    """base.safetensors and refiner.safetensors in the sgm layout, written from the diffusers pipelines."""
    import safetensors.numpy

    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    folder = tmp_path_factory.mktemp("single")
    for name in ("base", "refiner"):
        tensors = original_sdxl_tensors(pipes["theirs"][name], single_file_utils, torch)
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, folder / f"{name}.safetensors")
    return folder


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_single_file_equals_the_folder(pipes, single_files, name):
    import flax.traverse_util

    ours = LatentPipeline.from_pretrained(single_files / f"{name}.safetensors", config_folder=pipes["folder"] / name)
    folder = pipes["ours"][name]
    assert ours.model.pipeline_class == folder.model.pipeline_class
    assert ours.model.requires_aesthetics_score == folder.model.requires_aesthetics_score
    flat, reference = (flax.traverse_util.flatten_dict(p) for p in (ours.params, folder.params))
    assert sorted(flat) == sorted(reference)
    for path, value in reference.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(value), err_msg="/".join(path))
    run = dict(steps=2, seed=1, sampler="euler", output_type="float")
    if name == "base":
        np.testing.assert_array_equal(ours.text_to_image(PROMPTS, **run), folder.text_to_image(PROMPTS, **run))
    else:
        images, _ = images_and_masks()
        np.testing.assert_array_equal(ours.image_to_image(images, PROMPTS, strength=0.5, **run),
                                      folder.image_to_image(images, PROMPTS, strength=0.5, **run))  # fmt: skip


def test_single_file_lists_every_problem_and_refusals(pipes, single_files, tmp_path):
    import safetensors.numpy

    from jaxdiff.errors import WeightsError
    from jaxdiff.sampling.pipeline import Pipeline

    tensors = safetensors.numpy.load_file(single_files / "base.safetensors")
    del tensors["model.diffusion_model.label_emb.0.2.weight"]
    del tensors["conditioner.embedders.1.model.text_projection"]
    tensors["conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"] = np.zeros(3, np.float32)
    tensors["conditioner.embedders.2.model.made_up"] = np.zeros(1, np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError) as error:
        LatentPipeline.from_pretrained(tmp_path / "broken.safetensors", config_folder=pipes["folder"] / "base")
    message = str(error.value)
    for part in ("add_embedding.linear_2.weight", "text_projection.weight", "conditioner.embedders.2.model.made_up",
                 "text_model.final_layer_norm.bias: shape (3,), expected (32,)"):  # fmt: skip
        assert part in message, message
    with pytest.raises(WeightsError, match=r"does not fit the models"):  # a refiner file with a base folder
        LatentPipeline.from_pretrained(single_files / "refiner.safetensors", config_folder=pipes["folder"] / "base")
    with pytest.raises(UsageError, match=r"scheduler='sd2': an SDXL single file takes its config_folder's scheduler"):
        LatentPipeline.from_pretrained(single_files / "base.safetensors", config_folder=pipes["folder"] / "base",
                                       scheduler="sd2")  # fmt: skip
    with pytest.raises(UsageError, match=r"a single-file checkpoint needs config_folder"):
        Pipeline.from_pretrained(single_files / "base.safetensors")


def test_cli_samples_an_sdxl_single_file(pipes, single_files, tmp_path):
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.cli import main

    out = tmp_path / "single.png"
    assert main(["sample", "--pretrained", str(single_files / "base.safetensors"), "--config-folder",
                 str(pipes["folder"] / "base"), "--prompt", "hello the cat", "--prompt-2", "a dog", "--num", "1",
                 "--steps", "2", "--seed", "3", "--sampler", "euler", "--out", str(out)]) == 0  # fmt: skip
    expected = pipes["ours"]["base"].text_to_image(["hello the cat"], prompts_2=["a dog"], steps=2, seed=3,
                                                   sampler="euler")  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
