"""Device mesh, global batches from process-local data, multi-host start-up.

One 1-D mesh with axis "data" spans every device of every process. A batch is
sharded along its leading axis over "data" (`P("data")`); parameters and
optimizer state are replicated (`P()`). The mesh lists the devices of process 0
first, then those of process 1, ..., so process p's local batch is rows
[p·B/P, (p+1)·B/P) of the global batch, the rows `jaxdiff.data` gives it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def _on_cloud_tpu_vm() -> bool:
    """libtpu is installed and TPU chips are attached (v2-v4 expose /dev/accel*, v5+ /dev/vfio/<n>)."""
    has_chips = bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_chips and importlib.util.find_spec("libtpu") is not None


def _environment_requests_distributed() -> bool:
    """Whether the launcher describes a multi-process job JAX can join on its own.

    JAX_COORDINATOR_ADDRESS set; a Slurm step or Open MPI job with more than one task;
    a multi-host TPU slice (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES list several hosts,
    or a multislice MEGASCALE_COORDINATOR_ADDRESS); or a Cloud TPU VM, where JAX reads the
    slice's hosts from the TPU metadata (a single-host slice then runs as one process).
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_STEP_NODELIST" in os.environ and _env_int("SLURM_NTASKS") > 1:
        return True
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    tpu_hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([host for host in tpu_hosts.split(",") if host]) > 1:
        return True
    return _on_cloud_tpu_vm()


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins the multi-process JAX job; returns whether JAX now runs distributed.

    Calls `jax.distributed.initialize` with the given arguments when any is given, with
    none (JAX detects the cluster) when the environment asks for it (see
    `_environment_requests_distributed`), and does nothing on a single host or when JAX
    is already initialised. Must run before the first JAX computation.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if not explicit and not _environment_requests_distributed():
        return False
    if num_processes is not None and num_processes <= 0:
        raise ValueError(f"num_processes must be positive, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is outside [0, {num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True


def is_main_process() -> bool:
    """True in process 0, the one that writes logs, checkpoints' metadata and samples."""
    return jax.process_index() == 0


def make_mesh(axis_name: str = "data") -> Mesh:
    """A 1-D mesh over all global devices, ordered by (process index, device id)."""
    devices = sorted(jax.devices(), key=lambda device: (device.process_index, device.id))
    return Mesh(np.array(devices), (axis_name,), axis_types=(AxisType.Auto,))


def local_mesh(axis_name: str = "data") -> Mesh:
    """A 1-D mesh over this process's devices only, for work each process does on its own (sampling shards)."""
    return Mesh(np.array(jax.local_devices()), (axis_name,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's axis, the rest unsplit."""
    return NamedSharding(mesh, PartitionSpec(*mesh.axis_names))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def _process_count(mesh: Mesh) -> int:
    return len({device.process_index for device in mesh.devices.flat})


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows [B/P, ...] of each entry -> a global jax.Array [B, ...] sharded over the mesh.

    Every entry must have the same leading size B/P, and B = (B/P)·P must divide evenly
    over the mesh's devices. Every process calls this with its own rows.
    """
    sizes = {name: np.shape(value)[0] if np.ndim(value) else None for name, value in local_batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"every batch entry needs the same leading (batch) size, got {sizes}")
    local_size = next(iter(sizes.values()))
    processes = _process_count(mesh)
    global_size = local_size * processes
    if global_size % mesh.devices.size:
        raise ValueError(
            f"global batch {global_size} ({local_size} per process x {processes} processes) is not divisible "
            f"by the {mesh.devices.size} devices of the mesh"
        )
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value), (global_size, *np.shape(value)[1:]))
        for name, value in local_batch.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """The pytree with every leaf (host value or jax.Array) replicated on all devices of the mesh.

    Host values must be identical in every process (e.g. parameters initialised from
    the same seed); each process copies its value to its own devices.
    """
    return jax.device_put(tree, replicated_sharding(mesh))
