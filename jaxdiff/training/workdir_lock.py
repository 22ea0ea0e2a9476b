"""`workdir/train.lock`: one training job per workdir, with stale locks of dead processes taken over."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxdiff.training.checkpoint import CheckpointError

LOCK_FILE = "train.lock"

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_lock(path: str) -> dict | None:
    """The holder recorded in lock file `path`; None when there is no such file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"lock file {path} is unreadable; delete it if no run uses this workdir") from None


def _create_exclusive(path: str, record: dict) -> bool:
    """Atomically create `path` holding `record` (written aside, then hard-linked); False if it exists."""
    staging = f"{path}.{record['job']}"
    with open(staging, "x", encoding="utf-8") as f:
        json.dump(record, f)
    try:
        os.link(staging, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(staging)


def _remove_stale(path: str, holder: dict) -> bool:
    """Remove lock `path` if it still records `holder`; moving it aside first keeps a racing new lock intact."""
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read_lock(aside) != holder:  # another process took the lock meanwhile: put its lock back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        os.unlink(aside)
        return False
    os.unlink(aside)
    return True


def _make_folders(path: str) -> str | None:
    """Create folder `path` and its missing parents; returns the outermost one created (None: it existed)."""
    missing = None
    parent = path
    while not os.path.exists(parent):
        missing, parent = parent, os.path.dirname(parent)
    os.makedirs(path, exist_ok=True)
    return missing


def _remove_if_empty(path: str, outermost: str) -> None:
    """Remove the folder tree `path` if it holds no file, then its parents up to `outermost` while empty."""
    if any(files for _, _, files in os.walk(path)):
        return
    with contextlib.suppress(OSError):
        for folder, _, _ in os.walk(path, topdown=False):
            os.rmdir(folder)
        while path != outermost:
            path = os.path.dirname(path)
            os.rmdir(path)


class WorkdirLock:
    """`workdir/train.lock`: one training job per workdir, taken before any work and released on exit.

    Process 0 creates the file atomically with {"pid", "host", "job"}; the job's other processes accept
    it when it holds the job id process 0 broadcast. The lock of a process that is gone (same host,
    pid not running) is taken over. Creating the lock also checks that the workdir is writable.

    The folders the lock creates (the workdir and any missing parents) are removed again on release when the
    run left no file in them, so a run refused after taking the lock leaves nothing behind.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._record: dict | None = None
        self._created: str | None = None  # the outermost folder the lock created

    def __enter__(self):
        record, error = None, None
        if jax.process_index() == 0:
            try:
                record = self._acquire()
            except CheckpointError as err:
                error = err
        if jax.process_count() > 1:
            self._agree_on_job(record)
        if error is not None:
            self.release()
            raise error
        self._record = record
        return self

    def _acquire(self) -> dict:
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise CheckpointError(f"workdir {self.workdir} is a file, not a directory")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "job": uuid.uuid4().hex}
        try:
            self._created = _make_folders(self.workdir)
            for _ in range(3):
                if _create_exclusive(self.path, record):
                    return record
                holder = _read_lock(self.path)
                if holder is None:  # released meanwhile
                    continue
                if holder.get("host") != record["host"] or _pid_alive(holder.get("pid", -1)):
                    raise CheckpointError(
                        f"workdir {self.workdir} is in use by process {holder.get('pid')} on host {holder.get('host')} "
                        f"(lock {self.path}); stop that run or use another --workdir"
                    )
                if _remove_stale(self.path, holder):
                    log.warning("took over the lock of process %s, which is no longer running", holder.get("pid"))
        except OSError as err:
            raise CheckpointError(f"cannot write to workdir {self.workdir}: {err.strerror or err}") from None
        raise CheckpointError(f"could not lock workdir {self.workdir}: {self.path} keeps changing hands")

    def _agree_on_job(self, record: dict | None) -> None:
        """Every process learns process 0's job id (zeros: it failed) and checks the lock file holds it."""
        job = bytes.fromhex(record["job"]) if record else bytes(16)
        shared = multihost_utils.broadcast_one_to_all(np.frombuffer(job, np.uint8).astype(np.int32))
        job = bytes(np.asarray(shared).astype(np.uint8)).hex()
        if jax.process_index() == 0:
            return
        if job == bytes(16).hex():
            raise CheckpointError(f"process 0 could not lock workdir {self.workdir} (see its error)")
        holder = _read_lock(self.path)
        if holder is None or holder.get("job") != job:
            raise CheckpointError(f"lock {self.path} is not this job's (it holds {holder}); is the workdir shared?")

    def release(self) -> None:
        """Remove the lock if this process created it and still holds it, and the folders it created if empty."""
        if self._record is not None:
            with contextlib.suppress(OSError, CheckpointError):
                if _read_lock(self.path) == self._record:
                    os.unlink(self.path)
            self._record = None
        if self._created is not None:
            _remove_if_empty(self.workdir, self._created)
            self._created = None

    def __exit__(self, *exc_info):
        self.release()
