"""Sampling throughput of each sampler, and compile time against the number of steps.

The denoiser is a tiny DDPM U-Net (random weights; the speed does not depend on them):
16×16×3 images, ch 32, ch_mult (1, 2), one ResBlock per level, attention at 8×8.
Throughput is images/s of the jitted `sample` at a fixed batch, best of `--repeats`
runs after a warm-up call. Compile time is measured for DDIM with 10 and with 1000
steps: the loop body is traced once, so it should not grow with the steps.

    python benchmarks/sampling.py [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from jaxdiff.config import default_config
from jaxdiff.models import count_parameters, create_model
from jaxdiff.samplers import sample
from jaxdiff.schedule import make_schedule

# (sampler, steps, model calls per image)
RUNS = (("ddpm", 100, 100), ("ddim", 50, 50), ("dpm_solver++", 20, 20), ("heun", 18, 35))


def tiny_unet():
    """The tiny U-Net's parameters and its `denoise_fn(x_t, t)`."""
    config = default_config().model
    config.update(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    model = create_model(config)
    x = jnp.zeros((1, 16, 16, 3))
    params = model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
    return params, lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)


def time_call(fn, *args, repeats: int) -> float:
    """Best wall time in seconds of `fn(*args)` over `repeats` runs (after one warm-up run)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def compile_seconds(fn, *args) -> tuple[float, float]:
    """(trace and lower, XLA compile) seconds of `jax.jit(fn)` for `args`."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return traced, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    schedule = make_schedule("linear", 1000)
    params, denoise_fn = tiny_unet()
    shape = (args.batch, 16, 16, 3)
    rng = jax.random.key(0)
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__} on {device}; tiny U-Net, {count_parameters(params):,} parameters")
    print(f"batch {args.batch} of 16x16x3, T = 1000, best of {args.repeats}")

    forward = jax.jit(denoise_fn)
    x = jnp.zeros(shape)
    t = jnp.zeros((args.batch,), jnp.int32)
    print(f"one model call: {1e3 * time_call(forward, x, t, repeats=args.repeats):.1f} ms")

    print(f"{'sampler':14s}{'steps':>6s}{'calls':>7s}{'seconds':>10s}{'images/s':>10s}")
    for sampler, steps, calls in RUNS:
        run = jax.jit(functools.partial(sample, denoise_fn, schedule, shape, sampler=sampler, steps=steps))
        seconds = time_call(run, rng, repeats=args.repeats)
        print(f"{sampler:14s}{steps:6d}{calls:7d}{seconds:10.2f}{args.batch / seconds:10.2f}")

    print("compile time of ddim, jax.jit(sample).lower(rng).compile():")
    for steps in (10, 1000):
        traced, compiled = compile_seconds(
            functools.partial(sample, denoise_fn, schedule, shape, sampler="ddim", steps=steps), rng
        )
        print(f"  steps {steps:5d}: trace+lower {traced:.2f} s, compile {compiled:.2f} s")


if __name__ == "__main__":
    main()
