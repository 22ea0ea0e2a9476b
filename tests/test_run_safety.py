"""Runs that refuse before work, stay self-contained, stop on signals, lose at most one interval and leave
nothing behind: each case from the command line (exit status, the one line, no traceback, the command's peak
memory, `RUSAGE_CHILDREN` of a small launcher) and from the Python API, with the files checked before and after."""

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import jax
import numpy as np
import pytest

from jaxdiff.cli import load_config, main
from jaxdiff.errors import ConfigError, WeightsError
from jaxdiff.training import checkpoint, memory
from jaxdiff.training.checkpoint import CheckpointError
from jaxdiff.training.loop import train_and_evaluate
from jaxdiff.training.workdir_lock import LOCK_FILE
from tests.helpers import ROOT, TINY_CONFIG, write_workdir, xla_flags
from tests.test_faults import console_lines
from tests.test_latent_training import latent_run_config, write_autoencoder_run
from tests.test_training_run import SUBPROCESS_ENV, metrics_lines, saved_state, train_args

ENV = {**SUBPROCESS_ENV, "XLA_FLAGS": xla_flags(1)}
# Without the persistent compilation cache: compiling then takes seconds, long enough to be signalled in it.
UNCACHED_ENV = {k: v for k, v in ENV.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float  # the child's peak resident memory
    seconds: float  # from start, or from the signal when one was sent


def files_under(path) -> list[str]:
    """Every file below `path`, relative to it."""
    return sorted(os.path.relpath(os.path.join(root, name), path) for root, _, names in os.walk(path)
                  for name in names)  # fmt: skip


def child_output(tmp_path) -> str:
    """What the child `run_child` started in `tmp_path` wrote on stdout so far."""
    return (tmp_path / "logs" / "child.out").read_text()


# Starts the command and reports its exit status and peak memory (RUSAGE_CHILDREN of this small process: the
# command alone; measured from pytest, the peak would include pytest's own memory, shared until the exec).
LAUNCHER = """
import json, os, resource, subprocess, sys, time
report, command = sys.argv[1], sys.argv[2:]
child = subprocess.Popen(command)
with open(report + ".pid", "w") as f:
    f.write(str(child.pid))
child.wait()
with open(report, "w") as f:
    json.dump({"code": child.returncode, "end": time.time(),
               "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}, f)
"""


def run_child(args, tmp_path, *, env=ENV, signal_when=None, signum=signal.SIGTERM, timeout=240) -> Finished:
    """Run `args` with stdout and stderr in files under `tmp_path/logs`; with `signal_when(stderr so far)`, send
    `signum` to it once that holds."""
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    out, err, report = logs / "child.out", logs / "child.err", logs / "report.json"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(report), *args], stdout=stdout, stderr=stderr,
                                    env=env, cwd=ROOT)  # fmt: skip
    start = time.time()
    try:
        while signal_when is not None:
            assert launcher.poll() is None, err.read_text()[-3000:]
            assert time.time() - start < timeout, "timed out waiting to signal"
            if signal_when(err.read_text()):
                os.kill(int((logs / "report.json.pid").read_text()), signum)
                start = time.time()
                break
            time.sleep(0.02)
        launcher.wait(timeout=timeout)
    finally:
        if launcher.poll() is None:  # timed out: stop both
            os.kill(int((logs / "report.json.pid").read_text()), signal.SIGKILL)
            launcher.kill()
    result = json.loads(report.read_text())
    return Finished(result["code"], out.read_text(), err.read_text(), result["peak_mb"], result["end"] - start)


def error_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that are neither jaxdiff's log messages nor the progress bar."""
    return [line for line in console_lines(stderr) if not line.startswith(("jaxdiff.", "  0%"))
            and "step/s" not in line]  # fmt: skip


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# ---------------------------------------------------------------- 5. a refusal touches nothing


