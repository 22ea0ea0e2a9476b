"""Datasets prepared by TFDS as array_record files, read through `tfds.data_source` (no TensorFlow).

CIFAR-10 (small) is read once into memory; the 256×256 sets are read on demand, each image
center-cropped and Lanczos-resized as in the DDPM/ProGAN LSUN preparation.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from jaxdiff.data.sources import ArraySource, check_indices
from jaxdiff.errors import DataError, MissingDataError

RESOLUTION_256 = 256
IN_MEMORY = {"cifar10": "cifar10"}  # our name -> TFDS name
RANDOM_ACCESS = {
    "celebahq256": "celeb_a_hq/256",
    "lsun_church256": "lsun/church_outdoor",
    "lsun_bedroom256": "lsun/bedroom",
    "lsun_cat256": "lsun/cat",
}


class DatasetNotFoundError(MissingDataError):
    """A dataset is not prepared (in a readable format) where it was looked for."""


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Crop the central square of a uint8 [H, W, C] image and Lanczos-resize it to [size, size, C].

    The crop starts at ((H - s) // 2, (W - s) // 2) with s = min(H, W); this is how
    the LSUN 256×256 training sets of DDPM (and ProGAN/StyleGAN) were made.
    """
    height, width = image.shape[:2]
    crop = min(height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    square = image[top : top + crop, left : left + crop]
    if crop == size:
        return np.ascontiguousarray(square)
    mode_image = PIL.Image.fromarray(square[..., 0] if square.shape[-1] == 1 else square)
    resized = np.asarray(mode_image.resize((size, size), PIL.Image.Resampling.LANCZOS))
    return resized.reshape(size, size, image.shape[-1])


@dataclasses.dataclass
class RandomAccessSource:
    """Images read on demand from a TFDS ArrayRecord data source, center-cropped and resized to `size`.

    Reading and decoding run in a thread pool (image decoding releases the GIL).
    The images carry no labels: labels are 0 and `num_classes` is 0.
    """

    name: str
    records: Sequence[dict[str, Any]]
    size: int
    channels: int
    num_threads: int = dataclasses.field(default_factory=lambda: min(32, os.cpu_count() or 1))
    num_classes: int = 0

    def __post_init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix=f"read-{self.name}")

    @property
    def num_examples(self) -> int:
        return len(self.records)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.channels)

    def _read(self, index: int) -> np.ndarray:
        return center_crop_resize(np.asarray(self.records[index]["image"]), self.size)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = check_indices(indices, self.num_examples, self.name)
        images = np.stack(list(self._pool.map(self._read, indices.tolist())))
        return images, np.zeros(len(indices), np.int32)


def _prepare_commands(dataset: str, data_dir: str) -> list[str]:
    """How to prepare `dataset` in `data_dir`, one line each."""
    tfds_name = {**IN_MEMORY, **RANDOM_ACCESS}[dataset]
    if dataset == "cifar10":
        return [
            "Prepare it (no TensorFlow needed; downloads the archive, or reads a local copy given by --source):",
            f"  jaxdiff data prepare cifar10 --data-dir {data_dir} [--source cifar-10-binary.tar.gz]",
        ]
    if dataset == "celebahq256":
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        return [
            "CelebA-HQ cannot be downloaded automatically. Obtain the archive data256x256.tar (the 30,000",
            "CelebA-HQ images at 256x256; see",
            "https://github.com/tkarras/progressive_growing_of_gans#preparing-datasets-for-training),",
            f"put it in the TFDS manual_dir {manual_dir}, then, with TensorFlow installed, run:",
            f"  tfds build {tfds_name} --data_dir={data_dir} --manual_dir={manual_dir} --file_format=array_record",
        ]
    return [
        "Prepare it once, with TensorFlow and tensorflow-io installed (TFDS reads the LSUN LMDB files with them),",
        "on a machine with internet access (then copy the data_dir over if needed):",
        f"  tfds build {tfds_name} --data_dir={data_dir} --file_format=array_record",
    ]


def not_prepared_error(dataset: str, builder) -> DatasetNotFoundError:
    data_dir = str(builder.data_dir_root)
    tfds_name = {**IN_MEMORY, **RANDOM_ACCESS}[dataset]
    lines = [
        f"dataset {dataset!r} (TFDS {tfds_name!r}) is not prepared in data_dir {data_dir} "
        f"(looked for {builder.data_dir}).",
        *_prepare_commands(dataset, data_dir),
        "Or set config.data.data_dir to the directory that already holds it.",
    ]
    return DatasetNotFoundError("\n".join(lines))


def check_random_access_format(dataset: str, builder) -> None:
    """Raises DatasetNotFoundError (one line, with both ways out) if the prepared `builder` has no array_record files."""
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" in formats:
        return
    version_dir = builder.data_dir
    fresh = " (jaxdiff data prepare cifar10 --data-dir NEW_DIR)" if dataset == "cifar10" else ""
    raise DatasetNotFoundError(
        f"dataset {dataset!r} in {version_dir} is in the {'/'.join(sorted(formats)) or 'tfrecord'} format, which "
        "jaxdiff cannot read (it reads array_record, without TensorFlow): convert it once with TensorFlow installed "
        f"(pip install tensorflow; tfds convert_format --dataset_version_dir={version_dir} "
        f"--out_file_format=array_record) or prepare it afresh in another data_dir{fresh}"
    )


def _data_source(dataset: str, data_config: ml_collections.ConfigDict):
    """(builder, records) of split `data_config.split` of `dataset` in `data_config.data_dir` ("" = TFDS' default)."""
    builder = tfds.builder({**IN_MEMORY, **RANDOM_ACCESS}[dataset], data_dir=data_config.data_dir or None)
    try:
        return builder, builder.as_data_source(split=data_config.split)
    # TFDS raises NotImplementedError (among others) for a dataset prepared in a format without random access.
    except (AssertionError, ValueError, NotImplementedError, FileNotFoundError) as err:
        if not builder.is_prepared():
            raise not_prepared_error(dataset, builder) from err
        check_random_access_format(dataset, builder)
        raise


def load_in_memory(dataset: str, data_config: ml_collections.ConfigDict) -> ArraySource:
    """A small TFDS dataset (CIFAR-10) read whole into an ArraySource, in the stored example order."""
    builder, records = _data_source(dataset, data_config)
    if len(records) == 0:
        raise DataError(f"{dataset} split {data_config.split!r} has no examples")
    images, labels = [], []
    for index in range(len(records)):
        example = records[index]
        images.append(example["image"])
        labels.append(example["label"])
    num_classes = builder.info.features["label"].num_classes
    return ArraySource(dataset, np.stack(images).astype(np.uint8), np.asarray(labels, np.int32), num_classes)


def load_random_access(dataset: str, data_config: ml_collections.ConfigDict) -> RandomAccessSource:
    """A 256×256 TFDS dataset read on demand."""
    builder, records = _data_source(dataset, data_config)
    return RandomAccessSource(dataset, records, RESOLUTION_256, builder.info.features["image"].shape[-1])
