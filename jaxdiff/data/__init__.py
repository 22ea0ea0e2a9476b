"""Input pipelines: image sources, the deterministic batch order (a grain pipeline) and TF-free preparation.

Sources (`sources`, `tfds_sources`, `folder`) give random access to uint8 NHWC images; `pipeline`
turns a source into this process's batches, in an order that is a pure function of (seed, step);
`prepare` writes CIFAR-10 as TFDS array_record files without TensorFlow.
"""

from __future__ import annotations

import ml_collections

from jaxdiff.config.defaults import DATASETS
from jaxdiff.data.class_folder import ClassFolderSource, center_crop_arr, load_class_folder
from jaxdiff.data.folder import FolderSource, load_folder
from jaxdiff.data.latent_cache import LatentCacheSource, load_latent_cache
from jaxdiff.data.pipeline import BatchIterator, batch_dataset, batch_for_step, example_indices, iterate_batches
from jaxdiff.data.prepare import prepare_dataset
from jaxdiff.data.shapes import NUM_EXAMPLES as SHAPES_NUM_EXAMPLES
from jaxdiff.data.shapes import ShapesSource, draw_shapes, read_attributes
from jaxdiff.data.sources import ArraySource, Source, SyntheticSource, digits_split_indices, load_digits
from jaxdiff.data.tfds_sources import (
    DatasetNotFoundError,
    RandomAccessSource,
    center_crop_resize,
    load_in_memory,
    load_random_access,
)
from jaxdiff.errors import ConfigError

SYNTHETIC_NUM_EXAMPLES = 50_000  # examples of the `synthetic` dataset built by `load_dataset`

__all__ = [
    "SYNTHETIC_NUM_EXAMPLES", "ArraySource", "BatchIterator", "ClassFolderSource", "DatasetNotFoundError",
    "FolderSource", "LatentCacheSource", "RandomAccessSource", "ShapesSource", "Source", "SyntheticSource",
    "batch_dataset", "batch_for_step", "center_crop_arr", "center_crop_resize", "digits_split_indices", "draw_shapes",
    "example_indices", "iterate_batches", "load_class_folder", "load_dataset", "load_folder", "load_latent_cache",
    "prepare_dataset", "read_attributes",
]  # fmt: skip


def load_dataset(
    data_config: ml_collections.ConfigDict, *, image_shape_for_synthetic: tuple[int, int, int] | None = None,
    image_size: int | None = None,
) -> Source:  # fmt: skip
    """The source named by `data_config.dataset` (one of `jaxdiff.config.DATASETS`).

    Reads `dataset`, `split` and `data_dir` ("" = TFDS' default). `image_shape_for_synthetic`
    (H, W, C) is required for, and used only by, `synthetic` (50,000 examples, 10 classes,
    any split). Digits has the splits "train" (1437 images) and "test" (360 held out).
    `shapes` has the splits "train" (50,000 examples) and "heldout" (5,000), drawn on demand
    with seed 0 (see `jaxdiff.data.shapes`). `folder` reads the captioned images of the folder
    `data_dir` (any split; see `jaxdiff.data.folder`) at `image_size`×`image_size` (required: the
    model's image size), checked before it returns; `class_folder` the labelled images of the class sub-folders of
    `data_dir` (ImageNet's train layout; see `jaxdiff.data.class_folder`) at `image_size`. A non-empty
    `latent_cache` (a folder `jaxdiff data encode` wrote) is read instead of the dataset: its examples are the
    autoencoder posteriors of the images (`jaxdiff.data.latent_cache`). A TFDS dataset that is not prepared, or not
    in array_record format, raises `DatasetNotFoundError` saying what to run.
    """
    dataset = data_config.dataset
    if dataset not in DATASETS:
        raise ConfigError(f"data.dataset={dataset!r} is not one of {DATASETS}")
    if data_config.get("latent_cache"):
        return load_latent_cache(data_config.latent_cache)
    if dataset == "synthetic":
        if image_shape_for_synthetic is None:
            raise ConfigError("data.dataset='synthetic' needs image_shape_for_synthetic=(H, W, C)")
        return SyntheticSource(SYNTHETIC_NUM_EXAMPLES, tuple(image_shape_for_synthetic))
    if dataset == "digits":
        return load_digits(data_config.split)
    if dataset == "shapes":
        if data_config.split not in SHAPES_NUM_EXAMPLES:
            raise ConfigError(f"shapes has the splits {tuple(SHAPES_NUM_EXAMPLES)}, got split={data_config.split!r}")
        return ShapesSource(data_config.split, num_examples=SHAPES_NUM_EXAMPLES[data_config.split])
    if dataset == "folder":
        if image_size is None:
            raise ConfigError(
                "data.dataset='folder' needs image_size (pixels; the images are cropped and resized to it)"
            )
        return load_folder(data_config.data_dir, image_size)
    if dataset == "class_folder":
        if image_size is None:
            raise ConfigError("data.dataset='class_folder' needs image_size (pixels; the images are cropped to it)")
        return load_class_folder(data_config.data_dir, image_size)
    if dataset == "cifar10":
        return load_in_memory(dataset, data_config)
    return load_random_access(dataset, data_config)
