"""Stable Diffusion in JAX: text-to-image, image-to-image (SDEdit) and inpainting, step for step as diffusers'
`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline`.

    pipe = LatentPipeline.from_pretrained("stable-diffusion-v1-5")   # a diffusers Stable Diffusion folder
    images = pipe.text_to_image(["a photo of a cat"], steps=50, guidance=7.5)   # uint8 [1, 512, 512, 3]

Conventions: images are NHWC, uint8 in [0, 255] or float in [0, 1]; masks are [B, H, W] or [B, H, W, 1] with
values >= 0.5 (>= 128 for uint8) where the image is repainted. Latents are NHWC in the U-Net's scale
z = (vae_latent − shift_factor)·scaling_factor. Timesteps are the scheduler's 0-based training steps (0..T-1).

The samplers (`sampler=`, `karras=`) and the steps they visit are diffusers' schedulers', described in
`jaxdiff.latent.schedulers`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checks import is_int, is_real, prompt_list
from jaxdiff.errors import UsageError
from jaxdiff.latent.bundle import LatentModels
from jaxdiff.latent.pipeline_base import PipelineBase
from jaxdiff.latent.stable_diffusion import read_pretrained
from jaxdiff.latent.schedulers import (
    DPM_SAMPLERS,
    GRID_OF,
    KARRAS_SAMPLERS,
    LATENT_SAMPLERS,
    ROUNDED_STEP_SAMPLERS,
    SIGMA_SAMPLERS,
    add_noise,
    check_multistep_config,
    denoise,
    denoise_on_levels,
    dpm_solver_timesteps,
    img2img_timesteps,
    initial_scale,
    sampler_levels,
    sampler_scheduler,
    sigma_denoiser,
    step_plan,
    visited_timesteps,
)
from jaxdiff.models.autoencoder import create_autoencoder
from jaxdiff.models.clip_text import create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition

Array = jax.Array
UNetFn = Callable[[Array, Array, Array], Array]  # (latents [B,h,w,C_in], timesteps [B], context [B,L,D]) -> output

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
OUTPUT_TYPES = ("uint8", "float")


# --------------------------------------------------------------------------- pure pieces


def guided_unet(unet: UNetFn, cond: Array, uncond: Array, guidance: float,
                condition: Array | None = None) -> Callable[[Array, Array], Array]:  # fmt: skip
    """`fn(x, t)`: the U-Net output at latents x [B,h,w,C] and training steps t [B] (int or real), guided as
    diffusers does: uncond + guidance·(cond − uncond) from one forward pass on [x; x] with contexts
    [uncond; cond] (only the conditional pass when guidance <= 1). `condition` [B,h,w,C'] (the inpainting
    U-Net's mask and masked-image latents) is appended to x's channels."""

    def fn(x: Array, t: Array) -> Array:
        x_in = x if condition is None else jnp.concatenate([x, condition], axis=-1)
        if guidance <= 1:
            return unet(x_in, t, cond)
        both = unet(jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t]), jnp.concatenate([uncond, cond]))
        out_uncond, out_cond = jnp.split(both, 2)
        return out_uncond + guidance * (out_cond - out_uncond)

    return fn


def guided_latent_denoiser(unet: UNetFn, cond: Array, uncond: Array, guidance: float, timesteps: Array,
                           condition: Array | None = None) -> Callable[[Array, Array], Array]:  # fmt: skip
    """`denoise_fn(x, i)` for the discrete samplers: `guided_unet` at step index i [B] into `timesteps`
    (increasing training steps)."""
    fn = guided_unet(unet, cond, uncond, guidance, condition)
    return lambda x, i: fn(x, timesteps[i])


def blended_denoiser(denoise_fn: Callable[[Array, Array], Array], mask: Array,
                     noised_image: Callable[[Array], Array], first_index: float) -> Callable[[Array, Array], Array]:  # fmt: skip
    """Latent-blending inpainting for a 4-channel U-Net: before each model call but the first (where i [B], the
    step index or noise level the sampler passes, equals `first_index`), latents outside the mask (mask
    [B,h,w,1] of 0/1, 1 = repaint) are replaced by `noised_image(i)`, the image latents noised to that step,
    as diffusers' pipeline does after each step. The samplers update each latent pixel from its
    own value and model output only, so inside the mask the state equals diffusers'; outside, it is replaced
    before every use (the caller puts the clean image latents there after the last step)."""

    def blended(x: Array, i: Array) -> Array:
        x_in = jnp.where((mask > 0.5) | (i[:, None, None, None] == first_index), x, noised_image(i))
        return denoise_fn(x_in, i)

    return blended


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
    ok = is_real(value, finite=True)
    if not ok or (value <= low if low_open else value < low) or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise UsageError(f"{name}={value!r} must be a number in {interval}")
    return float(value)


def _image_array(images, name: str) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] NHWC (or one HWC image) -> float32 NHWC in [0, 1]."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise UsageError(f"{name} must be RGB images [B, H, W, 3] (NHWC), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
        raise UsageError(f"{name} must be uint8 or float in [0, 1], got {array.dtype}")
    return array.astype(np.float32)


def _mask_array(masks, image_shape: tuple[int, ...]) -> np.ndarray:
    """Masks [B, H, W] or [B, H, W, 1] -> float32 [B, H, W, 1] of 0/1 (1 = repaint), as diffusers binarizes."""
    array = np.asarray(masks)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape != tuple(image_shape[:3]):
        raise UsageError(f"masks have shape {array.shape}; expected [B, H, W] = {tuple(image_shape[:3])} like images")
    threshold = 128 if array.dtype == np.uint8 else 0.5
    return (array >= threshold).astype(np.float32)[..., None]


# --------------------------------------------------------------------------- the pipeline


class LatentPipeline(PipelineBase):
    """A loaded Stable Diffusion model: `text_to_image`, `image_to_image`, `inpaint` (see the module docstring);
    `sample` and `denoise` raise `UsageError` (`PipelineBase`): unconditional samples are `text_to_image([""] * n)`."""

    loaded = "a text-to-image latent model"

    def __init__(self, model: LatentModels):
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
        of `config_folder` and the `scheduler` preset or config (see `jaxdiff.latent.stable_diffusion`)."""
        return cls(read_pretrained(path, variant=variant, config_folder=config_folder, scheduler=scheduler,
                                   dtype=dtype))  # fmt: skip

    # ------------------------------------------------------------------ jitted pieces

    def _decode_latents(self, vae_params, latents: Array) -> Array:
        return to_pixels(decode_latents(self.vae, self.model.vae_config, vae_params, latents))

    def _encode_latents(self, vae_params, images: Array, rng: Array) -> Array:
        """Images in [0, 1] -> latents drawn from the posterior, in the U-Net's scale."""
        return encode_to_latents(self.vae, self.model.vae_config, vae_params, images * 2.0 - 1.0, rng)

    def _loop(self, points: np.ndarray, sampler: str, guidance: float, mode: str) -> Callable:
        """The compiled denoising loop for these static settings: `points` are the run's decreasing training
        steps (ddim, ddpm) or noise levels (SIGMA_SAMPLERS, see `_run_points`); mode: "plain", "condition"
        (9-channel inpainting) or "blend" (4-channel inpainting)."""
        key = (tuple(points.tolist()), sampler, guidance, mode)
        if key in self._compiled:
            return self._compiled[key]
        on_levels = sampler in SIGMA_SAMPLERS
        scheduler = sampler_scheduler(self.scheduler, sampler)
        increasing = None if on_levels else jnp.asarray(points[::-1].copy(), jnp.int32)
        plan = None if on_levels else step_plan(scheduler, points)  # concrete tables, outside jit

        def run(unet_params, cond, uncond, x_start, rng, condition, mask, image_latents, noise):
            def unet(x, t, context):
                return self.unet.apply({"params": unet_params}, x, t, context)

            extra_channels = condition if mode == "condition" else None
            if on_levels:
                fn = sigma_denoiser(guided_unet(unet, cond, uncond, guidance, extra_channels), self.scheduler,
                                    rounded=sampler in ROUNDED_STEP_SAMPLERS)  # fmt: skip
            else:
                fn = guided_latent_denoiser(unet, cond, uncond, guidance, increasing, extra_channels)
            if mode == "blend":
                def noised(i):
                    if on_levels:  # i is the noise level σ of the unscaled latents
                        return image_latents + i[:, None, None, None] * noise
                    return add_noise(self.scheduler, image_latents, noise, increasing[i][:, None, None, None])

                fn = blended_denoiser(fn, mask, noised, float(points[0]) if on_levels else len(points) - 1)
            if on_levels:
                latents = denoise_on_levels(fn, points, x_start, sampler=sampler, scheduler=scheduler, rng=rng)
            else:
                latents = denoise(fn, plan, x_start, rng, sampler=sampler)
            if mode == "blend":
                latents = mask * latents + (1.0 - mask) * image_latents
            return latents

        self._compiled[key] = jax.jit(run)
        return self._compiled[key]

    def _run_points(self, sampler: str, steps: int, karras: bool, strength: float = 1.0) -> np.ndarray:
        """The decreasing training steps (ddim, ddpm) or noise levels, ending at 0 (SIGMA_SAMPLERS) of a run;
        with strength < 1, only the last int(steps·strength) steps, where diffusers' image-to-image starts."""
        scheduler = sampler_scheduler(self.scheduler, sampler)
        if sampler not in SIGMA_SAMPLERS:
            return img2img_timesteps(visited_timesteps(scheduler, steps), strength)
        levels = sampler_levels(scheduler, steps, sampler=sampler, karras=karras)
        return np.append(img2img_timesteps(levels[:-1], strength), levels[-1])

    def _start(self, sampler: str, points: np.ndarray, noise: Array, image_latents: Array | None = None) -> Array:
        """The sampler's initial state: the noise (scaled by diffusers' init_noise_sigma on σ grids), or the
        image latents noised to the first step (VP x_t for ddim/ddpm; x_0 + σ·noise on σ grids)."""
        if sampler in SIGMA_SAMPLERS:
            if image_latents is None:
                return noise * initial_scale(sampler_scheduler(self.scheduler, sampler), sampler, float(points[0]))
            return image_latents + float(points[0]) * noise
        if image_latents is None:
            return noise
        return add_noise(self.scheduler, image_latents, noise, int(points[0]))

    # ------------------------------------------------------------------ shared steps

    def _check_settings(self, steps, guidance, sampler, karras, output_type, seed) -> float:
        if not is_int(seed):
            raise UsageError(f"seed={seed!r} must be an int")
        if sampler not in LATENT_SAMPLERS:
            raise UsageError(f"unknown sampler {sampler!r}; expected one of {LATENT_SAMPLERS}")
        if not isinstance(karras, bool):
            raise UsageError(f"karras={karras!r} must be True or False")
        if karras and sampler not in KARRAS_SAMPLERS:
            raise UsageError(f"karras=True is for the samplers {KARRAS_SAMPLERS}, not {sampler!r}")
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        scheduler = sampler_scheduler(self.scheduler, sampler)
        check_multistep_config(scheduler, sampler)
        visited_timesteps(scheduler, steps)
        if (sampler in DPM_SAMPLERS or GRID_OF.get(sampler) == "dpm_solver++") and not karras:
            dpm_solver_timesteps(scheduler, steps)
        return _check_number("guidance", guidance, 0.0, math.inf, low_open=False)

    def _check_size(self, height, width) -> tuple[int, int]:
        default = self.model.unet_config.sample_size * self.latent_factor
        height, width = (default if height is None else height), (default if width is None else width)
        for name, value in (("height", height), ("width", width)):
            if not is_int(value, numpy=False) or value < 8 or value % 8:
                raise UsageError(f"{name}={value!r} must be a positive multiple of 8")
            if value % self.latent_factor:
                raise UsageError(f"{name}={value!r} must be a multiple of the autoencoder's factor {self.latent_factor}")
        return height, width

    def _embeddings(self, prompts: list[str], negative_prompts) -> tuple[Array, Array]:
        negative = [""] * len(prompts) if negative_prompts is None else prompt_list(negative_prompts, "negative_prompts")
        if len(negative) != len(prompts):
            raise UsageError(f"{len(negative)} negative_prompts for {len(prompts)} prompts; give one per prompt")
        ids = self.model.tokenizer(prompts + negative).input_ids
        both = self._encode_text(self.params["text"], jnp.asarray(ids))
        return both[: len(prompts)], both[len(prompts) :]

    def _noise(self, latents, shape: tuple[int, ...], rng: Array) -> Array:
        if latents is None:
            return jax.random.normal(rng, shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise UsageError(f"latents have shape {latents.shape}; expected {shape} (NHWC latents)")
        return latents

    def _finish(self, latents: Array, output_type: str) -> np.ndarray:
        images = np.asarray(self._decode(self.params["vae"], latents))
        return images if output_type == "float" else to_uint8(images)

    # ------------------------------------------------------------------ public API

    def text_to_image(self, prompts, *, negative_prompts=None, steps: int = DEFAULT_STEPS,
                      guidance: float = DEFAULT_GUIDANCE, sampler: str = "ddim", karras: bool = False,
                      seed: int = 0, height: int | None = None, width: int | None = None, latents=None,
                      output_type: str = "uint8") -> np.ndarray:  # fmt: skip
        """Images [B, height, width, 3] for B prompts: uint8 (or float in [0, 1] with output_type="float").
        `sampler` is one of LATENT_SAMPLERS (see `jaxdiff.latent.schedulers`); `karras` puts the KARRAS_SAMPLERS
        (all σ-grid samplers but euler_ancestral) on the Karras grid. `latents` [B, height/f, width/f, C] is the
        initial noise, N(0, I) (default: drawn from `seed`)."""
        if self.inpainting_unet:
            raise UsageError("this is an inpainting U-Net (9 input channels): use inpaint()")
        prompts = prompt_list(prompts, "prompts")
        guidance = self._check_settings(steps, guidance, sampler, karras, output_type, seed)
        height, width = self._check_size(height, width)
        shape = (len(prompts), height // self.latent_factor, width // self.latent_factor, self.latent_channels)
        noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed))
        points = self._run_points(sampler, steps, karras)
        x_start = self._start(sampler, points, self._noise(latents, shape, noise_rng))
        cond, uncond = self._embeddings(prompts, negative_prompts)
        run = self._loop(points, sampler, guidance, "plain")
        return self._finish(run(self.params["unet"], cond, uncond, x_start, loop_rng, None, None, None, None),
                            output_type)  # fmt: skip

    def image_to_image(self, images, prompts, *, strength: float, negative_prompts=None, steps: int = DEFAULT_STEPS,
                       guidance: float = DEFAULT_GUIDANCE, sampler: str = "ddim", karras: bool = False,
                       seed: int = 0, latents=None, output_type: str = "uint8") -> np.ndarray:  # fmt: skip
        """SDEdit: encode `images` [B, H, W, 3], noise them to the step where diffusers starts for `strength` in
        (0, 1] (the last int(steps·strength) steps are run), denoise. `latents` is the noise added (default:
        drawn from `seed`)."""
        if self.inpainting_unet:
            raise UsageError("this is an inpainting U-Net (9 input channels): use inpaint()")
        prompts = prompt_list(prompts, "prompts")
        strength = _check_number("strength", strength, 0.0, 1.0, low_open=True)
        guidance = self._check_settings(steps, guidance, sampler, karras, output_type, seed)
        pixels = self._checked_images(images, len(prompts))
        points = self._run_points(sampler, steps, karras, strength)
        encode_rng, noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
        image_latents = self._encode_image(self.params["vae"], jnp.asarray(pixels), encode_rng)
        noise = self._noise(latents, tuple(image_latents.shape), noise_rng)
        cond, uncond = self._embeddings(prompts, negative_prompts)
        x_start = self._start(sampler, points, noise, image_latents)
        run = self._loop(points, sampler, guidance, "plain")
        return self._finish(run(self.params["unet"], cond, uncond, x_start, loop_rng, None, None, None, None),
                            output_type)  # fmt: skip

    def inpaint(self, images, masks, prompts, *, strength: float = 1.0, negative_prompts=None,
                steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, sampler: str = "ddim",
                karras: bool = False, seed: int = 0, latents=None,
                output_type: str = "uint8") -> np.ndarray:  # fmt: skip
        """Repaint `images` [B, H, W, 3] where `masks` (see the module docstring) are set. A 9-channel inpainting
        U-Net gets the latent mask and the masked image's latents as extra input channels; a 4-channel U-Net
        keeps the image's latents (noised to the current step) outside the mask after every step. `latents` is
        the initial noise (default: drawn from `seed`); with strength < 1 the run starts from the image noised
        with it, as image_to_image."""
        prompts = prompt_list(prompts, "prompts")
        strength = _check_number("strength", strength, 0.0, 1.0, low_open=True)
        guidance = self._check_settings(steps, guidance, sampler, karras, output_type, seed)
        pixels = self._checked_images(images, len(prompts))
        mask = _mask_array(masks, pixels.shape)
        points = self._run_points(sampler, steps, karras, strength)
        encode_rng, masked_rng, noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed), 4)
        f = self.latent_factor
        latent_mask = jnp.asarray(mask[:, ::f, ::f])  # nearest-neighbour downsampling, as torch's interpolate
        image_latents = self._encode_image(self.params["vae"], jnp.asarray(pixels), encode_rng)
        noise = self._noise(latents, tuple(image_latents.shape), noise_rng)
        x_start = self._start(sampler, points, noise, None if strength == 1.0 else image_latents)
        cond, uncond = self._embeddings(prompts, negative_prompts)
        if self.inpainting_unet:
            masked_pixels = np.where(mask > 0.5, 0.5, pixels)  # 0 in the autoencoder's [-1, 1], as diffusers
            masked = self._encode_image(self.params["vae"], jnp.asarray(masked_pixels), masked_rng)
            condition = jnp.concatenate([latent_mask, masked], axis=-1)
            run = self._loop(points, sampler, guidance, "condition")
            latents_out = run(self.params["unet"], cond, uncond, x_start, loop_rng, condition, None, None, None)
        else:
            run = self._loop(points, sampler, guidance, "blend")
            latents_out = run(self.params["unet"], cond, uncond, x_start, loop_rng, None, latent_mask,
                              image_latents, noise)  # fmt: skip
        return self._finish(latents_out, output_type)

    def _checked_images(self, images, batch: int) -> np.ndarray:
        pixels = _image_array(images, "images")
        if pixels.shape[0] != batch:
            raise UsageError(f"{pixels.shape[0]} images for {batch} prompts; give one image per prompt")
        self._check_size(pixels.shape[1], pixels.shape[2])
        return pixels
