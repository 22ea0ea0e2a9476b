"""Latent, text-conditioned diffusion training: the pure parts (parameters, loss, jitted step, sample grids).

One step on a batch {"image": uint8 [B, H, W, 3], "input_ids": int32 [B, L]}:
images -> [-1, 1] -> latents z_0 = (a sample of q(z | x) − shift_factor)·scaling_factor of the frozen
autoencoder, computed on the fly and not differentiated -> each caption replaced by the empty prompt with
probability `caption_dropout` (for classifier-free guidance) -> text transformer (trained jointly, or frozen)
-> context = its last hidden state [B, L, D] -> t ~ U{0..T-1}, ε ~ N(0, I), z_t = q_sample(z_0, t, ε) ->
U-Net(z_t, t, context) -> the DDPM mse loss on ε, x_0 or v (`diffusion.mean_type`) -> gradient ->
global-norm clip, Adam with warmup (`jaxdiff.training.step.make_optimizer`) -> EMA.

The trained parameters are {"unet": ..., "text": ...} ("text" only when the text transformer is trained);
the autoencoder's (and a frozen text encoder's) parameters are constants of the step. Every random draw of
step s comes from fold_in(state.rng, s); a step whose loss or gradient is not finite changes nothing and is
counted, as in `jaxdiff.training.step`.

SDXL (`networks.sdxl` set, always with LoRA): both frozen text encoders read the captions (input_ids int32
[B, 2, L], one row per tokenizer) and the U-Net is conditioned as diffusers' train_text_to_image_lora_sdxl.py
conditions it (`conditioning`): the context concatenates each encoder's penultimate hidden state, and the added
conditioning is text_encoder_2's projected pooled output with the batch's "time_ids" float32 [B, 6]
(original_size + crops_coords_top_left + target_size, `sdxl_time_ids`).

LoRA (`networks.lora_scale` set): the U-Net is frozen too (`frozen["unet"]`, float32 or bfloat16) and the
trained parameters are only its adapters, {"lora": {module path: {"down": [r, in(, kh, kw)], "up": [out,
r(, 1, 1)]}}} in PyTorch layout as peft keeps them; each step runs the U-Net with every adapted kernel
W + (alpha / r)·up @ down (`lora_unet_params`, float32). The adapters being the whole trained tree, Adam and the
EMA see nothing else (no masking).

DreamBooth's prior preservation (`make_latent_train_step(..., prior_weight=w)`): the batch's B instance rows and
its B class rows run as one batch of 2B (`with_class_half`: latents, caption dropout, t and ε drawn for all 2B),
and the loss is mean(instance losses) + w·mean(class losses) (`prior_preservation_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import math
import os
import pathlib

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdiff import diffusion
from jaxdiff.diffusion.scheduler_config import SchedulerSettings
from jaxdiff.latent.component_weights import torch_shape
from jaxdiff.latent.lora import COMPONENTS, factors_delta, module_table
from jaxdiff.latent.pipeline import decode_latents, encode_to_latents, guided_latent_denoiser
from jaxdiff.latent.prompt_conditioning import Conditioning, PromptEncoder
from jaxdiff.latent.schedulers import denoise, step_plan, visited_timesteps
from jaxdiff.schedule import Schedule, schedule_from_config
from jaxdiff.training.step import (
    TrainState,
    apply_gradients,
    learning_rate_schedule,
    new_train_state,
    preprocess,
    seed_keys,
)
from jaxdiff.weights.lora_files import LoraFile, LoraModule
from jaxdiff.weights.matching import ParamPath

Array = jax.Array

# How the steps of a trained run are placed for sampling: "trailing" starts at step T−1 (pure noise).
RUN_TIMESTEP_SPACING = "trailing"


class LatentNetworks(NamedTuple):
    """The modules of a latent model: `vae_config` holds scaling_factor and shift_factor; `train_text` whether
    the text transformer is trained; `frozen` the parameters that are not ({"vae": ...} and, for a pretrained
    text encoder, "text"; for a LoRA run "unet", for SDXL "text" and "text_2"; only the loss and the
    sampler read them); `lora_scale` alpha / r of a LoRA run, None otherwise; `sdxl` the `PromptEncoder` of an
    SDXL run's two frozen text encoders, None otherwise."""

    unet: Any
    text: Any
    vae: Any
    vae_config: ml_collections.ConfigDict
    train_text: bool
    frozen: dict
    lora_scale: float | None = None
    sdxl: PromptEncoder | None = None


