"""The `jaxdiff` command: train | sample | eval | convert | data | info.

`--config` takes a config file (an ml_collections file defining `get_config()`)
or a recipe name (`jaxdiff.recipes.RECIPES`); any key can be overridden as
`--config.section.key=value`, and the result is validated before anything runs.

A user's mistake (bad value, bad file, bad path, missing data) ends with exit
status 2 and one line on stderr; an internal error with status 1, a request to
report it and the traceback. `-v/--verbose` adds the traceback to every error
and shows all libraries' log messages.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback

import ml_collections
import numpy as np

logger = logging.getLogger("jaxdiff")


class UsageError(ValueError):
    """A mistake in the command line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a value, a file, a path, missing data) rather than a bug."""
    import zipfile

    from safetensors import SafetensorError

    from jaxdiff.checkpoint import CheckpointError
    from jaxdiff.data import DatasetNotFoundError

    return (ValueError, OSError, CheckpointError, DatasetNotFoundError, FloatingPointError, SafetensorError,
            zipfile.BadZipFile)  # fmt: skip


def load_config(source: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """The config of file `source` (or recipe `source`) with `--config.a.b=v` overrides applied, validated.

    Raises ConfigError (a ValueError) naming the file, key or value at fault.
    """
    from absl import flags
    from ml_collections import config_flags

    from jaxdiff.config import ConfigError, default_config, flat_keys, unknown_key_error, validate
    from jaxdiff.recipes import RECIPES, recipe

    bad = [arg for arg in overrides if not arg.startswith("--config.")]
    if bad:
        raise UsageError(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --config.seed=1)")
    known = flat_keys(default_config())
    for arg in overrides:
        key = arg[len("--config.") :].split("=", 1)[0]
        if key not in known:
            raise unknown_key_error(key)
    values = flags.FlagValues()
    if os.path.isfile(source):
        argv = ["jaxdiff", f"--config={source}", *overrides]
        config_flags.DEFINE_config_file("config", default=None, flag_values=values, lock_config=True, sys_argv=argv)
    elif source in RECIPES:
        argv = ["jaxdiff", *overrides]
        config_flags.DEFINE_config_dict("config", recipe(source), flag_values=values, lock_config=True, sys_argv=argv)
    elif os.path.exists(source):
        raise ConfigError(f"config {source!r} is not a file")
    else:
        raise ConfigError(f"config {source!r} is neither a config file nor a recipe; recipes: {', '.join(RECIPES)}")
    try:
        values(argv)
        config = values.config
        config.to_dict()  # a file that failed to load yields a stand-in that raises its error here
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError, ImportError, SyntaxError) as err:
        message = " ".join(str(err).split())
        raise ConfigError(f"bad config {source!r} or override: {message}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {source!r}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return validate(config)


# Paths, checked before any work


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_creatable(path: str, what: str) -> None:
    """`path` does not exist; its nearest existing ancestor must be a directory we may write in."""
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise UsageError(f"{what} {path!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path!r} cannot be created: no permission to write in {existing!r}")


def check_output_dir(path: str, what: str) -> None:
    """`path` is a writable directory, or one that can be created."""
    if not os.path.exists(path):
        _check_creatable(path, what)
    elif not os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a file, not a directory")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path!r}: no permission to write in it")


def check_output_file(path: str, what: str) -> None:
    """`path` is a file we may overwrite, or one that can be created (with its folders)."""
    if not os.path.exists(path):
        _check_creatable(path, what)
    elif os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a directory, not a file")
    elif not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path!r}: no permission to overwrite it")


def _check_weights(path: str, what: str = "--workdir") -> None:
    """A weights path (workdir, diffusers folder, TF checkpoint prefix) that exists."""
    if not os.path.exists(path) and not os.path.exists(f"{path}.index"):
        raise UsageError(f"{what} {path!r} does not exist")


@contextlib.contextmanager
def _reading_weights(path: str):
    """safetensors' own error for a damaged file, as a user error naming the weights."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise UsageError(f"the .safetensors weights under {path!r} are damaged or not safetensors ({err})") from err


