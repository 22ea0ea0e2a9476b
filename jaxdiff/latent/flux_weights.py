"""A diffusers FluxTransformer2DModel folder (`transformer/` of a Flux.1 pipeline: config.json and safetensors, one
file or shards, float32 / float16 / bfloat16) -> our config and float32 NumPy parameters, without torch; the files
are read as `jaxdiff.latent.mmdit_weights.read_transformer_weights` describes."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from jaxdiff.latent.component_weights import component_folder, param_shapes, read_config
from jaxdiff.latent.mmdit_weights import read_transformer_weights
from jaxdiff.models.flux import create_flux, example_inputs, flux_config


def read_flux_transformer(
    folder: str | os.PathLike, *, variant: str | None = None, **options: Any
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a diffusers FluxTransformer2DModel folder (or a pipeline folder with `transformer/`);
    `variant` picks `diffusion_pytorch_model.<variant>.safetensors` (or its index); `options` are `flux_config`'s
    (dtype: also the parameters' dtype; remat, attention). Bad settings or tensors raise WeightsError naming the
    file."""
    folder = component_folder(folder, "transformer")
    config = read_config(folder, flux_config, **options)
    model = create_flux(config)
    return config, read_transformer_weights(folder, param_shapes(model, *example_inputs(model)), variant=variant,
                                            dtype=config.dtype)  # fmt: skip
