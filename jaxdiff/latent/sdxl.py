"""SDXL pipeline folders (diffusers' `StableDiffusionXLPipeline`, the base, `StableDiffusionXLImg2ImgPipeline`, the
refiner layout, and `StableDiffusionXLInpaintPipeline`, whose U-Net may take 9 input channels) -> `LatentModels`.

A base folder holds `unet/` (an addition_embed_type "text_time" U-Net), `vae/`, `text_encoder/` (CLIPTextModel,
CLIP ViT-L), `text_encoder_2/` (CLIPTextModelWithProjection, OpenCLIP bigG), `tokenizer/`, `tokenizer_2/` and
`scheduler/`; a refiner folder may leave text_encoder and tokenizer null (it reads prompts with the second encoder
only). Every key of model_index.json is read or refused (`read_sdxl_index`): the components of the classes read,
the unused ones (feature_extractor, image_encoder) null, `force_zeros_for_empty_prompt` (default true: the
unconditional embeddings are zeros when no negative prompt is given) and, for the img2img and inpaint classes,
`requires_aesthetics_score` (default false: 5 time ids ending in an aesthetic score instead of 6 ending in the
target size). The VAE runs in float32 when its config's `force_upcast` is true (diffusers' default), whatever
`dtype`. The configs are checked against each other (the U-Net's cross_attention_dim is the encoders' widths
summed; its added-embedding input is addition_time_embed_dim × the time ids + the pooled width) before weights
are read.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

from jaxdiff.diffusion.scheduler_config import SchedulerSettings, scheduler_settings
from jaxdiff.errors import WeightsError
from jaxdiff.latent.bundle import SDXL_PIPELINE_CLASSES, LatentModels
from jaxdiff.latent.clip_tokenizer import CLIPTokenizer
from jaxdiff.latent.component_weights import check_index_entry, read_autoencoder, read_clip_text
from jaxdiff.latent.unet_weights import read_unet_condition
from jaxdiff.models.clip_text import clip_text_config
from jaxdiff.models.unet_condition_config import config_from_diffusers
from jaxdiff.weights.files import CONFIG_FILE, MODEL_INDEX_FILE, load_json

BASE_CLASS, IMG2IMG_CLASS, INPAINT_CLASS = SDXL_PIPELINE_CLASSES
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
# The components of an SDXL model_index.json and the classes read for each (None: any scheduler, its config's
# _class_name must agree); the optional components jaxdiff does not run (accepted only as [null, null]); the
# other keys read, per pipeline class.
SDXL_COMPONENTS = {
    "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",), "tokenizer": TOKENIZER_CLASSES,
    "tokenizer_2": TOKENIZER_CLASSES, "scheduler": None,
}  # fmt: skip
SDXL_UNUSED = ("feature_extractor", "image_encoder")
SDXL_KEYS = {
    BASE_CLASS: ("_class_name", "_diffusers_version", "_name_or_path", "force_zeros_for_empty_prompt"),
    IMG2IMG_CLASS: ("_class_name", "_diffusers_version", "_name_or_path", "force_zeros_for_empty_prompt",
                    "requires_aesthetics_score"),
}  # fmt: skip
SDXL_KEYS[INPAINT_CLASS] = SDXL_KEYS[IMG2IMG_CLASS]
# The components an img2img (refiner) or inpaint folder may leave null: the first text encoder with its tokenizer.
OPTIONAL_PAIR = ("text_encoder", "tokenizer")
BASE_TIME_IDS, AESTHETIC_TIME_IDS = 6, 5  # (original_size, crop, target_size) or (original_size, crop, score)


def read_sdxl_index(folder: pathlib.Path) -> tuple[dict, bool, bool]:
    """(the components present -> class name, force_zeros_for_empty_prompt, requires_aesthetics_score) of an SDXL
    folder's model_index.json, after checking every key; one WeightsError line for each problem."""
    index_file = folder / MODEL_INDEX_FILE
    index = load_json(index_file)
    pipeline_class = index["_class_name"]
    present = {}
    for key, value in index.items():
        named = check_index_entry(index_file, key, value, components=SDXL_COMPONENTS, unused=SDXL_UNUSED,
                                  keys=SDXL_KEYS[pipeline_class], owner=f" for {pipeline_class}", nullable=True)
        if named is not None:
            present[key] = named
    optional = () if pipeline_class == BASE_CLASS else OPTIONAL_PAIR
    for key in SDXL_COMPONENTS:
        if key not in present and key not in optional:
            raise WeightsError(f"{index_file}: {key} is missing or null; {pipeline_class} needs it")
    if len({key in present for key in optional}) > 1:
        raise WeightsError(f"{index_file}: text_encoder and tokenizer must both be given or both null (a refiner "
                           "has neither)")  # fmt: skip
    for key in present:
        if not (folder / key).is_dir():
            raise WeightsError(f"{folder} has no {key}/ folder ({MODEL_INDEX_FILE} names {key} {present[key]!r})")
    flags = {}
    for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        flags[key] = index.get(key, key == "force_zeros_for_empty_prompt")
        if not isinstance(flags[key], bool):
            raise WeightsError(f"{index_file}: {key}={flags[key]!r} must be true or false")
    return present, flags["force_zeros_for_empty_prompt"], flags["requires_aesthetics_score"]


