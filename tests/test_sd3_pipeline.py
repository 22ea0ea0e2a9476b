"""SD3 end to end against diffusers' `StableDiffusion3Pipeline`, `StableDiffusion3Img2ImgPipeline` and
`StableDiffusion3InpaintPipeline` on a tiny random folder saved by diffusers/transformers (two CLIP encoders with
projection of different widths, so the CLIP context is zero-padded to the T5 width; a T5 encoder; a 16-channel
autoencoder with shift_factor; FlowMatchEulerDiscreteScheduler with shift 3): text-to-image with guidance and negative
prompts and clip_skip, a folder without text_encoder_3, image-to-image, inpainting. Torch-free: the scheduler's levels
against a float64 NumPy reference of diffusers' formulas, the scheduler config's refusals, and the pipeline's
refusals on a model initialised in JAX."""

from __future__ import annotations

import json
import math

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.component_weights import param_shapes
from jaxdiff.latent.flow_pipeline import FlowModels
from jaxdiff.latent.flow_scheduler import (
    FlowMatchSettings,
    flow_match_settings,
    network_timesteps,
    run_sigmas,
    strength_start,
)
from jaxdiff.latent.sd3 import SD3Pipeline
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.mmdit import create_mmdit, example_inputs, mmdit_config
from jaxdiff.models.t5_encoder import create_t5_encoder, t5_encoder_config
from tests.test_t5_encoder import TINY as T5, write_t5_tokenizer_json

TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=T5["d_model"], caption_projection_dim=16, pooled_projection_dim=16, out_channels=16,
    pos_embed_max_size=8,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, latent_channels=16,
    norm_num_groups=4, sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)  # fmt: skip
CLIP_L = dict(
    vocab_size=526, hidden_size=12, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=8, bos_token_id=524, eos_token_id=525, pad_token_id=525,
)  # fmt: skip
CLIP_G = dict(CLIP_L, hidden_size=16, num_attention_heads=4, hidden_act="gelu", pad_token_id=0)  # 12 + 16 < 32
SCHEDULER = dict(shift=3.0)
PROMPTS = ["a photo of cat", "the dog in space!"]
NEGATIVE = ["", "the cat"]
STEPS, GUIDANCE, SIZE, T5_LENGTH = 4, 5.0, 16, 8
TOLERANCE = 1e-4  # on float images in [0, 1]


# --------------------------------------------------------------------------- torch-free: the scheduler's levels


def reference_sigmas(steps, *, n=1000, shift=1.0, mu=None, linear=False, terminal=None, flux=False):
    """float64 NumPy of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps (+ the final 0), written from its
    formulas: σ_min of the constructor's shifted table, linspace(σ_max·n, σ_min·n)/n (or Flux's linspace(1, 1/steps)),
    the constant shift or the time shift at μ, the terminal stretch."""
    table = np.arange(n, 0, -1, dtype=np.float64) / n
    if mu is None:
        table = shift * table / (1 + (shift - 1) * table)
    base = np.linspace(1.0, 1.0 / steps, steps) if flux else np.linspace(table[0] * n, table[-1] * n, steps) / n
    if mu is None:
        levels = shift * base / (1 + (shift - 1) * base)
    elif linear:
        levels = mu / (mu + (1 / base - 1))
    else:
        levels = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    if terminal is not None:
        levels = 1 - (1 - levels) / ((1 - levels[-1]) / (1 - terminal))
    return np.append(levels, 0.0)


@pytest.mark.parametrize("case", ["sd3", "flux_dynamic", "linear_terminal"])
def test_levels_match_float64_reference(case):
    steps, seq = 7, 1024
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    if case == "sd3":
        settings, own, want = FlowMatchSettings(shift=3.0), None, reference_sigmas(steps, shift=3.0)
    elif case == "flux_dynamic":
        settings = FlowMatchSettings(shift=3.0, use_dynamic_shifting=True)
        own, want = np.linspace(1.0, 1.0 / steps, steps), reference_sigmas(steps, mu=mu, flux=True)
    else:
        settings = FlowMatchSettings(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1)
        own, want = None, reference_sigmas(steps, mu=mu, linear=True, terminal=0.1)
    got = run_sigmas(settings, steps, image_seq_len=seq, sigmas=own)
    assert got.dtype == np.float32 and got[-1] == 0.0
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)
    np.testing.assert_array_equal(network_timesteps(settings, got[:-1]), got[:-1] * np.float32(1000))
    assert got[0] == 1.0 and np.all(np.diff(got) < 0)


