"""Conditional accuracy of a class-conditional digits run (the `digits_flow` recipe: flow matching, a small DiT),
judged by a classifier fitted to the real digits.

    python benchmarks/digits_flow.py --workdir runs/digits_flow [--train [--config digits_flow]]
        [--per-class 100] [--guidance 0 1 3] [--seed 0] [--out PATH]

The classifier is `benchmarks/digits_quality.py`'s: a logistic regression (scikit-learn defaults, C = 1) on a
stratified 75% of the 1797 real digits (split seed 0), fed uint8 8×8×1 images as 64 pixels / 255; its accuracy on
the held-out 25% is reported. For each guidance scale w (samples (1 + w)·u(x, k) − w·u(x, ∅), `Pipeline.sample`'s
`guidance`) it labels `--per-class` samples drawn for each class k with the run's sampler and EMA parameters:
  accuracy      share of all samples whose predicted class is the requested one
  per class     the same for each k
  confident     share of samples with the requested class's probability >= 0.8
With `--train` the run is trained (or resumed) first and the training wall time is reported. Prints a table, writes
the numbers as JSON (default `<workdir>/digits_flow.json`) and a grid of the samples (row k: class k, w side by
side; default `<workdir>/digits_flow.png`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from benchmarks.digits_quality import (  # noqa: E402
    CONFIDENCE,
    NUM_CLASSES,
    check_run_args,
    classifier_features,
    fit_classifier,
    train,
)
from jaxdiff import Pipeline, data, images  # noqa: E402

DEFAULT_CONFIG = "digits_flow"
DEFAULT_GUIDANCE = (0.0, 1.0, 3.0)


def conditional_accuracy(classifier, generated: np.ndarray, requested: np.ndarray) -> dict:
    """The numbers of one guidance scale: uint8 samples [N, 8, 8, 1] drawn for the classes `requested` int [N]."""
    probabilities = classifier.predict_proba(classifier_features(generated))
    predicted = probabilities.argmax(axis=1)
    hit = predicted == requested
    return {
        "accuracy": float(hit.mean()),
        "per_class": [float(hit[requested == k].mean()) for k in range(NUM_CLASSES)],
        "confident": float(np.mean(probabilities[np.arange(len(requested)), requested] >= CONFIDENCE)),
    }


def print_table(result: dict) -> None:
    print(f"classifier accuracy on the held-out real digits: {result['real_accuracy']:.3f}")
    header = f"{'w':>5}{'accuracy':>10}{'p>=' + str(CONFIDENCE):>8}  " + "".join(f"{k:>6d}" for k in range(NUM_CLASSES))
    print(header)
    for row in result["guidance"]:
        per_class = "".join(f"{a:>6.2f}" for a in row["per_class"])
        print(f"{row['w']:>5g}{row['accuracy']:>10.3f}{row['confident']:>8.3f}  {per_class}")
    if result.get("train_seconds") is not None:
        print(f"training: {result['train_steps']} steps in {result['train_seconds']:.0f} s wall")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="run directory holding checkpoints/")
    parser.add_argument("--train", action="store_true", help="train (or resume) the run in --workdir first")
    parser.add_argument("--config", help=f"config file or recipe name for --train (default {DEFAULT_CONFIG})")
    parser.add_argument("--per-class", type=int, default=100, help="samples drawn per class and guidance scale")
    parser.add_argument("--guidance", type=float, nargs="+", default=list(DEFAULT_GUIDANCE), help="scales w >= 0")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", help="JSON path (default <workdir>/digits_flow.json; the grid beside it as .png)")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")
    if min(args.guidance) < 0:
        parser.error(f"--guidance scales must be >= 0, got {args.guidance}")
    check_run_args(parser, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = train(args.config or DEFAULT_CONFIG, args.workdir) if args.train else {"train_seconds": None}
    pipe = Pipeline.from_checkpoint(args.workdir)
    if pipe.config.data.dataset != "digits" or pipe.config.model.num_classes != NUM_CLASSES:
        raise SystemExit(f"the run in {args.workdir} is not a class-conditional digits run (data.dataset="
                         f"{pipe.config.data.dataset!r}, model.num_classes={pipe.config.model.num_classes})")
    source = data.load_dataset(pipe.config.data)
    real_images, real_labels = source.get(np.arange(source.num_examples))
    classifier, test_x, test_y = fit_classifier(real_images, real_labels)
    requested = np.repeat(np.arange(NUM_CLASSES), args.per_class)
    rows, grids = [], []
    for w in args.guidance:
        start = time.perf_counter()
        generated = pipe.sample(len(requested), seed=args.seed, class_label=requested, guidance=w,
                                batch_size=len(requested))  # fmt: skip
        rows.append({"w": w, "sample_seconds": time.perf_counter() - start,
                     **conditional_accuracy(classifier, generated, requested)})  # fmt: skip
        grids.append(generated.reshape(NUM_CLASSES, args.per_class, 8, 8, 1)[:, :8])
    result.update(
        workdir=os.path.abspath(args.workdir), step=pipe.step, sampler=pipe.config.sampling.sampler,
        steps=pipe.config.sampling.steps, per_class=args.per_class, real_accuracy=float(classifier.score(test_x, test_y)),
        guidance=rows, machine=f"{platform.machine()}, {os.cpu_count()} CPUs", jax=jax.__version__,
        date=time.strftime("%Y-%m-%d"),
    )  # fmt: skip
    out = args.out or os.path.join(args.workdir, "digits_flow.json")
    grid = np.concatenate(grids, axis=1).reshape(-1, 8, 8, 1)  # row k: class k, 8 samples per guidance scale
    images.save_png(images.make_grid(grid, columns=8 * len(grids)), os.path.splitext(out)[0] + ".png", scale=4)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"step {pipe.step}, {result['sampler']} with {result['steps']} steps, {args.per_class} samples per class")
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
