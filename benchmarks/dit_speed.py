"""DiT-B/4 on the CPU: jaxdiff against diffusers' PyTorch `DiTTransformer2DModel`, and DiT-XL/2's forward GFLOPs.

    python benchmarks/dit_speed.py [--batch-size 8] [--input-size 32] [--sample-steps 4] [--repeats 3]

Both sides build DiT-B/4 (depth 12, width 768, 12 heads, patch 4) in diffusers' layout (timestep and label embedders
in every block, `per_block_embedders`, frequency shift 1) on `--input-size`² × 4 latents, 1000 classes with the null
row, learned σ (8 output channels, the first 4 read: SiT's velocity), and run, on the same batch size:
  train   one flow-matching step: x_t = (1 − t)·x_0 + t·ε, t ~ U[0, 1), labels dropped at 10%, the network at
          t·1000, MSE against ε − x_0, gradient clip 1, Adam (lr 1e-4), EMA update. jaxdiff: its jitted
          `make_train_step` of a `flow` config; diffusers: the same step written in PyTorch.
  sample  `--sample-steps` Euler steps of the flow ODE from N(0, I) to t = 0 without guidance (eval mode, no
          gradient). jaxdiff: its sampler (`sample_images`, jitted); diffusers: the same loop in PyTorch.
Each side runs in its own process, one after the other (jaxdiff, then diffusers; PyTorch is imported only in its
own), on all cores (XLA's default thread pool; torch.set_num_threads(cores)); a side's time is the median of
`--repeats` calls after one untimed call (which compiles). Images/s are batch / median seconds; the ratio is
jaxdiff / diffusers. Then `jaxdiff info --config configs/dit_xl2_imagenet256.py` gives DiT-XL/2's forward GFLOPs
(2 FLOPs per multiply-add; the paper: 118.6 G multiply-adds). Prints a table, then one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from timing import timed_calls  # noqa: E402  (benchmarks/, this script's folder)

PRESET = "B/4"
LATENT_CHANNELS = 4
NUM_CLASSES = 1000
LABEL_DROPOUT = 0.1
TIME_SCALE = 1000.0
LEARNING_RATE = 1e-4
GRAD_CLIP = 1.0
EMA_DECAY = 0.9999
XL_CONFIG = ROOT / "configs" / "dit_xl2_imagenet256.py"
PAPER_XL2_GMACS = 118.6


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of `repeats` calls of fn after one untimed call."""
    return statistics.median(timed_calls(fn, repeats))


def jax_config(input_size: int, batch_size: int, sample_steps: int):
    """The jaxdiff run config of the benchmark: DiT-B/4 on the flow process, Euler sampling."""
    from jaxdiff.config.defaults import default_config
    from jaxdiff.config.validation import validate
    from jaxdiff.models import dit
    from jaxdiff.readers.dit_checkpoint import DIFFUSERS_FREQ_SHIFT

    config = default_config()
    model = config.model
    model.network, model.image_size, model.in_channels = "dit", input_size, LATENT_CHANNELS
    model.out_channels, model.num_classes = LATENT_CHANNELS, NUM_CLASSES
    model.dit = dit.preset_config(PRESET, input_size=input_size, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES,
                                  class_dropout_prob=LABEL_DROPOUT, output_sigma=False, per_block_embedders=True,
                                  freq_shift=DIFFUSERS_FREQ_SHIFT)  # fmt: skip
    config.data.random_flip = False
    config.diffusion.update(process="flow", loss_type="flow_matching", parameterization="velocity",
                            time_scale=TIME_SCALE, reduce_mean=True)  # fmt: skip
    config.training.update(batch_size=batch_size, learning_rate=LEARNING_RATE, warmup_steps=0,
                           grad_clip_norm=GRAD_CLIP, ema_decay=EMA_DECAY)  # fmt: skip
    config.sampling.update(sampler="euler", steps=sample_steps, clip_denoised=False, batch_size=batch_size)
    return validate(config)


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.families import family_of
    from jaxdiff.models import count_parameters, create_model
    from jaxdiff.training.diffusion_step import make_train_step
    from jaxdiff.training.step import init_train_state, make_optimizer
    from jaxdiff.training.tasks.diffusion import sample_images

    config = jax_config(args.input_size, args.batch_size, args.sample_steps)
    model, tx = create_model(config.model), make_optimizer(config.training)
    holder = {"state": init_train_state(config, model, tx)}
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.input_size, args.input_size, LATENT_CHANNELS)
    batch = {"image": jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, NUM_CLASSES, (args.batch_size,)), jnp.int32)}  # fmt: skip
    train_step = jax.jit(make_train_step(config, model, tx), donate_argnums=0)
    family = family_of(config)
    draw = jax.jit(lambda params, key: sample_images(family, model, params, key, args.batch_size))

    def train():
        holder["state"], metrics = train_step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    def sample():
        jax.block_until_ready(draw(holder["state"].params, jax.random.PRNGKey(0)))

    return {"version": f"jax {jax.__version__}", "parameters": count_parameters(holder["state"].params),
            "train_s": median_seconds(train, args.repeats), "sample_s": median_seconds(sample, args.repeats)}  # fmt: skip


