"""A U-Net and its parameters as the `denoise_fn(x_t, t)` of the discrete samplers, and every model type
as EDM's denoiser D(x; σ) for the continuous ones."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.guidance import guided_denoiser
from jaxdiff.errors import UsageError
from jaxdiff.processes import from_schedule

Array = jax.Array


def model_denoiser(model, params, *, labels=None, guidance: float = 0.0,
                   guidance_channels: int = 0) -> Callable[[Array, Array], Array]:  # fmt: skip
    """`denoise_fn(x_t, t)` evaluating `model` (dropout off) with `params`.

    Unconditional models take no labels and no guidance. Class-conditional
    models take int labels [B] (None: the null label `model.num_classes` for
    all, i.e. unconditional samples) and a classifier-free guidance scale w >= 0 on the first
    `guidance_channels` output channels (0: all; `guided_denoiser`'s `channels`).
    """
    if model.num_classes == 0:
        if labels is not None:
            raise UsageError("class labels were given but the model is unconditional (num_classes=0)")
        if guidance:
            raise UsageError(f"guidance={guidance} needs a class-conditional model; this one has num_classes=0")
        return lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)
    if labels is None:
        if guidance:
            raise UsageError(f"guidance={guidance} needs class labels to guide towards")
        return lambda x_t, t: model.apply({"params": params}, x_t, t, None, train=False)
    if guidance and not getattr(model, "null_label", True):
        raise UsageError(f"guidance={guidance} needs a null label, and this class-conditional model has none "
                         "(null_label=False, e.g. a diffusers model with num_class_embeds = its classes); use guidance 0")
    labels = jnp.asarray(labels)
    try:
        values = np.asarray(labels)
    except jax.errors.TracerArrayConversionError:  # checked by the caller when traced
        values = np.zeros(0, np.int32)
    if values.size and (values.min() < 0 or values.max() >= model.num_classes):
        raise UsageError(f"class labels must lie in [0, {model.num_classes}), got {values.min()}..{values.max()}")

    def apply(p, x_t, t, y):
        return model.apply({"params": p}, x_t, t, y, train=False)

    return guided_denoiser(apply, params, labels, guidance=guidance, null_label=model.num_classes,
                           channels=guidance_channels)  # fmt: skip


# EDM's denoiser D(x; σ) = E[x_0 | x_0 + σ·n = x]: every model type as one, and what processes derive from it.
#
# `denoiser(x, sigma) -> x̂_0` takes the unscaled x = x_0 + σ·n [B, ...] and σ float32 [B]. A process state
# x_t = α·x_0 + σ_t·ε is the unscaled x_t/α at noise level σ_t/α (`process.noise_level(t)`).

Denoiser = Callable[[Array, Array], Array]


def _expand(values: Array, x: Array) -> Array:
    """σ [B] shaped [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return jnp.reshape(values, values.shape + (1,) * (x.ndim - values.ndim))


def _per_example_t(t, x: Array) -> Array:
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))


def denoise_state(denoiser: Denoiser, process, x_t: Array, t) -> Array:
    """x̂_0 for the process state x_t [B, ...] at time t (scalar or [B]): D(x_t/α; σ/α)."""
    t = _per_example_t(t, x_t)
    x = x_t / _expand(process.alpha(t), x_t)
    return jnp.asarray(denoiser(x, process.noise_level(t)), jnp.float32)


def score_from_denoiser(denoiser: Denoiser, process, x_t: Array, t) -> Array:
    """∇ log p_t(x_t) = (α·D(x_t/α; σ/α) − x_t)/σ², for x_t [B, ...] and t scalar or [B]."""
    t = _per_example_t(t, x_t)
    alpha, sigma = _expand(process.alpha(t), x_t), _expand(process.sigma(t), x_t)
    return (alpha * denoise_state(denoiser, process, x_t, t) - x_t) / sigma**2


def probability_flow_drift(denoiser: Denoiser, process, x_t: Array, t) -> Array:
    """dx_t/dt of the probability-flow ODE: f(x_t, t) − ½·g(t)²·∇ log p_t(x_t)."""
    t = _per_example_t(t, x_t)
    g = _expand(process.diffusion(t), x_t)
    return process.drift(x_t, t) - 0.5 * g**2 * score_from_denoiser(denoiser, process, x_t, t)


def discrete_eps_denoiser(eps_fn, schedule, *, interpolate: bool = False) -> Denoiser:
    """D(x; σ) of an ε-model `eps_fn(x_t, t)` of a discrete schedule (our DDPM U-Nets).

    The model sees x_t = x/sqrt(1 + σ²) and returns ε̂; D = x − σ·ε̂ with the σ given. Its step t:
      interpolate=False  the trained step nearest in log σ_t, σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), int32 [B];
      interpolate=True   the fractional step, log σ linear between trained steps, float32 [B]
                         (for models whose time embedding takes real t, e.g. the sinusoidal one).
    """
    step_of = _step_of_noise_level(schedule, interpolate)

    def denoiser(x: Array, sigma: Array) -> Array:
        s = _expand(sigma, x)
        return x - s * eps_fn(x / jnp.sqrt(1.0 + s**2), step_of(sigma))

    return denoiser


