"""Stopping a run cleanly: SIGTERM or a first Ctrl-C asks the run to save at the next step boundary and stop;
a second Ctrl-C exits at once. Every process of a job agrees before stopping.

While a run prepares (reads its data, builds and compiles its programs, restores its checkpoint) it has
trained nothing it could save, so there SIGTERM or a first Ctrl-C stop it at once: the handler raises
`StopRequested` in the main thread. Work that holds the main thread inside C++ for long (compilation) runs on
a worker thread (`StopSignals.run`) so that the main thread can take the signal meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

WAIT_SECONDS = 0.05  # how often the main thread wakes while a worker thread runs (a signal wakes it anyway)


class StopRequested(BaseException):
    """SIGTERM or SIGINT while the run prepares. A BaseException, as KeyboardInterrupt is: no `except Exception`
    on the way (e.g. one that reads a failed restore as a damaged checkpoint) may take it for an error."""


class StopSignals:
    """SIGTERM or a first SIGINT: stop at the next step boundary (or at once while `preparing()`); a second
    SIGINT: `on_abort()`, exit 130 at once.

    `abandoned` lists the worker threads a stop left running (a compilation cannot be cancelled); the
    interpreter waits for them before it exits, which a command that is done may skip with `os._exit`.
    """

    def __init__(self, on_abort: Callable[[], None]):
        self.received: str | None = None
        self.abandoned: list[threading.Thread] = []
        self._on_abort = on_abort
        self._previous: dict[int, object] = {}
        self._preparing = False

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
            if self._preparing:
                log.warning("%s received while preparing: stopping now (no step trained, nothing to save)", name)
                raise StopRequested(name)
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

    @contextlib.contextmanager
    def preparing(self):
        """Within: a stop signal raises `StopRequested` at once (also one received before entering). A job of
        several processes keeps stopping at step boundaries, where all of them agree."""
        self._preparing = jax.process_count() == 1
        try:
            if self._preparing and self.received is not None:
                raise StopRequested(self.received)
            yield
        finally:
            self._preparing = False

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on a worker thread while the main thread waits, so that a stop signal is taken at once;
        returns its result or raises its exception. A `StopRequested` leaves the worker running (`abandoned`)."""
        outcome: dict[str, Any] = {}
        done = threading.Event()  # waited on, not the thread: an exception in join() would mark it finished

        def work():
            try:
                outcome["result"] = fn(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = err
            finally:
                done.set()

        worker = threading.Thread(target=work, name=f"jaxdiff-{getattr(fn, '__name__', 'work')}")
        try:
            worker.start()  # waits for the thread to start: a signal may come meanwhile
            while not done.wait(WAIT_SECONDS):
                pass
        except StopRequested:
            self.abandoned.append(worker)
            raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def agreed(self) -> bool:
        """True when any process was signalled (a collective when there are several processes)."""
        if jax.process_count() == 1:
            return self.received is not None
        return bool(np.any(multihost_utils.process_allgather(np.array(self.received is not None))))
