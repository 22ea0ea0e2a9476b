"""The Gaussian diffusion as pure functions of a `Schedule` and arrays.

Conventions: images are NHWC in [-1, 1]; `t` is the 0-based integer step
index, shape [B], each in 0..T-1; tables are looked up at t and broadcast over
H, W, C. Functions of the official DDPM code keep its exact index rules
(clipped posterior log-variance, the fixedlarge log-variance at t = 0, x̂0
clipped before the posterior mean, the tanh-CDF discretized decoder).
Everything is jit-able; range checks on t run only when t is concrete.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.limits import DenoisedLimit, limit_denoised
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.schedule import Schedule

Array = jax.Array

MEAN_TYPES = ("eps", "x_start", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
_LEARNED = ("learned", "learned_range")


def _check_images(schedule: Schedule, x: Array, t: Array) -> None:
    """x must be NHWC [B, H, W, C]; t integer [B] within [0, T) (checked when concrete)."""
    if x.ndim != 4:
        raise UsageError(f"images must be NHWC with rank 4, got shape {x.shape}")
    if t.shape != (x.shape[0],):
        raise UsageError(f"t must have shape [B] = ({x.shape[0]},), got {t.shape}")
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise UsageError(f"t must hold integer step indices, got dtype {t.dtype}")
    try:
        values = np.asarray(t)
    except jax.errors.TracerArrayConversionError:
        return
    bad = values[(values < 0) | (values >= schedule.num_timesteps)]
    if bad.size:
        raise UsageError(f"t must lie in [0, {schedule.num_timesteps}), got {int(bad[0])}")


def _at(table: Array, t: Array) -> Array:
    """table[t] shaped [B, 1, 1, 1], to broadcast against NHWC images."""
    return table[t][:, None, None, None]


def mean_flat(x: Array) -> Array:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0)


def q_mean_variance(schedule: Schedule, x_start: Array, t: Array) -> tuple[Array, Array, Array]:
    """Mean [B,H,W,C], variance and log-variance [B,1,1,1] of q(x_t | x_0)."""
    _check_images(schedule, x_start, t)
    mean = _at(schedule.sqrt_alphas_cumprod, t) * x_start
    variance = 1.0 - _at(schedule.alphas_cumprod, t)
    return mean, variance, _at(schedule.log_one_minus_alphas_cumprod, t)


def q_sample(schedule: Schedule, x_start: Array, t: Array, noise: Array) -> Array:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε, a draw from q(x_t | x_0)."""
    _check_images(schedule, x_start, t)
    chex.assert_equal_shape([x_start, noise])
    return _at(schedule.sqrt_alphas_cumprod, t) * x_start + _at(schedule.sqrt_one_minus_alphas_cumprod, t) * noise


def q_posterior_mean_variance(
    schedule: Schedule, x_start: Array, x_t: Array, t: Array
) -> tuple[Array, Array, Array]:
    """Mean [B,H,W,C], variance and clipped log-variance [B,1,1,1] of q(x_{t-1} | x_t, x_0)."""
    _check_images(schedule, x_t, t)
    chex.assert_equal_shape([x_start, x_t])
    mean = _at(schedule.posterior_mean_coef1, t) * x_start + _at(schedule.posterior_mean_coef2, t) * x_t
    return mean, _at(schedule.posterior_variance, t), _at(schedule.posterior_log_variance_clipped, t)


# Conversions between the parameterisations x_0, ε and v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x_0


def predict_start_from_noise(schedule: Schedule, x_t: Array, t: Array, noise: Array) -> Array:
    """x̂_0 = sqrt(1/ᾱ_t)·x_t − sqrt(1/ᾱ_t − 1)·ε."""
    _check_images(schedule, x_t, t)
    return _at(schedule.sqrt_recip_alphas_cumprod, t) * x_t - _at(schedule.sqrt_recipm1_alphas_cumprod, t) * noise


def predict_noise_from_start(schedule: Schedule, x_t: Array, t: Array, x_start: Array) -> Array:
    """ε̂ = (sqrt(1/ᾱ_t)·x_t − x_0) / sqrt(1/ᾱ_t − 1)."""
    _check_images(schedule, x_t, t)
    return (_at(schedule.sqrt_recip_alphas_cumprod, t) * x_t - x_start) / _at(schedule.sqrt_recipm1_alphas_cumprod, t)


def predict_start_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """x̂_0 = sqrt(ᾱ_t)·x_t − sqrt(1 − ᾱ_t)·v."""
    _check_images(schedule, x_t, t)
    return _at(schedule.sqrt_alphas_cumprod, t) * x_t - _at(schedule.sqrt_one_minus_alphas_cumprod, t) * v


