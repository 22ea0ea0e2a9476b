"""A latent cache: a dataset encoded once by a frozen autoencoder, read instead of the images (`data.latent_cache`).

A cache is a folder:
  header.json   {"format": FORMAT, "version": VERSION, "autoencoder": {"path", "step", "scaling_factor", "sha256"
                of its weights}, "dataset": {"dataset", "data_dir", "split", "num_examples", "class_names"},
                "image_size", "latent_shape": [h, w, C], "flips": 1 or 2}
  moments.npy   float32 [N, F, 2, h, w, C]: for example i and orientation f (0 as read; 1, when F = 2, mirrored
                left-right before encoding) the mean and the log-variance (clipped to [−30, 20]) of the autoencoder's
                posterior q(z | x) in the autoencoder's own scale (not shifted nor scaled)
  label.npy     int32 [N]
Keeping the posterior rather than one draw lets training draw z = mean + exp(logvar / 2)·ε afresh each step, as
DiT's `train.py` does on the fly. A cache is written in `<folder>.partial` (with `progress.json`, the number of
examples written) and renamed to `<folder>` when complete, so that a folder at the final path is always whole;
`CacheWriter` resumes a partial one written for the same header and refuses one written for another.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxdiff.data.sources import check_indices
from jaxdiff.errors import DataError, MissingDataError

FORMAT = "jaxdiff-latent-cache"
VERSION = 1
HEADER_FILE, MOMENTS_FILE, LABEL_FILE, PROGRESS_FILE = "header.json", "moments.npy", "label.npy", "progress.json"
PARTIAL_SUFFIX = ".partial"


def _write_json(path: str, value: dict) -> None:
    """`value` as JSON at `path`, written to a temporary file and renamed over it."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        json.dump(value, stream, indent=1)
    os.replace(temporary, path)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as stream:
            value = json.load(stream)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable latent-cache file ({err})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a latent-cache file (a JSON object)")
    return value


def read_header(directory: str) -> dict:
    """The header of the complete cache `directory`; one-line errors for a missing, partial or foreign folder."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        partial = os.path.isdir(directory + PARTIAL_SUFFIX)
        hint = (f": only the partial {directory + PARTIAL_SUFFIX} exists, finish it by running `jaxdiff data encode` "
                "again") if partial else ": write it with `jaxdiff data encode --config CFG --out DIR`"  # fmt: skip
        raise MissingDataError(f"latent cache {directory} does not exist{hint}")
    header = _read_json(os.path.join(directory, HEADER_FILE))
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise DataError(f"{directory} is not a jaxdiff latent cache of version {VERSION} ({HEADER_FILE} has format "
                        f"{header.get('format')!r}, version {header.get('version')!r})")  # fmt: skip
    return header


@dataclasses.dataclass
class LatentCacheSource:
    """The examples of a complete cache: `get(indices)` gives (moments float32 [n, F, 2, h, w, C], labels int32 [n]),
    memory-mapped from the files. `image_shape` is the latents' (h, w, C); `header` the cache's header."""

    directory: str
    header: dict
    moments: np.ndarray
    labels: np.ndarray
    name: str = "latent_cache"

    @property
    def num_examples(self) -> int:
        return self.labels.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.header["latent_shape"])

    @property
    def num_classes(self) -> int:
        return len(self.header["dataset"]["class_names"])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.header["dataset"]["class_names"])

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = check_indices(indices, self.num_examples, self.name)
        return np.asarray(self.moments[indices], np.float32), np.asarray(self.labels[indices], np.int32)


def moments_shape(header: dict) -> tuple[int, ...]:
    """[N, F, 2, h, w, C] of a header's moments."""
    return (header["dataset"]["num_examples"], header["flips"], 2, *header["latent_shape"])


def load_latent_cache(directory: str) -> LatentCacheSource:
    """The complete cache `directory` (`read_header`), its arrays checked against the header."""
    directory = os.path.abspath(os.fspath(directory))
    header = read_header(directory)
    try:
        moments = np.load(os.path.join(directory, MOMENTS_FILE), mmap_mode="r", allow_pickle=False)
        labels = np.load(os.path.join(directory, LABEL_FILE), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"latent cache {directory}: cannot read its arrays ({err})") from None
    expected = moments_shape(header)
    if moments.shape != expected or moments.dtype != np.float32 or labels.shape != expected[:1]:
        raise DataError(f"latent cache {directory}: {MOMENTS_FILE} is {moments.dtype} {moments.shape} and {LABEL_FILE} "
                        f"{labels.shape}; its header says float32 {expected} and ({expected[0]},)")  # fmt: skip
    return LatentCacheSource(directory, header, moments, labels)


class CacheWriter:
    """Writes the cache `directory` for `header` in `<directory>.partial`: `done` examples are already there (0 for
    a fresh one; a partial folder written for the same header is resumed), `write(start, moments, labels)` stores
    rows [start, start + n) and records them, `finish()` renames the folder into place. A complete `directory`,
    or a partial one written for another header, is refused in one line."""

    def __init__(self, directory: str, header: dict):
        self.directory = os.path.abspath(os.fspath(directory))
        self.partial = self.directory + PARTIAL_SUFFIX
        self.header = header
        if os.path.exists(self.directory):
            raise DataError(f"{self.directory} already exists; give a new --out folder (a complete cache is never "
                            "overwritten)")  # fmt: skip
        shape = moments_shape(header)
        if os.path.isdir(self.partial):
            found = _read_json(os.path.join(self.partial, HEADER_FILE))
            if found != header:
                changed = sorted(key for key in {*found, *header} if found.get(key) != header.get(key))
                raise DataError(f"{self.partial} is a partial cache written for another {', '.join(changed)}; remove "
                                "it or give another --out folder")  # fmt: skip
            self.done = int(_read_json(os.path.join(self.partial, PROGRESS_FILE))["done"])
            mode = "r+"
        else:
            os.makedirs(self.partial)
            _write_json(os.path.join(self.partial, HEADER_FILE), header)
            self.done, mode = 0, "w+"
        open_memmap = np.lib.format.open_memmap
        kwargs = {"dtype": np.float32, "shape": shape} if mode == "w+" else {}
        self._moments = open_memmap(os.path.join(self.partial, MOMENTS_FILE), mode=mode, **kwargs)
        kwargs = {"dtype": np.int32, "shape": shape[:1]} if mode == "w+" else {}
        self._labels = open_memmap(os.path.join(self.partial, LABEL_FILE), mode=mode, **kwargs)
        if mode == "w+":
            _write_json(os.path.join(self.partial, PROGRESS_FILE), {"done": 0})

    def write(self, start: int, moments: np.ndarray, labels: np.ndarray) -> None:
        """Rows [start, start + n) (start must be `done`): moments float32 [n, F, 2, h, w, C], labels int32 [n];
        flushed to disk before `done` moves on."""
        if start != self.done:
            raise DataError(f"{self.partial}: rows are written in order; expected row {self.done}, got {start}")
        stop = start + len(labels)
        self._moments[start:stop] = moments
        self._labels[start:stop] = labels
        self._moments.flush()
        self._labels.flush()
        self.done = stop
        _write_json(os.path.join(self.partial, PROGRESS_FILE), {"done": stop})

    def finish(self) -> str:
        """Renames the complete partial folder to the cache's path; returns it."""
        total = self.header["dataset"]["num_examples"]
        if self.done != total:
            raise DataError(f"{self.partial}: {self.done} of {total} examples written; the cache is not complete")
        del self._moments, self._labels
        os.remove(os.path.join(self.partial, PROGRESS_FILE))
        os.replace(self.partial, self.directory)
        return self.directory
