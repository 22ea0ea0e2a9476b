"""Continuous noise processes x_t = α(t)·x_0 + σ(t)·ε, and the discrete DDPM schedule in the same terms.

Every process is a pytree (its parameters are leaves) with jnp methods of t (a scalar or [B]):
  alpha(t), sigma(t)          the marginal's scale and noise standard deviation;
  noise_level(t) = σ/α        the σ of EDM's D(x; σ) for the unscaled x = x_t/α = x_0 + (σ/α)·ε;
  t_from_noise_level(level)   its inverse;
  drift(x, t), diffusion(t)   the forward SDE dx = f(x, t)·dt + g(t)·dw with f = (d log α/dt)·x and
                              g² = α²·d(σ/α)²/dt, the SDE with linear drift that has these marginals;
  prior_sample, prior_logp    the reference distribution N(0, prior_std²·I) at t_max;
and fields t_min, t_max (samplers run from t_max down to t_min; t_min is score_sde's sampling eps). Defaults:
  ve     σ(t) = σ_min·(σ_max/σ_min)^t, α = 1, σ_min 0.01, σ_max 50, t in [1e-5, 1] (Song et al. 2021);
  vp     β(t) = β_min + t·(β_max − β_min), log α = −¼t²(β_max − β_min) − ½t·β_min, σ² = 1 − α²,
         β_min 0.1, β_max 20, t in [1e-3, 1];
  subvp  α as vp, σ = 1 − α² (same defaults);
  edm    α = 1, σ = t, t in [σ_min, σ_max] = [0.002, 80] (Karras et al. 2022);
  flow   the rectified-flow / linear interpolant x_t = (1 − t)·x_0 + t·ε: α = 1 − t, σ = t (Liu et al. 2022,
         SD3, Flux; SiT's "Linear" path with its time reversed: SiT's t = 1 is data, ours is noise);
  gvp    SiT's trigonometric interpolant: α = cos(πt/2), σ = sin(πt/2).
The two flow processes (`FlowProcess`) also give the t-derivatives d_alpha(t), d_sigma(t) of the velocity
u = dx_t/dt = α'(t)·x_0 + σ'(t)·ε, and `alpha_from_noise_level` (α of the level σ/α without passing through t,
which 1 − t would round near t = 1). Their interpolant spans t in [0, 1] and reaches pure noise (α = 0, σ/α = ∞)
at t = 1, where D(x; σ) is undefined: their t_min, t_max (defaults 1e-3 and 1 − 1e-3, any 0 < t_min < t_max < 1)
bound what is done through the noise level — the σ-based samplers (heun's Karras grid, dpm_solver++, ddim, pc,
ode) run from t_max to t_min and the ODE likelihood from t_min to t_max, with the prior N(0, I) at t_max — while
the flow samplers (`jaxdiff.samplers.flow`) integrate the velocity from t = 1 exactly to t = 0.
`from_schedule` expresses a discrete schedule of T steps with t the 0-based step index (0..T-1, any
real in between): α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t), log(σ/α) interpolated linearly between steps.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checks import is_real
from jaxdiff.errors import ConfigError, UsageError

Array = jax.Array

PROCESSES = ("ve", "vp", "subvp", "edm", "flow", "gvp")
FLOW_PROCESSES = ("flow", "gvp")  # the interpolants on t in [0, 1] (`FlowProcess`)
_DEFAULTS = {
    "ve": {"sigma_min": 0.01, "sigma_max": 50.0, "t_min": 1e-5, "t_max": 1.0},
    "vp": {"beta_min": 0.1, "beta_max": 20.0, "t_min": 1e-3, "t_max": 1.0},
    "subvp": {"beta_min": 0.1, "beta_max": 20.0, "t_min": 1e-3, "t_max": 1.0},
    "edm": {"sigma_min": 0.002, "sigma_max": 80.0},
    "flow": {"t_min": 1e-3, "t_max": 1.0 - 1e-3},
    "gvp": {"t_min": 1e-3, "t_max": 1.0 - 1e-3},
}


class _Marginal:
    """What every process derives from alpha, sigma, noise_level and prior_std."""

    def noise_level(self, t) -> Array:
        """σ(t)/α(t): the noise level of x_t/α(t) = x_0 + (σ/α)·ε."""
        return self.sigma(t) / self.alpha(t)

    def drift_coefficient(self, t) -> Array:
        """d log α/dt, so that the drift is f(x, t) = drift_coefficient(t)·x."""
        t = jnp.asarray(t, jnp.float32)
        return jax.jvp(lambda s: jnp.log(self.alpha(s)), (t,), (jnp.ones_like(t),))[1]

    def drift(self, x: Array, t) -> Array:
        """f(x, t) = (d log α/dt)·x for x [B, ...] and t scalar or [B]."""
        return _per_example(self.drift_coefficient(t), x) * x

    def diffusion(self, t) -> Array:
        """g(t) = α·sqrt(d(σ/α)²/dt)."""
        t = jnp.asarray(t, jnp.float32)
        slope = jax.jvp(lambda s: self.noise_level(s) ** 2, (t,), (jnp.ones_like(t),))[1]
        return self.alpha(t) * jnp.sqrt(slope)

    def prior_sample(self, rng: Array, shape) -> Array:
        """x_T ~ N(0, prior_std²·I), float32 of `shape`."""
        return self.prior_std() * jax.random.normal(rng, shape, jnp.float32)

    def prior_logp(self, z: Array) -> Array:
        """log N(z; 0, prior_std²·I) in nats, summed over all but the leading batch axis: [B]."""
        std = self.prior_std()
        dims = math.prod(z.shape[1:])
        squares = jnp.sum(jnp.reshape(z, (z.shape[0], -1)) ** 2, axis=1)
        return -0.5 * dims * jnp.log(2.0 * jnp.pi * std**2) - 0.5 * squares / std**2


@flax.struct.dataclass
class VEProcess(_Marginal):
    """Variance exploding: α = 1, σ(t) = σ_min·(σ_max/σ_min)^t."""

    sigma_min: float
    sigma_max: float
    t_min: float
    t_max: float

    def alpha(self, t) -> Array:
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def sigma(self, t) -> Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** jnp.asarray(t, jnp.float32)

    def t_from_noise_level(self, level) -> Array:
        return jnp.log(level / self.sigma_min) / jnp.log(self.sigma_max / self.sigma_min)

    def prior_std(self):
        return self.sigma_max


@flax.struct.dataclass
class VPProcess(_Marginal):
    """Variance preserving: β(t) linear, log α = −¼t²(β_max − β_min) − ½t·β_min, σ = sqrt(1 − α²)."""

    beta_min: float
    beta_max: float
    t_min: float
    t_max: float

    def log_alpha(self, t) -> Array:
        t = jnp.asarray(t, jnp.float32)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t) -> Array:
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t) -> Array:
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

    def t_from_noise_level(self, level) -> Array:
        return self._t_from_log_alpha(-0.5 * jnp.log1p(jnp.asarray(level, jnp.float32) ** 2))

    def _t_from_log_alpha(self, log_alpha) -> Array:
        """Solves ¼t²·Δβ + ½t·β_min = −log α for t >= 0."""
        delta = self.beta_max - self.beta_min
        rhs = -2.0 * log_alpha  # ½t²·Δβ + t·β_min
        quadratic = (jnp.sqrt(self.beta_min**2 + 2.0 * delta * rhs) - self.beta_min) / jnp.where(delta > 0, delta, 1.0)
        return jnp.where(delta > 0, quadratic, rhs / self.beta_min)

    def prior_std(self):
        return 1.0


@flax.struct.dataclass
class SubVPProcess(VPProcess):
    """Sub-VP: α as VP, σ = 1 − α²."""

    def sigma(self, t) -> Array:
        return -jnp.expm1(2.0 * self.log_alpha(t))

    def t_from_noise_level(self, level) -> Array:
        # (1 − α²)/α = level  =>  α = 2/(level + sqrt(level² + 4)).
        level = jnp.asarray(level, jnp.float32)
        return self._t_from_log_alpha(jnp.log(2.0) - jnp.log(level + jnp.sqrt(level**2 + 4.0)))


@flax.struct.dataclass
class EDMProcess(_Marginal):
    """EDM: α = 1, σ = t on [σ_min, σ_max]."""

    t_min: float
    t_max: float

    def alpha(self, t) -> Array:
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def sigma(self, t) -> Array:
        return jnp.asarray(t, jnp.float32)

    def t_from_noise_level(self, level) -> Array:
        return jnp.asarray(level, jnp.float32)

    def prior_std(self):
        return self.t_max


@flax.struct.dataclass
class FlowProcess(_Marginal):
    """The linear interpolant x_t = (1 − t)·x_0 + t·ε: α = 1 − t, σ = t; t in [0, 1], t_min/t_max bound the
    σ-based uses (module docstring)."""

    t_min: float
    t_max: float

    def alpha(self, t) -> Array:
        return 1.0 - jnp.asarray(t, jnp.float32)

    def sigma(self, t) -> Array:
        return jnp.asarray(t, jnp.float32)

    def d_alpha(self, t) -> Array:
        """dα/dt."""
        return -jnp.ones_like(jnp.asarray(t, jnp.float32))

    def d_sigma(self, t) -> Array:
        """dσ/dt."""
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def t_from_noise_level(self, level) -> Array:
        """t = level/(1 + level), written to give 0 at level 0 and 1 at level ∞."""
        return 1.0 / (1.0 + 1.0 / jnp.asarray(level, jnp.float32))

    def alpha_from_noise_level(self, level) -> Array:
        """α at noise level σ/α = level: 1/(1 + level)."""
        return 1.0 / (1.0 + jnp.asarray(level, jnp.float32))

    def prior_std(self):
        return 1.0


@flax.struct.dataclass
class GVPProcess(FlowProcess):
    """SiT's generalised variance-preserving interpolant: α = cos(πt/2), σ = sin(πt/2)."""

    def alpha(self, t) -> Array:
        """cos(πt/2), computed as sin(π(1 − t)/2): exactly 0 at t = 1, where float32 cos(π/2) is −4e-8."""
        return jnp.sin(0.5 * jnp.pi * (1.0 - jnp.asarray(t, jnp.float32)))

    def sigma(self, t) -> Array:
        return jnp.sin(0.5 * jnp.pi * jnp.asarray(t, jnp.float32))

    def d_alpha(self, t) -> Array:
        return -0.5 * jnp.pi * self.sigma(t)

    def d_sigma(self, t) -> Array:
        return 0.5 * jnp.pi * self.alpha(t)

    def t_from_noise_level(self, level) -> Array:
        """t = (2/π)·arctan(level)."""
        return jnp.arctan(jnp.asarray(level, jnp.float32)) / (0.5 * jnp.pi)

    def alpha_from_noise_level(self, level) -> Array:
        """α at noise level tan(πt/2) = level: 1/sqrt(1 + level²)."""
        return jax.lax.rsqrt(1.0 + jnp.asarray(level, jnp.float32) ** 2)


