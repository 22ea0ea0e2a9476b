"""Stable Diffusion's autoencoder and text encoder weights -> our configs and parameter trees (no torch needed).

A diffusers `AutoencoderKL` folder (`vae/`: config.json, diffusion_pytorch_model[.<variant>].safetensors) and
a transformers `CLIPTextModel` / `CLIPTextModelWithProjection` folder (`text_encoder/`: config.json,
model[.<variant>].safetensors) are read from safetensors only; parameters are stored in the networks' compute
dtype (float32, or bfloat16 for inference: no float32 copy is made). Our parameter paths
mirror the PyTorch module names (`down_blocks_0/resnets_1/conv1/kernel` <-> `down_blocks.0.resnets.1.conv1.weight`),
so conversion is that renaming plus layout changes: conv OIHW -> HWIO, Linear [out, in] -> [in, out],
embeddings unchanged. The VAE attention is found under its current names (`to_q`, `to_k`, `to_v`, `to_out.0`)
or the pre-0.15 ones (`query`, `key`, `value`, `proj_attn`); CLIP tensors with or without `text_model.`.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import safetensors

from jaxdiff.weights.torch_layout import TORCH_LEAF_NAMES
from jaxdiff.weights.files import CONFIG_FILE, DIFFUSERS_WEIGHTS_STEM, load_json, weights_file
from jaxdiff.weights.matching import ParamPath, match_names
from jaxdiff.weights.safetensors_reader import read_param
from jaxdiff.errors import WeightsError
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text

VAE_WEIGHTS_STEM = DIFFUSERS_WEIGHTS_STEM
CLIP_WEIGHTS_STEM = "model"  # transformers
LEGACY_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
CLIP_PREFIX = "text_model."
CLIP_BUFFERS = ("embeddings.position_ids", CLIP_PREFIX + "embeddings.position_ids")  # not parameters


def torch_name(path: ParamPath) -> str:
    """Our parameter path as a PyTorch state-dict name: `_{i}` module suffixes become `.{i}`, leaves renamed."""
    modules = [re.sub(r"_(\d+)$", r".\1", part) for part in path[:-1]]
    return ".".join([*modules, TORCH_LEAF_NAMES[path[-1]]])


def torch_shape(path: ParamPath, shape: tuple[int, ...]) -> tuple[int, ...]:
    """PyTorch shape of our parameter: HWIO -> OIHW, dense [in, out] -> [out, in]; embeddings and vectors unchanged."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2 and path[-1] == "kernel":
        return (shape[1], shape[0])
    return shape


def vae_names(path: ParamPath) -> tuple[str, ...]:
    """Candidate diffusers names of a VAE parameter: the current one, then the pre-0.15 attention name."""
    name = torch_name(path)
    layer, leaf = name.rsplit(".", 1)
    for new, old in LEGACY_VAE_ATTENTION.items():
        if layer.endswith(".attentions.0." + new):
            return (name, f"{layer[: -len(new)]}{old}.{leaf}")
    return (name,)


def clip_names(path: ParamPath) -> tuple[str, ...]:
    """Candidate transformers names of a CLIP text parameter: without and with the `text_model.` prefix."""
    name = torch_name(path)
    return (name,) if path[0] == "text_projection" else (name, CLIP_PREFIX + name)


def component_folder(folder: str | os.PathLike, subfolder: str) -> pathlib.Path:
    """`folder` if it holds a config.json, else `folder/subfolder` (a pipeline folder); ValueError if neither."""
    folder = pathlib.Path(folder)
    for candidate in (folder, folder / subfolder):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise WeightsError(f"{folder} has no {CONFIG_FILE}, nor has {folder / subfolder}")


def read_config(
    folder: pathlib.Path, make_config: Callable[..., ml_collections.ConfigDict], **options: Any
) -> ml_collections.ConfigDict:
    """`make_config(settings of folder/config.json, **options)`; its errors are WeightsErrors prefixed with the
    file's path (a TypeError too: a setting of a JSON type `make_config` cannot take, e.g. a list for a string)."""
    path = folder / CONFIG_FILE
    settings = load_json(path)
    try:
        return make_config(settings, **options)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{path}: {err}") from None


