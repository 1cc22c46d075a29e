"""Devices: joining a multi-process run, the data-parallel mesh and its shardings."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.cli import ExperimentError

DATA = "data"  # the mesh axis that the batch is split along


def start_distributed(requested: bool = False) -> None:
    """Joins the other processes of a multi-process run (several hosts, or one process per GPU).

    Runs ``jax.distributed.initialize()`` with ``requested`` (``--distributed``: the cluster says
    who is who, on Cloud TPU, SLURM, Open MPI or Kubernetes) or when ``JAX_COORDINATOR_ADDRESS``
    is set, then with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` where no cluster says them.
    Must come before anything touches a device; does nothing otherwise, or a second time.
    """
    env = os.environ
    if jax.distributed.is_initialized() or not (requested or "JAX_COORDINATOR_ADDRESS" in env):
        return
    kwargs = {}
    for arg, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if name in env:
            try:
                kwargs[arg] = int(env[name])
            except ValueError:
                raise ExperimentError(f"{name} must be an integer, not {env[name]!r}") from None
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExperimentError(
            f"jax.distributed.initialize() failed ({reason}); launch one process per host with "
            "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, or "
            "--distributed under SLURM, Open MPI or on a Cloud TPU pod"
        ) from None


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-process run has got here (nothing with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def data_mesh(devices: int = 0) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` devices (0: every device of every process).

    In a multi-process run each process gives ``devices / process_count`` of its own devices.
    """
    available = jax.devices()
    n = devices or len(available)
    kind = available[0].platform
    if n > len(available):
        raise ExperimentError(
            f"--devices {n}, but only {len(available)} {kind} devices are visible"
        )
    processes = jax.process_count()
    if n % processes:
        raise ExperimentError(
            f"--devices {n} does not split evenly over the {processes} processes of this run"
        )
    chosen = [
        device
        for process in range(processes)
        for device in [d for d in available if d.process_index == process][: n // processes]
    ]
    return Mesh(np.array(chosen), (DATA,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise ExperimentError(
            f"--batch-size {batch_size} does not split evenly over {mesh.size} devices; pass a "
            f"multiple of {mesh.size}, or --devices N with N dividing {batch_size}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds all of it (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """For ``(steps, batch, ...)`` arrays: each device holds its slice of every batch."""
    return NamedSharding(mesh, PartitionSpec(None, DATA))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (the same on every process) on every device of ``mesh``."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def device_name(mesh: Mesh | None = None) -> str:
    """``"cpu:cpu"``, or ``"8 x gpu:NVIDIA H100"`` for a mesh of several devices."""
    devices = mesh.devices.ravel() if mesh is not None else jax.devices()[:1]
    name = f"{devices[0].platform}:{devices[0].device_kind}"
    return f"{len(devices)} x {name}" if len(devices) > 1 else name
