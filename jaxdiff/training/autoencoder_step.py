"""Training the KL autoencoder: its train state, loss and jitted step, the latent scaling factor, reconstructions.

The loss of one batch x (uint8 -> [-1, 1], optionally flipped) follows the LDM paper's
`LPIPSWithDiscriminator` without the perceptual term and without its learned output log-variance:

    loss = rec + kl_weight·KL [+ disc_weight·λ·active·g_loss]
    rec  = mean over batch and pixels of |x − x̂| ("l1") or (x − x̂)² ("l2"), x̂ = decode(z), z ~ q(z | x)
    KL   = mean over the batch of KL(q(z | x) || N(0, I)), summed over the latent's h, w and channels
           (diffusers' and LDM's `DiagonalGaussianDistribution.kl` convention, per example)

LDM sums the reconstruction over pixels where this code takes the mean, so LDM's kl_weight w corresponds to
w·H·W·C here (1e-6 at 256×256×3 is ≈0.2). The optional discriminator is pix2pix's PatchGAN
(`PatchDiscriminator`); it and its hinge loss start at step `disc_start` (active = step >= disc_start).
λ is LDM's adaptive weight ‖∇_L rec‖ / (‖∇_L g_loss‖ + 1e-4), clipped to [0, 1e4] and not differentiated,
with L the kernel of the decoder's last convolution; g_loss = −mean D(x̂). The discriminator's loss is
active·½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂))) on the same batch, with its own Adam state.

Both optimizers are `jaxdiff.training.step.make_optimizer(training)`; the EMA covers the autoencoder's parameters.
Every random draw of step s comes from `fold_in(state.rng, s)`; a step whose loss or gradient is not finite
changes no parameters or optimizer state and is counted, as in `jaxdiff.training.step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.checks import is_int, is_real, unsupported
from jaxdiff.config.defaults import LOSS_DEFAULTS, RECONSTRUCTION_LOSSES
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.models.autoencoder import AutoencoderKL, DiagonalGaussian
from jaxdiff.training.step import apply_gradients, learning_rate_schedule, preprocess, seed_keys

_unsupported = functools.partial(unsupported, "autoencoder loss")

Array = jax.Array

ADAPTIVE_WEIGHT_MAX = 1e4
BATCH_NORM_EPS = 1e-5  # PyTorch's BatchNorm2d default, as pix2pix's discriminator uses


def check_loss_settings(settings) -> dict[str, Any]:
    """The loss settings (a mapping; absent keys take LOSS_DEFAULTS) checked: ValueError names a bad key."""
    unknown = sorted(set(settings) - set(LOSS_DEFAULTS))
    if unknown:
        raise ConfigError(f"autoencoder loss: unknown keys {unknown}; allowed: {sorted(LOSS_DEFAULTS)}")
    s = {**LOSS_DEFAULTS, **dict(settings)}
    if s["reconstruction_loss"] not in RECONSTRUCTION_LOSSES:
        raise _unsupported("reconstruction_loss", s["reconstruction_loss"], f"one of {RECONSTRUCTION_LOSSES}")
    for key in ("kl_weight", "disc_weight"):
        if not is_real(s[key], finite=True, numpy=False) or s[key] < 0:
            raise _unsupported(key, s[key], "a finite number >= 0")
    if not is_int(s["disc_start"], numpy=False) or s["disc_start"] < 0:
        raise _unsupported("disc_start", s["disc_start"], "an int >= 0")
    for key in ("disc_layers", "disc_channels"):
        if not is_int(s[key], numpy=False) or s[key] < 1:
            raise _unsupported(key, s[key], "an int >= 1")
    return s


def reconstruction_error(x: Array, reconstruction: Array, kind: str) -> Array:
    """Mean over all elements of |x − x̂| ("l1") or (x − x̂)² ("l2"); float32 scalar."""
    difference = x.astype(jnp.float32) - reconstruction.astype(jnp.float32)
    return jnp.mean(jnp.abs(difference) if kind == "l1" else jnp.square(difference))


def hinge_discriminator_loss(logits_real: Array, logits_fake: Array) -> Array:
    """½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂))): the discriminator's hinge loss."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(rec_grad: Array, g_grad: Array) -> Array:
    """LDM's λ = ‖∇rec‖ / (‖∇g‖ + 1e-4) from the gradients at the decoder's last layer, clipped to
    [0, 1e4] and not differentiated."""
    ratio = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAX))


