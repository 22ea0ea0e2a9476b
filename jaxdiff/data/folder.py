"""A folder of captioned images (the layout fine-tuning folders use) as a random-access source.

The folder holds PNG/JPEG images (`.png`, `.jpg`, `.jpeg`, any case; names starting with "." are
skipped; subfolders are not read) and their captions, either in `captions.jsonl` (one JSON object
`{"file": "a.png", "text": "..."}` per line, blank lines allowed; every image needs exactly one line)
or, without that file, in a UTF-8 `<image stem>.txt` beside each image. Examples are the images in
sorted file-name order. Loading lists the files, reads the captions and checks every image's header,
so bad input fails before training starts; pixels are decoded when `get` asks for them: the EXIF
orientation applied, converted to RGB (alpha dropped), the central square cropped and
Lanczos-resized to `size` (as `center_crop_resize`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os

import numpy as np
import PIL.Image
import PIL.ImageOps

from jaxdiff.checks import is_int
from jaxdiff.data.sources import check_indices
from jaxdiff.data.tfds_sources import center_crop_resize
from jaxdiff.errors import ConfigError, DataError, MissingDataError

CAPTIONS_FILE = "captions.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")  # what PIL must find inside the files
EXIF_ORIENTATION = 0x0112  # the EXIF tag; its values 5-8 turn the image a quarter, swapping its sides
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# What PIL raises for a file it cannot read (DecompressionBombError: more than twice its pixel limit).
_READ_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


def _default_threads() -> int:
    return min(32, os.cpu_count() or 1)


@dataclasses.dataclass
class FolderSource:
    """Images `files` (names inside `directory`) with captions `texts`, read as uint8 [size, size, 3].

    Unlabelled: labels are 0 and `num_classes` is 0; `captions(indices)` gives the captions and
    `original_sizes(indices)` each image's (height, width) before cropping (EXIF orientation applied: SDXL's
    micro-conditioning). Build it with `load_folder`, which checks the folder. With `class_examples` (prior
    preservation), each batch also holds the class example paired with each of its examples
    (`jaxdiff.data.prior.class_indices`, `jaxdiff.data.pipeline`).
    """

    directory: str
    files: tuple[str, ...]
    texts: tuple[str, ...]
    size: int
    num_threads: int = dataclasses.field(default_factory=_default_threads)
    name: str = "folder"
    num_classes: int = 0
    sizes: tuple[tuple[int, int], ...] = ()  # each image's (height, width) as `load_folder` read it
    # DreamBooth's class images (`jaxdiff.data.prior`): when set, each batch also holds example i's class example
    class_examples: FolderSource | None = None

    def __post_init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="read-folder")

    @property
    def num_examples(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)

    def _read(self, index: int) -> np.ndarray:
        path = os.path.join(self.directory, self.files[index])
        try:
            with PIL.Image.open(path) as image:
                pixels = np.asarray(PIL.ImageOps.exif_transpose(image).convert("RGB"))
        except _READ_ERRORS as err:
            raise DataError(f"{path}: cannot decode the image ({err})") from err
        return center_crop_resize(pixels, self.size)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [n, size, size, 3] and labels int32 [n] (all 0) of the examples `indices`."""
        indices = check_indices(indices, self.num_examples, self.name)
        images = np.zeros((len(indices), *self.image_shape), np.uint8)
        for row, image in enumerate(self._pool.map(self._read, indices.tolist())):
            images[row] = image
        return images, np.zeros(len(indices), np.int32)

    def captions(self, indices: np.ndarray) -> np.ndarray:
        """Captions (str array [n]) of the examples `indices`."""
        indices = check_indices(indices, self.num_examples, self.name)
        return np.array([self.texts[i] for i in indices], dtype=np.str_)

    def original_sizes(self, indices: np.ndarray) -> np.ndarray:
        """(height, width) int32 [n, 2] of the examples `indices` before cropping and resizing."""
        indices = check_indices(indices, self.num_examples, self.name)
        return np.array([self.sizes[i] for i in indices], np.int32).reshape(-1, 2)


