"""diffusers `ScoreSdeVePipeline` folders (e.g. `google/ncsnpp-*`) -> our `NCSNpp` and its VE process.

A folder holds `model_index.json`, `unet/` (config.json and safetensors of an NCSN++ `UNet2DModel`, read by
`score_diffusers`) and `scheduler/scheduler_config.json` of a `ScoreSdeVeScheduler`, which gives σ_min,
σ_max, N = num_train_timesteps and the predictor-corrector settings (snr, correct_steps, sampling_eps).
The pipeline feeds the sample itself to the network (data in [0, 1]) and clamps its result to [0, 1].
`score_sde_ve_export` / `save_score_sde_ve_export` write such a folder back from a jaxdiff model of
uncentred data (`data.centered` False) whose NCSN++ has diffusers' layout and widths >= 128.

Its N iterations run a Langevin corrector step, then a reverse-diffusion predictor step, at each t of
linspace(1, sampling_eps, N), the network labelled σ(t) = σ_min·(σ_max/σ_min)^t; the last predictor step
(G² = σ_min²) is the denoising one, and its mean is the sample. jaxdiff's `pc` sampler with N − 1 steps has
the same grid and step formulas, its last step being D at t = sampling_eps, and differs in three places:
no corrector before that last step; no noise in the predictor step that reaches t = sampling_eps (jaxdiff
denoises its mean; diffusers adds noise of standard deviation sqrt(σ(t_{N−2})² − σ_min²), 0.11·σ_min for
N = 2000, σ_min 0.01, σ_max 1348); and its predictor's G² = σ(t)² − σ(s)² on the grid where diffusers
takes the nearest lower of N geometric levels, a relative difference of at most
(σ_max/σ_min)^sampling_eps − 1 (1.2e-4 for 0.01 and 1348).
"""

from __future__ import annotations

import os
import pathlib

import ml_collections
import safetensors
import safetensors.numpy

import json
from typing import NamedTuple

import flax.traverse_util
import numpy as np

from jaxdiff.checks import is_real
from jaxdiff.config import flat_keys, validate
from jaxdiff.diffusion.continuous import process_from_config
from jaxdiff.convert import score_diffusers
from jaxdiff.convert.architecture import param_shapes
from jaxdiff.convert.diffusers_format import CONFIG_FILE, MODEL_INDEX_FILE, WEIGHTS_FILE, WEIGHTS_STEM
from jaxdiff.convert.torch_layout import to_torch
from jaxdiff.convert.files import load_json, weights_file
from jaxdiff.convert.matching import match_names
from jaxdiff.errors import WeightsError

PIPELINE = "ScoreSdeVePipeline"
SCHEDULER = "ScoreSdeVeScheduler"
SCHEDULER_DEFAULTS = dict(num_train_timesteps=2000, snr=0.15, sigma_min=0.01, sigma_max=1348.0, sampling_eps=1e-5,
                          correct_steps=1)  # fmt: skip


class ScoreFolderError(WeightsError):
    """A folder that is not a readable ScoreSdeVePipeline."""


def _json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise ScoreFolderError(f"{path}: missing; a {PIPELINE} folder has model_index.json, unet/ and scheduler/")
    try:
        settings = load_json(path)
    except ValueError as err:
        raise ScoreFolderError(str(err)) from err
    if not isinstance(settings, dict):
        raise ScoreFolderError(f"{path}: expected a JSON object")
    return settings


def _scheduler_info(path: pathlib.Path) -> dict:
    settings = _json(path)
    if settings.get("_class_name", SCHEDULER) != SCHEDULER:
        raise ScoreFolderError(f"{path}: _class_name={settings['_class_name']!r}; expected {SCHEDULER}")
    values = {key: settings.get(key, default) for key, default in SCHEDULER_DEFAULTS.items()}
    for key, value in values.items():
        if not is_real(value, numpy=False) or value <= 0:
            raise ScoreFolderError(f"{path}: {key}={value!r} must be a positive number")
    if not values["sigma_min"] < values["sigma_max"]:
        raise ScoreFolderError(f"{path}: need sigma_min < sigma_max, got {values['sigma_min']}, {values['sigma_max']}")
    sampling = dict(sampler="pc", predictor="reverse_diffusion", corrector="langevin", snr=float(values["snr"]),
                    n_corrector=int(values["correct_steps"]), steps=max(1, int(values["num_train_timesteps"]) - 1))
    return dict(
        process="ve", sigma_min=float(values["sigma_min"]), sigma_max=float(values["sigma_max"]),
        sampling_eps=float(values["sampling_eps"]), continuous=True, parameterization="score",
        noise_labels="sigma", scale_by_sigma=True, data_range=(0.0, 1.0), network_input="x", sampling=sampling,
    )  # fmt: skip


def read_score_sde_ve_folder(folder: str | os.PathLike) -> tuple[str, ml_collections.ConfigDict, dict, dict]:
    """("ncsnpp", our network config, params (NumPy), process info) of a ScoreSdeVePipeline folder.

    Process info: process "ve" with the scheduler's sigma_min, sigma_max and sampling_eps; the network
    sees data in [0, 1] and its output divided by σ is the score (scale_by_sigma); `sampling`: the config's
    sampling keys of the scheduler's predictor-corrector loop (steps N − 1: see the module docstring).
    """
    folder = pathlib.Path(folder)
    pipeline = _json(folder / MODEL_INDEX_FILE).get("_class_name")
    if pipeline != PIPELINE:
        raise ScoreFolderError(f"{folder / MODEL_INDEX_FILE}: _class_name={pipeline!r}; expected {PIPELINE}")
    info = _scheduler_info(folder / "scheduler" / "scheduler_config.json")
    unet = folder / "unet"
    settings = _json(unet / CONFIG_FILE)
    try:
        config = score_diffusers.config_from_diffusers(settings)
        tensors = safetensors.numpy.load_file(weights_file(unet, WEIGHTS_STEM))
        params = score_diffusers.params_from_diffusers(config, tensors)
    except (ValueError, safetensors.SafetensorError) as err:
        raise ScoreFolderError(f"{unet}: {err}") from err
    return "ncsnpp", config, params, info


# --------------------------------------------------------------------------- writing

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
