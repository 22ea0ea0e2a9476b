"""Stable Diffusion in JAX: text-to-image, image-to-image (SDEdit) and inpainting, step for step as diffusers'
`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline`; SDXL base and
refiner text-to-image, image-to-image and inpainting as `StableDiffusionXLPipeline`,
`StableDiffusionXLImg2ImgPipeline` and `StableDiffusionXLInpaintPipeline` (4- and 9-channel U-Nets)
(the prompts become the U-Net's `Conditioning` through `jaxdiff.latent.prompt_conditioning`), with the base ->
refiner hand-off (`denoising_end` / `denoising_start`).

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
from jaxdiff.latent.bundle import PIPELINE_CLASSES, SDXL_PIPELINE_CLASSES, LatentModels
from jaxdiff.latent.lora import LoraAdapters
from jaxdiff.latent.pipeline_base import PipelineBase
from jaxdiff.latent.prompt_conditioning import (
    Conditioning,
    PromptEncoder,
    check_fraction,
    cutoff_step,
    rescale_guided,
)
from jaxdiff.latent.stable_diffusion import read_pretrained
from jaxdiff.latent.scheduler_run import SchedulerRun
from jaxdiff.latent.schedulers import (
    DPM_SAMPLERS,
    GRID_OF,
    KARRAS_SAMPLERS,
    LATENT_SAMPLERS,
    check_multistep_config,
    dpm_solver_timesteps,
    folder_sampler,
    run_points,
    sampler_scheduler,
    training_sigmas,
    visited_timesteps,
)
from jaxdiff.models.autoencoder import create_autoencoder
from jaxdiff.models.unet_condition import create_unet_condition
from jaxdiff.xla_options import inference_jit, per_step_params

Array = jax.Array
UNetFn = Callable[[Array, Array, Conditioning | Array], Array]  # (latents [B,h,w,C_in], timesteps [B], conditioning) -> output

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
OUTPUT_TYPES = ("uint8", "float", "latent")
# The samplers whose run can stop at denoising_end and resume at denoising_start (the base -> refiner hand-off):
# one-step samplers whose state is the unscaled x = x_0 + σ·n in both diffusers and jaxdiff, so the latents carry
# over as they are. Left out: heun (diffusers' cut of its doubled timesteps is not reproduced) and lms (diffusers'
# LMSDiscreteScheduler resumed at a begin index takes its full order's coefficients with one derivative).
HANDOFF_SAMPLERS = ("euler", "euler_ancestral")


# --------------------------------------------------------------------------- pure pieces


def guided_unet(unet: UNetFn, cond: Conditioning | Array, uncond: Conditioning | Array, guidance: float,
                condition: Array | None = None, rescale: float = 0.0,
                cond_term: Callable[[Array, Array, Array], Array] | None = None) -> Callable[[Array, Array], Array]:  # fmt: skip
    """`fn(x, t)`: the U-Net output at latents x [B,h,w,C] and training steps t [B] (int or real), guided as
    diffusers does: uncond + guidance·(cond − uncond) from one forward pass on [x; x] with conditionings
    [uncond; cond] (pytrees `unet` takes: `Conditioning`s, or context arrays [B,L,D]; concatenated leaf by leaf)
    (only the conditional pass when guidance <= 1), then with rescale > 0 `rescale_guided`
    (guidance_rescale). `condition` [B,h,w,C'] (the inpainting U-Net's mask and masked-image latents) is appended
    to x's channels. `cond_term(out_cond, x, t)`, when given, is added to the guided output (SD3's skip-layer
    guidance)."""

    def fn(x: Array, t: Array) -> Array:
        x_in = x if condition is None else jnp.concatenate([x, condition], axis=-1)
        if guidance <= 1:
            return unet(x_in, t, cond)
        both_cond = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
        both = unet(jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t]), both_cond)
        out_uncond, out_cond = jnp.split(both, 2)
        guided = out_uncond + guidance * (out_cond - out_uncond)
        guided = guided if rescale <= 0 else rescale_guided(guided, out_cond, rescale)
        return guided if cond_term is None else guided + cond_term(out_cond, x, t)

    return fn


def guided_latent_denoiser(unet: UNetFn, cond: Conditioning | Array, uncond: Conditioning | Array, guidance: float,
                           timesteps: Array, condition: Array | None = None,
                           rescale: float = 0.0) -> Callable[[Array, Array], Array]:  # fmt: skip
    """`denoise_fn(x, i)` for the discrete samplers: `guided_unet` at step index i [B] into `timesteps`
    (increasing training steps)."""
    fn = guided_unet(unet, cond, uncond, guidance, condition, rescale)
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


class LatentPipeline(LoraAdapters, PipelineBase):
    """A loaded Stable Diffusion model: `text_to_image`, `image_to_image`, `inpaint` (see the module docstring);
    LoRA adapters: `load_lora`, `set_lora_scale`, `fuse_lora`, `unfuse_lora` (`jaxdiff.latent.lora`);
    `sample` and `denoise` raise `UsageError` (`PipelineBase`): unconditional samples are `text_to_image([""] * n)`."""

    loaded = "a text-to-image latent model"
    pipeline_classes = (*PIPELINE_CLASSES, *SDXL_PIPELINE_CLASSES)  # the diffusers pipelines whose folders it runs

    def __init__(self, model: LatentModels):
        if model.pipeline_class not in self.pipeline_classes:
            raise UsageError(f"{type(self).__name__} does not run {model.pipeline_class} weights (it runs "
                             f"{', '.join(self.pipeline_classes)}); load them with jaxdiff.Pipeline.from_pretrained")
        self.model = model
        self.scheduler = model.scheduler
        self.unet = create_unet_condition(model.unet_config)
        self.vae = create_autoencoder(model.vae_config)
        self.prompt_encoder = PromptEncoder(model)
        self.text_encoder = self.prompt_encoder.encoders[0][1]  # the first text encoder's module (a refiner's: its only)
        self.params = jax.device_put({"unet": model.unet_params, "vae": model.vae_params, **self.prompt_encoder.params})
        self.latent_factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
        self.latent_channels = model.vae_config.latent_channels
        self.inpainting_unet = model.unet_config.in_channels == 2 * self.latent_channels + 1
        self._compiled: dict[tuple, Callable] = {}
        self._init_lora()
        self._decode = inference_jit(self._decode_latents)
        self._encode_image = inference_jit(self._encode_latents)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, variant: str | None = None,
                        config_folder: str | os.PathLike | None = None, scheduler: str | dict = "sd1",
                        dtype: str = "float32") -> LatentPipeline:  # fmt: skip
        """A diffusers Stable Diffusion folder, or a single original-format `.safetensors` file with the configs
        of `config_folder` and the `scheduler` preset or config (see `jaxdiff.latent.stable_diffusion`); with an
        SDXL folder as `config_folder`, an SDXL single file, whose scheduler is that folder's
        (`jaxdiff.latent.stable_diffusion.read_sdxl_single_file`)."""
        return cls(read_pretrained(path, variant=variant, config_folder=config_folder, scheduler=scheduler,
                                   dtype=dtype))  # fmt: skip

    # ------------------------------------------------------------------ jitted pieces

    def _decode_latents(self, vae_params, latents: Array) -> Array:
        return to_pixels(decode_latents(self.vae, self.model.vae_config, vae_params, latents))

    def _encode_latents(self, vae_params, images: Array, rng: Array) -> Array:
        """Images in [0, 1] -> latents drawn from the posterior, in the U-Net's scale."""
        return encode_to_latents(self.vae, self.model.vae_config, vae_params, images * 2.0 - 1.0, rng)

    def _loop(self, points: np.ndarray, sampler: str, guidance: float, mode: str, rescale: float = 0.0) -> Callable:
        """The compiled denoising loop for these static settings: `points` are the run's decreasing training
        steps (ddim, ddpm) or noise levels (SIGMA_SAMPLERS, see `_run_points`); mode: "plain", "condition"
        (`condition` channels appended to the latents: 9-channel inpainting, the upscaler's low-resolution image)
        or "blend" (4-channel inpainting); `rescale` guidance_rescale. `cond`, `uncond` are `Conditioning`s;
        `class_label` (an int scalar, or None for none) is every U-Net call's class label (the upscaler's noise
        level)."""
        key = (tuple(points.tolist()), sampler, guidance, mode, rescale)
        if key in self._compiled:
            return self._compiled[key]
        scheduler_run = SchedulerRun(self.scheduler, sampler, points)  # concrete tables, outside jit

        def run(unet_params, cond, uncond, x_start, rng, condition, mask, image_latents, noise, class_label=None):
            def unet(x, t, conditioning):
                labels = None if class_label is None else jnp.full(x.shape[:1], class_label, jnp.int32)
                return self.unet.apply({"params": per_step_params(unet_params, x)}, x, t, conditioning.context,
                                       class_labels=labels, added_cond=conditioning.added_cond)  # fmt: skip

            extra_channels = condition if mode == "condition" else None
            model_fn = guided_unet(unet, cond, uncond, guidance, extra_channels, rescale)
            wrap = None
            if mode == "blend":
                wrap = lambda fn: blended_denoiser(  # noqa: E731
                    fn, mask, lambda i: scheduler_run.noised(image_latents, noise, i), scheduler_run.first_index)
            latents = scheduler_run(model_fn, x_start, rng, wrap)
            if mode == "blend":
                latents = mask * latents + (1.0 - mask) * image_latents
            return latents

        self._compiled[key] = inference_jit(run)
        return self._compiled[key]

    def _run_points(self, sampler: str, steps: int, karras: bool, strength: float = 1.0) -> np.ndarray:
        """`run_points` of `sampler` under this pipeline's scheduler."""
        return run_points(sampler_scheduler(self.scheduler, sampler), sampler, steps, karras, strength)

    def _start(self, sampler: str, points: np.ndarray, noise: Array, image_latents: Array | None = None) -> Array:
        """The sampler's initial state (`SchedulerRun.start`)."""
        return SchedulerRun(self.scheduler, sampler, points).start(noise, image_latents)

    # ------------------------------------------------------------------ shared steps

    @property
    def default_sampler(self) -> str:
        """The sampler of `sampler=None`: the one stepping as the folder's scheduler class (`folder_sampler`; a
        WeightsError naming the class where jaxdiff has none)."""
        return folder_sampler(self.scheduler, "scheduler (sampler=None steps as the folder's class)")

    def _sampler(self, sampler: str | None) -> str:
        return self.default_sampler if sampler is None else sampler

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

    def _embeddings(self, prompts: list[str], negative_prompts, *, clip_skip: int = 0, time_ids: tuple | None = None,
                    prompts_2=None, negative_prompts_2=None) -> tuple[Conditioning, Conditioning]:  # fmt: skip
        """(cond, uncond) of the prompts (`PromptEncoder.encode`) with the weights the pipeline runs with."""
        return self.prompt_encoder.encode(self._run_params, prompts, negative_prompts, clip_skip=clip_skip,
                                          time_ids=time_ids, prompts_2=prompts_2,
                                          negative_prompts_2=negative_prompts_2)  # fmt: skip

    def _cut_points(self, levels: np.ndarray, sampler: str, steps: int, karras: bool, fraction, name: str,
                    *, end: bool) -> np.ndarray:  # fmt: skip
        """The noise levels of a run cut where diffusers' SDXL pipelines cut it: `levels` ([steps + 1], from
        `_run_points`) kept up to denoising_end (`end`: the steps at training steps t >= `cutoff_step`, then the
        level they step to) or from denoising_start (the steps at t < `cutoff_step`). t are the scheduler's
        timesteps: the visited steps, or on the Karras grid diffusers' `_sigma_to_t` of each level."""
        fraction = check_fraction(name, fraction)
        if sampler not in HANDOFF_SAMPLERS:
            raise UsageError(f"{name} needs a sampler in {HANDOFF_SAMPLERS} (whose state carries over between "
                             f"pipelines as diffusers'), not {sampler!r}")  # fmt: skip
        scheduler = sampler_scheduler(self.scheduler, sampler)
        num_train = scheduler.schedule.num_timesteps
        if (karras or scheduler.use_karras_sigmas) and sampler != "euler_ancestral":
            sigmas = training_sigmas(scheduler)
            timesteps = np.interp(np.log(levels[:-1].astype(np.float64)), np.log(sigmas), np.arange(num_train))
        elif scheduler.timestep_spacing == "linspace":
            timesteps = np.linspace(0.0, num_train - 1.0, steps)[::-1]
        else:
            timesteps = visited_timesteps(scheduler, steps)
        cutoff = cutoff_step(num_train, fraction)
        count = int(np.sum(timesteps >= cutoff if end else timesteps < cutoff))
        if end:  # `levels` may be the tail of the run that strength < 1 leaves: count only its steps
            count -= steps + 1 - len(levels)
        if count <= 0:
            raise UsageError(f"{name}={fraction} leaves none of the {steps} steps (the cut is at training step "
                             f"{cutoff})")  # fmt: skip
        return levels[: count + 1] if end else levels[len(levels) - 1 - count :]

    def _noise(self, latents, shape: tuple[int, ...], rng: Array, name: str = "latents") -> Array:
        """N(0, I) noise of `shape`: `latents` (the argument called `name`) as float32, or drawn from `rng`."""
        if latents is None:
            return jax.random.normal(rng, shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise UsageError(f"{name} of shape {latents.shape}; expected {shape} (NHWC)")
        return latents

    def _finish(self, latents: Array, output_type: str) -> np.ndarray:
        if output_type == "latent":
            return np.asarray(latents)
        images = np.asarray(self._decode(self.params["vae"], latents))
        return images if output_type == "float" else to_uint8(images)

    # ------------------------------------------------------------------ public API

    def text_to_image(self, prompts, *, negative_prompts=None, steps: int = DEFAULT_STEPS,
                      guidance: float = DEFAULT_GUIDANCE, guidance_rescale: float = 0.0, sampler: str | None = None,
                      karras: bool = False, seed: int = 0, height: int | None = None, width: int | None = None,
                      latents=None, clip_skip: int = 0, denoising_end: float | None = None,
                      output_type: str = "uint8", prompts_2=None, negative_prompts_2=None,
                      **micro_conditioning) -> np.ndarray:  # fmt: skip
        """Images [B, height, width, 3] for B prompts: uint8 (or float in [0, 1] with output_type="float", or the
        final latents [B, height/f, width/f, C] with output_type="latent").
        `sampler` is one of LATENT_SAMPLERS (see `jaxdiff.latent.schedulers`), None the folder's scheduler class
        (`default_sampler`: PNDM for SD 1.x, Euler for SDXL, ...; DDIM for a jaxdiff training run); `karras` puts the KARRAS_SAMPLERS
        (all σ-grid samplers but euler_ancestral) on the Karras grid. `latents` [B, height/f, width/f, C] is the
        initial noise, N(0, I) (default: drawn from `seed`). `guidance_rescale` in [0, 1]: `rescale_guided`.
        `clip_skip`: the text encoders' layer (`jaxdiff.latent.prompt_conditioning`). SDXL: `denoising_end` in
        (0, 1) stops the run where diffusers' StableDiffusionXLPipeline does (with output_type="latent", the state
        a refiner's image_to_image(denoising_start=...) continues from; HANDOFF_SAMPLERS only);
        `prompts_2` / `negative_prompts_2`: what the second text encoder reads (default: `prompts` /
        `negative_prompts`), diffusers' prompt_2 / negative_prompt_2; `micro_conditioning`: the keywords of
        `MICRO_CONDITIONING` (original_size, crops_coords_top_left, target_size, their negative_ versions)."""
        if self.inpainting_unet:
            raise UsageError("this is an inpainting U-Net (9 input channels): use inpaint()")
        if self.model.requires_aesthetics_score:
            raise UsageError("text_to_image(): this SDXL folder is a refiner (requires_aesthetics_score): it runs "
                             "image_to_image() and inpaint()")  # fmt: skip
        prompts = prompt_list(prompts, "prompts")
        sampler = self._sampler(sampler)
        guidance = self._check_settings(steps, guidance, sampler, karras, output_type, seed)
        rescale = _check_number("guidance_rescale", guidance_rescale, 0.0, 1.0, low_open=False)
        clip_skip = self.prompt_encoder.check_clip_skip(clip_skip)
        height, width = self._check_size(height, width)
        time_ids = self.prompt_encoder.time_ids((height, width), micro_conditioning, image_to_image=False)
        shape = (len(prompts), height // self.latent_factor, width // self.latent_factor, self.latent_channels)
        noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed))
        points = self._run_points(sampler, steps, karras)
        if denoising_end is not None:
            points = self._cut_points(points, sampler, steps, karras, denoising_end, "denoising_end", end=True)
        x_start = self._start(sampler, points, self._noise(latents, shape, noise_rng))
        cond, uncond = self._embeddings(prompts, negative_prompts, clip_skip=clip_skip, time_ids=time_ids,
                                        prompts_2=prompts_2, negative_prompts_2=negative_prompts_2)  # fmt: skip
        run = self._loop(points, sampler, guidance, "plain", rescale)
        return self._finish(run(self._run_params["unet"], cond, uncond, x_start, loop_rng, None, None, None, None),
                            output_type)  # fmt: skip

    def image_to_image(self, images, prompts, *, strength: float | None = None, negative_prompts=None,
                       steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, guidance_rescale: float = 0.0,
                       sampler: str | None = None, karras: bool = False, seed: int = 0, latents=None,
                       clip_skip: int = 0, denoising_start: float | None = None, output_type: str = "uint8", prompts_2=None,
                       negative_prompts_2=None, **micro_conditioning) -> np.ndarray:  # fmt: skip
        """SDEdit: encode `images` [B, H, W, 3], noise them to the step where diffusers starts for `strength` in
        (0, 1] (the last int(steps·strength) steps are run), denoise. `latents` is the noise added (default:
        drawn from `seed`). SDXL's hand-off: with `denoising_start` in (0, 1), `images` are latents
        [B, h, w, C] from text_to_image(denoising_end=..., output_type="latent"), continued from where diffusers'
        StableDiffusionXLImg2ImgPipeline starts (no strength, no noise added). `guidance_rescale`, `clip_skip`,
        `prompts_2`, `negative_prompts_2` and `micro_conditioning` (MICRO_CONDITIONING; aesthetic_score and
        negative_aesthetic_score for a refiner) as in `text_to_image`."""
        if self.inpainting_unet:
            raise UsageError("this is an inpainting U-Net (9 input channels): use inpaint()")
        prompts = prompt_list(prompts, "prompts")
        sampler = self._sampler(sampler)
        guidance = self._check_settings(steps, guidance, sampler, karras, output_type, seed)
        rescale = _check_number("guidance_rescale", guidance_rescale, 0.0, 1.0, low_open=False)
        clip_skip = self.prompt_encoder.check_clip_skip(clip_skip)
        encode_rng, noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
        if denoising_start is None:
            if strength is None:
                raise UsageError("image_to_image() needs strength in (0, 1] (or denoising_start with latents)")
            strength = _check_number("strength", strength, 0.0, 1.0, low_open=True)
            pixels = self._checked_images(images, len(prompts))
            time_ids = self.prompt_encoder.time_ids(pixels.shape[1:3], micro_conditioning, image_to_image=True)
            points = self._run_points(sampler, steps, karras, strength)
            image_latents = self._encode_image(self.params["vae"], jnp.asarray(pixels), encode_rng)
            noise = self._noise(latents, tuple(image_latents.shape), noise_rng)
            x_start = self._start(sampler, points, noise, image_latents)
        else:
            for name, value in (("strength", strength), ("latents", latents)):
                if value is not None:
                    raise UsageError(f"{name} does not apply with denoising_start (the run continues the latents "
                                     "given as images from the cut)")  # fmt: skip
            x_start = self._checked_latents(images, len(prompts))
            size = (x_start.shape[1] * self.latent_factor, x_start.shape[2] * self.latent_factor)
            time_ids = self.prompt_encoder.time_ids(size, micro_conditioning, image_to_image=True)
            points = self._cut_points(self._run_points(sampler, steps, karras), sampler, steps, karras,
                                      denoising_start, "denoising_start", end=False)  # fmt: skip
        cond, uncond = self._embeddings(prompts, negative_prompts, clip_skip=clip_skip, time_ids=time_ids,
                                        prompts_2=prompts_2, negative_prompts_2=negative_prompts_2)  # fmt: skip
        run = self._loop(points, sampler, guidance, "plain", rescale)
        return self._finish(run(self._run_params["unet"], cond, uncond, x_start, loop_rng, None, None, None, None),
                            output_type)  # fmt: skip

    def inpaint(self, images, masks, prompts, *, strength: float = 1.0, negative_prompts=None,
                steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, guidance_rescale: float = 0.0,
                sampler: str | None = None, karras: bool = False, seed: int = 0, latents=None, clip_skip: int = 0,
                denoising_end: float | None = None, output_type: str = "uint8", prompts_2=None,
                negative_prompts_2=None, **micro_conditioning) -> np.ndarray:  # fmt: skip
        """Repaint `images` [B, H, W, 3] where `masks` (see the module docstring) are set. A 9-channel inpainting
        U-Net gets the latent mask and the masked image's latents as extra input channels; a 4-channel U-Net
        keeps the image's latents (noised to the current step) outside the mask after every step. `latents` is
        the initial noise (default: drawn from `seed`); with strength < 1 the run starts from the image noised
        with it, as image_to_image. SDXL folders (base, refiner or StableDiffusionXLInpaintPipeline) inpaint as
        diffusers' StableDiffusionXLInpaintPipeline, with `micro_conditioning` as image_to_image's; `denoising_end`
        stops the run as text_to_image's does (the latents outside the mask are then the image's, clean, as
        diffusers'). `guidance_rescale`, `clip_skip`, `prompts_2` and `negative_prompts_2` as in `text_to_image`."""
        if "denoising_start" in micro_conditioning:
            raise UsageError("inpaint() takes no denoising_start (diffusers' inpainting pipeline noises the handed-off "
                             "latents again outside the mask); continue a cut run with image_to_image()")  # fmt: skip
        prompts = prompt_list(prompts, "prompts")
        strength = _check_number("strength", strength, 0.0, 1.0, low_open=True)
        sampler = self._sampler(sampler)
        guidance = self._check_settings(steps, guidance, sampler, karras, output_type, seed)
        rescale = _check_number("guidance_rescale", guidance_rescale, 0.0, 1.0, low_open=False)
        clip_skip = self.prompt_encoder.check_clip_skip(clip_skip)
        pixels = self._checked_images(images, len(prompts))
        mask = _mask_array(masks, pixels.shape)
        time_ids = self.prompt_encoder.time_ids(pixels.shape[1:3], micro_conditioning, image_to_image=True)
        points = self._run_points(sampler, steps, karras, strength)
        if denoising_end is not None:
            points = self._cut_points(points, sampler, steps, karras, denoising_end, "denoising_end", end=True)
        encode_rng, masked_rng, noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(seed), 4)
        f = self.latent_factor
        latent_mask = jnp.asarray(mask[:, ::f, ::f])  # nearest-neighbour downsampling, as torch's interpolate
        image_latents = self._encode_image(self.params["vae"], jnp.asarray(pixels), encode_rng)
        noise = self._noise(latents, tuple(image_latents.shape), noise_rng)
        x_start = self._start(sampler, points, noise, None if strength == 1.0 else image_latents)
        cond, uncond = self._embeddings(prompts, negative_prompts, clip_skip=clip_skip, time_ids=time_ids,
                                        prompts_2=prompts_2, negative_prompts_2=negative_prompts_2)  # fmt: skip
        if self.inpainting_unet:
            masked_pixels = np.where(mask > 0.5, 0.5, pixels)  # 0 in the autoencoder's [-1, 1], as diffusers
            masked = self._encode_image(self.params["vae"], jnp.asarray(masked_pixels), masked_rng)
            condition = jnp.concatenate([latent_mask, masked], axis=-1)
            run = self._loop(points, sampler, guidance, "condition", rescale)
            latents_out = run(self._run_params["unet"], cond, uncond, x_start, loop_rng, condition, None, None, None)
        else:
            run = self._loop(points, sampler, guidance, "blend", rescale)
            latents_out = run(self._run_params["unet"], cond, uncond, x_start, loop_rng, None, latent_mask,
                              image_latents, noise)  # fmt: skip
        return self._finish(latents_out, output_type)

    def _checked_latents(self, latents, batch: int) -> Array:
        """Latents [B, h, w, C] (NHWC, float, in the U-Net's scale) for `batch` prompts, as float32."""
        array = np.asarray(latents)
        if array.ndim != 4 or array.shape[-1] != self.latent_channels or not np.issubdtype(array.dtype, np.floating):
            raise UsageError(f"with denoising_start, images must be float latents [B, h, w, {self.latent_channels}] "
                             f"(NHWC, from text_to_image(output_type='latent')), got {array.dtype} {array.shape}")
        if array.shape[0] != batch:
            raise UsageError(f"{array.shape[0]} latents for {batch} prompts; give one per prompt")
        self._check_size(array.shape[1] * self.latent_factor, array.shape[2] * self.latent_factor)
        return jnp.asarray(array, jnp.float32)

    def _checked_images(self, images, batch: int) -> np.ndarray:
        pixels = _image_array(images, "images")
        if pixels.shape[0] != batch:
            raise UsageError(f"{pixels.shape[0]} images for {batch} prompts; give one image per prompt")
        self._check_size(pixels.shape[1], pixels.shape[2])
        return pixels
