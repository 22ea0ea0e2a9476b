"""Stable Diffusion 1.5 on CPU, jaxdiff beside diffusers, one process per side: the U-Net's guided step and 512²
text-to-image, the same folder, the same inputs.

`--side prepare` saves a random-weight StableDiffusionPipeline folder at SD 1.5's sizes (`load_cpu.prepare`: U-Net
859.5M parameters, VAE 83.7M, CLIP ViT-L text encoder 123.1M, torch.manual_seed(0), a byte-level CLIP tokenizer,
PNDM with skip_prk_steps; float32 safetensors, about 4.3 GB). Then each side runs in its own process, in turn,
diffusers first (`sequential_sides`), and reports its peak resident memory (`ru_maxrss`, which counts the pages of
memory-mapped files).

  unet      only the U-Net is loaded (jaxdiff: `read_unet_condition`, `create_unet_condition`, the apply compiled by
            `inference_jit`, as the pipelines compile it; diffusers: `UNet2DConditionModel.from_pretrained`, eval,
            `torch.inference_mode`, one torch thread per core) and run on the inputs of one guided step: latents
            N(0, I) [2, 64, 64, 4] (NHWC; NCHW for diffusers), t = 500 for both rows, text context N(0, I) [2, 77,
            768], from NumPy seed 0. Reported: the load seconds (until the parameters are in device memory), the first
            call's seconds (jaxdiff: compile + run), the best of --repeats forwards after it, and
            max |jaxdiff − diffusers| / max |diffusers| of the outputs (ε, [2, 64, 64, 4]). diffusers' load maps the
            safetensors file (its parameters are the file's pages, already in the page cache after prepare): its
            reading is paid by the first forward's page faults, while jaxdiff's load reads and lays out every tensor.
  pipeline  the whole folder (jaxdiff: `LatentPipeline.from_pretrained`; diffusers: `StableDiffusionPipeline.
            from_pretrained`, no safety checker): one prompt, guidance 7.5 (2 U-Net rows per step), the folder's
            PNDM, 512², --steps steps, the same initial latents N(0, I) [1, 64, 64, 4] from NumPy seed 1, images as
            floats in [0, 1]. Each side calls twice; the second call's seconds are reported (jaxdiff: compile =
            first − second), and the largest difference of the two sides' images.

`--dtype bfloat16`: each side holds the weights and computes in bfloat16 (diffusers' `from_pretrained(dtype=...)`;
jaxdiff's readers round each weight to bfloat16 as they read it, keeping the SD 1.5 VAE in bfloat16 too, as
diffusers' StableDiffusionPipeline does). `--size tiny` runs the same on narrow networks at 8²
latents (64² images), the smoke test.

    python benchmarks/vs_diffusers_sd.py [--size full|tiny] [--repeats 3] [--steps 20]
        [--dtype float32|bfloat16] [--what unet|pipeline|both]

Prints a table, then one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_cpu import SIZES, prepare  # noqa: E402  (benchmarks/)
from sequential_sides import (  # noqa: E402
    add_side_options,
    check_side_options,
    machine,
    print_result,
    run_side,
)

WHAT = {"unet": ("unet",), "pipeline": ("pipeline",), "both": ("unet", "pipeline")}
NEED_GIB = {"full": {"prepare": 9.0, "unet": 10.0, "pipeline": 12.0}, "tiny": {"prepare": 1.0, "unet": 1.0,
                                                                          "pipeline": 1.0}}  # fmt: skip
TIMESTEP, TEXT_LENGTH, BATCH = 500, 77, 2  # one guided step: the unconditional and the conditional row
PROMPT, GUIDANCE = "a photograph of an astronaut riding a horse", 7.5
OUTPUT_FILE = "{part}_{side}.npy"


def unet_settings(folder: Path) -> dict:
    return json.loads((folder / "pipe" / "unet" / "config.json").read_text())


def unet_inputs(folder: Path) -> dict[str, np.ndarray]:
    """One guided step's U-Net inputs, NHWC: sample [2, s, s, 4], timesteps [2], context [2, 77, D]."""
    settings = unet_settings(folder)
    size, rng = settings["sample_size"], np.random.default_rng(0)
    return {"sample": rng.standard_normal((BATCH, size, size, settings["in_channels"]), dtype=np.float32),
            "timesteps": np.full((BATCH,), TIMESTEP, np.float32),
            "context": rng.standard_normal((BATCH, TEXT_LENGTH, settings["cross_attention_dim"]), dtype=np.float32)}


