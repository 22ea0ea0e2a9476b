"""Mesh, global batches and replication on simulated CPU devices and a 2-process loopback job.

Tests that need several devices run this file as a script in a fresh interpreter
(the CPU device count is fixed when JAX starts); the script asserts and prints OK.
"""

import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdiff import data, sharding
from tests.helpers import multi_process_env

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
)


def script_command(*args):
    env = multi_process_env(PYTHONPATH=str(REPO_ROOT))
    for name in CLUSTER_VARIABLES:
        env.pop(name, None)
    return [sys.executable, str(pathlib.Path(__file__).resolve()), *map(str, args)], env


def expected_batch(source, seed, step, batch):
    """The global batch by the documented rule: positions [step·B, (step+1)·B) of the epoch permutations."""
    start, stop = step * batch, (step + 1) * batch
    epochs = range(start // source.num_examples, (stop - 1) // source.num_examples + 1)
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(source.num_examples) for e in epochs])
    offset = epochs[0] * source.num_examples
    return source.get(order[start - offset : stop - offset])


# --- script bodies (run in fresh interpreters) ---------------------------------------------------


def eight_devices_main():
    jax.config.update("jax_num_cpu_devices", 8)
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.shape == (8,)
    assert sharding.is_main_process()
    local = {
        "image": np.arange(16 * 2 * 2 * 1, dtype=np.int64).reshape(16, 2, 2, 1).astype(np.uint8),
        "label": np.arange(100, 116, dtype=np.int32),
    }
    batch = sharding.global_batch(local, mesh)
    for key, value in local.items():
        array = batch[key]
        assert array.shape == value.shape and array.dtype == value.dtype
        assert array.sharding.is_equivalent_to(sharding.batch_sharding(mesh), value.ndim)
        shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start)
        assert [shard.device for shard in shards] == list(mesh.devices.flat)
        for position, shard in enumerate(shards):
            np.testing.assert_array_equal(np.asarray(shard.data), value[2 * position : 2 * position + 2])
        np.testing.assert_array_equal(np.asarray(array), value)

    params = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "b": np.float32(0.5)}
    replicated = sharding.replicate(params, mesh)
    for key, value in params.items():
        assert replicated[key].sharding.is_fully_replicated
        assert len(replicated[key].addressable_shards) == 8
        for shard in replicated[key].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), value)

    for bad, message in [
        ({"image": local["image"][:12]}, "not divisible by the 8 devices"),
        ({"image": local["image"], "label": local["label"][:8]}, "same leading"),
    ]:
        try:
            sharding.global_batch(bad, mesh)
        except ValueError as err:
            assert message in str(err), err
        else:
            raise AssertionError(f"no ValueError for {message}")
    print("OK")


def process_main(port, process_id):
    process_id = int(process_id)
    jax.config.update("jax_num_cpu_devices", 2)
    assert sharding.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    assert sharding.initialize_distributed()  # a second call is a no-op
    assert jax.process_count() == 2 and jax.process_index() == process_id
    assert sharding.is_main_process() == (process_id == 0)
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 4

    source = data.SyntheticSource(50, (4, 4, 3))
    local = data.batch_for_step(source, seed=3, step=7, global_batch_size=8, process_index=process_id, process_count=2)
    batch = sharding.global_batch(local, mesh)
    assert batch["image"].shape == (8, 4, 4, 3)
    expected_images, _ = expected_batch(source, seed=3, step=7, batch=8)
    for shard in batch["image"].addressable_shards:  # this process's rows sit at [p·B/P, (p+1)·B/P)
        assert shard.index[0].start // 4 == process_id
        np.testing.assert_array_equal(np.asarray(shard.data), expected_images[shard.index])
    image_total, label_total = jax.jit(lambda b: (b["image"].astype(np.int32).sum(), b["label"].sum()))(batch)

    replicated = sharding.replicate({"scale": np.float32(2.0)}, mesh)
    assert replicated["scale"].sharding.is_fully_replicated
    scaled = jax.jit(lambda b, r: (b["image"].astype(np.float32) * r["scale"]).sum())(batch, replicated)
    sys.stdout.write(f"OK {int(image_total)} {int(label_total)} {float(scaled)}\n")  # one write: gloo prints too


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture
def recorded_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: False)
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_initialize_distributed_is_a_no_op_on_a_single_host(recorded_initialize, monkeypatch):
    assert sharding.initialize_distributed() is False
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0")
    assert sharding.initialize_distributed() is False
    assert recorded_initialize == []


@pytest.mark.parametrize(
    "variables",
    [
        {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"},
        {"SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2"},
        {"OMPI_COMM_WORLD_SIZE": "4"},
        {"TPU_WORKER_HOSTNAMES": "host-0,host-1"},
    ],
)
def test_initialize_distributed_follows_the_environment(recorded_initialize, monkeypatch, variables):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert sharding.initialize_distributed() is True
    assert recorded_initialize == [dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_initialize_distributed_passes_explicit_arguments(recorded_initialize):
    assert sharding.initialize_distributed("10.0.0.1:1234", 4, 3) is True
    assert recorded_initialize == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)]
    with pytest.raises(ValueError, match="process_id=4"):
        sharding.initialize_distributed("10.0.0.1:1234", 4, 4)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_global_batch_and_replicate_on_eight_devices():
    command, env = script_command("eight_devices")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=100)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_process_loopback_job_sums_the_global_batch():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for process_id in range(2):
        command, env = script_command("process", port, process_id)
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=120))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    source = data.SyntheticSource(50, (4, 4, 3))
    images, labels = expected_batch(source, seed=3, step=7, batch=8)
    expected = (
        f"OK {images.astype(np.int64).sum()} {labels.astype(np.int64).sum()} {2.0 * images.astype(np.float64).sum()}"
    )
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stdout + stderr[-4000:]
        assert expected in stdout.splitlines(), stdout


if __name__ == "__main__":
    {"eight_devices": eight_devices_main, "process": process_main}[sys.argv[1]](*sys.argv[2:])
