"""Stable Diffusion in JAX: text-to-image, image-to-image (SDEdit) and inpainting, step for step as diffusers'
`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline`.

    pipe = LatentPipeline.from_pretrained("stable-diffusion-v1-5")   # a diffusers Stable Diffusion folder
    images = pipe.text_to_image(["a photo of a cat"], steps=50, guidance=7.5)   # uint8 [1, 512, 512, 3]

Conventions: images are NHWC, uint8 in [0, 255] or float in [0, 1]; masks are [B, H, W] or [B, H, W, 1] with
values >= 0.5 (>= 128 for uint8) where the image is repainted. Latents are NHWC in the U-Net's scale
z = (vae_latent − shift_factor)·scaling_factor. Timesteps are the scheduler's 0-based training steps (0..T-1).

The steps visited are those of diffusers' DDIMScheduler for the folder's scheduler config (`timestep_spacing`
leading / trailing / linspace, `steps_offset`); the loop runs on the schedule respaced to those steps, so
jaxdiff's discrete samplers step between consecutive visited steps, and DDIM's last step ends at ᾱ = 1 or, without
`set_alpha_to_one`, at ᾱ of step 0, as diffusers' does. (diffusers' DDIMScheduler steps from t to t − T // steps,
which is the next visited step for "leading" spacing, and for "trailing" when steps divides T, but not always
otherwise; we always step to the next visited step.)
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert.stable_diffusion import (
    SchedulerSettings,
    StableDiffusion,
    read_pretrained,
)
from jaxdiff.models.autoencoder import create_autoencoder
from jaxdiff.models.clip_text import create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition
from jaxdiff.samplers import SAMPLERS, sample
from jaxdiff.schedule import Schedule, respace

Array = jax.Array
UNetFn = Callable[[Array, Array, Array], Array]  # (latents [B,h,w,C_in], timesteps [B], context [B,L,D]) -> output

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
OUTPUT_TYPES = ("uint8", "float")


# --------------------------------------------------------------------------- steps


def visited_timesteps(scheduler: SchedulerSettings, steps: int) -> np.ndarray:
    """The training steps diffusers' DDIMScheduler visits for `steps` inference steps, decreasing, int64:
    leading: k·(T // steps) + steps_offset; trailing: round(T − k·T/steps) − 1; linspace: round(linspace(0, T−1))."""
    num_train = scheduler.schedule.num_timesteps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train:
        raise ValueError(f"steps={steps!r} must be an int in [1, {num_train}]")
    if scheduler.timestep_spacing == "leading":
        increasing = np.arange(steps) * (num_train // steps) + scheduler.steps_offset
    elif scheduler.timestep_spacing == "trailing":
        increasing = np.round(np.arange(num_train, 0, -num_train / steps))[::-1] - 1
    else:
        increasing = np.round(np.linspace(0, num_train - 1, steps))
    increasing = increasing.astype(np.int64)
    if increasing[-1] >= num_train or np.any(np.diff(increasing) <= 0):
        raise ValueError(f"steps={steps} with steps_offset={scheduler.steps_offset} gives steps outside 0..{num_train - 1}")
    return increasing[::-1]


def img2img_timesteps(timesteps: np.ndarray, strength: float) -> np.ndarray:
    """The last int(steps·strength) of `timesteps`, where diffusers' image-to-image starts (SDEdit)."""
    kept = min(int(len(timesteps) * strength), len(timesteps))
    if kept < 1:
        raise ValueError(f"strength={strength} with steps={len(timesteps)} leaves no step: need steps·strength >= 1")
    return timesteps[len(timesteps) - kept :]


def add_noise(scheduler: SchedulerSettings, latents: Array, noise: Array, t: int) -> Array:
    """q(z_t | z_0): sqrt(ᾱ_t)·z_0 + sqrt(1 − ᾱ_t)·noise at training step t."""
    alpha_bar = scheduler.schedule.alphas_cumprod[t]
    return jnp.sqrt(alpha_bar) * latents + jnp.sqrt(1.0 - alpha_bar) * noise


# --------------------------------------------------------------------------- pure pieces


def guided_latent_denoiser(unet: UNetFn, cond: Array, uncond: Array, guidance: float, timesteps: Array,
                           condition: Array | None = None) -> Callable[[Array, Array], Array]:  # fmt: skip
    """`denoise_fn(x, i)` for the samplers: the U-Net output at latents x [B,h,w,C] and step index i [B] into
    `timesteps` (increasing training steps), guided as diffusers does: uncond + guidance·(cond − uncond) from
    one forward pass on [x; x] with contexts [uncond; cond] (only the conditional pass when guidance <= 1).
    `condition` [B,h,w,C'] (the inpainting U-Net's mask and masked-image latents) is appended to x's channels."""

    def denoise_fn(x: Array, i: Array) -> Array:
        t = timesteps[i]
        x_in = x if condition is None else jnp.concatenate([x, condition], axis=-1)
        if guidance <= 1:
            return unet(x_in, t, cond)
        both = unet(jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t]), jnp.concatenate([uncond, cond]))
        out_uncond, out_cond = jnp.split(both, 2)
        return out_uncond + guidance * (out_cond - out_uncond)

    return denoise_fn


