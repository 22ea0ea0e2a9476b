"""diffusers' `FlowMatchEulerDiscreteScheduler` as SD3 / SD3.5 and Flux.1 folders configure it: its
`scheduler_config.json` read into `FlowMatchSettings` (every key honoured or refused in one line), and the noise
levels a pipeline run steps through.

The state is x = (1 − σ)·x_0 + σ·ε (σ = 1 pure noise, σ = 0 data; σ is the flow time t). `run_sigmas` is
`set_timesteps`:
  base  the default grid linspace(σ_max, σ_min, steps) of the levels the constructor builds from
        linspace(1, N, N)/N (N = num_train_timesteps; shifted by `shift` unless use_dynamic_shifting) — SD3's
        pipeline — or the pipeline's own `sigmas` (Flux's linspace(1, 1/steps, steps), taken as float32 first);
  shift with use_dynamic_shifting the time shift at μ = `resolution_mu(image_seq_len)` of the config's
        base/max shift and sequence lengths: exponential exp(μ)/(exp(μ) + 1/σ − 1), linear μ/(μ + 1/σ − 1) (both
        `jaxdiff.diffusion.flow.shift_time` with shift exp(μ) or μ); else σ' = s·σ/(1 + (s − 1)·σ) with s = `shift`;
  shift_terminal (when set) stretches the levels so that the last is shift_terminal: 1 − (1 − σ)·(1 − T)/(1 − σ_last);
then float32 with a final 0 appended. The network's timestep is σ·N (float32). Each Euler step is
x' = x + (σ_next − σ)·v for the velocity v the network predicts. Image-to-image and inpainting with strength s run the
levels from index int(steps − steps·s) on (`strength_start`: about steps·s steps, at least one), starting from
`scale_noise`: σ·ε + (1 − σ)·x_0 at the first level run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from jaxdiff.checks import is_int, is_real
from jaxdiff.diffusion.flow import resolution_mu, shift_time
from jaxdiff.errors import WeightsError

CLASS_NAME = "FlowMatchEulerDiscreteScheduler"
# The constructor's keys with their defaults (diffusers 0.42.1).
DEFAULTS = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False,
)  # fmt: skip
# Settings jaxdiff does not implement: key -> (the value it takes, why others are refused).
REFUSED = {
    "invert_sigmas": (False, "inverted levels run the model's time the other way"),
    "use_karras_sigmas": (False, "the Karras grid is not implemented for flow matching"),
    "use_exponential_sigmas": (False, "the exponential grid is not implemented for flow matching"),
    "use_beta_sigmas": (False, "the beta grid is not implemented for flow matching"),
    "stochastic_sampling": (False, "the stochastic flow-match step is not implemented"),
}
TIME_SHIFT_TYPES = ("exponential", "linear")
METADATA_KEYS = ("_class_name", "_diffusers_version")


class FlowMatchSettings(NamedTuple):
    """The honoured keys of a FlowMatchEulerDiscreteScheduler config (module docstring)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"


