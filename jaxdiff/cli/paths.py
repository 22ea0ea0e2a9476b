"""Paths, checked before any work: output directories and files must be writable or creatable, weights must
exist; weights are loaded with safetensors' error for a damaged file turned into a user error."""

from __future__ import annotations

import contextlib
import os

from jaxdiff.cli.errors import UsageError


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_creatable(path: str, what: str) -> None:
    """`path` does not exist; its nearest existing ancestor must be a directory we may write in."""
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise UsageError(f"{what} {path!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path!r} cannot be created: no permission to write in {existing!r}")


def check_output_dir(path: str, what: str) -> None:
    """`path` is a writable directory, or one that can be created."""
    if not os.path.exists(path):
        _check_creatable(path, what)
    elif not os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a file, not a directory")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path!r}: no permission to write in it")


def check_output_file(path: str, what: str) -> None:
    """`path` is a file we may overwrite, or one that can be created (with its folders)."""
    if not os.path.exists(path):
        _check_creatable(path, what)
    elif os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a directory, not a file")
    elif not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path!r}: no permission to overwrite it")


def check_weights(path: str, what: str = "--workdir") -> None:
    """A weights path (workdir, diffusers folder, TF checkpoint prefix) that exists."""
    if not os.path.exists(path) and not os.path.exists(f"{path}.index"):
        raise UsageError(f"{what} {path!r} does not exist")


@contextlib.contextmanager
def reading_weights(path: str):
    """safetensors' own error for a damaged file, as a user error naming the weights."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise UsageError(f"the .safetensors weights under {path!r} are damaged or not safetensors ({err})") from err


def load_pipeline(path: str, step: int | None, config: str | None = None):
    from jaxdiff.sampling.pipeline import Pipeline

    with reading_weights(path):
        return Pipeline.from_pretrained(path, step=step, config=config)
