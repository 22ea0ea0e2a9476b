"""What imported weights imply: the U-Net architecture, the run config around it, our parameter tree for it.

Weights fix the architecture but not the image size (convolutions fit any size) nor the training
recipe, so a config is assembled from a recipe of `jaxdiff.recipes` (named by `dataset`, or the released
DDPM model whose architecture matches) with the model section taken from the weights.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import flax.traverse_util
import jax
import ml_collections

from jaxdiff.models import create_model
from jaxdiff.models.unet import level_resolutions
from jaxdiff.recipes import RELEASED, recipe
from jaxdiff.train import dummy_inputs

ParamPath = tuple[str, ...]
Shape = tuple[int, ...]

log = logging.getLogger(__name__)


class Architecture(NamedTuple):
    """The U-Net hyper-parameters that weights determine. `attn_levels` are 0-based level indices
    (level i works at image_size / 2^i), so they hold for any image size.
    """

    in_channels: int
    out_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]
    resamp_with_conv: bool


def architecture_of(model_config: ml_collections.ConfigDict) -> Architecture:
    """The `Architecture` of a config's `model` section."""
    resolutions = level_resolutions(model_config.image_size, len(model_config.ch_mult))
    return Architecture(
        in_channels=model_config.in_channels,
        out_channels=model_config.out_channels,
        ch=model_config.ch,
        ch_mult=tuple(model_config.ch_mult),
        num_res_blocks=model_config.num_res_blocks,
        attn_levels=tuple(i for i, res in enumerate(resolutions) if res in tuple(model_config.attn_resolutions)),
        resamp_with_conv=model_config.resamp_with_conv,
    )


def _released_recipe(arch: Architecture, image_size: int | None, source: str) -> ml_collections.ConfigDict:
    """The recipe of the first released model with this architecture (and image size, when known)."""
    matches = []
    for name in RELEASED:
        config = recipe(name)
        if architecture_of(config.model) == arch and image_size in (None, config.model.image_size):
            matches.append((name, config))
    if not matches:
        raise ValueError(
            f"{source}: architecture {arch._asdict()} (image size {image_size}) matches no released DDPM model "
            f"({', '.join(RELEASED)}); pass dataset= to pick the training recipe"
        )
    if len(matches) > 1:
        log.warning(
            "%s: the architecture fits the recipes %s; using %r (pass dataset= to choose)",
            source, [name for name, _ in matches], matches[0][0],
        )  # fmt: skip
    return matches[0][1]


def build_config(
    arch: Architecture,
    *,
    image_size: int | None,
    dataset: str | None,
    source: str,
    base: ml_collections.ConfigDict | None = None,
) -> ml_collections.ConfigDict:
    """A run config for weights of architecture `arch`: the recipe of `dataset` if given, else `base` if
    given, else the matching released recipe; its model section is then set to `arch`, at `image_size`
    (default: the recipe's). The caller applies further settings and then `jaxdiff.config.validate`.
    """
    if dataset is not None:
        config = recipe(dataset)
    elif base is not None:
        config = base
    else:
        config = _released_recipe(arch, image_size, source)
    model = config.model
    if image_size is not None:
        model.image_size = image_size
    factor = 2 ** (len(arch.ch_mult) - 1)
    if model.image_size % factor:
        raise ValueError(
            f"{source}: image_size={model.image_size} is not divisible by 2^{len(arch.ch_mult) - 1} = {factor} "
            f"({len(arch.ch_mult)} levels)"
        )
    if architecture_of(model) != arch and dataset is not None:
        log.warning("%s: the weights' architecture differs from the %r recipe's; using the weights'", source, dataset)
    resolutions = level_resolutions(model.image_size, len(arch.ch_mult))
    model.in_channels = arch.in_channels
    model.out_channels = arch.out_channels
    model.ch = arch.ch
    model.ch_mult = arch.ch_mult
    model.num_res_blocks = arch.num_res_blocks
    model.attn_resolutions = tuple(resolutions[i] for i in arch.attn_levels)
    model.resamp_with_conv = arch.resamp_with_conv
    model.num_classes = 0
    return config


def param_shapes(model_config: ml_collections.ConfigDict) -> dict[ParamPath, Shape]:
    """Every parameter of our U-Net for `model_config`: path (e.g. ("down_0", "block_0", "conv1", "kernel")) -> shape.

    Conv kernels are HWIO, dense kernels [in, out], GroupNorm leaves `scale`/`bias`.
    """
    model = create_model(model_config)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(model_config), train=False))
    flat = flax.traverse_util.flatten_dict(variables["params"])
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}
