"""Every sampler's registry entry (`jaxdiff.samplers.registry`), in the order the generated lists follow, with
the options dataclasses and the small runs that fit an algorithm module to a family.

`jaxdiff.samplers` imports this module before anything that reads the registry, so every entry is registered
whenever `jaxdiff.samplers` (or any module in it) has been imported. A new sampler: its module, and one
`register(SamplerSpec(...))` here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff.checks import Spec
from jaxdiff.diffusion.scheduler_config import FINITE_ZERO_SNR_LAST
from jaxdiff.errors import UsageError
from jaxdiff.samplers.ddim_dpm import ddim_sample, ddim_steps, dpm_solver_pp_sample, dpm_solver_pp_steps
from jaxdiff.samplers.deis import deis_steps
from jaxdiff.samplers.edm import edm_sample, heun_steps
from jaxdiff.samplers.euler_ancestral import euler_ancestral_steps
from jaxdiff.samplers.flow import DIFFUSION_FORMS, LAST_STEPS, flow_ode_sample, sit_sde_sample, time_ode_sample
from jaxdiff.samplers.lms import lms_coefficients, lms_steps
from jaxdiff.samplers.ode import SOLVERS, TOLERANCE, ode_sample
from jaxdiff.samplers.pc import CORRECTORS, PREDICTORS, pc_sample
from jaxdiff.samplers.registry import FlowSpec, LatentSpec, Options, SamplerSpec, option, register
from jaxdiff.samplers.unipc import unipc_steps

# --------------------------------------------------------------------------- options


_RHO = option(7.0, Spec(float, "ρ of the Karras noise-level grid", low=0, low_open=True), config=False)


@dataclasses.dataclass(frozen=True)
class PCOptions(Options):
    predictor: str = option("reverse_diffusion", Spec(str, "predictor", choices=PREDICTORS), noun="predictor")
    corrector: str = option("langevin", Spec(str, "corrector", choices=CORRECTORS), noun="corrector")
    snr: float = option(0.16, Spec(float, "corrector signal-to-noise ratio", low=0))
    n_corrector: int = option(1, Spec(int, "corrector steps per predictor step", low=0))


@dataclasses.dataclass(frozen=True)
class ODEOptions(Options):
    rtol: float = option(1e-5, dataclasses.replace(TOLERANCE, meaning="relative tolerance"))
    atol: float = option(1e-5, dataclasses.replace(TOLERANCE, meaning="absolute tolerance"))
    solver: str = option("tsit5", Spec(str, "ODE solver", choices=tuple(SOLVERS)), config=False, noun="ODE solver")
    max_steps: int = option(4096, Spec(int, "most solver steps", low=1), config=False)


@dataclasses.dataclass(frozen=True)
class KarrasOptions(Options):
    rho: float = _RHO


@dataclasses.dataclass(frozen=True)
class EDMStochasticOptions(Options):
    rho: float = _RHO
    s_churn: float = option(0.0, Spec(float, "S_churn", low=0))
    s_min: float = option(0.0, Spec(float, "S_min", low=0))
    s_max: float = option(math.inf, Spec(float, "S_max", low=0, infinite=True))
    s_noise: float = option(1.0, Spec(float, "S_noise", low=0))

    def check(self) -> None:
        if self.s_max < self.s_min:
            raise UsageError(f"s_max={self.s_max!r} must be a number >= s_min={self.s_min!r}")


@dataclasses.dataclass(frozen=True)
class DDIMOptions(Options):
    rho: float = _RHO
    eta: float = option(0.0, Spec(float, "DDIM noise scale", low=0, high=1))


# The flow runs' options (`FlowSpec`; `config.sampling` keys through `registry.flow_config_options`).
_SHIFT = option(1.0, Spec(float, "time shift s of the flow grid, t' = s·t/(1 + (s − 1)·t); 1: none", low=0,
                          low_open=True))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FlowGridOptions(Options):
    shift: float = _SHIFT


@dataclasses.dataclass(frozen=True)
class FlowSDEOptions(Options):
    shift: float = _SHIFT
    diffusion_form: str = option("sigma", Spec(str, "SiT's diffusion coefficient w(t)", choices=DIFFUSION_FORMS),
                                 noun="diffusion form")  # fmt: skip
    diffusion_norm: float = option(1.0, Spec(float, "scale of SiT's diffusion coefficient", low=0))
    last_step: str = option("mean", Spec(str, "SiT's last step to t = 0", choices=LAST_STEPS), noun="last step")
    last_step_size: float = option(0.04, Spec(float, "t of SiT's last step (unused with last_step 'none')", low=0,
                                              high=1, low_open=True, high_open=True))  # fmt: skip


# --------------------------------------------------------------------------- the runs


def _dpm_solver_pp_ode(denoiser, x, levels, noise_key=None, *, every=None):
    """DPM-Solver++(2M) on σ grid `levels` (deterministic: noise_key is unused)."""
    del noise_key
    return dpm_solver_pp_steps(denoiser, x, levels, every=every)


def _final_x_t(x, levels) -> Any:
    """The unscaled x at the last level as the scheduler's state x_t = x/sqrt(1 + σ²)."""
    return x / math.sqrt(1.0 + float(levels[-1]) ** 2)


