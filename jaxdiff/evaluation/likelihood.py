"""Test-set bits/dim: the DDPM variational bound, exact (T model calls) or stratified (K calls).

Conventions: images come in as uint8 NHWC [B, H, W, C] and are scaled by
x/127.5 − 1; `t` is the 0-based step, 0..T-1; `denoise_fn(x_t, t)` returns the
model output for x_t float32 [B, H, W, C] and t int32 [B]. Every bits/dim value
is an average over the H·W·C dimensions of one image (shape [B]).

The bound of one image is prior + Σ_t L_t with L_0 the discretized decoder's
NLL and L_t (t > 0) KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) at a fresh draw
x_t ~ q(x_t|x_0) per step, as the official DDPM code computes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxdiff.checks import is_int
from jaxdiff.diffusion import MEAN_TYPES, VAR_TYPES, prior_bpd, q_sample, vb_terms_bpd
from jaxdiff.errors import ConfigError, DataError, UsageError
from jaxdiff.schedule import Schedule
from jaxdiff.sharding import batch_sharding, local_mesh

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]


def _check_types(mean_type: str, var_type: str) -> None:
    if mean_type not in MEAN_TYPES:
        raise ConfigError(f"unknown mean_type {mean_type!r}; expected one of {MEAN_TYPES}")
    if var_type not in VAR_TYPES:
        raise ConfigError(f"unknown var_type {var_type!r}; expected one of {VAR_TYPES}")


def _to_model_scale(images) -> Array:
    """uint8 [B, H, W, C] in [0, 255] -> float32 in [-1, 1]; anything else is a ValueError."""
    if np.ndim(images) != 4:
        raise UsageError(f"images must be NHWC [B, H, W, C], got shape {np.shape(images)}")
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if dtype != np.uint8:
        raise UsageError(f"images must be uint8 in [0, 255], got dtype {dtype}")
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _term(denoise_fn, schedule, x_start, t, noise, *, mean_type, var_type, clip_denoised) -> Array:
    """L_t in bits/dim [B] at x_t = q_sample(x_start, t, noise), t int32 [B]."""
    x_t = q_sample(schedule, x_start, t, noise)
    output = jnp.asarray(denoise_fn(x_t, t), jnp.float32)
    term, _ = vb_terms_bpd(
        schedule, output, x_start=x_start, x_t=x_t, t=t,
        mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
    )  # fmt: skip
    return term


def bpd_terms(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    x_start,
    rng: Array,
    *,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
) -> dict[str, Array]:
    """The full variational bound of each image: T model calls, one `lax.scan` over t = T-1..0.

    x_start: uint8 [B, H, W, C]. The noise of step t is
    `jax.random.normal(jax.random.fold_in(rng, t), (B, H, W, C), float32)`.
    Returns `total` [B] (prior + Σ_t L_t), `prior` [B] (KL(q(x_T|x_0) ‖ N(0, I)))
    and `terms` [B, T] (terms[:, t] = L_t), all in bits/dim.
    """
    _check_types(mean_type, var_type)
    x0 = _to_model_scale(x_start)
    batch = x0.shape[0]

    def step(_, t):
        noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape, jnp.float32)
        t_batch = jnp.full((batch,), t, jnp.int32)
        term = _term(
            denoise_fn, schedule, x0, t_batch, noise,
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        )  # fmt: skip
        return None, term

    steps = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, terms_reversed = jax.lax.scan(step, None, steps)
    terms = terms_reversed[::-1].T
    prior = prior_bpd(schedule, x0)
    return {"total": jnp.sum(terms, axis=1) + prior, "prior": prior, "terms": terms}


def strata(num_timesteps: int, num_t: int) -> np.ndarray:
    """Edges [K+1] of K strata of [0, T): stratum k is [edges[k], edges[k+1]), edges[k] = ⌊k·T/K⌋.

    The strata are equal when K divides T, and differ by at most one step otherwise.
    """
    if not is_int(num_t) or not 2 <= num_t <= num_timesteps:
        raise UsageError(f"num_t={num_t!r} must be an int in [2, T={num_timesteps}]")
    return np.arange(num_t + 1) * num_timesteps // num_t


def _collapsed_strata_groups(num_t: int) -> np.ndarray:
    """Group index of each stratum: pairs (0, 1), (2, 3), ...; with K odd the last group is a triple."""
    return np.minimum(np.arange(num_t) // 2, num_t // 2 - 1)


def stratified_bpd(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    x_start,
    rng: Array,
    *,
    num_t: int,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
) -> dict[str, Array]:
    """An unbiased estimate of `bpd_terms`' total from K = `num_t` model calls per image.

    Each image draws one t_k uniformly from each stratum k of `strata(T, K)` (n_k steps)
    and a fresh x_t; the estimate is prior + Σ_k n_k·L_{t_k} (= prior + T·mean_k L_{t_k}
    for equal strata). Randomness: `t_key, noise_key = split(rng)`; t = randint(t_key,
    (B, K)) within the strata; the noise of stratum k is normal(fold_in(noise_key, k), x.shape).

    `stderr` [B] is the collapsed-strata standard error (Cochran): with y_k = n_k·L_{t_k}
    and strata grouped in pairs (a triple last when K is odd), variance
    Σ_groups G/(G−1)·Σ_{k in group} (y_k − mean_group y)². Its expectation is at least the
    estimator's variance (conservative by the spread of the grouped strata's means).
    Returns `total`, `stderr`, `prior` [B] and the draws `t`, `terms` [B, K] (L_{t_k}), bits/dim.
    """
    _check_types(mean_type, var_type)
    edges = strata(schedule.num_timesteps, num_t)
    x0 = _to_model_scale(x_start)
    batch = x0.shape[0]
    t_key, noise_key = jax.random.split(rng)
    t = jax.random.randint(t_key, (batch, num_t), edges[:-1], edges[1:], dtype=jnp.int32)

    def step(_, row):
        k, t_k = row
        noise = jax.random.normal(jax.random.fold_in(noise_key, k), x0.shape, jnp.float32)
        term = _term(
            denoise_fn, schedule, x0, t_k, noise,
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        )  # fmt: skip
        return None, term

    _, terms = jax.lax.scan(step, None, (jnp.arange(num_t, dtype=jnp.int32), t.T))
    terms = terms.T
    prior = prior_bpd(schedule, x0)
    weighted = terms * jnp.asarray(np.diff(edges), jnp.float32)

    groups = _collapsed_strata_groups(num_t)
    sizes = np.bincount(groups).astype(np.float32)
    group_means = jax.ops.segment_sum(weighted.T, groups, num_segments=sizes.size).T / sizes
    deviations = weighted - group_means[:, groups]
    variance = jnp.sum(deviations**2 * (sizes / (sizes - 1.0))[groups], axis=1)
    return {
        "total": prior + jnp.sum(weighted, axis=1),
        "stderr": jnp.sqrt(variance),
        "prior": prior,
        "t": t,
        "terms": terms,
    }


# Test-set evaluation


def progress_path(out_path: os.PathLike | str, identity: dict, process_index: int) -> Path:
    """Where process p keeps its progress on the evaluation `identity` (its settings, see `_identity`):
    `<out_path>.progress-<12 hex digits of the settings' SHA-256>-<p>.json`, so each setting has its own file."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Path(f"{os.fspath(out_path)}.progress-{key}-{process_index}.json")


