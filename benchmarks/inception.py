"""Throughput of the FID Inception on the local JAX backend: images/s and seconds per 1000 images.

    PYTHONPATH=. python benchmarks/inception.py [--batch-size 50] [--batches 3] [--image-size 32]

Times `inception_features` (TF1 resize to 299x299 + InceptionV3 at HIGHEST
precision) on uint8 images, and the host-side float64 `ActivationStatistics`
update that FID adds per batch. Weights are random: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import flax.traverse_util
import jax
import numpy as np

from jaxdiff.evaluation.fid import ActivationStatistics
from jaxdiff.evaluation.inception import inception_features
from jaxdiff.evaluation.inception_weights import expected_param_shapes


def random_params(seed: int = 0) -> dict:
    """He-scaled kernels, identity BatchNorm: activations stay in a normal float range."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in expected_param_shapes(with_logits=True).items():
        if path[-1] == "kernel":
            flat[path] = rng.normal(scale=np.sqrt(2.0 / np.prod(shape[:-1])), size=shape).astype(np.float32)
        else:
            flat[path] = np.full(shape, 1.0 if path[-1] in ("scale", "var") else 0.0, np.float32)
    return jax.device_put(flax.traverse_util.unflatten_dict(flat))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--batches", type=int, default=3, help="timed batches after the compiling call")
    parser.add_argument("--image-size", type=int, default=32, help="input side before the resize to 299")
    args = parser.parse_args(argv)

    params = random_params()
    images = np.random.default_rng(1).integers(
        0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    start = time.perf_counter()
    jax.block_until_ready(inception_features(params, images))
    first_call = time.perf_counter() - start

    stats = ActivationStatistics()
    forward = statistics = 0.0
    for _ in range(args.batches):
        start = time.perf_counter()
        pool_3, _ = jax.block_until_ready(inception_features(params, images))
        middle = time.perf_counter()
        stats.update(pool_3)
        forward += middle - start
        statistics += time.perf_counter() - middle

    n = args.batch_size * args.batches
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; "
          f"batch {args.batch_size} of {args.image_size}x{args.image_size} uint8, {args.batches} timed batches")
    print(f"first call (compile + run): {first_call:.1f} s")
    print(f"inception forward: {n / forward:.2f} images/s")
    print(f"FID features + statistics: {1000 * (forward + statistics) / n:.1f} s per 1000 images "
          f"(statistics update {1000 * statistics / n:.2f} s of it)")


if __name__ == "__main__":
    main()