def test_latent_run_with_a_missing_autoencoder_is_refused_and_creates_no_folder(tmp_path, capsys):
    missing, workdir = tmp_path / "no-such-autoencoder", tmp_path / "new" / "latent"
    with pytest.raises(WeightsError, match=f"latent.autoencoder='{missing}' does not exist"):
        train_and_evaluate(latent_run_config(str(missing)), workdir, progress=False)
    assert os.listdir(tmp_path) == []  # neither the workdir nor the parent created for it
    argv = ["train", "--config", str(ROOT / "configs" / "shapes.py"), "--workdir", str(workdir),
            f"--config.latent.autoencoder={missing}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"jaxdiff: error: config latent.autoencoder='{missing}' does not exist")
    assert os.listdir(tmp_path) == []


def test_an_existing_workdir_keeps_what_it_held_after_a_refusal(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(WeightsError, match="does not exist"):
        train_and_evaluate(latent_run_config(str(tmp_path / "missing")), tmp_path, progress=False)
    assert os.listdir(tmp_path) == ["notes.txt"]


# ---------------------------------------------------------------- 6. a latent run is self-contained


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_latent_run_keeps_its_autoencoder_when_the_autoencoder_run_moves_on(tmp_path):
    from jaxdiff.sampling.pipeline import Pipeline
    from jaxdiff.training.runs import load_run, make_task

    autoencoder = write_autoencoder_run(tmp_path / "autoencoder", step=7, scaling_factor=0.8)
    workdir = tmp_path / "latent"
    config = latent_run_config(autoencoder, steps=2)
    config.training.sample_every_steps = 1000
    train_and_evaluate(config, workdir, progress=False)
    vae = load_run(workdir)[2]["vae"]  # the kept copy, beside the trained parameters
    ae_params = checkpoint.read_params(autoencoder, make_task, step=7)[2]
    for kept, original in zip(jax.tree.leaves(vae), jax.tree.leaves(ae_params), strict=True):
        np.testing.assert_array_equal(np.asarray(kept), np.asarray(original))
    prompt, latents = ["a small red circle in the top left"], np.random.default_rng(0).standard_normal((1, 16, 16, 4))
    draw = lambda: Pipeline.from_checkpoint(workdir).text_to_image(prompt, steps=2, latents=latents.astype(np.float32),
                                                                   output_type="float")  # noqa: E731
    before = draw()

    # The autoencoder run trains on with keep_checkpoints=2: step 7, the one the latent run used, is deleted.
    ae_config = load_config(str(ROOT / "configs" / "shapes_autoencoder.py"), [
        "--config.autoencoder.block_out_channels=(8, 8)", "--config.autoencoder.norm_num_groups=8",
    ])  # fmt: skip
    manager = checkpoint.make_manager(autoencoder, keep=2)
    state = jax.jit(make_task(ae_config).init_state)()
    for step in (8, 9):
        checkpoint.save(manager, step, state, ae_config, extras={"scaling_factor": 0.5})
    manager.wait_until_finished()
    manager.close()
    assert sorted(os.listdir(os.path.join(autoencoder, "checkpoints"))) == ["8", "9"]
    np.testing.assert_array_equal(draw(), before)  # sampled with the kept copy
    config.training.num_train_steps = 3
    assert train_and_evaluate(config, workdir, progress=False).step == 3  # resumed on the kept copy
    assert checkpoint.read_extras(workdir)["autoencoder"] == {"path": autoencoder, "step": 7, "scaling_factor": 0.8}

    shutil.rmtree(autoencoder)  # even deleted
    assert Pipeline.from_checkpoint(workdir).model.vae_config.scaling_factor == 0.8
    other = write_autoencoder_run(tmp_path / "other", step=3, scaling_factor=1.25, seed=1)
    config.latent.autoencoder, config.training.num_train_steps = other, 4
    refused = rf"trained on the autoencoder {autoencoder} \(checkpoint step 7.*given {other} \(checkpoint step 3"
    with pytest.raises(WeightsError, match=refused):  # the check that a resumed run uses the same autoencoder
        train_and_evaluate(config, workdir, progress=False, allow_config_change=True)
    assert sorted(checkpoint.make_manager(workdir, read_only=True).all_steps()) == [2, 3]


# ---------------------------------------------------------------- 7. absurd sizes refused before work


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_batch_that_cannot_fit_is_refused_before_any_allocation(tmp_path):
    workdir = tmp_path / "run"
    args = ["train", "--config", "digits", "--workdir", str(workdir), "--config.training.batch_size=100000000"]
    finished = run_child([sys.executable, "-m", "jaxdiff.cli", *args], tmp_path)
    assert finished.returncode == 2, finished.stderr[-3000:]
    [line] = error_lines(finished.stderr)
    assert line.startswith("jaxdiff: error: training.batch_size=100000000 cannot fit: one training step needs at least")
    assert "its largest buffer" in line and "is available" in line and "Traceback" not in finished.stderr
    assert finished.peak_mb < 1500  # the batch alone would be 6.4 GB of uint8 images
    assert not workdir.exists()
    with pytest.raises(ConfigError, match=r"training.batch_size=100000000 cannot fit: .* TB"):
        train_and_evaluate(load_config("digits", ["--config.training.batch_size=100000000"]), workdir, progress=False)
    assert not workdir.exists()


def test_a_sample_grid_that_cannot_fit_is_refused(tmp_path):
    config = load_config(TINY_CONFIG, ["--config.training.num_sample_images=1000000000"])
    with pytest.raises(ConfigError, match=r"training.num_sample_images=1000000000 cannot fit: a sample grid needs"):
        train_and_evaluate(config, tmp_path / "run", progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["celebahq256", "edm_cifar10_cond_ve", "sde_ve_ncsnpp_deep_continuous"])
def test_the_largest_recipes_pass_on_one_16_gb_accelerator(recipe, monkeypatch):
    from jaxdiff import data, sharding
    from jaxdiff.training import loop
    from jaxdiff.training.runs import configured_image_shape, make_task

    config = load_config(recipe, [])
    task = make_task(config)
    programs = loop.trace_programs(task, data.SyntheticSource(16, configured_image_shape(config)), config,
                                   sharding.make_mesh())  # fmt: skip
    monkeypatch.setattr(memory, "host_available", lambda: 300 * 10**9)
    monkeypatch.setattr(memory, "device_available", lambda device: 16 * 10**9)  # a TPU v3 core; an H100 has 80 GB
    loop.check_memory(programs, config)
    monkeypatch.setattr(memory, "device_available", lambda device: 10**9)
    with pytest.raises(ConfigError, match=f"training.batch_size={config.training.batch_size} cannot fit"):
        loop.check_memory(programs, config)


def test_largest_buffer_is_the_largest_product_result_nested_programs_included():
    def step(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        z = jax.lax.scan(lambda c, _: (c @ c, None), y[0, 0], None, length=3)[0]  # [5, 7] @ ... inside a scan
        return jax.jit(lambda a: a.sum())(jax.numpy.tanh(y)) + z.sum()  # tanh: elementwise, not counted

    x, w = jax.ShapeDtypeStruct((6, 5, 5, 3), np.float32), jax.ShapeDtypeStruct((3, 3, 3, 5), np.float32)
    assert memory.largest_buffer(jax.make_jaxpr(step)(x, w)) == 6 * 5 * 5 * 5 * 4
    wide = jax.make_jaxpr(lambda a, b: a @ b)(jax.ShapeDtypeStruct((10**6, 64), np.float32),
                                              jax.ShapeDtypeStruct((64, 10**4), np.float32))  # fmt: skip
    assert memory.largest_buffer(wide) == 10**10 * 4  # never allocated: tracing only


def test_floor_against_available_memory(monkeypatch):
    floor = memory.Floor(arguments=10**9, largest=8 * 10**9, host=10**9, devices=8)
    assert floor.per_device == 2 * 10**9
    monkeypatch.setattr(memory, "host_available", lambda: 5 * 10**9)
    monkeypatch.setattr(memory, "device_available", lambda device: 3 * 10**9)  # as a GPU would report
    memory.check_fits(floor, "training.batch_size=8", what="one training step")
    monkeypatch.setattr(memory, "device_available", lambda device: 19 * 10**8)
    with pytest.raises(ConfigError, match=r"batch_size=8 cannot fit: one training step needs at least 2 GB "
                                          r"\(its largest buffer 8 GB, arguments 1 GB per device, input read on the "
                                          r"host 1 GB\) but 1.9 GB per [A-Z]+ device is available"):  # fmt: skip
        memory.check_fits(floor, "training.batch_size=8", what="one training step")
    # CPU: this process's devices (1 of the program's 8) and the host-side input, all in host memory.
    monkeypatch.setattr(memory, "device_available", lambda device: None)
    memory.check_fits(floor, "training.batch_size=8", what="one training step")
    monkeypatch.setattr(memory, "host_available", lambda: 29 * 10**8)
    with pytest.raises(ConfigError, match=r"needs at least 3 GB .* but 2.9 GB of host memory is available"):
        memory.check_fits(floor, "training.batch_size=8", what="one training step")


# ---------------------------------------------------------------- 7. signals while preparing


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_while_compiling_stops_at_once_without_a_lock(tmp_path):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "jaxdiff.cli", *train_args(workdir, 50)]
    starting = f"starting at step 0 in {workdir}"
    finished = run_child(args, tmp_path, env=UNCACHED_ENV, signal_when=lambda err: starting in err)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "SIGTERM received while preparing: stopping now" in finished.stderr
    assert "compiled in" not in finished.stderr and "Traceback" not in finished.stderr
    assert finished.stdout.strip() == "stopped by SIGTERM while preparing, at step 0: no step trained, nothing saved"
    assert finished.seconds < 5, finished.seconds  # compiling alone takes longer
    assert LOCK_FILE not in os.listdir(workdir) and not os.listdir(workdir / "checkpoints")


SLOW_DATA = """
    import os, signal, sys, time
    from jaxdiff import data
    from jaxdiff.cli import load_config
    from jaxdiff.training import loop

    def slow(*args, **kwargs):  # a dataset that takes a minute to read
        print("reading", flush=True)
        time.sleep(60)

    data.load_dataset = slow
    result = loop.train_and_evaluate(load_config(sys.argv[1], []), sys.argv[2], progress=False)
    print(result.preempted, result.step, result.summary)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigint_while_reading_data_stops_at_once_from_the_python_api(tmp_path):
    workdir = tmp_path / "run"
    finished = run_child([*python(SLOW_DATA), TINY_CONFIG, str(workdir)], tmp_path, signum=signal.SIGINT,
                         signal_when=lambda err: child_output(tmp_path).startswith("reading"))  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    # before the workdir's checkpoints were read: the step is not known
    assert finished.stdout.splitlines()[-1] == "True None stopped by SIGINT while preparing: no step trained, nothing saved"
    assert finished.seconds < 5 and "Traceback" not in finished.stderr
    assert not workdir.exists()  # the lock, and the workdir it created, removed


# ---------------------------------------------------------------- 8. disk full is one line


DISK_FULL = """
    import json, os, subprocess, sys
    mount, cli = sys.argv[1], sys.argv[2:]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", mount], check=True)
    runs = []
    for size in ("20m", "60m"):  # the disk full, then room made: the run resumes
        subprocess.run(["mount", "-o", f"remount,size={size}", mount], check=True)
        with open(os.path.join(mount, "..", "err"), "w+", newline="") as err:  # the bar's carriage returns kept
            proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            err.seek(0)
            stderr = err.read()
        steps = sorted(os.listdir(os.path.join(mount, "run", "checkpoints")))
        runs.append({"code": os.waitstatus_to_exitcode(status), "stderr": stderr, "steps": steps,
                     "peak_mb": usage.ru_maxrss / 1024})
    print(json.dumps(runs))
"""


def can_mount_tmpfs() -> str | None:
    """Why a test cannot mount a tmpfs in its own mount namespace (None: it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_resumes(tmp_path):
    reason = can_mount_tmpfs()
    if reason:
        pytest.skip(reason)
    mount = tmp_path / "small"
    mount.mkdir()
    cli = [sys.executable, "-m", "jaxdiff.cli", *train_args(mount / "run", 10)]  # 11 MB per checkpoint
    finished = run_child(["unshare", "-rm", *python(DISK_FULL), str(mount), *cli], tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    full, resumed = json.loads(finished.stdout)
    assert full["code"] == 2 and full["steps"] == ["5"], full  # step 10's partial write removed
    lines = error_lines(full["stderr"])
    assert len(lines) == 1, full["stderr"]
    [line] = lines
    assert line.startswith(f"jaxdiff: error: no space left on the disk of {mount / 'run'}: a checkpoint needs about ")
    assert "the newest complete checkpoint, step 5, is kept" in line, line
    assert "Traceback" not in full["stderr"] and "Event loop is closed" not in full["stderr"]
    assert len(console_lines(full["stderr"])) <= 4, full["stderr"]  # starting, compiled, the bar, the error
    assert resumed["code"] == 0 and resumed["steps"] == ["10", "5"], resumed["stderr"][-3000:]
    assert "resuming at step 5" in resumed["stderr"] and "Traceback" not in resumed["stderr"]
    assert full["peak_mb"] < 3000 and resumed["peak_mb"] < 3000


def test_disk_full_error_names_the_folder_and_the_space_and_removes_the_partial_step(tmp_path):
    write_workdir(tmp_path)
    partial = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-123"
    partial.mkdir()
    (partial / "a").write_bytes(b"x" * 100)
    orbax_error = ValueError('RESOURCE_EXHAUSTED: Error writing "params/0": Failed to write 957388 bytes to file 8: '
                             f"{os.strerror(errno.ENOSPC)} [os_error_code='28']")  # fmt: skip
    error = checkpoint.disk_full_error(orbax_error, str(tmp_path), 10**15)
    assert isinstance(error, CheckpointError) and "\n" not in str(error)
    assert str(error).startswith(f"no space left on the disk of {tmp_path}: a checkpoint needs about 1,000 TB free")
    assert "the newest complete checkpoint, step 7, is kept" in str(error)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["7"]
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert checkpoint.disk_full_error(wrapped, str(tmp_path), 1) is not None
    assert checkpoint.disk_full_error(ValueError("something else"), str(tmp_path), 1) is None


def damage_arrays(step_dir):
    """Truncate the array data of a step to a third (its metadata intact: the damage shows only when reading)."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])


@pytest.mark.timeout(300)
def test_the_only_checkpoint_damaged_is_one_line_without_echoes(tmp_path):
    workdir = tmp_path / "run"
    write_workdir(workdir)
    damage_arrays(workdir / "checkpoints" / "7")
    before = files_under(workdir)
    finished = run_child([sys.executable, "-m", "jaxdiff.cli", *train_args(workdir, 9)], tmp_path)
    assert finished.returncode == 2
    lines = console_lines(finished.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"jaxdiff: error: no readable checkpoint in {workdir}"), lines
    assert files_under(workdir) == before


# ---------------------------------------------------------------- 9. nothing left behind, nothing lost


SLOW_WRITES = """
    import sys, time
    import orbax.checkpoint as ocp
    from jaxdiff.cli import load_config
    from jaxdiff.training.loop import train_and_evaluate

    class Slow:  # a disk that takes 5 s to take a checkpoint
        def result(self, timeout=None):
            time.sleep(5)

    save = ocp.StandardCheckpointHandler.async_save

    async def slow_save(self, *args, **kwargs):
        return [*(await save(self, *args, **kwargs) or []), Slow()]

    ocp.StandardCheckpointHandler.async_save = slow_save
    overrides = ["--config.training.checkpoint_every_steps=10", "--config.training.log_every_steps=1",
                 "--config.training.num_train_steps=40", "--config.training.sample_every_steps=1000"]
    train_and_evaluate(load_config(sys.argv[1], overrides), sys.argv[2], progress=False)
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_killed_at_step_17_resumes_from_step_10(tmp_path):
    workdir = tmp_path / "run"
    finished = run_child([*python(SLOW_WRITES), TINY_CONFIG, str(workdir)], tmp_path, signum=signal.SIGKILL,
                         signal_when=lambda err: len(metrics_lines(workdir)) >= 17)  # fmt: skip
    assert finished.returncode == -signal.SIGKILL
    killed_at = len(metrics_lines(workdir))
    assert 17 <= killed_at < 20
    assert saved_state(workdir)[0] == 10  # the step-10 save was committed before step 12 started
    resumed = load_config(TINY_CONFIG, ["--config.training.num_train_steps=12", "--config.training.log_every_steps=1"])
    assert train_and_evaluate(resumed, workdir, progress=False).step == 12
    assert [m["step"] for m in metrics_lines(workdir)][9:] == [10, 11, 12]  # resumed at 10: 7 steps lost


KILLED_CONVERSION = """
    import sys, time
    from jaxdiff.convert.formats import convert
    from jaxdiff.training import checkpoint

    def stuck(folder, *args, **kwargs):  # killed while writing
        (folder / "checkpoints").mkdir()
        print("writing", flush=True)
        time.sleep(120)

    checkpoint.save_model = stuck
    convert(sys.argv[1], sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_next_conversion_removes_what_a_killed_one_left(tmp_path, capsys):
    from jaxdiff.convert.formats import convert
    from jaxdiff.training.runs import load_run

    write_workdir(tmp_path / "run")
    convert(tmp_path / "run", tmp_path / "diffusers", target_format="diffusers")
    dst = tmp_path / "converted"
    finished = run_child([*python(KILLED_CONVERSION), str(tmp_path / "diffusers"), str(dst)], tmp_path,
                         signum=signal.SIGKILL,
                         signal_when=lambda err: child_output(tmp_path) == "writing\n")  # fmt: skip
    assert finished.returncode == -signal.SIGKILL
    [left] = [name for name in os.listdir(tmp_path) if name.startswith(".converted.partial-")]
    running = tmp_path / ".converted.partial-running"  # another conversion's, in progress: locked, kept
    running.mkdir()
    held = os.open(running, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        assert main(["convert", str(tmp_path / "diffusers"), str(dst)]) == 0
    finally:
        os.close(held)
    err = capsys.readouterr().err
    assert f"removed 1 unfinished conversion folder(s) to {dst} left by a stopped conversion: {left}" in err
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith(".")) == [running.name]
    assert load_run(dst)[1] == 0
