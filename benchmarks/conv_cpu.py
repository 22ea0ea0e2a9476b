"""XLA's convolutions against `jaxdiff.models.cpu_conv`'s GEMMs on this CPU: the forward of SD 1.5's U-Net
convolutions (`--forward`), the weight gradient of the CIFAR-10 U-Net's.

    python benchmarks/conv_cpu.py --forward [--vae] [--repeats 5]
    python benchmarks/conv_cpu.py [--batch-size 32] [--repeats 7] [--train-config configs/cifar10.py]
        [--train-batch-size 32] [--train-steps 3] [--xla-flags="FLAGS;FLAGS;..."] [--rounds 2]

--forward: every distinct 3×3 and 1×1 convolution of SD 1.5's U-Net on one guided step (batch 2, 64×64 latents;
   with --vae: of SD 1.5's VAE decoder, one 64×64 latent to 512×512), by the input's size, channels in and out,
   kernel, stride, and how many the forward holds: XLA's convolution, `cpu_conv.im2col_conv` and, where it
   applies (3×3, stride 1, rows a multiple of the band), `cpu_conv.winograd_conv`, each jitted, called round-robin
   --repeats times after a warm-up and checked against XLA's; min milliseconds, which form `cpu_conv.cpu_form`
   picks, and the totals over the forward (counts applied). Nothing else runs.

1. Operations, one process: for each 3×3 convolution of the CIFAR-10 U-Net (32×32×128, 16×16×256,
   8×8×256, 4×4×256, stride 1 "SAME"; and the stride-2 downsample at 32×32×128) the forward, XLA's
   input gradient, XLA's weight gradient and the shifted-GEMM weight gradient, each jitted, called
   round-robin (order reversed every round) --repeats times; min and median milliseconds.
2. Training step (skipped with --train-steps 0): `make_train_step` of --train-config built twice in
   this process, with JAXDIFF_CPU_CONV_WGRAD=0 and =1, steps alternating; median seconds.
3. XLA flags: part 1 re-run in a child process per ';'-separated entry of --xla-flags (write it with
   "=", as its values start with "--") and one without flags, in
   --rounds alternating rounds; the per-op minimum over rounds.
Every part prints the load average before and after. Prints tables and one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxdiff.models import cpu_conv  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
# (name, spatial size, channels, stride) of the CIFAR-10 U-Net's 3×3 convolutions.
SHAPES = (("32x32x128", 32, 128, 1), ("16x16x256", 16, 256, 1), ("8x8x256", 8, 256, 1), ("4x4x256", 4, 256, 1),
          ("32x32x128/2", 32, 128, 2))  # fmt: skip
OPS = ("forward", "input grad", "weight grad XLA", "weight grad GEMMs")
# (input size, channels in, channels out, kernel, stride, count) of SD 1.5's U-Net forward at 64×64 latents: the
# resnets' 3×3 convolutions down, middle and up (the up blocks' inputs concatenate skips), the down- and upsamplers'
# (the upsampler's at its output size), the transformers' 1×1 proj_in / proj_out and the resnets' 1×1 shortcuts.
SD15_CONVOLUTIONS = (
    (64, 320, 320, 3, 1, 7), (64, 320, 320, 3, 2, 1), (32, 320, 640, 3, 1, 1), (32, 640, 640, 3, 1, 6),
    (32, 640, 640, 3, 2, 1), (16, 640, 1280, 3, 1, 1), (16, 1280, 1280, 3, 1, 7), (16, 1280, 1280, 3, 2, 1),
    (8, 1280, 1280, 3, 1, 11), (8, 2560, 1280, 3, 1, 3), (16, 2560, 1280, 3, 1, 2), (16, 1920, 1280, 3, 1, 1),
    (32, 1280, 1280, 3, 1, 1), (32, 1920, 640, 3, 1, 1), (32, 1280, 640, 3, 1, 1), (32, 960, 640, 3, 1, 1),
    (64, 640, 640, 3, 1, 1), (64, 960, 320, 3, 1, 1),
    (64, 640, 320, 3, 1, 2), (64, 320, 320, 1, 1, 10), (32, 640, 640, 1, 1, 10), (16, 1280, 1280, 1, 1, 10),
    (8, 1280, 1280, 1, 1, 2), (32, 320, 640, 1, 1, 1), (16, 640, 1280, 1, 1, 1), (8, 2560, 1280, 1, 1, 3),
    (16, 2560, 1280, 1, 1, 2), (16, 1920, 1280, 1, 1, 1), (32, 1920, 640, 1, 1, 1), (32, 1280, 640, 1, 1, 1),
    (32, 960, 640, 1, 1, 1), (64, 960, 320, 1, 1, 1), (64, 640, 320, 1, 1, 2),
)  # fmt: skip
# The same for SD 1.5's VAE decoder (batch 1, 64² latent to 512²): the middle and up blocks' resnets, the
# upsamplers' convolutions (at their output size), the 1×1 shortcuts where the width halves; conv_in / conv_out
# (4 and 3 channels) left out.
SD15_VAE_DECODER_CONVOLUTIONS = (
    (64, 512, 512, 3, 1, 10), (128, 512, 512, 3, 1, 7), (256, 512, 512, 3, 1, 1), (256, 512, 256, 3, 1, 1),
    (256, 256, 256, 3, 1, 5), (512, 256, 256, 3, 1, 1), (512, 256, 128, 3, 1, 1), (512, 128, 128, 3, 1, 5),
    (256, 512, 256, 1, 1, 1), (512, 256, 128, 1, 1, 1),
)  # fmt: skip


def load() -> float:
    return os.getloadavg()[0]


def operation_fns(batch: int, size: int, channels: int, stride: int):
    """{op name: (jitted fn, args)} for one convolution shape; the two weight gradients checked equal."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, channels, channels), np.float32) * 0.05)
    strides = (stride, stride)

    def conv(x, k):
        return lax.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=NHWC)

    g = jnp.asarray(rng.standard_normal(conv(x, kernel).shape, np.float32))
    pads = lax.padtype_to_pads(x.shape[1:3], (3, 3), strides, "SAME")
    fns = {
        "forward": (jax.jit(conv), (x, kernel)),
        "input grad": (jax.jit(lambda k, g: jax.vjp(lambda x_: conv(x_, k), x)[1](g)[0]), (kernel, g)),
        "weight grad XLA": (jax.jit(lambda x, g: jax.vjp(lambda k: conv(x, k), kernel)[1](g)[0]), (x, g)),
        "weight grad GEMMs": (
            jax.jit(lambda x, g: cpu_conv.shifted_gemm_weight_grad(x, g, kernel.shape, strides, pads)), (x, g)
        ),
    }
    xla, gemms = (np.asarray(fns[name][0](*fns[name][1])) for name in ("weight grad XLA", "weight grad GEMMs"))
    error = np.abs(xla - gemms).max() / np.abs(xla).max()
    if error > 1e-4:
        raise AssertionError(f"weight gradients differ at {size}x{size}x{channels}/{stride}: {error:.1e} relative")
    return fns


