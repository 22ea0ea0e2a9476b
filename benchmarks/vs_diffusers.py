"""jaxdiff against Hugging Face diffusers' PyTorch `UNet2DModel`, the same architecture, timed in one run.

The peer is the DDPM U-Net built from the same `config.model` (for CIFAR-10: block_out_channels
(128, 256, 256, 256), 2 ResBlocks per level, single-head attention at 16×16, GroupNorm eps 1e-6,
dropout in training). Both sides run the same training step on the same batch: [-1, 1] scaling,
random flip, t ~ U{0..T-1}, ε-MSE loss, global-norm clip, Adam, EMA update; and the same sampling
forward (eval mode, no gradient). Each side lives in its own worker process (no shared thread pools:
PyTorch's OpenMP threads spinning after a step would otherwise slow XLA's), built once; the parent
asks them for one step at a time, alternating (jax, torch, jax, ...), so that both see the same
machine load; each side's images/s is batch / median step time, and the ratio is jaxdiff / diffusers.
Both frameworks use all the process's cores: torch.set_num_threads(N), and XLA's CPU thread pool,
which is one thread per core by default. The load average is printed before and after.

    python benchmarks/vs_diffusers.py [--config configs/cifar10.py] [--batch-size 32] [--steps 10]
        [--warmup 2] [--config.a.b=V ...]

Prints a table, then one line `JSON {...}`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import UNet2DModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step_args import parse_step_args  # noqa: E402  (benchmarks/, this script's folder)

from jaxdiff.denoiser import model_denoiser  # noqa: E402
from jaxdiff.models import count_parameters, create_model  # noqa: E402
from jaxdiff.models.unet import level_resolutions  # noqa: E402
from jaxdiff.schedule import schedule_from_config  # noqa: E402
from jaxdiff.train import init_train_state, make_optimizer, make_train_step  # noqa: E402


def diffusers_unet(model_config) -> UNet2DModel:
    """`UNet2DModel` with the DDPM architecture of `model_config` (unconditional, convolutional resampling)."""
    if model_config.num_classes or not model_config.resamp_with_conv:
        raise ValueError(
            f"the peer supports unconditional models with resamp_with_conv=True, got num_classes="
            f"{model_config.num_classes}, resamp_with_conv={model_config.resamp_with_conv}"
        )
    resolutions = level_resolutions(model_config.image_size, len(model_config.ch_mult))
    attention = [res in model_config.attn_resolutions for res in resolutions]
    return UNet2DModel(
        sample_size=model_config.image_size,
        in_channels=model_config.in_channels,
        out_channels=model_config.out_channels,
        block_out_channels=tuple(model_config.ch * mult for mult in model_config.ch_mult),
        layers_per_block=model_config.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=None,  # one head over all channels, as in DDPM
        norm_eps=1e-6,
        dropout=model_config.dropout,
        downsample_padding=0,  # TF "SAME" for stride 2: pad 0 before, 1 after
        flip_sin_to_cos=False,
        freq_shift=1,  # sinusoid frequencies exp(-i·ln(10000) / (half - 1)), as DDPM
    )


class TorchTrainer:
    """The jaxdiff training step in PyTorch: flip, q_sample, ε-MSE, clip_grad_norm_, Adam, EMA."""

    def __init__(self, model: UNet2DModel, config, alphas_cumprod: np.ndarray):
        training = config.training
        self.model = model
        self.ema = [p.detach().clone() for p in model.parameters()]
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=training.learning_rate, betas=(training.adam_b1, training.adam_b2),
            eps=training.adam_eps, foreach=True,
        )  # fmt: skip
        self.clip, self.decay = training.grad_clip_norm, training.ema_decay
        self.random_flip = config.data.random_flip
        self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(0)

    def step(self, images: torch.Tensor) -> float:
        """One update on uint8 images NCHW; returns the loss."""
        self.model.train()
        x_start = images.float() / 127.5 - 1.0
        batch = x_start.shape[0]
        if self.random_flip:
            flip = torch.rand(batch, 1, 1, 1, generator=self.generator) < 0.5
            x_start = torch.where(flip, x_start.flip(3), x_start)
        t = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=self.generator)
        noise = torch.randn(x_start.shape, generator=self.generator)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x_start + (1.0 - a).sqrt() * noise
        loss = torch.mean((self.model(x_t, t).sample - noise) ** 2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1.0 - self.decay)
        return loss.item()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The eval-mode network output, no gradient."""
        self.model.eval()
        with torch.inference_mode():
            return self.model(x_t, t).sample


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
    schedule = schedule_from_config(config.diffusion)
    state = init_train_state(config, model, tx)
    batch = {"image": jnp.asarray(arrays["images"]), "label": jnp.zeros((len(arrays["images"]),), jnp.int32)}
    x_t, t = jnp.asarray(arrays["x_t"]), jnp.asarray(arrays["t"])
    train_step = jax.jit(make_train_step(config, model, schedule, tx), donate_argnums=0)
    forward = jax.jit(lambda params, x, t: model_denoiser(model, params)(x, t))
    holder = {"state": state}

    def train():
        holder["state"], metrics = train_step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    def sample():
        jax.block_until_ready(forward(holder["state"].params, x_t, t))

    facts = {"version": f"jax {jax.__version__} ({jax.devices()[0].platform})", "parameters": count_parameters(state.params)}
    return {"train": train, "sample": sample}, facts


