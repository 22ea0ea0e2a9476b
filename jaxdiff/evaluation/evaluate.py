"""The evaluation of a trained model (the body of `jaxdiff eval`): FID, IS, precision/recall, bits/dim.

Samples are drawn (or reused) as a sharded sampling job, scored shard by shard
with the FID Inception network (so the images never sit in memory at once),
and compared with the Inception statistics of the training split; bits/dim is
the variational bound on a held-out split (default "test"). Everything lands in
`workdir/eval_<step>.json` with the settings that produced it.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxdiff import data
from jaxdiff.config.defaults import default_config
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.evaluation import likelihood, reference
from jaxdiff.evaluation.ode_bpd import evaluate_ode_bpd
from jaxdiff.evaluation.fid import ActivationStatistics, frechet_distance, inception_score, precision_recall
from jaxdiff.evaluation.inception import inception_features
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.sampling.shard_jobs import sample_to_shards

METRICS = ("fid", "is", "pr", "bpd")


def parse_metrics(text: str) -> tuple[str, ...]:
    """'fid,is' -> ('fid', 'is'); unknown names are a ValueError."""
    metrics = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UsageError(f"unknown metrics {unknown or text!r}; choose from {METRICS}")
    return metrics


def _data_source(pipe: Pipeline, split: str, data_dir: str):
    data_config = default_config().data
    data_config.dataset, data_config.split, data_config.data_dir = pipe.config.data.dataset, split, data_dir
    return data.load_dataset(data_config, image_shape_for_synthetic=pipe.image_shape)


def _features(params, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """pool_3 [N, 2048] and logits [N, 1008] (None without a classifier) in fixed-size batches of
    min(batch_size, N) images, the last one padded."""
    batch_size = min(batch_size, len(images))
    pools, logits = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        padded = np.zeros((batch_size, *images.shape[1:]), np.uint8)
        padded[: len(chunk)] = chunk
        pool, logit = inception_features(params, padded)
        pools.append(np.asarray(pool, np.float64)[: len(chunk)])
        if logit is not None:
            logits.append(np.asarray(logit, np.float64)[: len(chunk)])
    return np.concatenate(pools), (np.concatenate(logits) if logits else None)


def sample_quality(
    pipe: Pipeline, samples_dir: str, *, metrics: tuple[str, ...], inception_params, reference_stats,
    real_images: np.ndarray | None, inception_batch: int = 50, progress: bool = True, **job,
) -> dict:  # fmt: skip
    """FID / IS / precision-recall of the job's samples (drawn into `samples_dir` unless already there).

    `job` holds `sample_to_shards`' settings (num_images, shard_size, seed, sampler, steps, ...).
    """
    shards = sample_to_shards(pipe, samples_dir, progress=progress, **job)
    statistics, logits, fake_features = ActivationStatistics(), [], []
    started = time.perf_counter()
    for path in tqdm(shards, desc="inception", unit="shard", disable=not progress, dynamic_ncols=True):
        with np.load(path, allow_pickle=False) as shard:
            pool, logit = _features(inception_params, shard["images"], inception_batch)
        statistics.update(pool)
        if logit is not None:
            logits.append(logit)
        if "pr" in metrics:
            fake_features.append(pool)
    results = {"num_samples": statistics.count, "inception_seconds": time.perf_counter() - started}
    if "fid" in metrics:
        results["fid"] = frechet_distance(statistics.mean, statistics.covariance, *reference_stats)
    if "is" in metrics:
        if not logits:
            raise WeightsError("IS needs Inception weights with the 1008-way classifier (pytorch-fid's .pth)")
        results["is_mean"], results["is_std"] = inception_score(np.concatenate(logits), splits=10)
    if "pr" in metrics:
        real, _ = _features(inception_params, real_images, inception_batch)
        results["precision"], results["recall"] = precision_recall(real, np.concatenate(fake_features), k=3)
    return results


def _vlb_bpd(pipe: Pipeline, load_source, *, batch_size, seed, num_images, num_t, progress, out_path):
    """The discrete family's bits/dim: the variational bound, in full or from `num_t` stratified t draws of the
    data of `load_source()`."""
    dc = pipe.config.diffusion
    mean, stderr = likelihood.evaluate_bpd(
        pipe.family.denoiser(pipe.model, pipe.params), pipe.family.schedule, load_source(), batch_size=batch_size,
        out_path=out_path, seed=seed, num_images=num_images, num_t=num_t, mean_type=dc.mean_type,
        var_type=dc.var_type, progress=progress,
    )  # fmt: skip
    return mean, stderr, dict(bpd_num_t=num_t, bpd_estimator="stratified" if num_t else "full bound")


def _ode_bpd(pipe: Pipeline, load_source, *, batch_size, seed, num_images, num_t, progress, out_path):
    """The continuous family's bits/dim of the data of `load_source()`: the probability-flow ODE's likelihood with
    config.sampling's tolerances."""
    if num_t:
        raise UsageError(f"bpd_num_t={num_t}: continuous-time models' bits/dim come from the ODE, not from t draws")
    sc = pipe.config.sampling
    mean, stderr = evaluate_ode_bpd(
        pipe.family.denoiser(pipe.model, pipe.params), pipe.family.process, load_source(), batch_size=batch_size,
        seed=seed, num_images=num_images, out_path=out_path, progress=progress, rtol=sc.rtol, atol=sc.atol,
        centered=pipe.config.data.centered,
    )  # fmt: skip
    return mean, stderr, dict(bpd_estimator="probability-flow ODE", rtol=sc.rtol, atol=sc.atol)


