"""Stable Diffusion 3 / 3.5 folders (diffusers' `StableDiffusion3Pipeline`, `StableDiffusion3Img2ImgPipeline`,
`StableDiffusion3InpaintPipeline`) and `SD3Pipeline`: text-to-image, image-to-image and inpainting step for step as
those pipelines (the loop: `jaxdiff.latent.flow_pipeline`).

    pipe = SD3Pipeline.from_pretrained("stable-diffusion-3-medium-diffusers")
    images = pipe.text_to_image(["a photo of a cat"], steps=28, guidance=7.0)   # uint8 [1, 1024, 1024, 3]

A folder holds `transformer/` (SD3Transformer2DModel, 16 input channels: the 33-channel inpainting variant is refused),
`vae/` (AutoencoderKL with shift_factor and scaling_factor), `text_encoder/` and `text_encoder_2/`
(CLIPTextModelWithProjection: CLIP-L and OpenCLIP bigG), `text_encoder_3/` (T5EncoderModel; may be null with its
tokenizer, as diffusers allows), `tokenizer/`, `tokenizer_2/`, `tokenizer_3/` and `scheduler/`
(FlowMatchEulerDiscreteScheduler). The prompts become, as diffusers' `encode_prompt`:
  context [B, 77 + L, D]  cat(CLIP-L's and CLIP-G's hidden state −(clip_skip + 2) on the feature axis (the
                          penultimate layer, without the final LayerNorm; negative prompts always −2), zero-padded to
                          D = joint_attention_dim) then T5's L = max_sequence_length tokens (unmasked; zeros without
                          text_encoder_3) along the sequence;
  pooled [B, P]           cat(CLIP-L's, CLIP-G's projected pooled outputs).
The transformer's timestep is σ·num_train_timesteps, as diffusers' SD3 pipelines pass it. Prompts longer than a
tokenizer's length (77 for CLIP, max_sequence_length for T5) are truncated with a logged warning naming the dropped
text, as diffusers warns.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdiff.checks import is_int, prompt_list
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.flow_pipeline import (
    Encoder,
    FlowModels,
    FlowPipeline,
    FolderSpec,
    check_guidance,
    check_max_sequence_length,
)
from jaxdiff.latent.mmdit_weights import read_mmdit
from jaxdiff.models.clip_text import create_clip_text
from jaxdiff.models.mmdit import check_skip_layers, create_mmdit, mmdit_config
from jaxdiff.models.t5_encoder import create_t5_encoder
from jaxdiff.xla_options import inference_jit

Array = jax.Array

SD3_PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline")  # fmt: skip
CLIP_WITH_PROJECTION = ("CLIPTextModelWithProjection",)
SD3_FOLDER = FolderSpec(
    SD3_PIPELINE_CLASSES, "SD3Transformer2DModel", mmdit_config, read_mmdit,
    (Encoder("text", "text_encoder", "tokenizer", CLIP_WITH_PROJECTION, "clip"),
     Encoder("text_2", "text_encoder_2", "tokenizer_2", CLIP_WITH_PROJECTION, "clip"),
     Encoder("text_3", "text_encoder_3", "tokenizer_3", ("T5EncoderModel",), "t5", optional=True)),
)  # fmt: skip
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_MAX_SEQUENCE_LENGTH = 28, 7.0, 256


def check_sd3_configs(folder: pathlib.Path, configs: dict) -> None:
    """WeightsError in one line unless the transformer fits the autoencoder and the text encoders."""
    transformer, vae = configs["transformer"], configs["vae"]
    source = folder / "transformer" / "config.json"
    if not transformer.in_channels == transformer.out_channels == vae.latent_channels:
        raise WeightsError(f"{source}: in_channels={transformer.in_channels}, out_channels="
                           f"{transformer.out_channels}; the SD3 pipelines run a transformer on the autoencoder's "
                           f"{vae.latent_channels} latent channels (the 33-channel inpainting transformer is not "
                           "implemented)")  # fmt: skip
    clips = [configs["text_encoder"], configs["text_encoder_2"]]
    for name, clip in zip(("text_encoder", "text_encoder_2"), clips):
        if not clip.with_projection:
            raise WeightsError(f"{folder / name / 'config.json'}: architectures must be "
                               "['CLIPTextModelWithProjection']")  # fmt: skip
    pooled = sum(clip.projection_dim for clip in clips)
    if pooled != transformer.pooled_projection_dim:
        raise WeightsError(f"{source}: pooled_projection_dim={transformer.pooled_projection_dim}, but the CLIP "
                           f"encoders' projection_dim sum to {pooled}")  # fmt: skip
    width = sum(clip.hidden_size for clip in clips)
    if width > transformer.joint_attention_dim:
        raise WeightsError(f"{source}: joint_attention_dim={transformer.joint_attention_dim} is narrower than the CLIP "
                           f"encoders' hidden sizes together ({width})")  # fmt: skip
    t5 = configs.get("text_encoder_3")
    if t5 is not None and t5.d_model != transformer.joint_attention_dim:
        raise WeightsError(f"{source}: joint_attention_dim={transformer.joint_attention_dim}, but text_encoder_3's "
                           f"d_model is {t5.d_model}")  # fmt: skip


class SD3Pipeline(FlowPipeline):
    """A loaded SD3 / SD3.5 folder: `text_to_image`, `image_to_image`, `inpaint` (module docstring)."""

    loaded = "an SD3 model"
    pipeline_classes = SD3_PIPELINE_CLASSES
    folder_spec = SD3_FOLDER
    check_configs = staticmethod(check_sd3_configs)

    def __init__(self, model: FlowModels, mesh: Mesh | None = None, offload_text_encoders: bool = False):
        config = model.transformer_config
        factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
        super().__init__(model, config.patch_size, config.sample_size * factor, mesh, offload_text_encoders)
        self.transformer = create_mmdit(config)
        self.clips = [create_clip_text(model.encoders[key][0]) for key in ("text", "text_2")]
        self.t5 = create_t5_encoder(model.encoders["text_3"][0]) if "text_3" in model.encoders else None
        self.max_clip_skip = min(model.encoders[key][0].num_hidden_layers for key in ("text", "text_2")) - 1
        self._encode_ids = inference_jit(self._embed, static_argnames=("clip_skip", "t5_length"))

    def _velocity(self, params, x, timesteps, cond, embedded, skip_layers: tuple[int, ...] = ()):
        context, pooled = cond
        return self.transformer.apply({"params": params}, x, timesteps, context, pooled, skip_layers=skip_layers)

    def _embed(self, params: dict, ids: Array, ids_2: Array, ids_3: Array | None, *, clip_skip: int,
               t5_length: int) -> tuple[Array, Array]:  # fmt: skip
        """(context [N, 77 + t5_length, D], pooled [N, P]) of the token ids (module docstring)."""
        hidden, pooled = [], []
        for key, module, token_ids in (("text", self.clips[0], ids), ("text_2", self.clips[1], ids_2)):
            out = module.apply({"params": params[key]}, token_ids)
            hidden.append(out.hidden_states[-(clip_skip + 2)])
            pooled.append(out.text_embeds)
        width = self.model.transformer_config.joint_attention_dim
        if self.t5 is None:
            t5 = jnp.zeros((ids.shape[0], t5_length, width), jnp.float32)
        else:
            t5 = self.t5.apply({"params": params["text_3"]}, ids_3)
        clip = jnp.concatenate(hidden, axis=-1)
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        return jnp.concatenate([clip, t5], axis=1), jnp.concatenate(pooled, axis=-1)

    def _conditioning(self, prompts: list[str], clip_skip: int, max_sequence_length: int) -> tuple[Array, Array]:
        tokenizers = self.model.tokenizers
        ids_3 = None
        if self.t5 is not None:
            ids_3 = jnp.asarray(tokenizers["text_3"](prompts, max_length=max_sequence_length).input_ids)
        return self._encode_ids(self._run_params, jnp.asarray(tokenizers["text"](prompts).input_ids),
                                jnp.asarray(tokenizers["text_2"](prompts).input_ids), ids_3, clip_skip=clip_skip,
                                t5_length=max_sequence_length)  # fmt: skip

    def _encoder(self, prompts, negative_prompts, guidance, clip_skip, max_sequence_length):
        """(the prompts as a list, guidance checked, the `encode()` of `FlowPipeline._generate`), checked first."""
        prompts = prompt_list(prompts, "prompts")
        guidance = check_guidance("guidance", guidance)
        negative = self._negatives(negative_prompts, len(prompts), guidance > 1, "guidance")
        if not is_int(clip_skip, numpy=False) or not 0 <= clip_skip <= self.max_clip_skip:
            raise UsageError(f"clip_skip={clip_skip!r} must be an int in 0..{self.max_clip_skip}")
        length = check_max_sequence_length(max_sequence_length)

        def encode():
            cond = self._conditioning(prompts, clip_skip, length)
            return cond, None if negative is None else self._conditioning(negative, 0, length)

        return prompts, guidance, encode

    def text_to_image(self, prompts, *, negative_prompts=None, steps: int = DEFAULT_STEPS,
                      guidance: float = DEFAULT_GUIDANCE, height: int | None = None, width: int | None = None,
                      seed: int = 0, latents=None, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                      clip_skip: int = 0, output_type: str = "uint8", sampler: str | None = None,
                      skip_guidance_layers=None, skip_layer_guidance_scale: float = 2.8,
                      skip_layer_guidance_start: float = 0.01,
                      skip_layer_guidance_stop: float = 0.2) -> np.ndarray:  # fmt: skip
        """Images [B, height, width, 3] for B prompts: uint8, float in [0, 1] (output_type="float") or the final
        latents (output_type="latent"). height and width (default: the transformer's sample_size × the autoencoder's
        factor) must be multiples of factor × patch_size. `guidance` > 1 guides with `negative_prompts` (default:
        the empty prompt; refused with guidance <= 1). `latents` [B, height/f, width/f, 16] is the initial noise
        (default: drawn from `seed`). `max_sequence_length`: T5's tokens (2..512); `clip_skip` as diffusers'.
        Skip-layer guidance (SD3.5's, diffusers' arguments; needs guidance > 1): with `skip_guidance_layers` (block
        indices, e.g. [7, 8, 9] for SD3.5-medium), the steps i with start·steps < i < stop·steps add
        scale·(v_cond − v_cond without those blocks)."""
        prompts, guidance, encode = self._encoder(prompts, negative_prompts, guidance, clip_skip, max_sequence_length)
        skip_guidance = None
        if skip_guidance_layers is not None:
            if guidance <= 1:
                raise UsageError("skip_guidance_layers need guidance > 1 (skip-layer guidance adds to the guided run)")
            layers = check_skip_layers(skip_guidance_layers, self.model.transformer_config.num_layers)
            scale = check_guidance("skip_layer_guidance_scale", skip_layer_guidance_scale)
            start = check_guidance("skip_layer_guidance_start", skip_layer_guidance_start)
            stop = check_guidance("skip_layer_guidance_stop", skip_layer_guidance_stop)
            if not start < stop <= 1:
                raise UsageError(f"skip_layer_guidance_start={start} and _stop={stop} must be fractions of the run "
                                 "with start < stop <= 1")  # fmt: skip
            skip_guidance = (layers, scale, start, stop)
        return self._generate(encode, guidance, None, batch=len(prompts), steps=steps, seed=seed, latents=latents,
                              output_type=output_type, sampler=sampler, size=(height, width),
                              skip_guidance=skip_guidance)  # fmt: skip

    def image_to_image(self, images, prompts, *, strength: float = 0.6, negative_prompts=None,
                       steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int = 0, latents=None,
                       max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, clip_skip: int = 0,
                       output_type: str = "uint8", sampler: str | None = None) -> np.ndarray:  # fmt: skip
        """`StableDiffusion3Img2ImgPipeline`: `images` [B, H, W, 3] encoded, noised to the first level of the last
        steps `strength` in (0, 1] leaves (`strength_start`) with `latents` (the noise; default drawn from `seed`),
        then denoised; the other arguments as `text_to_image`'s."""
        prompts, guidance, encode = self._encoder(prompts, negative_prompts, guidance, clip_skip, max_sequence_length)
        return self._generate(encode, guidance, None, batch=len(prompts), steps=steps, seed=seed, latents=latents,
                              output_type=output_type, sampler=sampler, images=images, strength=strength)  # fmt: skip

    def inpaint(self, images, masks, prompts, *, strength: float = 1.0, negative_prompts=None,
                steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int = 0, latents=None,
                max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, clip_skip: int = 0,
                output_type: str = "uint8", sampler: str | None = None) -> np.ndarray:  # fmt: skip
        """`StableDiffusion3InpaintPipeline` (16-channel transformer): repaint `images` where `masks` are set,
        blending the image's latents, noised to each level, outside the mask after every step; strength and
        `latents` as `image_to_image`'s (strength 1: from pure noise)."""
        prompts, guidance, encode = self._encoder(prompts, negative_prompts, guidance, clip_skip, max_sequence_length)
        return self._generate(encode, guidance, None, batch=len(prompts), steps=steps, seed=seed, latents=latents,
                              output_type=output_type, sampler=sampler, images=images, masks=masks, strength=strength,
                              inpainting=True)  # fmt: skip
