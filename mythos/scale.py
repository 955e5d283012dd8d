"""Where a run's model lives (docs/scaling.md): one device, or a mesh and a strategy (spec.sharding).

    mythos train tiny --backend jax --mesh data=2,expert=4                     # one host, 8 JAX devices
    torchrun --nproc-per-node 4 -m mythos train tiny --backend torch --mesh data=2,model=2

JAX runs one process per host and sees every device of the mesh (on the CPU, fake ones:
XLA_FLAGS=--xla_force_host_platform_device_count=8; several hosts: jax.distributed.initialize() in each,
then the same command). torch runs one process per mesh position (torchrun sets RANK and WORLD_SIZE);
each rank takes its rows of every batch; rank 0 alone prints and writes files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

import spec as S
from spec import sharding as SH
from weights_bridge import backends


class LayoutError(ValueError):
    """A mesh or strategy this run cannot use; the message says why and what to do."""


@dataclass(frozen=True)
class Layout:
    """A mesh and a strategy (spec.sharding), or one device (mesh None)."""
    mesh: dict[str, int] | None = None
    strategy: tuple[str, ...] = ()

    def describe(self) -> str:
        return "one device" if self.mesh is None else f"mesh {SH.format_mesh(self.mesh)}, {'+'.join(self.strategy)}"


def layout(backend: str, s: S.Spec, mesh: str | None, strategy: str | None, batch_size: int) -> Layout:
    """The checked layout of `--mesh` / `--strategy`, or LayoutError naming what is wrong and what to do.

    Checks: the mesh and strategy parse; the spec's tensors split over the mesh (partition); the batch
    splits over the batch axes; the backend has the devices (JAX) or ranks (torch, under torchrun) the mesh needs.
    """
    if not mesh:
        if strategy:
            raise LayoutError("--strategy needs --mesh (e.g. --mesh data=2 --strategy fsdp)")
        return Layout()
    try:
        m = SH.parse_mesh(mesh)
        st = SH.parse_strategy(strategy, m)
        SH.partition(s, m, st)
        SH.check_batch(m, st, batch_size)
    except S.SpecError as e:
        raise LayoutError(str(e)) from None
    n = SH.mesh_size(m)
    if backend == "jax":
        import jax

        have = len(jax.devices())
        if have != n:
            raise LayoutError(f"--mesh {SH.format_mesh(m)} needs {n} JAX devices, JAX has {have} "
                              f"({jax.devices()[0].platform}); on the CPU start with XLA_FLAGS="
                              f"--xla_force_host_platform_device_count={n}; several hosts: docs/scaling.md")
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != n:
            raise LayoutError(f"--mesh {SH.format_mesh(m)} needs {n} torch ranks, this process is one of {world}: "
                              f"run it under torchrun --nproc-per-node {n} -m mythos train ...")
    return Layout(m, st)


def start(backend: str, lay: Layout) -> None:
    """Join the process group a torch mesh needs (gloo on the CPU, nccl on CUDA); JAX needs nothing here."""
    if lay.mesh is None or backend != "torch":
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def barrier(backend: str) -> None:
    """Wait for every torch rank (after rank 0 wrote a checkpoint); nothing without a process group."""
    if backend != "torch":
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    """Whether this process prints and writes files: rank 0 of torch.distributed, JAX's process 0."""
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    return True


def place(backend: str, model: object, lay: Layout) -> object:
    """The model sharded over the layout's mesh (the twin's sharding.shard), or as it is on one device."""
    if lay.mesh is None:
        return model
    sharding = backends.twin(backend).sharding
    return sharding.shard(model, sharding.make_mesh(lay.mesh), lay.strategy)


def local_rows(backend: str, model: object, *arrays: np.ndarray) -> tuple[object, ...]:
    """Each batch array as the twin's sharded model takes it (the twin's sharding.shard_batch): JAX places
    the global batch over the batch axes, a torch rank keeps its own rows."""
    if model.sharding is None:
        return arrays
    sharding = backends.twin(backend).sharding
    return tuple(sharding.shard_batch(model, a) for a in arrays)


def world_rows(batch_size: int, lay: Layout) -> int:
    """Rows of the global batch each batch shard holds."""
    if lay.mesh is None:
        return batch_size
    return batch_size // math.prod(lay.mesh[a] for a in SH.batch_axes(lay.mesh, lay.strategy))
