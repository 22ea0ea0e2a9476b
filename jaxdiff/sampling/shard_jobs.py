"""Large sampling jobs written as `.npz` shards that survive interruption.

Shard k holds images [k·S, (k+1)·S) (the last one may be shorter) drawn with
rng fold_in(PRNGKey(seed), k): the same images `Pipeline.sample(seed=seed,
batch_size=S)` returns, whatever the devices or hosts. Process p of P draws
the shards k ≡ p (mod P) on its own devices. A shard is written to a
temporary file and renamed, so a complete file is a finished shard; a rerun
skips those. `manifest.json` records the settings; a rerun with other
settings into the same directory is refused.
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile

import jax
import numpy as np

from jaxdiff.errors import MissingDataError, UsageError
from jaxdiff.sampling.pipeline import Pipeline

MANIFEST = "manifest.json"


def shard_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"shard_{index:05d}.npz")


def _shard_is_complete(path: str, n: int, image_shape: tuple[int, int, int]) -> bool:
    if not os.path.exists(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as shard:
            return shard["images"].shape == (n, *image_shape) and shard["images"].dtype == np.uint8
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a truncated or foreign file
        return False


def _write_manifest(out_dir: str, manifest: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        differences = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in manifest.items() if saved.get(k) != v]
        if differences:
            raise UsageError(
                f"{out_dir} holds shards drawn with other settings ({'; '.join(differences)}); use another directory"
            )
        return
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, path)


def sample_to_shards(
    pipe: Pipeline, out_dir: str, *, num_images: int, shard_size: int, seed: int = 0, sampler: str = "ddpm",
    steps: int | None = None, eta: float = 0.0, spacing: str | None = None, class_label=None,
    guidance: float | None = None, progress: bool = True,
) -> list[str]:  # fmt: skip
    """Draw `num_images` into `out_dir/shard_#####.npz` (keys `images` uint8 NHWC, and `labels` for
    conditional models); returns the paths of all shards. Finished shards are kept, not redrawn. `guidance` None is
    the model's default (`config.sampling.guidance`), recorded as its value."""
    guidance = pipe.config.sampling.guidance if guidance is None else guidance
    if num_images < 1 or shard_size < 1:
        raise UsageError(f"num_images ({num_images}) and shard_size ({shard_size}) must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    manifest = dict(
        num_images=num_images, shard_size=shard_size, seed=seed, sampler=sampler, steps=steps, eta=eta,
        spacing=spacing, class_label=class_label, guidance=guidance, checkpoint_step=pipe.step,
        image_shape=list(pipe.image_shape),
    )  # fmt: skip
    _write_manifest(out_dir, manifest)
    num_shards = math.ceil(num_images / shard_size)
    sizes = [min(shard_size, num_images - k * shard_size) for k in range(num_shards)]
    mine = [k for k in range(jax.process_index(), num_shards, jax.process_count())]
    todo = [k for k in mine if not _shard_is_complete(shard_path(out_dir, k), sizes[k], pipe.image_shape)]
    key = jax.random.PRNGKey(seed)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(sizes[k] for k in mine), initial=sum(sizes[k] for k in mine if k not in todo),
                   unit="img", dynamic_ncols=True)  # fmt: skip
    started = time.perf_counter()
    try:
        for k in todo:
            x, labels, _ = pipe.sample_batch(
                sizes[k], jax.random.fold_in(key, k), sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                class_label=class_label, guidance=guidance,
            )  # fmt: skip
            arrays = {"images": x} if labels is None else {"images": x, "labels": labels}
            tmp = shard_path(out_dir, k) + ".tmp.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, shard_path(out_dir, k))
            if bar is not None:
                bar.update(sizes[k])
                bar.set_postfix(images_s=f"{bar.n / max(time.perf_counter() - started, 1e-9):.1f}")
    finally:
        if bar is not None:
            bar.close()
    return [shard_path(out_dir, k) for k in range(num_shards)]


def read_shards(out_dir: str) -> np.ndarray:
    """All images of a finished job, uint8 [N, H, W, C], in shard order; an incomplete job is an error."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        raise MissingDataError(f"{out_dir} holds no sampling job ({MANIFEST} missing)")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    num, size = manifest["num_images"], manifest["shard_size"]
    shape = tuple(manifest["image_shape"])
    parts = []
    for k in range(math.ceil(num / size)):
        n = min(size, num - k * size)
        if not _shard_is_complete(shard_path(out_dir, k), n, shape):
            raise MissingDataError(f"shard {k} of {out_dir} is missing or incomplete: rerun the sampling job")
        with np.load(shard_path(out_dir, k), allow_pickle=False) as shard:
            parts.append(shard["images"])
    return np.concatenate(parts)
