"""`LatentModels`: everything a latent (text-to-image) pipeline runs, whatever it was read from — a diffusers
folder, an original single-file release, or a jaxdiff latent run."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import ml_collections

from jaxdiff.diffusion.scheduler_config import SchedulerSettings

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
UPSCALE_PIPELINE_CLASS = "StableDiffusionUpscalePipeline"  # the x4 upscaler (`jaxdiff.latent.upscale`)
# SDXL base, refiner and inpainting (`jaxdiff.latent.sdxl`): two CLIP text encoders (the refiner only the second)
# and the U-Net's added conditioning.
SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                         "StableDiffusionXLInpaintPipeline")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentModels:
    """The three networks (each its config and float32 NumPy parameters in our layouts), the tokenizer and the
    scheduler settings of a latent pipeline.

    tokenizer: prompts -> an object whose `input_ids` is int [len(prompts), text_config.max_length] (CLIP's BPE
    tokenizer for released models, the word tokenizer of a run trained here). pipeline_class: the diffusers
    pipeline class the source was saved as. tokenizer_folder: the folder the tokenizer was read from (None for
    a run trained here), copied on export. settings: component name -> its diffusers config.json dict (empty
    for a run trained here). low_res_scheduler, max_noise_level: an x4 upscaler's noise augmentation of the
    low-resolution image (its DDPM schedule, the largest noise level it takes; None for other pipelines).
    SDXL: text_config / text_params / tokenizer are its first text encoder (CLIP ViT-L; None in a refiner, which
    has only the second), text_config_2 / text_params_2 / tokenizer_2 its second (CLIPTextModelWithProjection,
    None for other pipelines); force_zeros_for_empty_prompt and requires_aesthetics_score are model_index.json's.
    """

    pipeline_class: str = "StableDiffusionPipeline"
    unet_config: ml_collections.ConfigDict
    unet_params: dict
    vae_config: ml_collections.ConfigDict
    vae_params: dict
    text_config: ml_collections.ConfigDict | None
    text_params: dict | None
    tokenizer: Callable[[Sequence[str]], object] | None
    tokenizer_folder: pathlib.Path | None = None
    scheduler: SchedulerSettings
    settings: dict = dataclasses.field(default_factory=dict)
    low_res_scheduler: SchedulerSettings | None = None
    max_noise_level: int | None = None
    text_config_2: ml_collections.ConfigDict | None = None
    text_params_2: dict | None = None
    tokenizer_2: Callable[[Sequence[str]], object] | None = None
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