def _check_sdxl_configs(folder: pathlib.Path, settings: dict, aesthetics: bool) -> None:
    """WeightsError unless the U-Net fits the encoders and the time ids (checked on the configs)."""
    unet_file = folder / "unet" / CONFIG_FILE
    try:
        unet = config_from_diffusers(settings["unet"])
        encoders = {key: clip_text_config(settings[key]) for key in ("text_encoder", "text_encoder_2") if key in settings}
    except ValueError as err:
        raise WeightsError(f"{folder}: {err}") from None
    if unet.addition_embed_type != "text_time":
        raise WeightsError(f"{unet_file}: addition_embed_type={unet.addition_embed_type!r}; an SDXL U-Net has "
                           "'text_time'")  # fmt: skip
    if not encoders["text_encoder_2"].with_projection:
        raise WeightsError(f"{folder / 'text_encoder_2' / CONFIG_FILE}: architectures must be "
                           "['CLIPTextModelWithProjection'] (its pooled, projected output conditions the U-Net)")
    width = sum(config.hidden_size for config in encoders.values())
    if width != unet.cross_attention_dim:
        raise WeightsError(f"{unet_file}: cross_attention_dim={unet.cross_attention_dim} but the text encoders' "
                           f"hidden sizes {[c.hidden_size for c in encoders.values()]} sum to {width}")  # fmt: skip
    count = AESTHETIC_TIME_IDS if aesthetics else BASE_TIME_IDS
    added = unet.addition_time_embed_dim * count + encoders["text_encoder_2"].projection_dim
    expected = unet.projection_class_embeddings_input_dim
    if added != expected:
        raise WeightsError(f"{unet_file}: projection_class_embeddings_input_dim={expected}, but "
                           f"requires_aesthetics_score={aesthetics} gives {count} time ids × "
                           f"addition_time_embed_dim={unet.addition_time_embed_dim} + text_encoder_2's "
                           f"projection_dim={encoders['text_encoder_2'].projection_dim} = {added}")  # fmt: skip
    vae = settings["vae"]
    for key in ("latents_mean", "latents_std"):
        if vae.get(key) is not None:
            raise WeightsError(f"{folder / 'vae' / CONFIG_FILE}: {key}={vae[key]!r}; jaxdiff's SDXL pipeline scales "
                               "latents by scaling_factor only (null)")  # fmt: skip


class SdxlFolder(NamedTuple):
    """What an SDXL folder holds besides weights (all checked): the components present (key -> class name),
    model_index.json's flags, the scheduler settings, each network's config.json dict (settings: unet, vae,
    text_encoder (absent in a refiner), text_encoder_2) and the tokenizers (tokenizer None in a refiner)."""

    pipeline_class: str
    present: dict
    force_zeros_for_empty_prompt: bool
    requires_aesthetics_score: bool
    scheduler: SchedulerSettings
    settings: dict
    tokenizer: CLIPTokenizer | None
    tokenizer_2: CLIPTokenizer


