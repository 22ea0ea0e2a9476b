"""Stable Diffusion 1.x / 2.x weights -> `LatentModels`: pipeline folders in diffusers' layout and original-format
single `.safetensors` files (`read_pretrained` reads either; `is_stable_diffusion` tells them from other weights).

A folder holds `model_index.json` (`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` or
`StableDiffusionInpaintPipeline`), `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/`; weights are
read from safetensors only (never pickles), optionally a variant such as "fp16", and become float32. An x4
upscaler folder (`StableDiffusionUpscalePipeline`) also holds `low_res_scheduler/` and `max_noise_level`; every key
of its model_index.json is read or refused (`upscaler_settings`). SDXL folders (`StableDiffusionXLPipeline`,
`StableDiffusionXLImg2ImgPipeline`, `StableDiffusionXLInpaintPipeline`) are read by `jaxdiff.latent.sdxl`, SDXL
single files by `read_sdxl_single_file`.

The scheduler config supplies the training noise schedule (betas, prediction type) whatever its class (SD folders
ship PNDM, DDIM, Euler, ... schedulers that share these keys), plus DDIMScheduler's sampling settings
`timestep_spacing`, `steps_offset` and `set_alpha_to_one`; our pipeline picks its sampler itself.
"""

from __future__ import annotations

import os
import pathlib
from typing import NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp

from jaxdiff.weights.torch_layout import param_from_torch
from jaxdiff.weights.files import CONFIG_FILE, MODEL_INDEX_FILE, load_json
from jaxdiff.latent.component_weights import (
    CLIP_PREFIX,
    check_index_entry,
    clip_names,
    param_shapes,
    read_autoencoder,
    read_clip_text,
    torch_shape,
    vae_names,
)
from jaxdiff.weights.matching import match_names
from jaxdiff.weights.safetensors_reader import open_safetensors, read_tensor
from jaxdiff.latent.unet_weights import (
    diffusers_tensor_name,
    read_unet_condition,
    unet_condition_shapes,
)
from jaxdiff.checks import is_int
from jaxdiff.errors import MissingWeightsError, UsageError, WeightsError
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.unet_condition_config import config_from_diffusers
from jaxdiff.diffusion.scheduler_config import SchedulerSettings, scheduler_settings
from jaxdiff.latent.bundle import PIPELINE_CLASSES, SDXL_PIPELINE_CLASSES, UPSCALE_PIPELINE_CLASS, LatentModels
from jaxdiff.latent.clip_tokenizer import CLIPTokenizer
from jaxdiff.latent.sdxl import read_sdxl, read_sdxl_folder, sdxl_models, sdxl_refiner, vae_dtype

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
READ_CLASSES = (*PIPELINE_CLASSES, UPSCALE_PIPELINE_CLASS, *SDXL_PIPELINE_CLASSES)  # the pipeline folders read here
SCHEDULER_CONFIG_FILE = "scheduler_config.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def refuse_pickle(path: pathlib.Path) -> None:
    """ValueError for a pickle checkpoint (never unpickled), naming the safetensors file to use instead."""
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path} is a pickle checkpoint, which jaxdiff never unpickles; use its safetensors version "
            f"({path.with_suffix('.safetensors').name})"
        )


def _pipeline_class(folder: pathlib.Path) -> str:
    index_file = folder / MODEL_INDEX_FILE
    if not index_file.is_file():
        raise WeightsError(f"{folder} is not a Stable Diffusion folder: it has no {MODEL_INDEX_FILE}")
    name = load_json(index_file).get("_class_name")
    if name not in READ_CLASSES:
        raise WeightsError(f"{index_file}: _class_name={name!r}; supported pipelines: {', '.join(READ_CLASSES)}")
    if name in SDXL_PIPELINE_CLASSES:
        return name  # its components are checked by `read_sdxl`
    components = (*COMPONENTS, "low_res_scheduler") if name == UPSCALE_PIPELINE_CLASS else COMPONENTS
    missing = [c for c in components if not (folder / c).is_dir()]
    if missing:
        raise WeightsError(f"{folder} lacks the component folders {missing} of a Stable Diffusion pipeline")
    return name