def _latent_dpm_solver(denoiser, levels, x_start, scheduler, rng):
    """DPMSolverMultistepScheduler's run: its last step is first order with euler_at_final, with
    lower_order_final for fewer than 15 steps, or to σ = 0; with lower_order_final for fewer than 15 steps, the
    step before it is at most second order. (The steps counted are those run: after image-to-image cuts a run of 15
    or more to fewer, diffusers, counting the full run, keeps the higher orders.)"""
    steps, final = len(levels) - 1, float(levels[-1])
    short = scheduler.lower_order_final and steps < 15
    first_order_last = scheduler.euler_at_final or short or final == 0.0
    sde = scheduler.algorithm_type == "sde-dpmsolver++"
    x = dpm_solver_pp_steps(denoiser, x_start, jnp.asarray(levels, jnp.float32), order=scheduler.solver_order,
                            solver_type=scheduler.solver_type, first_order_last=first_order_last,
                            second_order_second_last=short, noise_key=rng if sde else None)  # fmt: skip
    return _final_x_t(x, levels)


def _latent_euler(denoiser, levels, x_start, scheduler, rng):
    return heun_steps(denoiser, x_start, jnp.asarray(levels, jnp.float32), second_order=False)


def _latent_heun(denoiser, levels, x_start, scheduler, rng):
    return heun_steps(denoiser, x_start, jnp.asarray(levels, jnp.float32), second_order=True)


def _latent_euler_ancestral(denoiser, levels, x_start, scheduler, rng):
    return euler_ancestral_steps(denoiser, x_start, jnp.asarray(levels, jnp.float32), rng)


def _latent_lms(denoiser, levels, x_start, scheduler, rng):
    """LMSDiscreteScheduler's order 4, its coefficients from the float32 levels diffusers integrates over."""
    coefficients = lms_coefficients(np.asarray(levels, np.float32))
    return lms_steps(denoiser, x_start, jnp.asarray(levels, jnp.float32), coefficients=coefficients)


def _latent_unipc(denoiser, levels, x_start, scheduler, rng):
    """UniPCMultistepScheduler's state is x_t: x/sqrt(1 + σ²) at the last level."""
    return _final_x_t(unipc_steps(denoiser, x_start, jnp.asarray(levels, jnp.float32)), levels)


def _latent_deis(denoiser, levels, x_start, scheduler, rng):
    """DEISMultistepScheduler's state is x_t: x/sqrt(1 + σ²) at the last level."""
    return _final_x_t(deis_steps(denoiser, x_start, jnp.asarray(levels, jnp.float32)), levels)


def _predictor(name: str) -> Callable:
    return functools.partial(pc_sample, predictor=name, corrector="none")


def _flow_ode(method: str, steps: int) -> FlowSpec:
    return FlowSpec(functools.partial(flow_ode_sample, method=method), FlowGridOptions, steps)


# --------------------------------------------------------------------------- the samplers

_DPM = "DPMSolverMultistepScheduler"
_SDE_STEPS = 1000
_LATENT_STEPS = 50  # `jaxdiff.latent.pipeline.DEFAULT_STEPS`

