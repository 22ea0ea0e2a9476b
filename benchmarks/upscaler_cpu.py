"""The x4 upscaler (stabilityai/stable-diffusion-x4-upscaler's configs, random weights) on CPU, 128² → 512²,
jaxdiff's `UpscalePipeline` against diffusers' `StableDiffusionUpscalePipeline`, the same folder.

`--side prepare` builds diffusers' pipeline from the released configs (U-Net 473M parameters, the OpenCLIP ViT-H
text encoder 354M, the 3-level VAE 55M; DDIM, v-prediction; the DDPM low-resolution scheduler, max noise level 350)
with torch.manual_seed(0)'s default initialisation, a CLIP tokenizer whose vocabulary is the 256 byte-level symbols
(no merges: a prompt costs the same downstream), and saves it in a temporary folder with `save_pretrained`; both
sides load that folder. One uint8 image [1, 128, 128, 3] (random), one prompt, guidance 9 (2 U-Net rows per step),
noise level 20, --steps DDIM steps, float32 (the upscaler's VAE decodes in float32 only), the same initial latents;
diffusers draws the augmentation noise and jaxdiff is given the noise diffusers drew, so that the outputs compare.

Decoding: the 128² latents are decoded tile by tile on both sides, the VAE config's tiles (64² latents, 256²
pixels, overlap 0.25: 3 × 3 tiles): jaxdiff `upscale(..., tiled=True)`, diffusers `pipe.vae.enable_tiling()`;
without `--tiled` (`--whole`) both decode the latents whole, as each does by default at this size.

Each side is its own process (`sequential_sides`), diffusers first: diffusers' seconds of one call; jaxdiff's first
call (compile + run) and a second call (run), compile = first − second. Peak RSS of each side.

    python benchmarks/upscaler_cpu.py [--size full|tiny] [--steps 2] [--whole]

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

from sequential_sides import (  # noqa: E402  (benchmarks/)
    add_side_options,
    check_side_options,
    machine,
    print_result,
    run_side,
)

# stabilityai/stable-diffusion-x4-upscaler's component configs where they differ from diffusers' defaults.
UNET = dict(
    sample_size=128, in_channels=7, out_channels=4, attention_head_dim=8, block_out_channels=[256, 512, 512, 1024],
    layers_per_block=2, cross_attention_dim=1024, num_class_embeds=1000, only_cross_attention=[True, True, True, False],
    use_linear_projection=True,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)  # fmt: skip
VAE = dict(
    block_out_channels=[128, 256, 512], down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, latent_channels=4, sample_size=256,
    scaling_factor=0.08333,
)  # fmt: skip
TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
            projection_dim=512, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)  # fmt: skip
SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)  # fmt: skip
LOW_RES_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)
MAX_NOISE_LEVEL = 350
# The same layout, narrow, for the smoke test (32² → 128², tiles of 16² latents).
TINY = (
    dict(UNET, block_out_channels=[8, 8, 16, 16], norm_num_groups=4, attention_head_dim=2, cross_attention_dim=32,
         sample_size=32),
    dict(VAE, block_out_channels=[8, 8, 16], norm_num_groups=4, layers_per_block=1, sample_size=64),
    dict(TEXT, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=16),
    32,
)  # fmt: skip
SIZES = {"full": (UNET, VAE, TEXT, 128), "tiny": TINY}  # (U-Net, VAE, text encoder, low-resolution side)
NEED_GIB = {"full": 10.0, "tiny": 1.0}
PROMPT, GUIDANCE, NOISE_LEVEL = "a white cat", 9.0, 20
FILES = {"latents": "latents.npy", "noise": "noise.npy", "jax": "jax.npy", "torch": "torch.npy"}


def write_byte_level_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer folder (vocab.json, merges.txt) whose vocabulary is the byte-level symbols, alone and with
    "</w>", and the start/end tokens; no merges. "!" pads, as in Stable Diffusion 2's tokenizer."""
    from tokenizers import pre_tokenizers

    folder.mkdir()
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **special}))


