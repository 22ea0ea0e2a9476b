"""Memory of one latent training step: LoRA adapters (`training.lora.rank`) of a frozen bfloat16 U-Net against
fine-tuning the whole U-Net, for SD 1.5's U-Net at 512² and SDXL base's at 1024², batch 1.

The step is jaxdiff's (`jaxdiff.training.latent_step`): the frozen autoencoder encodes the uint8 images to latents,
the frozen text encoder reads the caption ids, the U-Net's ε-MSE loss, its gradient, global-norm clip, Adam, EMA.
Both modes compute the U-Net in bfloat16 (the config's dtype); full fine-tuning trains float32 weights (with Adam's
two moments and the EMA: 16 bytes per parameter), LoRA keeps the U-Net in bfloat16 (`training.lora.base_dtype`)
and trains rank-16 adapters of `training.lora.target_modules`' default (to_q, to_k, to_v, to_out.0). The states are
built by `jax.eval_shape` (nothing allocated); `jax.jit(step).lower(...).compile().memory_analysis()` gives XLA's
argument, output, alias (donated: the state is updated in place) and temporary bytes; peak ≈ argument + output −
alias + temp. The frozen networks are step arguments: the VAE (SD's, float32) and the text encoder (float32): SD
1.5's CLIP ViT-L; for SDXL a CLIP-shaped stand-in of width 2048 (SDXL's two encoders' concatenated width, 12 layers)
and its U-Net without the "text_time" added embedding (5.2M of its 2.57B parameters, 0.2%): a memory estimate built
from shapes alone, not the SDXL LoRA training of `jaxdiff.training.tasks.latent`, which reads a real SDXL folder
with both encoders and the time ids.

`--size small` (a narrow SD 1.5 layout at 256²) and `--size tiny` (two wide levels at 32², the tests' size) also run
the step twice with real arrays in each mode, and report the process's peak RSS (VmHWM, restarted once every
program is compiled) over its RSS then, before the state and the frozen networks are allocated, to check the
estimate. Each (size, mode) is its own process (`sequential_sides`), one at a time.

    python benchmarks/lora_memory.py [--size tiny --size small --size sd15 --size sdxl] [--rank 16]

Prints a table, then one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl_unet_cpu import SDXL_BASE_UNET  # noqa: E402  (benchmarks/)
from sequential_sides import machine, print_result, reset_peak_rss, resident_gib, run_side  # noqa: E402
from text_to_image import CLIP_VIT_L, UNET_SD15, VAE_SD15  # noqa: E402

TEXT_LENGTH = 77
ADDED_EMBEDDING_KEYS = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
SDXL_UNET = {k: v for k, v in SDXL_BASE_UNET.items() if k not in ADDED_EMBEDDING_KEYS}
SDXL_TEXT = dict(CLIP_VIT_L, hidden_size=2048, intermediate_size=8192, num_attention_heads=16, projection_dim=2048)
SMALL_UNET = dict(UNET_SD15, block_out_channels=[64, 128, 256, 256], attention_head_dim=4, norm_num_groups=16,
                  cross_attention_dim=256, sample_size=32)  # fmt: skip
SMALL_VAE = dict(VAE_SD15, block_out_channels=[32, 64, 64, 64], norm_num_groups=16, sample_size=256)
SMALL_TEXT = dict(CLIP_VIT_L, hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
                  projection_dim=256)  # fmt: skip
# Two levels of one block each, wide enough that the parameters (16 bytes each when fully fine-tuned) outweigh the
# activations: what the tests run, a few compiled programs small enough for CI.
TINY_UNET = dict(UNET_SD15, block_out_channels=[128, 256], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, attention_head_dim=8,
                 cross_attention_dim=128, sample_size=16)  # fmt: skip
TINY_VAE = dict(VAE_SD15, block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=16,
                sample_size=32)  # fmt: skip
TINY_TEXT = dict(SMALL_TEXT, hidden_size=128, intermediate_size=512, num_hidden_layers=2, projection_dim=128)
SIZES = {  # (U-Net, VAE, text encoder, image side)
    "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT, 32),
    "small": (SMALL_UNET, SMALL_VAE, SMALL_TEXT, 256),
    "sd15": (UNET_SD15, VAE_SD15, CLIP_VIT_L, 512),
    "sdxl": (SDXL_UNET, VAE_SD15, SDXL_TEXT, 1024),
}
DEFAULT_SIZES = ("small", "sd15", "sdxl")
RUN_SIZES = ("tiny", "small")  # also run the step with real arrays
NEED_GIB = {"tiny": 1.0, "small": 2.0, "sd15": 8.0, "sdxl": 12.0}  # host memory free before a side starts (compiling)
MODES = ("lora", "full")


def train_config(rank: int):
    """The default config's training and diffusion sections, LoRA of rank `rank` on a bfloat16 base."""
    from jaxdiff.config.defaults import default_config

    config = default_config()
    config.training.lora.rank = rank
    config.training.lora.base_dtype = "bfloat16"
    return config


