"""One command that measures an accelerator: training, sampling, text-to-image and DiT figures with peak memory.

    python benchmarks/device_check.py [--out device_check.json] [--budget 480]
    python benchmarks/device_check.py --small [--out ...]     # the same code on tiny models (CPU, CI)

Each part runs in its own process, one after the other, so that each peak memory is that part's alone
(`memory_stats()["peak_bytes_in_use"]` of the first device where the backend reports it, else the process's
peak RSS), and no part starts when less than its minimum time is left of `--budget` seconds (default 480: the
whole check fits 8 minutes on one GPU or TPU host; a part cut short is reported as such, never silently dropped):

  matmul      achieved TFLOP/s of an 8192³ bfloat16 matmul (float32 accumulation): the peak that MFU divides by
              (accelerators only; MFU is not reported on a CPU)
  ddpm        the DDPM CIFAR-10 U-Net (configs/cifar10.py, 35.7 M parameters) in float32 and bfloat16, batch 128:
              training images/s, TFLOP/s and MFU of the jitted train step (XLA's FLOP count), sampling images/s per
              network evaluation, and the implied minutes for 50,000 images of 1000 DDPM steps
  sd15        Stable Diffusion 1.5-sized random weights (benchmarks/text_to_image.py's networks), 512², one prompt
              with guidance 7.5, DPM-Solver++ for 20 steps: seconds per image (compile excluded), in bfloat16
  dit         DiT-XL/2 as SiT-XL/2 trains it (velocity output, no learned σ) on 32×32×4 latents, batch 32, bfloat16,
              the flow-matching train step:
              seconds, TFLOP/s and MFU

`--small` runs every part on tiny models (configs/tiny.py, a two-level SD-shaped pipeline at 16², DiT-S/8 on
8×8 latents) with 2 timed steps: it checks that the command works, not the device. Prints a table, then one line
`JSON {...}`; `--out` writes that JSON to a file as well.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

PARTS = ("matmul", "ddpm", "sd15", "dit")
MIN_SECONDS = {"matmul": 20, "ddpm": 90, "sd15": 120, "dit": 90}  # a part does not start with less left
DDPM_IMAGES, DDPM_STEPS = 50_000, 1000
SMALL_SD_UNET = dict(sample_size=8, block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1,
                     cross_attention_dim=32, attention_head_dim=2,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])  # fmt: skip
SMALL_SD_VAE = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, sample_size=16,
                    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)  # fmt: skip
SMALL_SD_TEXT = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                     pad_token_id=513)  # fmt: skip  # the ids of text_to_image.byte_level_tokenizer


def peak_memory(device) -> dict:
    from throughput import peak_memory_bytes

    peak, source = peak_memory_bytes(device)
    return {"peak_memory_mib": peak / 2**20, "peak_memory_source": source}


def part_matmul(small: bool) -> dict:
    import jax

    from throughput import matmul_peak_tflops

    device = jax.devices()[0]
    if device.platform not in ("gpu", "tpu"):
        return {"matmul_peak_tflops": None, "note": f"not measured on {device.platform}: MFU needs an accelerator"}
    return {"matmul_peak_tflops": matmul_peak_tflops(), **peak_memory(device)}


def part_ddpm(small: bool) -> dict:
    import jax

    from jaxdiff.cli import load_config
    from jaxdiff.config import validate
    from throughput import benchmark

    config = validate(load_config(str(ROOT / "configs" / ("tiny.py" if small else "cifar10.py")), []))
    batch, steps = (4, 2) if small else (128, 10)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        row = benchmark(config, batch_size=batch, dtype=dtype, steps=steps, warmup=1)
        row["ddpm_50k_minutes"] = DDPM_IMAGES * DDPM_STEPS / row["sample_images_per_s_per_eval"] / 60
        rows[dtype] = row
    return {"rows": rows, **peak_memory(jax.devices()[0])}


def part_sd15(small: bool) -> dict:
    import jax

    import text_to_image as t2i
    from jaxdiff.latent.pipeline import LatentPipeline

    dtype = "float32" if small else "bfloat16"
    networks = (SMALL_SD_UNET, SMALL_SD_VAE, SMALL_SD_TEXT) if small else ()
    size, steps = (16, 2) if small else (t2i.SIZE, t2i.TARGET_STEPS)
    start = time.perf_counter()
    pipe = LatentPipeline(t2i.random_sd15(dtype, *networks))
    init_seconds = time.perf_counter() - start
    run = dict(steps=steps, guidance=t2i.GUIDANCE, sampler="dpm_solver++", height=size, width=size, seed=0)
    first = t2i.timed(pipe.text_to_image, [t2i.PROMPT], **run)
    second = t2i.timed(pipe.text_to_image, [t2i.PROMPT], **run)
    return {"dtype": dtype, "size": size, "steps": steps, "parameter_init_s": init_seconds,
            "compile_s": first - second, "seconds_per_image": second, **peak_memory(jax.devices()[0])}  # fmt: skip


def part_dit(small: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dit_speed
    from jaxdiff.models import count_parameters, create_model, dit
    from jaxdiff.training.diffusion_step import make_train_step
    from jaxdiff.training.step import init_train_state, make_optimizer
    from throughput import median_seconds, xla_flops

    preset, size, batch, steps = ("S/8", 8, 2, 2) if small else ("XL/2", 32, 32, 10)
    config = dit_speed.jax_config(size, batch, 1)
    config.model.dit = dit.preset_config(preset, input_size=size, in_channels=dit_speed.LATENT_CHANNELS,
                                         num_classes=dit_speed.NUM_CLASSES, output_sigma=False,
                                         class_dropout_prob=dit_speed.LABEL_DROPOUT)  # fmt: skip
    config.model.dtype = "bfloat16"
    model, tx = create_model(config.model), make_optimizer(config.training)
    state = init_train_state(config, model, tx)
    rng = np.random.default_rng(0)
    shape = (batch, size, size, dit_speed.LATENT_CHANNELS)
    data = {"image": jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8)),
            "label": jnp.asarray(rng.integers(0, dit_speed.NUM_CLASSES, (batch,)), jnp.int32)}  # fmt: skip
    start = time.perf_counter()
    compiled = jax.jit(make_train_step(config, model, tx), donate_argnums=0).lower(state, data).compile()
    compile_seconds = time.perf_counter() - start
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], data)
        return metrics["loss"]

    jax.block_until_ready(step())
    seconds = median_seconds(step, steps)
    flops = xla_flops(compiled)
    return {"preset": preset, "batch_size": batch, "parameters": count_parameters(holder["state"].params),
            "compile_s": compile_seconds, "train_step_s": seconds, "train_images_per_s": batch / seconds,
            "tflops_per_s": None if flops is None else flops / seconds / 1e12, **peak_memory(jax.devices()[0])}  # fmt: skip


RUN = {"matmul": part_matmul, "ddpm": part_ddpm, "sd15": part_sd15, "dit": part_dit}


def run_part(name: str, small: bool, timeout: float) -> dict:
    """One part in its own process: its JSON, or {"error": ...} naming why there is none."""
    command = [sys.executable, __file__, "--part", name] + (["--small"] if small else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s (the budget)"}
    seconds = time.perf_counter() - start
    lines = [line[5:] for line in done.stdout.splitlines() if line.startswith("JSON ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}", "seconds": seconds}
    return dict(json.loads(lines[-1]), seconds=seconds)


def with_mfu(results: dict) -> dict:
    """MFU of each training figure: its TFLOP/s over the matmul peak measured in the same run (accelerators)."""
    peak = results.get("matmul", {}).get("matmul_peak_tflops")
    rows = list(results.get("ddpm", {}).get("rows", {}).values()) + [results.get("dit", {})]
    for row in rows:
        if row.get("tflops_per_s") is not None:
            row["mfu"] = None if peak is None else row["tflops_per_s"] / peak
    return results


def table(results: dict) -> list[str]:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    lines = []
    for name in PARTS:
        row = results.get(name, {})
        if "error" in row or "skipped" in row:
            lines.append(f"{name:8} {row.get('error') or row.get('skipped')}")
            continue
        if name == "matmul":
            lines.append(f"{name:8} bf16 peak {number(row.get('matmul_peak_tflops'), '.1f')} TFLOP/s"
                         + (f"  ({row['note']})" if "note" in row else ""))  # fmt: skip
        elif name == "ddpm":
            for dtype, r in row["rows"].items():
                lines.append(f"{name:8} {dtype:9} batch {r['batch_size']}: train {r['train_images_per_s']:.1f} img/s "
                             f"(MFU {number(r.get('mfu'), '.3f')}), sampling {r['sample_images_per_s_per_eval']:.1f} "
                             f"img/s per evaluation = {r['ddpm_50k_minutes']:.1f} min for 50k × 1000 steps")  # fmt: skip
            lines.append(f"{'':8} peak {row['peak_memory_mib']:.0f} MiB ({row['peak_memory_source']})")
        elif name == "sd15":
            lines.append(f"{name:8} {row['dtype']} {row['size']}², {row['steps']} steps: {row['seconds_per_image']:.2f} "
                         f"s/image (compile {row['compile_s']:.1f} s), peak {row['peak_memory_mib']:.0f} MiB "
                         f"({row['peak_memory_source']})")  # fmt: skip
        else:
            lines.append(f"{name:8} DiT-{row['preset']} bf16 batch {row['batch_size']}: {row['train_step_s']:.3f} s/step, "
                         f"{row['train_images_per_s']:.1f} img/s, MFU {number(row.get('mfu'), '.3f')}, peak "
                         f"{row['peak_memory_mib']:.0f} MiB ({row['peak_memory_source']})")  # fmt: skip
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny models: checks the command, not the device")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all parts together")
    parser.add_argument("--out", type=Path, help="also write the JSON summary to this file")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget={args.budget} must be > 0 seconds")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part:
        print("JSON " + json.dumps(RUN[args.part](args.small)))
        return 0
    import jax

    device = jax.devices()[0]
    start, results = time.perf_counter(), {}
    for name in PARTS:
        left = args.budget - (time.perf_counter() - start)
        if not args.small and left < MIN_SECONDS[name]:
            results[name] = {"skipped": f"not started: {left:.0f} s of the budget left, needs {MIN_SECONDS[name]} s"}
        else:
            results[name] = run_part(name, args.small, max(left, 1.0))
        print(f"{name}: {'done' if 'error' not in results[name] else results[name]['error']}", flush=True)
    results = with_mfu(results)
    summary = {"jax": jax.__version__, "device": device.device_kind, "platform": device.platform,
               "devices": jax.device_count(), "small": args.small, "date": time.strftime("%Y-%m-%d"),
               "seconds": time.perf_counter() - start, "results": results}  # fmt: skip
    print(f"jax {jax.__version__}, {jax.device_count()} × {device.device_kind} ({device.platform})"
          + (", --small: tiny models" if args.small else ""))  # fmt: skip
    for line in table(results):
        print(line)
    text = json.dumps(summary)
    print("JSON " + text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if all("error" not in row for row in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
