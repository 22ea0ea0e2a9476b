"""Samplers: the discrete DDPM family on schedule tables (`sample`) and the continuous-time family
written against EDM's denoiser D(x; σ) on any noise process (`sample_continuous`), whose euler, heun, midpoint
and euler_maruyama run in the interpolant's own time on the flow processes (`samplers.flow`)."""

from jaxdiff.samplers import entries  # noqa: F401  (registers every sampler: first, before the lists are read)
from jaxdiff.samplers.continuous import CONTINUOUS_SAMPLERS, DEFAULT_CONTINUOUS_STEPS, sample_continuous
from jaxdiff.samplers.discrete import (
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    KARRAS_RHO,
    SAMPLERS,
    SPACINGS,
    TRAJECTORY_FRAMES,
    DenoiseFn,
    sample,
    sampling_timesteps,
)

__all__ = [
    "CONTINUOUS_SAMPLERS",
    "DEFAULT_CONTINUOUS_STEPS",
    "DEFAULT_SPACING",
    "DEFAULT_STEPS",
    "KARRAS_RHO",
    "SAMPLERS",
    "SPACINGS",
    "TRAJECTORY_FRAMES",
    "DenoiseFn",
    "sample",
    "sample_continuous",
    "sampling_timesteps",
]
