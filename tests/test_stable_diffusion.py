"""Stable Diffusion end to end against diffusers' pipelines on tiny random models saved by diffusers/transformers:
text-to-image, image-to-image and inpainting (9-channel and latent blending) from the same noise; the
folder reader's and the pipeline's checks of bad input."""

import json
import shutil

import flax.traverse_util
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff.convert.stable_diffusion_export import write_stable_diffusion
from jaxdiff.latent.stable_diffusion import (
    SCHEDULER_PRESETS,
    is_stable_diffusion,
    read_single_file,
    read_stable_diffusion,
)
from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.latent.pipeline import LatentPipeline
from jaxdiff.latent.schedulers import add_noise, visited_timesteps
from tests.test_clip_text import write_tokenizer_folder

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

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


def diffusers_noise(draw, shape=(2, 4, SIZE // 2, SIZE // 2)):
    """NHWC: the `draw`-th normal tensor diffusers draws from a generator seeded 0 (each posterior sample of the
    autoencoder takes one, as does the initial noise)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(draw):
        torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator).numpy().transpose(0, 2, 3, 1)


def test_image_to_image_matches_diffusers(tmp_path):
    parts = components(folder=tmp_path)
    pipe = save(diffusers.StableDiffusionImg2ImgPipeline, parts, tmp_path / "pipe")
    images, strength, noise = random_images(1), 0.6, diffusers_noise(1)  # after the posterior sample's draw
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


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("unet_settings", [dict(UNET_SD1, in_channels=9), UNET_SD1], ids=["9-channel", "blending"])
def test_inpainting_matches_diffusers(tmp_path, unet_settings, strength):
    """strength 1: from given noise; strength 0.6: from the image noised with diffusers' second draw (the first
    encodes the image)."""
    pipe = save(diffusers.StableDiffusionInpaintPipeline, components(unet_settings=unet_settings, folder=tmp_path),
                tmp_path / "pipe")  # fmt: skip
    images, masks = random_images(2), half_masks()
    noise = random_noise(3) if strength == 1.0 else diffusers_noise(1)
    theirs = pipe(prompt=PROMPTS, image=images, mask_image=masks, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, strength=strength,
                  latents=nchw(noise) if strength == 1.0 else None, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # fmt: skip
    ours = LatentPipeline.from_pretrained(tmp_path / "pipe").inpaint(
        images, masks, PROMPTS, strength=strength, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
        latents=noise, output_type="float",
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


def test_sdxl_unet_in_an_sd_folder_is_refused(sd1, tmp_path):
    shutil.copytree(sd1[1], tmp_path / "pipe")
    config_file = tmp_path / "pipe" / "unet" / "config.json"
    settings = json.loads(config_file.read_text())
    settings.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=2816)
    config_file.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"addition_embed_type='text_time'; a StableDiffusionPipeline U-Net has none"):
        LatentPipeline.from_pretrained(tmp_path / "pipe")


def test_other_pipelines_and_mismatched_components_are_refused(sd1, tmp_path):
    shutil.copytree(sd1[1], tmp_path / "pipe")
    index_file = tmp_path / "pipe" / "model_index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps(dict(index, _class_name="StableDiffusionControlNetPipeline")))
    with pytest.raises(ValueError, match=r"_class_name='StableDiffusionControlNetPipeline'; supported pipelines: "):
        LatentPipeline.from_pretrained(tmp_path / "pipe")
    index_file.write_text(json.dumps(index))
    config_file = tmp_path / "pipe" / "unet" / "config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), cross_attention_dim=24)))
    with pytest.raises(ValueError, match=r"hidden_size=32 but the unet's cross_attention_dim=24"):
        read_stable_diffusion(tmp_path / "pipe")


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "v1-5-pruned.ckpt"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"v1-5-pruned.ckpt is a pickle .*v1-5-pruned.safetensors"):
        LatentPipeline.from_pretrained(path)


def test_batch_guard_and_unknown_sampler(loaded):
    with pytest.raises(ValueError, match=r"1 negative_prompts for 2 prompts"):
        loaded.text_to_image(PROMPTS, negative_prompts=["x"], steps=2)
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'"):
        loaded.text_to_image(PROMPTS, sampler="plms", steps=2)
    with pytest.raises(ValueError, match=r"^seed='1' must be an int$"):
        loaded.text_to_image(PROMPTS, seed="1", steps=2)
    with pytest.raises(ValueError, match=r"^guidance=-1 must be a number in \[0.0, inf\]$"):
        loaded.text_to_image(PROMPTS, guidance=-1, steps=2)
    with pytest.raises(ValueError, match=r"^steps=0 must be an int in \[1, 1000\]$"):
        loaded.text_to_image(PROMPTS, steps=0)
    with pytest.raises(ValueError, match=r"1 images for 2 prompts"):
        loaded.image_to_image(random_images(0)[:1], PROMPTS, strength=0.5, steps=2)


# --------------------------------------------------------------------------- single-file checkpoints
# The original (LDM / OpenCLIP) names of diffusers' tensors, written from diffusers' conversion tables in
# diffusers.loaders.single_file_utils; each mapping is checked by converting back with diffusers' own converters.

RESNET_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def original_unet_name(name, settings):
    per_block = settings["layers_per_block"] + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    module, leaf = name.rsplit(".", 1)
    if module in fixed:
        return f"model.diffusion_model.{fixed[module]}.{leaf}"
    parts = name.split(".")
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        rest = ".".join(parts[3:])
        rest = RESNET_ORIGINAL.get(parts[3], parts[3]) + "." + ".".join(parts[4:]) if parts[1] == "resnets" else rest
        return f"model.diffusion_model.middle_block.{index}.{rest}"
    block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"model.diffusion_model.input_blocks.{(block + 1) * per_block}.0.op.{'.'.join(parts[5:])}"
        index, place = 1 + block * per_block + j, "input_blocks"
    else:
        if kind == "upsamplers":
            layer = 2 if settings["up_block_types"][block].startswith("CrossAttn") else 1
            return f"model.diffusion_model.output_blocks.{block * per_block + per_block - 1}.{layer}.{rest}"
        index, place = block * per_block + j, "output_blocks"
    if kind == "resnets":
        return f"model.diffusion_model.{place}.{index}.0.{RESNET_ORIGINAL[parts[4]]}.{'.'.join(parts[5:])}"
    return f"model.diffusion_model.{place}.{index}.1.{rest}"


def original_vae_name(name, levels):
    """(original name, whether the tensor is a 1×1 conv there) of a diffusers AutoencoderKL tensor."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    coder, rest = name.split(".", 1)
    if coder in ("quant_conv", "post_quant_conv"):
        return f"first_stage_model.{name}", False
    rest = rest.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    rest = rest.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    for new, old in attention.items():
        if rest.startswith(f"mid_block.attentions.0.{new}."):
            leaf = rest.rsplit(".", 1)[1]
            return f"first_stage_model.{coder}.mid.attn_1.{old}.{leaf}", old != "norm" and leaf == "weight"
    parts = rest.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        level = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
        kind = {"resnets": "block", "downsamplers": "downsample", "upsamplers": "upsample"}[parts[2]]
        tail = parts[3:] if kind == "block" else parts[4:]
        rest = ".".join([parts[0].split("_")[0], str(level), kind, *tail])
    return f"first_stage_model.{coder}.{rest}", False


def original_openclip_tensors(state, layers):
    """OpenCLIP names of a transformers CLIP text model's tensors (q, k, v fused), plus an unused last layer,
    projection and logit scale as in SD 2.x checkpoints."""
    out, prefix = {}, "cond_stage_model.model."
    renames = [("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
               ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
               ("text_model.final_layer_norm.", "ln_final."), ("text_model.encoder.layers.", "transformer.resblocks."),
               ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
               ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]  # fmt: skip
    for name, value in state.items():
        if "_proj." in name and "self_attn." in name and "out_proj" not in name:
            continue
        for new, old in renames:
            name = name.replace(new, old)
        out[prefix + name] = value
    for i in range(layers):
        attention = f"text_model.encoder.layers.{i}.self_attn."
        for leaf in ("weight", "bias"):
            fused = np.concatenate([state[f"{attention}{p}_proj.{leaf}"] for p in "qkv"])
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{leaf}"] = fused
    for name, value in list(out.items()):
        if f"resblocks.{layers - 1}." in name:  # SD 2.x pipelines drop OpenCLIP's last layer
            out[name.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}.")] = value + 1.0
    hidden = CLIP["hidden_size"]
    out[prefix + "text_projection"] = np.eye(hidden, dtype=np.float32)
    out[prefix + "logit_scale"] = np.array(4.6, np.float32)
    return out


def write_single_file(pipe, path, *, openclip):
    numpy_state = {name: {k: v.detach().numpy().copy() for k, v in getattr(pipe, name).state_dict().items()}
                   for name in ("unet", "vae", "text_encoder")}  # fmt: skip
    # checkpoints name CLIP's tensors as the transformers versions of their time did: under `text_model.`
    numpy_state["text_encoder"] = {k if k.startswith("text_model.") else "text_model." + k: v
                                   for k, v in numpy_state["text_encoder"].items()}  # fmt: skip
    unet = {original_unet_name(k, pipe.unet.config): v for k, v in numpy_state["unet"].items()}
    levels = len(pipe.vae.config.block_out_channels)
    vae = {}
    for k, v in numpy_state["vae"].items():
        name, conv = original_vae_name(k, levels)
        vae[name] = v.reshape(*v.shape, 1, 1) if conv else v
    if openclip:
        text = original_openclip_tensors(numpy_state["text_encoder"], CLIP["num_hidden_layers"])
    else:
        text = {"cond_stage_model.transformer." + k: v for k, v in numpy_state["text_encoder"].items()}
    tensors = {**unet, **vae, **text, "alphas_cumprod": np.ones(1000, np.float32)}
    # our mapping, converted back by diffusers' own converters, gives diffusers' state dicts
    as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    back = {"unet": single_file_utils.convert_ldm_unet_checkpoint(as_torch, pipe.unet.config),
            "vae": single_file_utils.convert_ldm_vae_checkpoint(as_torch, pipe.vae.config)}  # fmt: skip
    for name, converted in back.items():
        assert sorted(converted) == sorted(numpy_state[name]), name
        for key, value in converted.items():
            np.testing.assert_array_equal(value.numpy(), numpy_state[name][key], err_msg=key)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


def assert_same_trees(ours, reference):
    ours, reference = flax.traverse_util.flatten_dict(ours), flax.traverse_util.flatten_dict(reference)
    assert sorted(ours) == sorted(reference)
    for path, value in reference.items():
        np.testing.assert_array_equal(ours[path], value, err_msg="/".join(path))


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_single_file_equals_the_folder(tmp_path, family):
    settings = UNET_SD1 if family == "sd1" else UNET_SD2
    parts = components(unet_settings=settings, scheduler=SCHEDULER_PRESETS[family], folder=tmp_path, seed=7)
    pipe = save(diffusers.StableDiffusionPipeline, parts, tmp_path / "pipe")
    write_single_file(pipe, tmp_path / "model.safetensors", openclip=family != "sd1")
    folder_model = read_stable_diffusion(tmp_path / "pipe")
    single = read_single_file(tmp_path / "model.safetensors", config_folder=tmp_path / "pipe", scheduler=family)
    for part in ("unet_params", "vae_params", "text_params"):
        assert_same_trees(getattr(single, part), getattr(folder_model, part))
    assert single.scheduler.mean_type == ("eps" if family == "sd1" else "v")
    run = dict(steps=2, seed=1, output_type="float")
    from_file = LatentPipeline.from_pretrained(tmp_path / "model.safetensors", config_folder=tmp_path / "pipe",
                                               scheduler=family)  # fmt: skip
    np.testing.assert_array_equal(from_file.text_to_image(PROMPTS, **run),
                                  LatentPipeline(folder_model).text_to_image(PROMPTS, **run))  # fmt: skip


def test_single_file_lists_every_missing_and_unexpected_tensor(sd1, tmp_path):
    pipe, folder = sd1
    write_single_file(pipe, tmp_path / "model.safetensors", openclip=False)
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    del tensors["model.diffusion_model.out.2.weight"]
    tensors["first_stage_model.encoder.mid.attn_1.q.bias"] = np.zeros(3, np.float32)
    tensors["model.diffusion_model.made_up.weight"] = np.zeros(1, np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError) as error:
        read_single_file(tmp_path / "broken.safetensors", config_folder=folder)
    message = str(error.value)
    assert "conv_out.weight" in message and "model.diffusion_model.made_up.weight" in message
    assert "encoder.mid_block.attentions.0.to_q.bias: shape (3,), expected (16,)" in message
    with pytest.raises(ValueError, match=r"unknown scheduler preset 'sd3'"):
        read_single_file(tmp_path / "model.safetensors", config_folder=folder, scheduler="sd3")
    with pytest.raises(ValueError, match=r"model.ckpt is a pickle .*\(model.safetensors\)"):
        read_single_file(tmp_path / "model.ckpt", config_folder=folder)
    with pytest.raises(ValueError, match=r"needs config_folder"):
        LatentPipeline.from_pretrained(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"^variant='fp16': .*model.safetensors is a single file, which has no"):
        LatentPipeline.from_pretrained(tmp_path / "model.safetensors", config_folder=folder, variant="fp16")


def test_stable_diffusion_sources_are_recognised(sd1, tmp_path):
    pipe, folder = sd1
    write_single_file(pipe, tmp_path / "model.safetensors", openclip=False)
    assert is_stable_diffusion(folder) and is_stable_diffusion(tmp_path / "model.safetensors")
    assert not is_stable_diffusion(folder / "unet") and not is_stable_diffusion(folder / "unet" / "config.json")
    assert not is_stable_diffusion(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_bfloat16_variant_folder(sd1, tmp_path):
    """A `bf16` variant (which safetensors' NumPy reader cannot read) gives the float32 weights rounded to bf16."""
    pipe, folder = sd1
    shutil.copytree(folder, tmp_path / "pipe")
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        stem = "model" if name == "text_encoder" else "diffusion_pytorch_model"
        state = {k: v.to(torch.bfloat16).contiguous() for k, v in module.state_dict().items()}
        safetensors_torch.save_file(state, tmp_path / "pipe" / name / f"{stem}.bf16.safetensors")
    ours = read_stable_diffusion(tmp_path / "pipe", variant="bf16")
    reference = read_stable_diffusion(folder)
    for part in ("unet_params", "vae_params", "text_params"):
        flat, expected = (flax.traverse_util.flatten_dict(getattr(m, part)) for m in (ours, reference))
        for path, value in expected.items():
            rounded = value.astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(flat[path], rounded, err_msg="/".join(path))


def test_bfloat16_pipeline_holds_bfloat16_weights_and_is_as_close_as_diffusers_bfloat16(sd1):
    """`dtype="bfloat16"` rounds every weight to bfloat16 as it is read (half the memory, no float32 copy) and
    computes in bfloat16: its images are as far from float32 diffusers' as diffusers' own bfloat16 pipeline's."""
    from jaxdiff import Pipeline

    pipe, folder = sd1
    ours = Pipeline.from_pretrained(folder, dtype="bfloat16")
    reference = read_stable_diffusion(folder)
    for part in ("unet_params", "vae_params", "text_params"):
        flat, expected = (flax.traverse_util.flatten_dict(getattr(m, part)) for m in (ours.model, reference))
        for path, value in expected.items():
            assert flat[path].dtype == ml_dtypes.bfloat16, "/".join(path)
            np.testing.assert_array_equal(np.asarray(flat[path]).view(np.uint16),
                                          value.astype(ml_dtypes.bfloat16).view(np.uint16), err_msg="/".join(path))
    noise = random_noise(0)
    settings = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    height=SIZE, width=SIZE, output_type="np")  # fmt: skip
    exact = pipe(latents=nchw(noise), **settings).images
    half = diffusers.StableDiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16, safety_checker=None)
    half.set_progress_bar_config(disable=True)
    theirs = half(latents=nchw(noise).to(torch.bfloat16), **settings).images
    images = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, latents=noise,
                                output_type="float")  # fmt: skip
    ours_error, their_error = np.abs(images - exact).mean(), np.abs(theirs - exact).mean()
    assert 1e-4 < ours_error < 1.25 * their_error  # measured 0.0072 against diffusers' 0.0077
    assert np.abs(images - exact).max() < 0.1


