"""Flow matching on the interpolants of `jaxdiff.processes` (`flow`, `gvp`): what a network predicts, the model
seen as D(x; σ) and as a velocity field, guidance in a t interval, and the training-time distributions and shifts.

A flow process is x_t = α(t)·x_0 + σ(t)·ε on t in [0, 1] (0: data, 1: noise). A network predicts one of
  velocity  u = dx_t/dt = α'(t)·x_0 + σ'(t)·ε  (the flow's own target; for `flow`, u = ε − x_0)
  x0        x_0
  eps       ε
  v         v = α·ε − σ·x_0  (Salimans & Ho 2022)
At fixed (x_t, t) each is affine in any other: (x̂_0, ε̂) solves α·x_0 + σ·ε = x_t together with the prediction,
general in α, σ, α', σ' (`to_x0_eps`), with the determinant ασ' − σα' (1 for flow, π/2 for gvp) for velocity
and α² + σ² for v. Velocity and v are regular on all of [0, 1]; x0 gives ε̂ = (x_t − α·x̂_0)/σ, singular at
t = 0, and eps gives x̂_0 = (x_t − σ·ε̂)/α, singular at t = 1: such models are evaluated at t clipped to
[t_min, 1] and [0, t_max] of the process (`regular_interval`, SiT's train_eps/sample_eps for its non-velocity
models).

The network's time input is t·time_scale (`config.diffusion.time_scale`): SiT passes its time in [0, 1] (1), SD3
and Flux t·1000 (1000, jaxdiff's default, what the U-Nets' sinusoidal embeddings are built for). SiT's time runs the
other way, τ = 1 − t (τ = 0 noise): `config.diffusion.time_reversed` (`jaxdiff.diffusion.continuous.flow_network`).

`FlowModel` is what the flow family makes of a network: EDM's D(x; σ) (x = x_0 + σ·n, σ float32 [B]) for the
σ-based samplers and the likelihood, and a velocity field u(x_t, t) evaluated in the state itself, t = 1 included,
for the flow samplers. `velocity_field` gives those samplers u(x_t, t) of any denoiser: a FlowModel's own, or one
derived from a plain D(x; σ) — undefined where α = 0 or σ = 0, so evaluated at t clipped to [t_min, t_max].

Training times (`sample_t`): `uniform` on [0, 1); `logit_normal` t = sigmoid(m + s·n), n ~ N(0, 1) (SD3: m = 0,
s = 1); `mode` t = 1 − u − scale·(cos²(πu/2) − 1 + u), u ~ U[0, 1) (SD3's mode sampling, monotone for scale in
[−1, 2/(π − 2)]); then the shift t' = s·t/(1 + (s − 1)·t) (`shift_time`, SD3's constant shift; Flux's
resolution-dependent shift is the same map with s = exp(μ), μ = `resolution_mu(sequence length)`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff.checks import is_real
from jaxdiff.errors import UsageError
from jaxdiff.processes import FlowProcess

Array = jax.Array
OutputFn = Callable[[Array, Array], Array]  # (x_t [B, ...], t float32 [B]) -> the network's prediction [B, ...]

PARAMETERIZATIONS = ("velocity", "x0", "eps", "v")
T_SAMPLINGS = ("uniform", "logit_normal", "mode")
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)  # the mode density is monotone for scale in [-1, 2/(π − 2)]


# --------------------------------------------------------------------------- parameterisations


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """α, σ and their t-derivatives at t, shaped [B, 1, ..., 1] against the state."""

    alpha: Array
    sigma: Array
    d_alpha: Array
    d_sigma: Array

    @property
    def determinant(self) -> Array:
        """ασ' − σα': how x_t and u determine (x_0, ε)."""
        return self.alpha * self.d_sigma - self.sigma * self.d_alpha


def check_flow_process(process, what: str) -> None:
    """A UsageError unless `process` is a flow process (flow, gvp)."""
    if not isinstance(process, FlowProcess):
        raise UsageError(f"{what} needs a flow process ('flow' or 'gvp'), got {type(process).__name__}")


def coefficients(process, t, like: Array) -> Coefficients:
    """The `Coefficients` of flow process `process` at t (scalar or [B]) against the state `like` [B, ...]."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (like.shape[0],))
    shape = (like.shape[0],) + (1,) * (like.ndim - 1)
    values = (process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t))
    return Coefficients(*(jnp.reshape(v, shape) for v in values))


