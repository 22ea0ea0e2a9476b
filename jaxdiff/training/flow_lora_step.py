"""LoRA training of a frozen SD3 (`jaxdiff.models.mmdit.MMDiT`) or Flux (`jaxdiff.models.flux.FluxTransformer`)
transformer by flow matching, as diffusers' train_dreambooth_lora_sd3.py / train_dreambooth_lora_flux.py train it:
the pure loss, the jitted (optionally FSDP-sharded) step and the written LoRA file.

One step on a batch of precomputed inputs {"latents": float32 [B, h, w, 16] NHWC in the transformer's scale,
(z − shift_factor)·scaling_factor of the autoencoder's latents z; "prompt_embeds": [B, L, D] and "pooled": [B, P]
of the frozen text encoders, run before the step and not part of it}: t ~ `sample_t` (uniform, logit-normal or
SD3's mode density, then the shift), ε ~ N(0, I), x_t = (1 − t)·x_0 + t·ε (t is the noise level σ of diffusers'
scripts: 0 data, 1 noise), the velocity prediction v̂ of the transformer with every targeted kernel
W + lora_scale·up @ down (`lora_unet_params`), and the loss mean(w(t)·(v̂ − (ε − x_0))²) over every element of
the batch, with w diffusers' `compute_loss_weighting_for_sd3`: "none" 1, "sigma_sqrt" t⁻², "cosmap"
2 / (π·(1 − 2t + 2t²)). With `precondition_outputs` (the SD3 script's option, on there by default; the Flux
script has none) the prediction is x̂_0 = x_t − t·v̂ against the target x_0, i.e. the same loss weighted by t².

The network's inputs: SD3's MMDiT takes the timestep 1000·t; Flux's transformer takes t in [0, 1] and the latents
packed 2×2 into tokens (`pack_latents`, img_ids `latent_image_ids`, txt_ids zeros [L, 3]), its output unpacked
back to [B, h, w, 16]; a guidance-distilled Flux (guidance_embeds, Flux.1-dev) gets the constant `guidance` for
every example (the Flux script's --guidance_scale, 3.5 by default).

Where ours deviates from the scripts: t is drawn continuously in [0, 1] and shifted by `shift_time`, where the
scripts index their scheduler's 1000 shifted training sigmas (descending from 1) by ⌊1000·u⌋, so that their σ
is the shift of ≈ 1 − u. The mode density is symmetric about 1/2 (1 − f(u) = f(1 − u)), so it is the same
distribution; the logit-normal too for logit_mean 0 (their default), while for a mean m theirs is the logit-normal
of mean −m and ours the SD3 paper's t = sigmoid(m + s·n). The shift is the scheduler's: SD3's folders give
shift 3; Flux's scheduler (use_dynamic_shifting) leaves its training sigmas unshifted, shift 1. diffusers' single
`weighting_scheme` picks both the t density and the weighting ("sigma_sqrt" and "cosmap" draw t uniformly); here
they are two settings, so each of its choices is one pair. A zero t under "sigma_sqrt" gives an infinite weight:
the guarded step skips it (`apply_gradients`).

Every random draw of step s comes from fold_in(state.rng, s): t from the first key of split(rng), ε from the
second. The trained parameters are {"lora": `init_lora_params`' adapters}; the frozen transformer's parameters
are an argument of the step, not a constant, so that on a mesh they are split over "fsdp" like the state
(`shard_flow_lora_step`).
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
import safetensors.numpy
from jax.sharding import Mesh

from jaxdiff.checks import is_int, is_real
from jaxdiff.diffusion.flow import check_time_sampling, sample_t
from jaxdiff.errors import UsageError
from jaxdiff.models.flux import FluxTransformer, latent_image_ids, pack_latents, unpack_latents
from jaxdiff.models.mmdit import MMDiT
from jaxdiff.sharding import DEFAULT_MIN_SHARDED_SIZE, batch_sharding, replicated_sharding, state_sharding
from jaxdiff.training.latent_step import lora_unet_params, make_latent_train_step, trained_lora
from jaxdiff.training.step import TrainState
from jaxdiff.weights.lora_files import LORA_WEIGHTS_FILE, peft_file_contents

Array = jax.Array

FAMILIES = {"sd3": MMDiT, "flux": FluxTransformer}
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
SD3_TIME_SCALE = 1000.0  # SD3's MMDiT takes 1000·t (diffusers' scheduler timesteps)
COMPONENT = "transformer"  # the LoRA file's component of SD3's and Flux's transformer
CONDITIONING_KEYS = ("prompt_embeds", "pooled")  # the batch's text-encoder outputs, besides "latents"


def check_flow_loss_options(model, *, family: str, t_sampling: str, logit_mean: float, logit_std: float,
                            mode_scale: float, shift: float, weighting: str, lora_scale: float,
                            guidance: float | None, precondition_outputs: bool) -> None:  # fmt: skip
    """UsageError in one line naming the first setting that does not fit (see `make_flow_lora_loss_fn`)."""
    if family not in FAMILIES:
        raise UsageError(f"family={family!r} must be one of {tuple(FAMILIES)}")
    if not isinstance(model, FAMILIES[family]):
        raise UsageError(f"family={family!r} needs a {FAMILIES[family].__name__}, got {type(model).__name__}")
    check_time_sampling(t_sampling, logit_std=logit_std, mode_scale=mode_scale, shift=shift)
    if not is_real(logit_mean, finite=True):
        raise UsageError(f"logit_mean={logit_mean!r} must be a finite number")
    if weighting not in WEIGHTINGS:
        raise UsageError(f"weighting={weighting!r} must be one of {WEIGHTINGS}")
    if not (is_real(lora_scale, finite=True) and lora_scale > 0):
        raise UsageError(f"lora_scale={lora_scale!r} must be a number > 0 (alpha / r)")
    distilled = family == "flux" and model.guidance_embeds
    if distilled and not is_real(guidance, finite=True):
        raise UsageError(f"guidance={guidance!r}: this Flux transformer is guidance-distilled (guidance_embeds) and "
                         "needs a finite guidance scale (diffusers' training default 3.5)")  # fmt: skip
    if not distilled and guidance is not None:
        raise UsageError(f"guidance={guidance!r} must be None: this {family} transformer has no guidance embedder")
    if not isinstance(precondition_outputs, bool):
        raise UsageError(f"precondition_outputs={precondition_outputs!r} must be a bool")


def loss_weighting(weighting: str, t: Array) -> Array:
    """diffusers' `compute_loss_weighting_for_sd3` at the noise levels t [B]: "none" 1, "sigma_sqrt" t⁻²,
    "cosmap" 2 / (π·(1 − 2t + 2t²))."""
    if weighting == "sigma_sqrt":
        return t**-2.0
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))
    return jnp.ones_like(t)


def transformer_velocity(model, weights: dict, x_t: Array, t: Array, prompt_embeds: Array, pooled: Array,
                         guidance: float | None) -> Array:  # fmt: skip
    """The velocity v̂ float32 [B, h, w, C] of the SD3 or Flux transformer with parameters `weights` at NHWC
    latents x_t [B, h, w, C] and flow times t float32 [B] in [0, 1] (0 data, 1 noise); Flux packs and unpacks
    the latents around its network and gets guidance [B] = `guidance` when it is given."""
    if isinstance(model, MMDiT):
        return model.apply({"params": weights}, x_t, SD3_TIME_SCALE * t, prompt_embeds, pooled)
    height, width = x_t.shape[1:3]
    img_ids = latent_image_ids(height, width)
    txt_ids = jnp.zeros((prompt_embeds.shape[1], len(model.axes_dims_rope)), jnp.float32)
    scale = None if guidance is None else jnp.full(t.shape, guidance, jnp.float32)
    tokens = model.apply({"params": weights}, pack_latents(x_t), t, prompt_embeds, pooled, img_ids, txt_ids, scale)
    return unpack_latents(tokens, height, width)


def make_flow_lora_loss_fn(model, frozen_params: dict, *, family: str, t_sampling: str = "logit_normal",
                           logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                           shift: float = 1.0, weighting: str = "none", lora_scale: float,
                           guidance: float | None = None, precondition_outputs: bool = False) -> Callable:  # fmt: skip
    """loss(adapters, batch, rng) -> float32 scalar, the flow-matching loss of the module docstring.

    model: the SD3 MMDiT (family "sd3") or Flux transformer ("flux"); frozen_params its parameters (float32 or
    bfloat16, not trained); adapters {module path: {"down", "up"}} (`init_lora_params`) applied at `lora_scale`
    (alpha / r); batch {"latents" [B, h, w, 16] (transformer scale), "prompt_embeds" [B, L, D], "pooled" [B, P]}
    of the frozen text encoders. t: `sample_t(t_sampling, logit_mean, logit_std, mode_scale, shift)`; weighting
    "none" | "sigma_sqrt" | "cosmap"; guidance the scale a guidance-distilled Flux gets (None otherwise). Every
    setting is checked here (`check_flow_loss_options`)."""
    options = dict(t_sampling=t_sampling, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
                   shift=shift)  # fmt: skip
    check_flow_loss_options(model, family=family, weighting=weighting, lora_scale=lora_scale, guidance=guidance,
                            precondition_outputs=precondition_outputs, **options)  # fmt: skip

    def loss_fn(adapters: dict, batch: dict, rng: Array) -> Array:
        missing = [key for key in ("latents", *CONDITIONING_KEYS) if key not in batch]
        if missing or jnp.ndim(batch["latents"]) != 4:
            raise UsageError(f"the batch needs 'latents' [B, h, w, C], 'prompt_embeds' [B, L, D] and 'pooled' [B, P]; "
                             f"missing {missing}, latents of shape {jnp.shape(batch.get('latents'))}")  # fmt: skip
        x_0 = jnp.asarray(batch["latents"], jnp.float32)
        t_rng, noise_rng = jax.random.split(rng)
        t = sample_t(t_rng, x_0.shape[0], **options)
        noise = jax.random.normal(noise_rng, x_0.shape, jnp.float32)
        sigma = t.reshape(-1, 1, 1, 1)
        x_t = (1.0 - sigma) * x_0 + sigma * noise
        weights = lora_unet_params(frozen_params, adapters, lora_scale)
        velocity = transformer_velocity(model, weights, x_t, t, batch["prompt_embeds"], batch["pooled"], guidance)
        if precondition_outputs:
            prediction, target = x_t - sigma * velocity, x_0
        else:
            prediction, target = velocity, noise - x_0
        weight = loss_weighting(weighting, t).reshape(-1, 1, 1, 1)
        return jnp.mean(weight * (prediction - target) ** 2)

    return loss_fn


def make_flow_lora_train_step(model, training: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                              **loss_options) -> Callable:  # fmt: skip
    """train_step(state: TrainState, frozen_params, batch) -> (state, metrics) of a LoRA run (params {"lora"}):
    `make_flow_lora_loss_fn(model, frozen_params, **loss_options)` under `make_latent_train_step` (the draws from
    fold_in(state.rng, state.step), global-norm clip and Adam in `tx`, EMA `training.ema_decay`, non-finite steps
    skipped); batch as the loss's. metrics: loss, grad_norm, learning_rate, skipped_updates, nonfinite_streak."""
    make_flow_lora_loss_fn(model, {}, **loss_options)  # checks the options now rather than when traced

    def train_step(state: TrainState, frozen_params: dict, batch: dict) -> tuple[TrainState, dict]:
        loss_fn = make_flow_lora_loss_fn(model, frozen_params, **loss_options)

        def latent_loss(params, latents, conditioning, rng, _time_ids):
            return loss_fn(params["lora"], {"latents": latents, **conditioning}, rng)

        conditioning = {key: batch[key] for key in CONDITIONING_KEYS}
        step = make_latent_train_step(latent_loss, training, tx)
        return step(state, {"image": batch["latents"], "input_ids": conditioning})

    return train_step


