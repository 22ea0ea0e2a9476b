"""Refusing a run whose programs cannot fit in memory, from their traced shapes, before anything is allocated.

The estimate is a floor, so it never refuses a run that would fit: whatever else a compiled program keeps,
at some moment it holds its arguments (the train state and the batch) and the largest single result of a
convolution or matrix product it computes (`largest_buffer`: XLA fuses elementwise work into its neighbours,
but these results are written out). For a train step that largest result is typically the first feature map of
the whole micro-batch, [B / grad_accum_steps, H, W, ch] float32, or the output of its backward pass. A program
split over n devices holds at least 1/n of it on each.

What is available: on GPU and TPU the memory of each device (`memory_stats()["bytes_limit"]` less what is in use);
on CPU, where all of a process's devices share the host's memory, the host's available memory (Linux
`MemAvailable`, lowered to the room left under the cgroup's `memory.max` in a container). The batch as read on
the host (uint8 images, token ids) counts against host memory everywhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import jax

from jaxdiff.errors import ConfigError
from jaxdiff.models.summary import sub_jaxprs

MATRIX_PRIMITIVES = ("conv_general_dilated", "dot_general")  # XLA writes their results out in full
MEMINFO = "/proc/meminfo"
CGROUP = "/sys/fs/cgroup"


def format_bytes(count: float) -> str:
    """`count` bytes as B, KB, MB, GB or TB (powers of 1000), three significant digits."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:,.3g} TB" if count < 1000 else f"{count:,.0f} TB"


def _nbytes(aval: Any) -> int:
    return math.prod(aval.shape) * jax.numpy.dtype(aval.dtype).itemsize


def largest_buffer(jaxpr: Any) -> int:
    """Bytes of the largest result of a convolution or dot_general in `jaxpr` (a Jaxpr or ClosedJaxpr), nested
    programs (jit, scan and while bodies, remat, custom derivatives) included; 0 when there is none."""
    largest = 0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name in MATRIX_PRIMITIVES:
            largest = max(largest, _nbytes(eqn.outvars[0].aval))
        largest = max([largest, *(largest_buffer(sub) for sub in sub_jaxprs(eqn.params))])
    return largest


def _meminfo_available() -> int | None:
    try:
        with open(MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX, or the name is unknown here
        return None


def _cgroup_room() -> int | None:
    """memory.max − memory.current of this process's cgroup (v2), or None without a limit."""
    try:
        with open(os.path.join(CGROUP, "memory.max"), encoding="ascii") as f:
            limit = f.read().strip()
        with open(os.path.join(CGROUP, "memory.current"), encoding="ascii") as f:
            current = int(f.read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - current)


def host_available() -> int | None:
    """Bytes of host memory available to this process (None where the system does not say)."""
    known = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(known) if known else None


def device_available(device: jax.Device) -> int | None:
    """Bytes `device` can still allocate; None for a device without its own memory (CPU)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of `tree` (`jax.ShapeDtypeStruct` leaves with shardings; without one, all of it)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jax.numpy.dtype(leaf.dtype).itemsize
    return total


@dataclass(frozen=True)
class Floor:
    """What one program holds at least, in bytes: per device (arguments' shards + its share of the largest
    buffer) and in host memory (the host-side batch)."""

    arguments: int  # per device
    largest: int  # the largest buffer, whole (a device holds at least largest / devices of it)
    host: int  # host-side input this process reads
    devices: int

    @property
    def per_device(self) -> int:
        return self.arguments + -(-self.largest // self.devices)


def program_floor(traced: jax.stages.Traced, arguments: Any, *, devices: int, host_bytes: int = 0) -> Floor:
    """The floor of `traced` (a `jax.jit(...).trace(...)` of `arguments`, abstract with shardings) on `devices`
    devices; `host_bytes` is the host-side input it is fed from."""
    return Floor(_bytes_per_device(arguments), largest_buffer(traced.jaxpr), host_bytes, devices)


def check_fits(floor: Floor, setting: str, *, what: str) -> None:
    """ConfigError naming `setting` (e.g. "training.batch_size=64") and the estimate when `floor` exceeds the
    memory of this process's devices, or of the host (for CPU devices, and for the host-side input)."""
    devices = jax.local_devices()
    local = min(len(devices), floor.devices)
    device_room, host_room = device_available(devices[0]), host_available()
    parts = f"its largest buffer {format_bytes(floor.largest)}, arguments {format_bytes(floor.arguments)} per device"
    if floor.host:
        parts += f", input read on the host {format_bytes(floor.host)}"
    if device_room is not None:
        checks = [(floor.per_device, device_room, f"per {devices[0].platform.upper()} device"),
                  (floor.host, host_room, "of host memory")]  # fmt: skip
    else:  # CPU devices live in host memory: all of this process's, and the host-side input besides
        total = floor.arguments * local + -(-floor.largest * local // floor.devices) + floor.host
        checks = [(total, host_room, "of host memory")]
    for need, room, where in checks:
        if room is not None and need > room:
            raise ConfigError(f"{setting} cannot fit: {what} needs at least {format_bytes(need)} ({parts}) but "
                              f"{format_bytes(room)} {where} is available")  # fmt: skip
