"""Training losses in continuous time, written against a denoiser `apply_fn(params, x, sigma) -> x̂_0`
(EDM's D(x; σ) with x = x_0 + σ·n, σ float32 [B]; any model type through the adapters of `denoiser`).

dsm_loss     denoising score matching on a process (score_sde `get_sde_loss_fn`): t ~ U[eps, t_max],
             x_t = α·x_0 + σ·z, s = ∇ log p_t(x_t) = (α·D − x_t)/σ²;
               plain:                ‖σ·s + z‖²   = ‖D − x_0‖²/(σ/α)²
               likelihood_weighting: g(t)²·‖s + z/σ‖²;
             summed over each example's dimensions (or averaged with `reduce_mean`), then averaged.
edm_loss     EDM (Karras et al. 2022): ln σ ~ N(P_mean, P_std²), λ(σ) = (σ² + σ_d²)/(σ·σ_d)²,
             λ·‖D(x_0 + σ·n; σ) − x_0‖² summed over each example (EDM's `loss.sum()/batch`) or averaged
             with `reduce_mean`, then averaged over the batch.
flow_matching_loss
             conditional flow matching on a flow process (`jaxdiff.diffusion.flow`): t from `flow.sample_t`
             (uniform, logit-normal or SD3's mode sampling, then shifted), mapped linearly into the
             parameterisation's regular interval; x_t = α·x_0 + σ·ε; the loss is ‖û − u‖² of the velocity
             u = α'·x_0 + σ'·ε, û that of the network's prediction of any kind (velocity, x0, eps, v), averaged
             over each example's dimensions (SiT's mean_flat; summed with reduce_mean=False), times an optional
             per-example weight: `weighting` "edm", EDM's λ(σ/α)·‖x̂_0 − x_0‖² written in the velocity,
             w(t) = (σ² + σ_d²·α²)/(σ_d²·(ασ' − σα')²), and/or `weights` [B]; then averaged over the batch.
Randomness: `t_key, noise_key = jax.random.split(rng)` (σ_key for edm_loss).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff.checks import is_real
from jaxdiff.diffusion import flow
from jaxdiff.diffusion.denoisers import denoise_state
from jaxdiff.errors import UsageError

Array = jax.Array


def _reduce(per_element: Array, reduce_mean: bool) -> Array:
    """[B, ...] → per-example sum (or mean) → batch mean: a scalar."""
    flat = per_element.reshape(per_element.shape[0], -1)
    return jnp.mean(jnp.mean(flat, axis=1) if reduce_mean else jnp.sum(flat, axis=1))


def _expand(values: Array, x: Array) -> Array:
    return values.reshape(values.shape + (1,) * (x.ndim - 1))


def dsm_loss(
    apply_fn, params, process, x0: Array, rng: Array, *, eps: float = 1e-5, reduce_mean: bool = False,
    likelihood_weighting: bool = False,
) -> Array:  # fmt: skip
    """Continuous-time denoising score matching of x0 [B, ...] on `process`, t ~ U[eps, t_max]: a scalar."""
    if not (is_real(eps, numpy=False) and 0 < eps < 1e-1):
        raise UsageError(f"eps={eps!r} must be a number in (0, 0.1)")
    t_key, noise_key = jax.random.split(rng)
    t = jax.random.uniform(t_key, (x0.shape[0],), jnp.float32, eps, process.t_max)
    z = jax.random.normal(noise_key, x0.shape, jnp.float32)
    alpha, sigma = _expand(process.alpha(t), x0), _expand(process.sigma(t), x0)
    x_t = alpha * x0 + sigma * z
    denoised = denoise_state(lambda x, s: apply_fn(params, x, s), process, x_t, t)
    score = (alpha * denoised - x_t) / sigma**2
    if likelihood_weighting:
        per_element = _expand(process.diffusion(t), x0) ** 2 * (score + z / sigma) ** 2
    else:
        per_element = (score * sigma + z) ** 2
    return _reduce(per_element, reduce_mean)


def edm_weight(sigma: Array, sigma_data: float = 0.5) -> Array:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out(σ)²."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(
    apply_fn, params, x0: Array, rng: Array, *, p_mean: float = -1.2, p_std: float = 1.2,
    sigma_data: float = 0.5, reduce_mean: bool = False,
) -> Array:  # fmt: skip
    """EDM's loss of x0 [B, ...]: a scalar."""
    for name, value in (("p_std", p_std), ("sigma_data", sigma_data)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UsageError(f"{name}={value!r} must be a finite number > 0")
    sigma_key, noise_key = jax.random.split(rng)
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(sigma_key, (x0.shape[0],), jnp.float32))
    noise = _expand(sigma, x0) * jax.random.normal(noise_key, x0.shape, jnp.float32)
    denoised = apply_fn(params, x0 + noise, sigma)
    return _reduce(_expand(edm_weight(sigma, sigma_data), x0) * (denoised - x0) ** 2, reduce_mean)