def blended_denoiser(denoise_fn: Callable[[Array, Array], Array], mask: Array,
                     noised_image: Callable[[Array], Array], first_index: int) -> Callable[[Array, Array], Array]:  # fmt: skip
    """Latent-blending inpainting for a 4-channel U-Net: before each model call but the first, latents outside
    the mask (mask [B,h,w,1] of 0/1, 1 = repaint) are replaced by `noised_image(i)`, the image latents noised to
    step index i, as diffusers' pipeline does after each step. The samplers update each latent pixel from its
    own value and model output only, so inside the mask the state equals diffusers'; outside, it is replaced
    before every use (the caller puts the clean image latents there after the last step)."""

    def blended(x: Array, i: Array) -> Array:
        x_in = jnp.where((mask > 0.5) | (i[:, None, None, None] == first_index), x, noised_image(i))
        return denoise_fn(x_in, i)

    return blended


class StepPlan(NamedTuple):
    """The steps of one run, built outside jit: `timesteps` the decreasing training steps visited, `schedule`
    the training schedule respaced to them (index i <-> timesteps[::-1][i]), `final_alpha_bar` where DDIM's last
    step ends (1 with set_alpha_to_one, else ᾱ of step 0), `mean_type` the U-Net's prediction."""

    timesteps: np.ndarray
    schedule: Schedule
    final_alpha_bar: float
    mean_type: str


def step_plan(scheduler: SchedulerSettings, timesteps: np.ndarray) -> StepPlan:
    """The `StepPlan` of the decreasing training steps `timesteps` under `scheduler`."""
    alphas_cumprod = np.asarray(scheduler.schedule.alphas_cumprod, np.float64)
    final = 1.0 if scheduler.set_alpha_to_one else float(alphas_cumprod[0])
    return StepPlan(timesteps, respace(scheduler.schedule, timesteps[::-1]), final, scheduler.mean_type)


def denoise(denoise_fn: Callable[[Array, Array], Array], plan: StepPlan, x_start: Array, rng: Array, *,
            sampler: str) -> Array:  # fmt: skip
    """Run `sampler` from latents `x_start` at plan.timesteps[0] through all of plan.timesteps as one scan;
    `denoise_fn` gets step indices into plan.timesteps[::-1]. Returns the final latents: x̂_0, except for DDIM,
    which ends at ᾱ_final: x = sqrt(ᾱ_final)·x̂_0 + sqrt(1 − ᾱ_final)·ε̂ from its last state, as diffusers'
    DDIMScheduler does."""
    count = len(plan.timesteps)
    x0, frames = sample(
        denoise_fn, plan.schedule, tuple(x_start.shape), rng, sampler=sampler, steps=count, spacing="uniform",
        clip_denoised=False, var_type="fixedsmall", mean_type=plan.mean_type,
        return_trajectory=True, trajectory_every=max(count - 1, 1), x_T=x_start,
    )  # fmt: skip
    if sampler != "ddim":
        return x0
    last_state = frames[0] if count > 1 else x_start  # the state before the last step
    alpha_bar = float(np.cumprod(1.0 - np.asarray(plan.schedule.betas, np.float64))[0])
    eps = (last_state - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)
    return math.sqrt(plan.final_alpha_bar) * x0 + math.sqrt(1.0 - plan.final_alpha_bar) * eps


