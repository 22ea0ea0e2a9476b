"""Prompt adherence of a text-to-image model trained on `shapes`: per-attribute accuracy at several guidance scales.

For every (size, colour, shape, position) prompt "a {size} {colour} {shape} in the {position}" — the seen
combinations and the held-out ones (never drawn for training, `HELDOUT_COMBINATIONS`) — draw images with
`Pipeline.from_checkpoint(workdir).text_to_image`, read colour, size and position back with the dataset's
checker (`jaxdiff.data.read_attributes`, ≥ 99% right on real images) and report each attribute's accuracy,
and all four together, for seen and held-out prompts at each guidance scale. The shape is read by a classifier
trained on the dataset's own generator as the model's decoder renders it: a one-hidden-layer perceptron
(scikit-learn's, 128 units) on a 16×16 window of coverage (`coverage_maps`) centred on the shape, fitted to this run's autoencoder's reconstructions
of freshly drawn training images (the moment tests of `read_attributes` assume sharp edges, which decoded
small shapes lack). The first rows are the ceiling the autoencoder sets: every reader on its reconstructions
of other real images of both splits.

    python benchmarks/shapes_quality.py --workdir runs/shapes [--per-prompt 4] [--guidance 0 1 3 5] [--steps 50]
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import numpy as np

from sklearn.neural_network import MLPClassifier

from jaxdiff.data.shapes import (
    COLOURS, HELDOUT_COMBINATIONS, POSITIONS, SHAPES, SIZES, coverage_maps, draw_shapes, read_attributes,
)  # fmt: skip
from jaxdiff.latent.pipeline import to_uint8
from jaxdiff.sampling.pipeline import Pipeline

ATTRIBUTES = ("colour", "shape", "size", "position")
VALUES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
RECONSTRUCTED = 512  # real images of each split in the autoencoder's rows
SHAPE_TRAINING_IMAGES = 32768  # reconstructions the shape reader is fitted to (8,192 read 1.9 points worse)
WINDOW = 16  # side of the coverage window centred on the shape


def caption_attributes(captions: list[str]) -> dict[str, np.ndarray]:
    """Attribute indices {name: int [N]} of captions "a {size} {colour} {shape} in the {position}"."""
    words = [c.split() for c in captions]
    named = {"size": [w[1] for w in words], "colour": [w[2] for w in words], "shape": [w[3] for w in words],
             "position": [" ".join(w[6:]) for w in words]}  # fmt: skip
    return {name: np.array([VALUES[name].index(v) for v in named[name]]) for name in ATTRIBUTES}


def prompt_set(per_prompt: int) -> tuple[list[str], np.ndarray]:
    """Every prompt `per_prompt` times: (prompts, held-out mask bool [N])."""
    heldout = set(HELDOUT_COMBINATIONS)
    rows = []
    for size, colour, shape, position in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS):
        rows += [(f"a {size} {colour} {shape} in the {position}", (colour, shape, position) in heldout)] * per_prompt
    return [r[0] for r in rows], np.array([r[1] for r in rows])


def reconstructions(pipe, num: int, *, seed: int, split: str) -> tuple[np.ndarray, list[str]]:
    """The pipeline's autoencoder's reconstructions (posterior modes) of `num` real images of (seed, split),
    and their captions."""
    images, captions = draw_shapes(num, seed=seed, split=split)
    decode = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x))
    out = [decode(pipe.params["vae"], images[i : i + 256].astype(np.float32) / 127.5 - 1.0)
           for i in range(0, num, 256)]  # fmt: skip
    return to_uint8(np.clip(np.concatenate([np.asarray(o) for o in out]) / 2.0 + 0.5, 0.0, 1.0)), captions


def shape_windows(images: np.ndarray) -> np.ndarray:
    """float32 [n, WINDOW²]: each image's coverage in a WINDOW×WINDOW window centred on its coverage centroid."""
    coverage = coverage_maps(images)
    n, size = coverage.shape[0], coverage.shape[1]
    grid = np.arange(size, dtype=np.float32) + 0.5
    area = np.maximum(coverage.sum(axis=(1, 2)), 1e-9)
    rows = np.rint((coverage.sum(axis=2) @ grid) / area - WINDOW / 2).astype(int) + WINDOW
    cols = np.rint((coverage.sum(axis=1) @ grid) / area - WINDOW / 2).astype(int) + WINDOW
    padded = np.pad(coverage, ((0, 0), (WINDOW, WINDOW), (WINDOW, WINDOW)))
    return np.stack([padded[i, r : r + WINDOW, c : c + WINDOW].ravel() for i, r, c in zip(range(n), rows, cols)])


