"""Flux.1 folders (diffusers' `FluxPipeline`, `FluxImg2ImgPipeline`, `FluxInpaintPipeline`; dev and schnell) and
`FluxPipeline`: text-to-image, image-to-image and inpainting step for step as those pipelines (the loop:
`jaxdiff.latent.flow_pipeline`).

    pipe = FluxPipeline.from_pretrained("FLUX.1-dev")
    images = pipe.text_to_image(["a photo of a cat"], steps=28, guidance=3.5)   # uint8 [1, 1024, 1024, 3]

A folder holds `transformer/` (FluxTransformer2DModel), `vae/` (AutoencoderKL, 16 latent channels, shift_factor),
`text_encoder/` (CLIPTextModel), `text_encoder_2/` (T5EncoderModel), `tokenizer/` (CLIP, 77 tokens), `tokenizer_2/`
(T5) and `scheduler/` (FlowMatchEulerDiscreteScheduler, use_dynamic_shifting). As diffusers' pipelines:
  - the T5 tokens of the prompt (max_sequence_length, unmasked) are the context, CLIP's pooled output (the final
    LayerNorm at the EOS token) the pooled projection; txt_ids are zeros;
  - the latents [B, H/8, W/8, 16] are packed 2×2 into tokens [B, (H/16)(W/16), 64] for each transformer call
    (`jaxdiff.models.flux.pack_latents`; img_ids (0, row, column)), so height and width are multiples of 16;
  - the levels are the scheduler's for sigmas = linspace(1, 1/steps, steps), shifted at μ from the image's token
    count and the config's base/max shift and sequence lengths; the transformer gets the flow time σ (its forward
    multiplies by 1000);
  - Flux.1-dev (guidance_embeds) takes `guidance` as the embedded guidance scale (default 3.5), one pass per step;
    Flux.1-schnell (no guidance embedding) takes none; `true_cfg` > 1 with `negative_prompts` is diffusers'
    true_cfg_scale: v_neg + true_cfg·(v − v_neg).
Prompts longer than a tokenizer's length are truncated with a logged warning, as diffusers warns.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdiff.checks import prompt_list
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.flow_pipeline import (
    Encoder,
    FlowModels,
    FlowPipeline,
    FolderSpec,
    check_guidance,
    check_max_sequence_length,
)
from jaxdiff.latent.flux_weights import read_flux_transformer
from jaxdiff.models.clip_text import create_clip_text
from jaxdiff.models.flux import PACK, create_flux, flux_config, latent_image_ids, pack_latents, unpack_latents
from jaxdiff.models.t5_encoder import create_t5_encoder
from jaxdiff.xla_options import inference_jit

Array = jax.Array

FLUX_PIPELINE_CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
FLUX_FOLDER = FolderSpec(
    FLUX_PIPELINE_CLASSES, "FluxTransformer2DModel", flux_config, read_flux_transformer,
    (Encoder("text", "text_encoder", "tokenizer", ("CLIPTextModel",), "clip"),
     Encoder("text_2", "text_encoder_2", "tokenizer_2", ("T5EncoderModel",), "t5")),
)  # fmt: skip
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_MAX_SEQUENCE_LENGTH = 28, 3.5, 512
DEFAULT_SAMPLE_SIZE = 128  # diffusers' FluxPipeline.default_sample_size, in latent pixels
TIME_DIVISOR = 1000.0  # the pipeline passes timestep / 1000 (σ) to the transformer


def check_flux_configs(folder: pathlib.Path, configs: dict) -> None:
    """WeightsError in one line unless the transformer fits the autoencoder's packed latents and the text encoders."""
    transformer, vae = configs["transformer"], configs["vae"]
    source = folder / "transformer" / "config.json"
    packed = PACK * PACK * vae.latent_channels
    output = transformer.patch_size**2 * transformer.out_channels
    if not transformer.in_channels == output == packed:
        raise WeightsError(f"{source}: in_channels={transformer.in_channels} and patch_size² × out_channels={output} "
                           f"must equal the autoencoder's latent channels packed 2×2 ({packed})")  # fmt: skip
    clip, t5 = configs["text_encoder"], configs["text_encoder_2"]
    if clip.with_projection or clip.hidden_size != transformer.pooled_projection_dim:
        raise WeightsError(f"{source}: pooled_projection_dim={transformer.pooled_projection_dim} must be "
                           f"text_encoder's hidden_size ({clip.hidden_size}; a CLIPTextModel, its pooled output "
                           "unprojected)")  # fmt: skip
    if t5.d_model != transformer.joint_attention_dim:
        raise WeightsError(f"{source}: joint_attention_dim={transformer.joint_attention_dim}, but text_encoder_2's "
                           f"d_model is {t5.d_model}")  # fmt: skip