def _write_json_atomically(path: Path, content: dict) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(content), encoding="utf-8")
    os.replace(partial, path)


def _identity(source, schedule: Schedule, **arguments) -> dict:
    """What a progress file must match to be resumed: the source, the schedule and the arguments."""
    return {
        "source": source.name,
        "image_shape": list(source.image_shape),
        "num_timesteps": schedule.num_timesteps,
        "betas_sha256": hashlib.sha256(np.asarray(schedule.betas, np.float32).tobytes()).hexdigest(),
        **arguments,
    }


def _load_progress(path: Path, identity: dict) -> list[float]:
    """Per-image totals of the batches finished earlier (none if `path` does not exist)."""
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        totals, saved_identity = saved["totals"], saved["identity"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"progress file {path} is unreadable ({err}); delete it to start this evaluation over") from None
    if saved_identity != identity:
        raise DataError(f"progress file {path} belongs to another evaluation; delete it to start this one over")
    return totals


def _finished_batches(num_totals: int, images_per_batch: list[int], path: Path) -> int:
    """How many of this process's batches the `num_totals` saved totals cover."""
    finished = np.cumsum([0] + images_per_batch)
    if num_totals not in finished:
        raise DataError(
            f"progress file {path} holds {num_totals} totals, not a whole number of batches; delete it to start over"
        )
    return int(np.flatnonzero(finished == num_totals)[0])


