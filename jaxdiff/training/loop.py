"""A training run in a workdir: lock, resume, train, log, checkpoint, sample; the body of `jaxdiff train`.

What is trained is the `jaxdiff.training.tasks.Task` that `config.task` names (the diffusion model, the
autoencoder, latent diffusion); the loop is the same for each. The workdir holds `checkpoints/`
(orbax, with the config and the task's extras of each step),
`config.json` (the resolved config), `metrics.jsonl` (one line per logged
step, each step at most once, also after a crash and resume), `tensorboard/`,
`samples/` (grids from the EMA parameters) and, while a run is going,
`train.lock`. Only process 0 writes files other than checkpoints, which every
process writes collectively. SIGTERM or Ctrl-C saves at the next step
boundary and stops (while the run still prepares, before its first step, it
stops at once: there is nothing to save); a second Ctrl-C exits at once.

Before anything is allocated, the train step and the sample grid are traced
on abstract inputs and a batch or grid that cannot fit in memory is refused
in one line with the estimate (`jaxdiff.training.memory`). Checkpoints are
written asynchronously, but each is committed before the second step after
it starts, so a run killed at any step loses at most one checkpoint interval
and one step. A full disk ends the run with one line naming the folder and
the space needed (`checkpoint.disk_full_error`), the last complete
checkpoint kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdiff import data, images, sharding

from jaxdiff.errors import ConfigError, TrainingDivergedError
from jaxdiff.training import checkpoint, memory
from jaxdiff.training.checkpoint import CheckpointError
from jaxdiff.config.validation import validate
from jaxdiff.training.metrics_log import MetricsWriter
from jaxdiff.training.stop_signals import StopRequested, StopSignals
from jaxdiff.training.runs import configured_image_shape, make_task
from jaxdiff.training.workdir_lock import WorkdirLock

METRICS_FILE = "metrics.jsonl"
# Loggers of the libraries under a run (orbax logs through absl), kept at WARNING unless verbose.
LIBRARY_LOGGERS = ("absl",)

log = logging.getLogger(__name__)


class NonFiniteLossError(TrainingDivergedError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class RunResult:
    step: int | None  # steps completed (None: stopped while preparing, before the workdir's checkpoints were read)
    preempted: bool  # stopped by SIGTERM or SIGINT, with a checkpoint at `step` (or none, at step 0)
    summary: str  # one line: how the run ended and what it wrote where (the CLI's result line)
    # Work a stop while preparing left running on worker threads (a compilation cannot be cancelled): the
    # interpreter waits for it before exiting, which a program that is done may skip with os._exit.
    abandoned: tuple = ()


# orbax's advice when a save waited for the previous one: the loop waits for each save on purpose (`_Run.train`).
ORBAX_WAIT_ADVICE = "Waiting for previous save to complete took"


def _not_orbax_noise(record: logging.LogRecord) -> bool:
    """False for what orbax logs that the run reports better itself: an exception a background thread hands to
    the thread that waits for it (which reports it once; e.g. four tracebacks for one full disk), and
    `ORBAX_WAIT_ADVICE`; True for every other record."""
    if checkpoint.ORBAX_PATH not in record.pathname:
        return True
    return record.exc_info is None and not str(record.msg).startswith(ORBAX_WAIT_ADVICE)


@contextlib.contextmanager
def _library_logs(verbose: bool | None):
    """Library loggers at WARNING for the duration (orbax logs ≈40 INFO lines per save) and without orbax's
    `_not_orbax_noise`, unless `verbose`.

    `verbose` None: verbose when the `jaxdiff` logger is at DEBUG (as `jaxdiff -v` sets it).
    """
    if verbose is None:
        verbose = logging.getLogger("jaxdiff").isEnabledFor(logging.DEBUG)
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
        logger.addFilter(_not_orbax_noise)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
            logger.removeFilter(_not_orbax_noise)


def _write_atomically(path: str, text: str) -> None:
    """Replace `path` by `text` in one rename, so a crash leaves the old or the new file, never a mix (and an
    exception, no staging file)."""
    staging = f"{path}.tmp-{os.getpid()}"
    try:
        with open(staging, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def truncate_metrics(workdir: str, step: int) -> None:
    """Keep only lines of `workdir/metrics.jsonl` with step <= `step` (and no torn last line): a resumed run rewrites the rest."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # torn by a crash mid-write
            continue
    if len(kept) != len(lines):
        _write_atomically(path, "".join(kept))


def check_batch_layout(config: ml_collections.ConfigDict, num_devices: int) -> None:
    batch, accumulate = config.training.batch_size, config.training.grad_accum_steps
    if batch % (num_devices * accumulate):
        raise ConfigError(
            f"training.batch_size={batch} must be divisible by the number of devices ({num_devices}) "
            f"times training.grad_accum_steps ({accumulate})"
        )


