"""diffusers transformer folders (`transformer/` of an SD3 / SD3.5 or Flux pipeline) -> our configs and float32
NumPy parameter trees, without torch: `read_mmdit` (SD3Transformer2DModel) here, `read_flux_transformer` in
`jaxdiff.latent.flux_weights`, both through `read_transformer_weights`.

A folder holds config.json and its weights in safetensors (float32, float16 or bfloat16): one
`diffusion_pytorch_model[.<variant>].safetensors`, or shards listed by `diffusion_pytorch_model.safetensors.index
[.<variant>].json` ({"weight_map": {tensor name: shard file}}), as diffusers writes models over its shard size.
Our parameter paths mirror diffusers' module names (`transformer_blocks_3/attn/to_out_0/kernel` <->
`transformer_blocks.3.attn.to_out.0.weight`); Linear weights [out, in] become kernels [in, out], convolutions OIHW
become HWIO. Every tensor of the files is used or named in one WeightsError (missing, mis-shaped, unexpected); SD3's
stored position table (`pos_embed.pos_embed`, a buffer) must equal the one the config gives.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import ml_collections
import numpy as np

from jaxdiff.errors import WeightsError
from jaxdiff.latent.component_weights import component_folder, param_shapes, read_config
from jaxdiff.models.mmdit import create_mmdit, example_inputs, mmdit_config
from jaxdiff.weights.files import DIFFUSERS_WEIGHTS_STEM
from jaxdiff.weights.matching import ParamPath, match_names
from jaxdiff.weights.safetensors_reader import read_param, read_tensor
from jaxdiff.weights.shards import tensor_locations, weight_shards
from jaxdiff.weights.torch_layout import TORCH_LEAF_NAMES, torch_shape

# Our module names with an index suffix that diffusers writes as a list index (`to_out_0` -> `to_out.0`); others
# (`linear_1`, `norm_added_q`) are diffusers' own names.
_INDEXED = re.compile(r"^(transformer_blocks|single_transformer_blocks|to_out|net)_(\d+)$")
POS_EMBED_BUFFER = "pos_embed.pos_embed"  # SD3's position table [1, G², D], saved with the weights
BUFFER_TOLERANCE = 1e-3  # a float16 file rounds the table's entries in [-1, 1] by up to 2^-11


def diffusers_name(path: ParamPath) -> str:
    """diffusers' state-dict name of our parameter: `transformer_blocks_3/ff/net_0/proj/kernel` ->
    `transformer_blocks.3.ff.net.0.proj.weight`."""
    return ".".join([_INDEXED.sub(r"\1.\2", part) for part in path[:-1]] + [TORCH_LEAF_NAMES[path[-1]]])


def check_buffer(source: str, name: str, stored: np.ndarray, expected: np.ndarray) -> None:
    """WeightsError naming `source` unless the stored buffer `name` equals `expected` to `BUFFER_TOLERANCE`."""
    error = float(np.max(np.abs(stored - expected), initial=0.0))
    if not error <= BUFFER_TOLERANCE:
        raise WeightsError(f"{source}: the stored {name} differs from the one its config gives by up to {error:.3g} "
                           f"(allowed {BUFFER_TOLERANCE})")  # fmt: skip


def read_transformer_weights(
    folder: pathlib.Path,
    shapes: Mapping[ParamPath, tuple[int, ...]],
    *,
    variant: str | None = None,
    buffers: Mapping[str, np.ndarray] | None = None,
    dtype="float32",
) -> dict:
    """Our parameter tree (NumPy arrays of `dtype`) from a folder's safetensors file or shards; `shapes` are our
    parameters'.
    `buffers` (diffusers name -> expected float array) are stored tensors that are not parameters: each must be
    present and equal its expected value to `BUFFER_TOLERANCE`. One WeightsError lists every missing, unexpected
    or mis-shaped tensor (`tensor_locations` first checks the shards against their index)."""
    buffers = dict(buffers or {})
    files, weight_map, source = weight_shards(folder, DIFFUSERS_WEIGHTS_STEM, variant)
    wanted = {path: ((diffusers_name(path),), torch_shape(path, shape)) for path, shape in shapes.items()}
    wanted.update({("buffer", name): ((name,), value.shape) for name, value in buffers.items()})
    location, available = tensor_locations(files, weight_map, source)
    found = match_names(wanted, available, source=f"{folder} ({', '.join(f.name for f in files)})")
    for name, expected in buffers.items():
        check_buffer(str(folder), name, read_tensor(location[name], name), expected)
    # Each tensor read in blocks of rows straight into its parameter: the peak is the tree and one small buffer.
    params = {path: read_param(location[name], name, path, shapes[path], dtype)
              for path, name in found.items() if path in shapes}  # fmt: skip
    return flax.traverse_util.unflatten_dict(params)


def read_mmdit(
    folder: str | os.PathLike, *, variant: str | None = None, **options: Any
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a diffusers SD3Transformer2DModel folder (or a pipeline folder with `transformer/`);
    `variant` picks `diffusion_pytorch_model.<variant>.safetensors` (or its index); `options` are `mmdit_config`'s
    (dtype: also the parameters' dtype; remat, attention). Bad settings or tensors raise WeightsError naming the
    file."""
    folder = component_folder(folder, "transformer")
    config = read_config(folder, mmdit_config, **options)
    model = create_mmdit(config)
    table = model.pos_table().astype(np.float32)[None]
    shapes = param_shapes(model, *example_inputs(model, size=config.patch_size))
    return config, read_transformer_weights(folder, shapes, variant=variant, buffers={POS_EMBED_BUFFER: table},
                                            dtype=config.dtype)  # fmt: skip
