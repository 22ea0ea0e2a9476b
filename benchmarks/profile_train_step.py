"""Where a training step's time goes: XLA's per-op (per-thunk) profile of the jitted step, by category.

    python benchmarks/profile_train_step.py [--config configs/cifar10.py] [--batch-size 32] [--steps 3]
        [--warmup 1] [--config.a.b=V ...]

The step is `make_train_step` (the network forward and backward, loss, clip, Adam, EMA, finite
checks) on a fixed uint8 batch. It is first timed untraced (median of --steps), then traced with
`jax.profiler` and XLA-CPU's per-thunk trace events (`--xla_cpu_enable_xprof_traceme`). Each thunk
is one HLO instruction of the compiled step; its `op_name` metadata names the Flax module path and
whether it is in the forward (`jvp(...)`) or the backward (`transpose(jvp(...))`), which gives the
category:
  conv forward / conv input grad / conv weight grad   fusions holding a convolution (a backward
      convolution is a weight gradient when its output has a kernel's shape), and the layout copies
      XLA adds around them
  attention        ops under an `attn` module other than its GroupNorm (q/k/v/proj_out, softmax)
  GroupNorm        ops under `norm*` modules
  dense            other matrix products (timestep embedding, temb_proj, nin_shortcut)
  dropout RNG      ops under `Dropout` modules
  other network    activations, residual adds, resampling, embeddings
  outside network  noise and t draws, loss, gradient clip, Adam, EMA, finite checks
Thunks of one step may overlap on the thread pool, so category times are summed thunk wall times;
the share column is of their total. Prints a table and one line `JSON {...}`.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profile_report import print_profile  # noqa: E402  (benchmarks/, this script's folder)
from step_args import parse_step_args  # noqa: E402

from jaxdiff.models import create_model  # noqa: E402
from jaxdiff.training.diffusion_step import make_train_step  # noqa: E402
from jaxdiff.training.step import init_train_state, make_optimizer  # noqa: E402

CATEGORIES = (
    "conv forward", "conv input grad", "conv weight grad", "attention", "GroupNorm", "dense",
    "dropout RNG", "other network", "outside network",
)  # fmt: skip
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)\[([\d,]*)\][^ ]* (\S+?)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """Compiled HLO text -> {instruction: {shape, opcode, op_name, operands, ops (opcodes of its fused computation)}}."""
    computations: dict[str, list[str]] = collections.defaultdict(list)
    instructions, current = {}, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and line.rstrip().endswith("{"):
            current = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, _, dims, opcode = match.groups()
        computations[current].append(opcode)
        calls, op_name = _CALLS.search(line), _OP_NAME.search(line)
        arguments = line[match.end() :].split(")", 1)[0]
        instructions[name] = {
            "shape": tuple(int(d) for d in dims.split(",") if d),
            "opcode": opcode,
            "op_name": op_name.group(1) if op_name else "",
            "operands": re.findall(r"%([\w.\-]+)", arguments),
            "calls": calls.group(1) if calls else None,
        }
    for record in instructions.values():
        record["ops"] = set(computations.get(record.pop("calls"), ())) | {record["opcode"]}
    return instructions


def categorise(instructions: dict[str, dict], kernel_shapes: set[tuple[int, ...]]) -> dict[str, str]:
    """{instruction: CATEGORIES entry}. XLA emits the weight gradient's convolution without metadata, from
    transposed copies of its operands and into a transposed copy: all of these count as weight gradient."""
    kinds = {name: category(record, kernel_shapes) for name, record in instructions.items()}
    layout_ops = {"copy", "transpose", "bitcast", "parameter", "fusion"}
    for name, record in instructions.items():
        if kinds[name] != "conv weight grad" or "convolution" not in record["ops"]:
            continue
        for operand in record["operands"]:
            if operand in instructions and instructions[operand]["ops"] <= layout_ops:
                kinds[operand] = "conv weight grad"
    for name, record in instructions.items():
        if record["ops"] <= layout_ops and any(kinds.get(o) == "conv weight grad" for o in record["operands"]):
            kinds[name] = "conv weight grad"
    return kinds


def category(record: dict, kernel_shapes: set[tuple[int, ...]]) -> str:
    """The CATEGORIES entry of one compiled instruction, by its own op_name, shape and ops."""
    op_name, ops = record["op_name"], record["ops"]
    backward = "transpose(jvp(" in op_name
    if "convolution" in ops or op_name.endswith("conv_general_dilated"):
        if (backward or not op_name) and tuple(sorted(record["shape"])) in kernel_shapes and "reverse" not in ops:
            return "conv weight grad"
        return "conv input grad" if backward else "conv forward"
    if "jvp(" not in op_name:
        return "outside network"
    path = op_name.split("/")
    if any(part.startswith("norm") for part in path):
        return "GroupNorm"
    if any(part.startswith("attn") for part in path) or "dot_product_attention" in op_name:
        return "attention"
    if "dot" in ops:
        return "dense"
    if any(part.startswith("Dropout") for part in path):
        return "dropout RNG"
    return "other network"


def thunk_seconds(trace_dir: str, module: str) -> tuple[dict[str, float], int]:
    """({HLO instruction: summed thunk seconds}, number of thunk events) of module `module` in a trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    totals: dict[str, float] = collections.defaultdict(float)
    events = 0
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if stats.get("hlo_module") == module and "hlo_op" in stats:
                    totals[stats["hlo_op"]] += event.duration_ns * 1e-9
                    events += 1
    return totals, events