def test_strength_runs_the_last_steps():
    """diffusers' int(steps − steps·strength): 0.15 of 10 runs 2 steps, 0.05 still 1."""
    assert [strength_start(10, s) for s in (1.0, 0.6, 0.15, 0.1, 0.05, 1e-9)] == [0, 4, 8, 9, 9, 9]
    assert strength_start(3, 0.7) == 0  # int(0.9000000000000004)


@pytest.mark.parametrize("config, match", [
    (dict(foo=1), r"unknown key foo=1 for FlowMatchEulerDiscreteScheduler"),
    (dict(invert_sigmas=True), r"unsupported setting invert_sigmas=True"),
    (dict(use_karras_sigmas=True), r"unsupported setting use_karras_sigmas=True"),
    (dict(stochastic_sampling=True), r"unsupported setting stochastic_sampling=True"),
    (dict(time_shift_type="cubic"), r"time_shift_type='cubic' must be one of"),
    (dict(shift=0), r"shift=0 must be a number > 0"),
    (dict(use_dynamic_shifting=True, base_shift=None), r"base_shift=None must be a number"),
    (dict(_class_name="EulerDiscreteScheduler"), r"_class_name='EulerDiscreteScheduler'"),
])  # fmt: skip
def test_scheduler_config_refusals(config, match):
    with pytest.raises(WeightsError, match=match):
        flow_match_settings(config, "scheduler_config.json")


# --------------------------------------------------------------------------- torch-free: the pipeline's refusals


class WordTokenizer:
    """Prompts -> `length` ids, one per word (a stand-in for CLIP's and T5's tokenizers without files)."""

    def __init__(self, length):
        self.length = length

    def __call__(self, prompts, max_length=None):
        ids = np.zeros((len(prompts), max_length or self.length), np.int32)
        for row, prompt in enumerate(prompts):
            words = [sum(map(ord, word)) % 40 + 2 for word in prompt.split()][: ids.shape[1]]
            ids[row, : len(words)] = words
        return type("Tokenized", (), {"input_ids": ids})


def random_params(module, *args):
    """N(0, 0.1²) float32 parameters of `module` at inputs `args`, shapes traced without compiling its init."""
    rng = np.random.default_rng(0)
    shapes = param_shapes(module, *args)
    return flax.traverse_util.unflatten_dict({path: (0.1 * rng.standard_normal(shape)).astype(np.float32)
                                              for path, shape in shapes.items()})  # fmt: skip


def jax_models(pipeline_class, module, transformer_config, transformer_args, encoders, scheduler):
    """FlowModels of `module` (the transformer of `transformer_config`, initialised on `transformer_args`), the VAE
    and `encoders` (params key -> (config, kind)) initialised in JAX, with word tokenizers."""
    vae_config = autoencoder_config(VAE)
    ids = jnp.zeros((1, 4), jnp.int32)
    create = {"clip": create_clip_text, "t5": create_t5_encoder}
    return FlowModels(
        pipeline_class=pipeline_class, transformer_config=transformer_config,
        transformer_params=random_params(module, *transformer_args), vae_config=vae_config,
        vae_params=random_params(create_autoencoder(vae_config), jnp.zeros((1, SIZE, SIZE, 3))),
        encoders={key: (config, random_params(create[kind](config), ids)) for key, (config, kind) in encoders.items()},
        tokenizers={key: WordTokenizer(77) for key in encoders}, scheduler=scheduler,
    )  # fmt: skip


@pytest.fixture(scope="module")
def jax_sd3():
    return build_jax_sd3()


