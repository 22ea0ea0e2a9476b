"""The `sample` verb: images from a trained model or released weights (a .png grid, an .npz file or
resumable .npz shards, optionally with a noise-to-image trajectory), and with `--prompt` text-to-image,
image-to-image or inpainting from Stable Diffusion weights or a latent run, or the x4 upscale of `--init-image`
from an upscaler folder; the image files it reads and writes."""

from __future__ import annotations

import os

import numpy as np

from jaxdiff.cli.errors import UsageError, reject_extra
from jaxdiff.cli.paths import (
    check_output_dir,
    check_output_file,
    check_weights,
    load_pipeline,
    reading_weights,
)
from jaxdiff.cli.sampler_flags import (
    FLOW_OPTIONS,
    SAMPLER_OPTIONS,
    checked_sampler,
    saved_run,
)

# The flags only one kind of sampling reads (their parser default is None): text-to-image (`--prompt`) refuses the
# pixel-space ones by name, and pixel-space sampling the text ones, so no flag is silently dropped.
TEXT_FLAGS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "init_image", "strength", "mask",
              "height", "width", "config_folder", "lora")
PIXEL_FLAGS = ("eta", "trajectory", "class_label", "batch_size", "shard_size", *SAMPLER_OPTIONS, *FLOW_OPTIONS)
# Read on the pixel-space path for an original DiT or SiT checkpoint (--pretrained X.pt) only, refused by name
# elsewhere.
DIT_CHECKPOINT_FLAGS = ("vae", "variant")
DIT_CHECKPOINT_WHAT = "the autoencoder and variant of a DiT/SiT checkpoint (.pt)"
# Read by the x4 upscaler only (refused by name elsewhere), and the text-to-image flags the upscaler refuses.
UPSCALE_FLAGS = ("noise_level",)
NOT_UPSCALE_FLAGS = ("strength", "mask", "height", "width", "config_folder", "lora", "prompt_2", "negative_prompt_2")
# Why --dtype is refused with --workdir (it is read for released weights only).
DTYPE_WORKDIR = "the dtype of released weights (--pretrained); a workdir's run config sets its own"
DEFAULT_SHARD_SIZE = 1000
DEFAULT_NUM = 64  # images drawn by default (an upscaler: 1, the upscale of --init-image)