def _load_pipeline(path: str, step: int | None, config: str | None = None):
    from jaxdiff.pipeline import Pipeline

    with _reading_weights(path):
        return Pipeline.from_pretrained(path, step=step, config=config)


# Verbs


def _train(args, extra) -> int:
    from jaxdiff import sharding
    from jaxdiff.training_run import train_and_evaluate

    config = load_config(args.config, extra)
    check_output_dir(args.workdir, "--workdir")
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    result = train_and_evaluate(config, args.workdir, allow_config_change=args.allow_config_change,
                                verbose=args.verbose)  # fmt: skip
    print(f"{'preempted' if result.preempted else 'finished'} at step {result.step}; workdir {args.workdir}")
    return 0


def _info(args, extra) -> int:
    from jaxdiff.models.summary import model_summary

    config = load_config(args.config, extra)
    summary = model_summary(config.model)
    print(f"parameters: {summary['parameters']:,}")
    print(f"forward GFLOPs per image: {summary['gflops']:.2f} (every multiply-add of convolutions and matmuls)")
    print(f"XLA cost analysis GFLOPs: {summary['xla_gflops']:.2f} (omits convolution taps on zero padding)")
    return 0


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


def _no_extra(extra: list[str]) -> None:
    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")


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


def _sample_pretrained(args) -> int:
    """`sample --pretrained`, or `--workdir` of a latent run with `--prompt`: text-to-image, image-to-image
    (--init-image) or inpainting (--mask)."""
    if args.config:
        raise UsageError(f"--config {args.config!r}: Stable Diffusion weights carry their own configs")
    if args.prompt is None:
        raise UsageError("--pretrained needs --prompt")
    if (args.mask or args.strength is not None) and not args.init_image:
        raise UsageError("--mask and --strength need --init-image")
    if args.init_image and (args.height or args.width):
        raise UsageError("--height/--width are for text-to-image; with --init-image the image sets the size")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must be a .png grid with --pretrained, got {args.out!r}")
    check_output_file(args.out, "--out")
    init = _read_image(args.init_image, "--init-image", "RGB") if args.init_image else None
    mask = _read_image(args.mask, "--mask", "L") if args.mask else None

    from jaxdiff import images
    from jaxdiff.latent_pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, LatentPipeline

    if args.pretrained:
        with _reading_weights(args.pretrained):
            pipe = LatentPipeline.from_pretrained(args.pretrained, config_folder=args.config_folder)
    else:
        _check_weights(args.workdir)
        pipe = _load_pipeline(args.workdir, args.step)
        if not isinstance(pipe, LatentPipeline):
            raise UsageError(f"--prompt needs a text-conditioned model; {args.workdir!r} is not a latent run")
    prompts = [args.prompt] * args.num
    settings = dict(negative_prompts=None if args.negative_prompt is None else [args.negative_prompt] * args.num,
                    steps=args.steps or DEFAULT_STEPS, sampler=args.sampler or "ddim", seed=args.seed,
                    karras=args.spacing == "karras",
                    guidance=DEFAULT_GUIDANCE if args.guidance is None else args.guidance)  # fmt: skip
    if init is None:
        samples = pipe.text_to_image(prompts, height=args.height, width=args.width, **settings)
    elif mask is None:
        strength = 0.8 if args.strength is None else args.strength
        samples = pipe.image_to_image(np.repeat(init[None], args.num, 0), prompts, strength=strength, **settings)
    else:
        strength = 1.0 if args.strength is None else args.strength
        samples = pipe.inpaint(np.repeat(init[None], args.num, 0), np.repeat(mask[None], args.num, 0), prompts,
                               strength=strength, **settings)  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    images.save_png(images.make_grid(samples), args.out)
    print(f"{len(samples)} images -> {args.out}")
    return 0