def build_jax_sd3() -> SD3Pipeline:
    """A tiny SD3 pipeline initialised in JAX (three text encoders, word tokenizers)."""
    with_projection = dict(architectures=["CLIPTextModelWithProjection"])
    encoders = {"text": (clip_text_config(dict(CLIP_L, **with_projection)), "clip"),
                "text_2": (clip_text_config(dict(CLIP_G, **with_projection)), "clip"),
                "text_3": (t5_encoder_config(dict(T5)), "t5")}  # fmt: skip
    config = mmdit_config(TRANSFORMER)
    module = create_mmdit(config)
    return SD3Pipeline(jax_models("StableDiffusion3Pipeline", module, config, example_inputs(module, size=2), encoders,
                                  FlowMatchSettings(shift=3.0)))  # fmt: skip


def test_offloaded_text_encoders_stay_on_the_host_and_change_nothing(jax_sd3):
    offloaded = SD3Pipeline(jax_sd3.model, offload_text_encoders=True)
    for key in ("text", "text_2", "text_3"):
        assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(offloaded.params[key])), key
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(offloaded.params["transformer"]))
    run = dict(steps=2, seed=3, height=SIZE, width=SIZE, max_sequence_length=T5_LENGTH, guidance=2.0)
    np.testing.assert_array_equal(offloaded.text_to_image(PROMPTS, **run), jax_sd3.text_to_image(PROMPTS, **run))
    with pytest.raises(UsageError, match="offload_text_encoders='yes' must be True or False"):
        SD3Pipeline(jax_sd3.model, offload_text_encoders="yes")


def test_text_to_image_is_reproducible_from_seed(jax_sd3):
    first = jax_sd3.text_to_image(PROMPTS, steps=2, seed=3, height=SIZE, width=SIZE, max_sequence_length=T5_LENGTH)
    again = jax_sd3.text_to_image(PROMPTS, steps=2, seed=3, height=SIZE, width=SIZE, max_sequence_length=T5_LENGTH)
    assert first.dtype == np.uint8 and first.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("call, match", [
    (lambda p: p.text_to_image("a", height=18), r"height=18 must be a positive multiple of 4"),
    (lambda p: p.text_to_image("a", guidance=1.0, negative_prompts=["b"]), r"negative_prompts need guidance > 1"),
    (lambda p: p.text_to_image(["a", "b"], negative_prompts=["c"]), r"1 negative_prompts for 2 prompts"),
    (lambda p: p.text_to_image("a", max_sequence_length=513), r"max_sequence_length=513 must be an int in 2..512"),
    (lambda p: p.text_to_image("a", clip_skip=3), r"clip_skip=3 must be an int in 0..2"),
    (lambda p: p.text_to_image("a", steps=0), r"steps=0 must be an int >= 1"),
    (lambda p: p.text_to_image("a", sampler="euler"), r"sampler='euler': an SD3 model steps as its folder's Flow"),
    (lambda p: p.text_to_image("a", latents=np.zeros((1, 4, 4, 16))), r"latents of shape \(1, 4, 4, 16\)"),
    (lambda p: p.image_to_image(np.zeros((1, 16, 16, 3)), "a", strength=1.5), r"strength=1.5 must be a number"),
    (lambda p: p.inpaint(np.zeros((1, 16, 16, 3)), np.zeros((1, 8, 8)), "a"), r"masks have shape \(1, 8, 8\)"),
    (lambda p: p.set_lora_scale(1.0), r"set_lora_scale\(\): no LoRA is loaded"),
    (lambda p: p.text_to_image("a", guidance=1.0, skip_guidance_layers=[1]), r"skip_guidance_layers need guidance > 1"),
    (lambda p: p.text_to_image("a", skip_guidance_layers=[5]), r"skip_layers=\[5\] must be a list of block indices"),
    (lambda p: p.text_to_image("a", skip_guidance_layers=[1], skip_layer_guidance_start=0.5,
                               skip_layer_guidance_stop=0.2), r"_stop=0.2 must be fractions of the run"),
])  # fmt: skip
def test_pipeline_refusals(jax_sd3, call, match):
    with pytest.raises(UsageError, match=match):
        call(jax_sd3)


