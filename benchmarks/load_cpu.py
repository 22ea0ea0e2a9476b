"""Loading a Stable Diffusion 1.5-sized pipeline folder on CPU: jaxdiff's `Pipeline.from_pretrained` against
diffusers' `StableDiffusionPipeline.from_pretrained`, the same folder, float32 safetensors.

`--side prepare` builds diffusers' pipeline at SD 1.5's sizes (U-Net 859.5M parameters, VAE 83.7M, CLIP ViT-L
text encoder 123.1M; random weights, torch.manual_seed(0)) with a byte-level CLIP tokenizer and the PNDM
scheduler, and saves it with `save_pretrained` (about 4.3 GB). Then each loader runs in its own process, in turn
(`sequential_sides`), twice — the first read fills the page cache, so the second is the warm figure reported — and
reports the seconds of the load (until the parameters are in device memory: jaxdiff's arrays are blocked on;
diffusers' modules are on the CPU device when `from_pretrained` returns) and its peak resident memory
(`ru_maxrss`, which counts the pages of memory-mapped files; `final_rss_anon_gib` is the process's own memory
once loaded). No network is run: this measures reading, converting and placing the weights only. `--dtype
bfloat16` loads each side in bfloat16 (diffusers' `from_pretrained(dtype=torch.bfloat16)`, jaxdiff's
`from_pretrained(dtype="bfloat16")`: each weight rounded as it is read), from the same float32 files.

    python benchmarks/load_cpu.py [--size full|tiny] [--dtype float32|bfloat16]

Prints a table, then one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sequential_sides import (  # noqa: E402  (benchmarks/)
    add_side_options,
    check_side_options,
    machine,
    print_result,
    run_side,
)
from upscaler_cpu import write_byte_level_tokenizer  # noqa: E402

SIZES = ("full", "tiny")
NEED_GIB = {"full": 9.0, "tiny": 1.0}
REPEATS = 2  # loads per side; the last is reported (page cache warm)


def prepare(size: str, folder: Path) -> dict:
    import torch
    import transformers
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from text_to_image import CLIP_VIT_L, UNET_SD15, VAE_SD15  # imports JAX: the prepare side only

    unet, vae, text = UNET_SD15, VAE_SD15, CLIP_VIT_L
    if size == "tiny":
        unet = dict(block_out_channels=[32, 64, 64, 64], norm_num_groups=8, cross_attention_dim=32, sample_size=8)
        vae = dict(VAE_SD15, block_out_channels=[8, 8, 16, 16], norm_num_groups=4, layers_per_block=1)
        text = dict(CLIP_VIT_L, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                    projection_dim=32)  # fmt: skip
    torch.manual_seed(0)
    write_byte_level_tokenizer(folder / "tokenizer_source")
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet), vae=AutoencoderKL(**vae),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_source"),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder / "pipe")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"parameters": {"unet": count(pipe.unet), "vae": count(pipe.vae), "text_encoder": count(pipe.text_encoder)}}


def torch_side(folder: Path, dtype: str) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    seconds, pipe = [], None
    for _ in range(REPEATS):
        pipe = None  # the previous load freed; the last one kept for the final resident memory
        start = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(folder / "pipe", dtype=getattr(torch, dtype))
        seconds.append(time.perf_counter() - start)
    return {"version": f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}",
            "seconds": seconds[-1], "all_s": seconds, "loaded": type(pipe).__name__}  # fmt: skip


def jax_side(folder: Path, dtype: str) -> dict:
    import jax

    from jaxdiff import Pipeline

    seconds, pipe = [], None
    for _ in range(REPEATS):
        pipe = None  # as torch_side
        start = time.perf_counter()
        pipe = Pipeline.from_pretrained(folder / "pipe", dtype=dtype)
        jax.block_until_ready(pipe.params)
        seconds.append(time.perf_counter() - start)
    return {"version": f"jax {jax.__version__}", "seconds": seconds[-1], "all_s": seconds, "loaded": type(pipe).__name__}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    add_side_options(parser, ("prepare", "jax", "torch"))
    args = parser.parse_args(argv)
    check_side_options(parser, args)
    if args.side is not None:
        folder = Path(args.folder)
        print_result(prepare(args.size, folder) if args.side == "prepare" else
                     (jax_side if args.side == "jax" else torch_side)(folder, args.dtype))  # fmt: skip
        return {}
    results = {"machine": machine(), "command": " ".join(["benchmarks/load_cpu.py", *argv]), "size": args.size,
               "dtype": args.dtype}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="load_") as tmp:
        common = ["--size", args.size, "--dtype", args.dtype, "--folder", tmp]
        for side in ("prepare", "torch", "jax"):
            results[side] = run_side(__file__, side, common, need_gib=NEED_GIB[args.size])
    print_table(results)
    print("JSON " + json.dumps(results), flush=True)
    return results


def print_table(results: dict) -> None:
    m, ours, theirs = results["machine"], results["jax"], results["torch"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['date']}; jax {m['jax']}, torch {m['torch']}, diffusers "
          f"{m['diffusers']}; load average {m['load']:.2f}")  # fmt: skip
    print(f"SD 1.5-sized folder ({results['size']}) {results['prepare']['parameters']}, float32 safetensors")
    print(f"{'':12}{'load s':>9}{'peak RSS':>10}{'own RSS':>9}")
    for name, side in (("jaxdiff", ours), ("diffusers", theirs)):
        print(f"{name:12}{side['seconds']:9.2f}{side['peak_rss_gib']:9.2f}G{side.get('final_rss_anon_gib', 0):8.2f}G")
    print(f"load time jaxdiff / diffusers {ours['seconds'] / theirs['seconds']:.2f}; peak RSS jaxdiff / diffusers "
          f"{ours['peak_rss_gib'] / theirs['peak_rss_gib']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
