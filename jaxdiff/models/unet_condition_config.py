"""The configuration of the text-conditional U-Net (`jaxdiff.models.unet_condition`): reading a diffusers
`UNet2DConditionModel` config.json into our ConfigDict, checking it, and resolving its per-level settings.

The model is configured by a ConfigDict whose keys are those of a diffusers `config.json` (plus `dtype`
and `remat`); `config_from_diffusers` reads such a dict and refuses settings this network lacks (dual
attention, Kandinsky's added embeddings, concatenated class embeddings, ...). Beyond SD 1.x/2.x it runs the
x4 upscaler's U-Net (a `num_class_embeds` label table added to the time embedding, per-level
`only_cross_attention`), SDXL's (per-level `transformer_layers_per_block`, `addition_embed_type="text_time"`:
pooled text embeddings and size/crop numbers added to the time embedding) and the other class embeddings
(`class_embed_type` "timestep", "identity", "projection": SD 2.1 unCLIP's).

Heads: level i has `num_attention_heads[i]` heads when that key is set, else `attention_head_dim[i]` heads
(diffusers' naming quirk: SD 1.x's `attention_head_dim: 8` and SD 2.x's `[5, 10, 20, 20]` are head
counts), each of width C_i // heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxdiff.checks import is_real, require_bool, require_int
from jaxdiff.errors import ConfigError

DTYPES = ("float32", "bfloat16")
CLASS_NAME = "UNet2DConditionModel"
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has cross-attention
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
SUPPORTED_ACTIVATIONS = ("silu", "swish")

# The settings this network reads, with diffusers' defaults (used when config.json omits a key).
SUPPORTED_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "only_cross_attention": False,
    "transformer_layers_per_block": 1,
    "num_class_embeds": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "dual_cross_attention": False,
    "center_input_sample": False,
    "resnet_time_scale_shift": "default",
}
ADDITION_EMBED_TYPES = (None, "text_time")
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection")
# Settings whose only supported values are these (the first is diffusers' default).
FIXED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "dual_cross_attention": (False,),
    "center_input_sample": (False,),
    "resnet_time_scale_shift": ("default",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type_num_heads": (64,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    # read by diffusers' UNetMidBlock2DSimpleCrossAttn only: UNetMidBlock2DCrossAttn always attends to itself
    "mid_block_only_cross_attention": (None, False, True),
    "cross_attention_norm": (None,),
}


def config_from_diffusers(
    settings: Mapping[str, Any], *, dtype: str = "float32", remat: bool = False
) -> ml_collections.ConfigDict:
    """The model ConfigDict of a diffusers `UNet2DConditionModel` config.json dict (SD 1.x / 2.x, SDXL, x4 upscaler).

    Keys it omits take diffusers' defaults; keys starting with `_` are metadata. Settings this network
    lacks, and unknown keys, raise one ValueError naming all of them; values are then checked as in
    `check_config`.
    """
    name = settings.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ConfigError(f"_class_name={name!r}: only {CLASS_NAME} configs are supported")
    unsupported = [
        f"{key}={settings[key]!r}"
        for key, allowed in FIXED_SETTINGS.items()
        if key in settings and settings[key] not in allowed
    ]
    known = {*SUPPORTED_DEFAULTS, *FIXED_SETTINGS}
    unknown = sorted(key for key in settings if not key.startswith("_") and key not in known)
    if unsupported or unknown:
        parts = [f"settings {', '.join(unsupported)}"] if unsupported else []
        parts += [f"unknown keys {unknown}"] if unknown else []
        raise ConfigError(
            f"{CLASS_NAME} config not supported yet: {'; '.join(parts)} (SD 1.x/2.x, SDXL and x4 upscaler U-Nets "
            "only; those keys must be absent or at diffusers' default)"
        )
    values = {key: settings.get(key, default) for key, default in SUPPORTED_DEFAULTS.items()}
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    config = ml_collections.ConfigDict({**values, "dtype": dtype, "remat": remat})
    check_config(config)
    return config


def per_level(key: str, value: Any, levels: int) -> tuple[Any, ...]:
    """A one-value-or-list setting as one value per level."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(values) != levels:
        raise ConfigError(f"{key}={value!r} must be one value or a list of {levels} (one per level)")
    return values