def text_context(networks: LatentNetworks, params: dict, input_ids: Array) -> Array:
    """The text transformer's last hidden state [B, L, D] for token ids [B, L] (no padding mask, as SD pipelines)."""
    text_params = params["text"] if networks.train_text else networks.frozen["text"]
    return networks.text.apply({"params": text_params}, input_ids).last_hidden_state


def conditioning(networks: LatentNetworks, params: dict, input_ids: Array,
                 time_ids: Array | None = None) -> Array | Conditioning:  # fmt: skip
    """What the U-Net is conditioned on: `text_context` of input_ids [B, L]; for SDXL, of input_ids [B, 2, L] (the
    two tokenizers' ids) and time_ids float32 [B, 6], `Conditioning(context [B, L, D1 + D2], {"text_embeds":
    [B, P], "time_ids"})` from the frozen encoders as the SDXL pipeline encodes prompts (clip_skip 0)."""
    if networks.sdxl is None:
        return text_context(networks, params, input_ids)
    ids = {"text": input_ids[:, 0], "text_2": input_ids[:, 1]}
    context, pooled = networks.sdxl._encode_ids(networks.frozen, ids, 0)
    return Conditioning(context, {"text_embeds": pooled, "time_ids": time_ids})


def apply_unet(networks: LatentNetworks, weights: dict, x: Array, t: Array, cond: Array | Conditioning) -> Array:
    """The U-Net's output at latents x [B, h, w, C], steps t [B] under `conditioning`'s `cond`."""
    if isinstance(cond, Conditioning):
        return networks.unet.apply({"params": weights}, x, t, cond.context, added_cond=cond.added_cond)
    return networks.unet.apply({"params": weights}, x, t, cond)


