"""diffusers `UNet2DConditionModel` weights (Stable Diffusion 1.x / 2.x, SDXL, x4 upscaler) -> our `UNetCondition`
config and parameters.

A folder (or a pipeline folder's `unet/`) holds `config.json` and `diffusion_pytorch_model[.<variant>].safetensors`
in PyTorch layouts; they are read with `safetensors` (never pickles) and need no torch. Our parameter paths are
diffusers' module names with the list indices written `_{i}` (`up_blocks_1/attentions_0/proj_in/kernel` <->
`up_blocks.1.attentions.0.proj_in.weight`), so conversion is a renaming plus layout changes: conv OIHW -> HWIO
(the 1×1 `conv_shortcut` and, without `use_linear_projection`, `proj_in`/`proj_out` included), Linear
[out, in] -> [in, out], the label table (`class_embedding.weight`) unchanged.
"""

from __future__ import annotations

import os
import pathlib
import re

import flax.traverse_util
import jax
import ml_collections

from jaxdiff.weights.files import CONFIG_FILE, DIFFUSERS_WEIGHTS_STEM, load_json, weights_file
from jaxdiff.weights.matching import ParamPath, Shape
from jaxdiff.weights.torch_layout import TORCH_LEAF_NAMES
from jaxdiff.latent.component_weights import component_folder, read_weights
from jaxdiff.errors import WeightsError
from jaxdiff.models.unet_condition import create_unet_condition, example_inputs
from jaxdiff.models.unet_condition_config import config_from_diffusers
# diffusers module lists, whose index our names write as `<list>_<index>` (unlike e.g. `linear_1`, a plain name).
MODULE_LISTS = (
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers", "upsamplers",
    "to_out", "net",
)  # fmt: skip
_LIST_ITEM = re.compile(rf"^({'|'.join(MODULE_LISTS)})_(\d+)$")


def diffusers_tensor_name(path: ParamPath) -> str:
    """The diffusers state-dict name of our parameter, e.g. ("up_blocks_1", "attentions_0", "transformer_blocks_0",
    "attn1", "to_out_0", "kernel") -> "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"."""
    modules = [_LIST_ITEM.sub(r"\1.\2", part) for part in path[:-1]]
    return ".".join([*modules, TORCH_LEAF_NAMES[path[-1]]])


def unet_condition_shapes(model_config: ml_collections.ConfigDict) -> dict[ParamPath, Shape]:
    """Every parameter of the U-Net of `model_config`: path -> shape (HWIO convs, [in, out] dense); none allocated."""
    args, kwargs = example_inputs(model_config)
    variables = jax.eval_shape(create_unet_condition(model_config).init, jax.random.PRNGKey(0), *args, **kwargs)
    return {p: tuple(s.shape) for p, s in flax.traverse_util.flatten_dict(variables["params"]).items()}


def read_unet_condition_weights(model_config: ml_collections.ConfigDict, file: str | os.PathLike) -> dict:
    """Our parameter tree (NumPy, in the config's compute dtype) from a diffusers `UNet2DConditionModel` safetensors
    file; one WeightsError lists every missing, unexpected and mis-shaped tensor by name before any tensor is read."""
    shapes = unet_condition_shapes(model_config)
    return read_weights(pathlib.Path(file), shapes, lambda path: (diffusers_tensor_name(path),),
                        dtype=model_config.dtype)  # fmt: skip


def read_unet_condition(
    folder: str | os.PathLike, *, variant: str | None = None, dtype: str = "float32", remat: bool = False
) -> tuple[ml_collections.ConfigDict, dict]:
    """(model config, params) of a diffusers `UNet2DConditionModel` folder, or of a pipeline folder with `unet/`.

    `variant` picks `diffusion_pytorch_model.<variant>.safetensors` (e.g. "fp16"); `dtype` is the compute dtype and
    the parameters' ("float32", or "bfloat16" for inference).
    Unsupported config settings raise ValueError before the weights are opened.
    """
    unet_dir = component_folder(folder, "unet")
    config_path = unet_dir / CONFIG_FILE
    settings = load_json(config_path)
    try:
        config = config_from_diffusers(settings, dtype=dtype, remat=remat)
    except ValueError as err:
        raise WeightsError(f"{config_path}: {err}") from None
    return config, read_unet_condition_weights(config, weights_file(unet_dir, DIFFUSERS_WEIGHTS_STEM, variant))
