"""The diffusion model's jitted train step: pure functions of (state, batch).

One step: uint8 batch -> [-1, 1] -> random horizontal flip -> t ~ U{0..T-1},
ε ~ N(0, I) -> q_sample -> model -> loss -> gradient (optionally accumulated
over micro-batches) -> global-norm clip -> Adam with linear warmup -> EMA
(`jaxdiff.training.step`). The noise level, noise and loss are those of the
config's family (`jaxdiff.families`): for a continuous process the dsm or edm
loss on the network seen as the denoiser D(x; σ).
"""

from __future__ import annotations

from typing import Callable

import jax
import ml_collections

from jaxdiff.families import family_of
from jaxdiff.training.step import (
    TrainState,
    accumulated_grads,
    apply_gradients,
    learning_rate_schedule,
    preprocess,
    training_labels,
)


def make_loss_fn(config: ml_collections.ConfigDict, model) -> Callable:
    """loss(params, images uint8, labels, rng) -> mean loss over the batch (float32 scalar): the images scaled to
    [-1, 1] and flipped, the labels dropped out, then the loss of the config's family (`jaxdiff.families`)."""
    family_loss = family_of(config).loss_fn(model)
    num_classes = config.model.num_classes

    def loss_fn(params, images, labels, rng):
        flip_rng, t_rng, noise_rng, dropout_rng, label_rng = jax.random.split(rng, 5)
        x_start = preprocess(images, flip_rng if config.data.random_flip else None)
        y = training_labels(labels, label_rng, num_classes, config.training.label_dropout)
        return family_loss(params, x_start, y, t_rng, noise_rng, dropout_rng)

    return loss_fn


def make_train_step(config: ml_collections.ConfigDict, model, tx) -> Callable:
    """train_step(state, batch) -> (state, metrics); batch = {"image": uint8 [B,H,W,C], "label": int32 [B]}."""
    loss_fn = make_loss_fn(config, model)
    lr_schedule = learning_rate_schedule(config.training)
    decay = config.training.ema_decay
    micro_batches = config.training.grad_accum_steps

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = accumulated_grads(loss_fn, state.params, batch["image"], batch["label"], rng, micro_batches)
        return apply_gradients(state, loss, grads, tx, ema_decay=decay, lr_schedule=lr_schedule)

    return train_step
