"""A training run in a workdir: lock, resume, train, log, checkpoint, sample; the body of `jaxdiff train`.

What is trained is the `jaxdiff.training.tasks.Task` that `config.task` names (the diffusion model, the
autoencoder, latent diffusion); the loop is the same for each. The workdir holds `checkpoints/`
(orbax, with the config and the task's extras of each step),
`config.json` (the resolved config), `metrics.jsonl` (one line per logged
step, each step at most once, also after a crash and resume), `tensorboard/`,
`samples/` (grids from the EMA parameters) and, while a run is going,
`train.lock`. Only process 0 writes files other than checkpoints, which every
process writes collectively. SIGTERM or Ctrl-C saves at the next step
boundary and stops; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxdiff import data, images, sharding

from jaxdiff.errors import ConfigError, TrainingDivergedError
from jaxdiff.training import checkpoint
from jaxdiff.training.checkpoint import CheckpointError
from jaxdiff.config.validation import validate
from jaxdiff.training.metrics_log import MetricsWriter
from jaxdiff.training.stop_signals import StopSignals
from jaxdiff.training.tasks import configured_image_shape, make_task
from jaxdiff.training.workdir_lock import WorkdirLock

METRICS_FILE = "metrics.jsonl"
# Loggers of the libraries under a run (orbax logs through absl), kept at WARNING unless verbose.
LIBRARY_LOGGERS = ("absl",)

log = logging.getLogger(__name__)


class NonFiniteLossError(TrainingDivergedError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class RunResult:
    step: int  # steps completed
    preempted: bool  # stopped by SIGTERM or SIGINT, with a checkpoint at `step`
    summary: str  # one line: how the run ended and what it wrote where (the CLI's result line)


@contextlib.contextmanager
def _library_logs(verbose: bool | None):
    """Library loggers at WARNING for the duration (orbax logs ≈40 INFO lines per save), unless `verbose`.

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
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _write_atomically(path: str, text: str) -> None:
    """Replace `path` by `text` in one rename, so a crash leaves the old or the new file, never a mix."""
    staging = f"{path}.tmp-{os.getpid()}"
    with open(staging, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


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


def _restore(manager, state, config, allow_config_change: bool) -> checkpoint.Restored | None:
    """The newest readable checkpoint (damaged newer ones moved aside), or None for a new run."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, allow_config_change: bool = False,
    progress: bool = True, verbose: bool | None = None,
) -> RunResult:  # fmt: skip
    """Train `config` in `workdir`, resuming from its newest readable checkpoint; returns where the run stopped.

    `progress` shows a progress bar. `verbose` lets the libraries' INFO logs (orbax: dozens of lines per
    save) through; None: when the `jaxdiff` logger is at DEBUG.
    """
    validate(config)
    mesh = sharding.make_mesh(config.training.fsdp)  # before the lock: a bad fsdp touches no file
    workdir = os.path.abspath(os.fspath(workdir))
    with WorkdirLock(workdir) as lock, _library_logs(verbose), StopSignals(on_abort=lock.release) as stop:
        return _run(config, workdir, mesh, allow_config_change=allow_config_change, progress=progress, stop=stop)


def _run(config, workdir: str, mesh, *, allow_config_change: bool, progress: bool, stop: StopSignals) -> RunResult:
    """The run itself on `mesh`, with the workdir locked and the stop signals handled."""
    tc = config.training
    image_shape = configured_image_shape(config)  # folder images of latent runs: model.image_size
    source = data.load_dataset(config.data, image_shape_for_synthetic=image_shape,
                               image_size=image_shape[0] if image_shape else config.model.image_size)  # fmt: skip
    task = make_task(config, source)
    task.check_source(source)
    check_batch_layout(config, mesh.devices.size)

    with contextlib.ExitStack() as cleanup:  # closes, last opened first, whatever happens
        manager = checkpoint.make_manager(workdir, keep=tc.keep_checkpoints)
        cleanup.callback(manager.close)
        state_sharding = sharding.state_sharding(mesh, jax.eval_shape(task.init_state))  # everywhere below
        state = jax.jit(task.init_state, out_shardings=state_sharding)()
        restored = _restore(manager, state, config, allow_config_change)
        if restored is not None:
            task.check_resumed(restored.extras)
        state = state if restored is None else restored.state
        start = step = int(fetch_replicated(state.step))
        main_process = jax.process_index() == 0
        if main_process:
            truncate_metrics(workdir, start)
            config_text = json.dumps(config.to_dict(), indent=2, default=str)
            _write_atomically(os.path.join(workdir, "config.json"), config_text)
            log.info("%s at step %d in %s", "resuming" if restored is not None else "starting", start, workdir)

        batches = data.iterate_batches(
            source, seed=config.seed, start_step=start, global_batch_size=tc.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
        cleanup.callback(batches.close)
        if restored is not None and restored.data_state is not None:
            batches.set_state(restored.data_state)
        writer = MetricsWriter(workdir)
        cleanup.callback(writer.close)
        compile_start = time.perf_counter()
        global_batches = (sharding.global_batch(task.host_batch(b), mesh) for b in batches)
        first_batch = next(global_batches)
        replicated = sharding.replicated_sharding(mesh)
        train_step = jax.jit(
            task.train_step,
            in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        ).lower(state, first_batch).compile()
        sample_fn = None
        if _will_sample(start, tc.num_train_steps, tc.sample_every_steps):
            sample_fn = jax.jit(task.sample_grid, out_shardings=replicated).lower(
                state.ema_params, jax.random.PRNGKey(0)
            ).compile()
        if main_process:
            log.info("compiled in %.1f s", time.perf_counter() - compile_start)

        bar = ProgressBar(start, tc.num_train_steps, enabled=progress and main_process)
        cleanup.callback(bar.close)
        global_batches = itertools.chain([first_batch], global_batches)
        pending: list[dict] = []
        saved_steps, sampled = [], False
        last_time, last_step, paused = time.perf_counter(), start, 0.0  # paused: seconds spent sampling
        while step < tc.num_train_steps and not stop.agreed():
            state, metrics = train_step(state, next(global_batches))
            pending.append(metrics)
            step += 1
            if step % tc.log_every_steps == 0 or step == tc.num_train_steps:
                now = time.perf_counter()
                summary = _summarise(pending, steps=step - last_step, seconds=now - last_time - paused,
                                     batch=tc.batch_size)  # fmt: skip
                pending, last_time, last_step, paused = [], now, step, 0.0
                writer.write(step, summary)
                bar.update(step, summary)
                _raise_if_diverged(summary, step, tc.max_consecutive_nonfinite)
            if step % tc.checkpoint_every_steps == 0:
                checkpoint.save(manager, step, state, config, batches.get_state(), task.checkpoint_extras(state))
                saved_steps.append(step)
            if step % tc.sample_every_steps == 0:
                sampling_start = time.perf_counter()
                samples = sample_fn(state.ema_params, jax.random.PRNGKey(step))
                _write_samples(workdir, step, samples, task.grid_captions)
                paused += time.perf_counter() - sampling_start
                sampled = True
        if step > start and manager.latest_step() != step:
            checkpoint.save(manager, step, state, config, batches.get_state(), task.checkpoint_extras(state))
            saved_steps.append(step)
        manager.wait_until_finished()
    outcome = f"stopped by {stop.received}" if stop.received else "finished"
    wrote = f"checkpoints {saved_steps} to {manager.directory}, " if saved_steps else ""
    samples = f", sample grids to {os.path.join(workdir, 'samples')}" if sampled else ""
    summary = f"{outcome} at step {step}: wrote {wrote}metrics to {os.path.join(workdir, METRICS_FILE)}{samples}"
    if main_process:
        log.debug(summary)
    return RunResult(step=step, preempted=stop.received is not None, summary=summary)


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