def _check_text_width(settings: dict, folder: pathlib.Path) -> None:
    """ValueError unless the text encoder's width is the U-Net's cross_attention_dim (checked on the configs)."""
    try:
        width = clip_text_config(settings["text_encoder"]).hidden_size
        context = config_from_diffusers(settings["unet"]).cross_attention_dim
    except ValueError:
        return  # reading the component names the bad setting
    if width != context:
        raise WeightsError(f"{folder}: text_encoder hidden_size={width} but the unet's cross_attention_dim={context}")


def read_stable_diffusion(
    folder: str | os.PathLike, *, variant: str | None = None, dtype: str = "float32"
) -> LatentModels:
    """Read a diffusers Stable Diffusion folder; `variant` (e.g. "fp16") picks `<weights>.<variant>.safetensors`,
    `dtype` is the networks' compute dtype and their parameters' ("float32", or "bfloat16" for inference: half the
    memory; an SDXL VAE whose config says force_upcast stays float32). Configs are
    checked before any weights are read; one ValueError lists every missing, unexpected or mis-shaped tensor."""
    folder = pathlib.Path(folder)
    refuse_pickle(folder)
    if not folder.is_dir():
        raise MissingWeightsError(f"{folder} is not a folder")
    pipeline_class = _pipeline_class(folder)
    if pipeline_class in SDXL_PIPELINE_CLASSES:
        return read_sdxl(folder, variant=variant, dtype=dtype)
    scheduler_file, scheduler_config = _scheduler_config(folder, "scheduler")
    scheduler = scheduler_settings(scheduler_config, str(scheduler_file))
    tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
    settings = _config_folder_settings(folder)
    added = settings["unet"].get("addition_embed_type")
    if added is not None:
        raise WeightsError(f"{folder / 'unet' / CONFIG_FILE}: addition_embed_type={added!r}; a {pipeline_class} "
                           "U-Net has none (SDXL U-Nets are read from StableDiffusionXLPipeline folders)")  # fmt: skip
    _check_text_width(settings, folder)
    low_res_scheduler, max_noise_level = None, None
    if pipeline_class == UPSCALE_PIPELINE_CLASS:
        low_res_scheduler, max_noise_level = upscaler_settings(folder, settings)
    unet_config, unet_params = read_unet_condition(folder / "unet", variant=variant, dtype=dtype)
    vae_config, vae_params = read_autoencoder(folder / "vae", variant=variant, dtype=dtype)
    text_config, text_params = read_clip_text(folder / "text_encoder", variant=variant, dtype=dtype)
    return LatentModels(
        pipeline_class=pipeline_class, unet_config=unet_config, unet_params=unet_params, vae_config=vae_config,
        vae_params=vae_params, text_config=text_config, text_params=text_params, tokenizer=tokenizer,
        tokenizer_folder=folder / "tokenizer", scheduler=scheduler, settings=settings,
        low_res_scheduler=low_res_scheduler, max_noise_level=max_noise_level,
    )


# --------------------------------------------------------------------------- x4 upscaler folders

# The components of an upscaler's model_index.json and the classes read for each (None: the class its own config
# names, which must agree); the optional components jaxdiff does not run (accepted only as [null, null]); the
# other keys read.
UPSCALER_COMPONENTS = {
    "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "scheduler": None, "low_res_scheduler": ("DDPMScheduler",),
}  # fmt: skip
UPSCALER_UNUSED = ("safety_checker", "feature_extractor", "watermarker")
UPSCALER_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "max_noise_level")
DEFAULT_MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's default
UPSCALER_SCALING_FACTOR = 0.08333  # the VAE scaling factor StableDiffusionUpscalePipeline imposes
LOW_RES_CHANNELS = 3  # the RGB low-resolution image the U-Net sees beside the latents


def _scheduler_config(folder: pathlib.Path, component: str) -> tuple[pathlib.Path, dict]:
    """(path, dict) of `component`/scheduler_config.json."""
    path = folder / component / SCHEDULER_CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{folder / component} has no {SCHEDULER_CONFIG_FILE}")
    return path, load_json(path)


