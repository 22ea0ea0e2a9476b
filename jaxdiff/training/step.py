"""The train state and the update every task's step ends with: pure functions of (state, batch).

`TrainState` (params, EMA, optimizer state, per-step randomness, skipped-step counters) and a fresh one for
`config.model`'s network, the optimizer (global-norm clip, then Adam with linear warmup), the guarded update
(`apply_gradients`: a step whose loss or gradient is not finite leaves params, EMA and optimizer state untouched and
is counted), gradients accumulated over micro-batches, the images' scaling to [-1, 1] with random flips, and
class-label dropout. The diffusion model's loss and step are
`jaxdiff.training.diffusion_step`; the other tasks' are `latent_step`, `autoencoder_step`, `flow_lora_step`.
Every random draw of step s comes from `fold_in(state.rng, s)`, so a run is a deterministic function of
(seed, data order).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxdiff.models.networks import example_inputs

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a run carries from step to step; `step` counts optimizer updates attempted."""

    step: Array  # int32 scalar
    params: Any
    ema_params: Any
    opt_state: Any
    rng: Array  # raw uint32 key
    nonfinite_streak: Array  # int32: consecutive skipped (non-finite) steps
    skipped: Array  # int32: all skipped steps


def learning_rate_schedule(training: ml_collections.ConfigDict) -> optax.Schedule:
    """lr·min(step/warmup, 1): the first update (step 0) has lr 0; constant after warmup.

    Written as the product (not optax's linear interpolation, whose float32
    cancellation is off by ~3e-4 relative in the first steps).
    """
    lr, warmup = training.learning_rate, training.warmup_steps
    if warmup > 0:
        return lambda count: lr * jnp.minimum(jnp.asarray(count, jnp.float32) / warmup, 1.0)
    return optax.constant_schedule(lr)


def make_optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clip, then Adam (no weight decay) with the warmup schedule."""
    adam = optax.adam(
        learning_rate_schedule(training), b1=training.adam_b1, b2=training.adam_b2, eps=training.adam_eps
    )
    if training.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(training.grad_clip_norm), adam)
    return adam


def seed_keys(seed: int) -> tuple[Array, Array]:
    """(init_rng, run_rng) of a run: parameter initialisation and per-step randomness."""
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(seed))
    return init_rng, run_rng


def ema_update(ema_params, params, decay: float):
    """decay·ema + (1 − decay)·params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def where_finite(finite: Array, new, old):
    """`new` where the scalar bool `finite` holds, else `old`, leaf by leaf (a skipped step changes nothing)."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def new_train_state(params, ema_params, tx: optax.GradientTransformation, rng: Array, *, step: int = 0) -> TrainState:
    """A state at `step` with the given weights and a fresh optimizer state."""
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        ema_params=ema_params,
        opt_state=tx.init(params),
        rng=rng,
        nonfinite_streak=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def init_train_state(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation) -> TrainState:
    """Fresh parameters from `config.seed`; the EMA shadow starts as a copy of them."""
    init_rng, run_rng = seed_keys(config.seed)
    params = model.init({"params": init_rng}, *example_inputs(config.model), train=False)["params"]
    return new_train_state(params, jax.tree.map(jnp.copy, params), tx, run_rng)


def preprocess(images: Array, flip_rng: Array | None) -> Array:
    """uint8 NHWC -> float32 in [-1, 1], each image flipped left-right with probability ½ when flip_rng is given."""
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if flip_rng is None:
        return x
    flip = jax.random.bernoulli(flip_rng, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)


def training_labels(labels: Array, rng: Array, num_classes: int, dropout: float) -> Array | None:
    """Class labels with the null label `num_classes` at rate `dropout`; None for unconditional models."""
    if num_classes == 0:
        return None
    return jnp.where(jax.random.bernoulli(rng, dropout, labels.shape), num_classes, labels)


def accumulated_grads(loss_fn: Callable, params, images, labels, rng, micro_batches: int):
    """Mean loss and gradient over `micro_batches` equal slices of the batch, scanned one at a time."""
    grad_fn = jax.value_and_grad(loss_fn)
    if micro_batches == 1:
        return grad_fn(params, images, labels, rng)
    split = lambda a: a.reshape((micro_batches, a.shape[0] // micro_batches) + a.shape[1:])  # noqa: E731

    def body(carry, inputs):
        index, micro_images, micro_labels = inputs
        loss, grads = grad_fn(params, micro_images, micro_labels, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(micro_batches), split(images), split(labels)))
    return jax.tree.map(lambda g: g / micro_batches, (loss, grads))


def apply_gradients(
    state, loss: Array, grads, tx: optax.GradientTransformation, *, ema_decay: float, lr_schedule: optax.Schedule,
    extra: dict | None = None, extra_finite: Array | bool = True,
) -> tuple[Any, dict]:
    """The update every training step ends with: Adam on `grads`, EMA, step + 1; a non-finite loss or
    gradient leaves params, EMA and optimizer state as they were and is counted. `state` is a `TrainState`
    or any state with its fields (`AutoencoderTrainState`).

    `extra`: new values of other state fields (e.g. a discriminator's parameters and optimizer state), applied
    or dropped together with the update; `extra_finite` (bool) must hold too for the update to apply.
    Returns (state, metrics: loss, grad_norm, learning_rate, skipped_updates, nonfinite_streak).
    """
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & extra_finite
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = {"params": params, "ema_params": ema_update(state.ema_params, params, ema_decay), "opt_state": opt_state}
    new_state = state.replace(
        step=state.step + 1,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32),
        **{k: where_finite(finite, v, getattr(state, k)) for k, v in {**new, **(extra or {})}.items()},
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": lr_schedule(state.step - state.skipped),  # Adam counts applied updates only
        "skipped_updates": new_state.skipped,
        "nonfinite_streak": new_state.nonfinite_streak,
    }
    return new_state, metrics
