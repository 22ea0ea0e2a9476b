"""`LatentModels`: everything a latent (text-to-image) pipeline runs, whatever it was read from — a diffusers
folder, an original single-file release, or a jaxdiff latent run."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import ml_collections

from jaxdiff.diffusion.scheduler_config import SchedulerSettings

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentModels:
    """The three networks (each its config and float32 NumPy parameters in our layouts), the tokenizer and the
    scheduler settings of a latent pipeline.

    tokenizer: prompts -> an object whose `input_ids` is int [len(prompts), text_config.max_length] (CLIP's BPE
    tokenizer for released models, the word tokenizer of a run trained here). pipeline_class: the diffusers
    pipeline class the source was saved as. tokenizer_folder: the folder the tokenizer was read from (None for
    a run trained here), copied on export. settings: component name -> its diffusers config.json dict (empty
    for a run trained here).
    """

    pipeline_class: str = "StableDiffusionPipeline"
    unet_config: ml_collections.ConfigDict
    unet_params: dict
    vae_config: ml_collections.ConfigDict
    vae_params: dict
    text_config: ml_collections.ConfigDict
    text_params: dict
    tokenizer: Callable[[Sequence[str]], object]
    tokenizer_folder: pathlib.Path | None = None
    scheduler: SchedulerSettings
    settings: dict = dataclasses.field(default_factory=dict)