def check_evaluation_args(source, batch_size, num_images, num_devices) -> int:
    """Validates the arguments of `evaluate_bpd`; returns the number of images."""
    if not is_int(batch_size) or batch_size <= 0:
        raise UsageError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size % num_devices:
        raise UsageError(f"batch_size={batch_size} is not divisible by this process's {num_devices} devices")
    if len(source.image_shape) != 3:
        raise UsageError(f"source images must be (H, W, C), got image_shape {source.image_shape}")
    if num_images is None:
        return source.num_examples
    if not is_int(num_images):
        raise UsageError(f"num_images must be an int or None, got {num_images!r}")
    if not 1 <= num_images <= source.num_examples:
        raise UsageError(f"num_images={num_images} must lie in [1, {source.num_examples}] (the source's size)")
    return int(num_images)


def _per_image_totals(denoise_fn, schedule, *, num_t, mean_type, var_type, clip_denoised) -> Callable:
    """A jitted (images uint8 [B, H, W, C], rng) -> total [B]: `bpd_terms`, or `stratified_bpd` with `num_t`."""
    kwargs = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
    if num_t is None:
        estimate = functools.partial(bpd_terms, denoise_fn, schedule, **kwargs)
    else:
        estimate = functools.partial(stratified_bpd, denoise_fn, schedule, num_t=num_t, **kwargs)
    return jax.jit(lambda images, rng: estimate(images, rng)["total"])


def _gather_totals(local_totals: list[float], *, batches_per_process: int, batch_size: int, num_images: int):
    """All processes' per-image totals in image order, float64 [num_images].

    Process p holds global batches p, p + P, ...; each pads its list with NaN to
    batches_per_process·B, so the gathered [P, K, B] read as [K, P, B] is in batch order.
    """
    padded = np.full(batches_per_process * batch_size, np.nan, np.float32)
    padded[: len(local_totals)] = local_totals
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    in_order = gathered.reshape(-1, batches_per_process, batch_size).transpose(1, 0, 2).reshape(-1)
    return in_order[:num_images].astype(np.float64)


