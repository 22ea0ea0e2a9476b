"""What imported weights imply: the U-Net architecture, the run config around it, our parameter tree for it.

Weights fix the architecture but not the image size (convolutions fit any size) nor the training
recipe, so a config is assembled from a recipe of `jaxdiff.config.recipes` (named by `dataset`, or the released
DDPM model whose architecture matches) with the model section taken from the weights.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import flax.traverse_util
import jax
import ml_collections

from jaxdiff.config.defaults import default_config
from jaxdiff.errors import WeightsError
from jaxdiff.models.networks import create_model, example_inputs
from jaxdiff.models.unet import level_resolutions
from jaxdiff.config.recipes import RELEASED, recipe
from jaxdiff.weights.matching import ParamPath, Shape

log = logging.getLogger(__name__)


class Architecture(NamedTuple):
    """The U-Net hyper-parameters that weights determine. `attn_levels` are 0-based level indices
    (level i works at image_size / 2^i), so they hold for any image size; every other field is the
    `config.model` key of the same name. `official_architecture()` gives the official DDPM network's values.
    """

    in_channels: int
    out_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]
    resamp_with_conv: bool
    num_classes: int
    null_label: bool
    flip_sin_to_cos: bool
    freq_shift: int
    norm_groups: int
    norm_eps: float
    act: str
    attn_head_dim: int
    temb_scale_shift: bool
    downsample_padding: int
    resblock_down_levels: tuple[int, ...]
    resblock_up_levels: tuple[int, ...]
    mid_attn: bool
    mid_attn_norm: bool


MODEL_FIELDS = tuple(name for name in Architecture._fields if name != "attn_levels")  # copied to/from config.model
TUPLE_FIELDS = ("ch_mult", "resblock_down_levels", "resblock_up_levels")


def architecture_of(model_config: ml_collections.ConfigDict) -> Architecture:
    """The `Architecture` of a config's `model` section."""
    resolutions = level_resolutions(model_config.image_size, len(model_config.ch_mult))
    values = {key: model_config[key] for key in MODEL_FIELDS}
    values.update({key: tuple(values[key]) for key in TUPLE_FIELDS})
    attn = tuple(model_config.attn_resolutions)
    return Architecture(attn_levels=tuple(i for i, res in enumerate(resolutions) if res in attn), **values)


def official_architecture() -> Architecture:
    """The architecture of the default config's model: the official DDPM CIFAR-10 U-Net."""
    return architecture_of(default_config().model)


def matching_released_recipe(
    arch: Architecture, image_size: int | None, source: str
) -> ml_collections.ConfigDict | None:
    """The recipe of the first released model with this architecture (and image size, when known); None if none."""
    matches = []
    for name in RELEASED:
        config = recipe(name)
        if architecture_of(config.model) == arch and image_size in (None, config.model.image_size):
            matches.append((name, config))
    if len(matches) > 1:
        log.warning(
            "%s: the architecture fits the recipes %s; using %r (pass dataset= to choose)",
            source, [name for name, _ in matches], matches[0][0],
        )  # fmt: skip
    return matches[0][1] if matches else None


def _released_recipe(arch: Architecture, image_size: int | None, source: str) -> ml_collections.ConfigDict:
    """`matching_released_recipe`, or a ValueError asking for dataset= when no released model matches."""
    config = matching_released_recipe(arch, image_size, source)
    if config is None:
        raise WeightsError(
            f"{source}: architecture {arch._asdict()} (image size {image_size}) matches no released DDPM model "
            f"({', '.join(RELEASED)}); pass dataset= to pick the training recipe"
        )
    return config


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
        raise WeightsError(
            f"{source}: image_size={model.image_size} is not divisible by 2^{len(arch.ch_mult) - 1} = {factor} "
            f"({len(arch.ch_mult)} levels)"
        )
    if architecture_of(model) != arch and dataset is not None:
        log.warning("%s: the weights' architecture differs from the %r recipe's; using the weights'", source, dataset)
    resolutions = level_resolutions(model.image_size, len(arch.ch_mult))
    for key in MODEL_FIELDS:
        model[key] = getattr(arch, key)
    model.attn_resolutions = tuple(resolutions[i] for i in arch.attn_levels)
    return config


def param_shapes(model_config: ml_collections.ConfigDict) -> dict[ParamPath, Shape]:
    """Every parameter of our U-Net for `model_config`: path (e.g. ("down_0", "block_0", "conv1", "kernel")) -> shape.

    Conv kernels are HWIO, dense kernels [in, out], GroupNorm leaves `scale`/`bias`.
    """
    model = create_model(model_config)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_inputs(model_config), train=False))
    flat = flax.traverse_util.flatten_dict(variables["params"])
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}
