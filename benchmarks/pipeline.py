"""Throughput of the input pipeline alone (no model), in images/s, for the datasets available offline.

  python benchmarks/pipeline.py [--batch-size 128] [--seconds 2] [--one-core] [--datasets synthetic digits cifar10_mock]
      [--cifar10-data-dir DIR]

For each dataset it times three layers: `source.get` on one batch's indices, `batch_for_step`
(index computation + gather), and `iterate_batches` (the grain pipeline with its prefetch threads).
`cifar10_mock` is the real CIFAR-10 code path at CIFAR-10's size (50,000×32×32×3): random images written
as the original binary files, prepared without TensorFlow into TFDS array_record files (in
`--cifar10-data-dir`, reused when already there; default a temporary folder) and read back through
`tfds.data_source`; its "load s" is the read into memory, and the preparation time is printed apart.
`numpy_gather` is bare fancy indexing of a (50000, 32, 32, 3) uint8 array, the floor of the in-memory path.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxdiff import data  # noqa: E402
from jaxdiff.config import default_config  # noqa: E402

CIFAR10_SIZE = 50_000


def images_per_second(make_batch, batch_size: int, seconds: float) -> float:
    """Calls make_batch(step) for steps 0, 1, ... for at least `seconds` (and 3 calls) after one warm-up call."""
    make_batch(0)
    start = time.perf_counter()
    for calls in itertools.count(1):
        make_batch(calls)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return calls * batch_size / elapsed


def numpy_gather_rate(batch_size: int, seconds: float) -> float:
    """Bare NumPy fancy indexing of a CIFAR-10-sized uint8 array along a fixed random permutation."""
    array = np.random.default_rng(0).integers(0, 256, (CIFAR10_SIZE, 32, 32, 3), dtype=np.uint8)
    order = np.random.default_rng(1).permutation(CIFAR10_SIZE)

    def gather(step):
        start = (step * batch_size) % (CIFAR10_SIZE - batch_size)
        return array[order[start : start + batch_size]]

    return images_per_second(gather, batch_size, seconds)


def write_cifar10_binary(folder: Path) -> None:
    """Random CIFAR-10-sized data in the original binary layout: 5 train files of 10,000 and a test file."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        records = rng.integers(0, 256, (CIFAR10_SIZE // 5, 1 + 32 * 32 * 3), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / name).write_bytes(records.tobytes())


def load(name: str, cifar10_data_dir: str):
    config = default_config()
    if name == "synthetic":
        return data.SyntheticSource(CIFAR10_SIZE, (32, 32, 3))
    if name == "digits":
        config.data.dataset = "digits"
        return data.load_dataset(config.data)
    if name == "cifar10_mock":
        config.data.dataset, config.data.data_dir = "cifar10", cifar10_data_dir
        return data.load_dataset(config.data)
    raise ValueError(f"unknown dataset {name!r}")


def prepare_cifar10_mock(data_dir: str) -> float:
    """Seconds to prepare the fake CIFAR-10 in `data_dir` (0 when it is already there)."""
    source = Path(data_dir) / "source" / "cifar-10-batches-bin"
    if (Path(data_dir) / "cifar10").exists():
        return 0.0
    write_cifar10_binary(source)
    start = time.perf_counter()
    data.prepare_dataset("cifar10", data_dir, source=source)
    return time.perf_counter() - start


def benchmark(source, batch_size: int, seconds: float) -> dict[str, float]:
    kwargs = dict(seed=0, global_batch_size=batch_size, process_index=0, process_count=1)

    indices = data.example_indices(source.num_examples, seed=0, start=0, stop=batch_size)
    with data.iterate_batches(source, start_step=0, prefetch=2, **kwargs) as batches:
        iterated = images_per_second(lambda step: next(batches), batch_size, seconds)
    return {
        "get": images_per_second(lambda step: source.get(indices), batch_size, seconds),
        "batch_for_step": images_per_second(
            lambda step: data.batch_for_step(source, step=step, **kwargs), batch_size, seconds
        ),
        "iterate_batches": iterated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time per measurement")
    parser.add_argument("--one-core", action="store_true", help="pin the process to one CPU core (Linux)")
    parser.add_argument("--datasets", nargs="+", default=["numpy_gather", "synthetic", "digits", "cifar10_mock"])
    parser.add_argument("--cifar10-data-dir", help="where the fake CIFAR-10 is prepared (default: a temporary folder)")
    args = parser.parse_args()
    cifar10_data_dir = args.cifar10_data_dir or tempfile.mkdtemp(prefix="jaxdiff-pipeline-")
    if "cifar10_mock" in args.datasets:
        print(f"cifar10_mock prepared without TensorFlow in {prepare_cifar10_mock(cifar10_data_dir):.1f} s")
    if args.one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    print(f"batch {args.batch_size}, cores {len(os.sched_getaffinity(0))}, numpy {np.__version__}")
    print(f"{'dataset':<14}{'load s':>8}{'get':>12}{'b_for_step':>12}{'iterate':>12}  (images/s)")
    for name in args.datasets:
        if name == "numpy_gather":
            print(f"{name:<14}{'-':>8}{numpy_gather_rate(args.batch_size, args.seconds):>12,.0f}")
            continue
        start = time.perf_counter()
        source = load(name, cifar10_data_dir)
        load_seconds = time.perf_counter() - start
        rates = benchmark(source, args.batch_size, args.seconds)
        columns = "".join(f"{rates[key]:>12,.0f}" for key in ("get", "batch_for_step", "iterate_batches"))
        print(f"{name:<14}{load_seconds:>8.1f}{columns}")


if __name__ == "__main__":
    main()
