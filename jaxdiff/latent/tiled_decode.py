"""Decoding latents tile by tile, as diffusers' `AutoencoderKL.tiled_decode`, so that large images decode in the
memory of one tile.

Latents [B, h, w, C] (NHWC) are cut into overlapping square tiles of `latent_size` pixels, starting every
stride = int(latent_size·(1 − overlap_factor)) pixels along each axis (tiles at the far edges are cut short by the
latents' border). Each tile is decoded on its own, to at most `sample_size` image pixels per side. In raster order,
each decoded tile is blended with the decoded tile above it and then with the one to its left — those neighbours as
already blended — over the first e = min(int(sample_size·overlap_factor), both tiles' extents) rows (columns):
row y < e becomes above[−e + y]·(1 − y/e) + tile[y]·(y/e). The first sample_size − int(sample_size·overlap_factor)
rows and columns of every blended tile make up the image. This needs that many pixels to be stride·f (f the
autoencoder's factor), as for diffusers' defaults (sample_size a multiple of 4·f); other settings are refused.

diffusers takes sample_size from the VAE config's `sample_size` and latent_size = int(sample_size / f), with
overlap_factor 0.25 (`tile_settings`). The result differs from decoding the whole latent at once, since each
tile's decoder sees only its tile (group norms and the mid-block attention included); it is the same where a single
tile covers the latents (h and w at most the stride).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from jaxdiff.checks import is_int, is_real
from jaxdiff.errors import UsageError

Array = jax.Array

OVERLAP_FACTOR = 0.25  # diffusers' tile_overlap_factor


class TileSettings(NamedTuple):
    """diffusers' `tile_sample_min_size` (sample_size), `tile_latent_min_size` (latent_size) and
    `tile_overlap_factor` (overlap_factor): see the module docstring."""

    sample_size: int
    latent_size: int
    overlap_factor: float = OVERLAP_FACTOR

    def stride(self) -> int:
        """Latent pixels between the starts of neighbouring tiles."""
        return int(self.latent_size * (1 - self.overlap_factor))

    def blend_extent(self) -> int:
        """Image rows (columns) over which a tile is blended with its neighbour."""
        return int(self.sample_size * self.overlap_factor)

    def kept(self) -> int:
        """Image rows (columns) of each blended tile kept in the image."""
        return self.sample_size - self.blend_extent()


def tile_settings(vae_config: ml_collections.ConfigDict, factor: int) -> TileSettings:
    """diffusers' tiles of an `AutoencoderKL` config whose factor (image pixels per latent pixel) is `factor`:
    sample_size the config's (the first entry of a list), latent_size int(sample_size / factor), overlap 0.25."""
    size = vae_config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return check_tiles(TileSettings(size, int(size / factor)), factor)


def check_tiles(settings: TileSettings, factor: int) -> TileSettings:
    """`settings` after checking that they tile an image: positive sizes, overlap in [0, 1), and the rows kept
    per tile equal to stride·factor (UsageError naming the values otherwise)."""
    sample, latent, overlap = settings
    if not (is_int(sample) and is_int(latent) and sample > 0 and latent > 0):
        raise UsageError(f"tile sizes sample_size={sample!r}, latent_size={latent!r} must be positive ints")
    if not is_real(overlap, finite=True) or not 0 <= overlap < 1:
        raise UsageError(f"tile overlap_factor={overlap!r} must be a number in [0, 1)")
    if settings.stride() < 1 or settings.kept() != settings.stride() * factor:
        raise UsageError(f"tiles of sample_size={sample}, latent_size={latent}, overlap_factor={overlap} do not tile "
                         f"an image: the {settings.kept()} rows kept per tile must be the stride {settings.stride()} "
                         f"× the autoencoder's factor {factor} (e.g. sample_size a multiple of {4 * factor}, "
                         f"latent_size = sample_size / {factor}, overlap 0.25)")  # fmt: skip
    return settings


def _blend(previous: np.ndarray, tile: np.ndarray, extent: int, axis: int) -> None:
    """Blend in place the first e rows (axis 1) or columns (axis 2) of `tile` [B, H, W, C] with the last e of
    `previous`: tile[y] = previous[−e + y]·(1 − y/e) + tile[y]·(y/e), e = min(extent, both sizes along `axis`)."""
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    y = np.arange(extent, dtype=np.float64) / extent
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    keep, take = ((w.astype(tile.dtype).reshape(shape)) for w in (1.0 - y, y))
    head = (slice(None),) * axis + (slice(0, extent),)
    tail = (slice(None),) * axis + (slice(previous.shape[axis] - extent, None),)
    tile[head] = previous[tail] * keep + tile[head] * take


def decode_tiled(decode: Callable[[Array], Array], latents: Array, settings: TileSettings,
                 factor: int) -> np.ndarray:  # fmt: skip
    """The image [B, h·f, w·f, C'] (NumPy, the dtype `decode` gives) of latents [B, h, w, C] decoded tile by tile
    (module docstring), f = `factor`. `decode` maps a latent tile [B, h', w', C] to its image [B, h'·f, w'·f, C']
    (jit it: it is called once per tile, on a few tile shapes: at most nine for overlap_factor <= 0.5); the tiles
    are blended on the host, and one row of them is held at a time."""
    check_tiles(settings, factor)
    _, height, width, _ = latents.shape
    stride, size, extent, kept = settings.stride(), settings.latent_size, settings.blend_extent(), settings.kept()
    rows, above = [], None
    for i in range(0, height, stride):
        row = []
        for k, j in enumerate(range(0, width, stride)):
            tile = np.array(decode(latents[:, i : i + size, j : j + size]))
            if above is not None:
                _blend(above[k], tile, extent, axis=1)
            if row:
                _blend(row[-1], tile, extent, axis=2)
            row.append(tile)
        rows.append(np.concatenate([tile[:, :kept, :kept] for tile in row], axis=2))
        above = row
    return np.concatenate(rows, axis=1)
