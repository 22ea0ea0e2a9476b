"""Where the SD 1.5 U-Net's guided step spends its time on CPU: jaxdiff's per-op profile beside diffusers', by part
of the network.

    python benchmarks/profile_sd_unet.py [--size full|tiny] [--repeats 2] [--prepared FOLDER]

Both sides run `vs_diffusers_sd.py`'s U-Net step (batch 2: latents N(0, I) at the config's sample size, t = 500,
text context N(0, I) [2, 77, 768], float32) on the same random-weight SD 1.5-sized folder (`--prepared`: one that
`vs_diffusers_sd.py`'s prepare side wrote, its `pipe/` inside; otherwise one is prepared in a temporary folder),
each in its own process, diffusers first. Each side times --repeats untraced forwards after the first (best
reported), then profiles --repeats more:
  jaxdiff    XLA's per-thunk trace (`--xla_cpu_enable_xprof_traceme`) of the forward compiled by `inference_jit`;
             each thunk is one instruction of the compiled program, placed by the Flax module path in its op_name.
  diffusers  `torch.profiler`'s ATen self times (one torch thread per core, `torch.inference_mode`); each op is
             placed by the innermost U-Net submodule whose forward encloses it (a `record_function` per submodule).
The parts:
  convolution        every convolution: ResNet 3×3s, conv_in / conv_out, resamplers, 1×1 proj_in / proj_out and
                     shortcuts, with the bias adds and layout copies fused or run around them
  attention core     softmax(q·kᵀ/√d)·v of attn1 (self, H·W tokens) and attn2 (cross, 77 tokens)
  attention proj     to_q, to_k, to_v, to_out
  feed-forward       GEGLU's projection and gate, net_2
  GroupNorm          the ResNets', the transformers' input norm, conv_norm_out
  LayerNorm          the transformer blocks' norm1 / norm2 / norm3
  other              SiLU, residual adds, nearest resizes, the time embedding, everything else
XLA's thunks may overlap on its thread pool, so jaxdiff's column is a sum of thunk wall times (a loop's thunk left
out: its body's thunks are counted); PyTorch's ops run one at a time. The `scaled` column puts jaxdiff's parts on
its forward's wall time. Prints a table and one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_cpu import SIZES, prepare  # noqa: E402  (benchmarks/)
from sequential_sides import add_side_options, check_side_options, machine, print_result, run_side  # noqa: E402
from timing import timed_calls  # noqa: E402
from vs_diffusers_sd import NEED_GIB, unet_inputs  # noqa: E402

# The U-Net's convolution layers (SD 1.5's proj_in / proj_out are 1×1 convolutions), as jaxdiff names them.
CONVOLUTION_LAYERS = ("conv", "conv1", "conv2", "conv_in", "conv_out", "conv_shortcut", "proj_in", "proj_out")
PARTS = ("convolution", "attention core", "attention proj", "feed-forward", "GroupNorm", "LayerNorm", "other")
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


def part_of(path: list[str], is_convolution: bool) -> str:
    """The PARTS entry of an op, from the module path around it (names as both sides spell them: `to_out_0` /
    `to_out.0`, `transformer_blocks_0` / `transformer_blocks.0`) and whether it is a convolution."""
    if is_convolution:
        return "convolution"
    if any(part.startswith(_PROJECTIONS) for part in path):
        return "attention proj"
    if any(part in ("attn1", "attn2") for part in path):
        return "attention core"
    if "ff" in path:
        return "feed-forward"
    norms = [part for part in path if part.startswith("norm") or part == "conv_norm_out"]
    if norms:
        in_block = any(part.startswith("transformer_blocks") for part in path)
        return "LayerNorm" if in_block and norms[-1] in ("norm1", "norm2", "norm3") else "GroupNorm"
    return "other"


def jax_side(folder: Path, repeats: int) -> dict:
    from profile_train_step import hlo_instructions, thunk_seconds  # sets XLA's per-thunk trace flag, then imports JAX

    import jax
    import jax.numpy as jnp

    from jaxdiff.latent.unet_weights import read_unet_condition
    from jaxdiff.models.unet_condition import create_unet_condition
    from jaxdiff.xla_options import inference_jit

    config, params = read_unet_condition(folder / "pipe", dtype="float32")
    params = jax.block_until_ready(jax.device_put(params))
    unet = create_unet_condition(config)
    forward = inference_jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    inputs = [jnp.asarray(a) for a in unet_inputs(folder).values()]
    compiled = forward.lower(params, *inputs).compile()
    hlo = compiled.as_text()
    instructions = hlo_instructions(hlo)
    wall = timed_calls(lambda: jax.block_until_ready(compiled(params, *inputs)), repeats)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(repeats):
            jax.block_until_ready(compiled(params, *inputs))
        jax.profiler.stop_trace()
        per_op, events = thunk_seconds(trace_dir, hlo.split()[1].rstrip(","))
    # A loop's thunk lasts as long as the thunks of its body, which are counted themselves (attention on CPU runs
    # in `lax.map` loops).
    loops = set(re.findall(r"^\s*%(\S+) = .* while\(", hlo, flags=re.MULTILINE))
    seconds = dict.fromkeys(PARTS, 0.0)
    for name, total in per_op.items():
        if name in loops:
            continue
        record = instructions.get(name, {"op_name": "", "ops": set()})
        path = record["op_name"].split("/")
        # On CPU small convolutions run as GEMMs and large ones by Winograd (`cpu_conv.cpu_form`): their ops are
        # found by the layer around them.
        is_convolution = "convolution" in record["ops"] or any(part in CONVOLUTION_LAYERS for part in path)
        seconds[part_of(path, is_convolution)] += total / repeats
    return {"version": f"jax {jax.__version__}", "forward_s": min(wall), "thunks": events / repeats,
            "seconds": seconds}  # fmt: skip


def torch_side(folder: Path, repeats: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    unet = UNet2DConditionModel.from_pretrained(folder / "pipe", subfolder="unet").eval()
    arrays = unet_inputs(folder)
    sample = torch.from_numpy(arrays["sample"].transpose(0, 3, 1, 2).copy())
    timesteps, context = torch.from_numpy(arrays["timesteps"]), torch.from_numpy(arrays["context"])
    marker = "module:"

    def wrap(name, module):
        forward = module.forward

        def traced(*args, **kwargs):
            with torch.profiler.record_function(marker + name):
                return forward(*args, **kwargs)

        module.forward = traced

    def run():
        with torch.inference_mode():
            return unet(sample, timesteps, context).sample

    wall = timed_calls(run, repeats)
    for name, module in unet.named_modules():
        if name:
            wrap(name, module)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    seconds = dict.fromkeys(PARTS, 0.0)
    for event in prof.events():
        if event.name.startswith(marker) or not event.name.startswith("aten::"):
            continue
        enclosing, parent = "", event.cpu_parent
        while parent is not None and not enclosing:
            enclosing = parent.name[len(marker):] if parent.name.startswith(marker) else ""
            parent = parent.cpu_parent
        path = enclosing.split(".")
        is_convolution = "conv" in event.name and "convert" not in event.name
        seconds[part_of(path, is_convolution)] += event.self_cpu_time_total * 1e-6 / repeats
    return {"version": f"torch {torch.__version__}, {torch.get_num_threads()} threads", "forward_s": min(wall),
            "seconds": seconds}  # fmt: skip


SIDES = {"jax": jax_side, "torch": torch_side}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=2, help="untimed forwards timed, then as many profiled")
    parser.add_argument("--prepared", type=Path, help="a folder vs_diffusers_sd.py prepared (holding pipe/)")
    add_side_options(parser, ("prepare", *SIDES))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    if args.prepared is not None and not (args.prepared / "pipe" / "unet" / "config.json").is_file():
        parser.error(f"--prepared={args.prepared} holds no pipe/unet/config.json")
    check_side_options(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.side is not None:
        folder = Path(args.folder)
        print_result(prepare(args.size, folder) if args.side == "prepare" else SIDES[args.side](folder, args.repeats))
        return {}
    results = {"machine": machine(), "command": " ".join(["benchmarks/profile_sd_unet.py", *argv]),
               "repeats": args.repeats}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="profile_sd_") as tmp:
        folder = args.prepared or Path(tmp)
        common = ["--size", args.size, "--folder", str(folder), "--repeats", str(args.repeats)]
        if args.prepared is None:
            run_side(__file__, "prepare", common, need_gib=NEED_GIB[args.size]["prepare"])
        for side in ("torch", "jax"):
            results[side] = run_side(__file__, side, common, need_gib=NEED_GIB[args.size]["unet"])
    results["load_after"] = os.getloadavg()[0]
    print_table(results)
    print("JSON " + json.dumps(results), flush=True)
    return results


def print_table(results: dict) -> None:
    m, ours, theirs = results["machine"], results["jax"], results["torch"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['date']}; {ours['version']}; {theirs['version']}, diffusers "
          f"{m['diffusers']}; load {m['load']:.2f} before, {results['load_after']:.2f} after")  # fmt: skip
    print(f"forward (best of {results['repeats']}): jaxdiff {ours['forward_s']:.2f} s, diffusers "
          f"{theirs['forward_s']:.2f} s ({theirs['forward_s'] / ours['forward_s']:.2f}x); jaxdiff "
          f"{ours['thunks']:.0f} thunks per forward")  # fmt: skip
    summed = sum(ours["seconds"].values())
    scale = ours["forward_s"] / summed
    print(f"{'part':<16}{'jaxdiff s':>11}{'scaled s':>10}{'diffusers s':>13}{'jax/torch':>11}")
    rows = collections.OrderedDict((part, (ours["seconds"][part], theirs["seconds"][part])) for part in PARTS)
    rows["sum"] = (summed, sum(theirs["seconds"].values()))
    for part, (mine, peer) in rows.items():
        ratio = f"{mine * scale / peer:.2f}" if peer else "-"
        print(f"{part:<16}{mine:>11.2f}{mine * scale:>10.2f}{peer:>13.2f}{ratio:>11}")


if __name__ == "__main__":
    main()
