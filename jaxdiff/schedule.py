"""Noise schedules: beta sequences and the derived lookup tables.

Every table is computed in float64 NumPy and stored as a float32 array of
length T in a `Schedule` pytree, so a schedule can be passed through `jax.jit`
like any other argument. Index i of every table belongs to the 0-based step
t = i (t = 0 is the first, least noisy step; t = T-1 the last).
"""

from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import numpy as np

from jaxdiff.checks import is_int
from jaxdiff.errors import ConfigError, UsageError

Array = jax.Array


@flax.struct.dataclass
class Schedule:
    """Lookup tables of a diffusion with T steps, each float32 of shape [T].

    `fixedlarge_log_variance` is log([posterior_variance[1], betas[1:]]), the
    log-variance the official DDPM code pairs with the variance `betas`.
    """

    betas: Array
    alphas_cumprod: Array
    alphas_cumprod_prev: Array
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    log_one_minus_alphas_cumprod: Array
    sqrt_recip_alphas_cumprod: Array
    sqrt_recipm1_alphas_cumprod: Array
    posterior_variance: Array
    posterior_log_variance_clipped: Array
    posterior_mean_coef1: Array
    posterior_mean_coef2: Array
    fixedlarge_log_variance: Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of steps (static: it is the tables' length)."""
        return self.betas.shape[0]


def _linear(num_timesteps: int, *, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def _quad(num_timesteps: int, *, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def _const(num_timesteps: int, *, beta_end: float) -> np.ndarray:
    return np.full(num_timesteps, beta_end, dtype=np.float64)


def _jsd(num_timesteps: int) -> np.ndarray:
    """1/T, 1/(T-1), ..., 1: the last step destroys the signal (alphas_cumprod[-1] = 0)."""
    return 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)


def _warmup(fraction: float) -> Callable[..., np.ndarray]:
    def betas(num_timesteps: int, *, beta_start: float, beta_end: float) -> np.ndarray:
        out = np.full(num_timesteps, beta_end, dtype=np.float64)
        warmup_steps = int(num_timesteps * fraction)
        out[:warmup_steps] = np.linspace(beta_start, beta_end, warmup_steps, dtype=np.float64)
        return out

    return betas


def _cosine(num_timesteps: int, *, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM: alphas_cumprod(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2)."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def _sigmoid(num_timesteps: int, *, beta_start: float, beta_end: float) -> np.ndarray:
    """beta_start + (beta_end - beta_start)·sigmoid(u), u evenly spaced in [-6, 6] (diffusers' "sigmoid")."""
    u = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-u))


BETA_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear,
    "quad": _quad,
    "const": _const,
    "jsd": _jsd,
    "warmup10": _warmup(0.1),
    "warmup50": _warmup(0.5),
    "cosine": _cosine,
    "sigmoid": _sigmoid,
}

_DEFAULTS = {"beta_start": 1e-4, "beta_end": 0.02}


