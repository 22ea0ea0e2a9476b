"""diffusers `ScoreSdeVePipeline` folders (e.g. `google/ncsnpp-*`) -> our `NCSNpp` and its VE process.

A folder holds `model_index.json`, `unet/` (config.json and safetensors of an NCSN++ `UNet2DModel`, read by
`score_diffusers`) and `scheduler/scheduler_config.json` of a `ScoreSdeVeScheduler`, which gives σ_min,
σ_max, N = num_train_timesteps and the predictor-corrector settings (snr, correct_steps, sampling_eps).
The pipeline feeds the sample itself to the network (data in [0, 1]) and clamps its result to [0, 1].
`jaxdiff.convert.score_sde_ve_export` writes such a folder back.

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

from jaxdiff.checks import is_real
from jaxdiff.errors import WeightsError
from jaxdiff.readers import score_diffusers
from jaxdiff.weights.files import CONFIG_FILE, DIFFUSERS_WEIGHTS_STEM, MODEL_INDEX_FILE, load_json, weights_file
from jaxdiff.weights.safetensors_reader import load_safetensors

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
        tensors = load_safetensors(weights_file(unet, DIFFUSERS_WEIGHTS_STEM))
        params = score_diffusers.params_from_diffusers(config, tensors)
    except ValueError as err:
        raise ScoreFolderError(f"{unet}: {err}") from err
    return "ncsnpp", config, params, info
