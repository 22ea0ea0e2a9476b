"""Input pipelines: image sources and the deterministic batch order.

A source is an indexable set of images with `num_examples`, `image_shape`
(H, W, C), `num_classes` (0 when unlabelled) and `get(indices)`, which returns
`(images uint8 [n, H, W, C], labels int32 [n])`. Images stay uint8 NHWC in
[0, 255]; scaling to [-1, 1] and random flips belong to the train step.

The order of examples is a pure function of (seed, step): epoch e visits the
examples in the order `np.random.default_rng([seed, e]).permutation(N)`, the
epochs are concatenated, and global batch s is positions [s·B, (s+1)·B) of that
sequence. Process p of P takes positions [s·B + p·B/P, s·B + (p+1)·B/P) and
reads only those examples, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from jaxdiff.config import DATASETS

SYNTHETIC_NUM_EXAMPLES = 50_000  # examples of the `synthetic` dataset built by `load_dataset`
_TFDS_RESOLUTION = 256
_TFDS_READ_BATCH = 10_000  # examples per tf.data batch when loading a dataset into memory
_TFDS_IN_MEMORY = {"cifar10": "cifar10"}
_TFDS_RANDOM_ACCESS = {
    "celebahq256": "celeb_a_hq/256",
    "lsun_church256": "lsun/church_outdoor",
    "lsun_bedroom256": "lsun/bedroom",
    "lsun_cat256": "lsun/cat",
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not downloaded/prepared where it was looked for."""


class Source(Protocol):
    """Random access to a set of images (the interface every source provides)."""

    name: str
    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [n, H, W, C] and labels int32 [n] of the examples `indices` (0-based)."""


def _check_indices(indices: np.ndarray, num_examples: int, name: str) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{name}: indices must be a 1-D integer array, got {indices.dtype} shape {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
        bad = indices[(indices < 0) | (indices >= num_examples)][0]
        raise ValueError(f"{name}: index {bad} is outside [0, {num_examples})")
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
            raise ValueError(
                f"{self.name}: images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
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
        indices = _check_indices(indices, self.num_examples, self.name)
        return self.images[indices], self.labels[indices]


def _splitmix64(counter: np.ndarray) -> np.ndarray:
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
            raise ValueError(f"synthetic: num_examples must be positive, got {self.num_examples}")
        if len(self.image_shape) != 3 or min(self.image_shape) <= 0:
            raise ValueError(f"synthetic: image_shape must be (H, W, C) with positive sizes, got {self.image_shape}")
        if self.num_classes < 0 or not 0 <= self.seed < 2**31:
            raise ValueError(
                f"synthetic: need num_classes >= 0 and 0 <= seed < 2**31, got {self.num_classes}, {self.seed}"
            )

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = _check_indices(indices, self.num_examples, self.name)
        example = (np.uint64(self.seed) << np.uint64(32)) + indices.astype(np.uint64)
        pixels = int(np.prod(self.image_shape))
        words = -(-pixels // 8)
        counter = (example[:, None] * np.uint64(words) + np.arange(words, dtype=np.uint64)) * np.uint64(2) + np.uint64(
            1
        )
        image_bytes = _splitmix64(counter).astype("<u8", copy=False).view(np.uint8)
        images = image_bytes.reshape(len(indices), words * 8)[:, :pixels].reshape(-1, *self.image_shape)
        if self.num_classes == 0:
            return images, np.zeros(len(indices), np.int32)
        labels = _splitmix64(example * np.uint64(2)) % np.uint64(self.num_classes)
        return images, labels.astype(np.int32)


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

    Reading and decoding run in a thread pool (JPEG/PNG decoding releases the GIL).
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
        indices = _check_indices(indices, self.num_examples, self.name)
        images = np.stack(list(self._pool.map(self._read, indices.tolist())))
        return images, np.zeros(len(indices), np.int32)


def _not_prepared_message(dataset: str, builder) -> str:
    tfds_name = {**_TFDS_IN_MEMORY, **_TFDS_RANDOM_ACCESS}[dataset]
    data_dir = str(builder.data_dir_root)
    fmt = " --file_format=array_record" if dataset in _TFDS_RANDOM_ACCESS else ""
    lines = [
        f"dataset {dataset!r} (TFDS {tfds_name!r}) is not prepared in data_dir {data_dir} "
        f"(looked for {builder.data_dir})."
    ]
    if dataset == "celebahq256":
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        lines += [
            "CelebA-HQ cannot be downloaded automatically. Obtain the archive data256x256.tar (the 30,000",
            "CelebA-HQ images at 256x256; see",
            "https://github.com/tkarras/progressive_growing_of_gans#preparing-datasets-for-training),",
            f"put it in the TFDS manual_dir {manual_dir}, then run:",
            f"  tfds build {tfds_name} --data_dir={data_dir} --manual_dir={manual_dir}{fmt}",
        ]
    else:
        lines += [
            "Prepare it on a machine with internet access (then copy the data_dir over if needed):",
            f"  tfds build {tfds_name} --data_dir={data_dir}{fmt}",
        ]
        if dataset.startswith("lsun"):
            lines.append("TFDS reads the LSUN LMDB files with tensorflow-io (pip install tensorflow-io).")
    lines.append("Or set config.data.data_dir to the directory that already holds it.")
    return "\n".join(lines)


def _load_cifar10(data_config: ml_collections.ConfigDict) -> ArraySource:
    builder = tfds.builder(_TFDS_IN_MEMORY["cifar10"], data_dir=data_config.data_dir or None)
    _hide_accelerators_from_tensorflow()
    try:
        dataset = builder.as_dataset(split=data_config.split, batch_size=_TFDS_READ_BATCH)
    except (AssertionError, ValueError) as err:
        if not builder.is_prepared():
            raise DatasetNotFoundError(_not_prepared_message("cifar10", builder)) from err
        raise
    chunks = list(tfds.as_numpy(dataset))
    if not chunks:
        raise ValueError(f"cifar10 split {data_config.split!r} has no examples")
    images = np.concatenate([chunk["image"] for chunk in chunks])
    labels = np.concatenate([chunk["label"] for chunk in chunks]).astype(np.int32)
    return ArraySource("cifar10", images, labels, builder.info.features["label"].num_classes)


def _hide_accelerators_from_tensorflow() -> None:
    """Keeps tf.data on the CPU so TensorFlow does not claim the GPU memory JAX uses."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices: nothing left to change
        pass