def encode_to_latents(vae, vae_config, vae_params, x: Array, rng: Array) -> Array:
    """Images x in [-1, 1] -> latents drawn from the posterior, in the U-Net's scale (z − shift_factor)·scaling_factor."""
    posterior = vae.apply({"params": vae_params}, x, method=vae.encode)
    return (posterior.sample(rng) - (vae_config.shift_factor or 0.0)) * vae_config.scaling_factor


def decode_latents(vae, vae_config, vae_params, latents: Array) -> Array:
    """Latents in the U-Net's scale -> the decoder's output (images, about [-1, 1], not clipped)."""
    z = latents / vae_config.scaling_factor + (vae_config.shift_factor or 0.0)
    return vae.apply({"params": vae_params}, z, method=vae.decode)


def to_pixels(decoded: Array) -> Array:
    """Decoder output in [-1, 1] -> float images in [0, 1] (clipped)."""
    return jnp.clip(decoded / 2.0 + 0.5, 0.0, 1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8, rounding as diffusers' `numpy_to_pil`."""
    return np.round(np.asarray(images) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- input checks


def _check_number(name: str, value, low: float, high: float, *, low_open: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    if not ok or (value <= low if low_open else value < low) or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be a number in {interval}")
    return float(value)


def _prompt_list(prompts, name: str) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompts!r}")
    return list(prompts)


def _image_array(images, name: str) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] NHWC (or one HWC image) -> float32 NHWC in [0, 1]."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{name} must be RGB images [B, H, W, 3] (NHWC), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got {array.dtype}")
    return array.astype(np.float32)


def _mask_array(masks, image_shape: tuple[int, ...]) -> np.ndarray:
    """Masks [B, H, W] or [B, H, W, 1] -> float32 [B, H, W, 1] of 0/1 (1 = repaint), as diffusers binarizes."""
    array = np.asarray(masks)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape != tuple(image_shape[:3]):
        raise ValueError(f"masks have shape {array.shape}; expected [B, H, W] = {tuple(image_shape[:3])} like images")
    threshold = 128 if array.dtype == np.uint8 else 0.5
    return (array >= threshold).astype(np.float32)[..., None]


# --------------------------------------------------------------------------- the pipeline


