"""A torch model spread over torch.distributed ranks, as the weights file sees it: its full arrays on every
rank, and writes done by rank 0 alone.

    >>> is_sharded(model)                  # FSDP2 / DTensor parameters, or an expert-parallel MoE
    >>> arrays = full_arrays(model)        # collective: every rank calls it, every rank gets every array
    >>> on_rank0(lambda: write_file(...))  # rank 0 writes; every rank returns, or raises rank 0's error

torch is imported only when asked for: a model holding DTensors has already imported
torch.distributed.tensor, so `is_sharded` looks there first and imports nothing otherwise.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

import numpy as np

import spec as spec_lib
from .backends import to_numpy
from .fileformat import BridgeError

T = TypeVar("T")


def is_sharded(model: object) -> bool:
    """Whether a mythos_torch model holds DTensors (FSDP2 ``fully_shard``, a tensor-parallel plan) or was placed
    by ``mythos_torch.shard`` (``model.sharding`` set: an expert-parallel MoE keeps only its own experts)."""
    if model.sharding is not None:
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None:  # nothing imported DTensor, so no tensor is one
        return False
    return any(isinstance(t, dtensor.DTensor) for t in model.state_dict().values())


def full_arrays(model: object) -> dict[str, np.ndarray]:
    """Every manifest tensor of a sharded torch model as a whole NumPy array (torch layout), on every rank.

    Collective: every rank of the model's process group calls it. Each tensor is gathered by
    ``mythos_torch.sharding.full_tensor`` (a DTensor's ``full_tensor()``; under ep the expert stacks also
    over the expert ranks), in manifest order, so every rank issues the same collectives in the same order.
    """
    from mythos_torch.sharding import full_tensor

    sd = model.state_dict()
    return {p.path: to_numpy(full_tensor(model.sharding, p.path, sd[p.path])) for p in spec_lib.manifest(model.spec)}


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, or ``(0, 1)`` without one."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def on_rank0(write: Callable[[], T]) -> T | None:
    """``write()`` on rank 0 only; every rank then returns (rank 0 its result, the others None) or raises.

    Rank 0's outcome is broadcast, so an error there (a full disk, a bad target) is raised as a BridgeError
    on every rank instead of leaving the others waiting at their next collective.
    """
    rank, size = world()
    if size == 1:
        return write()
    import torch.distributed as dist

    result, error, exc = None, None, None
    if rank == 0:
        try:
            result = write()
        except Exception as e:  # noqa: BLE001 - sent to every rank, re-raised below
            exc, error = e, str(e) if isinstance(e, BridgeError) else f"{type(e).__name__}: {e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if exc is not None:
        raise exc
    if box[0] is not None:
        raise BridgeError(f"rank 0 failed: {box[0]}")
    return result


def barrier() -> None:
    """Wait for every rank of the default process group (nothing without one)."""
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
