"""Writing `LatentModels` as a Stable Diffusion folder in diffusers' layout (the layout
`jaxdiff.latent.stable_diffusion` reads)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import flax.traverse_util
import numpy as np
import safetensors.numpy

from jaxdiff.errors import OutputExistsError
from jaxdiff.latent.bundle import LatentModels
from jaxdiff.latent.component_weights import CLIP_PREFIX, CLIP_WEIGHTS_STEM, VAE_WEIGHTS_STEM, torch_name
from jaxdiff.latent.stable_diffusion import SCHEDULER_CONFIG_FILE
from jaxdiff.latent.unet_weights import diffusers_tensor_name
from jaxdiff.weights.files import CONFIG_FILE, DIFFUSERS_WEIGHTS_STEM, MODEL_INDEX_FILE


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


def write_stable_diffusion(model: LatentModels, folder: str | os.PathLike) -> None:
    """Write `model` as a diffusers Stable Diffusion folder that `DiffusionPipeline.from_pretrained` loads:
    model_index.json, each network's config.json and safetensors weights, the tokenizer files, the scheduler
    config (as a DDIMScheduler). The target must not exist yet."""
    folder = pathlib.Path(folder)
    if folder.exists():
        raise OutputExistsError(f"{folder} already exists; choose a new folder to export to")
    text_class = "CLIPTextModelWithProjection" if model.text_config.with_projection else "CLIPTextModel"
    parts = {
        "unet": (("diffusers", "UNet2DConditionModel"), DIFFUSERS_WEIGHTS_STEM, model.unet_params, diffusers_tensor_name),
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
