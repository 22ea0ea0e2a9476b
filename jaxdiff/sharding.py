"""Device mesh, global batches from process-local data, train-state sharding, multi-host start-up.

The training mesh spans every device of every process: 1-D with axis "data", or 2-D
("data", "fsdp") when parameters and optimizer state are sharded (FSDP). A batch is
sharded along its leading axis over all the mesh's axes (`P(("data", "fsdp"))`), so every
device holds distinct rows. The train state is replicated (`P()`) on a 1-D mesh; on a 2-D
mesh `state_sharding` splits its large arrays over "fsdp". The mesh lists the devices of
process 0 first, then those of process 1, ..., so process p's local batch is rows
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

from jaxdiff.checks import is_int
from jaxdiff.errors import ConfigError, UsageError


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
        raise UsageError(f"num_processes must be positive, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UsageError(f"process_id={process_id} is outside [0, {num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True


def is_main_process() -> bool:
    """True in process 0, the one that writes logs, checkpoints' metadata and samples."""
    return jax.process_index() == 0


DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
DEFAULT_MIN_SHARDED_SIZE = 2**14  # elements: smaller state arrays stay replicated


def make_mesh(fsdp: int = 1) -> Mesh:
    """The training mesh over all global devices, ordered by (process index, device id).

    fsdp == 1: 1-D, axis "data" (N devices). fsdp > 1: 2-D ("data", "fsdp") of shape
    (N / fsdp, fsdp); row r holds devices r·fsdp .. (r+1)·fsdp − 1 of that order, so an
    "fsdp" group is `fsdp` consecutive devices of one process (its all-gathers and
    reduce-scatters stay on one host's links) whenever fsdp divides the local device count;
    otherwise groups span consecutive hosts (whole hosts when the local count divides fsdp).
    """
    devices = sorted(jax.devices(), key=lambda device: (device.process_index, device.id))
    if not is_int(fsdp) or fsdp < 1 or len(devices) % fsdp:
        raise ConfigError(f"fsdp={fsdp!r} must be a positive integer dividing the {len(devices)} devices")
    if fsdp == 1:
        return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))
    grid = np.array(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def local_mesh(axis_name: str = "data") -> Mesh:
    """A 1-D mesh over this process's devices only, for work each process does on its own (sampling shards)."""
    return Mesh(np.array(jax.local_devices()), (axis_name,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over all the mesh's axes together (row-major: device k of the
    mesh's order holds the k-th block of rows), the rest unsplit."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def _leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
    """The largest dimension divisible by `fsdp` (the later one on ties) split over "fsdp"; P() when none,
    when fsdp == 1, or when the array has fewer than `min_size` elements."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    candidates = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: (shape[a], a))
    return PartitionSpec(*([None] * axis), FSDP_AXIS)


def state_sharding(mesh: Mesh, state_shapes: Any, *, min_size: int = DEFAULT_MIN_SHARDED_SIZE) -> Any:
    """A NamedSharding for every array leaf of a state pytree (arrays or `jax.ShapeDtypeStruct`s).

    On a mesh with an "fsdp" axis of size n > 1, a leaf of at least `min_size` elements is split
    over "fsdp" along its largest dimension divisible by n (the later one on ties), and replicated
    over "data"; scalars, rng keys, small leaves and leaves with no dimension divisible by n are
    replicated. Without an "fsdp" axis (or n == 1) everything is replicated. The rule depends on
    shapes only, so parameters, their EMA and Adam's moments are split alike. None leaves (absent
    optional parts of a flax.struct state) stay None.
    """
    if min_size < 1:
        raise UsageError(f"min_size={min_size} must be at least 1 (elements)")
    fsdp = dict(mesh.shape).get(FSDP_AXIS, 1)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, _leaf_spec(tuple(leaf.shape), fsdp, min_size)), state_shapes)


def _process_count(mesh: Mesh) -> int:
    return len({device.process_index for device in mesh.devices.flat})


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows [B/P, ...] of each entry -> a global jax.Array [B, ...] sharded over the mesh.

    Every entry must have the same leading size B/P, and B = (B/P)·P must divide evenly
    over the mesh's devices. Every process calls this with its own rows.
    """
    sizes = {name: np.shape(value)[0] if np.ndim(value) else None for name, value in local_batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise UsageError(f"every batch entry needs the same leading (batch) size, got {sizes}")
    local_size = next(iter(sizes.values()))
    processes = _process_count(mesh)
    global_size = local_size * processes
    if global_size % mesh.devices.size:
        raise UsageError(
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