def fetch_replicated(tree):
    """Host copies of replicated arrays (also when they span several processes)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def _restore(manager, target, config, allow_config_change: bool) -> checkpoint.Restored | None:
    """The newest readable checkpoint (damaged newer ones moved aside) restored into `target` (the abstract
    state, with shardings), or None for a new run."""

    def check_config(saved: dict):
        differences = checkpoint.config_differences(saved, config)
        if differences and not allow_config_change:
            raise CheckpointError(
                f"the workdir holds a run with a different {config.task} config ({'; '.join(differences)}); "
                "use another --workdir, or --allow-config-change to resume anyway"
            )
        return target

    return checkpoint.restore_newest(manager, check_config, set_aside_damaged=True, config=config)


def _will_sample(start: int, total: int, every: int) -> bool:
    """Whether steps start+1..total include a multiple of `every` (a sample grid to draw)."""
    return total // every > start // every


def _compile(traced: jax.stages.Traced) -> jax.stages.Compiled:
    return traced.lower().compile()


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, allow_config_change: bool = False,
    progress: bool = True, verbose: bool | None = None,
) -> RunResult:  # fmt: skip
    """Train `config` in `workdir`, resuming from its newest readable checkpoint; returns where the run stopped.

    `progress` shows a progress bar. `verbose` lets the libraries' INFO logs (orbax: dozens of lines per
    save) through; None: when the `jaxdiff` logger is at DEBUG. A refusal (a `JaxdiffError`) leaves a
    workdir it created removed again.
    """
    validate(config)
    mesh = sharding.make_mesh(config.training.fsdp)  # before the lock: a bad fsdp touches no file
    workdir = os.path.abspath(os.fspath(workdir))
    with WorkdirLock(workdir) as lock, _library_logs(verbose), StopSignals(on_abort=lock.release) as stop:
        run = _Run(config, workdir, mesh, stop, progress=progress)
        try:
            with contextlib.ExitStack() as cleanup:  # closes, last opened first, whatever happens
                with stop.preparing():
                    run.prepare(cleanup, allow_config_change=allow_config_change)
                return run.train()
        except StopRequested:
            where = "" if run.start is None else f", at step {run.start}"
            summary = f"stopped by {stop.received} while preparing{where}: no step trained, nothing saved"
            return RunResult(step=run.start, preempted=True, summary=summary, abandoned=tuple(stop.abandoned))
        except Exception as err:
            full = checkpoint.disk_full_error(err, workdir, run.checkpoint_bytes)
            if full is None:
                raise
            raise full from None


class _Run:
    """One run on `mesh` with the workdir locked and the stop signals handled: `prepare` (everything before the
    first step: the data, the task, the memory check, the state, compilation), then `train`."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh, stop: StopSignals, *, progress: bool):
        self.config, self.workdir, self.mesh, self.stop, self.progress = config, workdir, mesh, stop, progress
        self.start: int | None = None  # the step the run starts (or resumes) at, once known
        self.checkpoint_bytes = 0  # the size of one checkpoint's arrays, once known

    def prepare(self, cleanup: contextlib.ExitStack, *, allow_config_change: bool) -> None:
        config, mesh, tc = self.config, self.mesh, self.config.training
        image_shape = configured_image_shape(config)  # folder images of latent runs: model.image_size
        source = data.load_dataset(config.data, image_shape_for_synthetic=image_shape,
                                   image_size=image_shape[0] if image_shape else config.model.image_size)  # fmt: skip
        task = self.task = make_task(config, source, workdir=self.workdir)
        task.check_source(source)
        check_batch_layout(config, mesh.devices.size)

        programs = trace_programs(task, source, config, mesh)  # compiled below, once no check refuses the run
        check_memory(programs, config)
        self.kept = task.kept_params()
        self.checkpoint_bytes = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                                    for leaf in jax.tree.leaves((programs.state, self.kept)))  # fmt: skip

        self.manager = checkpoint.make_manager(self.workdir, keep=tc.keep_checkpoints)
        cleanup.callback(self.manager.close)
        restored = _restore(self.manager, programs.state, config, allow_config_change)
        if restored is not None:
            task.check_resumed(restored.extras)
            self.state = restored.state
        else:
            self.state = self.stop.run(jax.jit(task.init_state, out_shardings=programs.state_sharding))
        self.start = int(fetch_replicated(self.state.step))
        self.main_process = jax.process_index() == 0
        if self.main_process:
            truncate_metrics(self.workdir, self.start)
            config_text = json.dumps(config.to_dict(), indent=2, default=str)
            _write_atomically(os.path.join(self.workdir, "config.json"), config_text)
            log.info("%s at step %d in %s", "resuming" if restored is not None else "starting", self.start,
                     self.workdir)  # fmt: skip

        self.batches = data.iterate_batches(
            source, seed=config.seed, start_step=self.start, global_batch_size=tc.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
        cleanup.callback(self.batches.close)
        if restored is not None and restored.data_state is not None:
            self.batches.set_state(restored.data_state)
        compile_start = time.perf_counter()  # the first batches load meanwhile
        self.train_step = self.stop.run(_compile, programs.step)
        self.sample_fn = None
        if _will_sample(self.start, tc.num_train_steps, tc.sample_every_steps):
            self.sample_fn = self.stop.run(_compile, programs.sample)
        if self.main_process:
            log.info("compiled in %.1f s", time.perf_counter() - compile_start)
        self.writer = MetricsWriter(self.workdir)
        cleanup.callback(self.writer.close)
        self.bar = ProgressBar(self.start, tc.num_train_steps, enabled=self.main_process and self.progress)
        cleanup.callback(self.bar.close)

    def _save(self, step: int) -> None:
        checkpoint.save(self.manager, step, self.state, self.config, self.batches.get_state(),
                        self.task.checkpoint_extras(self.state), self.kept)  # fmt: skip

    def train(self) -> RunResult:
        """Steps from `start` until `training.num_train_steps` or an agreed stop, then the last checkpoint."""
        tc, task, stop, workdir = self.config.training, self.task, self.stop, self.workdir
        global_batches = (sharding.global_batch(task.host_batch(b), self.mesh) for b in self.batches)
        pending: list[dict] = []
        saved_steps, sampled, writing = [], False, None  # writing: the step of a save not yet waited for
        step = last_step = self.start
        last_time, paused = time.perf_counter(), 0.0  # paused: seconds spent sampling
        while step < tc.num_train_steps and not stop.agreed():
            self.state, metrics = self.train_step(self.state, next(global_batches))
            pending.append(metrics)
            step += 1
            if writing is not None:  # the save after the previous step is committed before the next step starts
                self.manager.wait_until_finished()
                writing = None
            if step % tc.log_every_steps == 0 or step == tc.num_train_steps:
                now = time.perf_counter()
                summary = _summarise(pending, steps=step - last_step, seconds=now - last_time - paused,
                                     batch=tc.batch_size)  # fmt: skip
                pending, last_time, last_step, paused = [], now, step, 0.0
                self.writer.write(step, summary)
                self.bar.update(step, summary)
                _raise_if_diverged(summary, step, tc.max_consecutive_nonfinite)
            if step % tc.checkpoint_every_steps == 0:
                self._save(step)
                saved_steps.append(step)
                writing = step
            if step % tc.sample_every_steps == 0:
                sampling_start = time.perf_counter()
                samples = self.sample_fn(self.state.ema_params, jax.random.PRNGKey(step))
                _write_samples(workdir, step, samples, task.grid_captions)
                paused += time.perf_counter() - sampling_start
                sampled = True
        if step > self.start and self.manager.latest_step() != step:
            self._save(step)
            saved_steps.append(step)
        self.manager.wait_until_finished()
        outcome = f"stopped by {stop.received}" if stop.received else "finished"
        wrote = f"checkpoints {saved_steps} to {self.manager.directory}, " if saved_steps else ""
        samples = f", sample grids to {os.path.join(workdir, 'samples')}" if sampled else ""
        summary = f"{outcome} at step {step}: wrote {wrote}metrics to {os.path.join(workdir, METRICS_FILE)}{samples}"
        if self.main_process:
            log.debug(summary)
        return RunResult(step=step, preempted=stop.received is not None, summary=summary)


@dataclass
class Programs:
    """A run's programs traced on abstract inputs (`jax.ShapeDtypeStruct`s with their shardings)."""

    state: Any  # the train state
    state_sharding: Any
    batch: dict  # the global batch
    host_bytes: int  # this process's part of the batch as read on the host
    step: jax.stages.Traced  # the train step on (state, batch)
    sample: jax.stages.Traced | None  # the sample grid on the EMA parameters, when the run draws one
    devices: int  # of the mesh


def trace_programs(task, source, config: ml_collections.ConfigDict, mesh) -> Programs:
    """The train step of `task` on `mesh` and (when `config` samples during the run) its sample grid, traced:
    shapes only, nothing allocated, ready to be checked (`check_memory`) and compiled."""
    tc = config.training
    state_shapes = jax.eval_shape(task.init_state)
    state_sharding = sharding.state_sharding(mesh, state_shapes)
    state = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), state_shapes,
                         state_sharding)  # fmt: skip
    batch, host_bytes = _abstract_batch(task, source, config, mesh)
    replicated = sharding.replicated_sharding(mesh)
    step = jax.jit(
        task.train_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated), donate_argnums=0,
    ).trace(state, batch)  # fmt: skip
    sample = None
    if _will_sample(0, tc.num_train_steps, tc.sample_every_steps):
        sample = jax.jit(task.sample_grid, out_shardings=replicated).trace(state.ema_params, jax.random.PRNGKey(0))
    return Programs(state, state_sharding, batch, host_bytes, step, sample, mesh.devices.size)