def torch_side(config, arrays: dict) -> tuple[dict, dict]:
    """({"train": fn, "sample": fn}, facts) of the diffusers peer."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(config.seed)
    schedule = schedule_from_config(config.diffusion)
    peer = TorchTrainer(diffusers_unet(config.model), config, np.asarray(schedule.alphas_cumprod))
    images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2).contiguous()
    x_t = torch.from_numpy(arrays["x_t"]).permute(0, 3, 1, 2).contiguous()
    t = torch.from_numpy(arrays["t"]).long()
    facts = {
        "version": f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}",
        "parameters": sum(p.numel() for p in peer.model.parameters()),
    }
    return {"train": lambda: peer.step(images), "sample": lambda: peer.forward(x_t, t)}, facts


def serve(side: str, config_dict: dict, batch_size: int, connection) -> None:
    """Worker process: build one side, report its facts, then run the step named by each message
    ("train"/"sample") and answer with its wall seconds, until None."""
    import ml_collections

    config = ml_collections.ConfigDict(config_dict)
    steps, facts = (jax_side if side == "jax" else torch_side)(config, inputs(config, batch_size))
    connection.send(facts)
    while (name := connection.recv()) is not None:
        start = time.perf_counter()
        steps[name]()
        connection.send(time.perf_counter() - start)


def alternate(workers: dict, name: str, *, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds of step `name` on the (jax, torch) workers, asked alternately `steps` times after
    `warmup` untimed calls each (the first call compiles)."""
    times = {side: [] for side in workers}
    for index in range(warmup + steps):
        for side, connection in workers.items():
            connection.send(name)
            seconds = connection.recv()
            if index >= warmup:
                times[side].append(seconds)
    return statistics.median(times["jax"]), statistics.median(times["torch"])


def main(argv: list[str] | None = None) -> None:
    args, config = parse_step_args(sys.argv[1:] if argv is None else argv, description=__doc__.splitlines()[0],
                                   steps=10, steps_help="timed steps of each side (medians are reported)", warmup=2,
                                   warmup_help="untimed steps of each side after compilation")  # fmt: skip
    threads = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    context = multiprocessing.get_context("spawn")
    workers, processes, facts = {}, [], {}
    for side in ("jax", "torch"):  # built one after the other, so that neither compiles under the other
        parent_end, child_end = context.Pipe()
        process = context.Process(target=serve, args=(side, config.to_dict(), args.batch_size, child_end))
        process.start()
        workers[side], facts[side] = parent_end, parent_end.recv()
        processes.append(process)
    try:
        train = alternate(workers, "train", steps=args.steps, warmup=args.warmup + 1)
        sample = alternate(workers, "sample", steps=args.steps, warmup=args.warmup + 1)
    finally:
        for connection in workers.values():
            connection.send(None)
        for process in processes:
            process.join()
    load_after = os.getloadavg()

    print(f"{facts['jax']['version']}, {facts['torch']['version']}; {threads} threads each "
          f"(torch.set_num_threads, XLA default), one worker process each")  # fmt: skip
    print(f"config {args.config} {' '.join(args.overrides)}; dtype {config.model.dtype}; batch {args.batch_size}; "
          f"median of {args.steps} alternating steps after compilation and {args.warmup} warm-up")  # fmt: skip
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"parameters: jaxdiff {facts['jax']['parameters']:,}, diffusers {facts['torch']['parameters']:,}")
    print(f"{'':10}{'jaxdiff img/s':>15}{'diffusers img/s':>17}{'ratio':>8}")
    results = {}
    for name, (jax_s, torch_s) in (("train", train), ("sample", sample)):
        ratio = torch_s / jax_s
        results[name] = {
            "jaxdiff_images_per_s": args.batch_size / jax_s,
            "diffusers_images_per_s": args.batch_size / torch_s,
            "ratio": ratio,
        }
        print(f"{name:10}{args.batch_size / jax_s:>15.1f}{args.batch_size / torch_s:>17.1f}{ratio:>8.2f}")
    summary = {
        "versions": {side: facts[side]["version"] for side in facts},
        "threads": threads,
        "config": args.config,
        "overrides": args.overrides,
        "dtype": config.model.dtype,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "load": [load_before[0], load_after[0]],
        "parameters": {"jaxdiff": facts["jax"]["parameters"], "diffusers": facts["torch"]["parameters"]},
        **results,
    }
    print("JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
