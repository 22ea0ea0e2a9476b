"""Sample quality of a digits run, judged by a classifier trained on the real digits.

    python benchmarks/digits_quality.py --workdir runs/digits [--train [--config configs/digits.py]]
        [--num-samples 500] [--sampler ddpm] [--steps 0] [--seed 0] [--out PATH]

A logistic regression (scikit-learn defaults, C = 1) is trained on a stratified 75% of the
1797 real digits (split seed 0). Real and generated digits reach it the same way: uint8
8×8×1 images (real: the dataset's round(v·255/16); generated: [-1, 1] samples through
`images.to_uint8`) -> 64 pixels / 255. Reported:
  real share       held-out real digits whose largest class probability is >= 0.8
  generated share  the same for `--num-samples` samples of the run's latest EMA parameters
  ratio            generated share / real share (target >= 0.90)
  class shares     share of the samples assigned (argmax) to each class (target: each >= 5%)
The samples are drawn with the run's sampler (DDPM over all T steps for configs/digits.py)
unless `--sampler`/`--steps` say otherwise. Prints a table and one JSON line, saves the
samples' grid as a PNG (default `<workdir>/digits_quality.png`), and exits with status 1
when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from jaxdiff import data, images  # noqa: E402

from jaxdiff.training import checkpoint  # noqa: E402
from jaxdiff.training.runs import load_run  # noqa: E402
from jaxdiff.models import create_model  # noqa: E402
from jaxdiff.samplers import SAMPLERS  # noqa: E402
from jaxdiff.families import family_of  # noqa: E402
from jaxdiff.training.tasks.diffusion import sample_images  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "digits.py"
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.25
CONFIDENCE = 0.8
TARGET_RATIO = 0.90
TARGET_CLASS_SHARE = 0.05


def classifier_features(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, 8, 8, 1] -> float64 [N, 64] pixels in [0, 1]: the classifier's only input path."""
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8 or images_uint8.shape[1:] != (8, 8, 1):
        raise ValueError(f"expected uint8 digits of shape [N, 8, 8, 1], got {images_uint8.dtype} {images_uint8.shape}")
    return images_uint8.reshape(len(images_uint8), -1).astype(np.float64) / 255.0


def fit_classifier(real_images: np.ndarray, real_labels: np.ndarray):
    """(classifier, held-out features [N_test, 64], held-out labels) from a stratified 75/25 split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(
        classifier_features(real_images), real_labels,
        test_size=TEST_FRACTION, stratify=real_labels, random_state=SPLIT_SEED,
    )  # fmt: skip
    return LogisticRegression(max_iter=1000).fit(train_x, train_y), test_x, test_y


def confident_share(probabilities: np.ndarray) -> float:
    """Share of rows of class probabilities [N, K] whose maximum is >= CONFIDENCE."""
    return float(np.mean(probabilities.max(axis=1) >= CONFIDENCE))


def class_shares(probabilities: np.ndarray) -> np.ndarray:
    """Share of rows [N, K] whose most probable class is k, for k = 0..K-1 (sums to 1)."""
    return np.bincount(probabilities.argmax(axis=1), minlength=probabilities.shape[1]) / len(probabilities)


def load_ema_params(workdir: str):
    """(config, step, EMA params) of the latest checkpoint of a digits run in `workdir`."""
    config, step, params = load_run(workdir)
    if config.data.dataset != "digits":
        raise ValueError(f"the run in {workdir} trained on data.dataset={config.data.dataset!r}, not 'digits'")
    return config, step, params


def draw_samples(config, params, num: int, seed: int) -> np.ndarray:
    """`num` uint8 [num, 8, 8, 1] samples of `params` with `config.sampling`'s sampler, one jitted batch."""
    model = create_model(config.model)
    family = family_of(config)
    fn = jax.jit(lambda p, rng: sample_images(family, model, p, rng, num))
    return images.to_uint8(np.asarray(fn(params, jax.random.PRNGKey(seed))))