FLOW_WEIGHTINGS = ("none", "edm")


def flow_matching_loss(
    apply_fn, params, process, x0: Array, rng: Array, *, parameterization: str = "velocity",
    t_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
    shift: float = 1.0, t_max: float = 1.0, weighting: str = "none", sigma_data: float = 0.5,
    reduce_mean: bool = True, weights: Array | None = None,
) -> Array:  # fmt: skip
    """Conditional flow matching of x0 [B, ...] on flow process `process` (module docstring): a scalar.

    apply_fn(params, x_t, t) -> the network's prediction of kind `parameterization`, t float32 [B] in [0, 1]
    (the network's time scale applied inside); `weights`: optional float [B] per-example weights. The drawn
    times (`flow.sample_t`) are mapped affinely onto [low, min(high, t_max)], [low, high] the parameterization's
    `flow.regular_interval` (RectifiedFlow: t_max = 0.999, its training τ = 1 − t ~ U[1e-3, 1]).
    """
    flow.check_flow_process(process, "flow_matching_loss")
    flow.check_parameterization(parameterization)
    flow.check_time_sampling(t_sampling, logit_std=logit_std, mode_scale=mode_scale, shift=shift)
    if not (is_real(t_max, finite=True) and 0 < t_max <= 1):
        raise UsageError(f"t_max={t_max!r} must be a number in (0, 1]")
    if weighting not in FLOW_WEIGHTINGS:
        raise UsageError(f"unknown flow loss weighting {weighting!r}; expected one of {FLOW_WEIGHTINGS}")
    if weighting == "edm" and not (is_real(sigma_data, finite=True) and sigma_data > 0):
        raise UsageError(f"sigma_data={sigma_data!r} must be a number > 0")
    t_key, noise_key = jax.random.split(rng)
    low, high = flow.regular_interval(parameterization, process)
    high = min(high, t_max)
    if high <= low:
        raise UsageError(f"t_max={t_max!r} leaves no training times above the {parameterization!r} model's "
                         f"t_min={low}")  # fmt: skip
    t = low + (high - low) * flow.sample_t(t_key, x0.shape[0], t_sampling=t_sampling, logit_mean=logit_mean,
                                           logit_std=logit_std, mode_scale=mode_scale, shift=shift)  # fmt: skip
    eps = jax.random.normal(noise_key, x0.shape, jnp.float32)
    c = flow.coefficients(process, t, x0)
    x_t = c.alpha * x0 + c.sigma * eps
    output = jnp.asarray(apply_fn(params, x_t, t), jnp.float32)
    if parameterization != "velocity":
        output = flow.prediction("velocity", *flow.to_x0_eps(parameterization, output, x_t, c), c)
    per_element = (output - flow.prediction("velocity", x0, eps, c)) ** 2
    if weighting == "edm":
        per_element = per_element * (c.sigma**2 + sigma_data**2 * c.alpha**2) / (sigma_data * c.determinant) ** 2
    if weights is not None:
        per_element = per_element * _expand(jnp.asarray(weights, jnp.float32), x0)
    return _reduce(per_element, reduce_mean)
