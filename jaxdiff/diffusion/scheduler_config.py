"""diffusers scheduler configs (`scheduler_config.json` dicts) read into jaxdiff's diffusion settings.

`apply_scheduler_config` sets a run config's `diffusion` (and `sampling.clip_denoised`) from a `DDPMScheduler`
or `DDIMScheduler` config (the pixel-space pipelines: thresholding, rescale_betas_zero_snr and a clip_sample_range
other than 1 are refused there); `scheduler_settings` gives the `SchedulerSettings` a latent pipeline steps with: the
training schedule plus how diffusers' schedulers step on it. Every key of the config is implemented, accepted
without effect (`ACCEPTED_WITHOUT_EFFECT`) or refused with one line naming the key and value (`WeightsError`: a bad
scheduler config is a bad weights folder); unknown keys are refused. Pure functions of dicts: no files.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from jaxdiff.checks import is_int, is_real
from jaxdiff.errors import WeightsError
from jaxdiff.schedule import (
    Schedule,
    betas_from_config,
    rescale_zero_terminal_snr,
    schedule_from_betas,
    with_last_alpha_bar,
)

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


def unsupported_setting(source: str, key: str, value: Any, need: str) -> WeightsError:
    return WeightsError(f"{source}: unsupported setting {key}={value!r} ({need})")


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
        raise WeightsError(f"{source}: _class_name={kind!r}; supported schedulers: {', '.join(SCHEDULERS)}")
    s = {key: settings.get(key, default) for key, default in SCHEDULER_DEFAULTS.items()}
    for key in ("trained_betas", "thresholding", "rescale_betas_zero_snr"):
        if s[key] not in (None, False):
            raise unsupported_setting(source, key, s[key], "jaxdiff's pixel-space samplers do not implement it")
    if s["clip_sample"] and s["clip_sample_range"] != 1.0:
        raise unsupported_setting(source, "clip_sample_range", s["clip_sample_range"],
                                  "jaxdiff's pixel-space samplers clip to [-1, 1]")  # fmt: skip
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


# How `scheduler_settings` reads each key of a diffusers scheduler config. The config is applied to whichever
# sampler a run picks, as diffusers' `from_config` would: a key that the sampler's scheduler class does not take
# is dropped by diffusers, and so here.
#
# Implemented (read into `SchedulerSettings`; the samplers that read each are in `jaxdiff.latent.schedulers`):
#   num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type (epsilon | v_prediction | sample),
#   timestep_spacing, steps_offset, set_alpha_to_one, clip_sample and clip_sample_range (ddim, ddpm, heun),
#   thresholding, dynamic_thresholding_ratio and sample_max_value (ddim, ddpm, dpm_solver++, dpm_solver++_sde,
#   unipc, deis), rescale_betas_zero_snr (ddim, ddpm: ᾱ_{T-1} = 0; dpm_solver++, dpm_solver++_sde, euler,
#   euler_ancestral, unipc: ᾱ_{T-1} = 2**-24), final_sigmas_type (zero | sigma_min),
#   lower_order_final, euler_at_final, solver_order (1 | 2 | 3), algorithm_type (dpmsolver++ | sde-dpmsolver++;
#   "deis", which DPMSolverMultistepScheduler reads as dpmsolver++), solver_type (midpoint | heun; "logrho",
#   "bh1", "bh2", which it reads as midpoint), use_karras_sigmas, skip_prk_steps (pndm: true, PLMS from the first step; false,
#   PNDMScheduler's default, its Runge–Kutta warm-up first).
# Accepted without effect (each only with the values listed, which leave every step as without the key):
ACCEPTED_WITHOUT_EFFECT = {
    "_class_name": "any: the latent pipelines' sampler=None steps as it (jaxdiff.latent.schedulers.FOLDER_SAMPLERS); "
                   "an explicit sampler sets the class",
    "_diffusers_version": "any",
    "_use_default_values": "any: diffusers' in-memory record of the keys it defaulted (not in saved files)",
    "trained_betas": "null",
    "variance_type": "null (no learned variance) or fixed_small (what ddpm does)",
    "use_exponential_sigmas": "false",
    "use_beta_sigmas": "false",
    "use_lu_lambdas": "false",
    "use_flow_sigmas": "false",
    "flow_shift": "any when use_flow_sigmas is false",
    "use_dynamic_shifting": "false",
    "time_shift_type": "any when use_dynamic_shifting is false",
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "sigma_min": "null",
    "sigma_max": "null",
    "lambda_min_clipped": "at most the least λ = ln(α/σ) of the training steps (no step is clipped)",
    "predict_x0": "true (UniPCMultistepScheduler's default)",
    "disable_corrector": "[] (UniPCMultistepScheduler's default)",
    "solver_p": "null",
    "shift_terminal": "null",
}
# Every other value of these keys is refused, as are keys not named here (one line naming the key and value).
NO_EFFECT_VALUES = {
    "trained_betas": (None,), "variance_type": (None, "fixed_small"), "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
    "interpolation_type": ("linear",), "timestep_type": ("discrete",), "sigma_min": (None,), "sigma_max": (None,),
    "predict_x0": (True,), "disable_corrector": ([],), "solver_p": (None,), "shift_terminal": (None,),
}  # fmt: skip
# DPMSolverMultistepScheduler's settings and their defaults, with the values implemented (diffusers' aliases
# mapped to what it reads them as).
DPM_DEFAULTS = {"final_sigmas_type": "zero", "lower_order_final": True, "euler_at_final": False, "solver_order": 2,
                "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "use_karras_sigmas": False}  # fmt: skip
DPM_VALUES = {
    "final_sigmas_type": {"zero": "zero", "sigma_min": "sigma_min"},
    "solver_order": {1: 1, 2: 2, 3: 3},
    "algorithm_type": {"dpmsolver++": "dpmsolver++", "sde-dpmsolver++": "sde-dpmsolver++", "deis": "dpmsolver++"},
    "solver_type": {"midpoint": "midpoint", "heun": "heun", "logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
}  # fmt: skip
DPM_REFUSED_WHY = {
    "algorithm_type": "dpmsolver and sde-dpmsolver (deprecated in diffusers) are not implemented; use dpmsolver++ "
                      "or sde-dpmsolver++",
}  # fmt: skip
# How the classes that take them limit x̂_0 (`jaxdiff.diffusion.limits.DenoisedLimit`), and their defaults.
LIMIT_DEFAULTS = {"clip_sample_range": 1.0, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                  "sample_max_value": 1.0}  # fmt: skip
# PNDMScheduler's key and default.
PNDM_DEFAULTS = {"skip_prk_steps": False}
KNOWN_KEYS = {*SCHEDULER_DEFAULTS, *SAMPLING_DEFAULTS, *ACCEPTED_WITHOUT_EFFECT, *DPM_DEFAULTS, *LIMIT_DEFAULTS,
              *PNDM_DEFAULTS}  # fmt: skip
# ᾱ_{T-1} after rescale_betas_zero_snr in the classes that keep σ_{T-1} finite (Euler, DPM-Solver, UniPC); DDIM
# and DDPM keep ᾱ_{T-1} = 0.
FINITE_ZERO_SNR_LAST = 2.0**-24


class SchedulerSettings(NamedTuple):
    """The training schedule and how diffusers' schedulers, made `from_config` of this config, step on it.

    mean_type: what the U-Net predicts, "eps", "v" or "x_start". timestep_spacing: "leading", "trailing" or
    "linspace"; steps_offset: added to "leading" steps; set_alpha_to_one: whether DDIM's last step goes to
    ᾱ = 1 (else to ᾱ of step 0). `config` is the scheduler_config.json dict, kept for export. The rest are the
    config's values, or the diffusers defaults where it has none: clip_sample (x̂_0 clipped by DDIMScheduler,
    DDPMScheduler and HeunDiscreteScheduler; None where the config has no such key: each class then takes its own
    default); final_sigmas_type ("zero":
    the last noise level is σ = 0; "sigma_min": σ of training step 0, where the run ends without a last
    denoising), lower_order_final, euler_at_final, solver_order (1, 2 or 3), algorithm_type ("dpmsolver++" or
    "sde-dpmsolver++"), solver_type ("midpoint" or "heun"): DPMSolverMultistepScheduler's; use_karras_sigmas:
    the Karras grid for dpm_solver++, euler and heun; clip_sample_range (x̂_0 clipped to ±range with
    clip_sample), thresholding, dynamic_thresholding_ratio, sample_max_value (Imagen's dynamic thresholding of
    x̂_0, see `jaxdiff.diffusion.limits`); skip_prk_steps: PNDMScheduler's (True: PLMS from the first step). With
    rescale_betas_zero_snr, `schedule` is rescaled to zero terminal
    SNR (ᾱ_{T-1} = 0, as DDIMScheduler and DDPMScheduler) and `unrescaled_betas` are the float64 betas before
    the rescale (None without it), from which `class_schedule` gives each class's schedule.
    """

    schedule: Schedule
    mean_type: str
    timestep_spacing: str
    steps_offset: int
    set_alpha_to_one: bool
    config: dict
    clip_sample: bool | None = False
    final_sigmas_type: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    use_karras_sigmas: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    unrescaled_betas: np.ndarray | None = None
    skip_prk_steps: bool = False


def class_schedule(unrescaled_betas: np.ndarray, zero_snr_last: float | None) -> Schedule:
    """The schedule a diffusers scheduler class builds with rescale_betas_zero_snr from the float64 betas
    [T]: rescaled to zero terminal SNR with ᾱ_{T-1} = `zero_snr_last` (0, or FINITE_ZERO_SNR_LAST where the class
    keeps σ finite); None: a class without the key, which `from_config` drops: the betas as they are."""
    if zero_snr_last is None:
        return schedule_from_betas(unrescaled_betas)
    rescaled = rescale_zero_terminal_snr(unrescaled_betas)
    return schedule_from_betas(with_last_alpha_bar(rescaled, zero_snr_last) if zero_snr_last > 0 else rescaled)


def _refuse(source: str, key: str, value: Any, need: str) -> WeightsError:
    """A bad scheduler config is a bad weights folder."""
    return WeightsError(f"{source}: unsupported setting {key}={value!r} ({need})")


def _check_keys(config: dict, source: str, schedule: Schedule) -> None:
    """Refuse unknown keys and values of the accepted-without-effect keys that would change the steps."""
    unknown = [f"{key}={config[key]!r}" for key in sorted(set(config) - KNOWN_KEYS)]
    if unknown:
        raise WeightsError(f"{source}: unknown scheduler setting(s) {', '.join(unknown)}; jaxdiff cannot honour them")
    for key, allowed in NO_EFFECT_VALUES.items():
        if key in config and not any(config[key] == value and type(config[key]) is type(value) for value in allowed):
            raise _refuse(source, key, config[key], f"only {ACCEPTED_WITHOUT_EFFECT[key]} is supported")
    alphas_cumprod = np.asarray(schedule.alphas_cumprod, np.float64)  # no ᾱ = 0: `class_schedule`'s finite view
    least_lambda = 0.5 * float(np.min(np.log(alphas_cumprod / (1.0 - alphas_cumprod))))
    clipped = config.get("lambda_min_clipped", -math.inf)
    if not is_real(clipped) or clipped > least_lambda:
        raise _refuse(source, "lambda_min_clipped", clipped, f"clipping λ is not implemented; need <= {least_lambda:.4f}")


def _dpm_settings(config: dict, source: str) -> dict:
    """DPMSolverMultistepScheduler's settings of `config`, checked, aliases resolved."""
    settings = {key: config.get(key, default) for key, default in DPM_DEFAULTS.items()}
    for key in ("lower_order_final", "euler_at_final", "use_karras_sigmas"):
        if not isinstance(settings[key], bool):
            raise _refuse(source, key, settings[key], "true or false")
    for key, table in DPM_VALUES.items():
        value = settings[key]
        if isinstance(value, bool) or value not in table:
            raise _refuse(source, key, value, DPM_REFUSED_WHY.get(key, f"supported: {', '.join(map(str, table))}"))
        settings[key] = table[value]
    return settings


