"""Conversions between model space and 8-bit images, and PNG grids."""

from __future__ import annotations

import math
import os

import numpy as np

from jaxdiff.errors import UsageError


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 by truncation of (x + 1)·127.5, as the official DDPM code (clipped first)."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip((x + 1.0) * 127.5, 0.0, 255.0).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] by x/127.5 - 1."""
    return np.asarray(images, dtype=np.float32) / 127.5 - 1.0


def grid_columns(n: int) -> int:
    """Columns of `make_grid`'s default layout for n images: ⌈√n⌉."""
    return math.ceil(math.sqrt(n))


def make_grid(images: np.ndarray, *, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows·(H+p)+p, cols·(W+p)+p, C] image, row-major."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise UsageError(f"make_grid expects uint8 NHWC images, got {images.dtype} of shape {images.shape}")
    n, h, w, c = images.shape
    columns = columns or grid_columns(n)
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike, *, scale: int = 1) -> None:
    """Write a uint8 [H, W, C] image (C = 1 or 3) as PNG, optionally enlarged by pixel repetition."""
    from PIL import Image

    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    if image.shape[-1] == 1:
        image = image[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
