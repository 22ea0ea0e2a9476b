"""Reading the files of a diffusers-style folder: its JSON configs and its safetensors weights, and the file names
diffusers gives them."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from jaxdiff.errors import WeightsError

CONFIG_FILE = "config.json"  # a component's settings
MODEL_INDEX_FILE = "model_index.json"  # a pipeline folder's component classes
DIFFUSERS_WEIGHTS_STEM = "diffusion_pytorch_model"  # a diffusers model's weights file, before .safetensors


def parse_json(text: str | bytes, source: str) -> Any:
    """The value of JSON `text` (bytes: UTF-8); WeightsError "`source` is not valid JSON: ..." in one line
    otherwise, for text that is not JSON, not UTF-8, nested deeper than Python's recursion limit or holding an
    integer of more digits than Python converts."""
    try:
        return json.loads(text)
    except RecursionError:
        raise WeightsError(f"{source} is not valid JSON: nested too deeply") from None
    except (TypeError, ValueError) as err:  # not text; json.JSONDecodeError, UnicodeDecodeError, too many digits
        raise WeightsError(f"{source} is not valid JSON: {' '.join(str(err).split())}") from None


def load_json(path: pathlib.Path) -> dict:
    """The JSON object in `path` (see `parse_json`); WeightsError naming the file if it is not valid JSON or not an
    object. Every JSON settings file of a weights folder (config.json, model_index.json, scheduler and tokenizer
    settings) is read so."""
    content = parse_json(path.read_bytes(), str(path))
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
