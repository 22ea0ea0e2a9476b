"""A continuous-time model from its config: the noise process of `config.diffusion`, and the network of
`config.model` as EDM's denoiser D(x; σ) (x = x_0 + σ·n, σ float32 [B]) through its parameterisation:

  eps    an ε-model of a VP/sub-VP process: labels t·999, sees x_t = α(t)·x (score_sde's DDPM++ cont.);
  score  a score model: labels σ, output divided by σ (score_sde's NCSN++ cont. with scale_by_sigma);
  edm    EDM's preconditioning with config.diffusion.sigma_data: labels c_noise = ln(σ)/4.

The model's data are images in [-1, 1], or in [0, 1] with `config.data.centered` False (score_sde's
uncentered data, e.g. diffusers' ScoreSdeVePipeline models): D, its noise levels and its samples are in
that range; `to_model_range` / `to_image_range` convert from and to the [-1, 1] of the rest of jaxdiff.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.diffusion.denoisers import continuous_eps_denoiser, edm_precond, ve_score_denoiser
from jaxdiff.diffusion.guidance import guided_denoiser
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.processes import make_process

Array = jax.Array
Denoiser = Callable[[Array, Array], Array]

PARAMETERIZATIONS = ("eps", "score", "edm")
CONTINUOUS_LOSSES = ("dsm", "edm")


def is_continuous(diffusion_config: ml_collections.ConfigDict) -> bool:
    """Whether `config.diffusion` names a continuous process (configs written before the key: discrete)."""
    return diffusion_config.get("process", "discrete") != "discrete"


def data_range(data_config: ml_collections.ConfigDict) -> tuple[float, float]:
    """(low, high) of the model's data: (-1, 1), or (0, 1) when `config.data.centered` is False."""
    return (-1.0, 1.0) if data_config.get("centered", True) else (0.0, 1.0)


def to_model_range(x: Array, data_config: ml_collections.ConfigDict) -> Array:
    """Images in [-1, 1] -> the model's data range (y = (x + 1)/2 for uncentered data)."""
    low, _ = data_range(data_config)
    return x if low == -1.0 else (x + 1.0) / 2.0


def to_image_range(y: Array, data_config: ml_collections.ConfigDict) -> Array:
    """The model's data -> images in [-1, 1] (x = 2y − 1 for uncentered data)."""
    low, _ = data_range(data_config)
    return y if low == -1.0 else 2.0 * y - 1.0


def process_from_config(diffusion_config: ml_collections.ConfigDict):
    """The continuous process of `config.diffusion` (sigma_min/sigma_max 0: the process's default).

    Raises ValueError for the discrete schedule or values the process does not allow.
    """
    name = diffusion_config.process
    if name in ("ve", "edm"):
        params = {key: diffusion_config[key] for key in ("sigma_min", "sigma_max") if diffusion_config[key] != 0}
    elif name in ("vp", "subvp"):
        params = {"beta_min": diffusion_config.beta_min, "beta_max": diffusion_config.beta_max}
    else:
        raise ConfigError(f"diffusion.process={name!r} is not a continuous process")
    return make_process(name, **params)


def network_denoiser(net_fn, diffusion_config: ml_collections.ConfigDict, process) -> Denoiser:
    """D(x; σ) of `net_fn(x, labels) -> output` by `config.diffusion.parameterization` (module docstring)."""
    kind = diffusion_config.parameterization
    if kind == "eps":
        return continuous_eps_denoiser(net_fn, process)
    if kind == "score":
        return ve_score_denoiser(lambda x, sigma: net_fn(x, sigma) / jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1)))
    if kind == "edm":
        return edm_precond(net_fn, sigma_data=diffusion_config.sigma_data)
    raise ConfigError(f"unknown diffusion.parameterization {kind!r}; expected one of {PARAMETERIZATIONS}")


def conditioned_denoiser(config: ml_collections.ConfigDict, model, process, *, train: bool = False,
                         dropout_rng: Array | None = None) -> Callable:  # fmt: skip
    """`denoise(params, x, sigma, class_labels) -> x̂_0` of the network `model` of `config`.

    class_labels: int [B] or None; for SongUNet the label num_classes (and None) is its all-zero,
    unconditional input. With train=True dropout draws from `dropout_rng`.
    """
    rngs = {"dropout": dropout_rng} if train else None

    def denoise(params, x, sigma, class_labels):
        def net_fn(x_in, labels):
            out = model.apply({"params": params}, x_in, labels, class_labels, train=train, rngs=rngs)
            return out.astype(jnp.float32)

        return network_denoiser(net_fn, config.diffusion, process)(x, sigma)

    return denoise


def model_denoiser(config: ml_collections.ConfigDict, model, params, process, *, labels=None,
                   guidance: float = 0.0) -> Denoiser:  # fmt: skip
    """D(x; σ) of a trained model (dropout off). Unconditional models take no labels and no guidance;
    class-conditional ones int labels [B] (None: the null label, unconditional) and a classifier-free
    guidance scale w >= 0 applied to x̂_0 through `jaxdiff.diffusion.guidance`."""
    denoise = conditioned_denoiser(config, model, process)
    num_classes = config.model.num_classes
    if num_classes == 0:
        if labels is not None:
            raise UsageError("class labels were given but the model is unconditional (num_classes=0)")
        if guidance:
            raise UsageError(f"guidance={guidance} needs a class-conditional model; this one has num_classes=0")
        return lambda x, sigma: denoise(params, x, sigma, None)
    if labels is None:
        if guidance:
            raise UsageError(f"guidance={guidance} needs class labels to guide towards")
        return lambda x, sigma: denoise(params, x, sigma, None)
    return guided_denoiser(denoise, params, labels, guidance=guidance, null_label=num_classes)