def run_torch(args) -> dict:
    import torch
    from diffusers import DiTTransformer2DModel

    from jaxdiff.models import dit

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    depth, hidden, heads = dit.SIZES[PRESET.split("/")[0]]
    net = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS, num_layers=depth, sample_size=args.input_size,
        patch_size=int(PRESET.split("/")[1]), num_embeds_ada_norm=NUM_CLASSES,
    )  # fmt: skip
    ema = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8)
    shape = (args.batch_size, LATENT_CHANNELS, args.input_size, args.input_size)  # NCHW
    x0 = torch.rand(shape) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,))

    def velocity(x, t, y):
        return net(x, timestep=t * TIME_SCALE, class_labels=y).sample[:, :LATENT_CHANNELS]

    def train():
        net.train()
        t, eps = torch.rand(args.batch_size), torch.randn(shape)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        loss = torch.mean((velocity(x_t, t, labels) - (eps - x0)) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - EMA_DECAY)

    def sample():
        net.eval()
        with torch.no_grad():
            x = torch.randn(shape)
            times = torch.linspace(1.0, 0.0, args.sample_steps + 1)
            for t, t_next in zip(times[:-1], times[1:]):
                x = x + (t_next - t) * velocity(x, t.expand(args.batch_size), labels)

    import diffusers

    return {"version": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
            "parameters": sum(p.numel() for p in net.parameters()),
            "train_s": median_seconds(train, args.repeats), "sample_s": median_seconds(sample, args.repeats)}  # fmt: skip


def xl2_gflops() -> float:
    """DiT-XL/2's forward GFLOPs per image, as `jaxdiff info` prints them."""
    out = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "info", "--config", str(XL_CONFIG)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    match = re.search(r"forward GFLOPs per image: ([0-9.]+)", out)
    if match is None:
        raise SystemExit(f"`jaxdiff info` printed no forward GFLOPs:\n{out}")
    return float(match.group(1))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32: 256² images)")
    parser.add_argument("--sample-steps", type=int, default=4, help="Euler steps of the timed sampling")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each (medians are reported)")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args(argv)
    for name in ("batch_size", "input_size", "sample_steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        print("JSON " + json.dumps(run_jax(args) if args.side == "jax" else run_torch(args)))
        return 0
    flags = ["--batch-size", str(args.batch_size), "--input-size", str(args.input_size),
             "--sample-steps", str(args.sample_steps), "--repeats", str(args.repeats)]  # fmt: skip
    load_before = os.getloadavg()[0]
    sides = {}
    for side, label in (("jax", "jaxdiff"), ("torch", "diffusers")):
        out = subprocess.run([sys.executable, __file__, "--side", side, *flags], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        sides[label] = json.loads(next(line[5:] for line in out.splitlines() if line.startswith("JSON ")))
    load_after = os.getloadavg()[0]
    gflops = xl2_gflops()
    for row in sides.values():
        row["train_images_per_s"] = args.batch_size / row["train_s"]
        row["sample_images_per_s"] = args.batch_size / row["sample_s"]
    ratio = {name: sides["jaxdiff"][f"{name}_images_per_s"] / sides["diffusers"][f"{name}_images_per_s"]
             for name in ("train", "sample")}  # fmt: skip
    print(f"DiT-{PRESET} on {args.input_size}×{args.input_size}×{LATENT_CHANNELS}, batch {args.batch_size}, "
          f"{args.sample_steps} Euler steps per sample; {os.cpu_count()} cores, load {load_before:.2f} before, "
          f"{load_after:.2f} after; medians of {args.repeats}")  # fmt: skip
    print(f"{'':12}{'parameters':>13}{'train img/s':>13}{'sample img/s':>14}  version")
    for label, row in sides.items():
        print(f"{label:12}{row['parameters']:>13,}{row['train_images_per_s']:>13.2f}{row['sample_images_per_s']:>14.2f}"
              f"  {row['version']}")  # fmt: skip
    print(f"{'ratio':12}{'':>13}{ratio['train']:>13.2f}{ratio['sample']:>14.2f}  jaxdiff / diffusers")
    print(f"DiT-XL/2 forward: {gflops:.2f} GFLOPs per image = {gflops / 2:.2f} G multiply-adds "
          f"(paper {PAPER_XL2_GMACS})")  # fmt: skip
    summary = {"preset": PRESET, "input_size": args.input_size, "batch_size": args.batch_size,
               "sample_steps": args.sample_steps, "repeats": args.repeats, "sides": sides, "ratio": ratio,
               "xl2_forward_gflops": gflops, "load": [load_before, load_after],
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    print("JSON " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