def _sample(args, extra) -> int:
    _no_extra(extra)
    if args.workdir and args.pretrained:
        raise UsageError("give either --workdir or --pretrained, not both")
    if not (args.workdir or args.pretrained):
        raise UsageError("sample needs --workdir (a trained model) or --pretrained (released weights)")
    if args.config and not args.pretrained:
        raise UsageError("--config names the recipe of --pretrained weights; a --workdir has its own config")
    if args.pretrained:
        _check_weights(args.pretrained, "--pretrained")
        from jaxdiff.convert.stable_diffusion import is_stable_diffusion

        if is_stable_diffusion(args.pretrained):
            return _sample_pretrained(args)
    if args.prompt is not None:  # text-to-image from a latent run
        return _sample_pretrained(args)
    to_dir = args.out.endswith(os.sep) or os.path.isdir(args.out)
    if to_dir:
        check_output_dir(args.out, "--out")
    elif not args.out.lower().endswith((".png", ".npz")):
        raise UsageError(f"--out must be a .png grid, a .npz file or a directory/, got {args.out!r}")
    else:
        check_output_file(args.out, "--out")
    if args.trajectory:
        if not args.trajectory.lower().endswith((".png", ".gif")):
            raise UsageError(f"--trajectory must be a .png strip or a .gif animation, got {args.trajectory!r}")
        check_output_file(args.trajectory, "--trajectory")
    if args.workdir:
        _check_weights(args.workdir)

    import jax

    from jaxdiff import images
    from jaxdiff.sampling_job import sample_to_shards

    pipe = _load_pipeline(args.workdir or args.pretrained, args.step, args.config)
    sampler = _sampler_settings(pipe, args)
    if args.trajectory and pipe.continuous:
        raise UsageError("--trajectory is for discrete-schedule models; this model is continuous-time")
    settings = dict(sampler=sampler, steps=args.steps, eta=args.eta, spacing=args.spacing,
                    class_label=args.class_label, guidance=args.guidance or 0.0)  # fmt: skip
    if to_dir:
        shards = sample_to_shards(pipe, args.out, num_images=args.num, shard_size=args.shard_size, seed=args.seed,
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


# Options of the continuous samplers: flag attribute -> config.sampling key.
SAMPLER_OPTIONS = {
    "predictor": "predictor", "corrector": "corrector", "snr": "snr", "n_corrector": "n_corrector", "rtol": "rtol",
    "atol": "atol", "s_churn": "s_churn", "s_min": "s_min", "s_max": "s_max", "s_noise": "s_noise",
}  # fmt: skip


def _add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampler", help="discrete models: ddpm (default) | ddim | dpm_solver++ | heun; continuous "
                        "models: euler_maruyama | reverse_diffusion | ancestral | pc | ode | heun | edm_stochastic | "
                        "dpm_solver++ | ddim (default: the config's)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="sampling steps (default: all T for ddpm/ddim; the sampler's)")
    parser.add_argument("--predictor", help="pc: euler_maruyama | reverse_diffusion | ancestral")
    parser.add_argument("--corrector", help="pc: langevin | ald | none")
    parser.add_argument("--snr", type=float, help="pc: corrector signal-to-noise ratio")
    parser.add_argument("--n-corrector", type=int, help="pc: corrector steps per predictor step")
    parser.add_argument("--rtol", type=float, help="ode (and the ODE bits/dim of eval): relative tolerance")
    parser.add_argument("--atol", type=float, help="ode (and the ODE bits/dim of eval): absolute tolerance")
    parser.add_argument("--s-churn", type=float, help="edm_stochastic: S_churn")
    parser.add_argument("--s-min", type=float, help="edm_stochastic: S_min")
    parser.add_argument("--s-max", type=float, help="edm_stochastic: S_max")
    parser.add_argument("--s-noise", type=float, help="edm_stochastic: S_noise")


def _sampler_settings(pipe, args) -> str:
    """The sampler to use; the continuous sampler options given as flags become the model's sampling settings.

    Every setting is checked here, before any work (a bad one is a ValueError).
    """
    options = {key: getattr(args, flag) for flag, key in SAMPLER_OPTIONS.items() if getattr(args, flag) is not None}
    if options and not pipe.continuous:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in SAMPLER_OPTIONS if getattr(args, flag) is not None)
        raise UsageError(f"{flags}: options of the continuous-time samplers; this model has the discrete schedule")
    sampler, _, _ = pipe.sampling_settings(args.sampler, args.steps, eta=getattr(args, "eta", 0.0),
                                           spacing=getattr(args, "spacing", None), **options)  # fmt: skip
    pipe.config.sampling.update(options)
    return sampler


def _inception(path: str | None):
    """(params, SHA-256 of the weights file) of the FID Inception network."""
    from jaxdiff.evaluation.inception_weights import file_sha256, find_weights, load_inception_params

    found = find_weights(path)
    return load_inception_params(found), file_sha256(found)


def _eval(args, extra) -> int:
    _no_extra(extra)
    if args.what == "stats":
        from jaxdiff.evaluation.reference import dataset_statistics

        if not args.dataset:
            raise UsageError("eval stats needs --dataset")
        params, _ = _inception(args.inception_weights)
        mu, _ = dataset_statistics(args.dataset, args.split or "train", inception_params=params,
                                   data_dir=args.data_dir, batch_size=args.inception_batch_size)  # fmt: skip
        print(f"{args.dataset} {args.split or 'train'}: Inception statistics of dimension {mu.shape[0]} cached")
        return 0
    from jaxdiff.evaluation.evaluate import evaluate, parse_metrics

    if not args.workdir:
        raise UsageError("eval needs --workdir")
    metrics = parse_metrics(args.metrics)
    _check_weights(args.workdir)
    check_output_dir(args.workdir, "--workdir")
    if args.samples:
        check_output_dir(args.samples, "--samples")
    pipe = _load_pipeline(args.workdir, args.step)
    sampler = _sampler_settings(pipe, args)
    if args.bpd_num_t and pipe.continuous:
        raise UsageError("--bpd-num-t is for discrete-schedule models; continuous-time ones use the ODE likelihood")
    params, sha = _inception(args.inception_weights) if set(metrics) - {"bpd"} else (None, None)
    report = evaluate(
        pipe, args.workdir, metrics=metrics, num_samples=args.num_samples, sampler=sampler, steps=args.steps,
        seed=args.seed, shard_size=args.shard_size, samples_dir=args.samples, inception_params=params,
        inception_weights_sha256=sha, reference_path=args.reference, data_dir=args.data_dir,
        inception_batch=args.inception_batch_size, bpd_split=args.split,
        bpd_batch_size=args.bpd_batch_size, bpd_num_images=args.bpd_images, bpd_num_t=args.bpd_num_t,
    )  # fmt: skip
    for name, value in report["results"].items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


def _convert(args, extra) -> int:
    from jaxdiff.convert import convert

    _no_extra(extra)
    _check_weights(args.src, "SRC")
    check_output_dir(args.dst, "DST")
    with _reading_weights(args.src):
        out = convert(args.src, args.dst, source_format=args.source_format, target_format=args.target_format,
                      step=args.step, dataset=args.dataset)  # fmt: skip
    print(f"{args.src} ({args.source_format or 'detected'}) -> {out} ({args.target_format})")
    return 0


def _data(args, extra) -> int:
    from jaxdiff.data import prepare_dataset

    _no_extra(extra)
    if args.source and not os.path.exists(args.source):
        raise UsageError(f"--source {args.source!r} does not exist")
    out = prepare_dataset(args.dataset, args.data_dir or None, source=args.source)
    print(f"prepared {args.dataset} in {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to find the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from jaxdiff.recipes import RECIPES

    verbose_help = "all libraries' log messages; tracebacks"
    common = argparse.ArgumentParser(add_help=False)  # SUPPRESS: `jaxdiff -v VERB` is not overwritten by VERB's default
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    config_help = f"config file (e.g. configs/cifar10.py) or recipe name: {', '.join(RECIPES)}"
    parser = _Parser(prog="jaxdiff", description="Denoising diffusion models in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=help, parents=[common])

    train = verb("train", "train a model (resumes from the workdir's latest checkpoint)")
    train.add_argument("--config", required=True, help=config_help)
    train.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, samples")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even if the saved config of what is trained (model, diffusion, ...) differs")  # fmt: skip
    train.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    train.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    train.add_argument("--process-id", type=int, help="multi-host: this process's index")
    train.set_defaults(run=_train)

    sample = verb("sample", "draw images from a trained model (EMA parameters)")
    sample.add_argument("--workdir", help="a `jaxdiff train` workdir (or any format `jaxdiff convert` reads)")
    sample.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    sample.add_argument("--num", type=int, default=64, help="number of images")
    _add_sampler_flags(sample)
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale")
    sample.add_argument("--spacing", help="uniform | quadratic | karras (default: the sampler's)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, help="images per device batch (default: config.sampling.batch_size)")
    sample.add_argument("--out", required=True, help="grid.png, images.npz, or a directory/ for resumable .npz shards")
    sample.add_argument("--shard-size", type=int, default=1000, help="images per shard with --out DIR/")
    sample.add_argument("--trajectory", help="also write a noise-to-image strip (.png) or animation (.gif)")
    sample.add_argument("--class-label", type=int, help="class to draw (conditional models; default: random)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance: class-conditional models w >= 0 "
                        "(default 0); --pretrained diffusers' scale (default 7.5)")
    sample.add_argument("--pretrained", help="released weights: a Stable Diffusion folder or .safetensors file, a "
                        "score_sde checkpoint_N, an EDM network-snapshot-*.pkl, a diffusers folder")  # fmt: skip
    sample.add_argument("--config", help="--pretrained score_sde / EDM / diffusers weights: their recipe (score_sde: "
                        "its training config, e.g. sde_ve_ncsnpp_continuous or ve/ncsnpp_continuous)")  # fmt: skip
    sample.add_argument("--config-folder", help="--pretrained single file: a diffusers SD folder with its configs")
    sample.add_argument("--prompt", help="--pretrained: the text prompt")
    sample.add_argument("--negative-prompt", help="--pretrained: the negative prompt")
    sample.add_argument("--init-image", help="--pretrained: image-to-image (or, with --mask, inpainting) from it")
    sample.add_argument("--strength", type=float, help="--init-image: in (0, 1] (default 0.8; 1 with --mask)")
    sample.add_argument("--mask", help="--init-image: repaint where this image is white")
    sample.add_argument("--height", type=int, help="--pretrained text-to-image height (default: the model's)")
    sample.add_argument("--width", type=int, help="--pretrained text-to-image width (default: the model's)")
    sample.set_defaults(run=_sample)

    evaluate = verb("eval", "FID / IS / precision-recall / bits-per-dim of a trained model")
    evaluate.add_argument("what", nargs="?", choices=("model", "stats"), default="model",
                          help="'model' (default) scores --workdir; 'stats' caches a dataset split's Inception statistics")  # fmt: skip
    evaluate.add_argument("--workdir", help="a `jaxdiff train` workdir (or any format `jaxdiff convert` reads)")
    evaluate.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    evaluate.add_argument("--metrics", default="fid,is", help="comma-separated: fid, is, pr, bpd")
    evaluate.add_argument("--num-samples", type=int, default=50_000)
    _add_sampler_flags(evaluate)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--shard-size", type=int, default=1000)
    evaluate.add_argument("--samples", help="reuse (or resume) the shards of a `jaxdiff sample --out DIR/` job")
    evaluate.add_argument("--reference", help="statistics .npz (keys mu, sigma); default: the dataset's train split")
    evaluate.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth or a converted .npz")
    evaluate.add_argument("--data-dir", default="", help="TFDS data_dir")
    evaluate.add_argument("--bpd-batch-size", type=int, default=64)
    evaluate.add_argument("--bpd-images", type=int, help="test images for bits/dim (default: all)")
    evaluate.add_argument("--bpd-num-t", type=int, help="stratified estimate with K random t per image")
    evaluate.add_argument("--dataset", help="eval stats: dataset name, e.g. cifar10")
    evaluate.add_argument("--split", help="eval stats: the split (default train); bits/dim: the held-out split "
                                          "(default test)")  # fmt: skip
    evaluate.add_argument("--inception-batch-size", type=int, default=50)
    evaluate.set_defaults(run=_eval)

    convert = verb("convert", "convert weights between jaxdiff, diffusers and the official TF format")
    convert.add_argument("--from", dest="source_format",
                         choices=("tf", "diffusers", "jaxdiff", "score_sde", "edm", "score_sde_ve"),
                         help="source format (default: detected)")  # fmt: skip
    convert.add_argument("--to", dest="target_format", choices=("jaxdiff", "diffusers"), default="jaxdiff")
    convert.add_argument("--step", type=int, help="jaxdiff source: checkpoint step (default: latest)")
    convert.add_argument("--dataset", help="training recipe for the converted config (default: the matching release)")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.set_defaults(run=_convert)

    data = verb("data", "prepare a dataset for training and evaluation, without TensorFlow")
    data.add_argument("action", choices=("prepare",))
    data.add_argument("dataset", choices=("cifar10",))
    data.add_argument("--source", help="cifar-10-binary.tar.gz or its extracted folder (default: download)")
    data.add_argument("--data-dir", default="", help="TFDS data_dir (default: TFDS' ~/tensorflow_datasets)")
    data.set_defaults(run=_data)

    info = verb("info", "parameter count and forward GFLOPs per image of a config's model")
    info.add_argument("--config", required=True, help=config_help)
    info.set_defaults(run=_info)
    return parser


LIBRARY_LOGGERS = ("absl", "orbax", "jax")


@contextlib.contextmanager
def command_logging(verbose: bool):
    """For one command: jaxdiff's messages at INFO and other libraries' (absl, orbax, jax) at WARNING on stderr;
    with `verbose`, jaxdiff's at DEBUG and everyone's at INFO. The previous logging set-up is restored after.

    The handler goes on the root logger before any library logs, so absl does not install its own; plain
    console handlers a library installed on import are set aside, so nothing is printed twice.
    """
    root = logging.getLogger()
    named = [logger, *map(logging.getLogger, LIBRARY_LOGGERS)]
    saved_levels = [(item, item.level) for item in (root, *named)]
    set_aside = [handler for handler in root.handlers if type(handler) is logging.StreamHandler]
    for handler in set_aside:
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(name)s: %(message)s"
    ))  # fmt: skip
    root.addHandler(console)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(console)
        for handler in set_aside:
            root.addHandler(handler)
        for item, level in saved_levels:
            item.setLevel(level)


def _one_line(err: BaseException) -> str:
    """The error's message on one line: lines joined by "; " (by a space after punctuation)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    message = ""
    for line in filter(None, (line.strip() for line in str(text).splitlines())):
        message += ("" if not message else " " if message[-1] in ".:;," else "; ") + line
    return message or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    with command_logging(args.verbose):
        try:
            return args.run(args, extra)
        except _user_errors() as err:
            if args.verbose:
                traceback.print_exc()
            print(f"jaxdiff: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except Exception as err:  # noqa: BLE001 - everything else is a bug: say so, with the traceback
            traceback.print_exc()
            print(f"jaxdiff: internal error ({type(err).__name__}: {_one_line(err)}); this is a bug, please report it",
                  file=sys.stderr)  # fmt: skip
            return 1


if __name__ == "__main__":
    sys.exit(main())