def upscaler_settings(folder: pathlib.Path, settings: dict) -> tuple[SchedulerSettings, int]:
    """(low_res_scheduler settings, max_noise_level) of an x4 upscaler folder, after checking every key of its
    model_index.json (components of the classes read, unused components null, max_noise_level an int in
    [0, num_class_embeds − 1]) and that the networks fit the pipeline: the VAE's scaling_factor 0.08333, the U-Net
    taking latent_channels + 3 input channels and the noise level as its class label. One WeightsError line each."""
    index_file = folder / MODEL_INDEX_FILE
    index = load_json(index_file)
    for key, value in index.items():
        check_index_entry(index_file, key, value, components=UPSCALER_COMPONENTS, unused=UPSCALER_UNUSED,
                          keys=UPSCALER_KEYS)  # fmt: skip
    for component in ("scheduler", "low_res_scheduler"):
        path, config = _scheduler_config(folder, component)  # the low-resolution one kept for the end
        named = index.get(component, [None, None])[1]
        if config.get("_class_name") != named:
            raise WeightsError(f"{path}: _class_name={config.get('_class_name')!r} but {MODEL_INDEX_FILE} names "
                               f"{component} {named!r}")  # fmt: skip
    unet, vae = settings["unet"], settings["vae"]
    classes = unet.get("num_class_embeds")
    if not is_int(classes, numpy=False) or classes < 1:
        raise WeightsError(f"{folder / 'unet'}: num_class_embeds={classes!r}; the upscaler's U-Net takes the noise "
                           "level as its class label (an int >= 1)")  # fmt: skip
    level = index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
    if not is_int(level, numpy=False) or not 0 <= level < classes:
        raise WeightsError(f"{index_file}: max_noise_level={level!r} must be an int in [0, {classes - 1}] (the U-Net's "
                           f"num_class_embeds={classes} noise levels)")  # fmt: skip
    if vae.get("scaling_factor") != UPSCALER_SCALING_FACTOR:
        raise WeightsError(f"{folder / 'vae'}: scaling_factor={vae.get('scaling_factor')!r}; the x4 upscaler's VAE "
                           f"has {UPSCALER_SCALING_FACTOR} (diffusers' pipeline imposes it): set it in vae/"
                           f"{CONFIG_FILE}")  # fmt: skip
    channels = vae.get("latent_channels", 4) + LOW_RES_CHANNELS
    if unet.get("in_channels") != channels:
        raise WeightsError(f"{folder / 'unet'}: in_channels={unet.get('in_channels')!r}; the upscaler's U-Net takes "
                           f"the VAE's latent_channels + {LOW_RES_CHANNELS} = {channels}")  # fmt: skip
    return scheduler_settings(config, str(path)), level


# --------------------------------------------------------------------------- single-file checkpoints

# Scheduler settings of the released models (their diffusers scheduler configs' noise schedule and DDIM keys).
SCHEDULER_PRESETS = {
    "sd1": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                timestep_spacing="leading"),
}  # fmt: skip
SCHEDULER_PRESETS["sd2"] = dict(SCHEDULER_PRESETS["sd1"])
SCHEDULER_PRESETS["sd2-v"] = dict(SCHEDULER_PRESETS["sd1"], prediction_type="v_prediction")
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model."}  # transformers / OpenCLIP
# The text encoders' tensors of SD 1.x / 2.x single files: prefix -> (component, whether its names are OpenCLIP's).
SD_TEXT_PREFIXES = {CLIP_PREFIXES["sd1"]: ("text_encoder", False), CLIP_PREFIXES["sd2"]: ("text_encoder", True)}
# Original tensors that SD pipelines do not use: training buffers, the autoencoder's training loss, OpenCLIP's
# projection and logit scale, CLIP's position-id buffer.
UNUSED_ORIGINAL = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus", "posterior_",
                   "model_ema.", "first_stage_model.loss.", "cond_stage_model.model.text_projection",
                   "cond_stage_model.model.logit_scale", "cond_stage_model.transformer.text_model.embeddings.position_ids",
                   "logvar", "lvlb_weights")  # fmt: skip
RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
VAE_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OPENCLIP_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip


class Source(NamedTuple):
    """Where a diffusers-named tensor lies in the single file: its original name and the rows it takes (a third
    of OpenCLIP's fused q/k/v projection) or None for all; `squeeze` drops the 1×1 of a conv used as Linear;
    `transpose` turns OpenCLIP's [in, out] text_projection (applied as x @ P) into PyTorch's Linear [out, in]."""

    name: str
    rows: tuple[int, int] | None = None
    squeeze: bool = False
    transpose: bool = False


