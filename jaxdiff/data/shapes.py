"""The `shapes` dataset: procedurally drawn 32×32 captioned images, and a checker that reads them back.

Each image holds one shape (circle, square, triangle) of one colour, size and position (a quadrant) on a
dark background, captioned "a {size} {colour} {shape} in the {position}". Example i of a seed is a pure
function of (seed, i): its random numbers come from a SplitMix64 generator seeded with
splitmix64(seed·2³² + i), so any slice or set of indices can be drawn on its own. Its first output
modulo 2K picks the (colour, shape, position) combination (choice // 2, of the split's K, in the order
of COLOURS × SHAPES × POSITIONS) and the size (choice % 2); the next 8, as uniforms in [0, 1), the jitter.

Geometry, in pixel coordinates (pixel (row, col) covers [row, row+1) × [col, col+1)): the shape's centre
is its quadrant's centre (8 or 24 on each axis) moved by U(−1, 1) on each axis; its half-extent r is 3
(small) or 6 (large) times U(0.9, 1.1). Circle: radius r; square: side 2r; triangle: apex up, base 2r
at the bottom of its 2r × 2r bounding box. Edges are anti-aliased analytically: a pixel's coverage is
clip(0.5 − d, 0, 1), d the signed distance of its centre to the shape's boundary. Foreground: on
channels U(0.75, 1), off channels one U(0, 0.15) value; background: each channel U(0, 0.12); a pixel is
round(255·(background + coverage·(foreground − background))).

The 8 (colour, shape, position) combinations of `HELDOUT_COMBINATIONS` (in both sizes) are never
drawn for the "train" split; the "heldout" split draws only them.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxdiff.checks import is_int
from jaxdiff.data.sources import splitmix64, check_indices
from jaxdiff.errors import DataError

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SPLITS = ("train", "heldout")
HELDOUT_COMBINATIONS = (
    ("red", "square", "top right"),
    ("green", "circle", "bottom left"),
    ("blue", "triangle", "bottom right"),
    ("yellow", "triangle", "top left"),
    ("magenta", "square", "bottom left"),
    ("magenta", "circle", "bottom right"),
    ("cyan", "circle", "top left"),
    ("white", "triangle", "top right"),
)
IMAGE_SIZE = 32
NUM_EXAMPLES = {"train": 50_000, "heldout": 5_000}  # examples of the `shapes` source of each split

# Which of (red, green, blue) each colour switches on.
COLOUR_CHANNELS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], np.float32
)  # fmt: skip
QUADRANT_CENTRES = np.array([[8, 8], [8, 24], [24, 8], [24, 24]], np.float64)  # (row, col) per position
HALF_EXTENTS = np.array([3.0, 6.0])  # nominal r per size
POSITION_JITTER = 1.0  # centre moves U(-1, 1) pixels on each axis
SIZE_JITTER = 0.1  # r scales by U(0.9, 1.1)
ON_CHANNEL_RANGE = (0.75, 1.0)
OFF_CHANNEL_MAX = 0.15
BACKGROUND_MAX = 0.12

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's state increment
_RENDER_CHUNK = 128  # images rendered or read at once: the temporaries stay in cache
_NUM_DRAWS = 9  # combination+size, 2 centre offsets, size scale, on level, off level, 3 background channels


def _combinations(split: str) -> np.ndarray:
    """int [K, 3] (colour, shape, position) indices the split draws, in a fixed order."""
    heldout = {(COLOURS.index(c), SHAPES.index(s), POSITIONS.index(p)) for c, s, p in HELDOUT_COMBINATIONS}
    every = itertools.product(range(len(COLOURS)), range(len(SHAPES)), range(len(POSITIONS)))
    return np.array([combo for combo in every if (combo in heldout) == (split == "heldout")], np.int64)


def _check_split_and_seed(split: str, seed: int) -> None:
    if split not in SPLITS:
        raise DataError(f"shapes: split={split!r} is not one of {SPLITS}")
    if not is_int(seed) or not 0 <= seed < 2**31:
        raise DataError(f"shapes: seed must be an int in [0, 2**31), got {seed!r}")


def _uniforms(indices: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 [n], float64 [n, 8] in [0, 1)): the first and the next 8 outputs of each example's generator."""
    key = splitmix64((np.uint64(seed) << np.uint64(32)) + indices.astype(np.uint64))
    steps = np.arange(1, _NUM_DRAWS + 1, dtype=np.uint64) * _GOLDEN_GAMMA
    words = splitmix64(key[:, None] + steps)
    return words[:, 0], (words[:, 1:] >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _attributes_and_jitter(indices: np.ndarray, seed: int, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Attribute indices {"shape", "colour", "size", "position"} (int64 [n]) and uniforms [n, 8] of the examples."""
    first, uniforms = _uniforms(indices, seed)
    combinations = _combinations(split)
    choice = (first % np.uint64(2 * len(combinations))).astype(np.int64)
    colour, shape, position = combinations[choice // 2].T
    return {"shape": shape, "colour": colour, "size": choice % 2, "position": position}, uniforms


def _captions(attributes: dict[str, np.ndarray]) -> list[str]:
    return [
        f"a {SIZES[z]} {COLOURS[c]} {SHAPES[s]} in the {POSITIONS[p]}"
        for s, c, z, p in zip(attributes["shape"], attributes["colour"], attributes["size"], attributes["position"])
    ]


def _render(attributes: dict[str, np.ndarray], uniforms: np.ndarray) -> np.ndarray:
    """uint8 [n, 32, 32, 3] images of the attributes, jittered by the uniforms [n, 8] (module docstring)."""
    centre = QUADRANT_CENTRES[attributes["position"]] + POSITION_JITTER * (2 * uniforms[:, 0:2] - 1)
    r = HALF_EXTENTS[attributes["size"]] * (1 + SIZE_JITTER * (2 * uniforms[:, 2] - 1))
    low, high = ON_CHANNEL_RANGE
    on = COLOUR_CHANNELS[attributes["colour"]]
    foreground = on * (low + (high - low) * uniforms[:, 3:4]) + (1 - on) * OFF_CHANNEL_MAX * uniforms[:, 4:5]
    background = BACKGROUND_MAX * uniforms[:, 5:8]

    pixel_centres = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    dy = pixel_centres[None, :, None] - centre[:, 0, None, None].astype(np.float32)  # [n, 32, 1]
    dx = np.abs(pixel_centres[None, None, :] - centre[:, 1, None, None].astype(np.float32))  # [n, 1, 32]
    r = r[:, None, None].astype(np.float32)
    distance = np.empty((len(r), IMAGE_SIZE, IMAGE_SIZE), np.float32)  # signed: < 0 inside
    for shape, signed_distance in enumerate((_circle_distance, _square_distance, _triangle_distance)):
        rows = attributes["shape"] == shape
        if rows.any():
            distance[rows] = signed_distance(dx[rows], dy[rows], r[rows])
    coverage = np.clip(0.5 - distance, 0.0, 1.0)
    offset = (255 * background + 0.5).astype(np.float32)[:, :, None, None]  # + 0.5: round to nearest
    scale = (255 * (foreground - background)).astype(np.float32)[:, :, None, None]
    images = np.empty((len(r), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for channel in range(3):  # one channel at a time: broadcasting over a last axis of 3 is ~10x slower
        images[..., channel] = offset[:, channel] + coverage * scale[:, channel]
    return images


def _render_in_chunks(attributes: dict[str, np.ndarray], uniforms: np.ndarray) -> np.ndarray:
    images = np.empty((len(uniforms), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for start in range(0, len(uniforms), _RENDER_CHUNK):
        rows = slice(start, start + _RENDER_CHUNK)
        images[rows] = _render({k: v[rows] for k, v in attributes.items()}, uniforms[rows])
    return images


def _circle_distance(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.sqrt(dx * dx + dy * dy) - r


def _square_distance(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(dx, np.abs(dy)) - r


def _triangle_distance(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Apex (0, −r), base corners (±r, r); dx = |x offset|, dy = y offset (down)."""
    return np.maximum(dy - r, (2 * dx - dy - r) / np.float32(np.sqrt(5.0)))


def draw_examples(indices: np.ndarray, *, seed: int = 0, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """Images uint8 [n, 32, 32, 3] and captions of the examples `indices` (int, 0 <= i < 2**32) of (seed, split)."""
    _check_split_and_seed(split, seed)
    attributes, uniforms = _attributes_and_jitter(check_indices(indices, 2**32, "shapes"), seed, split)
    return _render_in_chunks(attributes, uniforms), _captions(attributes)


def draw_shapes(n: int, *, seed: int = 0, split: str = "train", start: int = 0) -> tuple[np.ndarray, list[str]]:
    """Examples start, ..., start + n − 1 of (seed, split): images uint8 [n, 32, 32, 3] and their captions.

    Captions read "a {size} {colour} {shape} in the {position}". Example i depends only on (seed, i),
    so `draw_shapes(n, start=s)` equals rows s.. of any longer draw from an earlier start.
    """
    for name, value in (("n", n), ("start", start)):
        if not is_int(value) or value < 0:
            raise DataError(f"shapes: {name} must be an int >= 0, got {value!r}")
    if start + n > 2**32:
        raise DataError(f"shapes: start + n = {start + n} exceeds the 2**32 examples of a seed")
    return draw_examples(np.arange(start, start + n, dtype=np.int64), seed=seed, split=split)


def shape_captions(indices: np.ndarray, *, seed: int = 0, split: str = "train") -> list[str]:
    """Captions of the examples `indices` of (seed, split), without drawing their images."""
    _check_split_and_seed(split, seed)
    attributes, _ = _attributes_and_jitter(check_indices(indices, 2**32, "shapes"), seed, split)
    return _captions(attributes)


@dataclasses.dataclass(frozen=True)
class ShapesSource:
    """Examples 0..num_examples − 1 of (seed, split) as a source, drawn on demand (nothing is stored).

    Unlabelled (`num_classes` 0, labels 0); `captions(indices)` gives the examples' captions.
    """

    split: str = "train"
    seed: int = 0
    num_examples: int = NUM_EXAMPLES["train"]
    name: str = "shapes"

    def __post_init__(self):
        _check_split_and_seed(self.split, self.seed)
        count = self.num_examples
        if not is_int(count, numpy=False) or not 0 < count <= 2**32:
            raise DataError(f"shapes: num_examples must be in [1, 2**32], got {self.num_examples}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (IMAGE_SIZE, IMAGE_SIZE, 3)

    @property
    def num_classes(self) -> int:
        return 0

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [n, 32, 32, 3] and labels int32 [n] (all 0) of the examples `indices`."""
        indices = check_indices(indices, self.num_examples, self.name)
        attributes, uniforms = _attributes_and_jitter(indices, self.seed, self.split)
        return _render_in_chunks(attributes, uniforms), np.zeros(len(indices), np.int32)

    def captions(self, indices: np.ndarray) -> np.ndarray:
        """Captions (str array [n]) of the examples `indices`."""
        indices = check_indices(indices, self.num_examples, self.name)
        return np.array(shape_captions(indices, seed=self.seed, split=self.split), dtype=np.str_)


# --- the checker ---------------------------------------------------------------------------------

SMALL_LARGE_AREA = 50.0  # px²; small shapes cover at most 4·3.3² ≈ 43.6, large ones at least 2·5.4² ≈ 58.3
TRIANGLE_SKEWNESS = -0.28  # vertical skewness of coverage: triangles (apex up) ≈ −0.57, circles and squares 0
SQUARE_CORNERNESS = 0.44  # μ22 / mean(μ40, μ04): circles 1/3, squares 5/9
_ATTRIBUTES = ("shape", "colour", "size", "position")


def read_attributes(images: np.ndarray) -> dict[str, np.ndarray]:
    """Attribute indices {"shape", "colour", "size", "position"} (int64 [n]) read back from uint8 [n, 32, 32, 3] images.

    Written on the generator's rules: the background is each image's per-channel median, a pixel's
    coverage is its largest channel rise above it divided by the image's largest. The colour is the
    on/off pattern (channel > half the brightest) of the mean of pixels with coverage > 0.5; the position
    is the quadrant of the coverage centroid; the size compares the coverage area with
    `SMALL_LARGE_AREA`; the shape comes from central moments of the coverage: a vertical skewness below
    `TRIANGLE_SKEWNESS` is a triangle, else μ22 / mean(μ40, μ04) above `SQUARE_CORNERNESS` a square.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DataError(f"read_attributes: images must be uint8 [n, 32, 32, 3], got {images.dtype} {images.shape}")
    chunks = [_read_chunk(images[i : i + _RENDER_CHUNK]) for i in range(0, len(images), _RENDER_CHUNK)]
    return {name: np.concatenate([c[name] for c in chunks] or [np.zeros(0, np.int64)]) for name in _ATTRIBUTES}


def coverage_maps(images: np.ndarray) -> np.ndarray:
    """The checker's view of where the shape is, float32 [n, 32, 32] of uint8 images [n, 32, 32, 3]: each pixel's
    largest channel rise above the image's per-channel median (the background), over the image's largest rise."""
    _, coverage = _planes_and_coverage(np.asarray(images))
    return coverage.reshape(len(images), IMAGE_SIZE, IMAGE_SIZE)


def _planes_and_coverage(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(channel planes float32 [3, n, 1024], coverage float32 [n, 1024]) of uint8 images [n, 32, 32, 3]."""
    flat = images.reshape(len(images), IMAGE_SIZE * IMAGE_SIZE, 3)
    planes = np.ascontiguousarray(flat.transpose(2, 0, 1), dtype=np.float32)  # [3, n, 1024]: fast reductions
    background = np.median(planes, axis=2, keepdims=True)
    rise = np.max(planes - background, axis=0)
    return planes, np.clip(rise / np.maximum(rise.max(axis=1, keepdims=True), 1.0), 0.0, None)


def _read_chunk(images: np.ndarray) -> dict[str, np.ndarray]:
    """`read_attributes` of a few images (checked by the caller)."""
    planes, coverage = _planes_and_coverage(images)

    inside = coverage > 0.5
    mean_colour = (planes * inside).sum(axis=2).T / np.maximum(inside.sum(axis=1), 1)[:, None]
    pattern = mean_colour > 0.5 * mean_colour.max(axis=1, keepdims=True)
    colour = np.argmax((pattern[:, None, :] == COLOUR_CHANNELS[None].astype(bool)).all(axis=2), axis=1)

    area = np.maximum(coverage.sum(axis=1), 1e-9)
    row, col = (np.indices((IMAGE_SIZE, IMAGE_SIZE), np.float32).reshape(2, -1) + 0.5)[:, None, :]
    mean_row = (coverage * row).sum(axis=1) / area
    mean_col = (coverage * col).sum(axis=1) / area
    weight = coverage / area[:, None]
    dy, dx = row - mean_row[:, None], col - mean_col[:, None]
    dy2, dx2 = dy * dy, dx * dx
    weighted_dy2 = weight * dy2
    skewness = (weighted_dy2 * dy).sum(axis=1) / np.maximum(weighted_dy2.sum(axis=1), 1e-9) ** 1.5
    fourth = 0.5 * ((weight * dx2 * dx2).sum(axis=1) + (weighted_dy2 * dy2).sum(axis=1))
    cornerness = (weighted_dy2 * dx2).sum(axis=1) / np.maximum(fourth, 1e-9)
    circle_or_square = np.where(cornerness > SQUARE_CORNERNESS, SHAPES.index("square"), SHAPES.index("circle"))
    shape = np.where(skewness < TRIANGLE_SKEWNESS, SHAPES.index("triangle"), circle_or_square)
    position = 2 * (mean_row >= IMAGE_SIZE / 2) + (mean_col >= IMAGE_SIZE / 2)
    size = (area > SMALL_LARGE_AREA).astype(np.int64)
    return {"shape": shape.astype(np.int64), "colour": colour, "size": size, "position": position.astype(np.int64)}