def check_parameterization(parameterization) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise UsageError(f"unknown flow parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def to_x0_eps(parameterization: str, output: Array, x_t: Array, c: Coefficients) -> tuple[Array, Array]:
    """(x̂_0, ε̂) of a prediction `output` of kind `parameterization` at the state x_t."""
    if parameterization == "velocity":
        det = c.determinant
        return (c.d_sigma * x_t - c.sigma * output) / det, (c.alpha * output - c.d_alpha * x_t) / det
    if parameterization == "x0":
        return output, (x_t - c.alpha * output) / c.sigma
    if parameterization == "eps":
        return (x_t - c.sigma * output) / c.alpha, output
    norm = c.alpha**2 + c.sigma**2  # v = α·ε − σ·x_0
    return (c.alpha * x_t - c.sigma * output) / norm, (c.sigma * x_t + c.alpha * output) / norm


def prediction(parameterization: str, x0: Array, eps: Array, c: Coefficients) -> Array:
    """The quantity of kind `parameterization` for (x_0, ε): the target a network of that kind learns."""
    if parameterization == "velocity":
        return c.d_alpha * x0 + c.d_sigma * eps
    if parameterization == "x0":
        return x0
    if parameterization == "eps":
        return eps
    return c.alpha * eps - c.sigma * x0


def regular_interval(parameterization: str, process) -> tuple[float, float]:
    """The t interval where a model of `parameterization` gives finite (x̂_0, ε̂): [0, 1] for velocity and v,
    [t_min, 1] for x0, [0, t_max] for eps."""
    low = process.t_min if parameterization == "x0" else 0.0
    high = process.t_max if parameterization == "eps" else 1.0
    return low, high


# --------------------------------------------------------------------------- the model as D and as a velocity


@dataclasses.dataclass(frozen=True, eq=False)
class FlowModel:
    """A network on a flow process: `output_fn(x_t, t) -> prediction` of kind `parameterization` (t float32 [B],
    the time scale already applied inside), with every x̂_0 clipped to `clip` = (low, high) when given (the
    velocity then combines the clipped x̂_0 with the model's ε̂, as DDIM's clipping does).

    Called as D(x; σ): t = t(σ), x_t = α·x, x̂_0 of the prediction there (σ > 0 finite: 0 < t < 1).
    `velocity(x_t, t)`: u at the state, for t in [0, 1], the network evaluated at t clipped to `regular_interval`.
    """

    output_fn: OutputFn
    process: FlowProcess
    parameterization: str = "velocity"
    clip: tuple[float, float] | None = None

    def __post_init__(self):
        check_flow_process(self.process, "FlowModel")
        check_parameterization(self.parameterization)

    def __call__(self, x: Array, sigma: Array) -> Array:
        t = self.process.t_from_noise_level(sigma)
        x_t = x * jnp.reshape(self.process.alpha_from_noise_level(sigma), sigma.shape + (1,) * (x.ndim - 1))
        x0, _ = self.predict(x_t, t)
        return x0

    def predict(self, x_t: Array, t: Array) -> tuple[Array, Array]:
        """(x̂_0, ε̂) at the state x_t [B, ...] and t [B] (no clipping of t)."""
        output = jnp.asarray(self.output_fn(x_t, t), jnp.float32)
        x0, eps = to_x0_eps(self.parameterization, output, x_t, coefficients(self.process, t, x_t))
        return (x0 if self.clip is None else jnp.clip(x0, *self.clip)), eps

    def velocity(self, x_t: Array, t: Array) -> Array:
        """u(x_t, t) for t [B] in [0, 1] (the network at t clipped to `regular_interval`)."""
        t = jnp.clip(t, *regular_interval(self.parameterization, self.process))
        if self.parameterization == "velocity" and self.clip is None:
            return jnp.asarray(self.output_fn(x_t, t), jnp.float32)
        x0, eps = self.predict(x_t, t)
        return prediction("velocity", x0, eps, coefficients(self.process, t, x_t))

    def wrapped(self, wrap: Callable[[OutputFn], OutputFn]) -> FlowModel:
        """The same model with `wrap(output_fn)` as its network (e.g. to report each evaluation)."""
        return dataclasses.replace(self, output_fn=wrap(self.output_fn))

    def clipped(self, low: float, high: float) -> FlowModel:
        """The same model with every x̂_0 clipped to [low, high]."""
        return dataclasses.replace(self, clip=(low, high))


def clipped_denoiser(denoiser, low: float, high: float):
    """The denoiser with every x̂_0 clipped to [low, high]: a `FlowModel` stays one (`FlowModel.clipped`), a plain
    D(x; σ) is wrapped."""
    if isinstance(denoiser, FlowModel):
        return denoiser.clipped(low, high)
    return functools.partial(_clipped, denoiser, low, high)


def _clipped(denoiser, low: float, high: float, x: Array, sigma: Array) -> Array:
    return jnp.clip(denoiser(x, sigma), low, high)


def velocity_field(denoiser, process) -> OutputFn:
    """u(x_t, t) (x_t [B, ...], t float32 [B] in [0, 1]) on flow process `process`: a `FlowModel`'s own velocity,
    or that of a plain D(x; σ), u = α'·x̂_0 + σ'·(x_t − α·x̂_0)/σ with x̂_0 = D(x_t/α; σ/α), at t clipped to
    [t_min, t_max]."""
    check_flow_process(process, "a flow sampler")
    if isinstance(denoiser, FlowModel):
        if type(denoiser.process) is not type(process):
            raise UsageError(f"a FlowModel of {type(denoiser.process).__name__} cannot sample "
                             f"{type(process).__name__}")  # fmt: skip
        return denoiser.velocity

    def velocity(x_t: Array, t: Array) -> Array:
        t = jnp.clip(t, process.t_min, process.t_max)
        c = coefficients(process, t, x_t)
        x0 = jnp.asarray(denoiser(x_t / c.alpha, process.noise_level(t)), jnp.float32)
        return prediction("velocity", x0, (x_t - c.alpha * x0) / c.sigma, c)

    return velocity


def guidance_interval(guided: OutputFn, plain: OutputFn, t_low: float, t_high: float) -> OutputFn:
    """`guided(x_t, t)` for the examples with t_low <= t <= t_high, `plain(x_t, t)` for the others: classifier-free
    guidance applied in a t interval only (Kynkäänniemi et al. 2024). Batches wholly inside or outside evaluate one
    of the two (the samplers' batches share one t)."""

    def output(x_t: Array, t: Array) -> Array:
        inside = (t >= t_low) & (t <= t_high)

        def mixed():
            mask = jnp.reshape(inside, inside.shape + (1,) * (x_t.ndim - 1))
            return jnp.where(mask, guided(x_t, t), plain(x_t, t))

        branch = jnp.where(jnp.all(inside), 2, jnp.where(jnp.any(inside), 1, 0))
        return jax.lax.switch(branch, [lambda: plain(x_t, t), mixed, lambda: guided(x_t, t)])

    return output


# --------------------------------------------------------------------------- training times and shifts


def shift_time(t, shift: float):
    """SD3's shift t' = shift·t/(1 + (shift − 1)·t) of t in [0, 1] (NumPy or jnp arrays; 1: no shift). Flux's
    exponential shift exp(μ)/(exp(μ) + 1/t − 1) is this map with shift = exp(μ)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_mu(seq_len, *, base_seq_len: float = 256, max_seq_len: float = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15):  # fmt: skip
    """Flux's μ of an image of `seq_len` tokens: linear from base_shift at base_seq_len to max_shift at max_seq_len
    (extrapolated beyond); its shift is exp(μ) (`shift_time`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def check_time_sampling(t_sampling, *, logit_std, mode_scale, shift) -> None:
    """UsageError in one line for an unknown distribution, logit_std <= 0, mode_scale outside [−1, 2/(π − 2)]
    or shift <= 0."""
    if t_sampling not in T_SAMPLINGS:
        raise UsageError(f"unknown t sampling {t_sampling!r}; expected one of {T_SAMPLINGS}")
    if t_sampling == "logit_normal" and not (is_real(logit_std, finite=True) and logit_std > 0):
        raise UsageError(f"logit_std={logit_std!r} must be a number > 0")
    if t_sampling == "mode" and not (is_real(mode_scale, finite=True) and -1 <= mode_scale <= MODE_SCALE_MAX):
        raise UsageError(f"mode_scale={mode_scale!r} must be a number in [-1, {MODE_SCALE_MAX:.4f}] (2/(π − 2))")
    if not (is_real(shift, finite=True) and shift > 0):
        raise UsageError(f"shift={shift!r} must be a number > 0")


def sample_t(rng: Array, n: int, *, t_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
             mode_scale: float = 1.29, shift: float = 1.0) -> Array:  # fmt: skip
    """n training times float32 [n] in [0, 1] drawn from `t_sampling` (module docstring), then shifted."""
    check_time_sampling(t_sampling, logit_std=logit_std, mode_scale=mode_scale, shift=shift)
    if t_sampling == "logit_normal":
        t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (n,), jnp.float32))
    else:
        t = jax.random.uniform(rng, (n,), jnp.float32)
        if t_sampling == "mode":
            t = 1.0 - t - mode_scale * (jnp.cos(0.5 * jnp.pi * t) ** 2 - 1.0 + t)
    return shift_time(t, shift)