def _image_files(directory: str) -> list[str]:
    """Names of the image files directly inside `directory`, sorted; dot files skipped."""

    def is_image(name: str) -> bool:
        path = os.path.join(directory, name)
        return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".") and os.path.isfile(path)

    return sorted(filter(is_image, os.listdir(directory)))


def _captions_from_jsonl(directory: str, files: list[str]) -> list[str]:
    """The caption of each of `files` from `captions.jsonl`; errors name the file and line."""
    path = os.path.join(directory, CAPTIONS_FILE)
    known, texts, lines = set(files), {}, {}
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not (
                isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("text"), str)
            ):
                raise DataError(
                    f'{path}:{number}: expected {{"file": "<image name>", "text": "<caption>"}}, got {line.strip()[:80]}'
                )
            name = entry["file"]
            if name not in known:
                raise DataError(f"{path}:{number}: {name!r} is not an image in {directory} (one of {IMAGE_SUFFIXES})")
            if name in texts:
                raise DataError(f"{path}:{number}: {name!r} already has a caption on line {lines[name]}")
            texts[name], lines[name] = entry["text"], number
    missing = [name for name in files if name not in texts]
    if missing:
        raise DataError(
            f"image {missing[0]!r} in {directory} has no caption in {CAPTIONS_FILE} ({len(missing)} images lack one)"
        )
    return [texts[name] for name in files]


def _captions_from_text_files(directory: str, files: list[str]) -> list[str]:
    """The caption of each of `files` from its `<stem>.txt` (whitespace at the ends stripped)."""
    texts = []
    for name in files:
        path = os.path.join(directory, os.path.splitext(name)[0] + ".txt")
        if not os.path.isfile(path):
            raise DataError(
                f"image {name!r} in {directory} has no caption: add {os.path.basename(path)} or a {CAPTIONS_FILE}"
            )
        try:
            with open(path, encoding="utf-8") as stream:
                texts.append(stream.read().strip())
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return texts


def _check_image(path: str) -> tuple[int, int]:
    """The image's (height, width) once its EXIF orientation is applied; a one-line ValueError naming `path`
    unless PIL reads it as a PNG or JPEG (header and structure)."""
    try:
        with PIL.Image.open(path) as image:
            kind = image.format
            image.verify()
        with PIL.Image.open(path) as image:  # verify() leaves the image unusable: read the header again
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except _READ_ERRORS as err:
        raise DataError(f"{path}: not a readable PNG or JPEG image ({err})") from err
    if kind not in IMAGE_FORMATS:
        raise DataError(f"{path}: holds a {kind} image; the folder source reads {' and '.join(IMAGE_FORMATS)}")
    return height, width


def load_folder(directory: str, size: int, *, num_threads: int | None = None) -> FolderSource:
    """The captioned images of `directory` at `size`×`size` (see the module docstring), checked.

    Raises a one-line error for a missing folder, a folder without images, an image without a caption,
    a malformed captions line (file:line) or a file that is not a readable PNG/JPEG image.
    """
    if not is_int(size, numpy=False) or size <= 0:
        raise ConfigError(f"folder: image size must be a positive integer (pixels), got {size!r}")
    if not directory:
        raise ConfigError("data.dataset='folder' needs data.data_dir: the folder of images and captions")
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise MissingDataError(f"image folder {directory} does not exist (or is not a folder)")
    files = _image_files(directory)
    if not files:
        raise DataError(f"image folder {directory} has no images ({', '.join(IMAGE_SUFFIXES)})")
    if os.path.isfile(os.path.join(directory, CAPTIONS_FILE)):
        texts = _captions_from_jsonl(directory, files)
    else:
        texts = _captions_from_text_files(directory, files)
    threads = num_threads or _default_threads()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        sizes = tuple(pool.map(_check_image, [os.path.join(directory, name) for name in files]))
    return FolderSource(directory, tuple(files), tuple(texts), size, num_threads=threads, sizes=sizes)
