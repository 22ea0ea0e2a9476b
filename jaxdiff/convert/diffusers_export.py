"""Our DDPM-family model -> a diffusers `DDPMPipeline` folder: the `UNet2DModel` config.json and safetensors
(PyTorch layouts), the scheduler config, `model_index.json`, and `jaxdiff_config.json` (the full run config, so
that reading the folder back restores it). Models diffusers cannot express raise ValueError before anything is
written."""

from __future__ import annotations

import json
import os
import pathlib
from typing import NamedTuple

import flax.traverse_util
import ml_collections
import numpy as np
import safetensors.numpy

from jaxdiff.config.validation import validate
from jaxdiff.readers.architecture import param_shapes
from jaxdiff.readers.diffusers_format import (
    DOWN_BLOCKS, JAXDIFF_CONFIG_FILE, SCHEDULER_FILE, UP_BLOCKS, WEIGHTS_FILE, diffusers_names,
)  # fmt: skip
from jaxdiff.weights.files import CONFIG_FILE, MODEL_INDEX_FILE
from jaxdiff.weights.matching import match_names
from jaxdiff.diffusion.scheduler_config import DIFFUSERS_BETA_SCHEDULES, DIFFUSERS_MEAN_TYPES, DIFFUSERS_VAR_TYPES
from jaxdiff.weights.torch_layout import to_torch
from jaxdiff.errors import WeightsError


class DiffusersExport(NamedTuple):
    """An exported pipeline's contents: UNet config.json, tensors (PyTorch layouts), scheduler config, our config."""

    unet_config: dict
    tensors: dict[str, np.ndarray]
    scheduler_config: dict
    jaxdiff_config: dict


def _block_types(attn: list[bool], by_resblock: tuple[int, ...], resampled: range, table: dict, key: str):
    """(block type of each level 0..L-1, the resampler type of its Attn blocks): "resnet" or "conv"."""
    attn_kinds = {i in by_resblock for i in resampled if attn[i]}
    if len(attn_kinds) > 1:
        raise WeightsError(
            f"model.{key}={by_resblock}: UNet2DModel resamples all attention levels alike "
            "(by ResBlocks or by convolutions)"
        )
    types = [table[(attn[i], not attn[i] and i in by_resblock)] for i in range(len(attn))]
    return types, "resnet" if attn_kinds == {True} else "conv"


def unet_config(config: ml_collections.ConfigDict) -> dict:
    """The `UNet2DModel` config.json of our model; models diffusers cannot express raise ValueError."""
    m = config.model
    if not m.resamp_with_conv:
        raise WeightsError("model.resamp_with_conv=False: UNet2DModel always resamples with convolutions")
    if not m.mid_attn_norm and not m.temb_scale_shift:
        raise WeightsError("model.mid_attn_norm=False: UNet2DModel drops that GroupNorm only with temb_scale_shift")
    num_levels = len(m.ch_mult)
    attn = [res in tuple(m.attn_resolutions) for res in (m.image_size // 2**i for i in range(num_levels))]
    down, down_type = _block_types(attn, tuple(m.resblock_down_levels), range(num_levels - 1), DOWN_BLOCKS,
                                   "resblock_down_levels")  # fmt: skip
    up, up_type = _block_types(attn, tuple(m.resblock_up_levels), range(1, num_levels), UP_BLOCKS, "resblock_up_levels")
    return {
        "_class_name": "UNet2DModel",
        "sample_size": m.image_size,
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "block_out_channels": [m.ch * mult for mult in m.ch_mult],
        "layers_per_block": m.num_res_blocks,
        "down_block_types": down,
        "up_block_types": up[::-1],
        "downsample_type": down_type,
        "upsample_type": up_type,
        "attention_head_dim": m.attn_head_dim or None,
        "time_embedding_dim": None,
        "dropout": m.dropout,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": m.flip_sin_to_cos,
        "freq_shift": m.freq_shift,
        "mid_block_type": "UNetMidBlock2D",
        "mid_block_scale_factor": 1,
        "downsample_padding": m.downsample_padding,
        "act_fn": m.act,
        "norm_num_groups": m.norm_groups,
        "attn_norm_num_groups": m.norm_groups if m.mid_attn_norm else None,
        "norm_eps": m.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if m.temb_scale_shift else "default",
        "add_attention": m.mid_attn,
        "class_embed_type": None,
        "num_class_embeds": m.num_classes + int(m.null_label) if m.num_classes else None,
    }


def scheduler_config(config: ml_collections.ConfigDict) -> dict:
    """The `DDPMScheduler` config of our diffusion; settings it cannot express raise ValueError."""
    d = config.diffusion
    for key, table, value in (("schedule", DIFFUSERS_BETA_SCHEDULES, d.schedule), ("var_type", DIFFUSERS_VAR_TYPES, d.var_type),
                              ("mean_type", DIFFUSERS_MEAN_TYPES, d.mean_type)):  # fmt: skip
        if value not in table:
            raise WeightsError(f"diffusion.{key}={value!r} has no DDPMScheduler equivalent (supported: {sorted(table)})")
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": d.num_timesteps,
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
        "beta_schedule": DIFFUSERS_BETA_SCHEDULES[d.schedule],
        "trained_betas": None,
        "variance_type": DIFFUSERS_VAR_TYPES[d.var_type],
        "clip_sample": bool(config.sampling.clip_denoised),
        "clip_sample_range": 1.0,
        "prediction_type": DIFFUSERS_MEAN_TYPES[d.mean_type],
        "thresholding": False,
    }


def model_index() -> dict:
    """The `model_index.json` of an exported `DDPMPipeline`."""
    return {
        "_class_name": "DDPMPipeline",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }


def to_diffusers(config: ml_collections.ConfigDict, params) -> DiffusersExport:
    """Everything `write_diffusers` writes, checked (config representable, params fit the model) and in memory."""
    validate(config)
    settings, scheduler = unet_config(config), scheduler_config(config)
    shapes = param_shapes(config.model)
    flat = {p: np.asarray(a, np.float32) for p, a in flax.traverse_util.flatten_dict(params).items()}
    wanted = {p: (("/".join(p),), s) for p, s in shapes.items()}
    match_names(wanted, {"/".join(p): a.shape for p, a in flat.items()}, source="params")
    levels = len(config.model.ch_mult)
    tensors = {diffusers_names(p, levels)[0]: np.ascontiguousarray(to_torch(p, a)) for p, a in flat.items()}
    return DiffusersExport(settings, tensors, scheduler, config.to_dict())


def save_export(export: DiffusersExport, folder: str | os.PathLike) -> None:
    """Write `export` into `folder` as a `DDPMPipeline` folder (created if needed; files of the same names are
    replaced): model_index.json, unet/ (config.json, diffusion_pytorch_model.safetensors), scheduler/ and
    jaxdiff_config.json."""
    folder = pathlib.Path(folder)
    for sub in ("unet", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(export.tensors, folder / "unet" / WEIGHTS_FILE, metadata={"format": "pt"})
    files = {
        MODEL_INDEX_FILE: model_index(),
        os.path.join("unet", CONFIG_FILE): export.unet_config,
        SCHEDULER_FILE: export.scheduler_config,
        JAXDIFF_CONFIG_FILE: export.jaxdiff_config,
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def write_diffusers(config: ml_collections.ConfigDict, params, folder: str | os.PathLike) -> None:
    """Export our model as a diffusers `DDPMPipeline` folder (see `save_export`); checks everything first."""
    save_export(to_diffusers(config, params), folder)
