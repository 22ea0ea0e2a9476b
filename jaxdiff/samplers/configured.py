"""The continuous-time samplers as a run config names them: `config.sampling`'s sampler, steps, options,
guidance and clipping applied to a model of `jaxdiff.diffusion.continuous`. Samples are returned in [-1, 1]."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.diffusion.continuous import Denoiser, data_range, model_denoiser, process_from_config, to_image_range
from jaxdiff.samplers.continuous import sample_continuous

Array = jax.Array


def sampler_options(sampler: str, sampling_config: ml_collections.ConfigDict) -> dict:
    """The options of continuous `sampler` from `config.sampling` (`jaxdiff.samplers.sample_continuous`)."""
    names = {
        "pc": ("predictor", "corrector", "snr", "n_corrector"),
        "ode": ("rtol", "atol"),
        "edm_stochastic": ("s_churn", "s_min", "s_max", "s_noise"),
        "ddim": ("eta",),
    }.get(sampler, ())
    return {name: sampling_config[name] for name in names}


def sample_in_image_range(config: ml_collections.ConfigDict, denoiser: Denoiser, process, shape, rng: Array, *,
                          sampler: str, steps: int | None, **options) -> Array:  # fmt: skip
    """`sample_continuous` of a model's `denoiser`, every x̂_0 clipped to the model's data range when
    `config.sampling.clip_denoised`; the samples float32 `shape` returned in [-1, 1] (`to_image_range`)."""
    if config.sampling.clip_denoised:
        low, high = data_range(config.data)
        denoiser = functools.partial(_clipped, denoiser, low, high)
    x0 = sample_continuous(denoiser, process, shape, rng, sampler=sampler, steps=steps, **options)
    return to_image_range(x0, config.data)


def _clipped(denoiser: Denoiser, low: float, high: float, x: Array, sigma: Array) -> Array:
    return jnp.clip(denoiser(x, sigma), low, high)


def sample_images(config: ml_collections.ConfigDict, model, params, rng: Array, num: int, *, labels=None) -> Array:
    """[num, H, W, C] float32 samples in [-1, 1] of a continuous-time model with `config.sampling`'s sampler,
    steps (0: the sampler's default), options, guidance and clipping; labels int [num] for conditional models."""
    process = process_from_config(config.diffusion)
    sc = config.sampling
    denoiser = model_denoiser(config, model, params, process, labels=labels, guidance=sc.guidance)
    shape = (num, config.model.image_size, config.model.image_size, config.model.in_channels)
    steps = None if sc.sampler == "ode" else (sc.steps or None)
    return sample_in_image_range(config, denoiser, process, shape, rng, sampler=sc.sampler, steps=steps,
                                 **sampler_options(sc.sampler, sc))  # fmt: skip
