"""FID reference statistics: Inception pool_3 mean and covariance of a dataset split, cached as `.npz`.

A cache file is `<cache_dir>/<dataset>_<split>_<weights8>.npz` with keys `mu`
[2048] and `sigma` [2048, 2048] (float64, the layout of TTUR's published
statistics), where <weights8> is the first 8 hex digits of `params_fingerprint`
of the Inception params. Split names with characters other than letters,
digits, `.` and `-` (e.g. `train[:10%]`) have them replaced by `_` and get
`-<sha8 of the split>` appended, so distinct splits never share a file.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import flax.traverse_util
import numpy as np
from tqdm.auto import tqdm

from jaxdiff.checks import is_int
from jaxdiff import data
from jaxdiff.config.defaults import DATASETS, default_config
from jaxdiff.errors import DataError, MissingDataError, UsageError
from jaxdiff.evaluation.fid import ActivationStatistics, load_statistics, save_statistics
from jaxdiff.evaluation.inception import POOL3_FEATURES, inception_features
from jaxdiff.evaluation.inception_weights import check_params, default_cache_dir

_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9.-]")


def default_statistics_dir() -> Path:
    """`<cache>/jaxdiff/fid_statistics` (<cache> is $XDG_CACHE_HOME or ~/.cache)."""
    return default_cache_dir() / "fid_statistics"


def params_fingerprint(params) -> str:
    """SHA-256 (hex) of Inception params: every leaf's path, dtype, shape and bytes, in path order."""
    digest = hashlib.sha256()
    for path, leaf in sorted(flax.traverse_util.flatten_dict(params, sep="/").items()):
        value = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{path}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def statistics_name(dataset: str, split: str, params) -> str:
    """`<dataset>_<split>_<weights8>`: the cache file's name without `.npz`."""
    safe_split = _UNSAFE_IN_NAME.sub("_", split)
    if safe_split != split:
        safe_split += "-" + hashlib.sha256(split.encode()).hexdigest()[:8]
    return f"{dataset}_{safe_split}_{params_fingerprint(params)[:8]}"


def _check_pool3(mu: np.ndarray, sigma: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    if mu.shape != (POOL3_FEATURES,):
        raise DataError(
            f"{source}: not Inception pool_3 statistics: mu has shape {mu.shape}, sigma {sigma.shape}; "
            f"expected ({POOL3_FEATURES},) and ({POOL3_FEATURES}, {POOL3_FEATURES})"
        )
    return mu, sigma


def load_reference(path_or_name: os.PathLike | str, *, cache_dir: os.PathLike | str | None = None):
    """(mu [2048], sigma [2048, 2048]) float64 from a statistics `.npz` (keys `mu`, `sigma`).

    `path_or_name` is a file (ours or published, e.g. TTUR's `fid_stats_cifar10_train.npz`)
    or a name in `cache_dir` (default `default_statistics_dir()`): `cifar10_train_<weights8>`,
    or `cifar10_train` when statistics for a single set of weights are cached.
    Wrong keys or shapes raise ValueError; nothing found raises FileNotFoundError.
    """
    path = Path(path_or_name)
    if not path.is_file():
        directory = Path(cache_dir) if cache_dir is not None else default_statistics_dir()
        exact = directory / f"{path_or_name}.npz"
        candidates = [exact] if exact.is_file() else sorted(directory.glob(f"{path_or_name}_{'[0-9a-f]' * 8}.npz"))
        if not candidates:
            raise MissingDataError(
                f"no statistics file {path_or_name!r}, and no {path_or_name}[_<weights8>].npz in {directory}; "
                "compute them with jaxdiff.evaluation.reference.dataset_statistics"
            )
        if len(candidates) > 1:
            raise DataError(
                f"{path_or_name!r} matches statistics of several Inception weights in {directory}: "
                f"{[c.stem for c in candidates]}; name one of them"
            )
        path = candidates[0]
    mu, sigma = load_statistics(path)
    return _check_pool3(mu, sigma, str(path))


def dataset_statistics(
    dataset: str,
    split: str,
    *,
    inception_params,
    data_dir: str = "",
    batch_size: int = 50,
    cache_dir: os.PathLike | str | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu [2048], sigma [2048, 2048]) float64 of pool_3 features of every image of a split.

    `dataset` is a `jaxdiff.config.DATASETS` name other than `synthetic`, read with
    `data.load_dataset` (`split` and `data_dir` as in the `data` config). Images go
    through `inception_features` `batch_size` at a time in index order (the last batch
    padded, so one shape is compiled). The result is cached in `cache_dir` (default
    `default_statistics_dir()`) as `statistics_name(dataset, split, params).npz`; an
    existing file is returned without reading the dataset.
    """
    if dataset not in DATASETS or dataset == "synthetic":
        raise UsageError(f"dataset={dataset!r} must be one of {tuple(d for d in DATASETS if d != 'synthetic')}")
    if not is_int(batch_size) or batch_size <= 0:
        raise UsageError(f"batch_size must be a positive int, got {batch_size!r}")
    check_params(inception_params)
    directory = Path(cache_dir) if cache_dir is not None else default_statistics_dir()
    path = directory / f"{statistics_name(dataset, split, inception_params)}.npz"
    if path.is_file():
        return load_reference(path)

    data_config = default_config().data
    data_config.dataset, data_config.split, data_config.data_dir = dataset, split, data_dir
    source = data.load_dataset(data_config)
    if source.num_examples < 2:
        raise DataError(f"{dataset} split {split!r} has {source.num_examples} image(s); a covariance needs 2")

    statistics = ActivationStatistics()
    for start in tqdm(range(0, source.num_examples, batch_size), desc=f"{dataset} {split}", disable=not progress):
        count = min(batch_size, source.num_examples - start)
        images, _ = source.get(np.arange(start, start + count))
        padded = np.zeros((batch_size, *source.image_shape), np.uint8)
        padded[:count] = images
        pool_3, _ = inception_features(inception_params, padded)
        statistics.update(np.asarray(pool_3)[:count])

    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.partial-{os.getpid()}.npz")
    save_statistics(partial, statistics.mean, statistics.covariance)
    os.replace(partial, path)
    return statistics.mean, statistics.covariance
