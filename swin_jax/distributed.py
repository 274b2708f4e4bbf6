"""Data-parallel (and optional FSDP) training on a ``jax.sharding`` mesh: one code path for 1 device,
many devices, and many hosts.

The mesh has two axes, ``data`` and ``fsdp``; the batch is split over both. Parameters (and the
optimizer state, which follows them) are replicated, or with ``fsdp`` sharded along their largest axis
divisible by the ``fsdp`` size. The jit'd train step in :mod:`swin_jax.train` needs no change: XLA
follows the input shardings and inserts the gradient all-reduce / all-gather.

Example::

    mesh = make_mesh()                      # all devices on the data axis
    model = create_model(...); optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    shard_model(model, mesh); shard_model(optimizer, mesh)
    for batch in loader:
        metrics = train_step(model, optimizer, shard_batch((batch["image"], batch["label"]), mesh), ...)

Several hosts (e.g. a TPU pod slice, or GPU nodes): call :func:`initialize` first on every host, before
any other JAX work (with no arguments on a cluster JAX detects itself: SLURM, Cloud TPU, MPI; elsewhere
with the coordinator's ``host:port``, the number of processes and this process's id). ``jax.devices()``
then lists every host's devices and :func:`make_mesh` spans them all. Each host reads only its share of
every global batch (``make_loader(..., batch_size=GLOBAL, shard_index=jax.process_index(),
shard_count=jax.process_count())``) and :func:`shard_batch` assembles the global array with
``jax.make_array_from_process_local_data``. Results of a step are global arrays; :func:`to_host` reads
them (and parameters, for saving) as numpy on every host. ``python -m swin_jax finetune --coordinator
HOST:PORT --num-processes N --process-id I`` (or ``--distributed``) does all of this.

If a process dies, JAX's coordination service stops every other process (SIGABRT, with "Terminating
process because the JAX distributed service detected fatal errors" and the failed task on stderr):
at once when the coordinator (process 0) dies, within ``heartbeat_timeout_s`` when another does.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["initialize", "make_mesh", "shard_model", "shard_batch", "param_partition_spec", "to_host"]

BATCH_AXES = ("data", "fsdp")


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int | None = None,
) -> None:
    """Join a multi-process JAX run (``jax.distributed.initialize``): call it before any other JAX work.

    Args:
        coordinator: ``host:port`` of process 0's coordination service; with ``num_processes`` and
            ``process_id`` (all three or none). None: let JAX detect the cluster (SLURM, Cloud TPU, MPI).
        num_processes: the number of processes.
        process_id: this process's id in ``[0, num_processes)``.
        heartbeat_timeout_s: how long a silent process is waited for before the others are stopped
            (JAX's default: 100 s).

    Raises:
        ValueError: some but not all of the three, a malformed ``host:port``, or an id out of range.
    """
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("give the coordinator (host:port), the number of processes and the process id together")
    kwargs: dict[str, Any] = {}
    if all(given):
        host, _, port = str(coordinator).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"the coordinator must be host:port (e.g. 10.0.0.1:1234), got {coordinator!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"need 0 <= process id < number of processes, got {process_id} of {num_processes}")
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    if heartbeat_timeout_s is not None:
        if heartbeat_timeout_s < 1:
            raise ValueError(f"heartbeat_timeout_s must be >= 1, got {heartbeat_timeout_s}")
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
    jax.distributed.initialize(**kwargs)


def to_host(tree: Any) -> Any:
    """Every array of ``tree`` as a numpy array holding its global value, on every process (RNG keys as local
    key arrays).

    A replicated array is read from a local copy; an array split across processes is gathered (a collective:
    every process must call this together). Non-array leaves are returned as they are.
    """
    from jax.experimental import multihost_utils

    def read(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a key array: a local key with the same data
            return jax.random.wrap_key_data(read(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(read, tree)


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (all devices by default).

    Args:
        fsdp: devices per parameter shard group (1: plain data parallelism, parameters replicated).
        devices: the devices to use.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the number of devices ({len(devices)})")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def param_partition_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Shard a parameter's largest axis divisible by ``fsdp`` over ``fsdp``; replicate the others."""
    if fsdp > 1:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % fsdp == 0 and shape[axis] >= fsdp:
                spec = [None] * len(shape)
                spec[axis] = "fsdp"
                return PartitionSpec(*spec)
    return PartitionSpec()


def shard_model(module: nnx.Module | Any, mesh: Mesh) -> None:
    """Place every array of an NNX object (a model, an ``nnx.Optimizer``) on the mesh, in place.

    Arrays are replicated, or FSDP-sharded when the mesh's ``fsdp`` axis is larger than 1.
    """
    fsdp = mesh.shape["fsdp"]
    state = nnx.state(module)
    multi = jax.process_count() > 1

    def put(x: jax.Array, spec: PartitionSpec) -> jax.Array:
        # several processes: a process-local array is put from its host value (the same on every process)
        return jax.device_put(np.asarray(x) if multi and x.is_fully_addressable else x, NamedSharding(mesh, spec))

    def place(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # RNG keys: replicated, placed as their data
            return jax.random.wrap_key_data(put(jax.random.key_data(x), PartitionSpec()), impl=jax.random.key_impl(x))
        return put(x, param_partition_spec(x.shape, fsdp))

    nnx.update(module, jax.tree_util.tree_map(place, state))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split each array of ``batch`` along its first (batch) axis over the mesh's data and fsdp axes.

    On one host the arrays are the global batch; with several hosts each host passes its local part (its
    rows of the global batch, in process order) and the global array is assembled with
    ``jax.make_array_from_process_local_data``.
    """
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if jax.process_count() > 1:
            local = len(sharding.addressable_devices)
            if x.shape[0] % local:
                raise ValueError(f"local batch {x.shape[0]} must be divisible by this process's {local} devices")
            return jax.make_array_from_process_local_data(sharding, x)
        if x.shape[0] % mesh.size:
            raise ValueError(f"batch size {x.shape[0]} must be divisible by the number of devices ({mesh.size})")
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, batch)
