"""Checkpoints of a run: orbax `CheckpointManager` under `workdir/checkpoints`, config beside each step.

Each step directory holds the train state (`state`), the resolved config
(`config`, JSON), the input pipeline's position (`data_iterator`, JSON;
absent from checkpoints of converted weights), the task's extras (`extras`,
JSON, e.g. an autoencoder's latent scaling factor; absent when it has none) and
the task's kept parameters (`kept`: weights the run uses without training them,
read from elsewhere, e.g. a latent run's autoencoder; absent when it has none).
Orbax writes into a temporary directory and renames it when
complete, so a crash mid-save leaves the earlier steps intact. A step that is
unreadable anyway (truncated files) is skipped in favour of the newest readable
one, with one warning; training also moves it aside to `<step>.damaged-<n>`
(never deleting it) so that the step can be written again. A write that finds
the disk full is one `CheckpointError` naming the folder and the space needed
(`disk_full_error`).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import sys
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxdiff.config.validation import config_from_dict, validate
from jaxdiff.errors import WeightsError
from jaxdiff.training.memory import format_bytes
from jaxdiff.training.step import make_optimizer, new_train_state, seed_keys

CHECKPOINT_DIR = "checkpoints"
# Per task, the config sections that define what it trains: a run may not resume under different values
# (nor under a different `task`). Sections a task does not read may change freely.
ARCHITECTURE_SECTIONS = {
    "diffusion": ("model", "diffusion"),
    "autoencoder": ("autoencoder", "autoencoder_loss"),
    "latent": ("model", "diffusion", "latent"),
    "class_latent": ("model", "diffusion", "latent"),
    "flow_lora": ("flow",),
}

log = logging.getLogger(__name__)


class CheckpointError(WeightsError):
    """No usable checkpoint, or one that does not fit the run (a user error; the message is one line)."""


class Restored(NamedTuple):
    step: int
    config: dict  # the config saved with the step
    state: Any
    data_state: dict | None  # the data iterator's `get_state()` at the step, if saved
    extras: dict  # the task's `checkpoint_extras` saved with the step ({} if none)
    kept: Any = None  # the task's `kept_params` saved with the step (NumPy), if asked for and saved


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "data_iterator": ocp.JsonCheckpointHandler(),
        "extras": ocp.JsonCheckpointHandler(),
        "kept": ocp.StandardCheckpointHandler(),
    }


ORBAX_PATH = f"{os.sep}orbax{os.sep}"


def _is_abandoned_io(unraisable) -> bool:
    """An echo of orbax's asynchronous reads or writes that a failure (damaged file, full disk) abandoned:
    TensorStore completing them on a closed event loop, or one of orbax's coroutines dropped unfinished."""
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and ORBAX_PATH in code.co_filename


_MANAGED: set[str] = set()  # the checkpoint folders of this process's managers


def _not_abandoned_task(record: logging.LogRecord) -> bool:
    """False for asyncio reporting, when it is collected, a task or future whose exception no one retrieved, about
    a checkpoint folder of this process (orbax abandoned it once a sibling's failure was reported)."""
    if "exception was never retrieved" not in str(record.msg):
        return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return not any(folder in text for folder in _MANAGED)


def _quiet_abandoned_io(directory: str) -> None:
    """Drop the echoes of orbax's abandoned reads and writes (installed once, for the process): `_is_abandoned_io`
    from `sys.unraisablehook` (everything else goes to the previous hook) and `_not_abandoned_task` from the
    asyncio logger. The failure itself reaches the caller as one exception, after which each abandoned read or
    write would print a traceback, up to hundreds of them, some at interpreter exit. `directory`: a checkpoint
    folder the process opens."""
    _MANAGED.add(directory)
    previous = sys.unraisablehook
    if getattr(previous, "_jaxdiff_quiet", False):
        return

    def hook(unraisable):
        if not _is_abandoned_io(unraisable):
            previous(unraisable)

    hook._jaxdiff_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_not_abandoned_task)


