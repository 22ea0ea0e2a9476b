"""The network `config.model` names: the DDPM U-Net (its keys at the top of the section), score_sde's
NCSN++/DDPM++ (`config.model.ncsnpp`), EDM's SongUNet (`config.model.song_unet`) or DiT / SiT (`config.model.dit`).

Every network is called as `apply({"params": p}, x [B,S,S,C], labels [B], class_labels, train=...)`:
labels are 0-based steps for the U-Net of a discrete schedule and real numbers (t·999, σ, c_noise)
otherwise; class_labels are ints [B] or None.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.errors import ConfigError
from jaxdiff.models.dit import create_dit
from jaxdiff.models.ncsnpp import create_ncsnpp
from jaxdiff.models.song_unet import create_song_unet
from jaxdiff.models.unet import create_model as create_unet

NETWORKS = ("ddpm_unet", "ncsnpp", "song_unet", "dit")


def network_name(model_config: ml_collections.ConfigDict) -> str:
    """`model_config.network`; configs written before it existed mean the U-Net."""
    return model_config.get("network", "ddpm_unet")


def create_model(model_config: ml_collections.ConfigDict):
    """The Flax module of `config.model` (unbound; no parameters are made). Invalid values raise ValueError."""
    network = network_name(model_config)
    if network == "ddpm_unet":
        return create_unet(model_config)
    if network == "ncsnpp":
        return create_ncsnpp(model_config.ncsnpp)
    if network == "song_unet":
        return create_song_unet(model_config.song_unet)
    if network == "dit":
        return create_dit(model_config.dit)
    raise ConfigError(f"unknown model.network {network!r}; expected one of {NETWORKS}")


def example_inputs(model_config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(x, labels, class_labels) of batch 1 for initialising or tracing the network: zero images; labels
    int32 step 0 for the U-Net, float32 1.0 for the others (their Fourier embeddings take log σ). DiT's size,
    channels and classes are those of its own section."""
    if network_name(model_config) == "dit":
        dit = model_config.dit
        size, channels, classes = dit.input_size, dit.in_channels, dit.num_classes
    else:
        size, channels, classes = model_config.image_size, model_config.in_channels, model_config.num_classes
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    if network_name(model_config) == "ddpm_unet":
        labels = jnp.zeros((1,), jnp.int32)
    else:
        labels = jnp.ones((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if classes > 0 else None
    return x, labels, y