def sdxl_time_ids(original_sizes: np.ndarray, size: int) -> np.ndarray:
    """SDXL's time ids float32 [B, 6] of images of original (height, width) `original_sizes` int [B, 2] trained at
    size×size, as diffusers' train_text_to_image_lora_sdxl.py computes them with its centre crop: the shorter
    side resized to `size` (the longer to int(size·long / short), torchvision's rule), the crop's top-left
    (round((h' − size) / 2), round((w' − size) / 2)), then original_size + crops_coords_top_left + (size, size)."""
    sizes = np.asarray(original_sizes, np.int64)
    short = sizes.min(axis=1, keepdims=True)
    resized = np.where(sizes == short, size, (size * sizes) // short)
    top_left = np.maximum(0, np.round((resized - size) / 2.0)).astype(np.int64)
    target = np.full_like(sizes, size)
    return np.concatenate([sizes, top_left, target], axis=1).astype(np.float32)


def drop_captions(input_ids: Array, empty_ids: Array, dropped: Array) -> Array:
    """input_ids [B, ...] with the rows where `dropped` [B] (bool) holds replaced by the empty prompt's ids [...]."""
    return jnp.where(dropped.reshape(-1, *(1,) * empty_ids.ndim), empty_ids[None], input_ids)


def unet_params(networks: LatentNetworks, params: dict) -> dict:
    """The U-Net weights to run with: params["unet"], or for a LoRA run the frozen U-Net with the adapters
    params["lora"] added (`lora_unet_params`)."""
    if networks.lora_scale is None:
        return params["unet"]
    return lora_unet_params(networks.frozen["unet"], params["lora"], networks.lora_scale)


def latent_loss(networks: LatentNetworks, schedule: Schedule, diffusion_config, params: dict, z_0: Array,
                input_ids: Array, t: Array, noise: Array, time_ids: Array | None = None) -> Array:  # fmt: skip
    """Mean over the batch of `latent_losses`."""
    return jnp.mean(latent_losses(networks, schedule, diffusion_config, params, z_0, input_ids, t, noise, time_ids))


def latent_losses(networks: LatentNetworks, schedule: Schedule, diffusion_config, params: dict, z_0: Array,
                  input_ids: Array, t: Array, noise: Array, time_ids: Array | None = None) -> Array:  # fmt: skip
    """The DDPM mse loss float32 [B] of each example (mean over its elements) of the U-Net at
    z_t = q_sample(z_0, t, noise) given the captions' `conditioning`; z_0 [B, h, w, C] latents, input_ids int32
    [B, L] (SDXL: [B, 2, L] and time_ids [B, 6]), t int32 [B] (0-based, 0..T-1)."""
    cond = conditioning(networks, params, input_ids, time_ids)
    z_t = diffusion.q_sample(schedule, z_0, t, noise)
    output = apply_unet(networks, unet_params(networks, params), z_t, t, cond)
    losses = diffusion.training_losses(
        schedule, output.astype(jnp.float32), x_start=z_0, x_t=z_t, t=t, noise=noise,
        mean_type=diffusion_config.mean_type, var_type="fixedlarge", loss_type="mse",
        min_snr_gamma=diffusion_config.min_snr_gamma,
    )  # fmt: skip
    return losses


def make_latent_loss_fn(networks: LatentNetworks, schedule: Schedule, diffusion_config, *, caption_dropout: float,
                        empty_ids: np.ndarray) -> Callable:  # fmt: skip
    """loss(params, images uint8 [B,H,W,3], input_ids int32 [B,L] (SDXL [B,2,L]), rng, time_ids=None (SDXL
    [B,6])) -> float32 scalar: the mean over the batch of `make_latent_losses_fn`'s losses."""
    losses_fn = make_latent_losses_fn(networks, schedule, diffusion_config, caption_dropout=caption_dropout,
                                      empty_ids=empty_ids)  # fmt: skip

    def loss_fn(params, images, input_ids, rng, time_ids=None):
        return jnp.mean(losses_fn(params, images, input_ids, rng, time_ids))

    return loss_fn


def make_latent_losses_fn(networks: LatentNetworks, schedule: Schedule, diffusion_config, *,
                          caption_dropout: float, empty_ids: np.ndarray) -> Callable:  # fmt: skip
    """losses(params, images uint8 [B,H,W,3], input_ids int32 [B,L] (SDXL [B,2,L]), rng, time_ids=None (SDXL
    [B,6])) -> float32 [B]: the latents, the caption dropout, t and ε are drawn from `rng`, then
    `latent_losses`; `empty_ids` [L] ([2, L]) are the empty prompt's."""
    empty = jnp.asarray(empty_ids, jnp.int32)

    def losses_fn(params, images, input_ids, rng, time_ids=None):
        encode_rng, drop_rng, t_rng, noise_rng = jax.random.split(rng, 4)
        z_0 = encode_to_latents(networks.vae, networks.vae_config, networks.frozen["vae"], preprocess(images, None),
                                encode_rng)  # fmt: skip
        z_0 = jax.lax.stop_gradient(z_0)
        dropped = jax.random.bernoulli(drop_rng, caption_dropout, (images.shape[0],))
        t = jax.random.randint(t_rng, (images.shape[0],), 0, schedule.num_timesteps, dtype=jnp.int32)
        noise = jax.random.normal(noise_rng, z_0.shape, jnp.float32)
        return latent_losses(networks, schedule, diffusion_config, params, z_0,
                             drop_captions(input_ids, empty, dropped), t, noise, time_ids)  # fmt: skip

    return losses_fn


def prior_preservation_loss(losses: Array, weight: float) -> tuple[Array, dict]:
    """DreamBooth's loss of per-example losses [2B], the B instance examples first, then their B class examples
    (diffusers' train_dreambooth_lora.py): (mean(instance) + weight·mean(class), {"loss_instance", "loss_prior"})."""
    instance, prior = jnp.split(losses, 2)
    parts = {"loss_instance": jnp.mean(instance), "loss_prior": jnp.mean(prior)}
    return parts["loss_instance"] + weight * parts["loss_prior"], parts


def with_class_half(batch: dict) -> tuple[Array, Array, Array | None]:
    """(images [2B, ...], input_ids [2B, ...], time_ids [2B, 6] or None) of a prior-preservation batch: the
    instance rows ("image", "input_ids", "time_ids") followed by the class rows ("class_" + each)."""
    both = [None if batch.get(key) is None else jnp.concatenate([batch[key], batch["class_" + key]])
            for key in ("image", "input_ids", "time_ids")]  # fmt: skip
    return tuple(both)


def make_latent_train_step(loss_fn: Callable, training: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                           *, prior_weight: float | None = None) -> Callable:  # fmt: skip
    """train_step(state: TrainState, batch) -> (state, metrics); batch = {"image": uint8 [B,H,W,3],
    "input_ids": int32 [B,L]} (SDXL: [B,2,L] and "time_ids" float32 [B,6]). metrics: loss, grad_norm, learning_rate, skipped_updates, nonfinite_streak.
    With `prior_weight` (DreamBooth's prior preservation), `loss_fn` is `make_latent_losses_fn`'s per-example
    losses, the batch also holds "class_image", "class_input_ids" (and "class_time_ids") [B, ...], the step
    runs on all 2B rows (`with_class_half`) with `prior_preservation_loss`, and metrics add its two parts."""
    lr_schedule = learning_rate_schedule(training)
    decay = training.ema_decay

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        if prior_weight is None:
            loss, grads = jax.value_and_grad(loss_fn)(state.params, batch["image"], batch["input_ids"], rng,
                                                      batch.get("time_ids"))  # fmt: skip
            return apply_gradients(state, loss, grads, tx, ema_decay=decay, lr_schedule=lr_schedule)
        images, input_ids, time_ids = with_class_half(batch)

        def combined(params):
            return prior_preservation_loss(loss_fn(params, images, input_ids, rng, time_ids), prior_weight)

        (loss, parts), grads = jax.value_and_grad(combined, has_aux=True)(state.params)
        state, metrics = apply_gradients(state, loss, grads, tx, ema_decay=decay, lr_schedule=lr_schedule)
        return state, {**metrics, **parts}

    return train_step


def init_latent_params(networks: LatentNetworks, rng: Array, latent_shape: tuple[int, int, int], text_length: int,
                       unet_params: dict | None = None) -> dict:  # fmt: skip
    """Trained parameters {"unet"[, "text"]}: fresh from `rng`, or the U-Net's from `unet_params` (fine-tuning)."""
    unet_rng, text_rng = jax.random.split(rng)
    ids = jnp.zeros((1, text_length), jnp.int32)
    params = {}
    if networks.train_text:
        params["text"] = networks.text.init(text_rng, ids)["params"]
    if unet_params is None:
        z = jnp.zeros((1, *latent_shape), jnp.float32)
        context = jnp.zeros((1, text_length, networks.unet.cross_attention_dim), jnp.float32)
        unet_params = networks.unet.init(unet_rng, z, jnp.zeros((1,), jnp.int32), context)["params"]
    params["unet"] = jax.tree.map(jnp.asarray, unet_params)
    return params


def init_latent_state(networks: LatentNetworks, tx: optax.GradientTransformation, seed: int,
                      latent_shape: tuple[int, int, int], text_length: int,
                      unet_params: dict | None = None) -> TrainState:  # fmt: skip
    """A fresh `TrainState` from `seed` (split by `jaxdiff.training.step.seed_keys`); the EMA starts as a copy."""
    init_rng, run_rng = seed_keys(seed)
    params = init_latent_params(networks, init_rng, latent_shape, text_length, unet_params)
    return new_train_state(params, jax.tree.map(jnp.copy, params), tx, run_rng)


def run_scheduler(diffusion_config) -> SchedulerSettings:
    """How a trained run samples: its training schedule and mean type, steps placed "trailing" (from T−1), and
    DDIM's last step going to ᾱ = 1."""
    settings = {"timestep_spacing": RUN_TIMESTEP_SPACING, "steps_offset": 0, "set_alpha_to_one": True}
    return SchedulerSettings(schedule_from_config(diffusion_config), diffusion_config.mean_type,
                             RUN_TIMESTEP_SPACING, 0, True, settings)  # fmt: skip


def make_grid_sampler(networks: LatentNetworks, scheduler: SchedulerSettings, prompt_ids: np.ndarray,
                      empty_ids: np.ndarray, latent_shape: tuple[int, int, int], *, sampler: str, steps: int,
                      guidance: float, time_ids: np.ndarray | None = None,
                      zero_uncond: bool = False) -> Callable:  # fmt: skip
    """sample_grid(params, rng) -> float32 [N, H, W, 3] in [-1, 1]: one image per prompt (ids [N, L]; SDXL [N, 2, L]
    with `time_ids` [6] for every image) drawn by `sampler` in `steps` steps with guidance as
    `LatentPipeline.text_to_image` (uncond + g·(cond − uncond), the conditional model alone for g <= 1; the
    unconditional context and text_embeds zeros with `zero_uncond`, SDXL's force_zeros_for_empty_prompt),
    decoded by the autoencoder. The initial latents are N(0, I) from the first half of split(rng), the
    sampler's draws from the second."""
    timesteps = visited_timesteps(scheduler, steps)
    plan = step_plan(scheduler, timesteps)
    increasing = jnp.asarray(timesteps[::-1].copy(), jnp.int32)
    prompts = jnp.asarray(prompt_ids, jnp.int32)
    empty = jnp.broadcast_to(jnp.asarray(empty_ids, jnp.int32), prompts.shape)
    times = None if time_ids is None else jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32),
                                                           (prompts.shape[0], len(time_ids)))  # fmt: skip

    def sample_grid(params: dict, rng: Array) -> Array:
        cond = conditioning(networks, params, prompts, times)
        if zero_uncond:
            uncond = Conditioning(jnp.zeros_like(cond.context), {"text_embeds": jnp.zeros_like(
                cond.added_cond["text_embeds"]), "time_ids": times})  # fmt: skip
        else:
            uncond = conditioning(networks, params, empty, times)
        weights = unet_params(networks, params)

        def unet(x, t, c):
            return apply_unet(networks, weights, x, t, c)

        noise_rng, loop_rng = jax.random.split(rng)
        x_start = jax.random.normal(noise_rng, (prompts.shape[0], *latent_shape), jnp.float32)
        fn = guided_latent_denoiser(unet, cond, uncond, guidance, increasing)
        latents = denoise(fn, plan, x_start, loop_rng, sampler=sampler)
        decoded = decode_latents(networks.vae, networks.vae_config, networks.frozen["vae"], latents)
        return jnp.clip(decoded.astype(jnp.float32), -1.0, 1.0)

    return sample_grid


