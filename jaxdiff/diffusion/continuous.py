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

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.diffusion.denoisers import continuous_eps_denoiser, edm_precond, ve_score_denoiser
from jaxdiff.diffusion.guidance import guided_denoiser
from jaxdiff.processes import make_process
from jaxdiff.samplers import sample_continuous

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
        raise ValueError(f"diffusion.process={name!r} is not a continuous process")
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
    raise ValueError(f"unknown diffusion.parameterization {kind!r}; expected one of {PARAMETERIZATIONS}")


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
            raise ValueError("class labels were given but the model is unconditional (num_classes=0)")
        if guidance:
            raise ValueError(f"guidance={guidance} needs a class-conditional model; this one has num_classes=0")
        return lambda x, sigma: denoise(params, x, sigma, None)
    if labels is None:
        if guidance:
            raise ValueError(f"guidance={guidance} needs class labels to guide towards")
        return lambda x, sigma: denoise(params, x, sigma, None)
    return guided_denoiser(denoise, params, labels, guidance=guidance, null_label=num_classes)


def sampler_options(sampler: str, sampling_config: ml_collections.ConfigDict) -> dict:
    """The options of continuous `sampler` from `config.sampling` (`jaxdiff.samplers.sample_continuous`)."""
    names = {
        "pc": ("predictor", "corrector", "snr", "n_corrector"),
        "ode": ("rtol", "atol"),
        "edm_stochastic": ("s_churn", "s_min", "s_max", "s_noise"),
        "ddim": ("eta",),
    }.get(sampler, ())
    return {name: sampling_config[name] for name in names}


def sample_in_image_range(config: ml_collections.ConfigDict, denoiser: Denoiser, process, shape, rng: Array, *,
                          sampler: str, steps: int | None, **options) -> Array:  # fmt: skip
    """`sample_continuous` of a model's `denoiser`, every x̂_0 clipped to the model's data range when
    `config.sampling.clip_denoised`; the samples float32 `shape` returned in [-1, 1] (`to_image_range`)."""
    if config.sampling.clip_denoised:
        low, high = data_range(config.data)
        denoiser = functools.partial(_clipped, denoiser, low, high)
    x0 = sample_continuous(denoiser, process, shape, rng, sampler=sampler, steps=steps, **options)
    return to_image_range(x0, config.data)


def _clipped(denoiser: Denoiser, low: float, high: float, x: Array, sigma: Array) -> Array:
    return jnp.clip(denoiser(x, sigma), low, high)


def sample_images(config: ml_collections.ConfigDict, model, params, rng: Array, num: int, *, labels=None) -> Array:
    """[num, H, W, C] float32 samples in [-1, 1] of a continuous-time model with `config.sampling`'s sampler,
    steps (0: the sampler's default), options, guidance and clipping; labels int [num] for conditional models."""
    process = process_from_config(config.diffusion)
    sc = config.sampling
    denoiser = model_denoiser(config, model, params, process, labels=labels, guidance=sc.guidance)
    shape = (num, config.model.image_size, config.model.image_size, config.model.in_channels)
    steps = None if sc.sampler == "ode" else (sc.steps or None)
    return sample_in_image_range(config, denoiser, process, shape, rng, sampler=sc.sampler, steps=steps,
                                 **sampler_options(sc.sampler, sc))  # fmt: skip
