"""The autoencoder task: the KL autoencoder of `config.autoencoder` with the loss of `config.autoencoder_loss`.

Grids pair originals with their reconstructions by the EMA parameters (`reconstruct`): the first
`training.num_sample_images // 2` training images, each followed by its reconstruction (pairs sit side
by side when the grid's width ⌈√N⌉ is even, e.g. N = 16 or 64). Each checkpoint's extras hold
{"scaling_factor": 1 / std of the EMA model's latents}, sampled from the posterior (as LDM) with key
PRNGKey(seed) over the first `SCALING_IMAGES` training images (`estimate_scaling_factor`).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxdiff.errors import ConfigError
from jaxdiff.training.autoencoder_step import (
    AutoencoderTrainState,
    encode_fn,
    estimate_scaling_factor,
    init_autoencoder_train_state,
    make_autoencoder_train_step,
    make_discriminator,
    reconstruct,
)
from jaxdiff.models.autoencoder import autoencoder_model_config, create_autoencoder
from jaxdiff.training.tasks.base import keep_entries
from jaxdiff.training.step import make_optimizer

SCALING_IMAGES = 512  # training images the latent scaling factor is estimated on


class AutoencoderTask:
    """Trains the KL autoencoder (`jaxdiff.training.autoencoder_step`) on {"image": uint8 [B,H,W,C]} batches,
    with EMA; the metrics add reconstruction_error, kl, latent_mean and latent_std (and the discriminator's)."""

    name = "autoencoder"

    def __init__(self, config: ml_collections.ConfigDict, source=None):
        self.config = config
        self.model = create_autoencoder(autoencoder_model_config(config.autoencoder))
        self.discriminator = make_discriminator(config.autoencoder_loss)
        self.tx = make_optimizer(config.training)
        self._step = make_autoencoder_train_step(
            self.model, self.discriminator, config.autoencoder_loss, config.training, self.tx,
            random_flip=config.data.random_flip,
        )  # fmt: skip
        self._encode = jax.jit(encode_fn(self.model))
        self._grid_images = self._scaling_images = self.grid_captions = None
        if source is not None:
            pairs = np.arange(min(max(1, config.training.num_sample_images // 2), source.num_examples))
            self._grid_images = source.get(pairs)[0]
            if hasattr(source, "captions"):
                self.grid_captions = [text for c in source.captions(pairs) for text in (c, f"{c} (reconstruction)")]
            self._scaling_images = source.get(np.arange(min(SCALING_IMAGES, source.num_examples)))[0]

    def check_source(self, source) -> None:
        ae = self.config.autoencoder
        expected = (ae.sample_size, ae.sample_size, ae.in_channels)
        if tuple(source.image_shape) != expected:
            raise ConfigError(
                f"dataset {self.config.data.dataset!r} has images of shape {tuple(source.image_shape)} but the "
                f"autoencoder expects {expected} (autoencoder.sample_size={ae.sample_size}, "
                f"autoencoder.in_channels={ae.in_channels})"
            )

    def init_state(self) -> AutoencoderTrainState:
        ae = self.config.autoencoder
        image_shape = (ae.sample_size, ae.sample_size, ae.in_channels)
        return init_autoencoder_train_state(self.model, self.discriminator, self.tx, self.config.seed, image_shape)

    def train_step(self, state: AutoencoderTrainState, batch: dict) -> tuple[AutoencoderTrainState, dict]:
        return self._step(state, batch["image"])

    def host_batch(self, local_batch: dict) -> dict:
        return keep_entries(local_batch, ("image",))

    def sample_grid(self, ema_params, rng) -> jax.Array:
        """Originals and reconstructions interleaved, float32 [2·pairs, H, W, C]; `rng` is unused (posterior modes)."""
        return reconstruct(self.model, ema_params, self._grid_images)

    def checkpoint_extras(self, state: AutoencoderTrainState) -> dict:
        """{"scaling_factor": ...}; a collective when there are several processes (each gathers the EMA weights)."""
        params = multihost_utils.process_allgather(state.ema_params, tiled=True)
        rng = jax.random.PRNGKey(self.config.seed)
        return {"scaling_factor": estimate_scaling_factor(self._encode, params, self._scaling_images, rng)}

    def kept_params(self) -> None:
        """None: the autoencoder (and its discriminator) read nothing they do not train."""

    def check_resumed(self, extras: dict) -> None:
        """Nothing: the scaling factor is re-estimated at every checkpoint."""