def pipeline_inputs(folder: Path) -> tuple[np.ndarray, int]:
    """(initial latents [1, s, s, 4] N(0, I), NHWC; the image side s·f, f the VAE's downsampling factor)."""
    settings = unet_settings(folder)
    vae = json.loads((folder / "pipe" / "vae" / "config.json").read_text())
    size = settings["sample_size"]
    latents = np.random.default_rng(1).standard_normal((1, size, size, settings["in_channels"]), dtype=np.float32)
    return latents, size * 2 ** (len(vae["block_out_channels"]) - 1)


def seconds_of(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def jax_unet(folder: Path, dtype: str, repeats: int) -> dict:
    """Load, compile and time jaxdiff's U-Net; its output is saved in `folder`."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.latent.unet_weights import read_unet_condition
    from jaxdiff.models.unet_condition import create_unet_condition
    from jaxdiff.xla_options import inference_jit

    def load():
        config, params = read_unet_condition(folder / "pipe", dtype=dtype)
        return config, jax.block_until_ready(jax.device_put(params))  # read in `dtype`

    load_seconds, (config, params) = seconds_of(load)
    unet = create_unet_condition(config)
    forward = inference_jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))  # as the pipelines compile it
    inputs = [jnp.asarray(a) for a in unet_inputs(folder).values()]
    run = lambda: jax.block_until_ready(forward(params, *inputs))  # noqa: E731
    first_seconds, out = seconds_of(run)
    best = min(seconds_of(run)[0] for _ in range(repeats))
    np.save(folder / OUTPUT_FILE.format(part="unet", side="jax"), np.asarray(out, np.float32))
    return {"version": f"jax {jax.__version__}", "load_s": load_seconds, "first_s": first_seconds, "forward_s": best}


def torch_unet(folder: Path, dtype: str, repeats: int) -> dict:
    """Load and time diffusers' U-Net; its output is saved in `folder` (NHWC)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch_dtype = getattr(torch, dtype)
    load_seconds, unet = seconds_of(
        lambda: UNet2DConditionModel.from_pretrained(folder / "pipe", subfolder="unet", dtype=torch_dtype).eval())
    arrays = unet_inputs(folder)
    sample = torch.from_numpy(arrays["sample"].transpose(0, 3, 1, 2).copy()).to(torch_dtype)
    timesteps, context = torch.from_numpy(arrays["timesteps"]), torch.from_numpy(arrays["context"]).to(torch_dtype)

    def run():
        with torch.inference_mode():
            return unet(sample, timesteps, context).sample

    first_seconds, out = seconds_of(run)
    best = min(seconds_of(run)[0] for _ in range(repeats))
    np.save(folder / OUTPUT_FILE.format(part="unet", side="torch"), out.float().numpy().transpose(0, 2, 3, 1))
    return {"version": f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}",
            "load_s": load_seconds, "first_s": first_seconds, "forward_s": best}  # fmt: skip


def jax_pipeline(folder: Path, dtype: str, steps: int) -> dict:
    """Load jaxdiff's pipeline and call it twice (the first compiles); the second call's images are saved."""
    import jax

    from jaxdiff.latent.pipeline import LatentPipeline

    def load():
        pipe = LatentPipeline.from_pretrained(folder / "pipe", dtype=dtype)
        jax.block_until_ready(pipe.params)
        return pipe

    load_seconds, pipe = seconds_of(load)
    latents, side = pipeline_inputs(folder)
    call = lambda: pipe.text_to_image([PROMPT], steps=steps, guidance=GUIDANCE, height=side, width=side,  # noqa: E731
                                      latents=latents, output_type="float")  # fmt: skip
    first_seconds, _ = seconds_of(call)
    second_seconds, out = seconds_of(call)
    np.save(folder / OUTPUT_FILE.format(part="pipeline", side="jax"), out)
    return {"version": f"jax {jax.__version__}", "load_s": load_seconds, "first_s": first_seconds,
            "seconds": second_seconds, "sampler": pipe.default_sampler, "shape": list(out.shape)}  # fmt: skip


