"""A trained run's workdir read into the pipeline that samples it, for the tasks whose runs are not a plain
`jaxdiff.sampling.pipeline.Pipeline` of their parameters: `jaxdiff.sampling.pipeline.Pipeline.from_checkpoint` reads
the run (`jaxdiff.training.runs.load_run`: its config, step, EMA parameters with those the step keeps) and the
checkpoint's extras, then builds

- `latent_pipeline`: a text-to-image `LatentPipeline` of a latent run (its autoencoder, text encoder, tokenizer,
  U-Net and schedule; a LoRA run's adapters loaded on its `unet_init` folder's U-Net);
- `flow_lora_pipeline`: the SD3 / Flux pipeline of a flow_lora run's folder with its adapters loaded;
- `class_latent_parts`: what a class-conditional latent run samples with (its network's parameters, the autoencoder
  it kept, its class names).
"""

from __future__ import annotations

import pathlib

import ml_collections

from jaxdiff.errors import WeightsError
from jaxdiff.latent.bundle import LatentModels
from jaxdiff.latent.clip_tokenizer import CLIPTokenizer
from jaxdiff.latent.component_weights import read_clip_text
from jaxdiff.latent.decoding_autoencoder import DecodingAutoencoder
from jaxdiff.latent.pipeline import LatentPipeline
from jaxdiff.latent.word_tokenizer import WordTokenizer
from jaxdiff.training.flow_lora_step import COMPONENT
from jaxdiff.training.latent_parts import (
    KEPT_CONFIG,
    FrozenAutoencoder,
    check_same_autoencoder,
    config_of_kept,
    describe_autoencoder,
    is_sdxl_folder,
    text_encoder_config,
    unet_config,
)
from jaxdiff.training.latent_step import run_scheduler, trained_lora
from jaxdiff.training.lora_base import (
    LORA_NAME,
    LORA_SOURCE,
    check_lora_base,
    lora_base_identity,
    lora_scale,
    read_lora_base,
)
from jaxdiff.training.tasks.flow_lora import FAMILIES


def latent_pipeline(config: ml_collections.ConfigDict, params: dict, extras: dict) -> LatentPipeline:
    """`LatentPipeline` (text_to_image, image_to_image, inpaint) of a latent run's (EMA) `params` and the
    checkpoint's `extras`: its autoencoder (the copy the checkpoint keeps, `params["vae"]`, as `load_run` gives
    it; for a checkpoint without one, the step it was trained on where it lives, refused if that is not what
    the path now holds), its text encoder and tokenizer, and its schedule (`run_scheduler`). A LoRA run's
    pipeline is the `unet_init` folder's U-Net (checked to be the one trained on) with the run's EMA adapters
    loaded as LORA_NAME at scale 1 (`pipe.set_lora_scale`, `fuse_lora` work on them); an SDXL run's, that
    folder's SDXL pipeline with them."""
    if is_sdxl_folder(config.latent.unet_init):
        folder = extras["lora_base"]["path"]
        pipe = LatentPipeline.from_pretrained(folder)
        check_lora_base(extras["lora_base"], lora_base_identity(folder, pipe.model.unet_params))
        pipe.load_lora(trained_lora(params["lora"], lora_scale(config.training.lora), LORA_SOURCE), name=LORA_NAME)
        return pipe
    recorded = extras["autoencoder"]
    if "vae" in params and KEPT_CONFIG in extras:
        vae_config, vae_params = config_of_kept(extras), params["vae"]
    else:
        try:
            autoencoder = FrozenAutoencoder.at(recorded["path"], recorded["step"])
        except ValueError as err:
            raise WeightsError(f"this latent model was trained on the autoencoder {describe_autoencoder(recorded)}, "
                             f"which cannot be read now: {err}") from None  # fmt: skip
        check_same_autoencoder(recorded, autoencoder.identity)
        vae_config, vae_params = autoencoder.config, autoencoder.params()
    text_config, _ = text_encoder_config(config)
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    unet = unet_config(config, vae_config.latent_channels, vae_config.sample_size // factor, text_config.hidden_size)
    if config.latent.text_encoder:
        folder = pathlib.Path(config.latent.text_encoder)
        text_params, tokenizer = read_clip_text(folder)[1], CLIPTokenizer.from_folder(folder / "tokenizer")
    else:
        text_params, tokenizer = params["text"], WordTokenizer.from_json(extras["tokenizer"]).encode
    lora = "lora_base" in extras
    if lora:
        unet_params, base = read_lora_base(extras["lora_base"]["path"])
        check_lora_base(extras["lora_base"], base)
    else:
        unet_params = params["unet"]
    pipe = LatentPipeline(LatentModels(
        unet_config=unet, unet_params=unet_params, vae_config=vae_config, vae_params=vae_params,
        text_config=text_config, text_params=text_params, tokenizer=tokenizer,
        scheduler=run_scheduler(config.diffusion),
    ))  # fmt: skip
    if lora:
        pipe.load_lora(trained_lora(params["lora"], lora_scale(config.training.lora), LORA_SOURCE), name=LORA_NAME)
    return pipe


def flow_lora_pipeline(config: ml_collections.ConfigDict, params: dict, extras: dict):
    """The `SD3Pipeline` / `FluxPipeline` of a flow_lora run: its folder (checked to hold the transformer weights
    the run was trained on) with the run's (EMA) adapters `params["lora"]` loaded as LORA_NAME at scale 1."""
    folder = extras["lora_base"]["path"]
    pipe = FAMILIES[extras["family"]][0].from_pretrained(folder)
    check_lora_base(extras["lora_base"], lora_base_identity(folder, pipe.model.transformer_params))
    adapters = trained_lora(params["lora"], lora_scale(config.training.lora), LORA_SOURCE, COMPONENT)
    pipe.load_lora(adapters, name=LORA_NAME)
    return pipe


def class_latent_parts(params: dict, extras: dict) -> tuple[dict, DecodingAutoencoder, dict[str, int]]:
    """(the network's parameters, the autoencoder that decodes its samples, class name -> label) of a run's
    parameters as `load_run` reads them (the kept autoencoder under "vae") and its checkpoint's extras: what
    `jaxdiff.sampling.Pipeline` needs to sample it class-conditionally."""
    model_params = {key: value for key, value in params.items() if key != "vae"}
    autoencoder = DecodingAutoencoder(config_of_kept(extras), params["vae"])
    return model_params, autoencoder, {name: label for label, name in enumerate(extras["class_names"])}
