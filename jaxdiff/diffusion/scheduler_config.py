"""diffusers scheduler configs (`scheduler_config.json` dicts) read into jaxdiff's diffusion settings.

`apply_scheduler_config` sets a run config's `diffusion` (and `sampling.clip_denoised`) from a `DDPMScheduler`
or `DDIMScheduler` config; `scheduler_settings` gives the `SchedulerSettings` a latent pipeline steps with: the
training schedule plus where diffusers' schedulers place their steps on it. Pure functions of dicts: no files.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections

from jaxdiff.checks import is_int
from jaxdiff.schedule import Schedule, schedule_from_config

DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "quad": "scaled_linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}
DIFFUSERS_VAR_TYPES = {
    "fixedlarge": "fixed_large", "fixedsmall": "fixed_small", "learned": "learned", "learned_range": "learned_range",
}  # fmt: skip
DIFFUSERS_MEAN_TYPES = {"eps": "epsilon", "x_start": "sample", "v": "v_prediction"}
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "rescale_betas_zero_snr": False,
}
DDIM_PIPELINE_STEPS = 50  # DDIMPipeline's default num_inference_steps
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# DDIMScheduler's defaults for the settings our samplers read besides the noise schedule.
SAMPLING_DEFAULTS = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True}


def unsupported_setting(source: str, key: str, value: Any, need: str) -> ValueError:
    return ValueError(f"{source}: unsupported setting {key}={value!r} ({need})")


def _inverse(table: dict[str, str], value: str, key: str, source: str) -> str:
    for ours, theirs in table.items():
        if theirs == value:
            return ours
    raise unsupported_setting(source, key, value, f"supported: {sorted(table.values())}")


def apply_scheduler_config(config: ml_collections.ConfigDict, settings: dict, source: str) -> None:
    """Set `config.diffusion` and `config.sampling.clip_denoised` from a `DDPMScheduler` or `DDIMScheduler`
    config (a DDIMScheduler also selects the ddim sampler with DDIMPipeline's 50 steps). Sampling-only
    settings (timestep_spacing, steps_offset, set_alpha_to_one) are not read."""
    kind = settings.get("_class_name", "DDPMScheduler")
    if kind not in SCHEDULERS:
        raise ValueError(f"{source}: _class_name={kind!r}; supported schedulers: {', '.join(SCHEDULERS)}")
    s = {key: settings.get(key, default) for key, default in SCHEDULER_DEFAULTS.items()}
    for key in ("trained_betas", "thresholding", "rescale_betas_zero_snr"):
        if s[key] not in (None, False):
            raise unsupported_setting(source, key, s[key], "DDPM sampling uses no such option")
    if s["clip_sample"] and s["clip_sample_range"] != 1.0:
        raise unsupported_setting(source, "clip_sample_range", s["clip_sample_range"], "jaxdiff's samplers clip to [-1, 1]")
    if not is_int(s["num_train_timesteps"], numpy=False) or s["num_train_timesteps"] < 2:
        raise unsupported_setting(source, "num_train_timesteps", s["num_train_timesteps"], "an int >= 2")
    d = config.diffusion
    d.schedule = _inverse(DIFFUSERS_BETA_SCHEDULES, s["beta_schedule"], "beta_schedule", source)
    d.num_timesteps = s["num_train_timesteps"]
    d.beta_start, d.beta_end = float(s["beta_start"]), float(s["beta_end"])
    d.var_type = _inverse(DIFFUSERS_VAR_TYPES, s["variance_type"], "variance_type", source)
    d.mean_type = _inverse(DIFFUSERS_MEAN_TYPES, s["prediction_type"], "prediction_type", source)
    config.sampling.clip_denoised = bool(s["clip_sample"])
    if kind == "DDIMScheduler":
        config.sampling.sampler, config.sampling.steps = "ddim", min(DDIM_PIPELINE_STEPS, d.num_timesteps)


class SchedulerSettings(NamedTuple):
    """The training schedule and how diffusers' DDIMScheduler places its steps on it.

    mean_type: what the U-Net predicts, "eps", "v" or "x_start". timestep_spacing: "leading", "trailing" or
    "linspace"; steps_offset: added to "leading" steps; set_alpha_to_one: whether DDIM's last step goes to
    ᾱ = 1 (else to ᾱ of step 0). `config` is the scheduler_config.json dict, kept for export.
    """

    schedule: Schedule
    mean_type: str
    timestep_spacing: str
    steps_offset: int
    set_alpha_to_one: bool
    config: dict


def scheduler_settings(config: dict, source: str) -> SchedulerSettings:
    """`SchedulerSettings` of a diffusers scheduler config dict; unsupported values raise ValueError naming them."""
    run_config = ml_collections.ConfigDict({"diffusion": {}, "sampling": {}})
    apply_scheduler_config(run_config, {**config, "_class_name": "DDIMScheduler"}, source)
    s = {key: config.get(key, default) for key, default in SAMPLING_DEFAULTS.items()}
    if s["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise ValueError(f"{source}: timestep_spacing={s['timestep_spacing']!r}; supported: {TIMESTEP_SPACINGS}")
    offset = s["steps_offset"]
    if not is_int(offset, numpy=False) or not 0 <= offset < run_config.diffusion.num_timesteps:
        raise ValueError(f"{source}: steps_offset={offset!r} must be an int in 0..num_train_timesteps-1")
    if not isinstance(s["set_alpha_to_one"], bool):
        raise ValueError(f"{source}: set_alpha_to_one={s['set_alpha_to_one']!r} must be true or false")
    schedule = schedule_from_config(run_config.diffusion)
    return SchedulerSettings(schedule, run_config.diffusion.mean_type, s["timestep_spacing"], offset,
                             s["set_alpha_to_one"], dict(config))  # fmt: skip
