"""Test-set bits/dim of a continuous-time model through the probability-flow ODE (`ode_bits_per_dim`),
batch by batch with resumable progress, as `likelihood.evaluate_bpd` does for the discrete bound.

Batch b holds images [b·B, (b+1)·B) of the source (the last one padded, the padding dropped) and uses
the key fold_in(jax.random.key(seed), b) for its dequantization noise and trace probe. After every batch
each process writes its per-image bits/dim to a progress file of its own for these settings; a rerun
with the same settings continues after the last finished batch and gives the same result.
"""

from __future__ import annotations


import jax

from jaxdiff.errors import UsageError
from jaxdiff.evaluation.likelihood import check_evaluation_args, resumable_mean
from jaxdiff.evaluation.ode_likelihood import DIVERGENCES, ode_bits_per_dim
from jaxdiff.sharding import local_mesh


def evaluate_ode_bpd(
    denoiser, process, source, *, batch_size: int, out_path, seed: int = 0, num_images: int | None = None,
    divergence: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5, centered: bool = True,
    progress: bool = True,
) -> tuple[float, float]:  # fmt: skip
    """(mean bits/dim, its standard error) of the first `num_images` images of `source` under the
    model `denoiser(x, sigma)` (EDM's D) on `process`, of data in [-1, 1] or, when not `centered`, in
    [0, 1]; process 0 writes the result as JSON to `out_path`.

    The standard error is std(per-image bits/dim, ddof=1)/sqrt(N): it covers the images, the
    dequantization and the trace estimator together (NaN for one image). The settings that identify a
    progress file do not include the model: use a new `out_path` for another checkpoint.
    """
    if divergence not in DIVERGENCES:
        raise UsageError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    mesh = local_mesh()
    num_images = check_evaluation_args(source, batch_size, num_images, mesh.devices.size)
    identity = {
        "source": source.name, "image_shape": list(source.image_shape), "estimator": "probability-flow ODE",
        "process": type(process).__name__, "process_params": [float(v) for v in jax.tree.leaves(process)],
        "num_images": num_images, "batch_size": int(batch_size), "seed": int(seed), "divergence": divergence,
        "rtol": float(rtol), "atol": float(atol), "centered": bool(centered), "process_count": jax.process_count(),
    }  # fmt: skip

    def per_image_bpd(images, key):
        bpd, _ = ode_bits_per_dim(denoiser, process, images, key, centered=centered, divergence=divergence,
                                  rtol=rtol, atol=atol)  # fmt: skip
        return bpd

    return resumable_mean(per_image_bpd, source, mesh, batch_size=batch_size, num_images=num_images,
                          identity=identity, out_path=out_path, seed=seed, progress=progress,
                          desc="bits/dim (ODE)")  # fmt: skip
