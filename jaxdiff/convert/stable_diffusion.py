"""Stable Diffusion 1.x / 2.x pipeline folders in diffusers' layout <-> our networks' configs and parameters.

A folder holds `model_index.json` (`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` or
`StableDiffusionInpaintPipeline`), `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/`; weights are
read from safetensors only (never pickles), optionally a variant such as "fp16", and become float32.

The scheduler config supplies the training noise schedule (betas, prediction type) whatever its class (SD folders
ship PNDM, DDIM, Euler, ... schedulers that share these keys), plus DDIMScheduler's sampling settings
`timestep_spacing`, `steps_offset` and `set_alpha_to_one`; our pipeline picks its sampler itself.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, NamedTuple

import flax.traverse_util
import ml_collections
import numpy as np
import safetensors.numpy

from jaxdiff.convert.diffusers_format import MODEL_INDEX_FILE, _load_json, apply_scheduler_config
from jaxdiff.convert.latent_weights import (
    CLIP_PREFIX,
    CLIP_WEIGHTS_STEM,
    CONFIG_FILE,
    VAE_WEIGHTS_STEM,
    read_autoencoder,
    read_clip_text,
    torch_name,
)
from jaxdiff.convert.unet_condition_weights import WEIGHTS_STEM as UNET_WEIGHTS_STEM
from jaxdiff.convert.unet_condition_weights import diffusers_tensor_name, read_unet_condition
from jaxdiff.schedule import Schedule, schedule_from_config
from jaxdiff.tokenizer import CLIPTokenizer

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SCHEDULER_CONFIG_FILE = "scheduler_config.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# DDIMScheduler's defaults for the settings our samplers read besides the noise schedule.
SAMPLING_DEFAULTS = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True}


class SchedulerSettings(NamedTuple):
    """The training schedule and how diffusers' DDIMScheduler places its steps on it.

    mean_type: what the U-Net predicts, "eps", "v" or "x_start". timestep_spacing: "leading", "trailing" or
    "linspace"; steps_offset: added to "leading" steps; set_alpha_to_one: whether DDIM's last step goes to
    ᾱ = 1 (else to ᾱ of step 0). `config` is the scheduler_config.json dict, kept for export.
    """

    schedule: Schedule
    mean_type: str
    timestep_spacing: str
    steps_offset: int
    set_alpha_to_one: bool
    config: dict


class StableDiffusion(NamedTuple):
    """Everything a Stable Diffusion pipeline needs: each network's config and float32 NumPy parameters (our
    layouts), the tokenizer, the scheduler settings, the pipeline class and the source's config.json dicts."""

    pipeline_class: str
    unet_config: ml_collections.ConfigDict
    unet_params: dict
    vae_config: ml_collections.ConfigDict
    vae_params: dict
    text_config: ml_collections.ConfigDict
    text_params: dict
    tokenizer: CLIPTokenizer
    tokenizer_folder: pathlib.Path
    scheduler: SchedulerSettings
    settings: dict  # component -> its config.json dict


