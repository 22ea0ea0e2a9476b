"""Wall-clock timing the benchmarks share."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn()` after one untimed call; `fn` returns once its work is done (block
    on JAX results inside it)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
