"""A run's task and its workdir, whatever the task: `make_task(config, source)` builds the task `config.task` names
(`jaxdiff.training.tasks`), `configured_image_shape(config)` the image shape a config fixes, and `load_run(workdir)`
reads a `jaxdiff train` workdir's config, step and parameters with the state its task describes (`run_config(workdir)`
its config alone).
"""

from __future__ import annotations

import functools
import os

import ml_collections

from jaxdiff.config.defaults import TASKS
from jaxdiff.config.validation import config_from_dict, validate
from jaxdiff.errors import ConfigError
from jaxdiff.training import checkpoint
from jaxdiff.training.tasks.autoencoder import AutoencoderTask
from jaxdiff.training.tasks.base import Task
from jaxdiff.training.tasks.class_latent import ClassLatentTask, class_latent_image_shape
from jaxdiff.training.tasks.diffusion import DiffusionTask
from jaxdiff.training.tasks.flow_lora import FlowLoraTask
from jaxdiff.training.tasks.latent import LatentTask


def make_task(config: ml_collections.ConfigDict, source=None, *, workdir: str | os.PathLike | None = None) -> Task:
    """The task `config.task` names, training on `source` (a `jaxdiff.data` source).

    `source` None builds a task only to describe its state (`init_state` under `jax.eval_shape`, as
    checkpoint readers do); the other methods may then need a source the task does not have. `workdir`, the
    run's, lets a task use what its checkpoints keep (`Task.kept_params`) instead of reading it elsewhere.
    """
    if config.task == "diffusion":
        return DiffusionTask(config)
    if config.task == "autoencoder":
        return AutoencoderTask(config, source)
    if config.task == "latent":
        return LatentTask(config, source, None if workdir is None else os.fspath(workdir))
    if config.task == "class_latent":
        return ClassLatentTask(config, source, None if workdir is None else os.fspath(workdir))
    if config.task == "flow_lora":
        return FlowLoraTask(config, source)
    raise ConfigError(f"config task={config.task!r} is not one of {TASKS}")


def configured_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
    """(H, W, C) of the images `config.task` trains on when the config fixes it (the `synthetic` dataset is
    drawn in it): the diffusion model's image, the autoencoder's `sample_size`, class-conditional latent diffusion's
    latent size times its autoencoder's factor; None for text-conditioned latent diffusion."""
    if config.task == "diffusion":
        return (config.model.image_size, config.model.image_size, config.model.in_channels)
    if config.task == "autoencoder":
        ae = config.autoencoder
        return (ae.sample_size, ae.sample_size, ae.in_channels)
    if config.task == "class_latent":
        return class_latent_image_shape(config)
    return None


def load_run(workdir: str | os.PathLike, *, step: int | None = None, ema: bool = True):
    """(config, step, params) of a `jaxdiff train` workdir of any task: `checkpoint.read_params` with the state
    `make_task(config, workdir=workdir)` describes; the newest readable step unless `step`; EMA parameters
    unless `ema` False, with the parameters the step keeps (a latent run's autoencoder, "vae")."""
    return checkpoint.read_params(workdir, functools.partial(make_task, workdir=workdir), step=step, ema=ema)


def run_config(workdir: str | os.PathLike, *, step: int | None = None) -> ml_collections.ConfigDict | None:
    """The validated config of a `jaxdiff train` workdir (saved with `step`, default the newest readable one), read
    without the parameters: for checks before a load; None when no step's config reads (`load_run` then says why)."""
    saved = checkpoint.read_saved_config(workdir, step)
    return None if saved is None else validate(config_from_dict(saved))