def read_sdxl_folder(folder: pathlib.Path) -> SdxlFolder:
    """An SDXL folder's `SdxlFolder`: model_index.json, the scheduler config and the networks' configs checked
    against each other; one WeightsError line for the first problem."""
    pipeline_class = load_json(folder / MODEL_INDEX_FILE)["_class_name"]
    present, force_zeros, aesthetics = read_sdxl_index(folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise WeightsError(f"{folder / 'scheduler'} has no {scheduler_file.name}")
    scheduler_config = load_json(scheduler_file)
    if scheduler_config.get("_class_name") != present["scheduler"]:
        raise WeightsError(f"{scheduler_file}: _class_name={scheduler_config.get('_class_name')!r} but "
                           f"{MODEL_INDEX_FILE} names scheduler {present['scheduler']!r}")  # fmt: skip
    scheduler = scheduler_settings(scheduler_config, str(scheduler_file))
    settings = {}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if component in present:
            path = folder / component / CONFIG_FILE
            if not path.is_file():
                raise WeightsError(f"{folder} has no {component}/{CONFIG_FILE}")
            settings[component] = load_json(path)
    _check_sdxl_configs(folder, settings, aesthetics)
    tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer") if "tokenizer" in present else None
    return SdxlFolder(pipeline_class, present, force_zeros, aesthetics, scheduler, settings, tokenizer,
                      CLIPTokenizer.from_folder(folder / "tokenizer_2"))  # fmt: skip


def vae_dtype(configs: SdxlFolder, dtype: str) -> str:
    """The VAE's compute dtype: float32 when its config's force_upcast is true (diffusers' default), else `dtype`."""
    return "float32" if configs.settings["vae"].get("force_upcast", True) else dtype


def sdxl_models(folder: pathlib.Path, configs: SdxlFolder, networks: dict) -> LatentModels:
    """The `LatentModels` of `configs`, read from `folder`, and `networks`: component (unet, vae, text_encoder as
    present, text_encoder_2) -> (model config, params)."""
    text_config, text_params = networks.get("text_encoder", (None, None))
    return LatentModels(
        pipeline_class=configs.pipeline_class, unet_config=networks["unet"][0], unet_params=networks["unet"][1],
        vae_config=networks["vae"][0], vae_params=networks["vae"][1], text_config=text_config,
        text_params=text_params, tokenizer=configs.tokenizer,
        tokenizer_folder=folder / "tokenizer" if configs.tokenizer is not None else None, scheduler=configs.scheduler,
        settings=configs.settings, text_config_2=networks["text_encoder_2"][0],
        text_params_2=networks["text_encoder_2"][1], tokenizer_2=configs.tokenizer_2,
        force_zeros_for_empty_prompt=configs.force_zeros_for_empty_prompt,
        requires_aesthetics_score=configs.requires_aesthetics_score,
    )  # fmt: skip


def read_sdxl(folder: pathlib.Path, *, variant: str | None = None, dtype: str = "float32") -> LatentModels:
    """The `LatentModels` of an SDXL folder (model_index.json's _class_name one of SDXL_PIPELINE_CLASSES); `variant`
    and `dtype` as `read_stable_diffusion`'s. Configs and model_index.json are checked before any weights are
    read."""
    configs = read_sdxl_folder(folder)
    networks = {"unet": read_unet_condition(folder / "unet", variant=variant, dtype=dtype),
                "vae": read_autoencoder(folder / "vae", variant=variant, dtype=vae_dtype(configs, dtype))}  # fmt: skip
    for key in ("text_encoder", "text_encoder_2"):
        if key in configs.present:
            networks[key] = read_clip_text(folder / key, variant=variant, dtype=dtype)
    return sdxl_models(folder, configs, networks)


def sdxl_refiner(path) -> bool | None:
    """None unless `path` is an SDXL folder (by its model_index.json); else whether it is a refiner (an img2img
    folder with requires_aesthetics_score true), which runs image-to-image and inpainting only."""
    index_file = pathlib.Path(path) / MODEL_INDEX_FILE
    if not index_file.is_file():
        return None
    index = load_json(index_file)
    if index.get("_class_name") not in SDXL_PIPELINE_CLASSES:
        return None
    return index.get("_class_name") == IMG2IMG_CLASS and index.get("requires_aesthetics_score") is True
