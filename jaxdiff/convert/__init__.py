"""Weights in other formats: official DDPM TF checkpoints and diffusers UNet2DModel / DDPMPipeline / DDIMPipeline
folders, in and out.

    convert("model.ckpt-790000", "runs/ddpm_cifar10")                  # official TF -> jaxdiff workdir
    convert("ddpm-cifar10-32", "runs/from_hub")                         # diffusers -> jaxdiff workdir
    convert("runs/cifar10", "export/cifar10", target_format="diffusers")  # jaxdiff (EMA) -> DDPMPipeline folder
    config, ema_params = load_weights(path)                              # any of the three, for sampling

Formats: "tf" (a checkpoint prefix with a `.index` file, or a folder holding one), "diffusers"
(a folder with `config.json` and `*.safetensors`, or a pipeline folder with them in `unet/` and the
scheduler config, which sets the diffusion, in `scheduler/`),
"jaxdiff" (a `jaxdiff train` workdir, i.e. a folder with `checkpoints/`).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import uuid

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff import checkpoint
from jaxdiff.convert.diffusers_format import read_diffusers, save_export, to_diffusers, unet_folder, write_diffusers
from jaxdiff.convert.tf_checkpoint import index_files, read_official_checkpoint

FORMATS = ("tf", "diffusers", "jaxdiff")
TARGET_FORMATS = ("jaxdiff", "diffusers")

__all__ = [
    "FORMATS",
    "TARGET_FORMATS",
    "convert",
    "detect_format",
    "load_weights",
    "read_diffusers",
    "read_official_checkpoint",
    "write_diffusers",
]


def detect_format(path: str | os.PathLike) -> str:
    """"jaxdiff", "diffusers" or "tf" (checked in this order); ValueError if `path` is none of them."""
    path = pathlib.Path(path)
    if (path / checkpoint.CHECKPOINT_DIR).is_dir():
        return "jaxdiff"
    if unet_folder(path) is not None:
        return "diffusers"
    if index_files(path):
        return "tf"
    raise ValueError(
        f"{path}: unknown weights format: not a jaxdiff workdir (no {checkpoint.CHECKPOINT_DIR}/), not a diffusers "
        "folder (no config.json with *.safetensors, here or in unet/), not a TF checkpoint (no .index file)"
    )


def _source_format(src, source_format: str | None, step: int | None, dataset: str | None) -> str:
    fmt = detect_format(src) if source_format is None else source_format
    if fmt not in FORMATS:
        raise ValueError(f"source_format={fmt!r} is not one of {FORMATS}")
    if step is not None and fmt != "jaxdiff":
        raise ValueError(f"step={step!r} applies to jaxdiff workdirs only, but {src} is {fmt!r}")
    if dataset is not None and fmt == "jaxdiff":
        raise ValueError(f"dataset={dataset!r} applies to tf and diffusers weights only; {src} is a jaxdiff workdir")
    return fmt


def load_weights(
    path: str | os.PathLike, *, step: int | None = None, dataset: str | None = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, EMA params) from weights in any format (see the module docstring).

    `step` picks a jaxdiff checkpoint (default: the latest); `dataset` picks the training recipe that
    tf and diffusers weights are given (default: the released DDPM model with their architecture).
    Diffusers folders hold one set of weights, used as the EMA params. Arrays are on this process's
    first device for jaxdiff workdirs and NumPy otherwise.
    """
    fmt = _source_format(path, None, step, dataset)
    if fmt == "jaxdiff":
        config, _, params = checkpoint.load_weights(path, step=step)
        return config, params
    if fmt == "diffusers":
        return read_diffusers(path, dataset=dataset)
    config, _, ema_params = read_official_checkpoint(path, dataset=dataset)
    return config, ema_params


def _require_free(dst: pathlib.Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"destination {dst} exists and is not an empty folder; refusing to overwrite it")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    source_format: str | None = None,
    target_format: str = "jaxdiff",
    step: int | None = None,
    dataset: str | None = None,
) -> pathlib.Path:
    """Convert the weights at `src` into a new `dst` (a jaxdiff workdir or a diffusers folder); returns `dst`.

    Everything is read and checked before anything is written; the output is written into a
    temporary sibling of `dst` and renamed into place at the end, so on failure `dst` is not
    created. A `dst` that exists and is not an empty folder is refused. tf/diffusers -> jaxdiff writes
    a step-0 checkpoint with a fresh optimizer state (diffusers' one set of weights serves as both
    params and EMA params); jaxdiff -> diffusers exports the EMA params of `step` (default: latest).
    """
    dst = pathlib.Path(dst)
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"target_format={target_format!r} is not one of {TARGET_FORMATS}")
    _require_free(dst)
    fmt = _source_format(src, source_format, step, dataset)
    if fmt == target_format:
        raise ValueError(f"{src} is already in the {fmt!r} format")

    if fmt == "tf":
        config, params, ema_params = read_official_checkpoint(src, dataset=dataset)
    elif fmt == "diffusers":
        config, params = read_diffusers(src, dataset=dataset)
        ema_params = params
    else:
        config, _, ema_params = checkpoint.load_weights(src, step=step)

    if target_format == "diffusers":
        export = to_diffusers(config, ema_params)
        write = lambda folder: save_export(export, folder)  # noqa: E731
    else:
        params, ema_params = jax.tree.map(jnp.asarray, (params, ema_params))
        write = lambda folder: checkpoint.save_model(folder, config, params, ema_params)  # noqa: E731

    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:12]}"
    partial.mkdir()
    try:
        write(partial)
        _require_free(dst)
        if dst.exists():
            dst.rmdir()
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst
