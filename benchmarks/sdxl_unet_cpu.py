"""SDXL base's U-Net on CPU at 1024² (128² latents), jaxdiff against diffusers, one forward, the same weights.

diffusers' `UNet2DConditionModel` of stabilityai/stable-diffusion-xl-base-1.0's unet config (2,567,463,684
parameters) is built with torch.manual_seed(0), its default initialisation, and saved as config.json + one float32
safetensors file in a temporary folder (`--side prepare`); jaxdiff reads that file tensor by tensor with the parts
of its reader (`streamed_params`), diffusers loads it into a model built on the meta device. Inputs, the same on
both sides: latents N(0, I) [1, 128, 128, 4], t = 500, text context N(0, I) [1, 77, 2048], text_embeds N(0, I)
[1, 1280], time ids (1024, 1024, 0, 0, 1024, 1024). Precisions: float32; bfloat16 with the weights and the compute
in bfloat16 on both sides (jaxdiff: parameters cast to bfloat16 and the config's dtype "bfloat16"; diffusers:
`.to(torch.bfloat16)` on the model and inputs, no autocast).

Each side is its own process (`sequential_sides`), one at a time, bfloat16 first: jaxdiff reports the load
(read + convert) seconds, the compile seconds (`xla_options.inference_jit(...).lower(...).compile()`, as the
pipelines compile) and the median seconds of --repeats forwards after one untimed one; diffusers the load
seconds, the first forward's seconds and the median of --repeats after it. Each side's peak RSS, after
loading and at the end. The outputs of the two sides are compared (max |jaxdiff − diffusers| / max |diffusers|)
to show they ran the same network. `--size tiny` runs the
same on a narrow SDXL-shaped U-Net at 16² latents (its smoke test). `--analyze` runs neither side: XLA's memory
analysis of jaxdiff's compiled forward per dtype, the parameters abstract (arguments, output, temporaries), which
says before any run what jaxdiff's side will hold (on CPU the bfloat16 forward's temporaries are about a float32
copy of every weight, 10.9 GB for SDXL against 2.3 GB in float32: more memory than the float32 forward in all).

    python benchmarks/sdxl_unet_cpu.py [--size full|tiny] [--dtype bfloat16 --dtype float32] [--repeats 1]
        [--analyze]

Prints a table, then one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    peak_rss_gib,
    print_result,
    resident_gib,
    run_side,
)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json where it differs from UNet2DConditionModel's defaults.
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
# The same layout, narrow, for the smoke test: 6 time ids of width 8 and 16 text_embeds (P = 64).
SDXL_TINY_UNET = dict(
    SDXL_BASE_UNET, sample_size=16, block_out_channels=[16, 32, 32], norm_num_groups=8,
    transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 2], cross_attention_dim=32,
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=64,
)  # fmt: skip
SIZES = {"full": SDXL_BASE_UNET, "tiny": SDXL_TINY_UNET}
NEED_GIB = {"full": 15.0, "tiny": 1.0}  # host memory available before a side starts
TIMESTEP, TEXT_LENGTH = 500, 77
TIME_IDS = [1024, 1024, 0, 0, 1024, 1024]  # original size, crop top-left, target size
OUTPUT_FILE = "{side}_{dtype}.npy"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def shared_inputs(settings: dict) -> dict[str, np.ndarray]:
    """The inputs of both sides, NHWC: sample [1, s, s, 4], timesteps [1], context [1, 77, D], text_embeds, time_ids."""
    rng = np.random.default_rng(0)
    size, text_width = settings["sample_size"], settings["projection_class_embeddings_input_dim"] - 6 * settings[
        "addition_time_embed_dim"]  # fmt: skip
    return {
        "sample": rng.standard_normal((1, size, size, settings["in_channels"]), dtype=np.float32),
        "timesteps": np.full((1,), TIMESTEP, np.float32),
        "context": rng.standard_normal((1, TEXT_LENGTH, settings["cross_attention_dim"]), dtype=np.float32),
        "text_embeds": rng.standard_normal((1, text_width), dtype=np.float32),
        "time_ids": np.asarray([TIME_IDS], np.float32),
    }


def prepare(settings: dict, folder: Path) -> dict:
    """diffusers' U-Net of `settings` from torch.manual_seed(0), saved to `folder` (config.json, float32
    safetensors)."""
    import safetensors.torch
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = UNet2DConditionModel(**settings)
    unet.save_config(folder)
    safetensors.torch.save_file(unet.state_dict(), folder / WEIGHTS_FILE)
    return {"parameters": sum(p.numel() for p in unet.parameters()), "seconds": time.perf_counter() - start}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def streamed_params(folder: Path, dtype: str):
    """(config, params) of the U-Net folder, each tensor read, laid out as ours (`from_torch`) and moved into a JAX
    array of `dtype` one at a time: `read_unet_condition` holds every tensor twice while it lays them out (its
    transposed float32 NumPy views and their contiguous copies, 2 × 10.3 GB for SDXL), which the host cannot spare
    beside a float32 copy."""
    import flax.traverse_util
    import jax.numpy as jnp

    from jaxdiff.latent.unet_weights import diffusers_tensor_name, unet_condition_shapes
    from jaxdiff.models.unet_condition_config import config_from_diffusers
    from jaxdiff.weights.files import load_json
    from jaxdiff.weights.safetensors_reader import read_tensor
    from jaxdiff.weights.torch_layout import from_torch

    config = config_from_diffusers(load_json(folder / "config.json"), dtype=dtype)
    file = folder / WEIGHTS_FILE
    params = {}
    for path, shape in unet_condition_shapes(config).items():
        array = read_tensor(file, diffusers_tensor_name(path))
        params[path] = jnp.asarray(array if path[-1] == "embedding" else from_torch(array, shape), dtype)
    return config, flax.traverse_util.unflatten_dict(params)


def jax_side(settings: dict, folder: Path, dtype: str, repeats: int) -> dict:
    """Load, compile and time jaxdiff's U-Net; the output is saved beside the weights."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models.unet_condition import create_unet_condition
    from jaxdiff.xla_options import inference_jit, release_compiler_memory

    start = time.perf_counter()
    config, params = streamed_params(folder, dtype)
    jax.block_until_ready(params)
    load_seconds = time.perf_counter() - start
    load_rss, load_anon = peak_rss_gib(), resident_gib().get("anon")
    arrays = {name: jnp.asarray(a) for name, a in shared_inputs(settings).items()}
    cond = {"text_embeds": arrays["text_embeds"], "time_ids": arrays["time_ids"]}
    unet = create_unet_condition(config)
    forward = inference_jit(lambda p, x, t, c, cond: unet.apply({"params": p}, x, t, c, added_cond=cond))
    args = (params, arrays["sample"], arrays["timesteps"], arrays["context"], cond)
    start = time.perf_counter()
    compiled = forward.lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    release_compiler_memory()  # as a call of `forward` that compiles does
    out = compiled(*args)
    jax.block_until_ready(out)
    seconds = [timed(lambda: jax.block_until_ready(compiled(*args))) for _ in range(repeats)]
    np.save(folder / OUTPUT_FILE.format(side="jax", dtype=dtype), np.asarray(out, np.float32))
    return {"version": f"jax {jax.__version__}", "load_s": load_seconds, "load_rss_gib": load_rss,
            "load_rss_anon_gib": load_anon,
            "compile_s": compile_seconds, "forward_s": statistics.median(seconds)}  # fmt: skip


