"""Stopping a run cleanly: SIGTERM or a first Ctrl-C asks the run to save at the next step boundary and stop;
a second Ctrl-C exits at once. Every process of a job agrees before stopping."""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class StopSignals:
    """SIGTERM or a first SIGINT: stop at the next step boundary; a second SIGINT: `on_abort()`, exit 130 at once."""

    def __init__(self, on_abort: Callable[[], None]):
        self.received: str | None = None
        self._on_abort = on_abort
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handlers, no stopping
                break
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            hint = " (Ctrl-C again to exit at once without saving)" if signum == signal.SIGINT else ""
            log.warning("%s received: saving at the next step boundary and stopping%s", name, hint)
        elif signum == signal.SIGINT:
            log.warning("second SIGINT: exiting at once without saving")
            self._on_abort()
            logging.shutdown()
            os._exit(130)

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def agreed(self) -> bool:
        """True when any process was signalled (a collective when there are several processes)."""
        if jax.process_count() == 1:
            return self.received is not None
        return bool(np.any(multihost_utils.process_allgather(np.array(self.received is not None))))
