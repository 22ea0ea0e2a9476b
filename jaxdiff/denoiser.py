"""A U-Net and its parameters as the `denoise_fn(x_t, t)` every sampler takes."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.guidance import guided_denoiser

Array = jax.Array


def model_denoiser(model, params, *, labels=None, guidance: float = 0.0) -> Callable[[Array, Array], Array]:
    """`denoise_fn(x_t, t)` evaluating `model` (dropout off) with `params`.

    Unconditional models take no labels and no guidance. Class-conditional
    models take int labels [B] (None: the null label `model.num_classes` for
    all, i.e. unconditional samples) and a classifier-free guidance scale w >= 0.
    """
    if model.num_classes == 0:
        if labels is not None:
            raise ValueError("class labels were given but the model is unconditional (num_classes=0)")
        if guidance:
            raise ValueError(f"guidance={guidance} needs a class-conditional model; this one has num_classes=0")
        return lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)
    if labels is None:
        if guidance:
            raise ValueError(f"guidance={guidance} needs class labels to guide towards")
        return lambda x_t, t: model.apply({"params": params}, x_t, t, None, train=False)
    labels = jnp.asarray(labels)
    try:
        values = np.asarray(labels)
    except jax.errors.TracerArrayConversionError:  # checked by the caller when traced
        values = np.zeros(0, np.int32)
    if values.size and (values.min() < 0 or values.max() >= model.num_classes):
        raise ValueError(f"class labels must lie in [0, {model.num_classes}), got {values.min()}..{values.max()}")

    def apply(p, x_t, t, y):
        return model.apply({"params": p}, x_t, t, y, train=False)

    return guided_denoiser(apply, params, labels, guidance=guidance, null_label=model.num_classes)
