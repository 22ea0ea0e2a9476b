"""Reading the files of a diffusers-style folder: its JSON configs and its safetensors weights, and the file names
diffusers gives them."""

from __future__ import annotations

import json
import pathlib

from jaxdiff.errors import WeightsError

CONFIG_FILE = "config.json"  # a component's settings
MODEL_INDEX_FILE = "model_index.json"  # a pipeline folder's component classes
DIFFUSERS_WEIGHTS_STEM = "diffusion_pytorch_model"  # a diffusers model's weights file, before .safetensors


def load_json(path: pathlib.Path) -> dict:
    """The JSON object in `path`; WeightsError naming the file if it is not valid JSON or not an object."""
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise WeightsError(f"{path} must hold a JSON object, got {type(content).__name__}")
    return content


def weights_file(folder: pathlib.Path, stem: str, variant: str | None = None) -> pathlib.Path:
    """`{stem}.safetensors`, or `{stem}.{variant}.safetensors` for a variant such as "fp16"; without a variant,
    a folder whose only safetensors file has another name gives that file. ValueError listing the files otherwise."""
    name = f"{stem}.safetensors" if variant is None else f"{stem}.{variant}.safetensors"
    if (folder / name).is_file():
        return folder / name
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    if variant is None and len(present) == 1:
        return folder / present[0]
    missing = f"{folder} has no {name}" + (f" (variant={variant!r})" if variant else "")
    raise WeightsError(f"{missing}; its safetensors files: {present}")
