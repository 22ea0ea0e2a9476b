"""Official DDPM TensorFlow checkpoints (e.g. `model.ckpt-790000`) -> our config and parameters.

The official code (`diffusion_tf/models/unet.py`, `diffusion_tf/nn.py`) builds every variable under
`model/` with the same scopes as our parameter tree: conv and nin/dense layers hold `W` (conv HWIO
[kh, kw, in, out], dense [in, out], our layouts too) and `b`; GroupNorm (`tf.contrib.layers.group_norm`
under the norm's scope) holds `gamma` and `beta`. Training adds `<var>/ExponentialMovingAverage`
(the EMA weights), optimizer slots `<var>/Adam`, `<var>/Adam_1` (or `RMSProp`, `RMSProp_1`) and
variables outside `model/` (`global_step`, `beta1_power`, ...), which are ignored.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re

import flax.traverse_util
import ml_collections
import numpy as np

from jaxdiff.config.validation import validate
from jaxdiff.readers.architecture import Architecture, ParamPath, build_config, official_architecture, param_shapes
from jaxdiff.weights.matching import match_names
from jaxdiff.readers.tf_bundle import TFCheckpoint
from jaxdiff.errors import WeightsError

SCOPE = "model/"
EMA_SUFFIX = "/ExponentialMovingAverage"
OPTIMIZER_SLOTS = ("Adam", "Adam_1", "RMSProp", "RMSProp_1")  # the official code's optimizers: adam, rmsprop
LEAF_NAMES = {"kernel": "W", "bias": "b"}
NORM_LEAF_NAMES = {"scale": "gamma", "bias": "beta"}

log = logging.getLogger(__name__)


def index_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The `.index` files that make `path` a TF checkpoint: `<path>.index`, or those inside folder `path`."""
    path = pathlib.Path(path)
    prefix_index = path.with_name(path.name + ".index")
    if prefix_index.is_file():
        return [prefix_index]
    return sorted(path.glob("*.index")) if path.is_dir() else []


def _latest_in_checkpoint_file(folder: pathlib.Path) -> str | None:
    """The prefix that folder's `checkpoint` state file names as the latest, if it names one that exists."""
    state = folder / "checkpoint"
    if not state.is_file():
        return None
    for line in state.read_text(encoding="utf-8").splitlines():
        found = re.fullmatch(r'\s*model_checkpoint_path:\s*"(.*)"\s*', line)
        if found:
            prefix = folder / found.group(1)  # a relative path is relative to the folder
            return os.fspath(prefix) if prefix.with_name(prefix.name + ".index").is_file() else None
    return None


def checkpoint_prefix(path: str | os.PathLike) -> str:
    """The checkpoint prefix `path` names: itself, or in a folder its latest (per the `checkpoint` file) or only one."""
    indexes = index_files(path)
    if not indexes:
        raise WeightsError(f"{path} is not a TF checkpoint: neither {path}.index nor a folder holding a *.index file")
    if pathlib.Path(path).is_dir():
        latest = _latest_in_checkpoint_file(pathlib.Path(path))
        if latest:
            return latest
        if len(indexes) > 1:
            raise WeightsError(f"{path} holds several checkpoints {[p.name for p in indexes]}; pass one prefix")
    return os.fspath(indexes[0])[: -len(".index")]


def official_names(shapes: dict[ParamPath, tuple[int, ...]]) -> dict[ParamPath, str]:
    """Our parameter path -> official variable name, e.g. ("down_0", "block_0", "norm1", "scale") ->
    "model/down_0/block_0/norm1/gamma"."""
    norm_layers = {path[:-1] for path in shapes if path[-1] == "scale"}
    names = {}
    for path in shapes:
        leaves = NORM_LEAF_NAMES if path[:-1] in norm_layers else LEAF_NAMES
        names[path] = SCOPE + "/".join(path[:-1]) + "/" + leaves[path[-1]]
    return names


