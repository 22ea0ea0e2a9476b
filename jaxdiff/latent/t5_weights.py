"""A transformers `T5EncoderModel` folder (SD3's `text_encoder_3/`, Flux's `text_encoder_2/`) -> the T5 encoder's
config and parameter tree (float32 NumPy; no torch needed).

The folder holds `config.json` and its weights as safetensors, float32, float16 or bfloat16: one file
(`model.safetensors`, `model.<variant>.safetensors`) or shards listed by an index (`model.safetensors.index.json`,
`model.safetensors.index.<variant>.json`, as transformers names them: {"weight_map": {tensor: shard file}}).
Every config key is honoured or refused (`t5_encoder_config`); every tensor is used or listed in one error. The
token embedding is `shared.weight`; `encoder.embed_tokens.weight` is the same tied tensor, read where `shared.weight`
is absent and otherwise required to equal it. Parameter names follow `component_weights.torch_name`, except that
the gated feed-forward's `wi_0` / `wi_1` keep their underscore.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.errors import WeightsError
from jaxdiff.latent.component_weights import component_folder, param_shapes, read_config, torch_name, torch_shape
from jaxdiff.models.t5_encoder import create_t5_encoder, t5_encoder_config
from jaxdiff.weights.matching import ParamPath, Shape, match_names
from jaxdiff.weights.safetensors_reader import read_param, read_tensor
from jaxdiff.weights.shards import tensor_locations, weight_shards

T5_WEIGHTS_STEM = "model"  # transformers
EMBEDDING, TIED_EMBEDDING = "shared.weight", "encoder.embed_tokens.weight"


def t5_names(path: ParamPath) -> tuple[str, ...]:
    """Candidate transformers names of a T5 encoder parameter (the token embedding has two, see the module doc)."""
    if path == ("shared", "embedding"):
        return (EMBEDDING, TIED_EMBEDDING)
    return (re.sub(r"\.wi\.(\d)\.", r".wi_\1.", torch_name(path)),)


def read_sharded_weights(
    files: list[pathlib.Path], weight_map: dict[str, str], source: pathlib.Path, shapes: dict[ParamPath, Shape],
    dtype="float32",
) -> dict:
    """The T5 encoder's parameter tree (NumPy arrays of `dtype`) from its safetensors files (`weight_shards`' result:
    one file, or the shards of an index with its tensor -> file map, and the file errors name); one WeightsError
    listing every missing, unexpected and mis-shaped tensor (`tensor_locations` checks the shards first)."""
    wanted = {path: (t5_names(path), torch_shape(path, shape)) for path, shape in shapes.items()}
    location, available = tensor_locations(files, weight_map, source)

    def tensor(name: str) -> np.ndarray:
        return read_tensor(location[name], name)

    if EMBEDDING in available and TIED_EMBEDDING in available:
        if available[EMBEDDING] != available[TIED_EMBEDDING] or not np.array_equal(
            tensor(EMBEDDING), tensor(TIED_EMBEDDING)
        ):
            raise WeightsError(f"{source}: {TIED_EMBEDDING} differs from {EMBEDDING}; T5EncoderModel ties them")
        del available[TIED_EMBEDDING]
    found = match_names(wanted, available, source=str(source))
    # Each tensor read in blocks of rows straight into its parameter: the peak is the tree and one small buffer.
    flat = {path: read_param(location[name], name, path, shapes[path], dtype) for path, name in found.items()}
    return flax.traverse_util.unflatten_dict(flat)


def read_t5_encoder(
    folder: str | os.PathLike, *, subfolder: str = "text_encoder_3", variant: str | None = None, **options: Any
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a transformers T5EncoderModel folder, or of a pipeline folder with it in `subfolder`
    (SD3: "text_encoder_3", Flux: "text_encoder_2"); `variant` picks `model.<variant>.safetensors` or its shard
    index; `options` are `t5_encoder_config`'s (dtype: also the parameters' dtype; remat). The config is checked
    before any weights are read."""
    t5_dir = component_folder(folder, subfolder)
    config = read_config(t5_dir, t5_encoder_config, **options)
    shapes = param_shapes(create_t5_encoder(config), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    return config, read_sharded_weights(*weight_shards(t5_dir, T5_WEIGHTS_STEM, variant), shapes, config.dtype)
