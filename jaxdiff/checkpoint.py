"""Checkpoints of a run: orbax `CheckpointManager` under `workdir/checkpoints`, config beside each step.

Each step directory holds the train state (`state`) and the resolved config
(`config`, JSON). Orbax writes into a temporary directory and renames it when
complete, so a crash mid-save leaves the earlier steps intact; a step that is
unreadable anyway (truncated files) is skipped in favour of the newest
readable one, with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
# Sections that define the model and the diffusion: a run may not resume under different values.
ARCHITECTURE_SECTIONS = ("model", "diffusion")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the run."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def make_manager(workdir: str | os.PathLike, *, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """The run's manager: keeps the last `keep` steps (all when None), saves asynchronously."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=True
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
    """Start an asynchronous save of `state` and `config` at `step` (collective on every process)."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())),
        force=True,
    )


def save_model(workdir: str | os.PathLike, config: ml_collections.ConfigDict, params: Any, ema_params: Any, *,
               step: int = 0) -> None:  # fmt: skip
    """Write a run checkpoint holding given weights (e.g. converted ones), with a fresh optimizer state.

    Training can resume from it; samplers and the Pipeline use its EMA parameters.
    """
    from jaxdiff.train import make_optimizer, new_train_state, seed_keys

    state = new_train_state(params, ema_params, make_optimizer(config.training), seed_keys(config.seed)[1], step=step)
    manager = make_manager(workdir)
    save(manager, step, state, config)
    manager.wait_until_finished()
    manager.close()


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config saved with `step`, as a plain dict."""
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def restore_latest(manager: ocp.CheckpointManager, like: Any) -> tuple[int, Any] | None:
    """(step, state) of the newest readable step, shaped and sharded like `like`; None if there is none.

    Unreadable steps are skipped with a warning; if steps exist but none is
    readable, a `CheckpointError` lists them.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like))))
        except Exception as err:  # orbax raises many types for damaged files
            log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", step, manager.directory, err)
            failures.append(f"step {step}: {type(err).__name__}: {err}")
            continue
        return step, restored.state
    if failures:
        raise CheckpointError(f"no readable checkpoint in {manager.directory}:\n" + "\n".join(failures))
    return None


def restore_state(manager: ocp.CheckpointManager, step: int, like: Any) -> Any:
    """The state saved at `step`, shaped and sharded like `like`."""
    if step not in manager.all_steps():
        raise CheckpointError(f"no checkpoint at step {step} in {manager.directory}; steps: {list(manager.all_steps())}")
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like)))).state


def load_weights(workdir: str | os.PathLike, *, step: int | None = None, ema: bool = True):
    """(config, step, params) of a run's checkpoint (latest when `step` is None), on this process's first device.

    Works whatever topology wrote the checkpoint. `ema` picks the EMA parameters (the ones to sample
    and evaluate with) over the raw ones.
    """
    from jaxdiff.config import config_from_dict, validate
    from jaxdiff.models import create_model
    from jaxdiff.train import init_train_state, make_optimizer

    manager = make_manager(workdir, read_only=True)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(
                f"no checkpoint in {manager.directory}: train with `jaxdiff train --workdir {workdir}` "
                "or import weights with `jaxdiff convert`"
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {manager.directory}; steps: {steps}")
        config = validate(config_from_dict(restore_config(manager, step)))
        model, tx = create_model(config.model), make_optimizer(config.training)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        like = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
            jax.eval_shape(lambda: init_train_state(config, model, tx)),
        )
        state = restore_state(manager, step, like)
    finally:
        manager.close()
    return config, step, state.ema_params if ema else state.params


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """'key: saved -> given' for every architecture key whose value differs."""
    given = config.to_dict()
    differences = []
    for section in ARCHITECTURE_SECTIONS:
        old, new = saved.get(section, {}), given.get(section, {})
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key), new.get(key)
            if isinstance(a, list):
                a = tuple(a)
            if isinstance(b, list):
                b = tuple(b)
            if a != b:
                differences.append(f"{section}.{key}: {a!r} -> {b!r}")
    return differences