# --------------------------------------------------------------------------- against diffusers


@pytest.fixture(scope="module")
def saved(tmp_path_factory, torch, diffusers):
    """diffusers' SD3 pipelines (with and without text_encoder_3) on tiny random components, and jaxdiff's of the
    saved folders."""
    transformers = pytest.importorskip("transformers")
    from tests.test_clip_text import write_tokenizer_folder
    from tests.test_stable_diffusion import randomized

    folder = tmp_path_factory.mktemp("sd3")
    vae = randomized(diffusers.AutoencoderKL(**VAE), 1)
    with torch.no_grad():  # log-variances at -30: a posterior sample is its mean (diffusers draws other noise)
        vae.encoder.conv_out.weight[16:] = 0.0
        vae.encoder.conv_out.bias[16:] = -30.0
    write_tokenizer_folder(folder / "clip_tokenizer", "<|endoftext|>")
    write_tokenizer_folder(folder / "clip_tokenizer_2", "!")
    write_t5_tokenizer_json(folder / "t5_tokenizer")
    clip = transformers.CLIPTextModelWithProjection
    parts = dict(
        transformer=randomized(diffusers.SD3Transformer2DModel(**TRANSFORMER), 0),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=randomized(clip(transformers.CLIPTextConfig(**CLIP_L)), 2),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "clip_tokenizer"),
        text_encoder_2=randomized(clip(transformers.CLIPTextConfig(**CLIP_G)), 3),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "clip_tokenizer_2"),
        text_encoder_3=randomized(transformers.T5EncoderModel(transformers.T5Config(**T5)), 4),
        tokenizer_3=transformers.T5TokenizerFast.from_pretrained(folder / "t5_tokenizer"),
    )  # fmt: skip
    pipes = {"full": diffusers.StableDiffusion3Pipeline(**parts),
             "no_t5": diffusers.StableDiffusion3Pipeline(**dict(parts, text_encoder_3=None, tokenizer_3=None)),
             "img2img": diffusers.StableDiffusion3Img2ImgPipeline(**parts),
             "inpaint": diffusers.StableDiffusion3InpaintPipeline(**parts)}  # fmt: skip
    for name in ("full", "no_t5"):
        pipes[name].save_pretrained(folder / name)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    ours = {name: SD3Pipeline.from_pretrained(folder / name) for name in ("full", "no_t5")}
    return dict(theirs=pipes, ours=ours, folder=folder, vae=vae)


def noise_nhwc(seed):
    return np.random.default_rng(seed).standard_normal((2, SIZE // 2, SIZE // 2, 16)).astype(np.float32)


def nchw(torch, array):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))