def make_manager(workdir: str | os.PathLike, *, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """The run's manager: keeps the newest `keep` steps (all when None, never fewer than one), saves asynchronously.

    A read-only manager needs an existing workdir and creates, saves and deletes nothing.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    if read_only and not os.path.isdir(checkpoint_dir(workdir)):
        what = "does not exist" if not os.path.exists(workdir) else f"has no {CHECKPOINT_DIR}/ directory"
        raise CheckpointError(
            f"{workdir} {what}: train with `jaxdiff train --workdir {workdir}` or import weights with `jaxdiff convert`"
        )
    _quiet_abandoned_io(checkpoint_dir(workdir))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if keep is None or read_only else max(1, keep),
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=_handlers())


def save(manager: ocp.CheckpointManager, step: int, state: Any, config: ml_collections.ConfigDict,
         data_state: dict | None = None, extras: dict | None = None, kept: Any = None) -> None:  # fmt: skip
    """Start an asynchronous save at `step` (collective on every process).

    `data_state` is the data iterator's `get_state()` after the batch of step `step - 1`; `extras` the
    task's JSON-able `checkpoint_extras` (nothing is written for None or {}); `kept` the task's
    `kept_params`, a pytree of NumPy arrays (nothing is written for None).
    """
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
    if data_state is not None:
        items["data_iterator"] = ocp.args.JsonSave(data_state)
    if extras:
        items["extras"] = ocp.args.JsonSave(extras)
    if kept is not None:
        items["kept"] = ocp.args.StandardSave(kept)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def _is_disk_full(err: BaseException | None) -> bool:
    """Whether `err` or an exception it was raised from is a full disk or quota (orbax reports TensorStore's
    as a ValueError whose message carries the system's text)."""
    texts = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err) for text in texts):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(err: BaseException, workdir: str, checkpoint_bytes: int) -> CheckpointError | None:
    """One line for a full disk under `workdir` (None when `err` is something else): the folder, the space a
    checkpoint of `checkpoint_bytes` needs and what is free, once the unfinished step orbax was writing (in
    `<step>.orbax-checkpoint-tmp*`, removed here by process 0) is gone, and the newest complete step, kept."""
    if not _is_disk_full(err):
        return None
    directory = checkpoint_dir(workdir)
    if jax.process_index() == 0:
        for partial in glob.glob(os.path.join(glob.escape(directory), "*.orbax-checkpoint-tmp*")):
            shutil.rmtree(partial, ignore_errors=True)
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []
    free = shutil.disk_usage(workdir).free
    kept = f"the newest complete checkpoint, step {steps[-1]}, is kept" if steps else "no checkpoint was completed"
    return CheckpointError(
        f"no space left on the disk of {workdir}: a checkpoint needs about {format_bytes(checkpoint_bytes)} free "
        f"and {format_bytes(free)} is; {kept}; free {format_bytes(max(0, checkpoint_bytes - free))} or more "
        "there and run again to resume"
    )


def save_model(workdir: str | os.PathLike, config: ml_collections.ConfigDict, params: Any, ema_params: Any, *,
               step: int = 0) -> None:  # fmt: skip
    """Write a run checkpoint holding given weights (e.g. converted ones), with a fresh optimizer state.

    Training can resume from it; samplers and the Pipeline use its EMA parameters.
    """
    state = new_train_state(params, ema_params, make_optimizer(config.training), seed_keys(config.seed)[1], step=step)
    manager = make_manager(workdir)
    save(manager, step, state, config)
    manager.wait_until_finished()
    manager.close()


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config saved with `step`, as a plain dict."""
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def read_saved_config(workdir: str | os.PathLike, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: the newest step whose config reads) of a run's workdir, as a plain
    dict, without its arrays; None when there is no such step or no config reads (`read_params` says why). Reads
    only."""
    manager = make_manager(workdir, read_only=True)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        for candidate in steps if step is None else [s for s in steps if s == step]:
            try:
                return restore_config(manager, candidate)
            except Exception:  # orbax raises many types for damaged files; read_params reports them
                continue
        return None
    finally:
        manager.close()


def read_extras(workdir_or_manager: str | os.PathLike | ocp.CheckpointManager, step: int | None = None) -> dict:
    """The task's extras saved with `step` (default: the newest step) of a run; {} when that step has none.

    `workdir_or_manager` is a run's workdir (read only) or an open manager of it. An autoencoder run's
    extras hold {"scaling_factor": float}, 1 / std of its EMA model's latents (`jaxdiff.training.tasks.autoencoder`),
    so latent diffusion on it reads `read_extras(ae_workdir, step)["scaling_factor"]`.
    """
    if isinstance(workdir_or_manager, ocp.CheckpointManager):
        return _read_extras(workdir_or_manager, step)
    manager = make_manager(workdir_or_manager, read_only=True)
    try:
        return _read_extras(manager, step)
    finally:
        manager.close()


