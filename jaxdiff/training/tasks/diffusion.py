"""The diffusion task: the pixel-space model of `config.model` under `config.diffusion` (discrete or continuous)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.errors import ConfigError
from jaxdiff.families import Family, family_of
from jaxdiff.models.networks import create_model
from jaxdiff.schedule import schedule_from_config
from jaxdiff.training.tasks.base import keep_entries
from jaxdiff.training.diffusion_step import make_train_step
from jaxdiff.training.step import TrainState, init_train_state, make_optimizer


def sample_images(family: Family, model, params, rng, num: int) -> jax.Array:
    """[num, H, W, C] samples in [-1, 1] from `params` with the sampler, steps, options and guidance of the
    family's config (`Family.configured_sampling`); labels cycle through the classes of class-conditional models.
    Build `family` outside jit: its tables must be concrete."""
    config = family.config
    labels = None
    if config.model.num_classes > 0:
        labels = jnp.arange(num, dtype=jnp.int32) % config.model.num_classes
    draw = family.sampler_fn(model, (num, *family.image_shape), guidance=config.sampling.guidance,
                             **family.configured_sampling())  # fmt: skip
    return draw(params, rng, labels)


class DiffusionTask:
    """Trains `config.model` as a denoiser (`jaxdiff.training.diffusion_step`); grids are
    `training.num_sample_images` samples of the EMA parameters with the config's sampler. Batches are
    {"image": uint8 [B,H,W,C], "label": int32 [B]}."""

    name = "diffusion"
    grid_captions = None

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = create_model(config.model)
        self.schedule = schedule_from_config(config.diffusion)
        self.family = family_of(config)
        self.tx = make_optimizer(config.training)
        self._step = make_train_step(config, self.model, self.tx)

    def check_source(self, source) -> None:
        config = self.config
        expected = (config.model.image_size, config.model.image_size, config.model.in_channels)
        if tuple(source.image_shape) != expected:
            raise ConfigError(
                f"dataset {config.data.dataset!r} has images of shape {tuple(source.image_shape)} but the model "
                f"expects {expected} (model.image_size={config.model.image_size}, "
                f"model.in_channels={config.model.in_channels})"
            )
        if config.model.num_classes > 0 and source.num_classes != config.model.num_classes:
            raise ConfigError(
                f"model.num_classes={config.model.num_classes} but dataset {config.data.dataset!r} has "
                f"{source.num_classes} classes"
            )

    def init_state(self) -> TrainState:
        return init_train_state(self.config, self.model, self.tx)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._step(state, batch)

    def host_batch(self, local_batch: dict) -> dict:
        return keep_entries(local_batch, ("image", "label"))

    def sample_grid(self, ema_params, rng) -> jax.Array:
        num = self.config.training.num_sample_images
        return sample_images(self.family, self.model, ema_params, rng, num)

    def checkpoint_extras(self, state: TrainState) -> dict:
        return {}

    def kept_params(self) -> None:
        """None: the model reads nothing it does not train."""

    def check_resumed(self, extras: dict) -> None:
        """Nothing: a diffusion checkpoint has no extras."""
