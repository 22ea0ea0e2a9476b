"""Where the diffusers peer's training step spends its time: PyTorch's per-op profile, by category.

    python benchmarks/profile_diffusers_step.py [--config configs/cifar10.py] [--batch-size 32] [--steps 3]
        [--warmup 1] [--config.a.b=V ...]

The step is `vs_diffusers.py`'s (diffusers `UNet2DModel` with jaxdiff's training step in PyTorch: flip,
q_sample, ε-MSE, clip, Adam, EMA) on a fixed uint8 batch, timed untraced (median of --steps), then traced
with `torch.profiler` for as many steps. Each ATen op's self time (its own work, not its children's) goes to
one category by the op's name, to set beside `profile_train_step.py`'s table for jaxdiff:
  conv forward        convolutions (oneDNN) run forward
  conv backward       `convolution_backward`: input and weight gradients in one op (jaxdiff's table
                      splits them; add its two rows to compare)
  GroupNorm           `native_group_norm` and its backward
  attention core      scaled_dot_product_attention (softmax(qkᵀ)v in one op) or softmax, and backward
  matmul              mm / addmm / bmm / baddbmm, forward and backward (attention's q/k/v/proj_out, the
                      timestep embedding, temb_proj)
  optimizer           Adam, gradient clip and EMA (`_foreach_*`, norms)
  other               activations, additions, resampling, layout copies, noise draws, loss
Prints a table and one line `JSON {...}`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_peer import TorchTrainer, diffusers_unet  # noqa: E402  (benchmarks/, this script's folder)
from profile_report import print_profile  # noqa: E402
from step_args import parse_step_args  # noqa: E402

from jaxdiff.schedule import schedule_from_config  # noqa: E402

CATEGORIES = ("conv forward", "conv backward", "GroupNorm", "attention core", "matmul", "optimizer", "other")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def op_category(name: str) -> str:
    """The CATEGORIES entry of an ATen op name."""
    if "convolution_backward" in name:
        return "conv backward"
    if "convolution" in name:
        return "conv forward"
    if "group_norm" in name:
        return "GroupNorm"
    if name in MATMULS:
        return "matmul"
    if "scaled_dot_product" in name or "softmax" in name:
        return "attention core"
    if name.startswith("aten::_foreach") or "norm" in name or "lerp" in name:
        return "optimizer"
    return "other"


def main(argv: list[str] | None = None) -> None:
    args, config = parse_step_args(sys.argv[1:] if argv is None else argv, description=__doc__.splitlines()[0],
                                   steps=3, steps_help="timed steps, then as many traced steps", warmup=1,
                                   warmup_help="untimed steps before timing")  # fmt: skip
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(config.seed)
    load_before = os.getloadavg()
    schedule = schedule_from_config(config.diffusion)
    peer = TorchTrainer(diffusers_unet(config.model), config, np.asarray(schedule.alphas_cumprod))
    size, channels = config.model.image_size, config.model.in_channels
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, channels), dtype=np.uint8)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    for _ in range(args.warmup):
        peer.step(images)
    wall = []
    for _ in range(args.steps):
        start = time.perf_counter()
        peer.step(images)
        wall.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        for _ in range(args.steps):
            peer.step(images)
    load_after = os.getloadavg()

    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in trace.key_averages():
        if event.key.startswith("aten::"):
            seconds[op_category(event.key)] += event.self_cpu_time_total * 1e-6 / args.steps
    step_seconds = statistics.median(wall)
    header = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"config {args.config} {' '.join(args.overrides)}; batch {args.batch_size}; load {load_before} -> {load_after}",
        f"step {step_seconds * 1e3:.1f} ms untraced (median of {args.steps}); ATen self times sum to "
        f"{sum(seconds.values()) * 1e3:.1f} ms per step",
    ]
    print_profile(args, header=header, load=(load_before[0], load_after[0]), step_seconds=step_seconds,
                  columns={"ms/step": ("ms_per_step", seconds)}, facts={"torch": torch.__version__})  # fmt: skip


if __name__ == "__main__":
    main()
