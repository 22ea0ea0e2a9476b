"""Image sources held in memory or computed: arrays, synthetic images, scikit-learn's digits.

A source is an indexable set of images with `num_examples`, `image_shape` (H, W, C),
`num_classes` (0 when unlabelled) and `get(indices)`, which returns
`(images uint8 [n, H, W, C], labels int32 [n])` for 0-based example indices. Images stay
uint8 NHWC in [0, 255]; scaling to [-1, 1] and random flips belong to the train step.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from jaxdiff.errors import DataError

DIGITS_NUM_EXAMPLES = 1797
DIGITS_TEST_SIZE = 360  # the held-out split: the last 20% of a fixed permutation
DIGITS_SPLIT_SEED = 0


class Source(Protocol):
    """Random access to a set of images (the interface every source provides)."""

    name: str
    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [n, H, W, C] and labels int32 [n] of the examples `indices` (0-based)."""


def check_indices(indices: np.ndarray, num_examples: int, name: str) -> np.ndarray:
    """`indices` as int64 after checking they are a 1-D integer array inside [0, num_examples)."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise DataError(f"{name}: indices must be a 1-D integer array, got {indices.dtype} shape {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
        bad = indices[(indices < 0) | (indices >= num_examples)][0]
        raise DataError(f"{name}: index {bad} is outside [0, {num_examples})")
    return indices.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A dataset held in memory: images uint8 [N, H, W, C], labels int32 [N]."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                f"{self.name}: images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise DataError(
                f"{self.name}: labels must be int32 [{self.images.shape[0]}], "
                f"got {self.labels.dtype} {self.labels.shape}"
            )

    @property
    def num_examples(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = check_indices(indices, self.num_examples, self.name)
        return self.images[indices], self.labels[indices]


def splitmix64(counter: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijective hash of uint64 counters (wrapping arithmetic)."""
    z = counter.copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Deterministic pseudo-random images: example i is a hash of (seed, i), nothing is stored.

    With e = seed·2³² + i and W = ⌈H·W·C / 8⌉ words per image, pixel k (row-major) of
    example i is byte k mod 8 (little-endian) of splitmix64((e·W + k div 8)·2 + 1); its label
    is splitmix64(e·2) mod num_classes, or 0 when num_classes is 0.
    """

    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int = 10
    seed: int = 0
    name: str = "synthetic"

    def __post_init__(self):
        if self.num_examples <= 0:
            raise DataError(f"synthetic: num_examples must be positive, got {self.num_examples}")
        if len(self.image_shape) != 3 or min(self.image_shape) <= 0:
            raise DataError(f"synthetic: image_shape must be (H, W, C) with positive sizes, got {self.image_shape}")
        if self.num_classes < 0 or not 0 <= self.seed < 2**31:
            raise DataError(
                f"synthetic: need num_classes >= 0 and 0 <= seed < 2**31, got {self.num_classes}, {self.seed}"
            )

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = check_indices(indices, self.num_examples, self.name)
        example = (np.uint64(self.seed) << np.uint64(32)) + indices.astype(np.uint64)
        pixels = int(np.prod(self.image_shape))
        words = -(-pixels // 8)
        counter = (example[:, None] * np.uint64(words) + np.arange(words, dtype=np.uint64)) * np.uint64(2) + np.uint64(
            1
        )
        image_bytes = splitmix64(counter).astype("<u8", copy=False).view(np.uint8)
        images = image_bytes.reshape(len(indices), words * 8)[:, :pixels].reshape(-1, *self.image_shape)
        if self.num_classes == 0:
            return images, np.zeros(len(indices), np.int32)
        labels = splitmix64(example * np.uint64(2)) % np.uint64(self.num_classes)
        return images, labels.astype(np.int32)


def digits_split_indices(split: str) -> np.ndarray:
    """Indices (ascending) into scikit-learn's 1797 digits of `split`.

    "test" is the last 360 (20%) of `np.random.default_rng(0).permutation(1797)`, "train" the other 1437.
    """
    held_out = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(DIGITS_NUM_EXAMPLES)[-DIGITS_TEST_SIZE:]
    if split == "test":
        return np.sort(held_out)
    if split == "train":
        return np.setdiff1d(np.arange(DIGITS_NUM_EXAMPLES), held_out)
    raise DataError(f"digits has the splits 'train' (1437 images) and 'test' (360 held out), got split={split!r}")


def load_digits(split: str) -> ArraySource:
    """scikit-learn's 8×8 digits of `split`: values v in 0..16 stored as round(v·255/16), one channel, labels 0..9."""
    indices = digits_split_indices(split)
    try:
        from sklearn.datasets import load_digits as load_sklearn_digits
    except ImportError as err:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install 'jaxdiff[demo]'") from err
    digits = load_sklearn_digits()
    images = np.round(digits.images[indices].astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ArraySource("digits", images, digits.target[indices].astype(np.int32), 10)