class FluxPipeline(FlowPipeline):
    """A loaded Flux.1 folder: `text_to_image`, `image_to_image`, `inpaint` (module docstring)."""

    loaded = "a Flux model"
    pipeline_classes = FLUX_PIPELINE_CLASSES
    folder_spec = FLUX_FOLDER
    check_configs = staticmethod(check_flux_configs)
    pipeline_sigmas = True

    def __init__(self, model: FlowModels, mesh: Mesh | None = None, offload_text_encoders: bool = False):
        factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
        super().__init__(model, PACK, DEFAULT_SAMPLE_SIZE * factor, mesh, offload_text_encoders)
        self.transformer = create_flux(model.transformer_config)
        self.guidance_embeds = model.transformer_config.guidance_embeds
        self.clip = create_clip_text(model.encoders["text"][0])
        self.t5 = create_t5_encoder(model.encoders["text_2"][0])
        self._encode_ids = inference_jit(self._embed)

    def _lora_layouts(self) -> dict:
        """kohya / ComfyUI Flux LoRA files name the transformer's modules in BFL's layout (`jaxdiff.latent.lora`)."""
        return {"flux_config": self.model.transformer_config}

    def _velocity(self, params, x, timesteps, cond, embedded):
        context, pooled = cond
        height, width = x.shape[1:3]
        txt_ids = jnp.zeros((context.shape[1], len(self.transformer.axes_dims_rope)), jnp.float32)
        guidance = None if embedded is None else jnp.full(x.shape[:1], embedded, jnp.float32)
        out = self.transformer.apply({"params": params}, pack_latents(x), timesteps / TIME_DIVISOR, context, pooled,
                                     latent_image_ids(height, width), txt_ids, guidance)  # fmt: skip
        return unpack_latents(out, height, width)

    def _embed(self, params: dict, ids: Array, ids_2: Array) -> tuple[Array, Array]:
        """(context [N, L, D] from T5, pooled [N, P] from CLIP) of the token ids."""
        pooled = self.clip.apply({"params": params["text"]}, ids).pooled_output
        return self.t5.apply({"params": params["text_2"]}, ids_2), pooled

    def _encoder(self, prompts, negative_prompts, guidance, true_cfg, max_sequence_length):
        """(the prompts as a list, true_cfg checked, the embedded guidance, the `encode()` of
        `FlowPipeline._generate`), every argument checked first."""
        prompts = prompt_list(prompts, "prompts")
        if self.guidance_embeds:
            guidance = check_guidance("guidance", DEFAULT_GUIDANCE if guidance is None else guidance)
        elif guidance is not None:
            raise UsageError(f"guidance={guidance!r}: this Flux transformer has no guidance embedding (guidance_embeds "
                             "false, as Flux.1-schnell); leave guidance unset (true_cfg with negative_prompts guides)")
        true_cfg = check_guidance("true_cfg", true_cfg)
        if true_cfg > 1 and negative_prompts is None:
            raise UsageError(f"true_cfg={true_cfg} needs negative_prompts (diffusers runs no true CFG without them)")
        negative = self._negatives(negative_prompts, len(prompts), true_cfg > 1, "true_cfg")
        length = check_max_sequence_length(max_sequence_length)
        tokenizers = self.model.tokenizers

        def conditioning(texts):
            return self._encode_ids(self._run_params, jnp.asarray(tokenizers["text"](texts).input_ids),
                                    jnp.asarray(tokenizers["text_2"](texts, max_length=length).input_ids))

        def encode():
            return conditioning(prompts), None if negative is None else conditioning(negative)

        return prompts, true_cfg, guidance, encode

    def text_to_image(self, prompts, *, steps: int = DEFAULT_STEPS, guidance: float | None = None,
                      height: int | None = None, width: int | None = None, seed: int = 0, latents=None,
                      max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, true_cfg: float = 1.0,
                      negative_prompts=None, output_type: str = "uint8",
                      sampler: str | None = None) -> np.ndarray:  # fmt: skip
        """Images [B, height, width, 3] for B prompts: uint8, float in [0, 1] (output_type="float") or the final
        latents NHWC (output_type="latent"). height and width (default 1024 for an 8× autoencoder) must be multiples
        of 16. `guidance`: Flux.1-dev's embedded guidance (default 3.5; refused without guidance_embeds).
        `true_cfg` > 1 with `negative_prompts`: true classifier-free guidance (negative prompts are refused
        otherwise). `latents` [B, height/8, width/8, 16] is the initial noise, unpacked (default: drawn from `seed`).
        `max_sequence_length`: T5's tokens (2..512)."""
        prompts, true_cfg, guidance, encode = self._encoder(prompts, negative_prompts, guidance, true_cfg,
                                                            max_sequence_length)  # fmt: skip
        return self._generate(encode, true_cfg, guidance, batch=len(prompts), steps=steps, seed=seed, latents=latents,
                              output_type=output_type, sampler=sampler, size=(height, width))  # fmt: skip

    def image_to_image(self, images, prompts, *, strength: float = 0.6, steps: int = DEFAULT_STEPS,
                       guidance: float | None = None, seed: int = 0, latents=None,
                       max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, true_cfg: float = 1.0,
                       negative_prompts=None, output_type: str = "uint8",
                       sampler: str | None = None) -> np.ndarray:  # fmt: skip
        """`FluxImg2ImgPipeline`: `images` [B, H, W, 3] (H, W multiples of 16) encoded, noised to the first level of
        the last steps `strength` in (0, 1] leaves (`strength_start`) with `latents` (the noise, unpacked NHWC;
        default drawn from `seed`), then denoised; the other arguments as `text_to_image`'s."""
        prompts, true_cfg, guidance, encode = self._encoder(prompts, negative_prompts, guidance, true_cfg,
                                                            max_sequence_length)  # fmt: skip
        return self._generate(encode, true_cfg, guidance, batch=len(prompts), steps=steps, seed=seed, latents=latents,
                              output_type=output_type, sampler=sampler, images=images, strength=strength)  # fmt: skip

    def inpaint(self, images, masks, prompts, *, strength: float = 1.0, steps: int = DEFAULT_STEPS,
                guidance: float | None = None, seed: int = 0, latents=None,
                max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, true_cfg: float = 1.0, negative_prompts=None,
                output_type: str = "uint8", sampler: str | None = None) -> np.ndarray:  # fmt: skip
        """`FluxInpaintPipeline`: repaint `images` where `masks` are set, blending the image's latents, noised to
        each level, outside the mask after every step; strength and `latents` as `image_to_image`'s."""
        prompts, true_cfg, guidance, encode = self._encoder(prompts, negative_prompts, guidance, true_cfg,
                                                            max_sequence_length)  # fmt: skip
        return self._generate(encode, true_cfg, guidance, batch=len(prompts), steps=steps, seed=seed, latents=latents,
                              output_type=output_type, sampler=sampler, images=images, masks=masks, strength=strength,
                              inpainting=True)  # fmt: skip
