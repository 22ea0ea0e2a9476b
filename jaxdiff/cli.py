"""The `jaxdiff` command: train | sample | eval | convert | info.

Config files are ml_collections files defining `get_config()`; any key can be
overridden as `--config.section.key=value`, and an unknown key is an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxdiff.checkpoint import CheckpointError
    from jaxdiff.data import DatasetNotFoundError

    return (ValueError, CheckpointError, DatasetNotFoundError, FileNotFoundError, FloatingPointError)


def load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """The config of file `path` with `--config.a.b=v` overrides applied (types and keys checked)."""
    bad = [arg for arg in overrides if not arg.startswith("--config.")]
    if bad:
        raise SystemExit(f"jaxdiff: unrecognised arguments: {' '.join(bad)}")
    argv = ["jaxdiff", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=values, lock_config=True, sys_argv=argv)
    if not os.path.isfile(path):
        raise SystemExit(f"jaxdiff: config file {path!r} not found")
    try:
        values(argv)
        config = values.config
        config.to_dict()  # a file that failed to load yields a stand-in that raises its error here
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError, ImportError, SyntaxError) as err:
        raise SystemExit(f"jaxdiff: bad config {path!r} or override: {err}") from None
    return config


def _train(args, extra) -> int:
    from jaxdiff import sharding
    from jaxdiff.training_run import train_and_evaluate

    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    config = load_config(args.config, extra)
    result = train_and_evaluate(config, args.workdir, allow_config_change=args.allow_config_change)
    print(f"{'preempted' if result.preempted else 'finished'} at step {result.step}; workdir {args.workdir}")
    return 0


def _info(args, extra) -> int:
    from jaxdiff.config import validate
    from jaxdiff.models.summary import model_summary

    config = validate(load_config(args.config, extra))
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


def _sample(args, extra) -> int:
    import jax

    from jaxdiff import images
    from jaxdiff.pipeline import Pipeline
    from jaxdiff.sampling_job import sample_to_shards

    if extra:
        raise SystemExit(f"jaxdiff: unrecognised arguments: {' '.join(extra)}")
    pipe = Pipeline.from_pretrained(args.workdir, step=args.step)
    settings = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, spacing=args.spacing,
                    class_label=args.class_label, guidance=args.guidance)  # fmt: skip
    to_dir = args.out.endswith(os.sep) or os.path.isdir(args.out)
    if to_dir:
        shards = sample_to_shards(pipe, args.out, num_images=args.num, shard_size=args.shard_size, seed=args.seed,
                                  **settings)  # fmt: skip
        print(f"{args.num} images in {len(shards)} shards under {args.out}")
    else:
        if not args.out.lower().endswith((".png", ".npz")):
            raise SystemExit(f"jaxdiff: --out must be a .png grid, a .npz file or a directory/, got {args.out!r}")
        samples = pipe.sample(args.num, seed=args.seed, batch_size=args.batch_size, **settings)
        if args.out.lower().endswith(".npz"):
            np.savez(args.out, images=samples)
        else:
            images.save_png(images.make_grid(samples), args.out, scale=max(1, 64 // samples.shape[1]))
        print(f"{len(samples)} images (checkpoint step {pipe.step}) -> {args.out}")
    if args.trajectory:
        n = min(8, args.num)
        _, _, trajectory = pipe.sample_batch(n, jax.random.fold_in(jax.random.PRNGKey(args.seed), 0),
                                             return_trajectory=True, **settings)  # fmt: skip
        _write_trajectory(args.trajectory, trajectory)
        print(f"trajectory of {n} images, {len(trajectory)} frames -> {args.trajectory}")
    return 0


def _inception(path: str | None):
    """(params, SHA-256 of the weights file) of the FID Inception network."""
    from jaxdiff.evaluation.inception_weights import file_sha256, find_weights, load_inception_params

    found = find_weights(path)
    return load_inception_params(found), file_sha256(found)


def _eval(args, extra) -> int:
    if extra:
        raise SystemExit(f"jaxdiff: unrecognised arguments: {' '.join(extra)}")
    if args.what == "stats":
        from jaxdiff.evaluation.reference import dataset_statistics

        if not args.dataset:
            raise SystemExit("jaxdiff: eval stats needs --dataset")
        params, _ = _inception(args.inception_weights)
        mu, _ = dataset_statistics(args.dataset, args.split, inception_params=params, data_dir=args.data_dir,
                                   batch_size=args.inception_batch_size)  # fmt: skip
        print(f"{args.dataset} {args.split}: Inception statistics of dimension {mu.shape[0]} cached")
        return 0
    from jaxdiff.evaluation.evaluate import evaluate, parse_metrics
    from jaxdiff.pipeline import Pipeline

    if not args.workdir:
        raise SystemExit("jaxdiff: eval needs --workdir")
    metrics = parse_metrics(args.metrics)
    pipe = Pipeline.from_pretrained(args.workdir, step=args.step)
    params, sha = _inception(args.inception_weights) if set(metrics) - {"bpd"} else (None, None)
    report = evaluate(
        pipe, args.workdir, metrics=metrics, num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
        seed=args.seed, shard_size=args.shard_size, samples_dir=args.samples, inception_params=params,
        inception_weights_sha256=sha, reference_path=args.reference, data_dir=args.data_dir,
        inception_batch=args.inception_batch_size,
        bpd_batch_size=args.bpd_batch_size, bpd_num_images=args.bpd_images, bpd_num_t=args.bpd_num_t,
    )  # fmt: skip
    for name, value in report["results"].items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


def _convert(args, extra) -> int:
    from jaxdiff.convert import convert

    if extra:
        raise SystemExit(f"jaxdiff: unrecognised arguments: {' '.join(extra)}")
    out = convert(args.src, args.dst, source_format=args.source_format, target_format=args.target_format,
                  step=args.step, dataset=args.dataset)  # fmt: skip
    print(f"{args.src} ({args.source_format or 'detected'}) -> {out} ({args.target_format})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description="Denoising diffusion models in JAX.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a model (resumes from the workdir's latest checkpoint)")
    train.add_argument("--config", required=True, help="config file, e.g. configs/cifar10.py")
    train.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, samples")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even if the saved model/diffusion config differs")  # fmt: skip
    train.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    train.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    train.add_argument("--process-id", type=int, help="multi-host: this process's index")
    train.set_defaults(run=_train)

    sample = verbs.add_parser("sample", help="draw images from a trained model (EMA parameters)")
    sample.add_argument("--workdir", required=True, help="a `jaxdiff train` workdir (or any format `jaxdiff convert` reads)")
    sample.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    sample.add_argument("--num", type=int, default=64, help="number of images")
    sample.add_argument("--sampler", default="ddpm", help="ddpm | ddim | dpm_solver++ | heun")
    sample.add_argument("--steps", type=int, help="sampling steps (default: all T for ddpm/ddim)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale")
    sample.add_argument("--spacing", help="uniform | quadratic | karras (default: the sampler's)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, help="images per device batch (default: config.sampling.batch_size)")
    sample.add_argument("--out", required=True, help="grid.png, images.npz, or a directory/ for resumable .npz shards")
    sample.add_argument("--shard-size", type=int, default=1000, help="images per shard with --out DIR/")
    sample.add_argument("--trajectory", help="also write a noise-to-image strip (.png) or animation (.gif)")
    sample.add_argument("--class-label", type=int, help="class to draw (conditional models; default: random)")
    sample.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale w >= 0")
    sample.set_defaults(run=_sample)

    evaluate = verbs.add_parser("eval", help="FID / IS / precision-recall / bits-per-dim of a trained model")
    evaluate.add_argument("what", nargs="?", choices=("model", "stats"), default="model",
                          help="'model' (default) scores --workdir; 'stats' caches a dataset split's Inception statistics")  # fmt: skip
    evaluate.add_argument("--workdir", help="a `jaxdiff train` workdir (or any format `jaxdiff convert` reads)")
    evaluate.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    evaluate.add_argument("--metrics", default="fid,is", help="comma-separated: fid, is, pr, bpd")
    evaluate.add_argument("--num-samples", type=int, default=50_000)
    evaluate.add_argument("--sampler", default="ddpm")
    evaluate.add_argument("--steps", type=int, help="sampling steps (default: all T for ddpm/ddim)")
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
    evaluate.add_argument("--split", default="train", help="eval stats: TFDS split")
    evaluate.add_argument("--inception-batch-size", type=int, default=50)
    evaluate.set_defaults(run=_eval)

    convert = verbs.add_parser("convert", help="convert weights between jaxdiff, diffusers and the official TF format")
    convert.add_argument("--from", dest="source_format", choices=("tf", "diffusers", "jaxdiff"),
                         help="source format (default: detected)")  # fmt: skip
    convert.add_argument("--to", dest="target_format", choices=("jaxdiff", "diffusers"), default="jaxdiff")
    convert.add_argument("--step", type=int, help="jaxdiff source: checkpoint step (default: latest)")
    convert.add_argument("--dataset", help="training recipe for the converted config (default: the matching release)")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.set_defaults(run=_convert)

    info = verbs.add_parser("info", help="parameter count and forward GFLOPs per image of a config's model")
    info.add_argument("--config", required=True)
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, extra = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args, extra)
    except _user_errors() as err:
        print(f"jaxdiff: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