def _split_name(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_diffusers_name(name: str, settings: dict) -> str | None:
    """The diffusers name of an original (LDM / SGM) U-Net tensor name without its prefix, None if it has none.
    `label_emb` is the x4 upscaler's label table (`label_emb.weight`), or `label_emb.0.0` / `label_emb.0.2` the
    class embedding of a `class_embed_type` (SD 2.1 unCLIP) or else SDXL's add embedding."""
    per_block = settings.get("layers_per_block", 2) + 1
    up_attention = [t.startswith("CrossAttn") for t in settings["up_block_types"]]
    label_mlp = "class_embedding" if settings.get("class_embed_type") else "add_embedding"
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
             "label_emb.weight": "class_embedding.weight", "label_emb.0.0.": f"{label_mlp}.linear_1.",
             "label_emb.0.2.": f"{label_mlp}.linear_2."}  # fmt: skip
    for old, new in fixed.items():
        if name.startswith(old):
            return new + name[len(old) :]
    parts = name.split(".", 3)
    if parts[0] == "middle_block" and len(parts) > 2:
        kind = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}.get(parts[1])
        rest = ".".join(parts[2:])
        return None if kind is None else f"mid_block.{kind}.{_split_name(rest, RESNET_NAMES)}"
    if parts[0] not in ("input_blocks", "output_blocks") or len(parts) < 4 or not parts[1].isdigit():
        return None
    index, layer, rest = int(parts[1]), parts[2], parts[3]
    if parts[0] == "input_blocks":
        block, j = divmod(index - 1, per_block)
        if j == per_block - 1:
            return f"down_blocks.{block}.downsamplers.0.conv{rest[2:]}" if layer == "0" and rest[:3] == "op." else None
        prefix = f"down_blocks.{block}"
        attention = layer == "1"
    else:
        block, j = divmod(index, per_block)
        prefix = f"up_blocks.{block}"
        if block >= len(up_attention):
            return None
        upsampler = "2" if up_attention[block] else "1"
        if layer == upsampler and rest.startswith("conv."):
            return f"{prefix}.upsamplers.0.{rest}"
        attention = layer == "1" and up_attention[block]
    if layer == "0":
        return f"{prefix}.resnets.{j}.{_split_name(rest, RESNET_NAMES)}"
    return f"{prefix}.attentions.{j}.{rest}" if attention else None


def vae_diffusers_name(name: str, settings: dict) -> tuple[str, bool] | None:
    """(diffusers name, squeeze) of an original autoencoder tensor name without its prefix; None if it has none."""
    levels = len(settings.get("block_out_channels", (64,)))
    coder, _, rest = name.partition(".")
    if coder not in ("encoder", "decoder"):
        return (name, False) if coder in ("quant_conv", "post_quant_conv") else None
    parts = rest.split(".")
    if parts[0] in ("conv_in", "conv_out"):
        return f"{coder}.{rest}", False
    if parts[0] == "norm_out":
        return f"{coder}.conv_norm_out.{'.'.join(parts[1:])}", False
    if parts[0] == "mid" and len(parts) > 2 and parts[1] in ("block_1", "block_2"):
        return f"{coder}.mid_block.resnets.{int(parts[1][-1]) - 1}.{'.'.join(parts[2:])}", False
    if parts[0] == "mid" and len(parts) == 4 and parts[1] == "attn_1" and parts[2] in VAE_ATTENTION_NAMES:
        conv_weight = parts[2] != "norm" and parts[3] == "weight"  # a 1×1 conv in the original
        return f"{coder}.mid_block.attentions.0.{VAE_ATTENTION_NAMES[parts[2]]}.{parts[3]}", conv_weight
    if parts[0] in ("down", "up") and len(parts) >= 4 and parts[1].isdigit():
        level = int(parts[1]) if parts[0] == "down" else levels - 1 - int(parts[1])
        block = f"{coder}.{parts[0]}_blocks.{level}"
        if parts[2] == "block":
            resnet_rest = _split_name(".".join(parts[4:]), {"nin_shortcut": "conv_shortcut"})
            return f"{block}.resnets.{parts[3]}.{resnet_rest}", False
        if parts[2] in ("downsample", "upsample") and parts[3] == "conv":
            return f"{block}.{parts[2]}rs.0.{'.'.join(parts[3:])}", False
    return None