def fit_shape_reader(pipe) -> MLPClassifier:
    """A shape classifier for images as this run's decoder renders them (module docstring)."""
    images, captions = reconstructions(pipe, SHAPE_TRAINING_IMAGES, seed=2, split="train")
    reader = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, early_stopping=True, random_state=0)
    return reader.fit(shape_windows(images), caption_attributes(captions)["shape"])


def generate(pipe, prompts: list[str], *, guidance: float, steps: int, batch: int, seed: int) -> np.ndarray:
    """uint8 images, one per prompt, in batches of `batch` (the last padded, so one program serves all);
    batch i draws its noise from seed + i."""
    out = []
    for i, start in enumerate(range(0, len(prompts), batch)):
        chunk = prompts[start : start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        images = pipe.text_to_image(padded, guidance=guidance, steps=steps, sampler="ddim", seed=seed + i)
        out.append(images[: len(chunk)])
    return np.concatenate(out)


def accuracies(images: np.ndarray, attributes: dict[str, np.ndarray], mask: np.ndarray,
               shape_reader: MLPClassifier) -> dict[str, float]:  # fmt: skip
    """Fraction of the images under `mask` whose read attribute equals the prompted one, per attribute and all."""
    read = read_attributes(images[mask])
    read["shape"] = shape_reader.predict(shape_windows(images[mask]))
    right = {name: read[name] == attributes[name][mask] for name in ATTRIBUTES}
    result = {name: float(np.mean(hits)) for name, hits in right.items()}
    result["all"] = float(np.mean(np.all(list(right.values()), axis=0)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a latent run: jaxdiff train --config configs/shapes.py")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt (168 prompts)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch", type=int, default=56, help="images per sampling call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = Pipeline.from_checkpoint(args.workdir)
    prompts, heldout = prompt_set(args.per_prompt)
    attributes = caption_attributes(prompts)
    print(f"{len(prompts)} images per guidance ({int(heldout.sum())} of held-out combinations), DDIM "
          f"{args.steps} steps; AE: the autoencoder's reconstructions of {RECONSTRUCTED} real images")  # fmt: skip
    columns = ("guidance", "prompts", *ATTRIBUTES, "all", "seconds")
    print("| " + " | ".join(f"{c:>8}" for c in columns) + " |")
    print("|" + "|".join("-" * 10 for _ in columns) + "|")
    shape_reader = fit_shape_reader(pipe)
    for split, name in (("train", "seen"), ("heldout", "held-out")):
        images, captions = reconstructions(pipe, RECONSTRUCTED, seed=1, split=split)
        acc = accuracies(images, caption_attributes(captions), np.ones(len(images), bool), shape_reader)
        cells = " | ".join(f"{100 * acc[a]:7.1f}%" for a in (*ATTRIBUTES, "all"))
        print(f"| {'AE':>8} | {name:>8} | {cells} | {'':>8} |")
    for guidance in args.guidance:
        start = time.perf_counter()
        images = generate(pipe, prompts, guidance=guidance, steps=args.steps, batch=args.batch, seed=args.seed)
        seconds = time.perf_counter() - start
        for name, mask in (("seen", ~heldout), ("held-out", heldout)):
            acc = accuracies(images, attributes, mask, shape_reader)
            cells = " | ".join(f"{100 * acc[a]:7.1f}%" for a in (*ATTRIBUTES, "all"))
            print(f"| {guidance:8g} | {name:>8} | {cells} | {seconds:8.0f} |")


if __name__ == "__main__":
    main()