def shared_inputs(size: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [1, s, s, 3], initial latents float32 [1, s, s, 4]), s the low-resolution side."""
    side = SIZES[size][3]
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8),
            rng.standard_normal((1, side, side, 4), dtype=np.float32))  # fmt: skip


def prepare(size: str, folder: Path) -> dict:
    import torch
    import transformers
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    unet, vae, text, _ = SIZES[size]
    torch.manual_seed(0)
    write_byte_level_tokenizer(folder / "tokenizer_source")
    pipe = StableDiffusionUpscalePipeline(
        unet=UNet2DConditionModel(**unet), vae=AutoencoderKL(**vae),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_source"),
        low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULER), scheduler=DDIMScheduler(**SCHEDULER),
        max_noise_level=MAX_NOISE_LEVEL,
    )  # fmt: skip
    pipe.save_pretrained(folder / "pipe")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"parameters": {"unet": count(pipe.unet), "vae": count(pipe.vae), "text_encoder": count(pipe.text_encoder)}}


def torch_side(size: str, folder: Path, steps: int, tiled: bool) -> dict:
    """One diffusers call; its output, the initial latents and the augmentation noise it drew are saved."""
    import torch
    from diffusers import StableDiffusionUpscalePipeline
    from PIL import Image

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder / "pipe")
    pipe.set_progress_bar_config(disable=True)
    if tiled:
        pipe.vae.enable_tiling()
    image, latents = shared_inputs(size)
    drawn = []
    add_noise = pipe.low_res_scheduler.add_noise

    def capture(original, noise, timesteps):
        drawn.append(noise.numpy().transpose(0, 2, 3, 1))
        return add_noise(original, noise, timesteps)

    pipe.low_res_scheduler.add_noise = capture
    start = time.perf_counter()
    with torch.inference_mode():
        out = pipe(image=[Image.fromarray(image[0])], prompt=[PROMPT], num_inference_steps=steps,
                   guidance_scale=GUIDANCE, noise_level=NOISE_LEVEL,
                   latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                   generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    seconds = time.perf_counter() - start
    np.save(folder / FILES["noise"], drawn[0])
    np.save(folder / FILES["torch"], out)
    return {"version": f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}",
            "seconds": seconds, "shape": list(out.shape)}  # fmt: skip


def jax_side(size: str, folder: Path, steps: int, tiled: bool) -> dict:
    """Two jaxdiff calls (the first compiles) with diffusers' augmentation noise; the output is saved."""
    import jax

    from jaxdiff.latent.upscale import UpscalePipeline

    start = time.perf_counter()
    pipe = UpscalePipeline.from_pretrained(folder / "pipe")
    load_seconds = time.perf_counter() - start
    image, latents = shared_inputs(size)
    noise = np.load(folder / FILES["noise"])

    def call():
        start = time.perf_counter()
        out = pipe.upscale(image, [PROMPT], steps=steps, guidance=GUIDANCE, noise_level=NOISE_LEVEL, latents=latents,
                           noise=noise, tiled=tiled, output_type="float")  # fmt: skip
        return out, time.perf_counter() - start

    _, first = call()
    out, second = call()
    np.save(folder / FILES["jax"], out)
    return {"version": f"jax {jax.__version__}", "load_s": load_seconds, "first_s": first, "seconds": second,
            "compile_s": first - second, "shape": list(out.shape)}  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (2 U-Net rows each, guidance 9)")
    parser.add_argument("--whole", action="store_true", help="decode the latents whole on both sides (not tiled)")
    add_side_options(parser, ("prepare", "jax", "torch"))
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")
    check_side_options(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    tiled = not args.whole
    if args.side is not None:
        folder = Path(args.folder)
        if args.side == "prepare":
            print_result(prepare(args.size, folder))
        else:
            print_result((jax_side if args.side == "jax" else torch_side)(args.size, folder, args.steps, tiled))
        return {}
    results = {"machine": machine(), "command": " ".join(["benchmarks/upscaler_cpu.py", *argv]), "size": args.size,
               "steps": args.steps, "decoding": "tiled" if tiled else "whole"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="upscaler_") as tmp:
        common = ["--size", args.size, "--folder", tmp, "--steps", str(args.steps), *(["--whole"] * args.whole)]
        for side in ("prepare", "torch", "jax"):
            results[side] = run_side(__file__, side, common, need_gib=NEED_GIB[args.size])
        ours, theirs = (np.load(Path(tmp) / FILES[side]) for side in ("jax", "torch"))
    results["max_abs_difference"] = float(np.max(np.abs(ours - theirs)))
    results["load_after"] = os.getloadavg()[0]
    print_table(results)
    print("JSON " + json.dumps(results), flush=True)
    return results


def print_table(results: dict) -> None:
    m, jax_result, torch_result = results["machine"], results["jax"], results["torch"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['date']}; jax {m['jax']}, torch {m['torch']}, diffusers "
          f"{m['diffusers']}; load average {m['load']:.2f} before, {results['load_after']:.2f} after")  # fmt: skip
    print(f"x4 upscaler ({results['size']}) {results['prepare']['parameters']}, {results['steps']} DDIM steps, "
          f"guidance {GUIDANCE}, float32, {results['decoding']} decoding, output {jax_result['shape']}")  # fmt: skip
    print(f"{'':12}{'s/image':>9}{'compile s':>11}{'peak RSS':>10}")
    print(f"{'jaxdiff':12}{jax_result['seconds']:9.1f}{jax_result['compile_s']:11.1f}"
          f"{jax_result['peak_rss_gib']:9.2f}G")
    print(f"{'diffusers':12}{torch_result['seconds']:9.1f}{'':>11}{torch_result['peak_rss_gib']:9.2f}G")
    print(f"speed jaxdiff / diffusers {torch_result['seconds'] / jax_result['seconds']:.2f}; peak RSS jaxdiff / "
          f"diffusers {jax_result['peak_rss_gib'] / torch_result['peak_rss_gib']:.2f}; images differ by "
          f"{results['max_abs_difference']:.2e} (max, on [0, 1])")  # fmt: skip


if __name__ == "__main__":
    main()