def evaluate(real_images, real_labels, generated: np.ndarray) -> dict:
    """The benchmark's numbers for uint8 generated digits [N, 8, 8, 1] against the real ones."""
    classifier, test_x, _ = fit_classifier(real_images, real_labels)
    real = confident_share(classifier.predict_proba(test_x))
    probabilities = classifier.predict_proba(classifier_features(generated))
    generated_share, shares = confident_share(probabilities), class_shares(probabilities)
    ratio = generated_share / real
    return {
        "real_share": real,
        "generated_share": generated_share,
        "ratio": ratio,
        "class_shares": [float(s) for s in shares],
        "ratio_ok": bool(ratio >= TARGET_RATIO),
        "classes_ok": bool(shares.min() >= TARGET_CLASS_SHARE),
    }


def print_table(result: dict) -> None:
    verdict = {True: "ok", False: "MISSED"}
    real_label = f"held-out real digits, share with p_max >= {CONFIDENCE}"
    generated_label = f"generated ({result['num_samples']}), share with p_max >= {CONFIDENCE}"
    ratio_label = f"ratio generated / real (target >= {TARGET_RATIO})"
    print(f"{real_label:<48}{result['real_share']:>8.3f}")
    print(f"{generated_label:<48}{result['generated_share']:>8.3f}")
    print(f"{ratio_label:<48}{result['ratio']:>8.3f}  {verdict[result['ratio_ok']]}")
    print(f"generated share per class (target: each >= {TARGET_CLASS_SHARE})  {verdict[result['classes_ok']]}")
    print("  " + "".join(f"{k:>7d}" for k in range(NUM_CLASSES)))
    print("  " + "".join(f"{s:>7.3f}" for s in result["class_shares"]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="run directory holding checkpoints/")
    parser.add_argument("--train", action="store_true", help="train (or resume) the run in --workdir first")
    parser.add_argument("--config", help=f"config file for --train (default {DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the run's sampling.sampler")
    parser.add_argument("--steps", type=int, help="sampling steps, 0 = all T (default: the run's sampling.steps)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", help="PNG path of the samples' grid (default <workdir>/digits_quality.png)")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.steps is not None and args.steps < 0:
        parser.error(f"--steps must be >= 0, got {args.steps}")
    check_run_args(parser, args)
    return args


def check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--config only with --train; without --train, --workdir must hold a run."""
    if args.config is not None and not args.train:
        parser.error("--config is read only with --train (otherwise the run's saved config is used)")
    if not args.train and not os.path.isdir(checkpoint.checkpoint_dir(args.workdir)):
        parser.error(f"no run in --workdir {args.workdir} (no {checkpoint.CHECKPOINT_DIR}/); pass --train to train one")


def train(config_path: str, workdir: str) -> dict:
    """Train the config in `workdir` as `jaxdiff train` does; wall seconds and steps done."""
    from jaxdiff.cli import load_config
    from jaxdiff.training.loop import train_and_evaluate

    start = time.perf_counter()
    result = train_and_evaluate(load_config(config_path, []), workdir)
    return {"train_seconds": time.perf_counter() - start, "train_steps": result.step}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = train(args.config or str(DEFAULT_CONFIG), args.workdir) if args.train else {}
    config, step, params = load_ema_params(args.workdir)
    if args.sampler is not None:
        config.sampling.sampler = args.sampler
    if args.steps is not None:
        config.sampling.steps = args.steps
    start = time.perf_counter()
    generated = draw_samples(config, params, args.num_samples, args.seed)
    sample_seconds = time.perf_counter() - start
    source = data.load_dataset(config.data)
    real_images, real_labels = source.get(np.arange(source.num_examples))
    result.update(
        workdir=os.path.abspath(args.workdir), step=step, sampler=config.sampling.sampler,
        steps=config.sampling.steps or config.diffusion.num_timesteps, num_samples=args.num_samples,
        sample_seconds=sample_seconds, **evaluate(real_images, real_labels, generated),
    )  # fmt: skip
    out = args.out or os.path.join(args.workdir, "digits_quality.png")
    images.save_png(images.make_grid(generated), out, scale=4)
    result["grid"] = os.path.abspath(out)
    print(f"step {step}, {result['sampler']} with {result['steps']} steps, {sample_seconds:.0f} s to sample")
    print_table(result)
    print(json.dumps(result))
    return 0 if result["ratio_ok"] and result["classes_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