def torch_pipeline(folder: Path, dtype: str, steps: int) -> dict:
    """Load diffusers' pipeline and call it twice; the second call's images are saved."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch_dtype = getattr(torch, dtype)
    load_seconds, pipe = seconds_of(lambda: StableDiffusionPipeline.from_pretrained(
        folder / "pipe", dtype=torch_dtype, safety_checker=None, requires_safety_checker=False))
    pipe.set_progress_bar_config(disable=True)
    latents, side = pipeline_inputs(folder)

    def call():
        with torch.inference_mode():
            return pipe([PROMPT], num_inference_steps=steps, guidance_scale=GUIDANCE, height=side, width=side,
                        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(torch_dtype),
                        output_type="np").images  # fmt: skip

    first_seconds, _ = seconds_of(call)
    second_seconds, out = seconds_of(call)
    np.save(folder / OUTPUT_FILE.format(part="pipeline", side="torch"), out.astype(np.float32))
    return {"version": f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}",
            "load_s": load_seconds, "first_s": first_seconds, "seconds": second_seconds,
            "sampler": type(pipe.scheduler).__name__, "shape": list(out.shape)}  # fmt: skip


SIDES = {"jax-unet": jax_unet, "torch-unet": torch_unet, "jax-pipeline": jax_pipeline,
         "torch-pipeline": torch_pipeline}  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=3, help="U-Net forwards after the first (best reported)")
    parser.add_argument("--steps", type=int, default=20, help="PNDM steps of the text-to-image call")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--what", choices=tuple(WHAT), default="both")
    add_side_options(parser, ("prepare", *SIDES))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")
    check_side_options(parser, args)
    return args


def compare(folder: Path, part: str) -> dict:
    """The largest difference of the two sides' outputs, absolute and relative to diffusers' largest value."""
    ours, theirs = (np.load(folder / OUTPUT_FILE.format(part=part, side=side)) for side in ("jax", "torch"))
    difference = float(np.max(np.abs(ours - theirs)))
    return {"max_abs_difference": difference, "max_relative_difference": difference / float(np.max(np.abs(theirs)))}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.side is not None:
        folder = Path(args.folder)
        if args.side == "prepare":
            print_result(prepare(args.size, folder))
        else:
            part = args.side.split("-")[1]
            print_result(SIDES[args.side](folder, args.dtype, args.repeats if part == "unet" else args.steps))
        return {}
    results = {"machine": machine(), "command": " ".join(["benchmarks/vs_diffusers_sd.py", *argv]), "size": args.size,
               "dtype": args.dtype, "repeats": args.repeats, "steps": args.steps}  # fmt: skip
    need = NEED_GIB[args.size]
    with tempfile.TemporaryDirectory(prefix="vs_sd_") as tmp:
        common = ["--size", args.size, "--folder", tmp, "--dtype", args.dtype, "--repeats", str(args.repeats),
                  "--steps", str(args.steps)]  # fmt: skip
        results["prepare"] = run_side(__file__, "prepare", common, need_gib=need["prepare"])
        for part in WHAT[args.what]:
            results[part] = {side: run_side(__file__, f"{side}-{part}", common, need_gib=need[part])
                             for side in ("torch", "jax")}  # fmt: skip
            results[part].update(compare(Path(tmp), part))
    results["load_after"] = os.getloadavg()[0]
    print_table(results)
    print("JSON " + json.dumps(results), flush=True)
    return results


def print_table(results: dict) -> None:
    m = results["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['date']}; jax {m['jax']}, torch {m['torch']}, diffusers "
          f"{m['diffusers']}; load average {m['load']:.2f} before, {results['load_after']:.2f} after")  # fmt: skip
    print(f"SD 1.5-sized folder ({results['size']}) {results['prepare']['parameters']}, {results['dtype']}")
    print(f"{'':22}{'load s':>8}{'1st call s':>12}{'timed s':>9}{'peak RSS':>10}")
    for part, timed, what in (("unet", "forward_s", f"U-Net guided step (batch {BATCH}), best of "
                                                   f"{results['repeats']}"),
                              ("pipeline", "seconds", f"text-to-image, {results['steps']} steps, second call")):
        if part not in results:
            continue
        sides = results[part]
        print(what)
        for side, label in (("jax", "jaxdiff"), ("torch", "diffusers")):
            r = sides[side]
            print(f"  {label:20}{r['load_s']:8.1f}{r['first_s']:12.1f}{r[timed]:9.2f}{r['peak_rss_gib']:9.2f}G")
        ours, theirs = sides["jax"], sides["torch"]
        if part == "pipeline":
            print(f"  jaxdiff compile (first call − second) {ours['first_s'] - ours['seconds']:.1f} s")
        print(f"  speed jaxdiff / diffusers {theirs[timed] / ours[timed]:.2f}; peak RSS jaxdiff / diffusers "
              f"{ours['peak_rss_gib'] / theirs['peak_rss_gib']:.2f}; load time jaxdiff / diffusers "
              f"{ours['load_s'] / theirs['load_s']:.2f}; outputs differ by {sides['max_abs_difference']:.2e} "
              f"(max abs), {sides['max_relative_difference']:.2e} (relative)")  # fmt: skip


if __name__ == "__main__":
    main()