register(SamplerSpec(
    "ddim",
    steps={"discrete": None, "continuous": 50, "latent": _LATENT_STEPS}, options=DDIMOptions,
    continuous=ddim_sample, on_levels=ddim_steps,
    latent=LatentSpec("DDIMScheduler", "leading", default_clip=True, thresholding=True, zero_snr_last=0.0),
))  # fmt: skip
register(SamplerSpec(
    "ddpm", steps={"discrete": None, "latent": _LATENT_STEPS},
    latent=LatentSpec("DDPMScheduler", "leading", default_clip=True, thresholding=True, zero_snr_last=0.0),
))  # fmt: skip
register(SamplerSpec(
    "dpm_solver++", steps={"discrete": 20, "continuous": 20, "latent": _LATENT_STEPS},
    options=KarrasOptions, continuous=dpm_solver_pp_sample, on_levels=_dpm_solver_pp_ode, spacing="karras",
    latent=LatentSpec(_DPM, "linspace", run=_latent_dpm_solver, rounded_steps=True, thresholding=True,
                      zero_snr_last=FINITE_ZERO_SNR_LAST),
))  # fmt: skip
register(SamplerSpec(
    "dpm_solver++_sde", steps={"latent": _LATENT_STEPS},
    latent=LatentSpec(_DPM, "linspace", run=_latent_dpm_solver, rounded_steps=True, thresholding=True,
                      zero_snr_last=FINITE_ZERO_SNR_LAST),
))  # fmt: skip
register(SamplerSpec(
    "euler", steps={"continuous": 100, "latent": _LATENT_STEPS},
    continuous=functools.partial(time_ode_sample, method="euler"),
    latent=LatentSpec("EulerDiscreteScheduler", "linspace", run=_latent_euler, unscaled_state=True,
                      zero_snr_last=FINITE_ZERO_SNR_LAST),
    flow=_flow_ode("euler", 50),
))  # fmt: skip
register(SamplerSpec(
    "heun", steps={"discrete": 18, "continuous": 18, "latent": _LATENT_STEPS},
    options=KarrasOptions, continuous=edm_sample, on_levels=heun_steps, spacing="karras",
    latent=LatentSpec("HeunDiscreteScheduler", "linspace", default_clip=False, run=_latent_heun, unscaled_state=True),
    flow=_flow_ode("heun", 25),
))  # fmt: skip
register(SamplerSpec(
    "euler_ancestral", steps={"latent": _LATENT_STEPS},
    latent=LatentSpec("EulerAncestralDiscreteScheduler", "linspace", run=_latent_euler_ancestral, grid="euler",
                      karras=False, unscaled_state=True, zero_snr_last=FINITE_ZERO_SNR_LAST),
))  # fmt: skip
register(SamplerSpec(
    "lms", steps={"latent": _LATENT_STEPS},
    latent=LatentSpec("LMSDiscreteScheduler", "linspace", run=_latent_lms, grid="euler", unscaled_state=True),
))  # fmt: skip
register(SamplerSpec(
    "unipc", steps={"latent": _LATENT_STEPS},
    latent=LatentSpec("UniPCMultistepScheduler", "linspace", run=_latent_unipc, grid="dpm_solver++",
                      rounded_steps=True, thresholding=True, zero_snr_last=FINITE_ZERO_SNR_LAST),
))  # fmt: skip
register(SamplerSpec(
    "deis", steps={"latent": _LATENT_STEPS},
    latent=LatentSpec("DEISMultistepScheduler", "linspace", run=_latent_deis, grid="dpm_solver++",
                      rounded_steps=True, thresholding=True),
))  # fmt: skip
register(SamplerSpec(
    "pndm", steps={"latent": _LATENT_STEPS},
    latent=LatentSpec("PNDMScheduler", "leading"),  # PLMS on the visited training steps (`jaxdiff.samplers.pndm`)
))  # fmt: skip
for _name in PREDICTORS:
    register(SamplerSpec(
        _name, steps={"continuous": _SDE_STEPS}, continuous=_predictor(_name),
        flow=FlowSpec(sit_sde_sample, FlowSDEOptions, 250) if _name == "euler_maruyama" else None,
    ))  # fmt: skip
register(SamplerSpec(
    "pc", steps={"continuous": _SDE_STEPS}, options=PCOptions, continuous=pc_sample,
))  # fmt: skip
register(SamplerSpec(
    "ode", steps={"continuous": None}, options=ODEOptions, continuous=ode_sample,
))  # fmt: skip
register(SamplerSpec(
    "edm_stochastic", steps={"continuous": 18}, options=EDMStochasticOptions,
    continuous=edm_sample,
))  # fmt: skip
register(SamplerSpec(
    "midpoint", steps={"continuous": 50}, continuous=functools.partial(time_ode_sample, method="midpoint"),
    flow=_flow_ode("midpoint", 25),
))  # fmt: skip
