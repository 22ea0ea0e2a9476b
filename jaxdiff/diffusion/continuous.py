"""A continuous-time model from its config: the noise process of `config.diffusion`, and the network of
`config.model` as EDM's denoiser D(x; σ) (x = x_0 + σ·n, σ float32 [B]) through its parameterisation:

  eps    an ε-model of a VP/sub-VP process: labels t·999, sees x_t = α(t)·x (score_sde's DDPM++ cont.);
  score  a score model: labels σ, output divided by σ (score_sde's NCSN++ cont. with scale_by_sigma);
  edm    EDM's preconditioning with config.diffusion.sigma_data: labels c_noise = ln(σ)/4;
and on the flow processes (flow, gvp) a `jaxdiff.diffusion.flow.FlowModel` of the network, which sees the state
x_t and labels t·config.diffusion.time_scale and predicts velocity, x0, eps or v (`flow_output`). With
config.diffusion.time_reversed the network runs in SiT's time τ = 1 − t (τ = 0 noise, 1 data; the same state
x_t = α(t)·x_0 + σ(t)·ε): it sees labels (1 − t)·time_scale and its velocity is dx/dτ = −dx/dt, so a velocity
prediction is negated (x0, eps and v do not depend on the direction of time) (`flow_network`).

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
from jaxdiff.diffusion.flow import FlowModel
from jaxdiff.diffusion.guidance import guided_denoiser
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.processes import FLOW_PROCESSES, FlowProcess, make_process

Array = jax.Array
Denoiser = Callable[[Array, Array], Array]

PARAMETERIZATIONS = ("eps", "score", "edm")
CONTINUOUS_LOSSES = ("dsm", "edm")
FLOW_LOSSES = ("flow_matching",)  # the flow processes' loss (`jaxdiff.diffusion.losses.flow_matching_loss`)


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
    elif name in FLOW_PROCESSES:
        params = {}
    else:
        raise ConfigError(f"diffusion.process={name!r} is not a continuous process")
    return make_process(name, **params)


def network_denoiser(net_fn, diffusion_config: ml_collections.ConfigDict, process) -> Denoiser:
    """D(x; σ) of `net_fn(x, labels) -> output` by `config.diffusion.parameterization` (module docstring); on a flow
    process the `FlowModel` of net_fn(x_t, t·time_scale)."""
    kind = diffusion_config.parameterization
    if isinstance(process, FlowProcess):
        return FlowModel(flow_network(net_fn, diffusion_config), process, kind)
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

    def denoise(params, x, sigma, class_labels):
        net_fn = network_fn(model, params, class_labels, train=train, dropout_rng=dropout_rng)
        return network_denoiser(net_fn, config.diffusion, process)(x, sigma)

    return denoise


def network_fn(model, params, class_labels, *, train: bool = False, dropout_rng: Array | None = None) -> Callable:
    """`net_fn(x, labels) -> float32 output` of the network `model` with `params` and class_labels (int [B] or
    None); with train=True dropout draws from `dropout_rng`."""
    rngs = {"dropout": dropout_rng} if train else None

    def net_fn(x, labels):
        return model.apply({"params": params}, x, labels, class_labels, train=train, rngs=rngs).astype(jnp.float32)

    return net_fn


def flow_network(net_fn, diffusion_config: ml_collections.ConfigDict) -> Callable:
    """`output(x_t, t)`: the prediction (config.diffusion.parameterization) in the flow processes' time t (float32
    [B], 1 = noise) of `net_fn(x_t, labels)`: net_fn(x_t, t·time_scale), or with time_reversed (SiT's time τ =
    1 − t) net_fn(x_t, (1 − t)·time_scale), negated for a velocity (module docstring)."""
    scale = diffusion_config.time_scale
    if not diffusion_config.time_reversed:
        return lambda x_t, t: net_fn(x_t, scale * t)
    sign = -1.0 if diffusion_config.parameterization == "velocity" else 1.0
    return lambda x_t, t: sign * net_fn(x_t, scale * (1.0 - t))


def flow_output(config: ml_collections.ConfigDict, model, *, train: bool = False,
                dropout_rng: Array | None = None) -> Callable:  # fmt: skip
    """`output(params, x_t, t, class_labels)`: the network's prediction (config.diffusion.parameterization) at the
    state x_t [B, ...] of a flow process and its time t float32 [B] (`flow_network`)."""

    def output(params, x_t, t, class_labels):
        net_fn = network_fn(model, params, class_labels, train=train, dropout_rng=dropout_rng)
        return flow_network(net_fn, config.diffusion)(x_t, t)

    return output


def model_denoiser(config: ml_collections.ConfigDict, model, params, process, *, labels=None,
                   guidance: float = 0.0) -> Denoiser:  # fmt: skip
    """D(x; σ) of a trained model (dropout off), labels and guidance as `guided_call` (guidance applied to x̂_0)."""
    return guided_call(config, conditioned_denoiser(config, model, process), params, labels=labels, guidance=guidance)


def guided_call(config: ml_collections.ConfigDict, fn, params, *, labels=None, guidance: float = 0.0) -> Callable:
    """`call(a, b)` of `fn(params, a, b, class_labels)`, a network of `config` (e.g. a denoiser's (x, σ) or a flow
    model's (x_t, t)). Unconditional models take no labels and no guidance; class-conditional ones int labels [B]
    (None: the null label, unconditional) and a classifier-free guidance scale w >= 0 applied to the output
    through `jaxdiff.diffusion.guidance`, on its first config.sampling.guidance_channels channels (0: all; the
    others conditional, as SiT's and DiT's forward_with_cfg guide 3 of 4 latent channels). Every prediction is
    affine per element in any other at fixed (a, b), so guiding some channels of one guides those of all alike."""
    num_classes = config.model.num_classes
    if num_classes == 0:
        if labels is not None:
            raise UsageError("class labels were given but the model is unconditional (num_classes=0)")
        if guidance:
            raise UsageError(f"guidance={guidance} needs a class-conditional model; this one has num_classes=0")
        return lambda a, b: fn(params, a, b, None)
    if labels is None:
        if guidance:
            raise UsageError(f"guidance={guidance} needs class labels to guide towards")
        return lambda a, b: fn(params, a, b, None)
    return guided_denoiser(fn, params, labels, guidance=guidance, null_label=num_classes,
                           channels=config.sampling.guidance_channels)  # fmt: skip