def discrete_x0_denoiser(x0_fn, schedule) -> Denoiser:
    """D(x; σ) of `x0_fn(x_t, t) -> x̂_0` on a discrete schedule (any parameterisation read as x̂_0, e.g. the
    discrete samplers' `predict_start`): the model sees x_t = x/sqrt(1 + σ²) at the trained step nearest in
    log σ_t (int32 [B]), and D is its x̂_0."""
    step_of = _step_of_noise_level(schedule, interpolate=False)

    def denoiser(x: Array, sigma: Array) -> Array:
        return x0_fn(x / jnp.sqrt(1.0 + _expand(sigma, x) ** 2), step_of(sigma))

    return denoiser


def _step_of_noise_level(schedule, interpolate: bool) -> Callable[[Array], Array]:
    """σ [B] -> the step of the schedule at that noise level (see `discrete_eps_denoiser`)."""
    log_levels = from_schedule(schedule).log_noise_levels

    def step_of(sigma: Array) -> Array:
        log_sigma = jnp.log(sigma)
        if interpolate:
            return jnp.interp(log_sigma, log_levels, jnp.arange(log_levels.shape[0], dtype=jnp.float32))
        return jnp.argmin(jnp.abs(log_sigma[:, None] - log_levels[None, :]), axis=1).astype(jnp.int32)

    return step_of


def continuous_eps_denoiser(eps_fn, process, *, label_scale: float = 999.0) -> Denoiser:
    """D(x; σ) of a continuous-time VP or sub-VP ε-model `eps_fn(x_t, label)` (score_sde's DDPM++ cont.).

    t = process.t_from_noise_level(σ); the model sees x_t = α(t)·x and label = label_scale·t
    (score_sde: t·999), returns ε̂ = −σ_t·score; D = x − σ·ε̂.
    """

    def denoiser(x: Array, sigma: Array) -> Array:
        t = process.t_from_noise_level(sigma)
        return x - _expand(sigma, x) * eps_fn(_expand(process.alpha(t), x) * x, label_scale * t)

    return denoiser


def ve_score_denoiser(score_fn) -> Denoiser:
    """D(x; σ) = x + σ²·score of a VE score model `score_fn(x, σ)` (score_sde's continuous NCSN++, label σ).

    score_fn returns ∇ log p_σ(x) itself; score_sde's NCSN++ with `scale_by_sigma` divides its output
    by σ inside the network, so its output is already the score.
    """

    def denoiser(x: Array, sigma: Array) -> Array:
        return x + _expand(sigma, x) ** 2 * score_fn(x, sigma)

    return denoiser


def _preconditioned(net, c_skip, c_out, c_in, c_noise) -> Denoiser:
    """D = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)) for `net(x, c_noise) -> F`."""

    def denoiser(x: Array, sigma: Array) -> Array:
        s = _expand(sigma, x)
        return c_skip(s) * x + c_out(s) * net(c_in(s) * x, c_noise(sigma))

    return denoiser


def edm_precond(net, *, sigma_data: float = 0.5) -> Denoiser:
    """EDM preconditioning: c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/sqrt(σ² + σ_d²),
    c_in = 1/sqrt(σ² + σ_d²), c_noise = ln(σ)/4, around `net(x, c_noise)`."""
    sd = sigma_data
    return _preconditioned(
        net,
        c_skip=lambda s: sd**2 / (s**2 + sd**2),
        c_out=lambda s: s * sd / jnp.sqrt(s**2 + sd**2),
        c_in=lambda s: 1.0 / jnp.sqrt(s**2 + sd**2),
        c_noise=lambda s: jnp.log(s) / 4.0,
    )


def vp_precond(net, *, beta_d: float = 19.9, beta_min: float = 0.1, m: int = 1000) -> Denoiser:
    """EDM's VP preconditioning: c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1), c_noise = (M − 1)·t(σ),
    t(σ) = (sqrt(β_min² + 2·β_d·ln(1 + σ²)) − β_min)/β_d, around `net(x, c_noise)`."""
    return _preconditioned(
        net,
        c_skip=lambda s: jnp.ones_like(s),
        c_out=lambda s: -s,
        c_in=lambda s: 1.0 / jnp.sqrt(s**2 + 1.0),
        c_noise=lambda s: (m - 1) * (jnp.sqrt(beta_min**2 + 2.0 * beta_d * jnp.log1p(s**2)) - beta_min) / beta_d,
    )


def ve_precond(net) -> Denoiser:
    """EDM's VE preconditioning: c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2), around `net(x, c_noise)`."""
    return _preconditioned(
        net,
        c_skip=lambda s: jnp.ones_like(s),
        c_out=lambda s: s,
        c_in=lambda s: jnp.ones_like(s),
        c_noise=lambda s: jnp.log(0.5 * s),
    )
