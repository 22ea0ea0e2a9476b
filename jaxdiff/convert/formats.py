"""Converting weights between formats (`convert`): any format `jaxdiff.readers` reads into a jaxdiff workdir,
a jaxdiff workdir into a diffusers folder, a LoRA run's adapters into a diffusers LoRA folder."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import pathlib
import shutil
import uuid

import jax
import jax.numpy as jnp

from jaxdiff.convert.diffusers_export import save_export, to_diffusers
from jaxdiff.convert.lora_export import lora_export, save_lora_export
from jaxdiff.convert.score_sde_ve_export import save_score_sde_ve_export, score_sde_ve_export
from jaxdiff.diffusion.continuous import is_continuous
from jaxdiff.errors import UsageError
from jaxdiff.readers.diffusers_format import read_diffusers
from jaxdiff.readers.formats import CONTINUOUS_FORMATS, check_source_format, read_continuous
from jaxdiff.readers.tf_checkpoint import read_official_checkpoint
from jaxdiff.training import checkpoint
from jaxdiff.training.runs import load_run

TARGET_FORMATS = ("jaxdiff", "diffusers", "diffusers-lora")

log = logging.getLogger(__name__)


def _require_free(dst: pathlib.Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"destination {dst} exists and is not an empty folder; refusing to overwrite it")


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
    created; the staging folders of conversions to `dst` that were killed are removed first (with a warning).
    A `dst` that exists and is not an empty folder is refused. Other formats -> jaxdiff writes
    a step-0 checkpoint with a fresh optimizer state (one set of weights, as diffusers, score_sde's
    params_ema and EDM's ema network are, serves as both params and EMA params); jaxdiff -> diffusers
    exports the EMA params of `step` (default: latest), as a DDPMPipeline or, for a VE model of uncentred
    data, a ScoreSdeVePipeline (`score_sde_ve_export`); "diffusers-lora" exports a LoRA run's EMA adapters as
    `pytorch_lora_weights.safetensors` (`lora_export`). `source_format` overrides detection (e.g. "edm"
    for a pickle not named network-snapshot-*.pkl); `dataset` as in `jaxdiff.sampling.pipeline.load_weights`.
    """
    dst = pathlib.Path(dst)
    if target_format not in TARGET_FORMATS:
        raise UsageError(f"target_format={target_format!r} is not one of {TARGET_FORMATS}")
    _require_free(dst)
    fmt = check_source_format(src, source_format, step, dataset)
    if fmt == target_format:
        raise UsageError(f"{src} is already in the {fmt!r} format")
    if fmt in CONTINUOUS_FORMATS and target_format != "jaxdiff":
        raise UsageError(f"target_format={target_format!r}: {fmt} weights convert to 'jaxdiff' only")
    if target_format == "diffusers-lora" and fmt != "jaxdiff":
        raise UsageError(f"target_format='diffusers-lora' exports a jaxdiff LoRA run's adapters; {src} is {fmt!r}")

    if fmt == "tf":
        config, params, ema_params = read_official_checkpoint(src, dataset=dataset)
    elif fmt == "diffusers":
        config, params = read_diffusers(src, dataset=dataset)
        ema_params = params
    elif fmt in CONTINUOUS_FORMATS:
        config, params = read_continuous(src, fmt, dataset)
        ema_params = params
    else:
        config, _, ema_params = load_run(src, step=step)

    if target_format == "diffusers-lora":
        lora = lora_export(config, ema_params, src)
        write = lambda folder: save_lora_export(lora, folder)  # noqa: E731
    elif target_format == "diffusers" and is_continuous(config.diffusion):
        ve_export = score_sde_ve_export(config, ema_params)
        write = lambda folder: save_score_sde_ve_export(ve_export, folder)  # noqa: E731
    elif target_format == "diffusers":
        export = to_diffusers(config, ema_params)
        write = lambda folder: save_export(export, folder)  # noqa: E731
    else:
        params, ema_params = jax.tree.map(jnp.asarray, (params, ema_params))
        write = lambda folder: checkpoint.save_model(folder, config, params, ema_params)  # noqa: E731

    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(dst)
    partial = dst.parent / f"{_partial_prefix(dst)}{uuid.uuid4().hex[:12]}"
    partial.mkdir()
    owner = os.open(partial, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: `_remove_abandoned` cannot lock it either
            fcntl.flock(owner, fcntl.LOCK_EX)  # held until this process ends: the folder is in use
        write(partial)
        _require_free(dst)
        if dst.exists():
            dst.rmdir()
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        os.close(owner)
    return dst


def _partial_prefix(dst: pathlib.Path) -> str:
    """The name of the folders a conversion to `dst` writes into, less their random suffix."""
    return f".{dst.name}.partial-"


def _remove_abandoned(dst: pathlib.Path) -> None:
    """Remove the staging folders of conversions to `dst` that were killed (no process holds their lock;
    a conversion holds its folder's `flock` from creating it until it is renamed), saying so."""
    removed = []
    for partial in sorted(dst.parent.glob(f"{glob.escape(_partial_prefix(dst))}*")):
        try:
            handle = os.open(partial, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a conversion to the same destination is running (or locks are not supported here)
            continue
        finally:
            os.close(handle)
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial.name)
    if removed:
        log.warning("removed %d unfinished conversion folder(s) to %s left by a stopped conversion: %s", len(removed),
                    dst, ", ".join(removed))  # fmt: skip
