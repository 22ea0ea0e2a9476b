"""The `Task` protocol: what the training loop needs from what it trains."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


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

    def kept_params(self) -> Any:
        """Weights the task uses without training them, read from elsewhere (a latent run's autoencoder), as a
        pytree of NumPy arrays saved with each checkpoint, so that the run stays usable whatever becomes of their
        source; None if none. `jaxdiff.training.checkpoint.read_params` adds them to the parameters it reads."""

    def check_resumed(self, extras: dict) -> None:
        """ValueError when the extras of the checkpoint a run resumes from do not fit this run (e.g. latent
        diffusion trained on another autoencoder)."""


def keep_entries(local_batch: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The entries `names` of a host batch as NumPy arrays (the rest, e.g. captions, dropped)."""
    return {name: np.asarray(local_batch[name]) for name in names}
