"""Which format a path holds (`detect_format`), its checks, and reading the continuous-time formats
(`read_continuous`); the package docstring of `jaxdiff.readers` describes the formats."""

from __future__ import annotations

import json
import os
import pathlib
import re

import ml_collections

from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.training import checkpoint
from jaxdiff.readers.continuous_configs import (
    check_recipe_name, continuous_config, score_sde_config_name, score_sde_recipe,
)  # fmt: skip
from jaxdiff.readers.diffusers_format import unet_folder
from jaxdiff.readers.dit_pipeline import is_dit_pipeline
from jaxdiff.readers.edm_pickle import read_edm_snapshot
from jaxdiff.readers.score_folders import PIPELINE as SCORE_SDE_VE_PIPELINE
from jaxdiff.readers.score_folders import read_score_sde_ve_folder
from jaxdiff.readers.score_sde_checkpoint import read_score_sde_checkpoint
from jaxdiff.readers.tf_checkpoint import index_files
from jaxdiff.weights.files import MODEL_INDEX_FILE

FORMATS = ("tf", "diffusers", "jaxdiff", "score_sde", "edm", "score_sde_ve")
CONTINUOUS_FORMATS = ("score_sde", "edm", "score_sde_ve")
# Latent-space pipelines, read whole by `jaxdiff.sampling.pipeline.Pipeline.from_pretrained` (`jaxdiff sample
# --pretrained`): an original DiT `.pt` (with a VAE folder given apart) and a diffusers DiTPipeline folder.
DIT_FORMATS = ("dit", "dit_pipeline")
DIT_SUFFIXES = (".pt", ".pth")


_SCORE_SDE_FILE = re.compile(r"checkpoint_\d+")
_EDM_FILE = re.compile(r"network-snapshot-.*\.pkl")


def _is_score_sde(path: pathlib.Path) -> bool:
    """A `checkpoint_<N>` file, or a folder holding one itself or in `checkpoints/` or `checkpoints-meta/`."""
    if path.is_file():
        return bool(_SCORE_SDE_FILE.fullmatch(path.name))
    folders = (path, path / "checkpoints", path / "checkpoints-meta")
    return any(_SCORE_SDE_FILE.fullmatch(f.name) and f.is_file() for d in folders if d.is_dir() for f in d.iterdir())


def _is_score_sde_ve(path: pathlib.Path) -> bool:
    """A folder whose model_index.json names diffusers' ScoreSdeVePipeline."""
    try:
        index = json.loads((path / MODEL_INDEX_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == SCORE_SDE_VE_PIPELINE


def detect_format(path: str | os.PathLike) -> str:
    """The format of `path` (see the module docstring); ValueError if it is none of them.

    Checked in the order score_sde_ve, dit_pipeline, score_sde, edm, dit (a `.pt`/`.pth` file; before jaxdiff and
    diffusers, whose layouts theirs resemble), then jaxdiff, diffusers, tf.
    """
    path = pathlib.Path(path)
    if _is_score_sde_ve(path):
        return "score_sde_ve"
    if is_dit_pipeline(path):
        return "dit_pipeline"
    if _is_score_sde(path):
        return "score_sde"
    if path.is_file() and _EDM_FILE.fullmatch(path.name):
        return "edm"
    if path.is_file() and path.suffix in DIT_SUFFIXES:
        return "dit"
    if (path / checkpoint.CHECKPOINT_DIR).is_dir():
        return "jaxdiff"
    if unet_folder(path) is not None:
        return "diffusers"
    if index_files(path):
        return "tf"
    raise WeightsError(
        f"{path}: unknown weights format (known: {', '.join(FORMATS + DIT_FORMATS)}): not a jaxdiff workdir (no "
        f"{checkpoint.CHECKPOINT_DIR}/), not a diffusers folder (no config.json with *.safetensors, here or in "
        "unet/, or model_index.json of a ScoreSdeVePipeline or DiTPipeline), not a TF checkpoint (no .index file), "
        "not a score_sde checkpoint (no checkpoint_<N>), not an EDM network-snapshot-*.pkl (other pickles: --from "
        "edm), not a DiT .pt/.pth file"
    )


def check_source_format(src, source_format: str | None, step: int | None, dataset: str | None) -> str:
    """The format of `src` (`source_format`, else detected), checked against `step` and `dataset`."""
    fmt = detect_format(src) if source_format is None else source_format
    if fmt in DIT_FORMATS:
        raise UsageError(f"{src} is a DiT {'pipeline folder' if fmt == 'dit_pipeline' else 'checkpoint'}, a "
                         "latent-space model sampled whole: `jaxdiff sample --pretrained` (Pipeline.from_pretrained) "
                         "reads it; convert and load_weights do not")  # fmt: skip
    if fmt not in FORMATS:
        raise UsageError(f"source_format={fmt!r} is not one of {FORMATS}")
    if step is not None and fmt != "jaxdiff":
        raise UsageError(f"step={step!r} applies to jaxdiff workdirs only, but {src} is {fmt!r}")
    if dataset is not None and fmt == "jaxdiff":
        raise UsageError(f"dataset={dataset!r} applies to weights in other formats only; {src} is a jaxdiff workdir")
    return fmt


def read_continuous(path, fmt: str, dataset: str | None) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params as NumPy) of score_sde, EDM or ScoreSdeVePipeline weights; `dataset`: the recipe
    they must fit (for score_sde: its training config, by score_sde's or jaxdiff's name)."""
    source = str(path)
    if fmt == "score_sde":
        config_name, recipe_name = score_sde_config_name(dataset)
        read = read_score_sde_checkpoint(path, config_name)
        base = score_sde_recipe(config_name)
        return continuous_config(*read, source=source, recipe_name=recipe_name, base_recipe=base)
    check_recipe_name(dataset)
    read = read_edm_snapshot(path) if fmt == "edm" else read_score_sde_ve_folder(path)
    return continuous_config(*read, source=source, recipe_name=dataset)