def check_memory(programs: Programs, config: ml_collections.ConfigDict) -> None:
    """ConfigError naming training.batch_size (or training.num_sample_images) with the estimate when a program
    cannot fit in this machine's memory (`jaxdiff.training.memory`)."""
    tc = config.training
    floor = memory.program_floor(programs.step, (programs.state, programs.batch), devices=programs.devices,
                                 host_bytes=programs.host_bytes)  # fmt: skip
    memory.check_fits(floor, f"training.batch_size={tc.batch_size}", what="one training step")
    if programs.sample is not None:
        floor = memory.program_floor(programs.sample, programs.state.ema_params, devices=programs.devices)
        memory.check_fits(floor, f"training.num_sample_images={tc.num_sample_images}", what="a sample grid")


def _abstract_batch(task, source, config: ml_collections.ConfigDict, mesh) -> tuple[dict, int]:
    """(the global batch `task.train_step` takes, as `jax.ShapeDtypeStruct`s sharded over `mesh`; the bytes of this
    process's host-side part), from one example of `source` through `task.host_batch`."""
    example = task.host_batch(data.batch_for_step(source, seed=config.seed, step=0, global_batch_size=1,
                                                  process_index=0, process_count=1))  # fmt: skip
    batch_size, batch_sharding = config.training.batch_size, sharding.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct((batch_size, *np.shape(value)[1:]), np.asarray(value).dtype,
                                        sharding=batch_sharding)
             for name, value in example.items()}  # fmt: skip
    host_bytes = sum(np.asarray(value).nbytes for value in example.values()) * (batch_size // jax.process_count())
    return batch, host_bytes


COUNTERS = ("skipped_updates", "nonfinite_streak")  # metrics that are running counts: logged as their last value


def _summarise(pending: list[dict], *, steps: int, seconds: float, batch: int) -> dict[str, float]:
    """Means of every fetched per-step metric since the last log (the last value of `COUNTERS`), plus throughput."""
    fetched = fetch_replicated(pending)
    summary = {k: float(fetched[-1][k] if k in COUNTERS else np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    summary["steps_per_sec"] = steps / max(seconds, 1e-9)
    summary["images_per_sec"] = summary["steps_per_sec"] * batch
    return summary


def _raise_if_diverged(summary: dict, step: int, limit: int) -> None:
    streak = int(summary["nonfinite_streak"])
    if streak >= limit:
        raise NonFiniteLossError(
            f"{streak} consecutive steps (steps {step - streak + 1}..{step}) had a non-finite loss or gradient "
            f"(limit training.max_consecutive_nonfinite={limit}); those updates were skipped and no checkpoint "
            f"holds them: the last saved checkpoint is intact"
        )


def _write_samples(workdir: str, step: int, samples: jax.Array, captions: list[str] | None) -> None:
    """samples/step_<step>.png, and with `captions` samples/step_<step>.txt: "row r, column c: caption" per image."""
    grid = images.make_grid(images.to_uint8(fetch_replicated(samples)))
    if jax.process_index() == 0:
        path = os.path.join(workdir, "samples", f"step_{step:08d}")
        images.save_png(grid, path + ".png", scale=max(1, 128 // samples.shape[1]))
        if captions is not None:
            columns = images.grid_columns(len(captions))
            lines = [f"row {i // columns + 1}, column {i % columns + 1}: {c}\n" for i, c in enumerate(captions)]
            with open(path + ".txt", "w", encoding="utf-8") as f:
                f.writelines(lines)


class ProgressBar:
    """tqdm bar of steps with rate and ETA, loss and images/s (process 0 only); log lines print above it.

    Create it after compiling, so that its rate and ETA never include compilation.
    """

    def __init__(self, start: int, total: int, *, enabled: bool):
        self._bar = self._redirect = None
        if enabled:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def update(self, step: int, summary: dict) -> None:
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{summary['loss']:.4f}", images_s=f"{summary['images_per_sec']:.0f}", refresh=False
            )
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._redirect.__exit__(None, None, None)
            self._bar.close()