def shard_flow_lora_step(train_step: Callable, state: TrainState, frozen_params: dict, mesh: Mesh | None = None, *,
                         min_size: int = DEFAULT_MIN_SHARDED_SIZE) -> tuple[Callable, TrainState, dict]:  # fmt: skip
    """(jitted step(state, frozen_params, batch), state, frozen_params) placed for `mesh`: without one, plain
    `jax.jit` and the trees as given; on a mesh, the state and the frozen parameters split by `state_sharding`
    (leaves of at least `min_size` elements over "fsdp"), the batch's rows over all the mesh's axes
    (`batch_sharding`: B must divide by the device count), the metrics replicated. The state is donated."""
    if mesh is None:
        return jax.jit(train_step, donate_argnums=0), state, frozen_params
    state_shardings = state_sharding(mesh, state, min_size=min_size)
    frozen_shardings = state_sharding(mesh, frozen_params, min_size=min_size)
    step = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated_sharding(mesh)), donate_argnums=0)  # fmt: skip
    return step, jax.device_put(state, state_shardings), jax.device_put(frozen_params, frozen_shardings)


def save_flow_lora(adapters: dict, folder: str | os.PathLike, *, rank: int, alpha: float,
                   target_modules: tuple[str, ...]) -> pathlib.Path:  # fmt: skip
    """Write trained transformer adapters as diffusers' `save_lora_weights` does: `folder`/pytorch_lora_weights
    .safetensors (the folder exists) with `transformer.<module>.lora_A.weight` (down [r, in]) and `.lora_B.weight`
    (up [out, r]), float32 PyTorch layout, and the peft LoraConfig (`transformer.r`, `transformer.lora_alpha`,
    `transformer.target_modules`) in the header's `lora_adapter_metadata`, so that readers take the scale
    alpha / r. Returns the file's path."""
    if not (is_int(rank) and rank > 0 and is_real(alpha, finite=True) and alpha > 0):
        raise UsageError(f"rank={rank!r} must be an int > 0 and alpha={alpha!r} a number > 0")
    path = pathlib.Path(folder) / LORA_WEIGHTS_FILE
    lora = trained_lora(adapters, alpha / rank, path, COMPONENT)
    tensors, metadata = peft_file_contents(lora, COMPONENT, rank, alpha, target_modules)
    safetensors.numpy.save_file(tensors, path, metadata=metadata)
    return path
