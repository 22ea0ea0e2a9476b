"""The T5-XXL encoder and one Flux.1-sized double-stream plus one single-stream block on CPU, jaxdiff against
PyTorch (transformers' T5EncoderModel, diffusers' FluxTransformer2DModel), float32, batch 1, the same weights.

T5: google/t5-v1_1-xxl's encoder config (d_model 4096, 64 heads × 64, d_ff 10240, gated GELU) with --t5-layers of
its 24 blocks (default 4: the full encoder's 19 GB of float32 weights do not fit this benchmark's ~10 GiB; the
embedding, 0.53 GB, is whole), transformers' random initialisation, --t5-tokens random token ids (default 256).
Flux: diffusers' FluxTransformer2DModel with Flux.1-dev's sizes (D = 3072, 24 heads × 128, guidance embeds) and
num_layers = num_single_layers = 1: one FluxTransformerBlock and one FluxSingleTransformerBlock with the model's
embedders and output layer (about 10% of its weights, 1% of its FLOPs); --image-tokens packed latent tokens
(default 4096, a 1024² image) and 512 text tokens, inputs N(0, I), t = 0.5, guidance 3.5.

A `prepare` side builds both torch models, saves them with save_pretrained (float32 safetensors) and the inputs;
then each side runs in its own process, one at a time (`sequential_sides`): jaxdiff reads the folders with its own
readers (`read_t5_encoder`, `read_flux_transformer`) and reports the first call (compile + run) and the best of
--repeats jitted forwards; PyTorch loads with from_pretrained and reports its first call and the best of --repeats
(torch threads = the process's cores). Each side's peak RSS (ru_maxrss). The outputs are compared (max |jaxdiff −
torch| / max |torch|).

    python benchmarks/t5_flux_cpu.py [--t5-layers 4] [--t5-tokens 256] [--image-tokens 4096] [--repeats 3]
        [--only t5|flux]

Prints a markdown table, then one line `JSON {...}`.
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

from flow_memory import T5_XXL  # noqa: E402  (benchmarks/)
from sequential_sides import (  # noqa: E402  (benchmarks/)
    add_side_options,
    check_side_options,
    machine,
    print_result,
    run_side,
)

TEXT_TOKENS = 512
FLUX_BLOCKS = dict(num_layers=1, num_single_layers=1, guidance_embeds=True)  # Flux.1-dev's sizes otherwise
INPUTS, OUTPUT = "inputs_{part}.npz", "output_{part}_{side}.npy"
NEED_GIB = {"t5": 9.0, "flux": 11.0}  # available memory a side waits for
SIDES = ("prepare", "jax_t5", "torch_t5", "jax_flux", "torch_flux")


def prepare(folder: Path, args: argparse.Namespace) -> dict:
    """Both torch models with their random initialisation, saved as folder/t5 and folder/flux, and the inputs."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    counts = {}
    if "t5" in args.parts:
        t5 = T5EncoderModel(T5Config(**{**T5_XXL, "num_layers": args.t5_layers}))
        counts["t5_parameters"] = t5.num_parameters()
        t5.save_pretrained(folder / "t5")
        del t5
        ids = rng.integers(0, T5_XXL["vocab_size"], (1, args.t5_tokens)).astype(np.int32)
        np.savez(folder / INPUTS.format(part="t5"), input_ids=ids)
    if "flux" in args.parts:
        transformer = FluxTransformer2DModel(**FLUX_BLOCKS)
        counts["flux_parameters"] = sum(p.numel() for p in transformer.parameters())
        transformer.save_pretrained(folder / "flux")
        del transformer
        n = args.image_tokens
        side = int(round(n**0.5))
        rows, columns = np.meshgrid(np.arange(side), np.arange(n // side), indexing="ij")
        np.savez(folder / INPUTS.format(part="flux"),
                 hidden_states=rng.standard_normal((1, n, 64), np.float32),
                 encoder_hidden_states=rng.standard_normal((1, TEXT_TOKENS, 4096), np.float32),
                 pooled_projections=rng.standard_normal((1, 768), np.float32), timestep=np.full(1, 0.5, np.float32),
                 img_ids=np.stack([np.zeros_like(rows), rows, columns], -1).reshape(-1, 3).astype(np.float32),
                 txt_ids=np.zeros((TEXT_TOKENS, 3), np.float32), guidance=np.full(1, 3.5, np.float32))  # fmt: skip
    return counts


def best_of(run, repeats: int) -> tuple[float, list[float], object]:
    """(seconds of the first call, seconds of the next `repeats`, the first call's output)."""
    start = time.perf_counter()
    out = run()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return first, seconds, out


def jax_side(folder: Path, part: str, repeats: int) -> dict:
    import jax

    from jaxdiff.latent.flux_weights import read_flux_transformer
    from jaxdiff.latent.t5_weights import read_t5_encoder
    from jaxdiff.models.flux import create_flux
    from jaxdiff.models.t5_encoder import create_t5_encoder

    start = time.perf_counter()
    if part == "t5":
        config, params = read_t5_encoder(folder / "t5")
        model = create_t5_encoder(config)
    else:
        config, params = read_flux_transformer(folder / "flux")
        model = create_flux(config)
    params = jax.device_put(params)
    jax.block_until_ready(params)
    load_seconds = time.perf_counter() - start
    inputs = dict(np.load(folder / INPUTS.format(part=part)))
    forward = jax.jit(lambda p, kw: model.apply({"params": p}, **kw))
    first, seconds, out = best_of(lambda: jax.block_until_ready(forward(params, inputs)), repeats)
    np.save(folder / OUTPUT.format(part=part, side="jax"), np.asarray(out))
    return {"version": f"jax {jax.__version__}", "load_s": load_seconds, "first_s": first, "seconds": seconds}


def torch_side(folder: Path, part: str, repeats: int) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    model = (T5EncoderModel if part == "t5" else FluxTransformer2DModel).from_pretrained(folder / part)
    model = model.float().eval()
    load_seconds = time.perf_counter() - start
    inputs = {name: torch.from_numpy(value) for name, value in np.load(folder / INPUTS.format(part=part)).items()}
    if part == "t5":
        inputs["input_ids"] = inputs["input_ids"].long()

    def run():
        with torch.inference_mode():
            result = model(**inputs)
        return result.last_hidden_state if part == "t5" else result.sample

    first, seconds, out = best_of(run, repeats)
    np.save(folder / OUTPUT.format(part=part, side="torch"), out.numpy())
    return {"version": f"torch {torch.__version__}", "load_s": load_seconds, "first_s": first, "seconds": seconds}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t5-layers", type=int, default=4)
    parser.add_argument("--t5-tokens", type=int, default=256)
    parser.add_argument("--image-tokens", type=int, default=4096, help="a square number")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("t5", "flux"))
    add_side_options(parser, SIDES)
    args = parser.parse_args(argv)
    check_side_options(parser, args)
    for name in ("t5_layers", "t5_tokens", "image_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if int(round(args.image_tokens**0.5)) ** 2 != args.image_tokens:
        parser.error(f"--image-tokens={args.image_tokens} must be a square number")
    args.parts = (args.only,) if args.only else ("t5", "flux")
    return args


def serve_side(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    if args.side == "prepare":
        print_result(prepare(folder, args))
        return
    side, part = args.side.split("_")
    print_result((jax_side if side == "jax" else torch_side)(folder, part, args.repeats))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.side is not None:
        serve_side(args)
        return {}
    results = {"machine": machine(), "command": " ".join(["benchmarks/t5_flux_cpu.py", *argv]), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="t5_flux_") as tmp:
        common = [*argv, "--folder", tmp]
        results["prepare"] = run_side(__file__, "prepare", common, need_gib=max(NEED_GIB[p] for p in args.parts))
        for part in args.parts:
            sides = {side: run_side(__file__, f"{side}_{part}", common, need_gib=NEED_GIB[part])
                     for side in ("jax", "torch")}  # fmt: skip
            ours, theirs = (np.load(Path(tmp) / OUTPUT.format(part=part, side=s)) for s in ("jax", "torch"))
            sides["max_relative_difference"] = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
            results["parts"][part] = sides
    results["load_after"] = os.getloadavg()[0]
    print_table(results, args)
    print("JSON " + json.dumps(results), flush=True)
    return results


def print_table(results: dict, args: argparse.Namespace) -> None:
    m, counts = results["machine"], results["prepare"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['date']}; jax {m['jax']}, torch {m['torch']}, diffusers "
          f"{m['diffusers']}; load average {m['load']:.2f} before, {results['load_after']:.2f} after")  # fmt: skip
    labels = {"t5": f"T5-XXL encoder, {args.t5_layers} of 24 blocks ({counts.get('t5_parameters', 0):,} parameters), "
                    f"{args.t5_tokens} tokens",
              "flux": f"Flux double + single block ({counts.get('flux_parameters', 0):,} parameters with embedders), "
                      f"{args.image_tokens} + {TEXT_TOKENS} tokens"}  # fmt: skip
    print(f"| network | side | first call s | best of {args.repeats} s | peak RSS GiB | speed jaxdiff / torch "
          "| max rel. diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for part, sides in results["parts"].items():
        best = {side: min(sides[side]["seconds"]) for side in ("jax", "torch")}
        for side, label in (("jax", "jaxdiff"), ("torch", "PyTorch")):
            r = sides[side]
            extra = (f"{best['torch'] / best['jax']:.2f} | {sides['max_relative_difference']:.1e}" if side == "jax"
                     else " | ")  # fmt: skip
            print(f"| {labels[part]} | {label} | {r['first_s']:.1f} | {best[side]:.2f} | {r['peak_rss_gib']:.2f} "
                  f"| {extra} |")  # fmt: skip


if __name__ == "__main__":
    main()