def _read_extras(manager: ocp.CheckpointManager, step: int | None) -> dict:
    steps = manager.all_steps()
    if step is None:
        if not steps:
            raise CheckpointError(f"no checkpoint in {manager.directory}")
        step = max(steps)
    if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {manager.directory}; steps: {sorted(steps)}")
    if "extras" not in manager.item_metadata(step).keys():
        return {}
    return manager.restore(step, args=ocp.args.Composite(extras=ocp.args.JsonRestore())).extras


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """'a/b/c' -> (shape, dtype) of every array leaf (dict keys, attribute names and indices joined by '/')."""

    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for path, leaf in leaves}


def array_mismatches(saved: Any, target: Any) -> list[str]:
    """Readable differences between the arrays of a checkpoint (orbax metadata tree) and a target tree."""
    have, want = _flat_shapes(saved), _flat_shapes(target)
    problems = [f"{k} is not in the checkpoint" for k in want if k not in have]
    problems += [f"{k} is in the checkpoint but not in the model" for k in have if k not in want]
    problems += [
        f"{k} is saved as {have[k][1]}{list(have[k][0])} but the config needs {want[k][1]}{list(want[k][0])}"
        for k in want
        if k in have and have[k] != want[k]
    ]
    return problems


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """'key: saved -> given' for `task` and every key of the given task's `ARCHITECTURE_SECTIONS` (nested
    sections included) whose value differs; keys a saved config lacks (it predates them) count as their defaults."""
    saved, given = config_from_dict(saved).to_dict(), config.to_dict()
    if saved["task"] != given["task"]:
        return [f"task: {saved['task']!r} -> {given['task']!r}"]
    differences = []
    for section in ARCHITECTURE_SECTIONS[given["task"]]:
        _compare(saved.get(section, {}), given.get(section, {}), section, differences)
    return differences


def _compare(old: dict, new: dict, prefix: str, differences: list[str]) -> None:
    """Appends 'prefix.key: old -> new' for each leaf that differs; lists (as JSON saves tuples) equal tuples."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _compare(a, b, f"{prefix}.{key}", differences)
            continue
        a, b = (tuple(v) if isinstance(v, list) else v for v in (a, b))
        if a != b:
            differences.append(f"{prefix}.{key}: {a!r} -> {b!r}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _set_aside(directory: str, step: int) -> str:
    """Rename `directory/<step>` to the first free `<step>.damaged-<n>`; returns the new name."""
    n = 1
    while os.path.exists(os.path.join(directory, f"{step}.damaged-{n}")):
        n += 1
    name = f"{step}.damaged-{n}"
    os.rename(os.path.join(directory, str(step)), os.path.join(directory, name))
    return name


def _kept_args(saved_items) -> ocp.args.StandardRestore:
    """Restore arguments of a step's `kept` item: NumPy arrays of the saved shapes and dtypes."""
    tree = saved_items.kept.tree
    return ocp.args.StandardRestore(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), tree))


def read_kept(manager: ocp.CheckpointManager, step: int) -> Any:
    """The `kept` item of `step` (NumPy arrays), or None when the step has none."""
    saved_items = manager.item_metadata(step)
    if "kept" not in saved_items.keys():
        return None
    return manager.restore(step, args=ocp.args.Composite(kept=_kept_args(saved_items))).kept