def _refuse(args, names, why: str) -> None:
    """A UsageError naming every flag of `names` that was given, and `why` it is refused."""
    given = ["--" + name.replace("_", "-") for name in names if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: {why}")


def _write_trajectory(path: str, trajectory: np.ndarray) -> None:
    """uint8 [K, N, H, W, C] frames -> a strip PNG (one row per image, noise to image) or an animated GIF."""
    from PIL import Image

    from jaxdiff import images

    frames, n = trajectory.shape[:2]
    if path.lower().endswith(".gif"):
        grids = [Image.fromarray(images.make_grid(frame).squeeze()) for frame in trajectory]
        grids[0].save(path, save_all=True, append_images=grids[1:], duration=120, loop=0)
        return
    rows = np.swapaxes(trajectory, 0, 1).reshape(n * frames, *trajectory.shape[2:])
    images.save_png(images.make_grid(rows, columns=frames), path, scale=max(1, 64 // trajectory.shape[2]))


def _read_image(path: str, what: str, mode: str) -> np.ndarray:
    """An image file as uint8 [H, W, 3] (mode "RGB") or [H, W] (mode "L")."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} does not exist")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except UnidentifiedImageError:
        raise UsageError(f"{what} {path!r} is not an image file") from None


def _lora_flags(args) -> list[tuple[str, float]]:
    """(path, scale) of each `--lora FILE[:SCALE]` (scale 1 without one), checked before any work."""
    from jaxdiff.latent.lora import check_lora_scale

    loras = []
    for value in args.lora or ():
        path, scale = value, 1.0
        head, colon, tail = value.rpartition(":")
        if colon and not os.path.exists(value):
            try:
                path, scale = head, float(tail)
            except ValueError:
                raise UsageError(f"--lora {value!r}: SCALE (after the last ':') must be a number") from None
        check_weights(path, "--lora")
        loras.append((path, check_lora_scale(scale)))
    return loras


def _sample_pretrained(args, upscaler: bool = False, flow=None) -> int:
    """`sample --pretrained`, or `--workdir` of a latent run with `--prompt`: text-to-image, image-to-image
    (--init-image) or inpainting (--mask); with `upscaler` (an x4 upscaler folder) the upscale of --init-image
    (--num copies, each with its own noise); `flow` the pipeline class of an SD3 / Flux folder (its scheduler's own
    steps: no --sampler, --spacing; --guidance unset leaves the pipeline's default)."""
    if args.config:
        raise UsageError(f"--config {args.config!r}: Stable Diffusion weights carry their own configs")
    if args.prompt is None:
        raise UsageError('text-to-image weights need --prompt (--prompt "" draws unconditional samples)')
    _refuse(args, PIXEL_FLAGS, "options of pixel-space sampling; text-to-image (--prompt) does not take them")
    _refuse(args, DIT_CHECKPOINT_FLAGS, f"{DIT_CHECKPOINT_WHAT}; text-to-image weights carry their own")
    if upscaler:
        _refuse(args, NOT_UPSCALE_FLAGS, "options of text-to-image, image-to-image and inpainting; the x4 upscaler "
                                         "does not take them")  # fmt: skip
        if args.init_image is None:
            raise UsageError("the x4 upscaler needs --init-image (the low-resolution image to upscale)")
    if flow is not None:
        _refuse(args, ["sampler", "spacing", "prompt_2", "negative_prompt_2"],
                "options of the Stable Diffusion / SDXL pipelines; an SD3 or Flux folder steps as its own scheduler")
    num = (1 if upscaler else DEFAULT_NUM) if args.num is None else args.num
    if num < 1:
        raise UsageError(f"--num {num}: give at least one image")
    if args.spacing not in (None, "karras"):
        raise UsageError(f"--spacing {args.spacing!r}: text-to-image takes only 'karras' (Karras σ); its scheduler "
                         "config sets the timestep spacing")  # fmt: skip
    if (args.mask or args.strength is not None) and not args.init_image:
        raise UsageError("--mask and --strength need --init-image")
    from jaxdiff.latent.sdxl import sdxl_refiner

    refiner = sdxl_refiner(args.pretrained) if args.pretrained else None
    if refiner and not args.init_image:
        raise UsageError(f"{args.pretrained!r} is an SDXL refiner (requires_aesthetics_score): it needs "
                         "--init-image (image-to-image, or inpainting with --mask)")  # fmt: skip
    single_file = bool(args.pretrained) and os.path.isfile(args.pretrained)  # SDXL or not: the pipeline tells
    if refiner is not False and not single_file:
        why = "an SDXL refiner's only text encoder reads --prompt" if refiner else "these weights are not SDXL"
        _refuse(args, ["prompt_2", "negative_prompt_2"], f"the prompts of SDXL's second text encoder; {why}")
    if args.init_image and (args.height or args.width):
        raise UsageError("--height/--width are for text-to-image; with --init-image the image sets the size")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must be a .png grid with --pretrained, got {args.out!r}")
    check_output_file(args.out, "--out")
    init = _read_image(args.init_image, "--init-image", "RGB") if args.init_image else None
    mask = _read_image(args.mask, "--mask", "L") if args.mask else None
    loras = _lora_flags(args)

    from jaxdiff import images
    from jaxdiff.latent import pipeline, upscale
    from jaxdiff.latent.pipeline import LatentPipeline

    if args.pretrained:
        if args.step is not None:
            raise UsageError(f"--step {args.step}: released weights have no checkpoint steps (it is for --workdir)")
        dtype = args.dtype or "float32"
        with reading_weights(args.pretrained):
            if flow is not None:
                pipe = flow.from_pretrained(args.pretrained, config_folder=args.config_folder, dtype=dtype)
            elif upscaler:
                pipe = upscale.UpscalePipeline.from_pretrained(args.pretrained, dtype=dtype)
            else:
                pipe = LatentPipeline.from_pretrained(args.pretrained, config_folder=args.config_folder, dtype=dtype)
    else:
        _refuse(args, ["dtype"], DTYPE_WORKDIR)
        check_weights(args.workdir)
        pipe = load_pipeline(args.workdir, args.step)
        if not isinstance(pipe, LatentPipeline):
            raise UsageError(f"--prompt needs a text-conditioned model; {args.workdir!r} is not a latent run")
    for path, scale in loras:
        pipe.load_lora(path, scale)
    prompts = [args.prompt] * num
    defaults = upscale if upscaler else pipeline
    settings = dict(negative_prompts=None if args.negative_prompt is None else [args.negative_prompt] * num,
                    steps=defaults.DEFAULT_STEPS if args.steps is None else args.steps, seed=args.seed,
                    sampler=args.sampler,  # None: the folder's scheduler class
                    karras=args.spacing == "karras",
                    guidance=defaults.DEFAULT_GUIDANCE if args.guidance is None else args.guidance)  # fmt: skip
    if flow is not None:  # the pipeline's own defaults for what was not given
        del settings["sampler"], settings["karras"]
        settings.update(steps=args.steps, guidance=args.guidance)
        settings = {key: value for key, value in settings.items() if value is not None}
    for name in ("prompt_2", "negative_prompt_2"):  # SDXL's; the pipeline refuses them for other weights
        if getattr(args, name) is not None:
            settings[name.replace("prompt", "prompts")] = [getattr(args, name)] * num
    if upscaler:
        noise_level = upscale.DEFAULT_NOISE_LEVEL if args.noise_level is None else args.noise_level
        samples = pipe.upscale(np.repeat(init[None], num, 0), prompts, noise_level=noise_level, **settings)
        images.save_png(samples[0] if num == 1 else images.make_grid(samples), args.out)
        print(f"{num} {'image' if num == 1 else 'images'} of {init.shape[0]}×{init.shape[1]} upscaled to "
              f"{samples.shape[1]}×{samples.shape[2]} -> {args.out}")
        return 0
    if init is None:
        samples = pipe.text_to_image(prompts, height=args.height, width=args.width, **settings)
    elif mask is None:
        strength = 0.8 if args.strength is None else args.strength
        samples = pipe.image_to_image(np.repeat(init[None], num, 0), prompts, strength=strength, **settings)
    else:
        strength = 1.0 if args.strength is None else args.strength
        samples = pipe.inpaint(np.repeat(init[None], num, 0), np.repeat(mask[None], num, 0), prompts,
                               strength=strength, **settings)  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    images.save_png(images.make_grid(samples), args.out)
    print(f"{len(samples)} images -> {args.out}")
    return 0


def _dit_pipeline(args):
    """The pipeline of `--pretrained` DiT weights (an original `.pt` with `--vae`, or a DiTPipeline folder), after
    checking the flags that apply to them; None for weights of other formats (refusing `--vae` there)."""
    from jaxdiff.readers.formats import DIT_FORMATS, detect_format

    fmt = detect_format(args.pretrained)
    if fmt != "dit":
        why = "a DiTPipeline folder has its own vae/" if fmt == "dit_pipeline" else f"{fmt!r} weights draw no latents"
        _refuse(args, DIT_CHECKPOINT_FLAGS, f"{DIT_CHECKPOINT_WHAT}; {why}")
    elif args.vae is None:
        raise UsageError(f"--pretrained {args.pretrained!r} is a DiT checkpoint, which holds only the network: give "
                         "--vae FOLDER (a diffusers AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema)")  # fmt: skip
    if fmt not in DIT_FORMATS:
        _refuse(args, ["dtype"], f"the dtype of Stable Diffusion, SD3, Flux and DiT / SiT weights; {fmt!r} weights "
                                 "run in their config's dtype")  # fmt: skip
        return None
    if args.config:
        raise UsageError(f"--config {args.config!r}: DiT weights carry their own config")
    if args.step is not None:
        raise UsageError(f"--step {args.step}: released weights have no checkpoint steps (it is for --workdir)")
    if args.vae is not None:
        check_weights(args.vae, "--vae")

    from jaxdiff.sampling.pipeline import Pipeline

    with reading_weights(args.pretrained):
        return Pipeline.from_pretrained(args.pretrained, vae=args.vae, variant=args.variant,
                                        dtype=args.dtype or "float32")  # fmt: skip


def _not_text_to_image(model: str) -> UsageError:
    """The refusal of sampling a text-to-image `model` (its path) without --prompt."""
    return UsageError(f"{model!r} is a text-to-image model: give --prompt (--prompt \"\" draws unconditional samples)")


def _check_trajectory(args, source) -> None:
    if args.trajectory and not source.draws_trajectories:
        raise UsageError("--trajectory is for the discrete family's own samplers; this model is continuous-time or "
                         "steps as a diffusers scheduler")  # fmt: skip


def _check_workdir_flags(args) -> tuple[str, dict] | None:
    """(the sampler, the config.sampling options the flags give), with --trajectory, checked on `--workdir`'s saved
    config before its parameters are read; None where only the loaded model tells (its flags are checked then)."""
    task, family = saved_run(args.workdir, args.step)
    if task == "latent":
        raise _not_text_to_image(args.workdir)
    if family is None:
        return None
    checked = checked_sampler(family, family, args)
    _check_trajectory(args, family)
    return checked


def run_sample(args, extra) -> int:
    reject_extra(extra)
    if args.workdir and args.pretrained:
        raise UsageError("give either --workdir or --pretrained, not both")
    if not (args.workdir or args.pretrained):
        raise UsageError("sample needs --workdir (a trained model) or --pretrained (released weights)")
    if args.config and not args.pretrained:
        raise UsageError("--config names the recipe of --pretrained weights; a --workdir has its own config")
    if args.pretrained:
        check_weights(args.pretrained, "--pretrained")
        from jaxdiff.latent.stable_diffusion import is_stable_diffusion, is_upscaler

        if is_upscaler(args.pretrained):
            return _sample_pretrained(args, upscaler=True)
    _refuse(args, UPSCALE_FLAGS, "for an x4 upscaler (--pretrained of a StableDiffusionUpscalePipeline folder)")
    from jaxdiff.latent.flow_pipeline import folder_pipeline_class
    from jaxdiff.latent.flux_pipeline import FluxPipeline
    from jaxdiff.latent.sd3 import SD3Pipeline

    # An SD3 / Flux folder, or an original single-file transformer with such a folder as --config-folder.
    folder = args.config_folder if args.pretrained and os.path.isfile(args.pretrained) else args.pretrained
    flow = [c for c in (SD3Pipeline, FluxPipeline) if folder and folder_pipeline_class(folder) in c.pipeline_classes]
    if flow:
        return _sample_pretrained(args, flow=flow[0])
    if args.pretrained and is_stable_diffusion(args.pretrained):
        return _sample_pretrained(args)
    if args.prompt is not None:  # text-to-image from a latent run
        return _sample_pretrained(args)
    args.num = DEFAULT_NUM if args.num is None else args.num
    _refuse(args, TEXT_FLAGS, "options of text-to-image, which needs --prompt")
    to_dir = args.out.endswith(os.sep) or os.path.isdir(args.out)
    if to_dir:
        check_output_dir(args.out, "--out")
        _refuse(args, ["batch_size"], "the shard job (--out DIR/) draws --shard-size images per batch")
    elif not args.out.lower().endswith((".png", ".npz")):
        raise UsageError(f"--out must be a .png grid, a .npz file or a directory/, got {args.out!r}")
    else:
        check_output_file(args.out, "--out")
        _refuse(args, ["shard_size"], "for --out DIR/ (resumable .npz shards)")
    if args.trajectory:
        if not args.trajectory.lower().endswith((".png", ".gif")):
            raise UsageError(f"--trajectory must be a .png strip or a .gif animation, got {args.trajectory!r}")
        check_output_file(args.trajectory, "--trajectory")
    if args.workdir:
        check_weights(args.workdir)
        _refuse(args, DIT_CHECKPOINT_FLAGS, f"{DIT_CHECKPOINT_WHAT}; a workdir has its own config")
        _refuse(args, ["dtype"], DTYPE_WORKDIR)
    checked = _check_workdir_flags(args) if args.workdir else None

    import jax

    from jaxdiff import images
    from jaxdiff.latent.pipeline import LatentPipeline
    from jaxdiff.sampling.shard_jobs import sample_to_shards

    pipe = _dit_pipeline(args) if args.pretrained else None
    if pipe is None:
        pipe = load_pipeline(args.workdir or args.pretrained, args.step, args.config)
    if isinstance(pipe, LatentPipeline):
        raise _not_text_to_image(args.workdir or args.pretrained)
    if checked is None:
        checked = checked_sampler(pipe.sampler_source, pipe.family, args)
        _check_trajectory(args, pipe)
    sampler, options = checked
    pipe.config.sampling.update(options)
    settings = dict(sampler=sampler, steps=args.steps, eta=args.eta or 0.0, spacing=args.spacing,
                    class_label=args.class_label, guidance=args.guidance)  # fmt: skip
    if to_dir:
        shards = sample_to_shards(pipe, args.out, num_images=args.num, shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
                                  seed=args.seed,
                                  **settings)  # fmt: skip
        wrote = f"{args.num} images in {len(shards)} shards under {args.out}"
    else:
        samples = pipe.sample(args.num, seed=args.seed, batch_size=args.batch_size, progress=True, **settings)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.out.lower().endswith(".npz"):
            np.savez(args.out, images=samples)
        else:
            images.save_png(images.make_grid(samples), args.out, scale=max(1, 64 // samples.shape[1]))
        step = "" if pipe.step is None else f" (checkpoint step {pipe.step})"
        wrote = f"{len(samples)} images{step} -> {args.out}"
    if args.trajectory:
        n = min(8, args.num)
        _, _, trajectory = pipe.sample_batch(n, jax.random.fold_in(jax.random.PRNGKey(args.seed), 0),
                                             return_trajectory=True, **settings)  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.trajectory)), exist_ok=True)
        _write_trajectory(args.trajectory, trajectory)
        wrote += f"; trajectory of {n} images, {len(trajectory)} frames -> {args.trajectory}"
    print(wrote)
    return 0
