"""Softmax attention on CPU at the shapes of the large models: jaxdiff's CPU path (one head at a time, queries in
blocks), XLA's whole attention (`jax.nn.dot_product_attention`, as accelerators run it) and PyTorch's
`scaled_dot_product_attention` (its fused CPU kernel), alternated in one process.

    python benchmarks/attention_cpu.py [--repeats 3] [--dtype float32|bfloat16] [--grad]

Shapes (batch, queries, keys, heads, head dim): SD 1.5's U-Net self- and cross-attention at 64² latents (4,096 and
1,024 tokens), its VAE's mid-block attention at 64² latents, Flux / SD3 joint attention at 1024² (4,096 image + 333
text tokens; 24 heads of 64), a DiT-XL/2 block at 256² (256 tokens). Inputs N(0, I) from NumPy seed 0; `--grad`
times the gradient of sum(out²) with respect to q, k, v instead (no PyTorch column). Each cell is the best of
--repeats calls after a first untimed one; the last columns are XLA's temporaries of each compiled program and the
largest difference from XLA's whole attention relative to its largest value. Prints a table and one line `JSON
{...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jaxdiff.models.layers import multi_head_attention, whole_attention  # noqa: E402
from jaxdiff.xla_options import inference_jit  # noqa: E402
from timing import timed_calls  # noqa: E402  (benchmarks/)

SHAPES = {
    "SD 1.5 attn1, 64² latents": (2, 4096, 4096, 8, 40),
    "SD 1.5 attn1, 32² level": (2, 1024, 1024, 8, 80),
    "SD 1.5 attn2 (text), 64²": (2, 4096, 77, 8, 40),
    "SD 1.5 VAE mid-block, 64²": (1, 4096, 4096, 1, 512),
    "Flux / SD3 joint, 1024²": (2, 4429, 4429, 24, 64),
    "DiT-XL/2 block, 256²": (2, 256, 256, 16, 72),
}


def compiled(grad: bool, q, k, v):
    """The compiled attention (or its gradient) as the context it is called in traces it."""
    if not grad:
        return inference_jit(lambda q, k, v: multi_head_attention(q, k, v)).lower(q, k, v).compile()
    loss = lambda q, k, v: jnp.sum(multi_head_attention(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()


def torch_seconds(arrays: list[np.ndarray], repeats: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    q, k, v = (torch.from_numpy(a.copy()).permute(0, 2, 1, 3) for a in arrays)  # [B, heads, N, D]
    with torch.inference_mode():
        return min(timed_calls(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats))


def measure(shape: tuple[int, ...], dtype: str, grad: bool, repeats: int) -> dict:
    b, n, m, heads, dim = shape
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((b, length, heads, dim), dtype=np.float32) for length in (n, m, m)]
    q, k, v = (jnp.asarray(a, dtype) for a in arrays)
    ours = compiled(grad, q, k, v)
    with whole_attention():
        whole = compiled(grad, q, k, v)
    reference = np.asarray(jax.tree_util.tree_leaves(whole(q, k, v))[0], np.float32)
    difference = np.max(np.abs(np.asarray(jax.tree_util.tree_leaves(ours(q, k, v))[0], np.float32) - reference))
    seconds = {name: min(timed_calls(lambda: jax.block_until_ready(program(q, k, v)), repeats))
               for name, program in (("jaxdiff", ours), ("xla_whole", whole))}  # fmt: skip
    if not grad and dtype == "float32":
        seconds["torch_sdpa"] = torch_seconds(arrays, repeats)
    return {"shape": list(shape), "seconds": seconds,
            "temp_mib": {"jaxdiff": ours.memory_analysis().temp_size_in_bytes / 2**20,
                         "xla_whole": whole.memory_analysis().temp_size_in_bytes / 2**20},
            "max_relative_difference": float(difference / np.max(np.abs(reference)))}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--grad", action="store_true", help="time the gradient with respect to q, k, v")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    load = os.getloadavg()[0]
    rows = {name: measure(shape, args.dtype, args.grad, args.repeats) for name, shape in SHAPES.items()}
    results = {"jax": jax.__version__, "backend": jax.default_backend(), "dtype": args.dtype, "grad": args.grad,
               "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "load": [load, os.getloadavg()[0]], "rows": rows}  # fmt: skip
    print(f"jax {jax.__version__} ({jax.default_backend()}), {args.dtype}{', gradient' if args.grad else ''}, best of "
          f"{args.repeats}; load {load:.2f} -> {results['load'][1]:.2f}")  # fmt: skip
    print(f"{'shape':<28}{'jaxdiff s':>11}{'XLA whole s':>13}{'PyTorch s':>11}{'temp MiB':>16}{'rel. diff':>11}")
    for name, row in rows.items():
        s, temp = row["seconds"], row["temp_mib"]
        torch_cell = f"{s['torch_sdpa']:.4f}" if s.get("torch_sdpa") is not None else "-"
        print(f"{name:<28}{s['jaxdiff']:>11.4f}{s['xla_whole']:>13.4f}{torch_cell:>11}"
              f"{temp['jaxdiff']:>7.0f} /{temp['xla_whole']:>7.0f}{row['max_relative_difference']:>11.1e}")  # fmt: skip
    print("JSON " + json.dumps(results))
    return results


if __name__ == "__main__":
    main()