def main(argv: list[str] | None = None) -> None:
    args, config = parse_step_args(sys.argv[1:] if argv is None else argv, description=__doc__.splitlines()[0],
                                   steps=3, steps_help="timed steps, then as many traced steps", warmup=1,
                                   warmup_help="untimed steps after compilation")  # fmt: skip
    load_before = os.getloadavg()
    model = create_model(config.model)
    tx = make_optimizer(config.training)
    state = init_train_state(config, model, tx)
    kernel_shapes = {
        tuple(sorted(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
        if leaf.ndim == 4 and "kernel" in jax.tree_util.keystr(path)
    }  # fmt: skip
    size, channels = config.model.image_size, config.model.in_channels
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, channels), dtype=np.uint8)
    batch = {"image": jnp.asarray(images), "label": jnp.zeros((args.batch_size,), jnp.int32)}

    step_fn = jax.jit(make_train_step(config, model, tx), donate_argnums=0)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    instructions = hlo_instructions(compiled.as_text())
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    wall = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        wall.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        per_op, events = thunk_seconds(trace_dir, compiled.as_text().split()[1].rstrip(","))
    load_after = os.getloadavg()

    seconds = dict.fromkeys(CATEGORIES, 0.0)
    backward = dict.fromkeys(CATEGORIES, 0.0)
    kinds = categorise(instructions, kernel_shapes)
    for name, total in per_op.items():
        kind = kinds.get(name, "outside network")
        seconds[kind] += total / args.steps
        if kind == "conv weight grad" or "transpose(jvp(" in instructions.get(name, {}).get("op_name", ""):
            backward[kind] += total / args.steps
    step_seconds = statistics.median(wall)
    header = [
        f"jax {jax.__version__}, {os.cpu_count()} CPUs; XLA_FLAGS {os.environ['XLA_FLAGS']}",
        f"config {args.config} {' '.join(args.overrides)}; batch {args.batch_size}; load {load_before} -> {load_after}",
        f"step {step_seconds * 1e3:.1f} ms untraced (median of {args.steps}); compile {compile_seconds:.1f} s; "
        f"{events / args.steps:.0f} thunks per step summing to {sum(seconds.values()) * 1e3:.1f} ms",
    ]
    columns = {"ms/step": ("ms_per_step", seconds), "of which bwd": ("backward_ms_per_step", backward)}
    print_profile(args, header=header, load=(load_before[0], load_after[0]), step_seconds=step_seconds,
                  columns=columns, facts={"jax": jax.__version__, "thunks_per_step": events / args.steps})  # fmt: skip


if __name__ == "__main__":
    main()