def v_target(schedule: Schedule, x_start: Array, t: Array, noise: Array) -> Array:
    """v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0 (Salimans & Ho 2022)."""
    _check_images(schedule, x_start, t)
    return _at(schedule.sqrt_alphas_cumprod, t) * noise - _at(schedule.sqrt_one_minus_alphas_cumprod, t) * x_start


def predict_start(schedule: Schedule, mean_output: Array, x_t: Array, t: Array, mean_type: str) -> Array:
    """x̂_0 from the mean part of a model output of type `eps`, `x_start` or `v`."""
    if mean_type == "eps":
        return predict_start_from_noise(schedule, x_t, t, mean_output)
    if mean_type == "x_start":
        return mean_output
    if mean_type == "v":
        return predict_start_from_v(schedule, x_t, t, mean_output)
    raise ConfigError(f"unknown mean_type {mean_type!r}; expected one of {MEAN_TYPES}")


# p(x_{t-1} | x_t)


def split_model_output(model_output: Array, x_t: Array, var_type: str) -> tuple[Array, Array | None]:
    """(mean part, variance part or None); learned variances double the channels."""
    if var_type not in VAR_TYPES:
        raise ConfigError(f"unknown var_type {var_type!r}; expected one of {VAR_TYPES}")
    channels = x_t.shape[-1]
    expected = 2 * channels if var_type in _LEARNED else channels
    if model_output.shape != x_t.shape[:-1] + (expected,):
        raise ConfigError(
            f"model output shape {model_output.shape} does not fit var_type {var_type!r} "
            f"for x_t of shape {x_t.shape} (expected {expected} channels)"
        )
    if var_type in _LEARNED:
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


def p_variance(schedule: Schedule, var_output: Array | None, t: Array, var_type: str) -> tuple[Array, Array]:
    """(variance, log-variance) of p(x_{t-1} | x_t), [B,1,1,1] for fixed types, [B,H,W,C] for learned.

    fixedlarge: (β_t, log([β̃_1, β_1, ..., β_{T-1}])[t]) as the official code;
    fixedsmall: (β̃_t, clipped log β̃_t); learned: the output is the log-variance;
    learned_range: the output v in [-1, 1] interpolates log β_t and log β̃_t.
    """
    if var_type == "fixedlarge":
        return _at(schedule.betas, t), _at(schedule.fixedlarge_log_variance, t)
    if var_type == "fixedsmall":
        return _at(schedule.posterior_variance, t), _at(schedule.posterior_log_variance_clipped, t)
    if var_type == "learned":
        return jnp.exp(var_output), var_output
    if var_type == "learned_range":
        fraction = (var_output + 1.0) / 2.0
        log_variance = fraction * jnp.log(_at(schedule.betas, t)) + (1.0 - fraction) * _at(
            schedule.posterior_log_variance_clipped, t
        )
        return jnp.exp(log_variance), log_variance
    raise ConfigError(f"unknown var_type {var_type!r}; expected one of {VAR_TYPES}")


def p_mean_variance(
    schedule: Schedule,
    model_output: Array,
    x_t: Array,
    t: Array,
    *,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    clip_denoised: bool | DenoisedLimit = True,
) -> tuple[Array, Array, Array, Array]:
    """(mean, variance, log_variance, pred_x_start) of p(x_{t-1} | x_t).

    x̂_0 is computed from the model output, clipped to [-1, 1] when
    `clip_denoised` is True (limited by it when a `jaxdiff.diffusion.limits.DenoisedLimit`),
    and the mean is the posterior mean of (x̂_0, x_t).
    """
    _check_images(schedule, x_t, t)
    mean_output, var_output = split_model_output(model_output, x_t, var_type)
    variance, log_variance = p_variance(schedule, var_output, t, var_type)
    pred_x_start = limit_denoised(predict_start(schedule, mean_output, x_t, t, mean_type), clip_denoised)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x_start, x_t, t)
    return mean, variance, log_variance, pred_x_start


