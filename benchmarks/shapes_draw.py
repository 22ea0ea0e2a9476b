"""Speed of the `shapes` dataset in images/s: drawing, the on-demand source, the in-memory alternative, the checker.

  python benchmarks/shapes_draw.py [--batch-size 128] [--seconds 2] [--one-core]

Rows: `draw_shapes` of 10,000 consecutive examples; the `shapes` source's `get` and `batch_for_step`
(images and captions) on one training batch of random indices, drawn on demand; the alternative of
holding all 50,000 train images in memory (the time to draw them once, then a bare NumPy gather per
batch); `read_attributes` on 5,000 images.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxdiff import data  # noqa: E402
from jaxdiff.config import default_config  # noqa: E402


def images_per_second(call, images_per_call: int, seconds: float) -> float:
    """Calls call(i) for i = 0, 1, ... for at least `seconds` (and 3 calls) after one warm-up call."""
    call(0)
    start = time.perf_counter()
    for calls in itertools.count(1):
        call(calls)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return calls * images_per_call / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time per measurement")
    parser.add_argument("--one-core", action="store_true", help="pin the process to one CPU core (Linux)")
    args = parser.parse_args()
    if args.one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    config = default_config()
    config.data.dataset = "shapes"
    source = data.load_dataset(config.data)
    batch = {"seed": 0, "global_batch_size": args.batch_size, "process_index": 0, "process_count": 1}
    indices = data.example_indices(source.num_examples, seed=0, start=0, stop=args.batch_size)

    start = time.perf_counter()
    in_memory, _ = data.draw_shapes(source.num_examples)
    draw_all = time.perf_counter() - start
    images, _ = data.draw_shapes(5_000, start=source.num_examples)

    print(f"batch {args.batch_size}, cores {len(os.sched_getaffinity(0))}, numpy {np.__version__}")
    rates = {
        "draw_shapes (10,000 at once)": images_per_second(
            lambda i: data.draw_shapes(10_000, start=10_000 * i), 10_000, args.seconds
        ),
        "source.get (on demand)": images_per_second(lambda i: source.get(indices), args.batch_size, args.seconds),
        "batch_for_step (on demand)": images_per_second(
            lambda i: data.batch_for_step(source, step=i, **batch), args.batch_size, args.seconds
        ),
        "in-memory gather": images_per_second(lambda i: in_memory[indices], args.batch_size, args.seconds),
        "read_attributes (5,000)": images_per_second(lambda i: data.read_attributes(images), 5_000, args.seconds),
    }
    for name, rate in rates.items():
        print(f"{name:<32}{rate:>14,.0f} images/s")
    print(f"in memory: {in_memory.nbytes / 2**20:.0f} MiB, drawn once in {draw_all:.2f} s")


if __name__ == "__main__":
    main()