# --------------------------------------------------------------------------- LoRA adapters of a frozen U-Net


def lora_targets(shapes: dict[ParamPath, tuple[int, ...]], target_modules: tuple[str, ...],
                 component: str = "unet") -> dict[ParamPath, str]:  # fmt: skip
    """The kernels LoRA adapts, path -> diffusers module name, of a U-Net (with component "transformer": an SD3 /
    Flux transformer) of parameter shapes `shapes` (path -> shape, e.g. `unet_condition_shapes`): those whose
    module name is a target or ends with "." + a target (peft's `target_modules` matching, e.g. "to_out.0" matches
    "...attn1.to_out.0")."""
    table = module_table(flax.traverse_util.unflatten_dict(shapes), COMPONENTS[component][1], underscored=False)
    return {path: name for name, path in sorted(table.items())
            if any(is_target(name, target) for target in target_modules)}  # fmt: skip


def is_target(name: str, target: str) -> bool:
    """Whether the module `name` is `target` or ends with "." + `target` (peft's `target_modules` matching)."""
    return name == target or name.endswith("." + target)


def init_lora_params(rng: Array, shapes: dict[ParamPath, tuple[int, ...]], targets, rank: int) -> dict:
    """Fresh adapters of the kernels `targets` (paths into a U-Net of parameter shapes `shapes`): {module path:
    {"down": [r, in] or [r, in, kh, kw], "up": [out, r] or [out, r, 1, 1]}}, float32, PyTorch layout. As peft's
    default: down Kaiming-uniform (torch's kaiming_uniform_ with a = √5: U(−b, b), b = 1/√(in·kh·kw)), drawn
    from fold_in(rng, i) for the i-th path in sorted order, and up zeros, so that every ΔW is 0 at first."""
    flat = {}
    for index, path in enumerate(sorted(targets)):
        out, *fan = torch_shape(path, shapes[path])
        bound = 1.0 / math.sqrt(math.prod(fan))
        down = jax.random.uniform(jax.random.fold_in(rng, index), (rank, *fan), jnp.float32, -bound, bound)
        flat[(*path[:-1], "down")] = down
        flat[(*path[:-1], "up")] = jnp.zeros((out, rank) + (1, 1) * (len(fan) == 3), jnp.float32)
    return flax.traverse_util.unflatten_dict(flat)


