"""Faults of a training run: damaged checkpoints, retention, bad workdirs, locks, signals, crashes, chatter."""

import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import ml_collections
import pytest

from jaxdiff.training import checkpoint
from jaxdiff.training.runs import load_run

from jaxdiff.training import loop as training_run
from jaxdiff.training.checkpoint import CheckpointError
from jaxdiff.cli import load_config
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.training.loop import train_and_evaluate
from jaxdiff.training.workdir_lock import LOCK_FILE, WorkdirLock
from tests.helpers import ROOT, TINY_CONFIG, write_workdir, xla_flags
from tests.test_training_run import (
    SUBPROCESS_ENV, cli, leaves, metrics_lines, restored_checkpoint, saved_state, train_args,
)  # fmt: skip


def tiny(**training):
    return load_config(TINY_CONFIG, [f"--config.training.{k}={v}" for k, v in training.items()])


def damage(step_dir):
    """Truncate every file of a step's state to a third, as a crash of the storage would."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])


def warnings_of(caplog, logger: str = ""):
    """Messages of the WARNING-or-worse records captured, of `logger` and its children ("": all loggers)."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and (r.name == logger or r.name.startswith(f"{logger}.") or not logger)]


def forbid_work(monkeypatch):
    """Fail the test if the run gets as far as building its model."""

    def fail(*args, **kwargs):
        raise AssertionError("the run started working before rejecting its workdir")

    monkeypatch.setattr(training_run, "make_task", fail)


# ---------------------------------------------------------------- retention and damaged checkpoints


