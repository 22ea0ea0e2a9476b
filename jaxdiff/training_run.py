"""A training run in a workdir: resume, train, log, checkpoint, sample; the body of `jaxdiff train`.

The workdir holds `checkpoints/` (orbax, with the config of each step),
`config.json` (the resolved config), `metrics.jsonl`, `tensorboard/` and
`samples/` (grids from the EMA parameters). Only process 0 writes files
other than checkpoints, which every process writes collectively.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxdiff import checkpoint, data, images, samplers, sharding
from jaxdiff.config import validate
from jaxdiff.denoiser import model_denoiser
from jaxdiff.metrics import MetricsWriter
from jaxdiff.models import create_model
from jaxdiff.schedule import schedule_from_config
from jaxdiff.train import TrainState, init_train_state, make_optimizer, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class RunResult:
    step: int  # steps completed
    preempted: bool  # stopped by SIGTERM, with a checkpoint at `step`


class _PreemptionFlag:
    """Set by SIGTERM; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """True when any process was signalled (a collective when there are several processes)."""
        if jax.process_count() == 1:
            return self.raised
        return bool(np.any(multihost_utils.process_allgather(np.array(self.raised))))


def check_dataset_fits_model(source, config: ml_collections.ConfigDict) -> None:
    expected = (config.model.image_size, config.model.image_size, config.model.in_channels)
    if tuple(source.image_shape) != expected:
        raise ValueError(
            f"dataset {config.data.dataset!r} has images of shape {tuple(source.image_shape)} but the model expects "
            f"{expected} (model.image_size={config.model.image_size}, model.in_channels={config.model.in_channels})"
        )
    if config.model.num_classes > 0 and source.num_classes != config.model.num_classes:
        raise ValueError(
            f"model.num_classes={config.model.num_classes} but dataset {config.data.dataset!r} has "
            f"{source.num_classes} classes"
        )


def check_batch_layout(config: ml_collections.ConfigDict, num_devices: int) -> None:
    batch, accumulate = config.training.batch_size, config.training.grad_accum_steps
    if batch % (num_devices * accumulate):
        raise ValueError(
            f"training.batch_size={batch} must be divisible by the number of devices ({num_devices}) "
            f"times training.grad_accum_steps ({accumulate})"
        )


def fetch_replicated(tree):
    """Host copies of replicated arrays (also when they span several processes)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def sample_images(config, model, schedule, params, rng, num: int) -> jax.Array:
    """[num, H, W, C] samples in [-1, 1] from `params` with the config's sampler (labels cycle through classes)."""
    labels = None
    if config.model.num_classes > 0:
        labels = jnp.arange(num, dtype=jnp.int32) % config.model.num_classes
    denoise = model_denoiser(model, params, labels=labels, guidance=config.sampling.guidance)
    shape = (num, config.model.image_size, config.model.image_size, config.model.in_channels)
    return samplers.sample(
        denoise, schedule, shape, rng,
        sampler=config.sampling.sampler, steps=config.sampling.steps or None, eta=config.sampling.eta,
        spacing=config.sampling.spacing or None,
        clip_denoised=config.sampling.clip_denoised, var_type=config.diffusion.var_type,
        mean_type=config.diffusion.mean_type,
    )  # fmt: skip


