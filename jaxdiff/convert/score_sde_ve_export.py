"""Writing a diffusers `ScoreSdeVePipeline` folder (the layout `jaxdiff.readers.score_folders` reads) from a jaxdiff
model of uncentred data (`data.centered` False) whose NCSN++ has diffusers' layout and widths >= 128."""

from __future__ import annotations

import json
import os
import pathlib
from typing import NamedTuple

import flax.traverse_util
import ml_collections
import numpy as np
import safetensors.numpy

from jaxdiff.config.specs import flat_keys
from jaxdiff.config.validation import validate
from jaxdiff.diffusion.continuous import process_from_config
from jaxdiff.errors import WeightsError
from jaxdiff.readers import score_diffusers
from jaxdiff.readers.architecture import param_shapes
from jaxdiff.readers.diffusers_format import WEIGHTS_FILE
from jaxdiff.readers.score_folders import PIPELINE, SCHEDULER
from jaxdiff.weights.files import CONFIG_FILE, MODEL_INDEX_FILE
from jaxdiff.weights.matching import match_names
from jaxdiff.weights.torch_layout import to_torch

MIN_EXPORT_WIDTH = 128  # diffusers' attention GroupNorms have 32 groups, score_sde's min(C // 4, 32)


class ScoreSdeVeExport(NamedTuple):
    """An exported ScoreSdeVePipeline: UNet config.json, tensors (PyTorch layouts), scheduler config."""

    unet_config: dict
    tensors: dict[str, np.ndarray]
    scheduler_config: dict


def _unet_config(network: ml_collections.ConfigDict) -> dict:
    """The `UNet2DModel` config.json of our NCSN++ network section in diffusers' layout."""
    levels = range(len(network.ch_mult))
    attn = [network.image_size // 2**i in network.attn_resolutions for i in levels]
    return dict(
        _class_name="UNet2DModel", sample_size=network.image_size, in_channels=network.num_channels,
        out_channels=network.num_channels, layers_per_block=network.num_res_blocks,
        block_out_channels=[network.nf * m for m in network.ch_mult],
        down_block_types=[score_diffusers.DOWN_TYPES[a] for a in attn],
        up_block_types=[score_diffusers.UP_TYPES[a] for a in reversed(attn)],
        time_embedding_type="fourier", mid_block_scale_factor=2**0.5, norm_num_groups=None, norm_eps=1e-6,
        attention_head_dim=None, act_fn="silu", center_input_sample=False, dropout=network.dropout,
    )  # fmt: skip


def score_sde_ve_export(config: ml_collections.ConfigDict, params) -> ScoreSdeVeExport:
    """What `save_score_sde_ve_export` writes for a jaxdiff model, checked: a VE score model of uncentred data
    whose NCSN++ diffusers' UNet2DModel expresses (else ValueError naming every difference), params that fit.
    The scheduler gets the process's σ range and the config's pc settings (num_train_timesteps = steps + 1)."""
    validate(config)
    dc, sc, model = config.diffusion, config.sampling, config.model
    wanted = {"model.network": "ncsnpp", "diffusion.process": "ve", "diffusion.parameterization": "score",
              "data.centered": False, "sampling.predictor": "reverse_diffusion", "sampling.corrector": "langevin"}
    actual = flat_keys(config)
    differences = [f"{key}={actual[key]!r} (needs {value!r})" for key, value in wanted.items() if actual[key] != value]
    if not differences:
        network = model.ncsnpp
        expressed = score_diffusers.config_from_diffusers(_unet_config(network))
        expressed.dropout = network.dropout
        differences = [f"model.ncsnpp.{key}={network[key]!r} (diffusers' layout has {expressed[key]!r})"
                       for key in sorted(network) if expressed[key] != network[key]]  # fmt: skip
        if min(network.ch_mult) * network.nf < MIN_EXPORT_WIDTH:
            differences.append(f"model.ncsnpp widths {[network.nf * m for m in network.ch_mult]} (diffusers' "
                               f"attention GroupNorms match score_sde's only for widths >= {MIN_EXPORT_WIDTH})")
    if differences:
        raise WeightsError(f"cannot export as a diffusers {PIPELINE}: {'; '.join(differences)}")
    shapes = param_shapes(model)
    flat = {p: np.asarray(a, np.float32) for p, a in flax.traverse_util.flatten_dict(params).items()}
    match_names({p: (("/".join(p),), s) for p, s in shapes.items()}, {"/".join(p): a.shape for p, a in flat.items()},
                source="params")  # fmt: skip
    levels = len(model.ncsnpp.ch_mult)
    tensors = {score_diffusers.diffusers_names(p, levels)[0]: np.ascontiguousarray(to_torch(p, a))
               for p, a in flat.items()}  # fmt: skip
    process = process_from_config(dc)
    scheduler = dict(_class_name=SCHEDULER, num_train_timesteps=sc.steps + 1, snr=sc.snr,
                     sigma_min=float(process.sigma_min), sigma_max=float(process.sigma_max),
                     sampling_eps=float(process.t_min), correct_steps=sc.n_corrector)  # fmt: skip
    return ScoreSdeVeExport(_unet_config(model.ncsnpp), tensors, scheduler)


def save_score_sde_ve_export(export: ScoreSdeVeExport, folder: str | os.PathLike) -> None:
    """Write `export` into `folder` as a ScoreSdeVePipeline: model_index.json, unet/, scheduler/."""
    folder = pathlib.Path(folder)
    for sub in ("unet", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(export.tensors, folder / "unet" / WEIGHTS_FILE, metadata={"format": "pt"})
    files = {
        MODEL_INDEX_FILE: {"_class_name": PIPELINE, "scheduler": ["diffusers", SCHEDULER],
                           "unet": ["diffusers", "UNet2DModel"]},
        os.path.join("unet", CONFIG_FILE): export.unet_config,
        os.path.join("scheduler", "scheduler_config.json"): export.scheduler_config,
    }  # fmt: skip
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
