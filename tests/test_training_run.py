"""End-to-end runs of `jaxdiff train`: mock CIFAR-10, exact resume, preemption, devices, hosts, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff.training import checkpoint
from jaxdiff.cli import load_config, main
from jaxdiff.models import create_model
from jaxdiff.training.step import init_train_state, make_optimizer
from jaxdiff.training.loop import train_and_evaluate
from tests.helpers import ROOT, TINY_CONFIG, free_port, multi_process_env, run_python, xla_flags

SUBPROCESS_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def cli(*args, devices=1, timeout=300, extra_env=None):
    env = {**SUBPROCESS_ENV, "XLA_FLAGS": xla_flags(devices), **(extra_env or {})}
    cmd = [sys.executable, "-m", "jaxdiff.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def train_args(workdir, steps, *overrides):
    return ["train", "--config", TINY_CONFIG, "--workdir", str(workdir),
            f"--config.training.num_train_steps={steps}", *overrides]  # fmt: skip


def restored_checkpoint(workdir, step=None) -> checkpoint.Restored:
    """The tiny config's checkpoint in `workdir` (default: latest), restored onto this process's first device.

    Restoring onto one device also checks that a checkpoint written on any topology loads anywhere.
    """
    config = load_config(TINY_CONFIG, [])
    model, tx = create_model(config.model), make_optimizer(config.training)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        jax.eval_shape(lambda: init_train_state(config, model, tx)),
    )
    manager = checkpoint.make_manager(workdir, read_only=True)
    try:
        return checkpoint.restore_newest(manager, lambda saved: like, step=step)
    finally:
        manager.close()


def saved_state(workdir, step=None):
    """(step, TrainState) of the tiny config saved in `workdir` (default: latest)."""
    restored = restored_checkpoint(workdir, step)
    return restored.step, restored.state


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def metrics_lines(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_end_to_end_on_mock_cifar10(tmp_path):
    with tfds.testing.mock_data(num_examples=64):
        code = main(train_args(
            tmp_path, 30, "--config.data.dataset=cifar10", "--config.model.image_size=32", "--config.model.attn_resolutions=(16,)",
            "--config.training.log_every_steps=5", "--config.training.checkpoint_every_steps=15",
            "--config.training.sample_every_steps=30", "--config.training.num_sample_images=4",
            "--config.sampling.steps=10",
        ))  # fmt: skip
    assert code == 0
    lines = metrics_lines(tmp_path)
    assert [m["step"] for m in lines] == [5, 10, 15, 20, 25, 30]
    for m in lines:
        assert {"loss", "steps_per_sec", "images_per_sec", "grad_norm", "learning_rate"} <= set(m)
        assert np.isfinite(m["loss"])
    assert sorted(checkpoint.make_manager(tmp_path, read_only=True).all_steps()) == [15, 30]
    assert (tmp_path / "samples" / "step_00000030.png").exists()
    assert not (tmp_path / "samples" / "step_00000030.txt").exists()  # unconditional samples have no captions
    assert json.loads((tmp_path / "config.json").read_text())["data"]["dataset"] == "cifar10"


@pytest.mark.slow
def test_resume_is_bitwise_exact(tmp_path):
    """Stopped at step 3 and resumed to 6: the state and every logged loss equal an uninterrupted run's (in one
    process, as the CLI runs it; the CLI's own resume is `test_sigterm_saves_and_exits_cleanly_then_resumes`)."""
    common = ["--config.training.checkpoint_every_steps=3", "--config.training.log_every_steps=1"]
    run = lambda workdir, steps: train_and_evaluate(  # noqa: E731
        load_config(TINY_CONFIG, [f"--config.training.num_train_steps={steps}", *common]), workdir, progress=False)
    assert run(tmp_path / "straight", 6).step == 6
    assert run(tmp_path / "resumed", 3).step == 3
    assert run(tmp_path / "resumed", 6).step == 6
    step_a, a = saved_state(tmp_path / "straight")
    step_b, b = saved_state(tmp_path / "resumed")
    assert step_a == step_b == 6
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    losses = lambda d: [(m["step"], m["loss"]) for m in metrics_lines(d)]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # resumed at 3: steps 4-6 logged once


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    env = {**SUBPROCESS_ENV, "XLA_FLAGS": xla_flags(1)}
    args = train_args(tmp_path, 100_000, "--config.training.log_every_steps=1", "--config.training.checkpoint_every_steps=100000")
    proc = subprocess.Popen([sys.executable, "-m", "jaxdiff.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while len(metrics_lines(tmp_path)) < 3:
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split(":")[0])
    step, _ = saved_state(tmp_path)
    assert step == stopped >= 3
    again = cli(*train_args(tmp_path, stopped + 2, "--config.training.log_every_steps=1"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming at step {stopped}" in again.stderr
    assert saved_state(tmp_path)[0] == stopped + 2


DEVICE_RUN = """
import json, jax, numpy as np
from jaxdiff.cli import load_config
from jaxdiff.training.loop import train_and_evaluate
from tests.helpers import TINY_CONFIG
config = load_config(TINY_CONFIG, ["--config.training.num_train_steps=3", "--config.training.log_every_steps=1",
                                   "--config.training.batch_size=8"])
train_and_evaluate(config, {workdir!r}, progress=False)
print(json.dumps([jax.device_count(), [line for line in open({workdir!r} + "/metrics.jsonl")]]))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eight_devices_match_one(tmp_path):
    results = {}
    for devices in (1, 8):
        workdir = str(tmp_path / f"d{devices}")
        count, lines = json.loads(run_python(DEVICE_RUN.format(workdir=workdir), devices=devices).splitlines()[-1])
        assert count == devices
        results[devices] = (workdir, [json.loads(line)["loss"] for line in lines])
    np.testing.assert_allclose(results[8][1], results[1][1], rtol=1e-4)
    _, one = saved_state(results[1][0])
    _, eight = saved_state(results[8][0])
    for x, y in zip(leaves(one.params), leaves(eight.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp_run_matches_the_replicated_run_and_resumes(tmp_path):
    """training.fsdp=4 on 8 devices (state split over a ('data', 'fsdp') mesh), stopped and resumed, ends
    where the replicated 8-device run does; Adam's eps keeps rounding-noise gradients from deciding updates."""
    eps = "--config.training.adam_eps=1e-5"
    replicated, sharded = tmp_path / "replicated", tmp_path / "fsdp"
    result = cli(*train_args(replicated, 4, eps), devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    for steps in (2, 4):
        result = cli(*train_args(sharded, steps, eps, "--config.training.fsdp=4"), devices=8)
        assert result.returncode == 0, result.stderr[-3000:]
    (step_r, state_r), (step_s, state_s) = saved_state(replicated), saved_state(sharded)
    assert step_r == step_s == 4
    for x, y in zip(leaves(state_r.params), leaves(state_s.params), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


def test_fsdp_that_does_not_divide_the_devices_is_refused_before_any_file(tmp_path):
    workdir = tmp_path / "never"
    result = cli(*train_args(workdir, 2, "--config.training.fsdp=3"), devices=8)
    assert result.returncode == 2 and not workdir.exists()
    assert result.stderr.strip().count("\n") == 0 and "fsdp=3" in result.stderr and "8 devices" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_hosts_match_one_host_and_resume_collectively(tmp_path):
    common = ["--config.training.log_every_steps=1", "--config.training.checkpoint_every_steps=2"]

    def two_hosts(steps):
        port = free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "jaxdiff.cli", *train_args(tmp_path / "multi", steps, *common),
                 "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                env=multi_process_env(XLA_FLAGS=xla_flags(2)),
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            for i in range(2)
        ]
        try:
            outputs = [p.communicate(timeout=400) for p in procs]
        finally:
            for p in procs:
                p.kill()
        for p, (_, err) in zip(procs, outputs):
            assert p.returncode == 0, err[-4000:]
        return outputs

    two_hosts(2)
    outputs = two_hosts(4)
    assert "resuming at step 2" in outputs[0][1]
    single = cli(*train_args(tmp_path / "single", 4, *common), devices=4)
    assert single.returncode == 0, single.stderr[-3000:]
    _, multi = saved_state(tmp_path / "multi")
    _, one = saved_state(tmp_path / "single")
    for x, y in zip(leaves(multi), leaves(one), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_unknown_config_key_is_rejected(tmp_path):
    assert main(train_args(tmp_path, 1, "--config.training.batchsize=4")) == 2  # one-line error naming the key
    assert not (tmp_path / "checkpoints").exists()


def test_dataset_image_size_must_fit_the_model(tmp_path):
    config = load_config(TINY_CONFIG, ["--config.data.dataset=digits"])
    with pytest.raises(ValueError, match=r"\(8, 8, 1\).*\(16, 16, 3\)"):
        train_and_evaluate(config, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_workdir_of_a_different_config_is_refused(tmp_path):
    config = load_config(TINY_CONFIG, ["--config.training.num_train_steps=1"])
    train_and_evaluate(config, tmp_path, progress=False)
    changed = load_config(TINY_CONFIG, ["--config.training.num_train_steps=2", "--config.model.dropout=0.3"])
    with pytest.raises(checkpoint.CheckpointError, match=r"model.dropout: 0.1 -> 0.3"):
        train_and_evaluate(changed, tmp_path, progress=False)
    result = train_and_evaluate(changed, tmp_path, allow_config_change=True, progress=False)
    assert result.step == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint(tmp_path):
    stable = load_config(TINY_CONFIG, ["--config.training.num_train_steps=2", "--config.training.checkpoint_every_steps=2"])
    train_and_evaluate(stable, tmp_path, progress=False)
    # lr 1e30 throws the weights to ~1e30 in one finite update; every later loss overflows.
    diverging = load_config(TINY_CONFIG, [
        "--config.training.num_train_steps=50", "--config.training.learning_rate=1e30",
        "--config.training.warmup_steps=0", "--config.training.log_every_steps=1",
        "--config.training.max_consecutive_nonfinite=3", "--config.training.checkpoint_every_steps=1000",
    ])  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps \(steps \d+\.\.\d+\)"):
        train_and_evaluate(diverging, tmp_path, progress=False)
    step, state = saved_state(tmp_path)
    assert step == 2
    assert all(np.isfinite(x).all() for x in leaves(state.params))
