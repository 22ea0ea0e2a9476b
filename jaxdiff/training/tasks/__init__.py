"""What a training run trains: the diffusion model, the autoencoder or text-conditioned latent diffusion.

`jaxdiff.training.loop` drives any `Task` through the same loop (lock, resume, data order, checkpoints,
metrics, progress, signals, sample grids); `make_task(config, source)` picks the one `config.task` names.
"""

from __future__ import annotations

from typing import Any, Protocol

import ml_collections
import numpy as np

from jaxdiff.config import TASKS


class Task(Protocol):
    """What a training run needs from what it trains."""

    name: str
    grid_captions: list[str] | None
    """The caption of each grid image in order (written beside each grid as `samples/step_*.txt`), or None."""

    def check_source(self, source) -> None:
        """ValueError naming what of the dataset does not fit the task (image shape, classes, captions)."""

    def init_state(self) -> Any:
        """The fresh train state (jittable, no arguments): a flax.struct pytree with `.step` (int32) and `.ema_params`."""

    def train_step(self, state, batch: dict) -> tuple[Any, dict]:
        """One optimizer step (jittable) -> (state, metrics of float32 scalars).

        metrics hold at least loss, grad_norm, learning_rate, skipped_updates (all skipped steps so far)
        and nonfinite_streak (consecutive skipped steps), plus any the task adds.
        """

    def host_batch(self, local_batch: dict) -> dict:
        """This process's batch as read from the source -> the arrays `train_step` takes (host side, before
        sharding): non-numeric entries dropped or converted; every value a NumPy array of the same leading size."""

    def sample_grid(self, ema_params, rng) -> Any:
        """Images for `samples/step_*.png` (jittable): float32 [N, H, W, C] in [-1, 1]."""

    def checkpoint_extras(self, state) -> dict:
        """JSON-able values saved with each checkpoint (read back by `jaxdiff.training.checkpoint.read_extras`); {} if none."""

    def check_resumed(self, extras: dict) -> None:
        """ValueError when the extras of the checkpoint a run resumes from do not fit this run (e.g. latent
        diffusion trained on another autoencoder)."""


def make_task(config: ml_collections.ConfigDict, source=None) -> Task:
    """The task `config.task` names, training on `source` (a `jaxdiff.data` source).

    `source` None builds a task only to describe its state (`init_state` under `jax.eval_shape`, as
    checkpoint readers do); the other methods may then need a source the task does not have.
    """
    if config.task == "diffusion":
        from jaxdiff.training.tasks.diffusion import DiffusionTask

        return DiffusionTask(config)
    if config.task == "autoencoder":
        from jaxdiff.training.tasks.autoencoder import AutoencoderTask

        return AutoencoderTask(config, source)
    if config.task == "latent":
        from jaxdiff.training.tasks.latent import LatentTask

        return LatentTask(config, source)
    raise ValueError(f"config task={config.task!r} is not one of {TASKS}")


def configured_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
    """(H, W, C) of the images `config.task` trains on when the config fixes it (the `synthetic` dataset is
    drawn in it): the diffusion model's image, the autoencoder's `sample_size`; None for latent diffusion."""
    if config.task == "diffusion":
        return (config.model.image_size, config.model.image_size, config.model.in_channels)
    if config.task == "autoencoder":
        ae = config.autoencoder
        return (ae.sample_size, ae.sample_size, ae.in_channels)
    return None


def keep_entries(local_batch: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The entries `names` of a host batch as NumPy arrays (the rest, e.g. captions, dropped)."""
    return {name: np.asarray(local_batch[name]) for name in names}