class BatchNorm(nn.Module):
    """Training-mode batch norm over (N, H, W) with biased variance, eps 1e-5; no running averages are kept,
    since the discriminator is only ever applied in training."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s), (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) * scale + bias


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN as LDM uses it: images [B,H,W,C] in [-1, 1] -> logits [B, h, w, 1].

    conv_0 (4×4, stride 2, `channels`), LeakyReLU 0.2; for n = 1..layers−1: conv_n (4×4, stride 2,
    channels·min(2ⁿ, 8), no bias), BatchNorm, LeakyReLU; conv_{layers} (4×4, stride 1,
    channels·min(2^layers, 8), no bias), BatchNorm, LeakyReLU; conv_out (4×4, stride 1, 1 channel).
    Every convolution pads 1 on each side; kernels start as N(0, 0.02²), batch-norm scales as N(1, 0.02²).
    """

    layers: int = 3
    channels: int = 64

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def conv(features, stride, name, bias=True):
            init = nn.initializers.normal(0.02)
            return nn.Conv(features, (4, 4), (stride, stride), ((1, 1), (1, 1)), use_bias=bias, kernel_init=init,
                           name=name)  # fmt: skip

        h = nn.leaky_relu(conv(self.channels, 2, "conv_0")(x), 0.2)
        for n in range(1, self.layers + 1):
            stride = 2 if n < self.layers else 1
            h = conv(self.channels * min(2**n, 8), stride, f"conv_{n}", bias=False)(h)
            h = nn.leaky_relu(BatchNorm(name=f"norm_{n}")(h), 0.2)
        return conv(1, 1, "conv_out")(h)


@flax.struct.dataclass
class AutoencoderTrainState:
    """What an autoencoder run carries from step to step; the disc_* fields are None without a discriminator."""

    step: Array  # int32 scalar: optimizer steps attempted
    params: Any
    ema_params: Any
    opt_state: Any
    disc_params: Any
    disc_opt_state: Any
    rng: Array  # raw uint32 key
    nonfinite_streak: Array  # int32: consecutive skipped (non-finite) steps
    skipped: Array  # int32: all skipped steps


def make_discriminator(settings) -> PatchDiscriminator | None:
    """The PatchGAN of the (checked) loss settings; None when disc_weight is 0."""
    s = check_loss_settings(settings)
    return PatchDiscriminator(s["disc_layers"], s["disc_channels"]) if s["disc_weight"] > 0 else None


def init_autoencoder_train_state(
    model: AutoencoderKL, discriminator: PatchDiscriminator | None, tx: optax.GradientTransformation,
    seed: int, image_shape: tuple[int, int, int],
) -> AutoencoderTrainState:  # fmt: skip
    """Fresh parameters from `seed` for images [H, W, C]; the EMA starts as a copy of the parameters."""
    init_rng, run_rng = seed_keys(seed)
    ae_rng, disc_rng = jax.random.split(init_rng)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    params = model.init({"params": ae_rng}, dummy)["params"]
    disc_params = None if discriminator is None else discriminator.init(disc_rng, dummy)["params"]
    return AutoencoderTrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        disc_params=disc_params,
        disc_opt_state=None if discriminator is None else tx.init(disc_params),
        rng=run_rng,
        nonfinite_streak=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def _with_last_layer(params, kernel):
    """`params` with the decoder's last convolution kernel replaced by `kernel`."""
    decoder = params["decoder"]
    return {**params, "decoder": {**decoder, "conv_out": {**decoder["conv_out"], "kernel": kernel}}}


def make_autoencoder_loss_fn(model: AutoencoderKL, discriminator: PatchDiscriminator | None, settings) -> Callable:
    """loss(params, disc_params, x [-1, 1], rng, active) -> (loss, aux); `active` (bool scalar) switches the
    discriminator term on. aux holds the reconstruction x̂, the latent z and the loss terms."""
    s = check_loss_settings(settings)

    def loss_fn(params, disc_params, x, rng, active):
        posterior = model.apply({"params": params}, x, method=AutoencoderKL.encode)
        z = posterior.sample(rng)
        rec_of = lambda r: reconstruction_error(x, r, s["reconstruction_loss"])
        if discriminator is None:
            reconstruction = model.apply({"params": params}, z, method=AutoencoderKL.decode)
        else:  # also the pullback to the last layer's kernel, for the adaptive weight
            decode = lambda kernel: model.apply(
                {"params": _with_last_layer(params, kernel)}, z, method=AutoencoderKL.decode
            )
            reconstruction, last_layer_vjp = jax.vjp(decode, params["decoder"]["conv_out"]["kernel"])
        rec, rec_cotangent = jax.value_and_grad(rec_of)(reconstruction)
        kl = jnp.mean(posterior.kl())
        loss = rec + s["kl_weight"] * kl
        aux = {"reconstruction": reconstruction, "z": z, "reconstruction_error": rec, "kl": kl}
        if discriminator is not None:
            g_of = lambda r: -jnp.mean(discriminator.apply({"params": disc_params}, r))
            g_loss, g_cotangent = jax.value_and_grad(g_of)(reconstruction)
            (rec_grad,), (g_grad,) = last_layer_vjp(rec_cotangent), last_layer_vjp(g_cotangent)
            weight = s["disc_weight"] * adaptive_weight(rec_grad, g_grad)
            loss = loss + jnp.where(active, weight, 0.0) * g_loss
            aux.update(g_loss=g_loss, disc_adaptive_weight=weight)
        return loss, aux

    return loss_fn