def openclip_diffusers_names(name: str) -> list[tuple[str, tuple[int, int] | None]] | None:
    """[(diffusers name, rows)] of an original OpenCLIP (SD 2.x) text tensor name without its prefix."""
    fixed = {"token_embedding.weight": "embeddings.token_embedding.weight",
             "positional_embedding": "embeddings.position_embedding.weight"}  # fmt: skip
    if name in fixed:
        return [(CLIP_PREFIX + fixed[name], None)]
    if name.startswith("ln_final."):
        return [(CLIP_PREFIX + "final_layer_norm." + name[len("ln_final.") :], None)]
    if name == "text_projection":  # SDXL's second encoder (CLIPTextModelWithProjection); transposed
        return [("text_projection.weight", None)]
    parts = name.split(".", 3)
    if parts[:2] != ["transformer", "resblocks"] or len(parts) < 4:
        return None
    layer = f"{CLIP_PREFIX}encoder.layers.{parts[2]}."
    if parts[3] in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = parts[3].rsplit("_", 1)[1]
        return [(f"{layer}self_attn.{proj}_proj.{leaf}", (k, k + 1)) for k, proj in enumerate("qkv")]
    return [(layer + _split_name(parts[3], OPENCLIP_NAMES), None)]


def single_file_sources(names: dict[str, tuple[int, ...]], settings: dict, text_layers: int, *,
                        text_prefixes: dict[str, tuple[str, bool]] = SD_TEXT_PREFIXES,
                        unused: tuple[str, ...] = UNUSED_ORIGINAL) -> tuple[
        dict[str, dict[str, tuple[Source, tuple[int, ...]]]], list[str]]:  # fmt: skip
    """Each component's diffusers tensor names -> (Source, shape) from the original names and shapes of a
    single file, and the names that belong to none. The text encoders' tensors are found by `text_prefixes`
    (prefix -> (component, OpenCLIP names)); OpenCLIP layers from `text_layers` on are unused (SD 2.x takes the
    penultimate layer); names starting with one of `unused` are skipped."""
    sources: dict[str, dict[str, tuple[Source, tuple[int, ...]]]] = {"unet": {}, "vae": {}}
    sources.update({component: {} for component, _ in text_prefixes.values()})
    leftover = []
    for name, shape in names.items():
        if name.startswith(unused):
            continue
        text = next(((prefix, *entry) for prefix, entry in text_prefixes.items() if name.startswith(prefix)), None)
        found = None
        if name.startswith(UNET_PREFIX):
            target = unet_diffusers_name(name[len(UNET_PREFIX) :], settings["unet"])
            found = target and ("unet", [(target, Source(name), shape)])
        elif name.startswith(VAE_PREFIX):
            target = vae_diffusers_name(name[len(VAE_PREFIX) :], settings["vae"])
            if target:
                squeezed = shape[:2] if target[1] else shape
                found = ("vae", [(target[0], Source(name, squeeze=target[1]), squeezed)])
        elif text is not None and not text[2]:
            found = (text[1], [(name[len(text[0]) :], Source(name), shape)])
        elif text is not None:
            rest = name[len(text[0]) :]
            if rest.startswith("transformer.resblocks.") and int(rest.split(".")[2]) >= text_layers:
                continue
            targets = openclip_diffusers_names(rest)
            if targets:
                third, projection = shape[0] // 3, rest == "text_projection"
                found = (text[1], [
                    (target, Source(name, rows and (rows[0] * third, rows[1] * third), transpose=projection),
                     shape[::-1] if projection else shape if rows is None else (third, *shape[1:]))
                    for target, rows in targets
                ])  # fmt: skip
        if not found:
            leftover.append(name)
            continue
        component, entries = found
        for target, source, target_shape in entries:
            sources[component][target] = (source, tuple(target_shape))
    return sources, leftover