@flax.struct.dataclass
class DiscreteProcess(_Marginal):
    """A discrete schedule: t is the 0-based step (0..T-1); log(σ/α) is linear between steps."""

    log_noise_levels: Array  # [T] float32, log sqrt((1 − ᾱ_t)/ᾱ_t), strictly increasing
    t_min: float
    t_max: float

    def _log_level(self, t) -> Array:
        steps = jnp.arange(self.log_noise_levels.shape[0], dtype=jnp.float32)
        return jnp.interp(jnp.asarray(t, jnp.float32), steps, self.log_noise_levels)

    def alpha(self, t) -> Array:
        return jnp.exp(-0.5 * jax.nn.softplus(2.0 * self._log_level(t)))

    def sigma(self, t) -> Array:
        return jnp.exp(self._log_level(t)) * self.alpha(t)

    def noise_level(self, t) -> Array:
        return jnp.exp(self._log_level(t))

    def t_from_noise_level(self, level) -> Array:
        steps = jnp.arange(self.log_noise_levels.shape[0], dtype=jnp.float32)
        return jnp.interp(jnp.log(jnp.asarray(level, jnp.float32)), self.log_noise_levels, steps)

    def prior_std(self):
        return 1.0


def make_process(name: str, **params):
    """The process `name` (ve, vp, subvp, edm, flow, gvp) with the papers' defaults overridden by `params`.

    ve: sigma_min, sigma_max, t_min, t_max; vp/subvp: beta_min, beta_max, t_min, t_max;
    edm: sigma_min, sigma_max (t = σ, so t_min = sigma_min, t_max = sigma_max);
    flow/gvp: t_min, t_max with 0 < t_min < t_max < 1 (the range of the σ-based samplers and likelihood).
    """
    if name not in PROCESSES:
        raise ConfigError(f"unknown process {name!r}; expected one of {PROCESSES}")
    unknown = sorted(set(params) - set(_DEFAULTS[name]))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for process {name!r}; allowed: {sorted(_DEFAULTS[name])}")
    values = {**_DEFAULTS[name], **params}
    for key, value in values.items():
        if not is_real(value):
            raise ConfigError(f"{key}={value!r} must be a real number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be finite")
    values = {key: float(value) for key, value in values.items()}
    _require(values, "sigma_min", lambda v: 0 < v["sigma_min"] < v["sigma_max"], "0 < sigma_min < sigma_max")
    _require(values, "beta_min", lambda v: v["beta_min"] >= 0 and v["beta_max"] >= 0, "betas >= 0")
    _require(values, "beta_min", lambda v: 0 < v["beta_max"] >= v["beta_min"], "0 < beta_max >= beta_min")
    _require(values, "t_min", lambda v: 0 < v["t_min"] < v["t_max"], "0 < t_min < t_max")
    if name in FLOW_PROCESSES:
        _require(values, "t_max", lambda v: v["t_max"] < 1, "t_max < 1 (σ/α is infinite at t = 1)")
        return (FlowProcess if name == "flow" else GVPProcess)(**values)
    if name == "ve":
        return VEProcess(**values)
    if name == "edm":
        return EDMProcess(t_min=values["sigma_min"], t_max=values["sigma_max"])
    return (VPProcess if name == "vp" else SubVPProcess)(**values)


