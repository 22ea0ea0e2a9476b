"""What a training run trains: the diffusion model, the autoencoder or text-conditioned latent diffusion.

`jaxdiff.training.loop` drives any `Task` through the same loop (lock, resume, data order, checkpoints,
metrics, progress, signals, sample grids); `make_task(config, source)` picks the one `config.task` names.
"""

from __future__ import annotations

import os

import ml_collections

from jaxdiff.config.defaults import TASKS
from jaxdiff.errors import ConfigError
from jaxdiff.training import checkpoint
from jaxdiff.training.tasks.autoencoder import AutoencoderTask
from jaxdiff.training.tasks.base import Task
from jaxdiff.training.tasks.diffusion import DiffusionTask
from jaxdiff.training.tasks.latent import LatentTask


def make_task(config: ml_collections.ConfigDict, source=None) -> Task:
    """The task `config.task` names, training on `source` (a `jaxdiff.data` source).

    `source` None builds a task only to describe its state (`init_state` under `jax.eval_shape`, as
    checkpoint readers do); the other methods may then need a source the task does not have.
    """
    if config.task == "diffusion":
        return DiffusionTask(config)
    if config.task == "autoencoder":
        return AutoencoderTask(config, source)
    if config.task == "latent":
        return LatentTask(config, source)
    raise ConfigError(f"config task={config.task!r} is not one of {TASKS}")


def configured_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
    """(H, W, C) of the images `config.task` trains on when the config fixes it (the `synthetic` dataset is
    drawn in it): the diffusion model's image, the autoencoder's `sample_size`; None for latent diffusion."""
    if config.task == "diffusion":
        return (config.model.image_size, config.model.image_size, config.model.in_channels)
    if config.task == "autoencoder":
        ae = config.autoencoder
        return (ae.sample_size, ae.sample_size, ae.in_channels)
    return None


def load_run(workdir: str | os.PathLike, *, step: int | None = None, ema: bool = True):
    """(config, step, params) of a `jaxdiff train` workdir of any task: `checkpoint.read_params` with the state
    `make_task(config)` describes; the newest readable step unless `step`; EMA parameters unless `ema` False."""
    return checkpoint.read_params(workdir, make_task, step=step, ema=ema)
