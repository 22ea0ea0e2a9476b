"""Run metrics: JSON lines and TensorBoard under the workdir, written by process 0 only."""

from __future__ import annotations

import json
import os
import sys

import jax


def _summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without PyTorch where PyTorch is not loaded yet: tensorboardX imports
    torch when it is installed, only to accept torch tensors (never passed here), which costs a training process
    over a second and hundreds of MB. `sys.modules["torch"] = None` makes that import fail for the duration."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl` and scalars to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tensorboard = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