# --------------------------------------------------------------------------- Pipeline.from_pretrained and the CLI


def test_pipeline_from_pretrained_gives_the_latent_pipeline(sd1):
    from jaxdiff import Pipeline

    assert isinstance(Pipeline.from_pretrained(sd1[1]), LatentPipeline)


def test_cli_samples_text_to_image_image_to_image_and_inpainting(sd1, tmp_path, capsys):
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.cli import main

    folder, pipe = str(sd1[1]), LatentPipeline.from_pretrained(sd1[1])
    init = (random_images(5)[0] * 255).round().astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, :8] = 255
    Image.fromarray(init).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = ["sample", "--pretrained", folder, "--prompt", "hello the cat", "--negative-prompt", "cat", "--num", "2",
            "--steps", "3", "--seed", "4"]  # fmt: skip
    settings = dict(negative_prompts=["cat"] * 2, steps=3, seed=4)
    runs = {
        "t2i": ([], pipe.text_to_image(["hello the cat"] * 2, **settings)),
        "i2i": (["--init-image", str(tmp_path / "init.png"), "--strength", "0.7"],
                pipe.image_to_image([init] * 2, ["hello the cat"] * 2, strength=0.7, **settings)),
        "inpaint": (["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")],
                    pipe.inpaint([init] * 2, [mask] * 2, ["hello the cat"] * 2, **settings)),
    }  # fmt: skip
    for name, (flags, expected) in runs.items():
        out = tmp_path / f"{name}.png"
        assert main([*base, *flags, "--out", str(out)]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected), err_msg=name)
    assert capsys.readouterr().out.splitlines()[-1] == f"2 images -> {tmp_path / 'inpaint.png'}"

    bad = {
        ("--height", "12"): "height=12 must be a positive multiple of 8",
        ("--init-image", str(tmp_path / "init.png"), "--strength", "1.5"): "strength=1.5 must be a number in",
        ("--mask", str(tmp_path / "mask.png")): "--mask and --strength need --init-image",
        ("--init-image", str(tmp_path / "missing.png")): "--init-image",
    }
    for flags, message in bad.items():
        capsys.readouterr()
        assert main([*base, *flags, "--out", str(tmp_path / "bad.png")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line
    assert not (tmp_path / "bad.png").exists()