def _load_random_access(dataset: str, data_config: ml_collections.ConfigDict) -> RandomAccessSource:
    tfds_name = _TFDS_RANDOM_ACCESS[dataset]
    builder = tfds.builder(tfds_name, data_dir=data_config.data_dir or None)
    try:
        records = builder.as_data_source(split=data_config.split)
    except (AssertionError, ValueError, NotImplementedError) as err:
        if not builder.is_prepared():
            raise DatasetNotFoundError(_not_prepared_message(dataset, builder)) from err
        if isinstance(err, NotImplementedError):
            raise DatasetNotFoundError(
                f"dataset {dataset!r} is prepared in {builder.data_dir} as {builder.info.file_format.value}, "
                "which has no random access; it must be in array_record format. Convert it with:\n"
                f"  tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record "
                f"--out_dir=NEW_DATA_DIR/{tfds_name}/{builder.version}\n"
                f"or rebuild it with: tfds build {tfds_name} --data_dir={builder.data_dir_root} "
                "--file_format=array_record"
            ) from err
        raise
    return RandomAccessSource(dataset, records, _TFDS_RESOLUTION, builder.info.features["image"].shape[-1])


def _load_digits(data_config: ml_collections.ConfigDict) -> ArraySource:
    """scikit-learn's 1797 8×8 digits, values v in 0..16 stored as round(v·255/16), one channel, labels 0..9."""
    if data_config.split != "train":
        raise ValueError(f"digits has a single split 'train' (all 1797 images), got split={data_config.split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install 'jaxdiff[demo]'") from err
    digits = load_digits()
    images = np.round(digits.images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ArraySource("digits", images, digits.target.astype(np.int32), 10)


def load_dataset(
    data_config: ml_collections.ConfigDict, *, image_shape_for_synthetic: tuple[int, int, int] | None = None
) -> Source:
    """The source named by `data_config.dataset` (one of `jaxdiff.config.DATASETS`).

    Reads `dataset`, `split` and `data_dir` ("" = TFDS' default). `image_shape_for_synthetic`
    (H, W, C) is required for, and used only by, `synthetic` (50,000 examples, 10 classes,
    any split).
    A TFDS dataset that is not prepared raises `DatasetNotFoundError` saying what to run.
    """
    dataset = data_config.dataset
    if dataset not in DATASETS:
        raise ValueError(f"data.dataset={dataset!r} is not one of {DATASETS}")
    if dataset == "synthetic":
        if image_shape_for_synthetic is None:
            raise ValueError("data.dataset='synthetic' needs image_shape_for_synthetic=(H, W, C)")
        return SyntheticSource(SYNTHETIC_NUM_EXAMPLES, tuple(image_shape_for_synthetic))
    if dataset == "digits":
        return _load_digits(data_config)
    if dataset == "cifar10":
        return _load_cifar10(data_config)
    return _load_random_access(dataset, data_config)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


def example_indices(num_examples: int, *, seed: int, start: int, stop: int) -> np.ndarray:
    """Example indices at positions [start, stop) of the concatenated epoch permutations (int64)."""
    if num_examples <= 0:
        raise ValueError(f"cannot draw examples from a dataset of {num_examples} examples")
    positions = np.arange(start, stop, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        indices[in_epoch] = _epoch_permutation(seed, int(epoch), num_examples)[offsets[in_epoch]]
    return indices


def _check_batch_args(seed: int, step: int, global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validates the batch arguments; returns the per-process batch size."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if global_batch_size <= 0 or process_count <= 0:
        raise ValueError(
            f"global_batch_size and process_count must be positive, got {global_batch_size}, {process_count}"
        )
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
    return global_batch_size // process_count


def _batch(
    source: Source, seed: int, step: int, global_batch_size: int, process_index: int, local_batch_size: int
) -> dict[str, np.ndarray]:
    start = step * global_batch_size + process_index * local_batch_size
    indices = example_indices(source.num_examples, seed=seed, start=start, stop=start + local_batch_size)
    images, labels = source.get(indices)
    return {"image": images, "label": labels}


def batch_for_step(
    source: Source, *, seed: int, step: int, global_batch_size: int, process_index: int, process_count: int
) -> dict[str, np.ndarray]:
    """This process's part of global batch `step` (0-based): image uint8 [B/P, H, W, C], label int32 [B/P]."""
    local = _check_batch_args(seed, step, global_batch_size, process_index, process_count)
    return _batch(source, seed, step, global_batch_size, process_index, local)


def _put_unless_stopped(out: queue.Queue, item: tuple, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(batch_at: Callable[[int], dict], start_step: int, out: queue.Queue, stop: threading.Event) -> None:
    """Puts ("batch", b) for steps start_step, start_step + 1, ... until `stop`; ("error", e) on failure."""
    try:
        for step in itertools.count(start_step):
            if not _put_unless_stopped(out, ("batch", batch_at(step)), stop):
                return
    except Exception as err:  # handed to the consumer, which re-raises it
        _put_unless_stopped(out, ("error", err), stop)


class BatchIterator:
    """Iterator over batch_at(start_step), batch_at(start_step + 1), ... made ahead by a daemon thread.

    The thread starts at once (the first batches load while the train step compiles) and
    stops on `close()`, on leaving a `with` block, or when the iterator is garbage-collected.
    """

    def __init__(self, batch_at: Callable[[int], dict], start_step: int, prefetch: int):
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(batch_at, start_step, self._queue, self._stop), name="jaxdiff-data", daemon=True
        )
        self._thread.start()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop.is_set():
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "error":
            self.close()
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        self._stop.set()


def iterate_batches(
    source: Source,
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    prefetch: int = 2,
) -> BatchIterator:
    """Endless iterator of `batch_for_step` for steps start_step, start_step + 1, ...

    A background thread keeps up to `prefetch` (>= 1) batches ready; use the iterator in a
    `with` block or `close()` it to stop the thread. Arguments are checked here, before any
    batch is made.
    """
    local = _check_batch_args(seed, start_step, global_batch_size, process_index, process_count)
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")

    def batch_at(step: int) -> dict[str, np.ndarray]:
        return _batch(source, seed, step, global_batch_size, process_index, local)

    return BatchIterator(batch_at, start_step, prefetch)