# The bits/dim of each `Family.likelihood`: (mean, stderr, settings to record).
_BITS_PER_DIM = {"vlb": _vlb_bpd, "ode": _ode_bpd}


def evaluate(
    pipe: Pipeline, workdir: str, *, metrics: tuple[str, ...], num_samples: int = 50_000, sampler: str = "ddpm",
    steps: int | None = None, seed: int = 0, shard_size: int = 1000, samples_dir: str | None = None,
    inception_params=None, inception_weights_sha256: str | None = None, reference_path: str | None = None,
    data_dir: str = "", inception_batch: int = 50, bpd_split: str | None = None, bpd_batch_size: int = 64,
    bpd_num_images: int | None = None, bpd_num_t: int | None = None, progress: bool = True,
) -> dict:  # fmt: skip
    """Score `pipe` on `metrics` and write `workdir/eval_<step>.json`; returns its content.

    Bits/dim is measured on `bpd_split` (default "test", the held-out split) of the model's dataset, for
    pixel-space models only: a model of an autoencoder's latents has no likelihood of the images.
    """
    if "bpd" in metrics and pipe.autoencoder is not None:
        raise UsageError(f"bits/dim is the likelihood of a pixel-space model; the model at {workdir!r} draws an "
                         "autoencoder's latents (its images have no likelihood): use fid, is or pr")  # fmt: skip
    bpd_split = bpd_split or "test"
    results: dict = {}
    settings = dict(metrics=list(metrics), checkpoint_step=pipe.step, dataset=pipe.config.data.dataset)
    quality = [m for m in metrics if m != "bpd"]
    if quality:
        if inception_params is None:
            raise WeightsError("FID/IS/PR need the Inception weights (inception_params)")
        samples_dir = samples_dir or os.path.join(
            workdir, f"eval_samples_step{pipe.step}_{sampler}_{steps or 'all'}_seed{seed}"
        )
        if reference_path:
            reference_stats = reference.load_reference(reference_path)
        else:
            reference_stats = reference.dataset_statistics(
                pipe.config.data.dataset, "train", inception_params=inception_params, data_dir=data_dir,
                batch_size=inception_batch, progress=progress,
            )  # fmt: skip
        real_images = None
        if "pr" in quality:
            source = _data_source(pipe, "train", data_dir)
            real_images = source.get(np.arange(min(num_samples, source.num_examples)))[0]
        results.update(sample_quality(
            pipe, samples_dir, metrics=tuple(quality), inception_params=inception_params,
            reference_stats=reference_stats, real_images=real_images, inception_batch=inception_batch,
            num_images=num_samples,
            shard_size=shard_size, seed=seed, sampler=sampler, steps=steps, progress=progress,
        ))  # fmt: skip
        settings.update(num_samples=num_samples, sampler=sampler, steps=steps, seed=seed, samples_dir=samples_dir,
                        reference=reference_path or f"{pipe.config.data.dataset} train split",
                        inception_weights_sha256=inception_weights_sha256)  # fmt: skip
    if "bpd" in metrics:
        estimate = _BITS_PER_DIM[pipe.family.likelihood]
        mean, stderr, bpd_settings = estimate(
            pipe, lambda: _data_source(pipe, bpd_split, data_dir), batch_size=bpd_batch_size, seed=seed,
            num_images=bpd_num_images, num_t=bpd_num_t, progress=progress,
            out_path=os.path.join(workdir, f"bpd_step{pipe.step}_{bpd_split}.json"),
        )  # fmt: skip
        results.update(bpd=mean, bpd_stderr=stderr)
        settings.update(bpd_split=bpd_split, bpd_num_images=bpd_num_images, **bpd_settings)
    report = {"results": results, "settings": settings}
    if jax.process_index() == 0:
        path = os.path.join(workdir, f"eval_{pipe.step}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=float)
        os.replace(path + ".tmp", path)
    return report

