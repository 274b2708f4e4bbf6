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

Several hosts (e.g. a TPU pod slice, or GPU nodes): call ``jax.distributed.initialize()`` first on
every host (on Cloud TPU it needs no arguments; elsewhere pass coordinator_address, num_processes,
process_id). ``jax.devices()`` then lists every host's devices and :func:`make_mesh` spans them all;
give each host its own shard of the data (``make_loader(..., shard_index=jax.process_index(),
shard_count=jax.process_count())``) and build the global batch with :func:`shard_batch`, which uses
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["make_mesh", "shard_model", "shard_batch", "param_partition_spec"]

BATCH_AXES = ("data", "fsdp")


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

    def place(x: Any) -> Any:
        if not isinstance(x, jax.Array) or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec())) if isinstance(x, jax.Array) else x
        return jax.device_put(x, NamedSharding(mesh, param_partition_spec(x.shape, fsdp)))

    nnx.update(module, jax.tree_util.tree_map(place, state))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split each array of ``batch`` along its first (batch) axis over the mesh's data and fsdp axes.

    On one host the arrays are the global batch; with several hosts each host passes its local part
    and the global array is assembled with ``jax.make_array_from_process_local_data``.
    """
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(sharding, x)
        if x.shape[0] % mesh.size:
            raise ValueError(f"batch size {x.shape[0]} must be divisible by the number of devices ({mesh.size})")
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, batch)