def _require(values: dict, key: str, holds, rule: str) -> None:
    """Raises naming `rule` and the values it reads unless `key` is absent or holds(values)."""
    if key in values and not holds(values):
        names = [name for name in values if name.split("_")[0] == key.split("_")[0]]
        raise ConfigError(f"need {rule}, got " + ", ".join(f"{name}={values[name]}" for name in names))


def from_schedule(schedule) -> DiscreteProcess:
    """The discrete schedule as a process in step units: α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t), t in [0, T-1].

    Needs a concrete schedule with 0 < ᾱ_t < 1 strictly decreasing (every β in (0, 1)).
    """
    try:
        betas = np.asarray(schedule.betas, np.float64)
    except jax.errors.TracerArrayConversionError:
        raise UsageError("from_schedule needs a concrete schedule (build it outside jit)") from None
    if not np.all((betas > 0) & (betas < 1)):
        raise UsageError(f"from_schedule needs every beta in (0, 1), got {betas.min()}..{betas.max()}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    log_levels = 0.5 * (np.log1p(-alphas_cumprod) - np.log(alphas_cumprod))
    return DiscreteProcess(
        log_noise_levels=jnp.asarray(log_levels, jnp.float32), t_min=0.0, t_max=float(betas.size - 1)
    )


def _per_example(values: Array, x: Array) -> Array:
    """A scalar or [B] value shaped to broadcast against x [B, ...]."""
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim)) if values.ndim else values
