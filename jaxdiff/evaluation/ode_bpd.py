"""Test-set bits/dim of a continuous-time model through the probability-flow ODE (`ode_bits_per_dim`),
batch by batch with resumable progress, as `likelihood.evaluate_bpd` does for the discrete bound.

Batch b holds images [b·B, (b+1)·B) of the source (the last one padded, the padding dropped) and uses
the key fold_in(jax.random.key(seed), b) for its dequantization noise and trace probe. After every batch
each process writes its per-image bits/dim to a progress file of its own for these settings; a rerun
with the same settings continues after the last finished batch and gives the same result.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxdiff.evaluation.likelihood import (
    _check_evaluation_args,
    _finished_batches,
    _gather_totals,
    _load_progress,
    _write_json_atomically,
    progress_path,
)
from jaxdiff.evaluation.ode_likelihood import DIVERGENCES, ode_bits_per_dim
from jaxdiff.sharding import batch_sharding, local_mesh


def evaluate_ode_bpd(
    denoiser, process, source, *, batch_size: int, out_path, seed: int = 0, num_images: int | None = None,
    divergence: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5, progress: bool = True,
) -> tuple[float, float]:  # fmt: skip
    """(mean bits/dim, its standard error) of the first `num_images` images of `source` under the
    model `denoiser(x, sigma)` (EDM's D) on `process`; process 0 writes the result as JSON to `out_path`.

    The standard error is std(per-image bits/dim, ddof=1)/sqrt(N): it covers the images, the
    dequantization and the trace estimator together (NaN for one image). The settings that identify a
    progress file do not include the model: use a new `out_path` for another checkpoint.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    mesh = local_mesh()
    num_images = _check_evaluation_args(source, batch_size, num_images, mesh.devices.size)
    process_index, process_count = jax.process_index(), jax.process_count()
    num_batches = -(-num_images // batch_size)
    my_batches = list(range(process_index, num_batches, process_count))
    identity = {
        "source": source.name, "image_shape": list(source.image_shape), "estimator": "probability-flow ODE",
        "process": type(process).__name__, "process_params": [float(v) for v in jax.tree.leaves(process)],
        "num_images": num_images, "batch_size": int(batch_size), "seed": int(seed), "divergence": divergence,
        "rtol": float(rtol), "atol": float(atol), "process_count": process_count,
    }  # fmt: skip
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    progress_file = progress_path(out_path, identity, process_index)
    totals = _load_progress(progress_file, identity)
    images_per_batch = [min(batch_size, num_images - b * batch_size) for b in my_batches]
    done = _finished_batches(len(totals), images_per_batch, progress_file)

    sharding = batch_sharding(mesh)
    base_key = jax.random.key(seed)
    bar = tqdm(total=len(my_batches), initial=done, unit="batch", desc="bits/dim (ODE)",
               disable=not progress or process_index != 0, dynamic_ncols=True)  # fmt: skip
    with bar:
        for b, count in zip(my_batches[done:], images_per_batch[done:]):
            images, _ = source.get(np.arange(b * batch_size, b * batch_size + count))
            padded = np.zeros((batch_size, *source.image_shape), np.uint8)
            padded[:count] = images
            key = jax.random.fold_in(base_key, b)
            bpd, _ = ode_bits_per_dim(denoiser, process, jax.device_put(padded, sharding), key,
                                      divergence=divergence, rtol=rtol, atol=atol)  # fmt: skip
            totals.extend(np.asarray(bpd)[:count].astype(np.float64).tolist())
            _write_json_atomically(progress_file, {"identity": identity, "totals": totals})
            bar.update(1)
            bar.set_postfix(bpd=f"{np.mean(totals):.4f}")

    all_totals = _gather_totals(
        totals, batches_per_process=-(-num_batches // process_count), batch_size=batch_size, num_images=num_images
    )
    mean = float(np.mean(all_totals))
    stderr = float(np.std(all_totals, ddof=1) / math.sqrt(num_images)) if num_images > 1 else math.nan
    if process_index == 0:
        _write_json_atomically(Path(out_path), {"bpd": mean, "stderr": None if math.isnan(stderr) else stderr,
                                                **identity})  # fmt: skip
    return mean, stderr