def num_heads_per_level(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Attention heads at each level: `num_attention_heads` if set, else `attention_head_dim` (diffusers' rule)."""
    levels = len(config.block_out_channels)
    if config.num_attention_heads is not None:
        return per_level("num_attention_heads", config.num_attention_heads, levels)
    return per_level("attention_head_dim", config.attention_head_dim, levels)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first invalid setting of a model config (see `config_from_diffusers`)."""
    missing = [key for key in (*SUPPORTED_DEFAULTS, "dtype", "remat") if key not in config]
    if missing:
        raise ConfigError(f"model config lacks keys {missing}")
    for key, allowed in FIXED_SETTINGS.items():
        if key in SUPPORTED_DEFAULTS and config[key] not in allowed:
            raise ConfigError(f"{key}={config[key]!r} is not supported yet (supported: {list(allowed)})")
    widths = config.block_out_channels
    if not isinstance(widths, (list, tuple)) or not widths:
        raise ConfigError(f"block_out_channels={widths!r} must be a non-empty list of ints")
    require_int("norm_num_groups", config.norm_num_groups, 1)
    for width in widths:
        require_int("block_out_channels entry", width, 1)
        if width % config.norm_num_groups:
            groups = config.norm_num_groups
            raise ConfigError(f"block_out_channels entry {width} is not divisible by norm_num_groups={groups}")
    levels = len(widths)
    for key, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        types = config[key]
        if not isinstance(types, (list, tuple)) or len(types) != levels or any(t not in table for t in types):
            raise ConfigError(f"{key}={types!r} must list {levels} of {sorted(table)} (one per level)")
    for value in per_level("layers_per_block", config.layers_per_block, levels):
        require_int("layers_per_block", value, 1)
    for width, heads in zip(widths, num_heads_per_level(config)):
        require_int("attention heads per level", heads, 1)
        if heads > width:
            raise ConfigError(f"{heads} attention heads do not fit a level of {width} channels")
    for value in per_level("transformer_layers_per_block", config.transformer_layers_per_block, levels):
        require_int("transformer_layers_per_block entry", value, 1)
    for value in per_level("only_cross_attention", config.only_cross_attention, levels):
        require_bool("only_cross_attention entry", value)
    for key in ("in_channels", "out_channels", "cross_attention_dim"):
        require_int(key, config[key], 1)
    for key in ("use_linear_projection", "upcast_attention", "flip_sin_to_cos", "remat"):
        require_bool(key, config[key])
    if not is_real(config.freq_shift, numpy=False):
        raise ConfigError(f"freq_shift={config.freq_shift!r} must be a number")
    if config.freq_shift >= widths[0] // 2:
        half = widths[0] // 2
        raise ConfigError(f"freq_shift={config.freq_shift!r} must be below half the timestep embedding width ({half})")
    if not isinstance(config.norm_eps, (int, float)) or not config.norm_eps > 0:
        raise ConfigError(f"norm_eps={config.norm_eps!r} must be a positive number")
    if config.act_fn not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"act_fn={config.act_fn!r} is not supported yet (supported: {list(SUPPORTED_ACTIVATIONS)})")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype={config.dtype!r} is not one of {DTYPES}")
    _check_added_embeddings(config)


def _check_added_embeddings(config: ml_collections.ConfigDict) -> None:
    """The class embedding and SDXL's text_time embedding: each key set only with the feature that reads it
    (diffusers ignores num_class_embeds beside a class_embed_type, projection_class_embeddings_input_dim without
    "projection" or "text_time", addition_time_embed_dim without "text_time")."""
    for key, allowed in (("class_embed_type", CLASS_EMBED_TYPES), ("addition_embed_type", ADDITION_EMBED_TYPES)):
        if config[key] not in allowed:
            raise ConfigError(f"{key}={config[key]!r} is not supported yet (supported: {list(allowed)})")
    text_time = config.addition_embed_type == "text_time"
    readers = {
        "num_class_embeds": config.class_embed_type is None,
        "addition_time_embed_dim": text_time,
        "projection_class_embeddings_input_dim": text_time or config.class_embed_type == "projection",
    }
    unused = [f"{key}={config[key]!r}" for key, read in readers.items() if not read and config[key] is not None]
    if unused:
        raise ConfigError(f"{', '.join(unused)} set where nothing reads it (num_class_embeds: with class_embed_type "
                          "null; addition_time_embed_dim: with addition_embed_type 'text_time'; "
                          "projection_class_embeddings_input_dim: with either 'text_time' or class_embed_type "
                          "'projection')")  # fmt: skip
    if config.num_class_embeds is not None:
        require_int("num_class_embeds", config.num_class_embeds, 1)
    if readers["projection_class_embeddings_input_dim"]:
        require_int("projection_class_embeddings_input_dim", config.projection_class_embeddings_input_dim, 1)
    if text_time:
        width = config.addition_time_embed_dim
        require_int("addition_time_embed_dim", width, 1)
        if width < 4 or width % 2 or config.freq_shift >= width // 2:
            raise ConfigError(f"addition_time_embed_dim={width} must be even, at least 4 and above twice freq_shift")