def diffusers_noise(torch, draw, shape=(2, 16, SIZE // 2, SIZE // 2)):
    """NHWC: the `draw`-th normal tensor diffusers draws from a generator seeded 0 (the autoencoder's posterior
    sample takes the first, the noise the next)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(draw):
        torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator).numpy().transpose(0, 2, 3, 1)


def assert_close(ours, theirs):
    assert ours.shape == theirs.shape
    assert np.std(theirs) > 0.01  # not a constant image
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


def half_masks():
    masks = np.zeros((2, SIZE, SIZE, 1), np.float32)
    masks[0, :, : SIZE // 2] = 1.0
    masks[1, 4:12, 2:10] = 0.8
    return masks


COMMON = dict(steps=STEPS, guidance=GUIDANCE, max_sequence_length=T5_LENGTH, output_type="float")
THEIRS = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=T5_LENGTH, output_type="np")


@pytest.mark.parametrize("folder", ["full", "no_t5"])
def test_text_to_image_matches_diffusers(saved, torch, folder):
    noise = noise_nhwc(0)
    theirs = saved["theirs"][folder](prompt=PROMPTS, negative_prompt=NEGATIVE, latents=nchw(torch, noise), height=SIZE,
                                     width=SIZE, clip_skip=1, **THEIRS).images  # fmt: skip
    ours = saved["ours"][folder].text_to_image(PROMPTS, negative_prompts=NEGATIVE, latents=noise, height=SIZE,
                                               width=SIZE, clip_skip=1, **COMMON)  # fmt: skip
    assert_close(ours, theirs)


def test_image_to_image_matches_diffusers(saved, torch):
    images = np.random.default_rng(1).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    theirs = saved["theirs"]["img2img"](prompt=PROMPTS, image=images, strength=0.6,
                                        generator=torch.Generator().manual_seed(0), **THEIRS).images  # fmt: skip
    ours = saved["ours"]["full"].image_to_image(images, PROMPTS, strength=0.6, latents=diffusers_noise(torch, 1),
                                                **COMMON)  # fmt: skip
    assert_close(ours, theirs)


def test_inpaint_matches_diffusers(saved, torch):
    """diffusers' SD3 inpainting pipeline decodes z/scaling_factor without shift_factor; jaxdiff decodes as its other
    pipelines, so its latents are compared through the autoencoder's own decode of z/scaling_factor + shift_factor."""
    images = np.random.default_rng(2).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    latents = saved["theirs"]["inpaint"](prompt=PROMPTS, image=images, mask_image=half_masks(), strength=0.6,
                                         height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0),
                                         **dict(THEIRS, output_type="latent")).images  # fmt: skip
    vae = saved["vae"]
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    theirs = (decoded / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    ours = saved["ours"]["full"].inpaint(images, half_masks(), PROMPTS, strength=0.6,
                                         latents=diffusers_noise(torch, 1), **COMMON)  # fmt: skip
    assert_close(ours, theirs)
    outside = np.broadcast_to(half_masks() < 0.5, ours.shape)
    assert np.abs(ours - theirs)[outside].max() < TOLERANCE


def test_folder_refusals(saved, tmp_path):
    import shutil

    folder = shutil.copytree(saved["folder"] / "full", tmp_path / "copy")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    settings = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps(dict(settings, use_karras_sigmas=True)))
    with pytest.raises(WeightsError, match=r"unsupported setting use_karras_sigmas=True"):
        SD3Pipeline.read(folder)
    scheduler.write_text(json.dumps(settings))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, text_encoder_3=[None, None])))
    with pytest.raises(WeightsError, match=r"text_encoder_3 and tokenizer_3 must both be given or both null"):
        SD3Pipeline.read(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    transformer = folder / "transformer" / "config.json"
    transformer.write_text(json.dumps(dict(json.loads(transformer.read_text()), pooled_projection_dim=12)))
    with pytest.raises(WeightsError, match=r"pooled_projection_dim=12, but the CLIP encoders' projection_dim sum"):
        SD3Pipeline.read(folder)


def test_pipeline_from_pretrained_gives_the_sd3_pipeline(saved):
    from jaxdiff import Pipeline

    assert isinstance(Pipeline.from_pretrained(saved["folder"] / "no_t5"), SD3Pipeline)


def test_skip_layer_guidance_matches_diffusers(saved, torch):
    """SD3.5's skip-layer guidance (block 1 skipped at steps 1 and 2 of 4: 0.1·4 < i < 0.8·4)."""
    noise = noise_nhwc(3)
    slg = dict(skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.8)
    theirs = saved["theirs"]["full"](prompt=PROMPTS, negative_prompt=NEGATIVE, latents=nchw(torch, noise), height=SIZE,
                                     width=SIZE, skip_guidance_layers=[1], **slg, **THEIRS).images  # fmt: skip
    ours = saved["ours"]["full"].text_to_image(PROMPTS, negative_prompts=NEGATIVE, latents=noise, height=SIZE,
                                               width=SIZE, skip_guidance_layers=[1], **slg, **COMMON)  # fmt: skip
    assert_close(ours, theirs)
    plain = saved["ours"]["full"].text_to_image(PROMPTS, negative_prompts=NEGATIVE, latents=noise, height=SIZE,
                                                width=SIZE, **COMMON)  # fmt: skip
    assert np.abs(plain - ours).max() > 1e-3  # the guidance changed the images
