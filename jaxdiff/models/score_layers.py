"""Layers shared by the score-based networks (score_sde's NCSN++/DDPM++ and EDM's SongUNet).

Feature maps are NHWC float32. Both code bases normalise with GroupNorm of min(C // 4, 32) groups and
eps 1e-6, and embed noise levels either with the DDPM sinusoid (`jaxdiff.models.layers.timestep_embedding`)
or with random Gaussian Fourier features. Also here: the config checks both networks run on construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.errors import ConfigError
from jaxdiff.models import layers
from jaxdiff.models.layers import ZERO_INIT_SCALE, fan_avg_uniform

Array = jax.Array


def module_fields(
    config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, tuple_keys: Sequence[str], network: str
) -> dict:
    """A network's constructor arguments from its ConfigDict: exactly the keys of `defaults`, lists as tuples."""
    keys = set(defaults.keys())
    missing, unknown = sorted(keys - set(config.keys())), sorted(set(config.keys()) - keys)
    if missing or unknown:
        raise ConfigError(f"{network} config: missing keys {missing}, unknown keys {unknown}")
    return {key: tuple(config[key]) if key in tuple_keys else config[key] for key in keys}


def scaled_init(scale: float) -> nn.initializers.Initializer:
    """score_sde's `default_init(scale)`: fan_avg-uniform variance scaling, with scale 0 meaning 1e-10."""
    return fan_avg_uniform(ZERO_INIT_SCALE if scale == 0 else scale)


def num_groups(channels: int) -> int:
    """min(C // 4, 32): the GroupNorm group count of NCSN++ and SongUNet."""
    return min(channels // 4, 32)


def group_norm(x: Array, *, name: str) -> Array:
    """GroupNorm over min(C // 4, 32) groups, eps 1e-6, in float32. Call inside a compact method."""
    return layers.group_norm(x, name=name, num_groups=num_groups(x.shape[-1]))


def conv(features: int, size: int, *, scale: float = 1.0, use_bias: bool = True, name: str) -> nn.Conv:
    """size×size convolution, stride 1, "SAME" padding, `scaled_init(scale)` kernel, zero bias."""
    return nn.Conv(features, (size, size), padding="SAME", use_bias=use_bias, kernel_init=scaled_init(scale), name=name)


def residual_sum(x: Array, h: Array, rescale: bool) -> Array:
    """x + h, divided by √2 when `rescale` (score_sde's `skip_rescale`)."""
    return (x + h) / np.sqrt(2.0) if rescale else x + h


class GaussianFourierEmbedding(nn.Module):
    """x [B] -> [B, 2·num_freqs] = [sin(2π·x·W), cos(2π·x·W)], W ~ N(0, scale²) fixed at init.

    W is the parameter `W` (score_sde's name); no gradient flows into it.
    """

    num_freqs: int
    scale: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.num_freqs,))
        proj = jnp.asarray(x, jnp.float32)[:, None] * jax.lax.stop_gradient(w)[None, :] * (2 * np.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)