def analyze_side(settings: dict, dtype: str) -> dict:
    """XLA's memory analysis of jaxdiff's compiled forward, the parameters abstract (`jax.eval_shape`, in `dtype`):
    nothing is allocated but the compiler's own memory."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models.unet_condition import create_unet_condition, example_inputs
    from jaxdiff.models.unet_condition_config import config_from_diffusers
    from jaxdiff.xla_options import inference_jit

    config = config_from_diffusers(settings, dtype=dtype)
    unet = create_unet_condition(config)
    shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), *example_inputs(config)[0], **example_inputs(config)[1])
    params = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype)), shapes["params"])
    arrays = {name: jax.ShapeDtypeStruct(a.shape, a.dtype) for name, a in shared_inputs(settings).items()}
    cond = {"text_embeds": arrays["text_embeds"], "time_ids": arrays["time_ids"]}
    forward = inference_jit(lambda p, x, t, c, cond: unet.apply({"params": p}, x, t, c, added_cond=cond))
    start = time.perf_counter()
    analysis = forward.lower(params, arrays["sample"], arrays["timesteps"], arrays["context"], cond).compile(
    ).memory_analysis()  # fmt: skip
    return {"compile_s": time.perf_counter() - start,
            **{f"{name}_bytes": int(getattr(analysis, f"{name}_size_in_bytes"))
               for name in ("argument", "output", "temp", "generated_code")}}  # fmt: skip


def torch_side(settings: dict, folder: Path, dtype: str, repeats: int) -> dict:
    """Load and time diffusers' U-Net (the weights read into a meta-device model, in `dtype`)."""
    import safetensors.torch
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch_dtype = getattr(torch, dtype)
    start = time.perf_counter()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    state = safetensors.torch.load_file(folder / WEIGHTS_FILE)
    for name in list(state):
        state[name] = state[name].to(torch_dtype)
    unet.load_state_dict(state, assign=True)
    del state
    unet.eval()
    load_seconds = time.perf_counter() - start
    load_rss, load_anon = peak_rss_gib(), resident_gib().get("anon")
    arrays = shared_inputs(settings)
    tensor = lambda name: torch.from_numpy(arrays[name]).to(torch_dtype)  # noqa: E731
    sample = torch.from_numpy(arrays["sample"].transpose(0, 3, 1, 2).copy()).to(torch_dtype)
    cond = {"text_embeds": tensor("text_embeds"), "time_ids": tensor("time_ids")}

    def forward():
        with torch.inference_mode():
            return unet(sample, torch.from_numpy(arrays["timesteps"]), tensor("context"), added_cond_kwargs=cond).sample

    start = time.perf_counter()
    out = forward()
    first_seconds = time.perf_counter() - start
    seconds = [timed(forward) for _ in range(repeats)]
    np.save(folder / OUTPUT_FILE.format(side="torch", dtype=dtype), out.float().numpy().transpose(0, 2, 3, 1))
    return {"version": f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}",
            "load_s": load_seconds, "load_rss_gib": load_rss, "load_rss_anon_gib": load_anon,
            "first_forward_s": first_seconds,
            "forward_s": statistics.median(seconds)}  # fmt: skip