def restore_newest(
    manager: ocp.CheckpointManager, target_for: Callable[[dict], Any], *, step: int | None = None,
    set_aside_damaged: bool = False, config: ml_collections.ConfigDict | None = None, with_kept: bool = False,
) -> Restored | None:  # fmt: skip
    """`step`, or the newest readable step; None when there are no steps.

    `target_for(saved_config)` gives the abstract state to restore into (shapes, dtypes, shardings); it
    may raise to refuse a config. A step whose arrays do not fit the target is a `CheckpointError`
    naming them, not damage. Unreadable steps newer than the one used are reported in one warning and,
    with `set_aside_damaged` (writers only; collective on every process), renamed to
    `<step>.damaged-<n>`. A requested `step` that is missing or unreadable is a `CheckpointError`.
    `config`, the run's, names the architecture keys changed since the save when arrays do not fit.
    `with_kept` also reads the step's kept parameters, as saved (NumPy).
    """
    directory = os.fspath(manager.directory)
    available = sorted(manager.all_steps(), reverse=True)
    if step is not None and step not in available:
        raise CheckpointError(f"no checkpoint at step {step} in {directory}; steps: {sorted(available)}")
    damaged: list[tuple[int, str]] = []
    for candidate in [step] if step is not None else available:
        try:
            saved_config = restore_config(manager, candidate)
            saved_items = manager.item_metadata(candidate)
            saved_arrays = saved_items.state.tree
        except Exception as err:  # orbax raises many types for damaged files
            damaged.append((candidate, _one_line(err)))
            continue
        target = target_for(saved_config)
        problems = array_mismatches(saved_arrays, target)
        if problems:
            changed = config_differences(saved_config, config) if config is not None else []
            keys = f" (config changed since the save: {'; '.join(changed)})" if changed else ""
            raise CheckpointError(
                f"checkpoint step {candidate} in {directory} does not fit the config{keys}: "
                f"{len(problems)} arrays differ, e.g. {'; '.join(problems[:3])}"
            )
        items = {"state": ocp.args.StandardRestore(target)}
        if "data_iterator" in saved_items.keys():
            items["data_iterator"] = ocp.args.JsonRestore()
        if "extras" in saved_items.keys():
            items["extras"] = ocp.args.JsonRestore()
        if with_kept and "kept" in saved_items.keys():
            items["kept"] = _kept_args(saved_items)
        try:
            restored = manager.restore(candidate, args=ocp.args.Composite(**items))
        except Exception as err:
            damaged.append((candidate, _one_line(err)))
            continue
        if damaged:
            _report_damaged(manager, damaged, candidate, set_aside_damaged)
        return Restored(candidate, saved_config, restored.state, restored.get("data_iterator"),
                        restored.get("extras") or {}, restored.get("kept"))  # fmt: skip
    if damaged:
        steps = ", ".join(str(s) for s, _ in damaged)
        raise CheckpointError(
            f"no readable checkpoint in {directory}: step(s) {steps} damaged (step {damaged[0][0]}: {damaged[0][1]})"
        )
    return None


def _report_damaged(manager: ocp.CheckpointManager, damaged: list[tuple[int, str]], used: int, set_aside: bool) -> None:
    directory = os.fspath(manager.directory)
    steps = ", ".join(str(s) for s, _ in damaged)
    moved = ""
    if set_aside:
        if jax.process_index() == 0:
            moved = " (moved aside to " + ", ".join(_set_aside(directory, s) for s, _ in damaged) + ")"
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxdiff: damaged checkpoints set aside")
        manager.reload()
    log.warning(
        "using checkpoint step %d in %s: newer step(s) %s unreadable%s; step %d: %s",
        used, directory, steps, moved, damaged[0][0], damaged[0][1],
    )  # fmt: skip


def read_params(workdir: str | os.PathLike, task_of: Callable[[ml_collections.ConfigDict], Any], *,
                step: int | None = None, ema: bool = True):  # fmt: skip
    """(config, step, params) of a run's checkpoint (newest readable when `step` is None), on this process's first device.

    `task_of(config)` gives the task whose `init_state` describes the saved state (`jaxdiff.training.runs.make_task`
    for any run: `jaxdiff.training.runs.load_run`); any topology may have written the checkpoint. `ema` picks the EMA parameters (the ones to sample and evaluate with)
    over the raw ones; the parameters the step keeps without training them are added to them (a latent run's
    autoencoder, as "vae"). Reads only: damaged steps are skipped, not moved. The task's extras of the step
    are `read_extras(workdir, step)`.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target_for(saved: dict):
        task = task_of(validate(config_from_dict(saved)))
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), jax.eval_shape(task.init_state)
        )

    manager = make_manager(workdir, read_only=True)
    try:
        restored = restore_newest(manager, target_for, step=step, with_kept=True)
    finally:
        manager.close()
    if restored is None:
        raise CheckpointError(
            f"no checkpoint in {manager.directory}: train with `jaxdiff train --workdir {workdir}` "
            "or import weights with `jaxdiff convert`"
        )
    params = restored.state.ema_params if ema else restored.state.params
    if restored.kept is not None:
        params = {**params, **jax.device_put(restored.kept, device)}
    return validate(config_from_dict(restored.config)), restored.step, params