def _check_resumable(manager, config, allow_config_change: bool) -> None:
    step = manager.latest_step()
    if step is None:
        return
    differences = checkpoint.config_differences(checkpoint.restore_config(manager, step), config)
    if differences and not allow_config_change:
        raise checkpoint.CheckpointError(
            f"the workdir holds a run with a different model/diffusion config (step {step}):\n  "
            + "\n  ".join(differences)
            + "\nUse another --workdir, or --allow-config-change to resume anyway."
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, allow_config_change: bool = False,
    progress: bool = True,
) -> RunResult:  # fmt: skip
    """Train `config` in `workdir`, resuming from its latest checkpoint; returns where the run stopped."""
    validate(config)
    workdir = os.path.abspath(os.fspath(workdir))
    tc = config.training
    model = create_model(config.model)
    schedule = schedule_from_config(config.diffusion)
    image_shape = (config.model.image_size, config.model.image_size, config.model.in_channels)
    source = data.load_dataset(config.data, image_shape_for_synthetic=image_shape)
    check_dataset_fits_model(source, config)
    mesh = sharding.make_mesh()
    check_batch_layout(config, mesh.devices.size)

    manager = checkpoint.make_manager(workdir, keep=tc.keep_checkpoints)
    _check_resumable(manager, config, allow_config_change)
    tx = make_optimizer(tc)
    replicated = sharding.replicated_sharding(mesh)
    state = jax.jit(lambda: init_train_state(config, model, tx), out_shardings=replicated)()
    restored = checkpoint.restore_latest(manager, state)
    if restored is not None:
        state = restored[1]
    start = int(fetch_replicated(state.step))
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)
        log.info("%s at step %d in %s", "resuming" if restored else "starting", start, workdir)

    train_step = jax.jit(
        make_train_step(config, model, schedule, tx),
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    sample_fn = jax.jit(
        lambda params, rng: sample_images(config, model, schedule, params, rng, tc.num_sample_images),
        out_shardings=replicated,
    )
    writer = MetricsWriter(workdir)
    bar = ProgressBar(start, tc.num_train_steps, enabled=progress and jax.process_index() == 0)
    pending: list[dict] = []
    last_time, last_step = time.perf_counter(), start
    step, preempted = start, False
    batches = data.iterate_batches(
        source, seed=config.seed, start_step=start, global_batch_size=tc.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    try:
        with _PreemptionFlag() as preemption:
            while step < tc.num_train_steps:
                state, metrics = train_step(state, sharding.global_batch(next(batches), mesh))
                pending.append(metrics)
                step += 1
                if step % tc.log_every_steps == 0 or step == tc.num_train_steps:
                    now = time.perf_counter()
                    summary = _summarise(pending, steps=step - last_step, seconds=now - last_time, batch=tc.batch_size)
                    pending, last_time, last_step = [], now, step
                    writer.write(step, summary)
                    bar.update(step, summary)
                    _raise_if_diverged(summary, step, tc.max_consecutive_nonfinite)
                if step % tc.checkpoint_every_steps == 0:
                    checkpoint.save(manager, step, state, config)
                if step % tc.sample_every_steps == 0:
                    _write_samples(workdir, step, sample_fn(state.ema_params, jax.random.PRNGKey(step)))
                if preemption.agreed():
                    preempted = True
                    log.warning("SIGTERM received: saving step %d and stopping", step)
                    break
        if manager.latest_step() != step:
            checkpoint.save(manager, step, state, config)
        manager.wait_until_finished()
    finally:
        batches.close()
        bar.close()
        writer.close()
        manager.close()
    return RunResult(step=step, preempted=preempted)


def _summarise(pending: list[dict], *, steps: int, seconds: float, batch: int) -> dict[str, float]:
    """Means of the fetched per-step metrics since the last log, plus throughput."""
    fetched = fetch_replicated(pending)
    summary = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm", "learning_rate")}
    summary["skipped_updates"] = float(fetched[-1]["skipped_updates"])
    summary["nonfinite_streak"] = float(fetched[-1]["nonfinite_streak"])
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


def _write_samples(workdir: str, step: int, samples: jax.Array) -> None:
    grid = images.make_grid(images.to_uint8(fetch_replicated(samples)))
    if jax.process_index() == 0:
        path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
        images.save_png(grid, path, scale=max(1, 128 // samples.shape[1]))


class ProgressBar:
    """tqdm bar showing loss, steps/s and images/s (process 0 only)."""

    def __init__(self, start: int, total: int, *, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, summary: dict) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(
                loss=f"{summary['loss']:.4f}", steps_s=f"{summary['steps_per_sec']:.2f}",
                images_s=f"{summary['images_per_sec']:.0f}",
            )  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