def lora_unet_params(base: dict, adapters: dict, scale: float) -> dict:
    """The U-Net (or SD3 / Flux transformer) parameters `base` (float32 or bfloat16) as float32 with each adapted
    kernel W replaced by W + scale·ΔW, ΔW = up @ down of its adapters (`init_lora_params`' tree) in our layout
    (`factors_delta`: dense [in, out], conv HWIO); pure, for the jitted step."""
    flat = {path: leaf.astype(jnp.float32) for path, leaf in flax.traverse_util.flatten_dict(base).items()}
    factors = flax.traverse_util.flatten_dict(adapters)
    for path in factors:
        if path[-1] == "down":
            kernel = (*path[:-1], "kernel")
            delta = factors_delta(factors[path], factors[(*path[:-1], "up")], flat[kernel].shape)
            flat[kernel] = flat[kernel] + scale * delta
    return flax.traverse_util.unflatten_dict(flat)


def init_lora_state(tx: optax.GradientTransformation, seed: int, shapes: dict[ParamPath, tuple[int, ...]], targets,
                    rank: int) -> TrainState:  # fmt: skip
    """A fresh LoRA `TrainState` from `seed`: params {"lora": `init_lora_params`}, the EMA a copy of them."""
    init_rng, run_rng = seed_keys(seed)
    params = {"lora": init_lora_params(init_rng, shapes, targets, rank)}
    return new_train_state(params, jax.tree.map(jnp.copy, params), tx, run_rng)


def trained_lora(adapters: dict, scale: float, path: str | os.PathLike, component: str = "unet") -> LoraFile:
    """A LoRA run's adapters (params["lora"]) as the contents of a LoRA file (`jaxdiff.weights.lora_files`):
    `component` ("unet", or "transformer" for SD3 / Flux), each module by its diffusers name, factors float32
    NumPy in PyTorch layout, `scale` = alpha / r, keys the peft names (`<component>.<module>.lora_A.weight` /
    `.lora_B.weight`); `path` says where they come from (the run's workdir)."""
    names = COMPONENTS[component][1]
    factors = flax.traverse_util.flatten_dict(adapters)
    modules = {}
    for key in sorted(factors):
        if key[-1] == "down":
            name = names((*key[:-1], "kernel"))[0].removesuffix(".weight")
            down, up = (np.asarray(factors[(*key[:-1], role)], np.float32) for role in ("down", "up"))
            keys = (f"{component}.{name}.lora_A.weight", f"{component}.{name}.lora_B.weight")
            modules[component, name] = LoraModule(down, up, float(scale), keys)
    return LoraFile(pathlib.Path(path), modules, underscored=False)