def _count(shapes: dict[str, list[int]], pattern: str) -> int:
    """The number n such that `pattern.format(0..n-1)` are all variables."""
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def infer_architecture(shapes: dict[str, list[int]], source: str) -> Architecture:
    """The U-Net architecture from the official variables' names and shapes (variable name -> shape)."""
    for name in (SCOPE + "conv_in/W", SCOPE + "conv_out/W", SCOPE + "down_0/block_0/conv1/W"):
        if name not in shapes:
            raise WeightsError(f"{source} has no variable {name}: not an official DDPM U-Net checkpoint")
    num_levels = _count(shapes, SCOPE + "down_{}/block_0/conv1/W")
    in_channels, ch = shapes[SCOPE + "conv_in/W"][2:]
    ch_mult = []
    for i in range(num_levels):
        width = shapes[f"{SCOPE}down_{i}/block_0/conv1/W"][-1]
        if width % ch:
            raise WeightsError(f"{source}: down_{i} has {width} channels, not a multiple of conv_in's {ch}")
        ch_mult.append(width // ch)
    return official_architecture()._replace(
        in_channels=in_channels,
        out_channels=shapes[SCOPE + "conv_out/W"][-1],
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=_count(shapes, SCOPE + "down_0/block_{}/conv1/W"),
        attn_levels=tuple(i for i in range(num_levels) if f"{SCOPE}down_{i}/attn_0/q/W" in shapes),
        resamp_with_conv=num_levels == 1 or SCOPE + "down_0/downsample/conv/W" in shapes,
    )


def _split_variables(shapes: dict[str, list[int]]) -> tuple[dict, dict]:
    """(model variables, their EMA copies) by name; optimizer slots and variables outside `model/` dropped."""
    slot = re.compile("/(" + "|".join(OPTIMIZER_SLOTS) + ")$")
    model = {n: s for n, s in shapes.items() if n.startswith(SCOPE) and not slot.search(n)}
    ema = {n: s for n, s in model.items() if n.endswith(EMA_SUFFIX)}
    raw = {n: s for n, s in model.items() if not n.endswith(EMA_SUFFIX)}
    ignored = sorted(n for n in shapes if n not in model)
    log.debug("ignoring %d non-model variables (optimizer slots, step counters): %s", len(ignored), ignored)
    return raw, ema


def read_official_checkpoint(
    path: str | os.PathLike, *, dataset: str | None = None, image_size: int | None = None
) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(config, params, ema_params) of an official DDPM TF checkpoint (prefix, or a folder holding one).

    The architecture comes from the variables; the config from the recipe of `dataset` (e.g.
    "cifar10", "lsun_church256") or else the released model with that architecture; the image size
    from `image_size`, else the recipe. Params are nested dicts of float32 NumPy arrays in our
    layout. Without `/ExponentialMovingAverage` copies the raw weights serve as both, with a warning.
    Any missing, unexpected or mis-shaped model variable raises one ValueError listing them all.
    """
    prefix = checkpoint_prefix(path)
    source = f"TF checkpoint {prefix}"
    reader = TFCheckpoint(prefix)
    raw, ema = _split_variables({name: list(shape) for name, shape in reader.shapes().items()})
    config = build_config(infer_architecture(raw, source), image_size=image_size, dataset=dataset, source=source)
    validate(config)
    shapes = param_shapes(config.model)
    names = official_names(shapes)
    found = match_names({p: ((names[p],), s) for p, s in shapes.items()}, raw, source=source)
    if ema:
        ema_found = match_names({p: ((names[p] + EMA_SUFFIX,), s) for p, s in shapes.items()}, ema, source=source)
    else:
        log.warning("%s has no %s copies; using the raw weights as the EMA weights too", source, EMA_SUFFIX)
        ema_found = found

    def load(names_by_path: dict[ParamPath, str]) -> dict:
        tensors = {p: reader.tensor(n).astype(np.float32) for p, n in names_by_path.items()}
        return flax.traverse_util.unflatten_dict(tensors)

    return config, load(found), load(ema_found)