def _config_folder_settings(folder: pathlib.Path) -> dict:
    settings = {}
    for component in ("unet", "vae", "text_encoder"):
        path = folder / component / CONFIG_FILE
        if not path.is_file():
            raise WeightsError(f"{folder} has no {component}/{CONFIG_FILE}")
        settings[component] = load_json(path)
    if not (folder / "tokenizer").is_dir():
        raise WeightsError(f"{folder} has no tokenizer/")
    return settings


def read_single_file(
    file: str | os.PathLike, *, config_folder: str | os.PathLike, scheduler: str | dict = "sd1",
    dtype: str = "float32",
) -> LatentModels:  # fmt: skip
    """Read an original-format Stable Diffusion 1.x / 2.x `.safetensors` checkpoint (`model.diffusion_model.*`,
    `first_stage_model.*`, `cond_stage_model.transformer.*` or OpenCLIP `cond_stage_model.model.*`).

    A single file holds no configs or tokenizer: `config_folder` is a diffusers SD folder giving
    unet/vae/text_encoder config.json and tokenizer/ (its weights are not read). `scheduler` is a preset
    ("sd1", "sd2", "sd2-v") or a scheduler config dict. Configs are checked first; one ValueError then lists
    every missing, unexpected or mis-shaped tensor (diffusers names; unexpected ones by their original name).
    """

    file, config_folder = check_single_file(file), pathlib.Path(config_folder)
    if isinstance(scheduler, str):
        if scheduler not in SCHEDULER_PRESETS:
            raise UsageError(f"unknown scheduler preset {scheduler!r}; expected one of {sorted(SCHEDULER_PRESETS)}")
        scheduler = dict(SCHEDULER_PRESETS[scheduler])
    scheduler_config = scheduler_settings(scheduler, "scheduler")
    settings = _config_folder_settings(config_folder)
    if settings["unet"].get("addition_embed_type") is not None:
        raise WeightsError(f"{config_folder / 'unet' / CONFIG_FILE}: addition_embed_type="
                           f"{settings['unet']['addition_embed_type']!r} (SDXL); SDXL single files, with their two "
                           "text encoders, are read with an SDXL pipeline folder as config folder "
                           "(read_sdxl_single_file)")  # fmt: skip
    _check_text_width(settings, config_folder)
    tokenizer = CLIPTokenizer.from_folder(config_folder / "tokenizer")
    try:
        unet_config = config_from_diffusers(settings["unet"], dtype=dtype)
    except ValueError as err:
        raise WeightsError(f"{config_folder / 'unet' / CONFIG_FILE}: {err}") from None
    vae_config = autoencoder_config(settings["vae"], dtype=dtype)
    text_config = clip_text_config(settings["text_encoder"], dtype=dtype)

    shapes = original_shapes(unet_config, vae_config, {"text_encoder": text_config})
    params = read_original_tensors(file, shapes, settings, text_config.num_hidden_layers)
    return LatentModels(
        unet_config=unet_config, unet_params=params["unet"], vae_config=vae_config, vae_params=params["vae"],
        text_config=text_config, text_params=params["text_encoder"], tokenizer=tokenizer,
        tokenizer_folder=config_folder / "tokenizer", scheduler=scheduler_config, settings=settings,
    )


def check_single_file(file: str | os.PathLike) -> pathlib.Path:
    """`file` as a Path after checking it is an existing `.safetensors` file (a pickle refused by name)."""
    file = pathlib.Path(file)
    refuse_pickle(file)
    if file.suffix != ".safetensors":
        raise WeightsError(f"{file}: a single-file checkpoint must be a .safetensors file")
    if not file.is_file():
        raise MissingWeightsError(f"{file} does not exist")
    return file


def original_shapes(unet_config, vae_config, text_configs: dict) -> dict:
    """`read_original_tensors`' shapes: component -> (our path -> shape, our path -> candidate diffusers names,
    the parameters' dtype: the network's compute dtype) of the U-Net, the autoencoder and the CLIP text encoders
    `text_configs` (component -> config), traced without allocating."""
    side = 2 ** (len(vae_config.block_out_channels) - 1)
    image = jax.ShapeDtypeStruct((1, side, side, vae_config.in_channels), jnp.float32)
    shapes = {"unet": (unet_condition_shapes(unet_config), lambda p: (diffusers_tensor_name(p),), unet_config.dtype),
              "vae": (param_shapes(create_autoencoder(vae_config), image), vae_names, vae_config.dtype)}  # fmt: skip
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    for component, config in text_configs.items():
        shapes[component] = (param_shapes(create_clip_text(config), ids), clip_names, config.dtype)
    return shapes


