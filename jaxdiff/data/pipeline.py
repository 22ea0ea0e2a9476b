"""The deterministic batch order and the grain pipeline that reads it.

The order of examples is a pure function of (seed, step): epoch e visits the examples in the
order `np.random.default_rng([seed, e]).permutation(N)`, the epochs are concatenated, and global
batch s is positions [s·B, (s+1)·B) of that sequence. Process p of P takes positions
[s·B + p·B/P, s·B + (p+1)·B/P) and reads only those examples, so a resumed run sees exactly the
batches an uninterrupted one would, whatever the number of processes it resumes on.

The pipeline is a grain `MapDataset` whose element s is this process's part of global batch s
(step → example indices → read and decode), read ahead by grain's prefetch threads.
"""

from __future__ import annotations

import functools
import sys

import grain
import numpy as np

from jaxdiff.data.prior import class_indices
from jaxdiff.data.sources import Source
from jaxdiff.errors import UsageError, WeightsError


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


def example_indices(num_examples: int, *, seed: int, start: int, stop: int) -> np.ndarray:
    """Example indices at positions [start, stop) of the concatenated epoch permutations (int64)."""
    if num_examples <= 0:
        raise UsageError(f"cannot draw examples from a dataset of {num_examples} examples")
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
        raise UsageError(f"seed must be >= 0, got {seed}")
    if step < 0:
        raise UsageError(f"step must be >= 0, got {step}")
    if global_batch_size <= 0 or process_count <= 0:
        raise UsageError(
            f"global_batch_size and process_count must be positive, got {global_batch_size}, {process_count}"
        )
    if global_batch_size % process_count:
        raise UsageError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise UsageError(f"process_index={process_index} is outside [0, {process_count})")
    return global_batch_size // process_count


def _local_indices(
    step: int, *, num_examples: int, seed: int, global_batch_size: int, process_index: int, local_batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, the epoch of each) of this process's part of global batch `step`."""
    start = step * global_batch_size + process_index * local_batch_size
    epochs = np.arange(start, start + local_batch_size, dtype=np.int64) // num_examples
    return example_indices(num_examples, seed=seed, start=start, stop=start + local_batch_size), epochs


def _read(source: Source, local: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """The examples of `_local_indices`' (indices, epochs), with their paired class examples if the source has
    some (DreamBooth's prior preservation, `jaxdiff.data.prior.class_indices`)."""
    indices, epochs = local
    batch = _read_examples(source, indices)
    paired = getattr(source, "class_examples", None)
    if paired is not None:
        paired_indices = class_indices(indices, epochs, source.num_examples, paired.num_examples)
        class_batch = _read_examples(paired, paired_indices)
        batch.update({f"class_{key}": class_batch[key] for key in ("image", "caption", "original_size")})
    return batch


def _read_examples(source: Source, indices: np.ndarray) -> dict[str, np.ndarray]:
    images, labels = source.get(indices)
    batch = {"image": images, "label": labels}
    if hasattr(source, "captions"):  # captioned sources (shapes, folder)
        batch["caption"] = source.captions(indices)
    if hasattr(source, "original_sizes"):  # the folder's sizes before cropping (SDXL's micro-conditioning)
        batch["original_size"] = source.original_sizes(indices)
    return batch


def batch_for_step(
    source: Source, *, seed: int, step: int, global_batch_size: int, process_index: int, process_count: int
) -> dict[str, np.ndarray]:
    """This process's part of global batch `step` (0-based): image uint8 [B/P, H, W, C], label int32 [B/P],
    caption str [B/P] when the source has `captions(indices)` and original_size int32 [B/P, 2] when it has
    `original_sizes(indices)`; with a folder's `class_examples`, class_image, class_caption and class_original_size
    of the class example paired with each (`jaxdiff.data.prior.class_indices`)."""
    local = _check_batch_args(seed, step, global_batch_size, process_index, process_count)
    examples = _local_indices(
        step, num_examples=source.num_examples, seed=seed, global_batch_size=global_batch_size,
        process_index=process_index, local_batch_size=local,
    )  # fmt: skip
    return _read(source, examples)


def batch_dataset(
    source: Source, *, seed: int, global_batch_size: int, process_index: int, process_count: int
) -> grain.MapDataset:
    """Endless grain MapDataset whose element s is `batch_for_step(source, step=s, ...)`."""
    local = _check_batch_args(seed, 0, global_batch_size, process_index, process_count)
    indices = functools.partial(
        _local_indices, num_examples=source.num_examples, seed=seed, global_batch_size=global_batch_size,
        process_index=process_index, local_batch_size=local,
    )  # fmt: skip
    return grain.MapDataset.range(sys.maxsize).map(indices).map(functools.partial(_read, source))


class BatchIterator:
    """Batches of steps start_step, start_step + 1, ..., read ahead by grain's prefetch threads.

    Reading starts at once (the first batches load while the train step compiles). `get_state()`
    is a JSON-serialisable dict naming the next step (and the seed, batch size and dataset size it
    belongs to); `set_state(state)` continues from there. `close()`, leaving a `with` block or
    garbage collection stops the threads.
    """

    def __init__(self, dataset: grain.MapDataset, *, start_step: int, prefetch: int, identity: dict[str, int]):
        self._closed = True  # until the grain iterator exists
        options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
        self._iterator = iter(dataset.to_iter_dataset(options))
        self._identity = identity
        self._closed = False
        self._iterator.set_state({"next_index": start_step})
        self._iterator.start_prefetch()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise StopIteration
        return next(self._iterator)

    def get_state(self) -> dict[str, int]:
        """{"step": next step to be returned, "seed", "global_batch_size", "num_examples"}."""
        return {"step": int(self._iterator.get_state()["next_index"]), **self._identity}

    def set_state(self, state: dict[str, int]) -> None:
        """Continue from `state` (a `get_state()` of an iterator over the same source, seed and batch size)."""
        expected = {"step", *self._identity}
        if not isinstance(state, dict) or set(state) != expected:
            raise WeightsError(f"data iterator state must be a dict with keys {sorted(expected)}, got {state!r}")
        changed = [f"{k}={state[k]} (this run: {v})" for k, v in self._identity.items() if state[k] != v]
        if changed:
            raise WeightsError(f"data iterator state belongs to another input pipeline: {', '.join(changed)}")
        if not isinstance(state["step"], int) or state["step"] < 0:
            raise WeightsError(f"data iterator state step must be an int >= 0, got {state['step']!r}")
        self._iterator.set_state({"next_index": state["step"]})
        self._iterator.start_prefetch()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._iterator.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        self.close()


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

    Up to `prefetch` (>= 1) batches are read ahead, each by its own grain thread; use the
    iterator in a `with` block or `close()` it to stop the threads. Arguments are checked here,
    before any batch is made.
    """
    _check_batch_args(seed, start_step, global_batch_size, process_index, process_count)
    if prefetch < 1:
        raise UsageError(f"prefetch must be >= 1, got {prefetch}")
    dataset = batch_dataset(
        source, seed=seed, global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count,
    )  # fmt: skip
    identity = {"seed": seed, "global_batch_size": global_batch_size, "num_examples": source.num_examples}
    return BatchIterator(dataset, start_step=start_step, prefetch=prefetch, identity=identity)
