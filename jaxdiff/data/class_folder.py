"""A folder of class sub-folders (ImageNet's train layout, `n01440764/n01440764_10026.JPEG`) as a labelled source.

The classes are the sorted names of the sub-folders of the root, numbered 0..K−1, and the examples every image file
below each class folder (walked recursively, links followed, folders and files in sorted order), as torchvision's
`ImageFolder` (with which DiT's and SiT's `train.py` read ImageNet) lists them; the class names are kept
(`class_names`) so that a label means the same when sampling. Image files are those with torchvision's extensions
(`IMAGE_EXTENSIONS`, any case); names starting with "." are skipped. Pixels are decoded when `get` asks for them:
converted to RGB and cropped by `center_crop_arr` (ADM's and DiT's centre crop) to size×size. Random flips belong to
the train step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np
import PIL.Image

from jaxdiff.checks import is_int
from jaxdiff.data.folder import _READ_ERRORS, _default_threads
from jaxdiff.data.sources import check_indices
from jaxdiff.errors import ConfigError, DataError, MissingDataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def center_crop_arr(image: PIL.Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion's `center_crop_arr`, which DiT's `train.py` uses): while the short side is
    at least 2·size, halve both sides (integer division) with a box filter; then resize bicubically so that the short
    side is `size` (each side round(side·size / short side)); then crop size×size at ((H − size) // 2,
    (W − size) // 2). uint8 [size, size, C] (C of the image's mode)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=PIL.Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=PIL.Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


@dataclasses.dataclass
class ClassFolderSource:
    """Images `files` (paths relative to `directory`) with labels `labels` (int32 [N], indices into `classes`, the
    sorted class folder names), read as uint8 [size, size, 3]. Build it with `load_class_folder`."""

    directory: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray
    size: int
    num_threads: int = dataclasses.field(default_factory=_default_threads)
    name: str = "class_folder"

    def __post_init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="read-class-folder")

    @property
    def num_examples(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The name of class k at position k (its folder's name)."""
        return self.classes

    def _read(self, index: int) -> np.ndarray:
        path = os.path.join(self.directory, self.files[index])
        try:
            with PIL.Image.open(path) as image:
                return center_crop_arr(image.convert("RGB"), self.size)
        except _READ_ERRORS as err:
            raise DataError(f"{path}: cannot decode the image ({err})") from err

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [n, size, size, 3] and labels int32 [n] of the examples `indices`."""
        indices = check_indices(indices, self.num_examples, self.name)
        images = np.zeros((len(indices), *self.image_shape), np.uint8)
        for row, image in enumerate(self._pool.map(self._read, indices.tolist())):
            images[row] = image
        return images, self.labels[indices]


def _class_files(directory: str, name: str) -> list[str]:
    """The image files below class folder `name` (paths relative to `directory`), in torchvision's order."""
    files = []
    for root, _, names in sorted(os.walk(os.path.join(directory, name), followlinks=True)):
        for file in sorted(names):
            if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith("."):
                files.append(os.path.relpath(os.path.join(root, file), directory))
    return files


def load_class_folder(directory: str, size: int, *, num_threads: int | None = None) -> ClassFolderSource:
    """The images of the class sub-folders of `directory` at `size`×`size` (module docstring). Lists the files only
    (no image is opened: an undecodable one is a DataError naming it when read). One-line errors: no folder given,
    a missing folder, a folder without class sub-folders, a class folder without images."""
    if not is_int(size, numpy=False) or size <= 0:
        raise ConfigError(f"class_folder: image size must be a positive integer (pixels), got {size!r}")
    if not directory:
        raise ConfigError("data.dataset='class_folder' needs data.data_dir: the folder of class sub-folders "
                          "(ImageNet's train/)")  # fmt: skip
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise MissingDataError(f"image folder {directory} does not exist (or is not a folder)")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        stray = sum(1 for name in os.listdir(directory) if name.lower().endswith(IMAGE_EXTENSIONS))
        found = f" (it holds {stray} images directly: put each class's images in a sub-folder)" if stray else ""
        raise DataError(f"image folder {directory} has no class sub-folders{found}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _class_files(directory, name)
        if not found:
            raise DataError(f"class folder {os.path.join(directory, name)} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")  # fmt: skip
        files += found
        labels += [label] * len(found)
    return ClassFolderSource(directory, tuple(classes), tuple(files), np.asarray(labels, np.int32), size,
                             num_threads=num_threads or _default_threads())  # fmt: skip