def measure_forward(shapes, batch: int, repeats: int) -> dict:
    """{"rows": [{shape, count, xla_ms, gemm_ms, winograd_ms (None where it does not apply), picked}], "totals_s"}
    for `shapes` ((size, channels in, channels out, kernel, stride, count), as SD15_CONVOLUTIONS)."""
    before, rows = load(), []
    for size, c_in, c_out, k, stride, count in shapes:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((batch, size, size, c_in), np.float32))
        kernel = jnp.asarray(rng.standard_normal((k, k, c_in, c_out), np.float32) * 0.05)
        strides, pads = (stride, stride), ((k // 2, k // 2),) * 2
        fns = {
            "xla": jax.jit(lambda x, w: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC)),
            "gemm": jax.jit(lambda x, w: cpu_conv.im2col_conv(x, w, strides, pads)),
        }
        if (k, stride) == (3, 1) and size % cpu_conv.WINOGRAD_BAND_ROWS == 0:
            fns["winograd"] = jax.jit(cpu_conv.winograd_conv)
        reference = np.asarray(fns["xla"](x, kernel))
        for name, fn in fns.items():
            error = np.abs(np.asarray(fn(x, kernel)) - reference).max() / np.abs(reference).max()
            if error > 1e-5:
                raise AssertionError(f"{name} differs from XLA's convolution at {x.shape} k{k}/{stride}: {error:.1e}")
        times = time_round_robin({name: (fn, (x, kernel)) for name, fn in fns.items()}, repeats)
        milliseconds = {f"{name}_ms": min(times[name]) * 1e3 if name in times else None
                        for name in ("xla", "gemm", "winograd")}  # fmt: skip
        rows.append({"shape": [batch, size, size, c_in, c_out, k, stride], "count": count, **milliseconds,
                     "picked": cpu_conv.cpu_form(x.shape, kernel.shape, strides, pads)})  # fmt: skip
    totals = {name: sum(r["count"] * r[f"{name}_ms"] for r in rows) / 1e3 for name in ("xla", "gemm")}
    totals["picked"] = sum(r["count"] * r[f"{r['picked']}_ms"] for r in rows) / 1e3
    return {"load": [before, load()], "rows": rows, "totals_s": totals}


def print_forward(title: str, measured: dict) -> None:
    print(f"{title}, forward (load {measured['load'][0]:.1f} -> {measured['load'][1]:.1f}); min ms")
    print(f"{'B,H,W,Cin,Cout,k,stride':<30}{'count':>6}{'XLA':>10}{'GEMM':>10}{'Winograd':>10}{'picked':>10}")
    for r in measured["rows"]:
        winograd = "-" if r["winograd_ms"] is None else f"{r['winograd_ms']:.1f}"
        print(f"{','.join(map(str, r['shape'])):<30}{r['count']:>6}{r['xla_ms']:>10.1f}{r['gemm_ms']:>10.1f}"
              f"{winograd:>10}{r['picked']:>10}")  # fmt: skip
    t = measured["totals_s"]
    print(f"per forward: all XLA {t['xla']:.2f} s, all GEMM {t['gemm']:.2f} s, as picked {t['picked']:.2f} s "
          f"(XLA / picked {t['xla'] / t['picked']:.2f}x)")  # fmt: skip


def time_round_robin(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each fn over `repeats` round-robin calls (order reversed every other round), after one warm-up."""
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for round_index in range(repeats):
        names = list(fns) if round_index % 2 == 0 else list(fns)[::-1]
        for name in names:
            fn, args = fns[name]
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return times


def measure_operations(batch: int, repeats: int) -> dict:
    """{shape: {op: {"min_ms", "median_ms"}}} and the load before/after."""
    before, result = load(), {}
    for name, size, channels, stride in SHAPES:
        times = time_round_robin(operation_fns(batch, size, channels, stride), repeats)
        result[name] = {op: {"min_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3} for op, t in times.items()}
    return {"load": [before, load()], "ops": result}


def print_operations(title: str, measured: dict) -> None:
    print(f"{title} (load {measured['load'][0]:.1f} -> {measured['load'][1]:.1f}); min ms (median)")
    print(f"{'shape':<14}" + "".join(f"{op:>22}" for op in OPS) + f"{'GEMMs / XLA':>13}")
    for shape, ops in measured["ops"].items():
        ratio = ops["weight grad GEMMs"]["min_ms"] / ops["weight grad XLA"]["min_ms"]
        cells = "".join(f"{ops[op]['min_ms']:>12.1f} ({ops[op]['median_ms']:>6.1f})" for op in OPS)
        print(f"{shape:<14}{cells}{ratio:>13.2f}")


def measure_training(config_path: str, batch: int, steps: int) -> dict:
    """Median seconds of the training step with the switch off and on, built in this process, alternating."""
    from jaxdiff.cli import load_config
    from jaxdiff.config import validate
    from jaxdiff.models import create_model
    from jaxdiff.training.diffusion_step import make_train_step
    from jaxdiff.training.step import init_train_state, make_optimizer

    config = validate(load_config(config_path, []))
    config.training.batch_size = batch
    size, channels = config.model.image_size, config.model.in_channels
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, channels), dtype=np.uint8)
    data = {"image": jnp.asarray(images), "label": jnp.zeros((batch,), jnp.int32)}
    tx = make_optimizer(config.training)
    runs = {}
    for switch in ("0", "1"):
        os.environ[cpu_conv.ENV_VAR] = switch
        model = create_model(config.model)
        step = jax.jit(make_train_step(config, model, tx), donate_argnums=0)
        runs[switch] = [step, init_train_state(config, model, tx)]
    os.environ.pop(cpu_conv.ENV_VAR)
    before, times = load(), {"0": [], "1": []}
    for index in range(steps + 1):  # the first step of each compiles and is not timed
        for switch, run in runs.items():
            start = time.perf_counter()
            run[1], metrics = run[0](run[1], data)
            jax.block_until_ready(metrics)
            if index:
                times[switch].append(time.perf_counter() - start)
    native, gemms = statistics.median(times["0"]), statistics.median(times["1"])
    return {"load": [before, load()], "native_s": native, "gemms_s": gemms, "ratio": native / gemms}


def measure_flags(flag_sets: list[str], batch: int, repeats: int, rounds: int) -> dict:
    """{flags: per-op minimum over `rounds` child processes}, children alternating between flag sets."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for flags in ["", *flag_sets]:
            env = {**os.environ, "XLA_FLAGS": flags}
            command = [sys.executable, __file__, "--batch-size", str(batch), "--repeats", str(repeats),
                       "--train-steps", "0", "--operations-json"]  # fmt: skip
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            previous = best.setdefault(flags, measured)
            for shape, ops in measured["ops"].items():
                for op, values in ops.items():
                    previous["ops"][shape][op]["min_ms"] = min(previous["ops"][shape][op]["min_ms"], values["min_ms"])
    return best


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward", action="store_true", help="SD 1.5's U-Net convolutions, forward only")
    parser.add_argument("--vae", action="store_true", help="with --forward: SD 1.5's VAE decoder's instead")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--train-config", default=str(ROOT / "configs" / "cifar10.py"))
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps of each variant; 0 skips part 2")
    parser.add_argument("--xla-flags", default="", help="';'-separated XLA_FLAGS strings, each tried in child processes")
    parser.add_argument("--rounds", type=int, default=2, help="alternating child-process rounds for --xla-flags")
    parser.add_argument("--operations-json", action="store_true", help=argparse.SUPPRESS)  # a child of part 3
    args = parser.parse_args(argv)
    for name, minimum in (("batch_size", 1), ("repeats", 1), ("train_batch_size", 1), ("train_steps", 0), ("rounds", 1)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {minimum}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.forward:
        shapes, batch, title = ((SD15_VAE_DECODER_CONVOLUTIONS, 1, "SD 1.5 VAE decoder convolutions") if args.vae
                                else (SD15_CONVOLUTIONS, 2, "SD 1.5 U-Net convolutions"))  # fmt: skip
        forward = measure_forward(shapes, batch, args.repeats)
        print(f"jax {jax.__version__}, {os.cpu_count()} CPUs")
        print_forward(title, forward)
        print("JSON " + json.dumps({"jax": jax.__version__, "forward": forward}))
        return
    operations = measure_operations(args.batch_size, args.repeats)
    if args.operations_json:
        print(json.dumps(operations))
        return
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, batch {args.batch_size}, XLA_FLAGS "
          f"{os.environ.get('XLA_FLAGS', '')!r}")  # fmt: skip
    print_operations("operations", operations)
    summary = {"jax": jax.__version__, "batch_size": args.batch_size, "operations": operations}
    if args.train_steps:
        training = measure_training(args.train_config, args.train_batch_size, args.train_steps)
        print(f"training step {args.train_config} batch {args.train_batch_size} (load {training['load'][0]:.1f} -> "
              f"{training['load'][1]:.1f}): XLA {training['native_s']:.2f} s, GEMMs {training['gemms_s']:.2f} s, "
              f"speed-up {training['ratio']:.2f}x")  # fmt: skip
        summary["training"] = training
    if args.xla_flags:
        flags = measure_flags(args.xla_flags.split(";"), args.batch_size, args.repeats, args.rounds)
        for name, measured in flags.items():
            print_operations(f"XLA_FLAGS={name!r}, min over {args.rounds} rounds", measured)
        summary["xla_flags"] = flags
    print("JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