def read_original_tensors(file: pathlib.Path, shapes: dict, settings: dict, text_layers: int, *,
                          text_prefixes: dict[str, tuple[str, bool]] = SD_TEXT_PREFIXES,
                          unused: tuple[str, ...] = UNUSED_ORIGINAL) -> dict:  # fmt: skip
    """Each component's parameter tree (NumPy, our layouts) from an original-format single file; `shapes` maps
    component -> (our path -> shape, our path -> candidate diffusers names, dtype); `text_prefixes` and
    `unused` as `single_file_sources`'."""

    with open_safetensors(file) as f:
        names = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118 (a safe_open handle)
        sources, leftover = single_file_sources(names, settings, text_layers, text_prefixes=text_prefixes,
                                                unused=unused)  # fmt: skip
        found, problems = {}, []
        for component, (component_shapes, candidates, _) in shapes.items():
            wanted = {p: (candidates(p), torch_shape(p, s)) for p, s in component_shapes.items()}
            available = {name: shape for name, (_, shape) in sources[component].items()}
            try:
                found[component] = match_names(wanted, available, source=component)
            except ValueError as err:
                problems.append(str(err))
        if leftover:
            problems.append(f"  {len(leftover)} unexpected (no component): " + ", ".join(sorted(leftover)[:40]))
        if problems:
            raise WeightsError(f"{file} does not fit the models:\n" + "\n".join(problems))
        params = {}
        for component, pairs in found.items():
            component_shapes, _, dtype = shapes[component]
            flat = {}
            for path, name in pairs.items():
                source = sources[component][name][0]
                array = read_tensor(file, source.name)
                if source.rows is not None:
                    array = array[source.rows[0] : source.rows[1]]
                if source.squeeze:
                    array = array.reshape(array.shape[:2])
                if source.transpose:
                    array = array.T
                flat[path] = param_from_torch(path, array, component_shapes[path], dtype)
            params[component] = flax.traverse_util.unflatten_dict(flat)
    return params


# --------------------------------------------------------------------------- single-file SDXL releases

# Original single-file SDXL releases (`sd_xl_base_1.0.safetensors`, `sd_xl_refiner_1.0.safetensors`: Stability's sgm
# layout): the U-Net under `model.diffusion_model.` (`label_emb.0.0` / `label_emb.0.2` the text_time add
# embedding), the autoencoder under `first_stage_model.`, CLIP ViT-L under `conditioner.embedders.0.transformer.`
# (transformers' names) and OpenCLIP bigG under `conditioner.embedders.1.model.` (open_clip's names: q/k/v fused in
# `attn.in_proj_*`, `ln_final`, `text_projection` [width, projection] applied as x @ P); a refiner file holds bigG
# only, under `conditioner.embedders.0.model.`. Its configs, scheduler and tokenizers come, as with diffusers'
# `from_single_file(file, config=folder)`, from a diffusers SDXL folder of the same kind (its weights unread).

# The text encoders' tensors: prefix -> (component, whether its names are OpenCLIP's), for a file with both
# encoders (base, inpainting) and for a refiner's.
BASE_TEXT_PREFIXES = {"conditioner.embedders.0.transformer.": ("text_encoder", False),
                      "conditioner.embedders.1.model.": ("text_encoder_2", True)}  # fmt: skip
REFINER_TEXT_PREFIXES = {"conditioner.embedders.0.model.": ("text_encoder_2", True)}
# Tensors the pipelines do not use: CLIP's position-id buffer and OpenCLIP's logit scale (besides SD's).
SDXL_UNUSED = (*UNUSED_ORIGINAL, "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
               "conditioner.embedders.1.model.logit_scale", "conditioner.embedders.0.model.logit_scale")  # fmt: skip