def scheduler_settings(config: dict, source: str) -> SchedulerSettings:
    """`SchedulerSettings` of a diffusers scheduler config dict; unsupported values raise ValueError naming them."""
    run_config = ml_collections.ConfigDict({"diffusion": {}, "sampling": {}})
    apply_scheduler_config(run_config, {**config, "_class_name": "DDIMScheduler"}, source)
    s = {key: config.get(key, default) for key, default in SAMPLING_DEFAULTS.items()}
    if s["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise ValueError(f"{source}: timestep_spacing={s['timestep_spacing']!r}; supported: {TIMESTEP_SPACINGS}")
    offset = s["steps_offset"]
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < run_config.diffusion.num_timesteps:
        raise ValueError(f"{source}: steps_offset={offset!r} must be an int in 0..num_train_timesteps-1")
    if not isinstance(s["set_alpha_to_one"], bool):
        raise ValueError(f"{source}: set_alpha_to_one={s['set_alpha_to_one']!r} must be true or false")
    schedule = schedule_from_config(run_config.diffusion)
    return SchedulerSettings(schedule, run_config.diffusion.mean_type, s["timestep_spacing"], offset,
                             s["set_alpha_to_one"], dict(config))  # fmt: skip


def _pipeline_class(folder: pathlib.Path) -> str:
    index_file = folder / MODEL_INDEX_FILE
    if not index_file.is_file():
        raise ValueError(f"{folder} is not a Stable Diffusion folder: it has no {MODEL_INDEX_FILE}")
    name = _load_json(index_file).get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ValueError(f"{index_file}: _class_name={name!r}; supported pipelines: {', '.join(PIPELINE_CLASSES)}")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise ValueError(f"{folder} lacks the component folders {missing} of a Stable Diffusion pipeline")
    return name


def read_stable_diffusion(
    folder: str | os.PathLike, *, variant: str | None = None, dtype: str = "float32"
) -> StableDiffusion:
    """Read a diffusers Stable Diffusion folder; `variant` (e.g. "fp16") picks `<weights>.<variant>.safetensors`,
    `dtype` is the networks' compute dtype ("float32" or "bfloat16"; parameters stay float32). Configs are
    checked before any weights are read; one ValueError lists every missing, unexpected or mis-shaped tensor."""
    folder = pathlib.Path(folder)
    if folder.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{folder} is a pickle checkpoint, which jaxdiff never unpickles; use its safetensors version "
            f"({folder.with_suffix('.safetensors').name})"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    pipeline_class = _pipeline_class(folder)
    scheduler_file = folder / "scheduler" / SCHEDULER_CONFIG_FILE
    if not scheduler_file.is_file():
        raise ValueError(f"{folder / 'scheduler'} has no {SCHEDULER_CONFIG_FILE}")
    scheduler = scheduler_settings(_load_json(scheduler_file), str(scheduler_file))
    tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
    settings = {name: _load_json(folder / name / CONFIG_FILE) for name in ("unet", "vae", "text_encoder")
                if (folder / name / CONFIG_FILE).is_file()}  # fmt: skip
    unet_config, unet_params = read_unet_condition(folder / "unet", variant=variant, dtype=dtype)
    vae_config, vae_params = read_autoencoder(folder / "vae", variant=variant, dtype=dtype)
    text_config, text_params = read_clip_text(folder / "text_encoder", variant=variant, dtype=dtype)
    if text_config.hidden_size != unet_config.cross_attention_dim:
        raise ValueError(
            f"{folder}: text_encoder hidden_size={text_config.hidden_size} but the unet's "
            f"cross_attention_dim={unet_config.cross_attention_dim}"
        )
    return StableDiffusion(
        pipeline_class, unet_config, unet_params, vae_config, vae_params, text_config, text_params,
        tokenizer, folder / "tokenizer", scheduler, settings,
    )  # fmt: skip


# --------------------------------------------------------------------------- export


def _torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """Our parameter in PyTorch layout: HWIO -> OIHW, dense [in, out] -> [out, in]; vectors and embeddings kept."""
    array = np.asarray(array, np.float32)
    if array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
    elif array.ndim == 2 and path[-1] == "kernel":
        array = array.T
    return np.ascontiguousarray(array)


def _tensors(params: dict, name) -> dict[str, np.ndarray]:
    return {name(p): _torch_layout(p, a) for p, a in flax.traverse_util.flatten_dict(params).items()}


def _clip_name(path: tuple[str, ...]) -> str:
    return torch_name(path) if path[0] == "text_projection" else CLIP_PREFIX + torch_name(path)


def write_stable_diffusion(model: StableDiffusion, folder: str | os.PathLike) -> None:
    """Write `model` as a diffusers Stable Diffusion folder that `DiffusionPipeline.from_pretrained` loads:
    model_index.json, each network's config.json and safetensors weights, the tokenizer files, the scheduler
    config (as a DDIMScheduler). The target must not exist yet."""
    folder = pathlib.Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; choose a new folder to export to")
    text_class = "CLIPTextModelWithProjection" if model.text_config.with_projection else "CLIPTextModel"
    parts = {
        "unet": (("diffusers", "UNet2DConditionModel"), UNET_WEIGHTS_STEM, model.unet_params, diffusers_tensor_name),
        "vae": (("diffusers", "AutoencoderKL"), VAE_WEIGHTS_STEM, model.vae_params, torch_name),
        "text_encoder": (("transformers", text_class), CLIP_WEIGHTS_STEM, model.text_params, _clip_name),
    }
    index: dict[str, Any] = {"_class_name": model.pipeline_class, "safety_checker": [None, None],
                             "feature_extractor": [None, None], "requires_safety_checker": False}  # fmt: skip
    folder.mkdir(parents=True)
    for component, (library_class, stem, params, name) in parts.items():
        (folder / component).mkdir()
        safetensors.numpy.save_file(_tensors(params, name), folder / component / f"{stem}.safetensors",
                                    metadata={"format": "pt"})  # fmt: skip
        (folder / component / CONFIG_FILE).write_text(json.dumps(model.settings[component], indent=2) + "\n")
        index[component] = list(library_class)
    shutil.copytree(model.tokenizer_folder, folder / "tokenizer")
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir()
    scheduler = {**model.scheduler.config, "_class_name": "DDIMScheduler"}
    (folder / "scheduler" / SCHEDULER_CONFIG_FILE).write_text(json.dumps(scheduler, indent=2) + "\n")
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (folder / MODEL_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