def evaluate_bpd(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    source,
    *,
    batch_size: int,
    out_path: os.PathLike | str,
    seed: int = 0,
    num_images: int | None = None,
    num_t: int | None = None,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
    progress: bool = True,
) -> tuple[float, float]:
    """(mean bits/dim, its standard error) over the first `num_images` images of `source`.

    `source` is a `jaxdiff.data` source (e.g. `load_dataset` with split "test"). Batch b
    holds images [b·B, (b+1)·B) (the last one padded, the padding dropped) and uses the key
    `fold_in(jax.random.key(seed), b)`: the full bound (`bpd_terms`), or with `num_t` the
    stratified estimate (`stratified_bpd`). The batch is split over this process's devices
    (a 1-D mesh), so `batch_size` must be divisible by their number. The standard error is
    std(per-image totals, ddof=1)/sqrt(N) (NaN for one image).

    Resuming: after every batch each process writes its per-image totals so far to
    `progress_path(out_path, identity, p)`, a file of its own for each setting (source,
    schedule, arguments); a rerun with the same settings continues after the last finished
    batch and gives the same result, one with other settings starts its own file. The
    settings do not include the model: use a new `out_path` for another checkpoint.

    Multi-host: process p of P evaluates batches p, p + P, ... on its own devices; the
    totals are gathered from all processes at the end (every process must call this).
    Process 0 writes the result as JSON to `out_path`.
    """
    _check_types(mean_type, var_type)
    if num_t is not None:
        strata(schedule.num_timesteps, num_t)
    mesh = local_mesh()
    num_images = check_evaluation_args(source, batch_size, num_images, mesh.devices.size)
    identity = _identity(
        source, schedule, num_images=num_images, batch_size=int(batch_size), seed=int(seed), num_t=num_t,
        mean_type=mean_type, var_type=var_type, clip_denoised=bool(clip_denoised),
        process_count=jax.process_count(),
    )  # fmt: skip
    per_image_totals = _per_image_totals(
        denoise_fn, schedule, num_t=num_t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
    )
    return resumable_mean(per_image_totals, source, mesh, batch_size=batch_size, num_images=num_images,
                          identity=identity, out_path=out_path, seed=seed, progress=progress, desc="bits/dim")  # fmt: skip


def resumable_mean(
    per_image: Callable[[Array, Array], Array], source, mesh, *, batch_size: int, num_images: int, identity: dict,
    out_path: os.PathLike | str, seed: int, progress: bool, desc: str,
) -> tuple[float, float]:  # fmt: skip
    """(mean, standard error) of `per_image(images uint8 [B, ...] sharded over `mesh`, key) -> [B]` over the
    first `num_images` images of `source`, batch by batch with the progress file and multi-host split that
    `evaluate_bpd` describes; process 0 writes {"bpd", "stderr", **identity} as JSON to `out_path`."""
    process_index, process_count = jax.process_index(), jax.process_count()
    num_batches = -(-num_images // batch_size)
    my_batches = list(range(process_index, num_batches, process_count))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    progress_file = progress_path(out_path, identity, process_index)
    totals = _load_progress(progress_file, identity)
    images_per_batch = [min(batch_size, num_images - b * batch_size) for b in my_batches]
    done = _finished_batches(len(totals), images_per_batch, progress_file)
    sharding = batch_sharding(mesh)
    base_key = jax.random.key(seed)
    bar = tqdm(
        total=len(my_batches), initial=done, unit="batch", desc=desc,
        disable=not progress or process_index != 0, dynamic_ncols=True,
    )  # fmt: skip
    with bar:
        for b, count in zip(my_batches[done:], images_per_batch[done:]):
            images, _ = source.get(np.arange(b * batch_size, b * batch_size + count))
            padded = np.zeros((batch_size, *source.image_shape), np.uint8)
            padded[:count] = images
            values = per_image(jax.device_put(padded, sharding), jax.random.fold_in(base_key, b))
            totals.extend(np.asarray(values)[:count].astype(np.float64).tolist())
            _write_json_atomically(progress_file, {"identity": identity, "totals": totals})
            bar.update(1)
            bar.set_postfix(bpd=f"{np.mean(totals):.4f}")

    all_totals = _gather_totals(
        totals, batches_per_process=-(-num_batches // process_count), batch_size=batch_size, num_images=num_images
    )
    mean = float(np.mean(all_totals))
    stderr = float(np.std(all_totals, ddof=1) / math.sqrt(num_images)) if num_images > 1 else math.nan
    if process_index == 0:
        result = {"bpd": mean, "stderr": None if math.isnan(stderr) else stderr, **identity}
        _write_json_atomically(Path(out_path), result)
    return mean, stderr