def beta_schedule(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
    """float64 betas of shape [T] for a named schedule.

    `linear`, `quad`, `sigmoid` and `warmup*` take `beta_start`/`beta_end` (DDPM defaults
    1e-4, 0.02), `const` takes `beta_end`, `cosine` takes `s` and `max_beta`.
    """
    if name not in BETA_SCHEDULES:
        raise ConfigError(f"unknown beta schedule {name!r}; expected one of {sorted(BETA_SCHEDULES)}")
    if not is_int(num_timesteps) or num_timesteps <= 0:
        raise ConfigError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    make = BETA_SCHEDULES[name]
    if name in ("linear", "quad", "warmup10", "warmup50", "sigmoid"):
        kwargs = {**_DEFAULTS, **kwargs}
    elif name == "const":
        kwargs = {"beta_end": _DEFAULTS["beta_end"], **kwargs}
    try:
        betas = make(int(num_timesteps), **kwargs)
    except TypeError as err:
        raise ConfigError(f"bad arguments {sorted(kwargs)} for beta schedule {name!r}: {err}") from None
    _check_betas(betas, f"beta schedule {name!r} with {kwargs}")
    return betas


def _check_betas(betas: np.ndarray, source: str) -> None:
    bad = np.flatnonzero(~((betas > 0.0) & (betas <= 1.0)))
    if bad.size:
        raise ConfigError(f"{source}: betas must lie in (0, 1]; betas[{bad[0]}] = {float(betas[bad[0]])}")


def schedule_from_betas(betas) -> Schedule:
    """All tables for the given betas ([T], each in (0, 1]), computed in float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ConfigError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    _check_betas(betas, "schedule_from_betas")

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # Index 0 is exactly 0; the log is clipped by repeating index 1 there.
        first = posterior_variance[1] if betas.size > 1 else betas[0]
        posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
        fixedlarge_log_variance = np.log(np.append(first, betas[1:]))
        tables = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            fixedlarge_log_variance=fixedlarge_log_variance,
        )
    return Schedule(**{k: jax.numpy.asarray(v, dtype=np.float32) for k, v in tables.items()})


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Betas [T] rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1), float64: sqrt(ᾱ_t) shifted so
    sqrt(ᾱ_{T-1}) = 0 and scaled so sqrt(ᾱ_0) keeps its value; the last beta becomes 1."""
    root = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphas_cumprod = root**2
    return 1.0 - np.append(alphas_cumprod[0], alphas_cumprod[1:] / alphas_cumprod[:-1])


def with_last_alpha_bar(betas, alpha_bar: float) -> np.ndarray:
    """Betas [T] with the last one set so that ᾱ_{T-1} = `alpha_bar` (in (0, ᾱ_{T-2}]), float64."""
    betas = np.asarray(betas, dtype=np.float64)
    previous = float(np.prod(1.0 - betas[:-1]))
    if not 0.0 < alpha_bar <= previous:
        raise ConfigError(f"the last ᾱ must lie in (0, {previous}] (ᾱ of the step before), got {alpha_bar}")
    return np.append(betas[:-1], 1.0 - alpha_bar / previous)


def make_schedule(name: str, num_timesteps: int, **kwargs) -> Schedule:
    """The `Schedule` of a named beta schedule (see `beta_schedule`)."""
    return schedule_from_betas(beta_schedule(name, num_timesteps, **kwargs))


def respace(schedule: Schedule, timesteps) -> Schedule:
    """The schedule of a sub-sequence of steps (improved DDPM's respacing).

    `timesteps` are increasing 0-based indices into `schedule`; step i of the
    result jumps from timesteps[i-1] to timesteps[i], with
    beta_i = 1 - alphas_cumprod[timesteps[i]] / alphas_cumprod[timesteps[i-1]],
    so q(x_t | x_0) is unchanged at the kept steps. Computed in float64.
    """
    timesteps = np.asarray(timesteps)
    num_timesteps = schedule.num_timesteps
    if timesteps.ndim != 1 or timesteps.size == 0:
        raise ConfigError(f"timesteps must be a non-empty 1-D sequence, got shape {timesteps.shape}")
    if timesteps[0] < 0 or timesteps[-1] >= num_timesteps or np.any(np.diff(timesteps) <= 0):
        raise ConfigError(f"timesteps must be strictly increasing within [0, {num_timesteps}), got {timesteps}")
    alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))
    kept = alphas_cumprod[timesteps]
    return schedule_from_betas(1.0 - kept / np.append(1.0, kept[:-1]))


ADM_SPACING = "adm"  # the spacing name of improved DDPM's respacing (`adm_timesteps`), besides the samplers' own


def adm_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """Improved DDPM's `space_timesteps(T, [steps])` (guided-diffusion's respace.py, with which DiT samples):
    `steps` increasing 0-based steps from 0, the stride (T − 1)/(steps − 1) accumulated in float64 and each
    position rounded half to even (Python's `round`); [0] for one step. int64."""
    if not is_int(steps) or not 1 <= steps <= num_timesteps:
        raise UsageError(f"steps={steps!r} must be an int in [1, T={num_timesteps}]")
    stride = 1.0 if steps == 1 else (num_timesteps - 1) / (steps - 1)
    position, taken = 0.0, []
    for _ in range(steps):
        taken.append(round(position))
        position += stride
    return np.asarray(taken, np.int64)


_SCHEDULE_ARGS = {
    "linear": ("beta_start", "beta_end"),
    "quad": ("beta_start", "beta_end"),
    "warmup10": ("beta_start", "beta_end"),
    "warmup50": ("beta_start", "beta_end"),
    "const": ("beta_end",),
    "jsd": (),
    "cosine": (),
    "sigmoid": ("beta_start", "beta_end"),
}


def betas_from_config(diffusion_config) -> np.ndarray:
    """The float64 betas [T] of a config's `diffusion` section (schedule, num_timesteps, beta_start, beta_end)."""
    name = diffusion_config.schedule
    if name not in _SCHEDULE_ARGS:
        raise ConfigError(f"unknown beta schedule {name!r}; expected one of {sorted(BETA_SCHEDULES)}")
    kwargs = {key: diffusion_config[key] for key in _SCHEDULE_ARGS[name]}
    return beta_schedule(name, diffusion_config.num_timesteps, **kwargs)


def schedule_from_config(diffusion_config) -> Schedule:
    """The schedule of a config's `diffusion` section (`betas_from_config`)."""
    return schedule_from_betas(betas_from_config(diffusion_config))