def test_retention_never_deletes_the_newest_checkpoint(tmp_path):
    config = ml_collections.ConfigDict({"seed": 0})
    manager = checkpoint.make_manager(tmp_path)
    for step in (160, 180, 200):
        checkpoint.save(manager, step, {"w": jnp.full((3,), float(step))}, config)
    manager.close()
    manager = checkpoint.make_manager(tmp_path, keep=0)
    checkpoint.save(manager, 220, {"w": jnp.full((3,), 220.0)}, config)
    manager.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["220"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_damaged_latest_is_skipped_by_readers_and_moved_aside_by_training(tmp_path, caplog):
    config = tiny(num_train_steps=4, checkpoint_every_steps=2, log_every_steps=1)
    train_and_evaluate(config, tmp_path, progress=False)
    _, reference = saved_state(tmp_path, 4)
    ckpt = tmp_path / "checkpoints"
    damage(ckpt / "4")

    caplog.set_level(logging.WARNING)
    caplog.clear()  # only what reading says, not what the first run said
    _, step, _ = load_run(tmp_path)
    assert step == 2
    assert sorted(os.listdir(ckpt)) == ["2", "4"]  # readers never rename
    [warning] = warnings_of(caplog, "jaxdiff")
    assert "using checkpoint step 2" in warning and "step(s) 4 unreadable" in warning and "\n" not in warning

    caplog.clear()
    result = train_and_evaluate(config, tmp_path, progress=False)
    assert result.step == 4
    assert sorted(os.listdir(ckpt)) == ["2", "4", "4.damaged-1"]
    [warning] = warnings_of(caplog, "jaxdiff")
    assert "moved aside to 4.damaged-1" in warning
    _, retrained = saved_state(tmp_path, 4)
    for a, b in zip(leaves(reference), leaves(retrained), strict=True):
        assert (a == b).all()
    assert [m["step"] for m in metrics_lines(tmp_path)] == [1, 2, 3, 4]  # steps 3, 4 once, though trained twice
    for step in (2, 4):  # the input pipeline's position, saved with each step and restored with it
        data_state = {"step": step, "seed": config.seed, "global_batch_size": 8, "num_examples": 50_000}
        assert restored_checkpoint(tmp_path, step).data_state == data_state


def test_nothing_readable_is_one_line_naming_the_steps(tmp_path):
    write_workdir(tmp_path)
    for path in (tmp_path / "checkpoints").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*checkpoints: step\(s\) 7 damaged") as info:
        load_run(tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- checkpoints that do not fit


def set_saved_config(step_dir, section, key, value):
    path = step_dir / "config" / "metadata"
    saved = json.loads(path.read_text())
    saved[section][key] = value
    path.write_text(json.dumps(saved))


def test_saved_config_that_does_not_fit_its_arrays_is_one_line(tmp_path):
    write_workdir(tmp_path)
    set_saved_config(tmp_path / "checkpoints" / "7", "model", "ch", 64)
    with pytest.raises(CheckpointError, match=r"step 7 .* does not fit the config: \d+ arrays differ") as info:
        load_run(tmp_path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000
    assert "params/conv_in/kernel is saved as float32[3, 3, 3, 32] but the config needs float32[3, 3, 3, 64]" in message


@pytest.mark.timeout(600)
def test_allowed_config_change_that_does_not_fit_is_named_not_called_unreadable(tmp_path):
    write_workdir(tmp_path)
    changed = load_config(TINY_CONFIG, ["--config.training.num_train_steps=9", "--config.model.ch=64"])
    with pytest.raises(CheckpointError, match=r"model.ch: 32 -> 64.*arrays differ") as info:
        train_and_evaluate(changed, tmp_path, allow_config_change=True, progress=False)
    assert "\n" not in str(info.value) and "unreadable" not in str(info.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["7"]  # a checkpoint that does not fit is not damaged


# ---------------------------------------------------------------- workdirs


def test_workdir_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    forbid_work(monkeypatch)
    path = tmp_path / "run"
    path.write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"workdir {path} is a file"):
        train_and_evaluate(tiny(), path, progress=False)


def test_unwritable_workdir_is_refused_before_any_work(tmp_path, monkeypatch):
    forbid_work(monkeypatch)
    workdir = tmp_path / "read-only"
    workdir.mkdir()
    workdir.chmod(0o555)
    if os.access(workdir, os.W_OK):  # root ignores permissions; sysfs refuses it files
        workdir = "/sys/kernel"
        if not os.path.isdir(workdir):
            pytest.skip("running as root without /sys: no unwritable directory")
    with pytest.raises(CheckpointError, match=f"cannot write to workdir {workdir}: Permission denied"):
        train_and_evaluate(tiny(), workdir, progress=False)


def test_missing_path_is_a_one_line_error_and_reading_creates_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    missing = tmp_path / "no-such-run"
    with pytest.raises(CheckpointError, match=f"{missing} does not exist"):
        Pipeline.from_checkpoint(missing)
    with pytest.raises(CheckpointError, match="has no checkpoints/ directory"):
        load_run(tmp_path)
    assert not missing.exists() and os.listdir(tmp_path) == []
    write_workdir(tmp_path / "run")
    caplog.clear()
    load_run(tmp_path / "run")
    assert not warnings_of(caplog)  # no "Given directory is read only" from orbax


# ---------------------------------------------------------------- the workdir lock


def write_lock(workdir, pid, host):
    (workdir / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host, "job": "0" * 32}))


def test_workdir_in_use_is_refused_naming_the_holder(tmp_path, monkeypatch):
    forbid_work(monkeypatch)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path, holder.pid, socket.gethostname())
        with pytest.raises(CheckpointError, match=f"in use by process {holder.pid} on host {socket.gethostname()}"):
            train_and_evaluate(tiny(), tmp_path, progress=False)
    finally:
        holder.kill()
        holder.wait()
    write_lock(tmp_path, holder.pid, "another-host")  # a process elsewhere cannot be checked: never taken over
    with pytest.raises(CheckpointError, match=f"in use by process {holder.pid} on host another-host"):
        train_and_evaluate(tiny(), tmp_path, progress=False)


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, dead.pid, socket.gethostname())
    caplog.set_level(logging.WARNING)
    with WorkdirLock(str(tmp_path)):
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(CheckpointError, match=f"in use by process {os.getpid()}"):
            WorkdirLock(str(tmp_path)).__enter__()
    assert f"took over the lock of process {dead.pid}" in " ".join(warnings_of(caplog))
    assert os.listdir(tmp_path) == []  # released, no staging files left


@pytest.mark.timeout(300)
def test_second_train_on_a_workdir_in_use_is_refused_in_one_line(tmp_path):
    write_lock(tmp_path, os.getpid(), socket.gethostname())  # this test process holds it
    proc = cli(*train_args(tmp_path, 2), timeout=240)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and f"in use by process {os.getpid()}" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]


# ---------------------------------------------------------------- signals


