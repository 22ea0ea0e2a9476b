"""The x4 upscaler (Stable Diffusion 2's stable-diffusion-x4-upscaler) in JAX, step for step as diffusers'
`StableDiffusionUpscalePipeline`.

    pipe = jaxdiff.Pipeline.from_pretrained("stable-diffusion-x4-upscaler")   # an UpscalePipeline
    big = pipe.upscale(low_res, ["a white cat"])   # uint8 [B, H, W, 3] -> uint8 [B, 4H, 4W, 3]

The low-resolution images x (uint8 NHWC, scaled to [-1, 1] as x/255·2 − 1) are noise-augmented by the folder's
`low_res_scheduler` at the noise level l (an int in [0, max_noise_level], default 20): the DDPM marginal
x_l = sqrt(ᾱ_l)·x + sqrt(1 − ᾱ_l)·n of the low-resolution schedule (ᾱ_l its cumulative product of 1 − β at 0-based
step l; n ~ N(0, I), the `noise` given or drawn from `seed`). The latents [B, H, W, C] are at the low resolution
(the VAE's factor is the upscaling factor, 4) and start from N(0, I) noise (`latents`, or drawn from `seed`, scaled
by diffusers' init_noise_sigma). The folder's scheduler steps them (`sampler=None`: the sampler of its class; the
others of `jaxdiff.latent.schedulers` too) in one compiled `lax.scan`; at each step the U-Net sees the latents (after
the scheduler's input scaling) with x_l appended as channels, the step, the text embeddings and l as its class
label, for both halves of the doubled batch under guidance; its output is read as the scheduler config's
prediction_type says (v-prediction for the released model). The final latents z are decoded as z / 0.08333 (the
VAE's scaling factor) in float32, whole or tile by tile (`jaxdiff.latent.tiled_decode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checks import is_int, prompt_list
from jaxdiff.diffusion.scheduler_config import SchedulerSettings
from jaxdiff.errors import UsageError
from jaxdiff.latent.bundle import UPSCALE_PIPELINE_CLASS, LatentModels
from jaxdiff.latent.pipeline import LatentPipeline, decode_latents, to_pixels, to_uint8
from jaxdiff.latent.pipeline_base import PipelineBase
from jaxdiff.latent.schedulers import add_noise
from jaxdiff.latent.tiled_decode import decode_tiled, tile_settings
from jaxdiff.xla_options import inference_jit

Array = jax.Array

DEFAULT_STEPS = 75  # StableDiffusionUpscalePipeline's num_inference_steps
DEFAULT_GUIDANCE = 9.0  # its guidance_scale
DEFAULT_NOISE_LEVEL = 20  # its noise_level
# The largest low-resolution image upscaled (per image): 512² pixels, 2048² out. The decoder is tiled, but the U-Net
# runs on the whole low-resolution image at once.
MAX_LOW_RES_SIDE = 512
MAX_LOW_RES_PIXELS = MAX_LOW_RES_SIDE**2
# tiled=None decodes latents of at most 128² pixels (512² images) whole, as diffusers does by default, and larger
# ones tile by tile: the mid-block attention's float32 logits grow as (h·w)², 1 GiB per image at 128², 16 GiB at 256².
UNTILED_MAX_LATENT_PIXELS = 128 * 128


def low_res_condition(scheduler: SchedulerSettings, pixels: np.ndarray, noise: Array, noise_level) -> Array:
    """The noise-augmented low-resolution images [B, H, W, 3]: x = 2·pixels − 1 for float32 `pixels` in [0, 1]
    (uint8 / 255), then q(x_l | x) = sqrt(ᾱ_l)·x + sqrt(1 − ᾱ_l)·noise of `scheduler`'s schedule at the 0-based
    step l = `noise_level` (an int, or an int scalar array)."""
    return add_noise(scheduler, jnp.asarray(pixels * 2.0 - 1.0), noise, noise_level)


class UpscalePipeline(LatentPipeline):
    """A loaded x4 upscaler (a `StableDiffusionUpscalePipeline` folder): `upscale` (module docstring) and
    `LatentPipeline`'s LoRA methods; `sample`, `denoise`, `text_to_image`, `image_to_image` and `inpaint` raise
    `UsageError` (`PipelineBase`)."""

    loaded = "an x4 upscaler (StableDiffusionUpscalePipeline)"
    pipeline_classes = (UPSCALE_PIPELINE_CLASS,)
    text_to_image = PipelineBase.text_to_image
    image_to_image = PipelineBase.image_to_image
    inpaint = PipelineBase.inpaint

    def __init__(self, model: LatentModels):
        super().__init__(model)
        if model.vae_config.dtype != "float32":
            raise UsageError(f"dtype={model.vae_config.dtype!r}: the upscaler's VAE decodes in float32 only (it "
                             "overflows in half precision)")  # fmt: skip
        self.low_res_scheduler = model.low_res_scheduler
        self.max_noise_level = model.max_noise_level
        self.tiles = tile_settings(model.vae_config, self.latent_factor)
        # Low-resolution sides are multiples of the U-Net's downsampling and the VAE's factor (both powers of 2).
        self.side_multiple = max(self.latent_factor, 2 ** (len(model.unet_config.block_out_channels) - 1))
        self._decode_tile = inference_jit(lambda params, z: decode_latents(self.vae, model.vae_config, params, z))

    def _check_size(self, height, width) -> tuple[int, int]:
        """Low-resolution sides: multiples of `side_multiple`, at most MAX_LOW_RES_PIXELS per image."""
        for name, value in (("height", height), ("width", width)):
            if value < self.side_multiple or value % self.side_multiple:
                raise UsageError(f"images of {name} {value}: the upscaler takes sides that are positive multiples of "
                                 f"{self.side_multiple}")  # fmt: skip
        if height * width > MAX_LOW_RES_PIXELS:
            f = self.latent_factor
            raise UsageError(f"images of {height}×{width} would upscale to {f * height}×{f * width}: more than the "
                             f"{MAX_LOW_RES_PIXELS} low-resolution pixels ({MAX_LOW_RES_SIDE}×{MAX_LOW_RES_SIDE}) per "
                             "image the upscaler takes; upscale parts of the image")  # fmt: skip
        return height, width

    def _decoded(self, latents: Array, tiled: bool | None) -> np.ndarray:
        """Final latents [B, h, w, C] -> float32 images [B, f·h, f·w, 3] in [0, 1]: tile by tile when `tiled`,
        or (None) when the latents have more than UNTILED_MAX_LATENT_PIXELS pixels."""
        if tiled is None:
            tiled = latents.shape[1] * latents.shape[2] > UNTILED_MAX_LATENT_PIXELS
        if not tiled:
            return np.asarray(self._decode(self.params["vae"], latents))
        decode = lambda z: self._decode_tile(self.params["vae"], z)  # noqa: E731
        return np.asarray(to_pixels(decode_tiled(decode, latents, self.tiles, self.latent_factor)))

    def upscale(self, images, prompts, *, noise_level: int = DEFAULT_NOISE_LEVEL, steps: int = DEFAULT_STEPS,
                guidance: float = DEFAULT_GUIDANCE, negative_prompts=None, seed: int = 0, latents=None, noise=None,
                sampler: str | None = None, karras: bool = False, tiled: bool | None = None,
                output_type: str = "uint8") -> np.ndarray:  # fmt: skip
        """Images [B, f·H, f·W, 3] (f the VAE's factor, 4) upscaled from `images` uint8 [B, H, W, 3] (NHWC; H, W
        multiples of `side_multiple`, H·W <= MAX_LOW_RES_PIXELS) for B prompts: uint8, or float in [0, 1] with
        output_type="float".

        `noise_level` l in [0, max_noise_level]; `guidance` diffusers' guidance_scale (<= 1: no guidance);
        `sampler` None is the folder scheduler's class (else one of LATENT_SAMPLERS; `karras` as in
        `text_to_image`). `latents` [B, H, W, C]: the initial N(0, I) latent noise; `noise` [B, H, W, 3]: the
        augmentation noise n; each drawn from `seed` when not given. `tiled`: decode tile by tile (True), whole
        (False), or by size (None, see UNTILED_MAX_LATENT_PIXELS). Every argument is checked before any work."""
        prompts = prompt_list(prompts, "prompts")
        if np.asarray(images).dtype != np.uint8:
            raise UsageError(f"images must be uint8 [B, H, W, 3] (NHWC), got {np.asarray(images).dtype}")
        pixels = self._checked_images(images, len(prompts))
        if not is_int(noise_level) or not 0 <= noise_level <= self.max_noise_level:
            raise UsageError(f"noise_level={noise_level!r} must be an int in [0, {self.max_noise_level}] "
                             "(max_noise_level of the folder)")  # fmt: skip
        if tiled is not None and not isinstance(tiled, bool):
            raise UsageError(f"tiled={tiled!r} must be True, False or None (by size)")
        sampler = self._sampler(sampler)
        guidance = self._check_settings(steps, guidance, sampler, karras, output_type, seed)
        noise_rng, latent_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
        augmentation = self._noise(noise, pixels.shape, noise_rng, "noise")
        initial = self._noise(latents, (*pixels.shape[:3], self.latent_channels), latent_rng)
        condition = low_res_condition(self.low_res_scheduler, pixels, augmentation, noise_level)
        points = self._run_points(sampler, steps, karras)
        x_start = self._start(sampler, points, initial)
        cond, uncond = self._embeddings(prompts, negative_prompts)
        run = self._loop(points, sampler, guidance, "condition")
        final = run(self._run_params["unet"], cond, uncond, x_start, loop_rng, condition, None, None, None,
                    jnp.int32(noise_level))  # fmt: skip
        upscaled = self._decoded(final, tiled)
        return upscaled if output_type == "float" else to_uint8(upscaled)