def serve_side(args: argparse.Namespace) -> None:
    settings, folder = SIZES[args.size], Path(args.folder)
    if args.side == "prepare":
        print_result(prepare(settings, folder))
    elif args.side == "analyze":
        print_result(analyze_side(settings, args.dtype[0]))
    else:
        side = jax_side if args.side == "jax" else torch_side
        print_result(side(settings, folder, args.dtype[0], args.repeats))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="full")
    parser.add_argument("--dtype", action="append", choices=("bfloat16", "float32"),
                        help="precisions, in the order given (default: bfloat16, then float32)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards after the first (median reported)")
    parser.add_argument("--analyze", action="store_true",
                        help="only XLA's memory analysis of jaxdiff's compiled forward (no weights, no run)")
    add_side_options(parser, ("prepare", "analyze", "jax", "torch"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    check_side_options(parser, args)
    args.dtype = args.dtype or ["bfloat16", "float32"]
    return args


def relative_difference(folder: Path, dtype: str) -> float:
    ours, theirs = (np.load(folder / OUTPUT_FILE.format(side=side, dtype=dtype)) for side in ("jax", "torch"))
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.side is not None:
        serve_side(args)
        return {}
    need = NEED_GIB[args.size]
    if args.analyze:
        analyses = {dtype: run_side(__file__, "analyze", ["--size", args.size, "--folder", ".", "--dtype", dtype],
                                    need_gib=need / 2) for dtype in args.dtype}  # fmt: skip
        for dtype, r in analyses.items():
            print(f"jaxdiff {dtype} forward, XLA memory analysis: arguments {r['argument_bytes'] / 1e9:.2f} GB, "
                  f"output {r['output_bytes'] / 1e9:.3f} GB, temporaries {r['temp_bytes'] / 1e9:.2f} GB "
                  f"(compiled in {r['compile_s']:.0f} s, compiler peak RSS {r['peak_rss_gib']:.2f} GiB)")  # fmt: skip
        print("JSON " + json.dumps({"machine": machine(), "size": args.size, "analysis": analyses}), flush=True)
        return analyses
    results = {"machine": machine(), "size": args.size, "command": " ".join(["benchmarks/sdxl_unet_cpu.py", *(
        argv if argv is not None else sys.argv[1:])]), "dtypes": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sdxl_unet_") as tmp:
        common = ["--size", args.size, "--folder", tmp, "--repeats", str(args.repeats)]
        results["prepare"] = run_side(__file__, "prepare", common, need_gib=need)
        for dtype in args.dtype:
            sides = {side: run_side(__file__, side, [*common, "--dtype", dtype], need_gib=need)
                     for side in ("jax", "torch")}  # fmt: skip
            sides["max_relative_difference"] = relative_difference(Path(tmp), dtype)
            results["dtypes"][dtype] = sides
    results["load_after"] = os.getloadavg()[0]
    print_table(results)
    print("JSON " + json.dumps(results), flush=True)
    return results


def print_table(results: dict) -> None:
    m = results["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['date']}; jax {m['jax']}, torch {m['torch']}, "
          f"diffusers {m['diffusers']}")
    print(f"SDXL base U-Net ({results['size']}), {results['prepare']['parameters']:,} parameters, batch 1; load "
          f"average {m['load']:.2f} before, {results['load_after']:.2f} after")  # fmt: skip
    print(f"{'':22}{'load s':>8}{'compile/1st s':>15}{'forward s':>11}{'load RSS':>10}{'peak RSS':>10}")
    for dtype, sides in results["dtypes"].items():
        for side, label in (("jax", "jaxdiff"), ("torch", "diffusers")):
            r = sides[side]
            first = r["compile_s"] if side == "jax" else r["first_forward_s"]
            print(f"{label + ' ' + dtype:22}{r['load_s']:8.1f}{first:15.1f}{r['forward_s']:11.2f}"
                  f"{r['load_rss_gib']:9.2f}G{r['peak_rss_gib']:9.2f}G")  # fmt: skip
        ratio = sides["torch"]["forward_s"] / sides["jax"]["forward_s"]
        print(f"  {dtype}: forward speed jaxdiff / diffusers {ratio:.2f}; peak RSS jaxdiff / diffusers "
              f"{sides['jax']['peak_rss_gib'] / sides['torch']['peak_rss_gib']:.2f}; outputs differ by "
              f"{sides['max_relative_difference']:.2e} (max, relative)")  # fmt: skip


if __name__ == "__main__":
    main()