def flow_match_settings(config: dict, source: str) -> FlowMatchSettings:
    """The `FlowMatchSettings` of a scheduler_config.json dict; one WeightsError line naming `source`, the key and
    the value for another class, an unknown key or a value jaxdiff does not implement."""
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise WeightsError(f"{source}: _class_name={config['_class_name']!r}; SD3 and Flux folders step with "
                           f"{CLASS_NAME}")  # fmt: skip
    for key in config:
        if key not in DEFAULTS and key not in METADATA_KEYS:
            raise WeightsError(f"{source}: unknown key {key}={config[key]!r} for {CLASS_NAME}; jaxdiff cannot "
                               "honour it")  # fmt: skip
    c = {**DEFAULTS, **{k: v for k, v in config.items() if k not in METADATA_KEYS}}
    for key, (allowed, why) in REFUSED.items():
        if c[key] != allowed:
            raise WeightsError(f"{source}: unsupported setting {key}={c[key]!r} ({why}; only {allowed})")
    if not is_int(c["num_train_timesteps"], numpy=False) or c["num_train_timesteps"] < 1:
        raise WeightsError(f"{source}: num_train_timesteps={c['num_train_timesteps']!r} must be an int >= 1")
    if not is_real(c["shift"], finite=True) or c["shift"] <= 0:
        raise WeightsError(f"{source}: shift={c['shift']!r} must be a number > 0")
    if not isinstance(c["use_dynamic_shifting"], bool):
        raise WeightsError(f"{source}: use_dynamic_shifting={c['use_dynamic_shifting']!r} must be true or false")
    if c["time_shift_type"] not in TIME_SHIFT_TYPES:
        raise WeightsError(f"{source}: time_shift_type={c['time_shift_type']!r} must be one of {TIME_SHIFT_TYPES}")
    for key in ("base_shift", "max_shift"):
        if not (c[key] is None and not c["use_dynamic_shifting"]) and not is_real(c[key], finite=True):
            raise WeightsError(f"{source}: {key}={c[key]!r} must be a number (use_dynamic_shifting needs it)")
    lengths = (c["base_image_seq_len"], c["max_image_seq_len"])
    if not all(is_int(n, numpy=False) and n > 0 for n in lengths) or lengths[0] == lengths[1]:
        raise WeightsError(f"{source}: base_image_seq_len={lengths[0]!r}, max_image_seq_len={lengths[1]!r} must be "
                           "different ints > 0")  # fmt: skip
    terminal = c["shift_terminal"]
    if terminal is not None and not (is_real(terminal, finite=True) and 0 <= terminal < 1):
        raise WeightsError(f"{source}: shift_terminal={terminal!r} must be null or a number in [0, 1)")
    return FlowMatchSettings(**{key: c[key] for key in FlowMatchSettings._fields})


def training_extremes(s: FlowMatchSettings) -> tuple[float, float]:
    """(σ_max, σ_min) of the constructor's levels linspace(1, N, N)/N, shifted by `shift` unless
    use_dynamic_shifting, in float32 as diffusers computes them."""
    n = s.num_train_timesteps
    levels = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    if not s.use_dynamic_shifting:
        levels = shift_time(levels, np.float32(s.shift)).astype(np.float32)
    return float(levels[0]), float(levels[-1])


def run_sigmas(s: FlowMatchSettings, steps: int, *, image_seq_len: int, sigmas=None) -> np.ndarray:
    """float32 [steps + 1]: the levels a run of `steps` visits, then 0 (module docstring); `image_seq_len` is the
    latent's token count (μ for use_dynamic_shifting); `sigmas` the pipeline's own base levels (Flux), or None
    for the scheduler's default grid (SD3)."""
    if sigmas is None:
        sigma_max, sigma_min = training_extremes(s)
        n = s.num_train_timesteps
        base = np.linspace(sigma_max * n, sigma_min * n, steps) / n
    else:
        base = np.asarray(sigmas).astype(np.float32)
    if s.use_dynamic_shifting:
        mu = resolution_mu(image_seq_len, base_seq_len=s.base_image_seq_len, max_seq_len=s.max_image_seq_len,
                           base_shift=s.base_shift, max_shift=s.max_shift)  # fmt: skip
        levels = shift_time(base, math.exp(mu) if s.time_shift_type == "exponential" else mu)
    else:
        levels = shift_time(base, s.shift)
    if s.shift_terminal:
        levels = 1.0 - (1.0 - levels) * (1.0 - s.shift_terminal) / (1.0 - levels[-1])
    return np.append(np.asarray(levels, np.float32), np.float32(0.0))


def network_timesteps(s: FlowMatchSettings, sigmas: np.ndarray) -> np.ndarray:
    """float32: the timesteps σ·N diffusers passes for the levels `sigmas` (float32)."""
    return (np.asarray(sigmas, np.float32) * np.float32(s.num_train_timesteps)).astype(np.float32)


def strength_start(steps: int, strength: float) -> int:
    """The index of the first of `steps` levels image-to-image runs at `strength` in (0, 1]: diffusers'
    get_timesteps, int(steps − steps·strength), so at least the last step runs (about steps·strength, rounded up)."""
    return int(max(steps - min(steps * strength, steps), 0))
