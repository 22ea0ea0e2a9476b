"""DreamBooth's prior preservation: the class images paired with a captioned instance folder.

A run with `training.prior_preservation.class_data_dir` trains on each instance example together with a class
example, as diffusers' examples/dreambooth/train_dreambooth_lora.py pairs them: instance example i with class
example i % num_class_images (`class_indices`; with more class images than instance ones, consecutive epochs
move on through the class images, so that every one is used). The class folder is a captioned folder
(`jaxdiff.data.folder`); its first num_class_images images in sorted file-name order are used
(`load_class_examples`). A folder with fewer is completed once, before training, by `add_class_images`: the
missing images written as PNGs with the class prompt as caption, each file under a dot name (which the folder
source skips) and then renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable

import numpy as np
import PIL.Image

from jaxdiff.data.folder import CAPTIONS_FILE, FolderSource, _image_files, load_folder
from jaxdiff.errors import DataError


def class_indices(indices: np.ndarray, epochs: np.ndarray, num_examples: int, num_class_images: int) -> np.ndarray:
    """The class example (int64 [n]) paired with instance examples `indices` (int [n]) drawn in epochs `epochs`
    (int [n]) of a dataset of `num_examples`: (index + num_examples·(epoch mod c)) % num_class_images, c =
    ceil(num_class_images / num_examples). With no more class images than instance ones (c = 1) that is
    diffusers' index % num_class_images; with more, diffusers' dataset is num_class_images long (example j: instance
    j % num_examples, class j) and here c consecutive epochs pair each instance image with every c-th class image
    in turn, so that every class image is used, each once per c epochs, as in one of diffusers' epochs."""
    cycle = -(-num_class_images // num_examples)
    offsets = num_examples * (np.asarray(epochs, np.int64) % cycle)
    return (np.asarray(indices, np.int64) + offsets) % num_class_images


def class_image_count(directory: str) -> int:
    """The number of images in `directory` (0 when it does not exist)."""
    return len(_image_files(directory)) if os.path.isdir(directory) else 0


def load_class_examples(directory: str, size: int, count: int) -> FolderSource:
    """The first `count` images (sorted file names) of the captioned folder `directory` at `size`×`size`;
    DataError when it holds fewer."""
    folder = load_folder(directory, size)
    if folder.num_examples < count:
        raise DataError(f"class image folder {folder.directory} has {folder.num_examples} images; "
                        f"training.prior_preservation.num_class_images={count}")  # fmt: skip
    return dataclasses.replace(folder, files=folder.files[:count], texts=folder.texts[:count],
                               sizes=folder.sizes[:count])  # fmt: skip


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(temporary path)`, then the file renamed to `path` (a dot name beside it until then)."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.partial")
    write(temporary)
    os.replace(temporary, path)


def add_class_images(directory: str, images: np.ndarray, caption: str) -> list[str]:
    """Writes `images` uint8 [n, H, W, 3] into the class folder `directory` (created if missing) as
    `class_<k>.png` (k continuing after the images already there) captioned `caption`: in `captions.jsonl`
    when the folder has one or no image yet, else in a `<stem>.txt` beside each image (the folder's own
    layout). Returns the new file names."""
    os.makedirs(directory, exist_ok=True)
    existing = _image_files(directory)
    names, k = [], len(existing)
    while len(names) < len(images):
        name = f"class_{k:06d}.png"
        if name not in existing:
            names.append(name)
        k += 1
    for name, image in zip(names, images):
        _write_atomically(os.path.join(directory, name), lambda path: PIL.Image.fromarray(image).save(path, "PNG"))
    captions = os.path.join(directory, CAPTIONS_FILE)
    if os.path.isfile(captions) or not existing:
        old = pathlib.Path(captions).read_text(encoding="utf-8") if os.path.isfile(captions) else ""
        lines = "".join(json.dumps({"file": name, "text": caption}) + "\n" for name in names)
        text = old + ("\n" if old and not old.endswith("\n") else "") + lines
        _write_atomically(captions, lambda path: pathlib.Path(path).write_text(text, encoding="utf-8"))
    else:
        for name in names:
            text_file = os.path.join(directory, os.path.splitext(name)[0] + ".txt")
            _write_atomically(text_file, lambda path: pathlib.Path(path).write_text(caption, encoding="utf-8"))
    return names
