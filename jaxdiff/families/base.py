"""The `Family` interface: what training, sampling and evaluation ask of a kind of diffusion."""

from __future__ import annotations

import abc
from collections.abc import Callable

import jax
import ml_collections

Array = jax.Array
Denoise = Callable[[Array, Array], Array]


class Family(abc.ABC):
    """One kind of pixel-space diffusion, built from a run config: its loss, its denoiser, its samplers and their
    settings, and which likelihood it has. The rest of jaxdiff asks a family instead of branching on the kind.

    A family is registered under `name` in `jaxdiff.families.FAMILIES` and claims the values of
    `config.diffusion.process` listed in `processes`.
    """

    name: str
    processes: tuple[str, ...]
    likelihood: str  # "vlb": the discrete bits/dim (`evaluation.likelihood`); "ode": the probability-flow ODE's
    draws_trajectories: bool  # whether its samplers can return the intermediate states
    process = None  # the continuous process (`jaxdiff.processes`), for families that have one

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        m = self.config.model
        return (m.image_size, m.image_size, m.in_channels)

    @property
    @abc.abstractmethod
    def samplers(self) -> tuple[str, ...]:
        """The names of the samplers this family supports."""

    @property
    @abc.abstractmethod
    def default_sampler(self) -> str:
        """The sampler a pipeline uses when none is named."""

    @abc.abstractmethod
    def loss_fn(self, model) -> Callable:
        """loss(params, x_start, labels, t_rng, noise_rng, dropout_rng) -> mean loss (float32 scalar) of the
        network `model` on x_start [B, H, W, C] in [-1, 1] with class labels int [B] (the null label where dropped)
        or None; the keys draw the noise level, the noise and the dropout."""

    @abc.abstractmethod
    def denoiser(self, model, params, *, labels=None, guidance: float = 0.0) -> Denoise:
        """`denoise(x, t)` of the trained `model` with `params` (dropout off), guided by `guidance` towards `labels`."""

    @abc.abstractmethod
    def denoise_inputs(self, x, t) -> tuple[Array, Array]:
        """(x, t) of a `denoise` call as arrays, after checking t; a bad t is a `UsageError`."""

    @abc.abstractmethod
    def sampling_settings(self, sampler: str | None, steps: int | None, *, eta: float = 0.0,
                          spacing: str | None = None, **options) -> tuple[str, int | None, dict]:  # fmt: skip
        """(sampler, steps, options) of a sampling call, checked (a `UsageError` before any work); `sampler` None
        is `default_sampler`."""

    @abc.abstractmethod
    def configured_sampling(self) -> dict:
        """The keyword settings of `run_sampler` that `config.sampling` names (training-time grids)."""

    @abc.abstractmethod
    def model_calls(self, sampler: str, steps: int | None, options: dict) -> int | None:
        """Denoiser evaluations of one batch with checked settings (None: adaptive)."""

    @abc.abstractmethod
    def run_sampler(self, denoise: Denoise, shape: tuple[int, ...], rng: Array, *, sampler: str, steps: int | None,
                    eta: float, spacing: str | None, options: dict, return_trajectory: bool = False,
                    noise: Array | None = None):  # fmt: skip
        """Samples float32 `shape` in [-1, 1] drawn with `denoise` (and with `return_trajectory` the
        intermediate states [K, *shape]). `noise` (float32 `shape`), if given, is the N(0, I) draw the initial
        state is made of, instead of one from `rng`."""

    def sampler_fn(self, model, shape: tuple[int, ...], *, guidance: float = 0.0,
                   wrap: Callable[[Denoise], Denoise] | None = None, **settings) -> Callable:  # fmt: skip
        """draw(params, rng, labels, noise=None) -> `run_sampler`'s output with the denoiser of `model`; `wrap`, if
        given, wraps that denoiser (e.g. to report each evaluation); `settings`: those of `run_sampler`."""

        def draw(params, rng, labels, noise=None):
            denoise = self.denoiser(model, params, labels=labels, guidance=guidance)
            return self.run_sampler(wrap(denoise) if wrap else denoise, shape, rng, noise=noise, **settings)

        return draw
