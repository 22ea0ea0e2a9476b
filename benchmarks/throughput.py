"""Training and sampling throughput of the U-Net, per batch size and compute dtype.

For each (dtype, batch size) it compiles the jitted `make_train_step` (Adam, clip, EMA, ε-MSE on
synthetic uint8 images) and the eval-mode denoiser forward, then reports:

  train img/s    batch / median wall time of `--steps` train steps after `--warmup` steps
  sample img/s   batch / median wall time of one network evaluation (one sampler step)
  compile s      trace + lower + XLA compile of the train step
  peak MiB       the device's peak memory (`memory_stats()`), else the host's peak RSS; peaks are
                 since process start, so run one configuration per call for separate peaks
  GFLOP/step     XLA's FLOP count of the compiled train step (`cost_analysis()`)
  TFLOP/s        GFLOP/step / median step time
  MFU            on GPU/TPU only: TFLOP/s over the bf16 matmul peak measured in the same run

It prints a table, then one line `JSON {...}` with every number.

    python benchmarks/throughput.py [--config configs/cifar10.py] [--batch-sizes 32 128]
        [--dtypes float32 bfloat16] [--steps 10] [--warmup 2] [--config.model.remat=True ...]

A short CPU run: `--batch-sizes 32 --steps 10 --dtypes float32`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxdiff.cli import load_config  # noqa: E402
from jaxdiff.config import validate  # noqa: E402
from jaxdiff.diffusion.denoisers import model_denoiser  # noqa: E402
from jaxdiff.models import create_model  # noqa: E402
from jaxdiff.models.unet import DTYPES  # noqa: E402
from jaxdiff.schedule import schedule_from_config  # noqa: E402
from jaxdiff.training.diffusion_step import make_train_step  # noqa: E402
from jaxdiff.training.step import init_train_state, make_optimizer  # noqa: E402

MATMUL_SIZE = 8192  # side of the square bf16 matmul that measures the accelerator's peak


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled computation per XLA's cost analysis (a dict, or a list of dicts in older JAX)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def peak_memory_bytes(device) -> tuple[int, str]:
    """(bytes, source): the device's peak allocation where the backend reports it, else the host's peak RSS."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_rss"  # Linux reports KiB


def median_seconds(fn, steps: int) -> float:
    """Median wall time of `steps` calls of `fn()` (each blocked until its result is ready)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_tflops(repeats: int = 10) -> float:
    """Achieved TFLOP/s of a [n, n] @ [n, n] bfloat16 matmul (float32 accumulation), median of `repeats`."""
    a = jax.random.normal(jax.random.key(0), (MATMUL_SIZE, MATMUL_SIZE), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (MATMUL_SIZE, MATMUL_SIZE), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(matmul(a, b))
    return 2 * MATMUL_SIZE**3 / median_seconds(lambda: matmul(a, b), repeats) / 1e12


def synthetic_batch(config, batch_size: int) -> dict:
    """Random uint8 images [B, S, S, C] and labels [B] (class 0 when unconditional)."""
    rng = np.random.default_rng(0)
    size, channels = config.model.image_size, config.model.in_channels
    images = rng.integers(0, 256, (batch_size, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, max(config.model.num_classes, 1), (batch_size,), dtype=np.int32)
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


def benchmark(config, *, batch_size: int, dtype: str, steps: int, warmup: int) -> dict:
    """Numbers of one (dtype, batch size); see the module docstring."""
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
    config.training.batch_size = batch_size
    model = create_model(config.model)
    tx = make_optimizer(config.training)
    schedule = schedule_from_config(config.diffusion)
    state = init_train_state(config, model, tx)
    batch = synthetic_batch(config, batch_size)

    start = time.perf_counter()
    compiled = jax.jit(make_train_step(config, model, tx), donate_argnums=0).lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    flops = xla_flops(compiled)

    def train_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        return metrics["loss"]

    for _ in range(warmup):
        jax.block_until_ready(train_step())
    step_seconds = median_seconds(train_step, steps)

    forward = jax.jit(lambda params, x, t: model_denoiser(model, params)(x, t))
    x = jax.random.normal(jax.random.key(0), batch["image"].shape, jnp.float32)
    t = jnp.full((batch_size,), schedule.num_timesteps // 2, jnp.int32)
    for _ in range(warmup):
        jax.block_until_ready(forward(state.params, x, t))
    forward_seconds = median_seconds(lambda: forward(state.params, x, t), steps)

    peak, peak_source = peak_memory_bytes(jax.devices()[0])
    return {
        "dtype": dtype,
        "batch_size": batch_size,
        "train_images_per_s": batch_size / step_seconds,
        "train_step_s": step_seconds,
        "sample_images_per_s_per_eval": batch_size / forward_seconds,
        "forward_s": forward_seconds,
        "compile_s": compile_seconds,
        "peak_memory_mib": peak / 2**20,
        "peak_memory_source": peak_source,
        "gflop_per_step": None if flops is None else flops / 1e9,
        "tflops_per_s": None if flops is None else flops / step_seconds / 1e12,
    }


def format_row(row: dict) -> str:
    def num(value, spec):
        return f"{'-':>{spec.split('.')[0]}}" if value is None else format(value, spec)

    return (
        f"{row['dtype']:>9}{row['batch_size']:>7}{row['train_images_per_s']:>12.1f}"
        f"{row['sample_images_per_s_per_eval']:>13.1f}{row['compile_s']:>10.1f}{row['peak_memory_mib']:>10.0f}"
        f"{num(row['gflop_per_step'], '12.1f')}{num(row['tflops_per_s'], '9.3f')}{num(row.get('mfu'), '7.3f')}"
    )


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar10.py"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    args, overrides = parser.parse_known_args(argv)
    for name in ("steps", "warmup"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            parser.error(f"--{name}={getattr(args, name)} is too small")
    if any(size < 1 for size in args.batch_sizes):
        parser.error(f"--batch-sizes {args.batch_sizes} must all be >= 1")
    return args, overrides


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    config = validate(load_config(args.config, overrides))
    device = jax.devices()[0]
    accelerator = device.platform in ("gpu", "tpu")
    peak_tflops = matmul_peak_tflops() if accelerator else None

    print(f"jax {jax.__version__}, {jax.device_count()} x {device.device_kind} ({device.platform})")
    print(f"config {args.config} {' '.join(overrides)}; median of {args.steps} steps after {args.warmup} warm-up")
    if peak_tflops is not None:
        print(f"measured bf16 matmul peak ({MATMUL_SIZE}^3): {peak_tflops:.1f} TFLOP/s")
    print(
        f"{'dtype':>9}{'batch':>7}{'train img/s':>12}{'sample img/s':>13}{'compile s':>10}{'peak MiB':>10}"
        f"{'GFLOP/step':>12}{'TFLOP/s':>9}{'MFU':>7}"
    )
    rows = []
    for dtype in args.dtypes:
        for batch_size in args.batch_sizes:
            row = benchmark(config, batch_size=batch_size, dtype=dtype, steps=args.steps, warmup=args.warmup)
            if peak_tflops is not None and row["tflops_per_s"] is not None:
                row["mfu"] = row["tflops_per_s"] / peak_tflops
            rows.append(row)
            print(format_row(row), flush=True)
    summary = {
        "jax": jax.__version__,
        "device": device.device_kind,
        "platform": device.platform,
        "config": args.config,
        "overrides": overrides,
        "matmul_peak_tflops": peak_tflops,
        "results": rows,
    }
    print("JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
