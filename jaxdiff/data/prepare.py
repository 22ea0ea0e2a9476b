"""Preparing CIFAR-10 as a TFDS array_record dataset without TensorFlow.

TFDS' own `cifar10` builder reads the archive through `tf.io.gfile` and encodes PNGs with TensorFlow.
`Cifar10WithoutTensorFlow` is that builder (same name, version, features, example keys, hence the same
example order) reading the original binary files with plain Python and encoding each image as PNG with
Pillow, so `tfds.data_source("cifar10", data_dir=...)` reads the result like a TFDS-built dataset.
Only the binary archive (`cifar-10-binary.tar.gz`) is read: the "python" archive is pickled, and
pickles are never loaded.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tarfile
from collections.abc import Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification.cifar import Cifar10

from jaxdiff.data.tfds_sources import check_random_access_format
from jaxdiff.errors import DataError, MissingDataError

CIFAR10_BINARY_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_LABELS_FILE = "batches.meta.txt"
CIFAR10_RECORD_BYTES = 1 + 32 * 32 * 3  # label byte, then the red, green and blue planes row-major
PREPARABLE = ("cifar10",)

log = logging.getLogger(__name__)


def read_cifar10_binary(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 32, 32, 3], labels uint8 [n]) of the bytes of CIFAR-10 binary batch file `name`."""
    records = np.frombuffer(raw, np.uint8)
    if records.size == 0 or records.size % CIFAR10_RECORD_BYTES:
        raise DataError(
            f"{name} holds {records.size} bytes, not a whole number of {CIFAR10_RECORD_BYTES}-byte CIFAR-10 records"
        )
    records = records.reshape(-1, CIFAR10_RECORD_BYTES)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), records[:, 0]


def _binary_folder(root: pathlib.Path) -> pathlib.Path | None:
    for folder in (root, root / CIFAR10_BINARY_FOLDER):
        if all((folder / name).is_file() for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)):
            return folder
    return None


def _archive_name(member: tarfile.TarInfo) -> str | None:
    """The file name of a CIFAR-10 binary-archive member (cifar-10-batches-bin/<name>), else None."""
    path = pathlib.PurePosixPath(member.name.lstrip("./"))
    return path.name if member.isfile() and path.parent.name == CIFAR10_BINARY_FOLDER else None


def _read_files(source: pathlib.Path, names: list[str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of those of `names` that exist, in that order, from the binary folder or (without
    extracting it) the tar archive `source`."""
    if source.is_dir():
        folder = _binary_folder(source)
        for name in names:
            if (folder / name).is_file():
                yield name, (folder / name).read_bytes()
        return
    found = {}
    with tarfile.open(source, "r:*") as tar:
        for member in tar:
            if _archive_name(member) in names:
                with tar.extractfile(member) as f:
                    found[_archive_name(member)] = f.read()
    for name in names:
        if name in found:
            yield name, found.pop(name)


class Cifar10WithoutTensorFlow(Cifar10, skip_registration=True):
    """TFDS' `cifar10` builder that needs no TensorFlow; `source` is the binary archive or its extracted folder
    (None: TFDS' download manager fetches and extracts the archive)."""

    name = "cifar10"

    def __init__(self, *, source: str | os.PathLike | None = None, **kwargs):
        self._source = None if source is None else pathlib.Path(source)
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        source = self._source or pathlib.Path(dl_manager.download_and_extract(self._cifar_info.url))
        for name, raw in _read_files(source, [CIFAR10_LABELS_FILE]):
            self.info.features["label"].names = [n for n in raw.decode("utf-8").split("\n") if n]
        return {
            tfds.Split.TRAIN: self._generate_examples("train_", _read_files(source, list(CIFAR10_TRAIN_FILES))),
            tfds.Split.TEST: self._generate_examples("test_", _read_files(source, [CIFAR10_TEST_FILE])),
        }

    def _generate_examples(self, split_prefix, files):
        """(index, example) in file order; TFDS shuffles by the index, as for its own builder."""
        index = 0
        for name, raw in files:
            images, labels = read_cifar10_binary(raw, name)
            for image, label in zip(images, labels):
                # the Image feature encodes a PIL image with Pillow (PNG), an array with TensorFlow
                image = PIL.Image.fromarray(image)
                yield index, {"id": f"{split_prefix}{index:05d}", "image": image, "label": int(label)}
                index += 1


def _source_file_sizes(path: pathlib.Path) -> dict[str, int]:
    """Sizes of the CIFAR-10 binary batch files found in folder or tar archive `path`, by file name."""
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    if path.is_dir():
        folder = path if (path / CIFAR10_TRAIN_FILES[0]).is_file() else path / CIFAR10_BINARY_FOLDER
        return {name: (folder / name).stat().st_size for name in names if (folder / name).is_file()}
    with tarfile.open(path, "r:*") as tar:
        return {_archive_name(m): m.size for m in tar if _archive_name(m) in names}


def _check_source(source: str | os.PathLike | None) -> None:
    """Checks that `source` holds every CIFAR-10 binary batch file, each a whole number of records."""
    if source is None:
        return
    path = pathlib.Path(source)
    if not path.exists():
        raise MissingDataError(
            f"source={os.fspath(source)!r} does not exist; give cifar-10-binary.tar.gz or its extracted folder"
        )
    if path.is_file() and not tarfile.is_tarfile(path):
        raise DataError(f"source={os.fspath(source)!r} is not a tar archive; give cifar-10-binary.tar.gz")
    sizes = _source_file_sizes(path)
    missing = [name for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if name not in sizes]
    if missing:
        raise DataError(
            f"source={os.fspath(source)!r} holds no CIFAR-10 binary files {missing} "
            f"(looked in it and in its {CIFAR10_BINARY_FOLDER}/)"
        )
    bad = [f"{name} ({size} bytes)" for name, size in sizes.items() if size == 0 or size % CIFAR10_RECORD_BYTES]
    if bad:
        raise DataError(
            f"source={os.fspath(source)!r}: {', '.join(bad)} not a whole number of "
            f"{CIFAR10_RECORD_BYTES}-byte CIFAR-10 records"
        )


def prepare_dataset(name: str, data_dir: str | os.PathLike | None, *, source: str | os.PathLike | None = None) -> str:
    """Writes dataset `name` ("cifar10") as TFDS array_record files under `data_dir`; returns that folder.

    `data_dir` None or "" is TFDS' default (~/tensorflow_datasets). `source`: the binary archive
    `cifar-10-binary.tar.gz` or its extracted folder (offline); None downloads the archive. A
    dataset already prepared there in array_record format is left as it is.
    """
    if name not in PREPARABLE:
        raise DataError(
            f"cannot prepare dataset {name!r}: jaxdiff prepares {PREPARABLE}; digits and synthetic need no "
            "preparation, and the 256x256 sets are built with TFDS: tfds build <name> --file_format=array_record"
        )
    _check_source(source)
    builder = Cifar10WithoutTensorFlow(source=source, data_dir=os.fspath(data_dir) if data_dir else None)
    if builder.is_prepared():
        check_random_access_format(name, builder)
        log.info("%s is already prepared in %s", name, builder.data_dir)
        return os.fspath(builder.data_dir)
    builder.download_and_prepare(file_format="array_record")
    return os.fspath(builder.data_dir)