def read_sdxl_single_file(file: str | os.PathLike, *, config_folder: str | os.PathLike,
                          dtype: str = "float32") -> LatentModels:  # fmt: skip
    """The `LatentModels` of an original-format SDXL `.safetensors` file with the configs, scheduler and tokenizers
    of `config_folder` (a diffusers SDXL folder; base and inpainting folders take base files, refiner folders
    refiner files); `dtype` as `read_stable_diffusion`'s. Everything but the tensors is checked first."""
    file, config_folder = check_single_file(file), pathlib.Path(config_folder)
    if sdxl_refiner(config_folder) is None:
        raise UsageError(f"config_folder={str(config_folder)!r} must be a diffusers SDXL folder (model_index.json "
                         f"naming an SDXL pipeline) for the SDXL single file {file}")  # fmt: skip
    configs = read_sdxl_folder(config_folder)
    settings = configs.settings
    try:
        unet_config = config_from_diffusers(settings["unet"], dtype=dtype)
        vae_config = autoencoder_config(settings["vae"], dtype=vae_dtype(configs, dtype))
        text_configs = {key: clip_text_config(settings[key], dtype=dtype)
                        for key in ("text_encoder", "text_encoder_2") if key in settings}  # fmt: skip
    except ValueError as err:
        raise WeightsError(f"{config_folder}: {err}") from None
    prefixes = BASE_TEXT_PREFIXES if "text_encoder" in text_configs else REFINER_TEXT_PREFIXES
    shapes = original_shapes(unet_config, vae_config, text_configs)
    params = read_original_tensors(file, shapes, settings, text_configs["text_encoder_2"].num_hidden_layers,
                                   text_prefixes=prefixes, unused=SDXL_UNUSED)  # fmt: skip
    networks = {"unet": (unet_config, params["unet"]), "vae": (vae_config, params["vae"]),
                **{key: (config, params[key]) for key, config in text_configs.items()}}  # fmt: skip
    return sdxl_models(config_folder, configs, networks)


def read_pretrained(
    path: str | os.PathLike, *, variant: str | None = None, config_folder: str | os.PathLike | None = None,
    scheduler: str | dict = "sd1", dtype: str = "float32",
) -> LatentModels:  # fmt: skip
    """A diffusers SD folder (`read_stable_diffusion`; `variant` applies) or an original-format single
    `.safetensors` file (`read_single_file`; `config_folder` and `scheduler` apply; with an SDXL folder as
    `config_folder`, `read_sdxl_single_file`)."""
    path = pathlib.Path(path)
    refuse_pickle(path)
    if path.is_dir():
        return read_stable_diffusion(path, variant=variant, dtype=dtype)
    if config_folder is None:
        raise UsageError(f"{path}: a single-file checkpoint needs config_folder (a diffusers SD folder's configs)")
    if variant is not None:
        raise UsageError(f"variant={variant!r}: {path} is a single file, which has no variants (a variant picks a "
                         "folder's weight files)")  # fmt: skip
    if sdxl_refiner(config_folder) is not None:
        if scheduler != "sd1":
            raise UsageError(f"scheduler={scheduler!r}: an SDXL single file takes its config_folder's scheduler")
        return read_sdxl_single_file(path, config_folder=config_folder, dtype=dtype)
    return read_single_file(path, config_folder=config_folder, scheduler=scheduler, dtype=dtype)


def is_stable_diffusion(path: str | os.PathLike) -> bool:
    """Whether `path` is a Stable Diffusion pipeline folder (by its model_index.json) or an original-format
    single `.safetensors` file (by its `model.diffusion_model.` tensor names)."""
    path = pathlib.Path(path)
    index_file = path / MODEL_INDEX_FILE
    if index_file.is_file():
        return load_json(index_file).get("_class_name") in READ_CLASSES
    if path.is_file() and path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            return any(name.startswith(UNET_PREFIX) for name in f.keys())  # noqa: SIM118 (a safe_open handle)
    return False


def is_upscaler(path: str | os.PathLike) -> bool:
    """Whether `path` is an x4 upscaler folder (model_index.json's `_class_name` StableDiffusionUpscalePipeline)."""
    index_file = pathlib.Path(path) / MODEL_INDEX_FILE
    return index_file.is_file() and load_json(index_file).get("_class_name") == UPSCALE_PIPELINE_CLASS