def start_training(workdir, steps, *overrides):
    env = {**SUBPROCESS_ENV, "XLA_FLAGS": xla_flags(1)}
    return subprocess.Popen([sys.executable, "-m", "jaxdiff.cli", *train_args(workdir, steps, *overrides)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(condition, proc, seconds=240):
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigint_saves_at_the_next_step_and_exits_cleanly(tmp_path):
    proc = start_training(tmp_path, 100_000, "--config.training.log_every_steps=1",
                          "--config.training.checkpoint_every_steps=100000")  # fmt: skip
    try:
        wait_for(lambda: len(metrics_lines(tmp_path)) >= 2, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGINT received: saving at the next step boundary and stopping" in err
    assert "Traceback" not in err
    stopped = metrics_lines(tmp_path)[-1]["step"]
    assert saved_state(tmp_path)[0] == stopped >= 2
    assert not (tmp_path / LOCK_FILE).exists()


SECOND_SIGINT = """
import os, signal, sys, time
from jaxdiff.training.stop_signals import StopSignals
from jaxdiff.training.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1]) as lock, StopSignals(on_abort=lock.release) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.received == "SIGINT" and os.path.exists(lock.path)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)
"""


def test_second_sigint_exits_at_once_with_status_130_and_releases_the_lock(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGINT, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, env=SUBPROCESS_ENV, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "second SIGINT: exiting at once without saving" in proc.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- crashes


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_during_saves_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps, common = 8, ["--config.training.checkpoint_every_steps=1", "--config.training.log_every_steps=1"]
    straight = cli(*train_args(tmp_path / "straight", steps, *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed, rng, kills = tmp_path / "killed", random.Random(0), 0
    for _ in range(3):
        before = set(os.listdir(killed / "checkpoints")) if (killed / "checkpoints").exists() else set()
        proc = start_training(killed, steps, *common)
        try:
            saving = lambda: (killed / "checkpoints").exists() and any(  # noqa: E731
                "orbax-checkpoint-tmp" in name for name in set(os.listdir(killed / "checkpoints")) - before
            )
            wait_for(saving, proc)
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            kills += proc.returncode == -signal.SIGKILL
        finally:
            proc.kill()
    assert kills == 3
    resumed = cli(*train_args(killed, steps, *common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, a = saved_state(tmp_path / "straight")
    _, b = saved_state(killed)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        assert (x == y).all()
    losses = lambda d: [(m["step"], m["loss"]) for m in metrics_lines(d)]  # noqa: E731
    assert losses(killed) == losses(tmp_path / "straight")
    assert [s for s, _ in losses(killed)] == list(range(1, steps + 1))


# ---------------------------------------------------------------- chatter


def test_library_logs_are_quiet_during_a_run_unless_verbose(caplog):
    caplog.set_level(logging.INFO)
    absl, jaxdiff_logger = logging.getLogger("absl"), logging.getLogger("jaxdiff")
    levels = absl.level, jaxdiff_logger.level
    absl.setLevel(logging.INFO)
    try:
        for verbose, jaxdiff_level, message in [(False, logging.DEBUG, "hidden"), (None, logging.INFO, "hidden too"),
                                                (True, logging.INFO, "shown"), (None, logging.DEBUG, "shown too")]:
            jaxdiff_logger.setLevel(jaxdiff_level)
            with training_run._library_logs(verbose):
                absl.info(message)
            assert absl.level == logging.INFO  # restored
    finally:
        absl.setLevel(levels[0])
        jaxdiff_logger.setLevel(levels[1])
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == ["shown", "shown too"]


def console_lines(text: str) -> list[str]:
    """What a terminal shows: one line per newline, of which only the last carriage-return update remains."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_training_prints_a_few_lines_and_one_progress_bar(tmp_path):
    args = train_args(tmp_path, 8, "--config.training.checkpoint_every_steps=2",
                      "--config.training.sample_every_steps=8", "--config.training.keep_checkpoints=2")  # fmt: skip
    # Bytes, not text=True: universal newlines would turn the bar's carriage returns into newlines.
    proc = subprocess.run([sys.executable, "-m", "jaxdiff.cli", *args], capture_output=True, timeout=300, cwd=ROOT,
                          env={**SUBPROCESS_ENV, "XLA_FLAGS": xla_flags(1)})  # fmt: skip
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr[-3000:]
    lines = console_lines(stdout) + console_lines(stderr)
    bars = [line for line in lines if re.search(r"\d/8 \[", line)]
    others = [line for line in lines if line not in bars]
    assert len(bars) == 1 and "8/8" in bars[0], lines
    assert len(others) <= 5, others
    assert sum("compiled in" in line for line in others) == 1
    assert any(f"wrote checkpoints [2, 4, 6, 8] to {tmp_path / 'checkpoints'}" in line for line in others), others
    assert sum("finished at step 8" in line for line in console_lines(stdout)) == 1, stdout  # the result, once
    assert not any("finished at step" in line for line in console_lines(stderr)), stderr


def test_config_differences_reads_nested_sections_saved_as_json():
    import json

    from jaxdiff.training.checkpoint import config_differences
    from jaxdiff.config import default_config

    config = default_config()
    saved = json.loads(json.dumps(config.to_dict()))  # tuples come back as lists, sections as dicts
    assert config_differences(saved, config) == []
    saved["model"]["ncsnpp"]["ch_mult"] = [1, 2]
    assert config_differences(saved, config) == [f"model.ncsnpp.ch_mult: (1, 2) -> {tuple(config.model.ncsnpp.ch_mult)!r}"]