# Likelihood terms


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: Array) -> Array:
    """Φ(x) by the tanh approximation 0.5·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array) -> Array:
    """Elementwise log-probability (nats) of 8-bit data x in [-1, 1] under a Gaussian binned at width 2/255.

    The end bins extend to ±∞ (x < -0.999: log Φ(upper edge); x > 0.999:
    log(1 − Φ(lower edge))); every log argument is clamped at 1e-12.
    """
    chex.assert_equal_shape([x, means])
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(
    schedule: Schedule,
    model_output: Array,
    *,
    x_start: Array,
    x_t: Array,
    t: Array,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
) -> tuple[Array, Array]:
    """(L_t in bits/dim [B], pred_x_start): the variational-bound term of step t.

    For t > 0, KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) averaged over pixels;
    for t = 0, the discretized decoder's negative log-likelihood of x_0.
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x_start, x_t, t)
    mean, _, log_variance, pred_x_start = p_mean_variance(
        schedule, model_output, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
    )
    kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
    log_likelihood = discretized_gaussian_log_likelihood(x_start, means=mean, log_scales=0.5 * log_variance)
    decoder_nll = -mean_flat(log_likelihood) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl), pred_x_start


def prior_bpd(schedule: Schedule, x_start: Array) -> Array:
    """KL(q(x_T | x_0) ‖ N(0, I)) averaged over pixels, in bits/dim, shape [B]."""
    t = jnp.full((x_start.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(schedule, x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


# Training losses


def min_snr_weight(schedule: Schedule, t: Array, *, gamma: float, mean_type: str) -> Array:
    """Min-SNR-γ loss weight [B] (Hang et al. 2023) for the regression target of `mean_type`.

    With snr = ᾱ/(1 − ᾱ): eps min(snr, γ)/snr, x_start min(snr, γ), v min(snr, γ)/(snr + 1).
    """
    # 1 − ᾱ from its float64-computed square root: 1 − ᾱ in float32 would cancel near t = 0.
    snr = schedule.alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t] ** 2
    clipped = jnp.minimum(snr, gamma)
    weights = {"eps": clipped / snr, "x_start": clipped, "v": clipped / (snr + 1.0)}
    if mean_type not in weights:
        raise ConfigError(f"unknown mean_type {mean_type!r}; expected one of {MEAN_TYPES}")
    return weights[mean_type]


def regression_target(schedule: Schedule, x_start: Array, t: Array, noise: Array, mean_type: str) -> Array:
    """What the mean part of the model output should equal: ε, x_0 or v."""
    if mean_type == "eps":
        return noise
    if mean_type == "x_start":
        return x_start
    if mean_type == "v":
        return v_target(schedule, x_start, t, noise)
    raise ConfigError(f"unknown mean_type {mean_type!r}; expected one of {MEAN_TYPES}")


def training_losses(
    schedule: Schedule,
    model_output: Array,
    *,
    x_start: Array,
    x_t: Array,
    t: Array,
    noise: Array,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    loss_type: str = "mse",
    hybrid_lambda: float = 0.001,
    min_snr_gamma: float = 0.0,
) -> Array:
    """Per-example loss [B] for a model output at x_t = q_sample(x_start, t, noise).

    mse: L_simple, mean over H·W·C of (target − output)², optionally min-SNR-γ
    weighted (gamma > 0). kl: the variational-bound term L_t in bits/dim (the
    official DDPM 'kl' loss). hybrid (improved DDPM, learned variances):
    mse + hybrid_lambda·T·L_t, where L_t sees the mean output through a
    stop-gradient so only the variance learns from the bound.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    learned = var_type in _LEARNED
    if loss_type == "mse" and learned:
        raise ConfigError(f"var_type {var_type!r} is learned only through the bound: use loss_type 'hybrid' or 'kl'")
    if loss_type == "hybrid" and not learned:
        raise ConfigError(f"loss_type 'hybrid' needs a learned variance, got var_type {var_type!r}")
    _check_images(schedule, x_start, t)
    chex.assert_equal_shape([x_start, x_t, noise])
    if loss_type == "kl":
        bound, _ = vb_terms_bpd(
            schedule, model_output, x_start=x_start, x_t=x_t, t=t,
            mean_type=mean_type, var_type=var_type, clip_denoised=False,
        )  # fmt: skip
        return bound

    mean_output, var_output = split_model_output(model_output, x_t, var_type)
    target = regression_target(schedule, x_start, t, noise, mean_type)
    loss = mean_flat((target - mean_output) ** 2)
    if min_snr_gamma > 0:
        loss = loss * min_snr_weight(schedule, t, gamma=min_snr_gamma, mean_type=mean_type)
    if loss_type == "hybrid":
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
        bound, _ = vb_terms_bpd(
            schedule, frozen, x_start=x_start, x_t=x_t, t=t,
            mean_type=mean_type, var_type=var_type, clip_denoised=False,
        )  # fmt: skip
        loss = loss + hybrid_lambda * schedule.num_timesteps * bound
    return loss