def _limit_settings(config: dict, source: str) -> dict:
    """The x̂_0 limit settings of `config` (LIMIT_DEFAULTS), checked where they can act."""
    settings = {key: config.get(key, default) for key, default in LIMIT_DEFAULTS.items()}
    if not isinstance(settings["thresholding"], bool):
        raise _refuse(source, "thresholding", settings["thresholding"], "true or false")
    rules = {"clip_sample_range": (config.get("clip_sample") is not False, lambda v: v > 0, "a finite number > 0"),
             "sample_max_value": (settings["thresholding"], lambda v: v > 0, "a finite number > 0"),
             "dynamic_thresholding_ratio": (settings["thresholding"], lambda v: 0 <= v <= 1, "a number in [0, 1]")}
    for key, (acts, allowed, need) in rules.items():
        value = settings[key]
        if acts and not (is_real(value, finite=True) and allowed(value)):
            raise _refuse(source, key, value, need)
        if is_real(value, finite=True):
            settings[key] = float(value)
    return settings


def scheduler_settings(config: dict, source: str) -> SchedulerSettings:
    """`SchedulerSettings` of a diffusers scheduler config dict; every key is implemented, accepted without
    effect (`ACCEPTED_WITHOUT_EFFECT`) or refused: unknown keys and unsupported values raise
    `jaxdiff.errors.WeightsError` (a ValueError) naming them."""
    run_config = ml_collections.ConfigDict({"diffusion": {}, "sampling": {}})
    implemented = {"clip_sample": False, "thresholding": False, "rescale_betas_zero_snr": False,
                   "_class_name": "DDIMScheduler"}  # checked below  # fmt: skip
    checked = {key: value for key, value in config.items() if key not in NO_EFFECT_VALUES}  # checked below
    try:
        apply_scheduler_config(run_config, {**checked, **implemented}, source)
    except ValueError as err:
        raise WeightsError(str(err)) from None
    zero_snr = config.get("rescale_betas_zero_snr", False)
    if not isinstance(zero_snr, bool):
        raise _refuse(source, "rescale_betas_zero_snr", zero_snr, "true or false")
    betas = betas_from_config(run_config.diffusion)
    _check_keys(config, source, class_schedule(betas, FINITE_ZERO_SNR_LAST if zero_snr else None))
    s = {key: config.get(key, default) for key, default in SAMPLING_DEFAULTS.items()}
    if s["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise _refuse(source, "timestep_spacing", s["timestep_spacing"], f"supported: {', '.join(TIMESTEP_SPACINGS)}")
    offset = s["steps_offset"]
    if not is_int(offset, numpy=False) or not 0 <= offset < run_config.diffusion.num_timesteps:
        raise _refuse(source, "steps_offset", offset, "an int in 0..num_train_timesteps-1")
    for key in ("set_alpha_to_one", "clip_sample", "skip_prk_steps"):
        if key in config and not isinstance(config[key], bool):
            raise _refuse(source, key, config[key], "true or false")
    return SchedulerSettings(class_schedule(betas, 0.0 if zero_snr else None), run_config.diffusion.mean_type,
                             s["timestep_spacing"], offset, s["set_alpha_to_one"], dict(config),
                             config.get("clip_sample"), **_dpm_settings(config, source),
                             **_limit_settings(config, source),
                             unrescaled_betas=betas if zero_snr else None,
                             skip_prk_steps=config.get("skip_prk_steps", PNDM_DEFAULTS["skip_prk_steps"]))  # fmt: skip