def make_autoencoder_train_step(
    model: AutoencoderKL, discriminator: PatchDiscriminator | None, settings, training, tx, *, random_flip: bool
) -> Callable:
    """train_step(state, images uint8 [B,H,W,C]) -> (state, metrics), to be jitted.

    `training` is the config's training section (ema_decay, learning-rate schedule); `tx` its optimizer.
    metrics: loss, reconstruction_error, kl, latent_mean, latent_std (of the posterior samples z),
    grad_norm, learning_rate, skipped_updates, nonfinite_streak; with a discriminator also g_loss,
    disc_adaptive_weight, disc_loss, logits_real, logits_fake (means of D's outputs).
    """
    s = check_loss_settings(settings)
    loss_fn = make_autoencoder_loss_fn(model, discriminator, s)
    lr_schedule = learning_rate_schedule(training)
    decay = training.ema_decay

    def train_step(state: AutoencoderTrainState, images: Array) -> tuple[AutoencoderTrainState, dict]:
        flip_rng, sample_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
        x = preprocess(images, flip_rng if random_flip else None)
        active = state.step >= s["disc_start"]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, aux), grads = grad_fn(state.params, state.disc_params, x, sample_rng, active)
        metrics = {
            "reconstruction_error": aux["reconstruction_error"],
            "kl": aux["kl"],
            "latent_mean": jnp.mean(aux["z"]),
            "latent_std": jnp.std(aux["z"]),
        }
        extra, extra_finite = {}, True
        if discriminator is not None:
            reconstruction = jax.lax.stop_gradient(aux["reconstruction"])

            def disc_loss_fn(disc_params):
                logits_real = discriminator.apply({"params": disc_params}, x)
                logits_fake = discriminator.apply({"params": disc_params}, reconstruction)
                d_loss = jnp.where(active, hinge_discriminator_loss(logits_real, logits_fake), 0.0)
                return d_loss, (jnp.mean(logits_real), jnp.mean(logits_fake))

            (d_loss, (real, fake)), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(state.disc_params)
            extra_finite = jnp.isfinite(d_loss) & jnp.isfinite(optax.tree_utils.tree_norm(d_grads))
            d_updates, extra["disc_opt_state"] = tx.update(d_grads, state.disc_opt_state, state.disc_params)
            extra["disc_params"] = optax.apply_updates(state.disc_params, d_updates)
            metrics.update(g_loss=aux["g_loss"], disc_adaptive_weight=aux["disc_adaptive_weight"], disc_loss=d_loss,
                           logits_real=real, logits_fake=fake)  # fmt: skip
        new_state, update_metrics = apply_gradients(state, loss, grads, tx, ema_decay=decay, lr_schedule=lr_schedule,
                                                    extra=extra, extra_finite=extra_finite)  # fmt: skip
        return new_state, {**update_metrics, **metrics}

    return train_step


def encode_fn(model: AutoencoderKL) -> Callable[[Any, Array], DiagonalGaussian]:
    """(params, x [-1, 1]) -> the posterior q(z | x) of `model`."""
    return lambda params, x: model.apply({"params": params}, x, method=AutoencoderKL.encode)


def estimate_scaling_factor(
    encode: Callable[[Any, Array], DiagonalGaussian], params, images: np.ndarray, rng: Array | None = None,
    *, batch_size: int = 256,
) -> float:  # fmt: skip
    """1 / std of the latents of uint8 images [N, H, W, C], as the LDM paper sets its scale factor.

    The std is over every element of every latent, about their common mean, with N−1 in the denominator
    (PyTorch's `Tensor.std`, which LDM calls), accumulated in float64. With `rng` the latents are posterior
    samples (as LDM, on its first training batch, and as latent diffusion trains on); without, the posterior
    modes (means). Batch i of `batch_size` images draws its samples from fold_in(rng, i).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise UsageError(f"images must be uint8 [N, H, W, C] with N >= 1, got {images.dtype} {images.shape}")
    total = total_sq = 0.0
    count = 0
    for i, start in enumerate(range(0, len(images), batch_size)):
        posterior = encode(params, preprocess(jnp.asarray(images[start : start + batch_size]), None))
        z = posterior.mode() if rng is None else posterior.sample(jax.random.fold_in(rng, i))
        z = np.asarray(z, np.float64)
        total, total_sq, count = total + z.sum(), total_sq + np.square(z).sum(), count + z.size
    variance = (total_sq - total * total / count) / (count - 1)
    return float(1.0 / np.sqrt(variance))


def reconstruct(model: AutoencoderKL, params, images: np.ndarray) -> Array:
    """Originals and reconstructions (from the posterior modes) of uint8 images [N, H, W, C], interleaved as
    float32 [2N, H, W, C] in [-1, 1]: row 2i is image i, row 2i+1 its reconstruction (pairs side by side
    in an even-width grid)."""
    x = preprocess(jnp.asarray(images), None)
    reconstruction = model.apply({"params": params}, x)
    return jnp.stack([x, reconstruction], axis=1).reshape((2 * x.shape[0],) + x.shape[1:])