def read_weights(
    file: pathlib.Path,
    shapes: dict[ParamPath, tuple[int, ...]],
    names: Callable[[ParamPath], tuple[str, ...]],
    *,
    ignored: tuple[str, ...] = (),
    dtype="float32",
) -> dict:
    """Our parameter tree (NumPy arrays of `dtype`) from a safetensors file; one WeightsError lists every missing,
    unexpected (other than `ignored`) and mis-shaped tensor by name."""
    wanted = {path: (names(path), torch_shape(path, shape)) for path, shape in shapes.items()}
    with safetensors.safe_open(file, framework="np") as f:
        available = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys() if n not in ignored}
        found = match_names(wanted, available, source=str(file))
    # Each tensor read in blocks of rows straight into its parameter: the peak is the tree and one small buffer.
    flat = {path: read_param(file, name, path, shapes[path], dtype) for path, name in found.items()}
    return flax.traverse_util.unflatten_dict(flat)


def param_shapes(model: nn.Module, *inputs: Any) -> dict[ParamPath, tuple[int, ...]]:
    """Shapes of `model`'s parameters, traced without allocating them."""
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
    return {p: tuple(s.shape) for p, s in flax.traverse_util.flatten_dict(variables["params"]).items()}


def read_autoencoder(
    folder: str | os.PathLike, *, variant: str | None = None, **options: Any
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a diffusers `AutoencoderKL` folder (or a pipeline folder with `vae/`); `variant` picks
    `diffusion_pytorch_model.<variant>.safetensors`; `options` are `autoencoder_config`'s (dtype: also the
    parameters' dtype; remat)."""
    vae_dir = component_folder(folder, "vae")
    config = read_config(vae_dir, autoencoder_config, **options)
    side = 2 ** (len(config.block_out_channels) - 1)
    image = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    shapes = param_shapes(create_autoencoder(config), image)
    return config, read_weights(weights_file(vae_dir, VAE_WEIGHTS_STEM, variant), shapes, vae_names, dtype=config.dtype)


def read_clip_text(
    folder: str | os.PathLike, *, variant: str | None = None, **options: Any
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a transformers CLIP text encoder folder (or a pipeline folder with `text_encoder/`);
    `variant` picks `model.<variant>.safetensors`; `options` are `clip_text_config`'s (dtype: also the parameters'
    dtype; remat)."""
    clip_dir = component_folder(folder, "text_encoder")
    config = read_config(clip_dir, clip_text_config, **options)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = param_shapes(create_clip_text(config), ids)
    file = weights_file(clip_dir, CLIP_WEIGHTS_STEM, variant)
    return config, read_weights(file, shapes, clip_names, ignored=CLIP_BUFFERS, dtype=config.dtype)


def check_index_entry(index_file: pathlib.Path, key: str, value: Any, *, components: dict, unused: tuple[str, ...],
                      keys: tuple[str, ...], owner: str = "", nullable: bool = False) -> str | None:  # fmt: skip
    """One entry of a pipeline's model_index.json checked: a component (`components`: key -> the classes read, None
    for any scheduler) must be [library, class] with class among them (null too, where `nullable`), an unused
    component must be null, any other key must be one of `keys`. Returns the class a given component names (None
    otherwise); a WeightsError line naming the file, key and value, `owner` (e.g. " for <class>") after the key."""
    if key in components:
        if nullable and value in (None, [None, None]):
            return None
        classes = components[key]
        pair = isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)
        if not pair or (classes is not None and value[1] not in classes):
            raise WeightsError(f"{index_file}: {key}={value!r}; expected [library, class] with class in "
                               f"{classes or 'the schedulers'}")  # fmt: skip
        return value[1]
    if key in unused:
        if value not in (None, [None, None]):
            raise WeightsError(f"{index_file}: {key}={value!r}; jaxdiff runs no {key.replace('_', ' ')} (it must be "
                               "[null, null])")  # fmt: skip
    elif key not in keys:
        raise WeightsError(f"{index_file}: unknown key {key}={value!r}{owner}; jaxdiff cannot honour it")
    return None
