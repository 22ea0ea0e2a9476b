"""jaxdiff against Hugging Face diffusers' PyTorch `UNet2DModel`, the same architecture, timed in one run.

The peer is the DDPM U-Net built from the same `config.model` (for CIFAR-10: block_out_channels
(128, 256, 256, 256), 2 ResBlocks per level, single-head attention at 16×16, GroupNorm eps 1e-6,
dropout in training). Both sides run the same training step on the same batch: [-1, 1] scaling,
random flip, t ~ U{0..T-1}, ε-MSE loss, global-norm clip, Adam, EMA update; and the same sampling
forward (eval mode, no gradient). Each side lives in its own worker process, this script run with
`--serve` (no shared thread pools: PyTorch's OpenMP threads spinning after a step would otherwise slow
XLA's), built once; the parent asks them for one step at a time, in turn, so that all see the same
machine load; each side's images/s is batch / median step time, and the ratio is jaxdiff / diffusers.
Both frameworks use all the process's cores: torch.set_num_threads(N), and XLA's CPU thread pool,
which is one thread per core by default. The load average is printed before and after.

With `--config.model.dtype=bfloat16` jaxdiff computes in bfloat16 (float32 parameters) and diffusers runs
under `torch.autocast("cpu", dtype=torch.bfloat16)`. `--jax-python PYTHON` (repeatable) adds a jaxdiff
worker run by another interpreter, e.g. a Python 3.12 environment with the newest JAX, into the same
alternation, so that two JAX lines are compared in one run; that environment needs jaxdiff, not PyTorch.

    python benchmarks/vs_diffusers.py [--config configs/cifar10.py] [--batch-size 32] [--steps 10]
        [--warmup 2] [--jax-python PYTHON ...] [--config.a.b=V ...]

Prints a table, then one line `JSON {...}`.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step_args import parse_step_args  # noqa: E402  (benchmarks/, this script's folder)

from jaxdiff.diffusion.denoisers import model_denoiser  # noqa: E402
from jaxdiff.models import count_parameters, create_model  # noqa: E402
from jaxdiff.training.diffusion_step import make_train_step  # noqa: E402
from jaxdiff.training.step import init_train_state, make_optimizer  # noqa: E402

AUTHKEY_VARIABLE = "VS_DIFFUSERS_AUTHKEY"  # how workers learn the connection's key


def inputs(config, batch_size: int) -> dict[str, np.ndarray]:
    """The shared inputs: uint8 images [B, H, W, C], x_t float32 [B, H, W, C], t int32 [B] (= T // 2)."""
    rng = np.random.default_rng(0)
    size, channels = config.model.image_size, config.model.in_channels
    return {
        "images": rng.integers(0, 256, (batch_size, size, size, channels), dtype=np.uint8),
        "x_t": rng.standard_normal((batch_size, size, size, channels), dtype=np.float32),
        "t": np.full((batch_size,), config.diffusion.num_timesteps // 2, np.int32),
    }


def jax_side(config, arrays: dict) -> tuple[dict, dict]:
    """({"train": fn, "sample": fn}, facts) of jaxdiff: the jitted train step and the sampling forward."""
    model, tx = create_model(config.model), make_optimizer(config.training)
    state = init_train_state(config, model, tx)
    batch = {"image": jnp.asarray(arrays["images"]), "label": jnp.zeros((len(arrays["images"]),), jnp.int32)}
    x_t, t = jnp.asarray(arrays["x_t"]), jnp.asarray(arrays["t"])
    train_step = jax.jit(make_train_step(config, model, tx), donate_argnums=0)
    forward = jax.jit(lambda params, x, t: model_denoiser(model, params)(x, t))
    holder = {"state": state}

    def train():
        holder["state"], metrics = train_step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    def sample():
        jax.block_until_ready(forward(holder["state"].params, x_t, t))

    facts = {"version": f"jax {jax.__version__} ({jax.devices()[0].platform})", "parameters": count_parameters(state.params)}
    return {"train": train, "sample": sample}, facts


def serve(side: str, address: str) -> None:
    """Worker process: connect to `address`, receive (config dict, batch size), build one side ("jax" or
    "torch"), report its facts, then run the step named by each message ("train"/"sample") and answer with
    its wall seconds, until None."""
    import ml_collections

    host, port = address.rsplit(":", 1)
    connection = Client((host, int(port)), authkey=bytes.fromhex(os.environ[AUTHKEY_VARIABLE]))
    config_dict, batch_size = connection.recv()
    config = ml_collections.ConfigDict(config_dict)
    if side == "jax":
        steps, facts = jax_side(config, inputs(config, batch_size))
    else:
        from diffusers_peer import torch_side

        steps, facts = torch_side(config, inputs(config, batch_size))
    connection.send(facts)
    while (name := connection.recv()) is not None:
        start = time.perf_counter()
        steps[name]()
        connection.send(time.perf_counter() - start)


def alternate(workers: dict, name: str, *, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of step `name` on each worker {label: connection}, asked in turn `steps` times after
    `warmup` untimed calls each (the first call compiles)."""
    times = {label: [] for label in workers}
    for index in range(warmup + steps):
        for label, connection in workers.items():
            connection.send(name)
            seconds = connection.recv()
            if index >= warmup:
                times[label].append(seconds)
    return {label: statistics.median(seconds) for label, seconds in times.items()}


def start_workers(config, batch_size: int, jax_pythons: list[str]) -> tuple[dict, dict, list]:
    """({label: connection}, {label: facts}, processes): a jaxdiff worker per interpreter, then the diffusers
    worker ("diffusers", last), each this script run by that interpreter (its own packages, none of this
    process's), built one after the other so that none compiles under another."""
    authkey = secrets.token_bytes(16)
    env = {**os.environ, AUTHKEY_VARIABLE: authkey.hex()}
    workers, facts, processes = {}, {}, []
    with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
        address = "{}:{}".format(*listener.address)
        for side, python in [*(("jax", p) for p in jax_pythons), ("torch", sys.executable)]:
            processes.append(subprocess.Popen([python, __file__, "--serve", side, address], env=env))
            connection = listener.accept()
            connection.send((config.to_dict(), batch_size))
            reported = connection.recv()
            label = "diffusers" if side == "torch" else f"jaxdiff, {reported['version']}"
            workers[label], facts[label] = connection, reported
    return workers, facts, processes


def main(argv: list[str] | None = None) -> None:
    def more(parser):
        parser.add_argument("--jax-python", action="append", default=[], metavar="PYTHON",
                            help="another interpreter to run a jaxdiff worker with (repeatable)")  # fmt: skip

    args, config = parse_step_args(sys.argv[1:] if argv is None else argv, description=__doc__.splitlines()[0],
                                   steps=10, steps_help="timed steps of each side (medians are reported)", warmup=2,
                                   warmup_help="untimed steps of each side after compilation", more=more)  # fmt: skip
    threads = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    workers, facts, processes = start_workers(config, args.batch_size, [sys.executable, *args.jax_python])
    if len(workers) != 2 + len(args.jax_python):
        raise SystemExit(f"two jaxdiff workers report the same version: {sorted(facts)}; compare different lines")
    try:
        times = {name: alternate(workers, name, steps=args.steps, warmup=args.warmup + 1) for name in ("train", "sample")}
    finally:
        for connection in workers.values():
            connection.send(None)
        for process in processes:
            process.wait()
    load_after = os.getloadavg()

    print(f"{facts['diffusers']['version']}; {threads} threads each (torch.set_num_threads, XLA default), "
          f"one worker process each")  # fmt: skip
    autocast = " (diffusers under torch.autocast bfloat16)" if config.model.dtype == "bfloat16" else ""
    print(f"config {args.config} {' '.join(args.overrides)}; dtype {config.model.dtype}{autocast}; "
          f"batch {args.batch_size}; median of {args.steps} alternating steps after compilation and "
          f"{args.warmup} warm-up")  # fmt: skip
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("parameters: " + ", ".join(f"{label} {facts[label]['parameters']:,}" for label in facts))
    jax_labels = [label for label in workers if label != "diffusers"]
    width = max(len(label) for label in jax_labels) + 2
    print(f"{'':{width}}{'train img/s':>12}{'ratio':>7}{'sample img/s':>14}{'ratio':>7}")
    results = {}
    for label in [*jax_labels, "diffusers"]:
        row = {}
        for name in ("train", "sample"):
            row[name] = {"images_per_s": args.batch_size / times[name][label],
                         "ratio": times[name]["diffusers"] / times[name][label]}  # fmt: skip
        results[label] = row
        print(f"{label:{width}}{row['train']['images_per_s']:>12.1f}{row['train']['ratio']:>7.2f}"
              f"{row['sample']['images_per_s']:>14.1f}{row['sample']['ratio']:>7.2f}")  # fmt: skip
    summary = {
        "threads": threads,
        "config": args.config,
        "overrides": args.overrides,
        "dtype": config.model.dtype,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "load": [load_before[0], load_after[0]],
        "parameters": {label: facts[label]["parameters"] for label in facts},
        "results": results,
    }
    print("JSON " + json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(*sys.argv[2:4])
    else:
        main()