class LatentPipeline:
    """A loaded Stable Diffusion model: `text_to_image`, `image_to_image`, `inpaint` (see the module docstring)."""

    def __init__(self, model: StableDiffusion):
        self.model = model
        self.scheduler = model.scheduler
        self.unet = create_unet_condition(model.unet_config)
        self.vae = create_autoencoder(model.vae_config)
        self.text_encoder = create_clip_text(model.text_config)
        self.params = jax.device_put({"unet": model.unet_params, "vae": model.vae_params, "text": model.text_params})
        self.latent_factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
        self.latent_channels = model.vae_config.latent_channels
        self.inpainting_unet = model.unet_config.in_channels == 2 * self.latent_channels + 1
        self._compiled: dict[tuple, Callable] = {}
        self._encode_text = jax.jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids).last_hidden_state)
        self._decode = jax.jit(self._decode_latents)
        self._encode_image = jax.jit(self._encode_latents)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, variant: str | None = None,
                        config_folder: str | os.PathLike | None = None, scheduler: str | dict = "sd1",
                        dtype: str = "float32") -> LatentPipeline:  # fmt: skip
        """A diffusers Stable Diffusion folder, or a single original-format `.safetensors` file with the configs
        of `config_folder` and the `scheduler` preset or config (see `jaxdiff.convert.stable_diffusion`)."""
        return cls(read_pretrained(path, variant=variant, config_folder=config_folder, scheduler=scheduler,
                                   dtype=dtype))  # fmt: skip

    # ------------------------------------------------------------------ jitted pieces

    def _decode_latents(self, vae_params, latents: Array) -> Array:
        return to_pixels(decode_latents(self.vae, self.model.vae_config, vae_params, latents))

    def _encode_latents(self, vae_params, images: Array, rng: Array) -> Array:
        """Images in [0, 1] -> latents drawn from the posterior, in the U-Net's scale."""
        return encode_to_latents(self.vae, self.model.vae_config, vae_params, images * 2.0 - 1.0, rng)

    def _loop(self, timesteps: np.ndarray, sampler: str, guidance: float, mode: str) -> Callable:
        """The compiled denoising loop for these static settings; mode: "plain", "condition" (9-channel
        inpainting) or "blend" (4-channel inpainting)."""
        key = (tuple(int(t) for t in timesteps), sampler, guidance, mode)
        if key in self._compiled:
            return self._compiled[key]
        increasing = jnp.asarray(timesteps[::-1].copy(), jnp.int32)
        plan = step_plan(self.scheduler, timesteps)

        def run(unet_params, cond, uncond, x_start, rng, condition, mask, image_latents, noise):
            def unet(x, t, context):
                return self.unet.apply({"params": unet_params}, x, t, context)

            fn = guided_latent_denoiser(unet, cond, uncond, guidance, increasing,
                                        condition if mode == "condition" else None)  # fmt: skip
            if mode == "blend":
                def noised(i):
                    return add_noise(self.scheduler, image_latents, noise, increasing[i][:, None, None, None])

                fn = blended_denoiser(fn, mask, noised, len(timesteps) - 1)
            latents = denoise(fn, plan, x_start, rng, sampler=sampler)
            if mode == "blend":
                latents = mask * latents + (1.0 - mask) * image_latents
            return latents

        self._compiled[key] = jax.jit(run)
        return self._compiled[key]

    # ------------------------------------------------------------------ shared steps

    def _check_settings(self, steps, guidance, sampler, output_type, seed) -> float:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} must be an int")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        visited_timesteps(self.scheduler, steps)
        return _check_number("guidance", guidance, 0.0, math.inf, low_open=False)

    def _check_size(self, height, width) -> tuple[int, int]:
        default = self.model.unet_config.sample_size * self.latent_factor
        height, width = (default if height is None else height), (default if width is None else width)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8:
                raise ValueError(f"{name}={value!r} must be a positive multiple of 8")
            if value % self.latent_factor:
                raise ValueError(f"{name}={value!r} must be a multiple of the autoencoder's factor {self.latent_factor}")
        return height, width

    def _embeddings(self, prompts: list[str], negative_prompts) -> tuple[Array, Array]:
        negative = [""] * len(prompts) if negative_prompts is None else _prompt_list(negative_prompts, "negative_prompts")
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative_prompts for {len(prompts)} prompts; give one per prompt")
        ids = self.model.tokenizer(prompts + negative).input_ids
        both = self._encode_text(self.params["text"], jnp.asarray(ids))
        return both[: len(prompts)], both[len(prompts) :]

    def _noise(self, latents, shape: tuple[int, ...], rng: Array) -> Array:
        if latents is None:
            return jax.random.normal(rng, shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise ValueError(f"latents have shape {latents.shape}; expected {shape} (NHWC latents)")
        return latents

    def _finish(self, latents: Array, output_type: str) -> np.ndarray:
        images = np.asarray(self._decode(self.params["vae"], latents))
        return images if output_type == "float" else to_uint8(images)

    # ------------------------------------------------------------------ public API

    def text_to_image(self, prompts, *, negative_prompts=None, steps: int = DEFAULT_STEPS,
                      guidance: float = DEFAULT_GUIDANCE, sampler: str = "ddim", seed: int = 0,
                      height: int | None = None, width: int | None = None, latents=None,
                      output_type: str = "uint8") -> np.ndarray:  # fmt: skip
        """Images [B, height, width, 3] for B prompts: uint8 (or float in [0, 1] with output_type="float").
        `latents` [B, height/f, width/f, C] is the initial noise (default: drawn from `seed`)."""
        if self.inpainting_unet:
            raise ValueError("this is an inpainting U-Net (9 input channels): use inpaint()")
        prompts = _prompt_list(prompts, "prompts")
        guidance = self._check_settings(steps, guidance, sampler, output_type, seed)
        height, width = self._check_size(height, width)
        shape = (len(prompts), height // self.latent_factor, width // self.latent_factor, self.latent_channels)
        noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed))
        x_start = self._noise(latents, shape, noise_rng)
        cond, uncond = self._embeddings(prompts, negative_prompts)
        timesteps = visited_timesteps(self.scheduler, steps)
        run = self._loop(timesteps, sampler, guidance, "plain")
        return self._finish(run(self.params["unet"], cond, uncond, x_start, loop_rng, None, None, None, None),
                            output_type)  # fmt: skip

    def image_to_image(self, images, prompts, *, strength: float, negative_prompts=None, steps: int = DEFAULT_STEPS,
                       guidance: float = DEFAULT_GUIDANCE, sampler: str = "ddim", seed: int = 0, latents=None,
                       output_type: str = "uint8") -> np.ndarray:  # fmt: skip
        """SDEdit: encode `images` [B, H, W, 3], noise them to the step where diffusers starts for `strength` in
        (0, 1] (the last int(steps·strength) steps are run), denoise. `latents` is the noise added (default:
        drawn from `seed`)."""
        if self.inpainting_unet:
            raise ValueError("this is an inpainting U-Net (9 input channels): use inpaint()")
        prompts = _prompt_list(prompts, "prompts")
        strength = _check_number("strength", strength, 0.0, 1.0, low_open=True)
        guidance = self._check_settings(steps, guidance, sampler, output_type, seed)
        pixels = self._checked_images(images, len(prompts))
        timesteps = img2img_timesteps(visited_timesteps(self.scheduler, steps), strength)
        encode_rng, noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
        image_latents = self._encode_image(self.params["vae"], jnp.asarray(pixels), encode_rng)
        noise = self._noise(latents, tuple(image_latents.shape), noise_rng)
        cond, uncond = self._embeddings(prompts, negative_prompts)
        x_start = add_noise(self.scheduler, image_latents, noise, int(timesteps[0]))
        run = self._loop(timesteps, sampler, guidance, "plain")
        return self._finish(run(self.params["unet"], cond, uncond, x_start, loop_rng, None, None, None, None),
                            output_type)  # fmt: skip

    def inpaint(self, images, masks, prompts, *, strength: float = 1.0, negative_prompts=None,
                steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, sampler: str = "ddim", seed: int = 0,
                latents=None, output_type: str = "uint8") -> np.ndarray:  # fmt: skip
        """Repaint `images` [B, H, W, 3] where `masks` (see the module docstring) are set. A 9-channel inpainting
        U-Net gets the latent mask and the masked image's latents as extra input channels; a 4-channel U-Net
        keeps the image's latents (noised to the current step) outside the mask after every step. `latents` is
        the initial noise (default: drawn from `seed`); with strength < 1 the run starts from the image noised
        with it, as image_to_image."""
        prompts = _prompt_list(prompts, "prompts")
        strength = _check_number("strength", strength, 0.0, 1.0, low_open=True)
        guidance = self._check_settings(steps, guidance, sampler, output_type, seed)
        pixels = self._checked_images(images, len(prompts))
        mask = _mask_array(masks, pixels.shape)
        timesteps = img2img_timesteps(visited_timesteps(self.scheduler, steps), strength)
        encode_rng, masked_rng, noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed), 4)
        f = self.latent_factor
        latent_mask = jnp.asarray(mask[:, ::f, ::f])  # nearest-neighbour downsampling, as torch's interpolate
        image_latents = self._encode_image(self.params["vae"], jnp.asarray(pixels), encode_rng)
        noise = self._noise(latents, tuple(image_latents.shape), noise_rng)
        x_start = noise if strength == 1.0 else add_noise(self.scheduler, image_latents, noise, int(timesteps[0]))
        cond, uncond = self._embeddings(prompts, negative_prompts)
        if self.inpainting_unet:
            masked_pixels = np.where(mask > 0.5, 0.5, pixels)  # 0 in the autoencoder's [-1, 1], as diffusers
            masked = self._encode_image(self.params["vae"], jnp.asarray(masked_pixels), masked_rng)
            condition = jnp.concatenate([latent_mask, masked], axis=-1)
            run = self._loop(timesteps, sampler, guidance, "condition")
            latents_out = run(self.params["unet"], cond, uncond, x_start, loop_rng, condition, None, None, None)
        else:
            run = self._loop(timesteps, sampler, guidance, "blend")
            latents_out = run(self.params["unet"], cond, uncond, x_start, loop_rng, None, latent_mask,
                              image_latents, noise)  # fmt: skip
        return self._finish(latents_out, output_type)

    def _checked_images(self, images, batch: int) -> np.ndarray:
        pixels = _image_array(images, "images")
        if pixels.shape[0] != batch:
            raise ValueError(f"{pixels.shape[0]} images for {batch} prompts; give one image per prompt")
        self._check_size(pixels.shape[1], pixels.shape[2])
        return pixels