def abstract(tree, dtype=None):
    """`tree`'s leaves as ShapeDtypeStructs (of `dtype` where given)."""
    import jax

    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype or leaf.dtype), tree)


def step_side(size: str, mode: str, rank: int, run: bool) -> dict:
    """XLA's memory analysis of the compiled step; with `run`, two steps on real arrays and the peak RSS."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
    from jaxdiff.models.clip_text import clip_text_config, create_clip_text
    from jaxdiff.models.unet_condition import create_unet_condition
    from jaxdiff.models.unet_condition_config import config_from_diffusers
    from jaxdiff.latent.unet_weights import unet_condition_shapes
    from jaxdiff.schedule import schedule_from_config
    from jaxdiff.training.latent_step import (
        LatentNetworks,
        init_latent_state,
        init_lora_state,
        lora_targets,
        make_latent_loss_fn,
        make_latent_train_step,
    )
    from jaxdiff.training.step import make_optimizer
    from jaxdiff.training.lora_base import lora_scale, lora_target_modules

    unet_settings, vae_settings, text_settings, side = SIZES[size]
    config = train_config(rank)
    unet_config = config_from_diffusers(unet_settings, dtype="bfloat16")
    vae_config = autoencoder_config(vae_settings, dtype="float32")
    text_config = clip_text_config(text_settings, dtype="float32")
    lora = config.training.lora
    networks = LatentNetworks(create_unet_condition(unet_config), create_clip_text(text_config),
                              create_autoencoder(vae_config), vae_config, False, {},
                              lora_scale(lora) if mode == "lora" else None)  # fmt: skip
    tx = make_optimizer(config.training)
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    latent_shape = (side // factor, side // factor, vae_config.latent_channels)
    key = jax.random.PRNGKey(0)
    ids = jnp.zeros((1, TEXT_LENGTH), jnp.int32)

    def init_frozen():
        frozen = {"vae": networks.vae.init(key, jnp.zeros((1, 2 * factor, 2 * factor, 3)))["params"],
                  "text": networks.text.init(key, ids)["params"]}  # fmt: skip
        if mode == "lora":
            context = jnp.zeros((1, TEXT_LENGTH, unet_config.cross_attention_dim))
            unet = networks.unet.init(key, jnp.zeros((1, *latent_shape)), jnp.zeros((1,), jnp.int32), context)
            frozen["unet"] = jax.tree.map(lambda leaf: leaf.astype(jnp.dtype(lora.base_dtype)), unet["params"])
        return frozen

    if mode == "lora":
        shapes = unet_condition_shapes(unet_config)
        targets = lora_targets(shapes, lora_target_modules(lora))
        init_state = lambda: init_lora_state(tx, 0, shapes, targets, rank)  # noqa: E731
    else:
        init_state = lambda: init_latent_state(networks, tx, 0, latent_shape, TEXT_LENGTH)  # noqa: E731
    schedule = schedule_from_config(config.diffusion)

    def step(frozen, state, batch):
        loss_fn = make_latent_loss_fn(networks._replace(frozen=frozen), schedule, config.diffusion, caption_dropout=0.1,
                                      empty_ids=np.zeros((TEXT_LENGTH,), np.int32))  # fmt: skip
        return make_latent_train_step(loss_fn, config.training, tx)(state, batch)

    frozen_shapes, state_shapes = jax.eval_shape(init_frozen), jax.eval_shape(init_state)
    batch_shapes = {"image": jax.ShapeDtypeStruct((1, side, side, 3), jnp.uint8), "input_ids": abstract(ids)}
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=1).lower(frozen_shapes, state_shapes, batch_shapes).compile()
    compile_seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))  # noqa: E731
    result = {
        "version": f"jax {jax.__version__}", "compile_s": compile_seconds,
        "trained_parameters": count(state_shapes.params), "frozen_parameters": count(frozen_shapes),
        **{f"{name}_bytes": int(getattr(analysis, f"{name}_size_in_bytes"))
           for name in ("argument", "output", "alias", "temp", "generated_code")},
    }  # fmt: skip
    result["estimate_bytes"] = result["argument_bytes"] + result["output_bytes"] - result["alias_bytes"] + result[
        "temp_bytes"]  # fmt: skip
    if run:
        init_frozen, init_state = jax.jit(init_frozen).lower().compile(), jax.jit(init_state).lower().compile()
        reset_peak_rss()  # the compilers' own peak is not the step's
        before = resident_gib()["rss"]
        frozen, state = init_frozen(), init_state()
        batch = {"image": jnp.zeros((1, side, side, 3), jnp.uint8), "input_ids": ids}
        for _ in range(2):
            state, metrics = compiled(frozen, state, batch)
            jax.block_until_ready(metrics["loss"])
        result["rss_before_gib"] = before
        result["measured_gib"] = resident_gib()["peak"] - before
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", choices=tuple(SIZES),
                        help=f"repeatable; default: {', '.join(DEFAULT_SIZES)} ({' and '.join(RUN_SIZES)} also "
                             "run the step)")  # fmt: skip
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--side", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank < 1:
        parser.error(f"--rank={args.rank} must be >= 1")
    if args.side is not None and (args.size is None or len(args.size) != 1):
        parser.error("--side needs exactly one --size")
    args.size = args.size or list(DEFAULT_SIZES)
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.side is not None:
        print_result(step_side(args.size[0], args.side, args.rank, run=args.size[0] in RUN_SIZES))
        return {}
    results = {"machine": machine(), "command": " ".join(["benchmarks/lora_memory.py", *argv]), "rank": args.rank,
               "sizes": {}}  # fmt: skip
    for size in args.size:
        results["sizes"][size] = {mode: run_side(__file__, mode, ["--size", size, "--rank", str(args.rank)],
                                                 need_gib=NEED_GIB[size]) for mode in MODES}  # fmt: skip
    results["load_after"] = os.getloadavg()[0]
    print_table(results)
    print("JSON " + json.dumps(results), flush=True)
    return results


def print_table(results: dict) -> None:
    m, gb = results["machine"], 1e9
    print(f"{m['cpu']}, {m['cores']} cores, {m['date']}; jax {m['jax']}; load average {m['load']:.2f} before, "
          f"{results['load_after']:.2f} after; LoRA rank {results['rank']}, batch 1")  # fmt: skip
    print(f"{'':12}{'trained':>14}{'argument GB':>12}{'output GB':>10}{'alias GB':>9}{'temp GB':>9}{'peak GB':>9}"
          f"{'measured':>10}")  # fmt: skip
    for size, modes in results["sizes"].items():
        for mode, r in modes.items():
            measured = f"{r['measured_gib'] * 2**30 / gb:9.2f}" if "measured_gib" in r else f"{'':9}"
            print(f"{size + ' ' + mode:12}{r['trained_parameters']:14,}{r['argument_bytes'] / gb:12.2f}"
                  f"{r['output_bytes'] / gb:10.2f}{r['alias_bytes'] / gb:9.2f}{r['temp_bytes'] / gb:9.2f}"
                  f"{r['estimate_bytes'] / gb:9.2f}{measured}")  # fmt: skip
        ratio = modes["lora"]["estimate_bytes"] / modes["full"]["estimate_bytes"]
        print(f"  {size}: LoRA / full peak estimate {ratio:.2f}")


if __name__ == "__main__":
    main()
