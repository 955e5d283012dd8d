"""Expert parallelism (strategy `ep`, docs/scaling.md): each rank of the mesh's "expert" dimension keeps E / n of
the routed experts, and MoE.dispatch sends every (token, slot) row to the rank of its expert and the result back.

Per loop step (one MoE call) and rank, three all_to_all_single over the "expert" process group (gloo and NCCL
both have it, with variable split sizes; torch 2.13):
  1. the row counts per (destination rank, local expert), E int64 values: the receiver reads its local expert
     ids from them, so no id travels with the rows;
  2. the rows themselves (N_local * k rows of D, dropless: the split sizes are the counts, read on the host,
     one device-to-host sync per MoE call on a GPU);
  3. the experts' outputs back, with the reversed split sizes.
The backward pass issues the reverse of 2 and 3 (two more all_to_all_single). The router (weight and bias) and the
shared experts stay replicated: the global expert load that moves the router bias is an all-reduce of
expert_load over the ranks (sharding.py / train.py), not here.

    >>> mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("expert",))
    >>> shard_experts(model.recurrent.block.ffn, mesh)   # this rank keeps E / 4 experts
    >>> out = model(ids_of_this_rank)                    # every rank runs the same loop steps
    >>> full = full_expert_arrays(model.recurrent.block.ffn, mesh)   # {"gate": (E, D, hidden), ...} on every rank

Every rank must issue the same collectives in the same order: all ranks of the expert group must run the same
number of loop steps (early exit decided on the global "any position running", sharding.py) and call backward
together.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .experts import Experts
from .moe import MoE
from .weights import _to_numpy

AXIS = "expert"  # the mesh dimension the experts are split over (spec.sharding.STRATEGY_AXIS["ep"])


def shard_experts(moe: MoE, mesh: DeviceMesh, capacity_factor: float | None = None) -> None:
    """Keep this rank's experts of `moe` and make its dispatch the all-to-all over the mesh's "expert" dimension.

    Args:
        moe: the looped block's MoE FFN (model.recurrent.block.ffn), holding all E experts. Shard before the
            optimizer is made: the expert parameters are replaced.
        mesh: a DeviceMesh with an "expert" dimension of size n dividing E (other dimensions, e.g. "data", are
            left to sharding.py). Rank r of that dimension keeps experts r * E / n .. (r + 1) * E / n - 1.
        capacity_factor: None (default): dropless, every row reaches its expert. A float > 0: at most
            ceil(capacity_factor * N_local * k / n) rows go from this rank to each rank per call, in (token, slot)
            order; later rows are dropped (their slot's output is 0) and counted in moe.dispatch.dropped.
    Returns:
        None; moe.experts.gate/up/down become plain Parameters of shape (E / n, ...) and moe.dispatch is set.
    """
    if not isinstance(moe, MoE):
        raise ValueError(f"shard_experts needs the MoE FFN (model.recurrent.block.ffn), got {type(moe).__name__}: "
                         "a dense FFN (recurrent.ffn=dense) has no experts to split")
    if moe.dispatch is not None:
        raise ValueError("shard_experts: this MoE already has a dispatch (it is expert-parallel already); "
                         "shard a freshly built model")
    names = mesh.mesh_dim_names or ()
    if AXIS not in names:
        raise ValueError(f"shard_experts: the mesh has dimensions {names}, none named {AXIS!r} "
                         f"(init_device_mesh(..., mesh_dim_names=(..., {AXIS!r})))")
    n = mesh[AXIS].size()
    E = moe.n_experts
    if E % n:
        raise ValueError(f"shard_experts: moe.n_experts={E} is not divisible by the mesh's {AXIS}={n}")
    if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0
                                            and not isinstance(capacity_factor, bool)):
        raise ValueError(f"shard_experts: capacity_factor={capacity_factor!r} must be None (dropless) or a number > 0")
    per = E // n
    r = mesh.get_local_rank(AXIS)
    ex = moe.experts
    for name in ("gate", "up", "down"):
        full = getattr(ex, name)
        # a plain Parameter of the local slice (DTensor expert stacks fail in bmm); a copy, so the full stack is freed
        setattr(ex, name, nn.Parameter(full.detach()[r * per:(r + 1) * per].clone(), requires_grad=full.requires_grad))
    moe.dispatch = _AllToAllDispatch(mesh.get_group(AXIS), n, per, capacity_factor)


def full_expert_arrays(moe: MoE, mesh: DeviceMesh) -> dict[str, np.ndarray]:
    """The whole expert stacks of an expert-parallel MoE, gathered from the ranks of the "expert" dimension.

    A collective: every rank of the expert group calls it. Returns, on every rank, {"gate": (E, D, hidden),
    "up": (E, D, hidden), "down": (E, hidden, D)} as NumPy arrays in torch layout (bfloat16 as ml_dtypes), the
    tensors of manifest paths `recurrent.block.ffn.experts.<name>`: with the model's other state_dict entries
    they make the full weights file (weights_bridge.save). Ranks that differ only on other mesh dimensions
    ("data") hold the same slices; only the expert group is gathered.
    """
    if not isinstance(moe.dispatch, _AllToAllDispatch):
        raise ValueError("full_expert_arrays: this MoE is not expert-parallel (no shard_experts); "
                         "its experts are whole already (moe.experts.gate etc.)")
    group, n = mesh.get_group(AXIS), mesh[AXIS].size()
    out = {}
    for name in ("gate", "up", "down"):
        local = getattr(moe.experts, name).detach()  # (E / n, ...)
        if isinstance(local, DTensor):  # fsdp+ep: FSDP2 splits this rank's slice further over "data"
            local = local.full_tensor()
        local = local.contiguous()
        full = local.new_empty(n * local.shape[0], *local.shape[1:])  # (E, ...), rank order = expert order
        dist.all_gather_single(full, local, group=group)
        out[name] = _to_numpy(full)
    return out


class _AllToAllDispatch:
    """MoE.dispatch of an expert-parallel MoE: (local experts, x (N, D), idx (N, k) global ids) -> (N, k, D)."""

    def __init__(self, group: dist.ProcessGroup, n: int, per: int, capacity_factor: float | None):
        self.group, self.n, self.per, self.capacity_factor = group, n, per, capacity_factor
        self.dropped = 0  # (token, slot) rows this rank dropped for capacity since shard_experts

    def __call__(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        N, k = idx.shape
        D = x.shape[1]
        n, per = self.n, self.per
        flat = idx.reshape(-1).long()  # (M,), row m = (token m // k, slot m % k), global expert id
        rows = torch.arange(flat.numel(), device=flat.device)  # (M,) the rows that travel
        if self.capacity_factor is not None:
            rows = self._within_capacity(flat, N * k)
        order = rows[torch.argsort(flat[rows], stable=True)]  # kept rows sorted by expert (so by destination rank)
        counts = torch.bincount(flat[order], minlength=n * per)  # (E,) rows to each expert = (n, per) by rank
        got = torch.empty_like(counts)  # (n * per,): got[s * per + j] rows from rank s for local expert j
        dist.all_to_all_single(got, counts, group=self.group)
        send = counts.view(n, per).sum(1).tolist()  # rows to each rank
        recv = got.view(n, per).sum(1).tolist()  # rows from each rank
        xr = _AllToAll.apply(x.index_select(0, order // k), recv, send, self.group)  # (R, D) rows received
        # the received rows come rank by rank, each rank's sorted by expert: their local ids from the counts
        local = torch.repeat_interleave(torch.arange(per, device=x.device).repeat(n), got)  # (R,)
        R = xr.shape[0]
        if R == 0:
            # no row for this rank's experts: they still run, on one zero row that is then dropped, so that every
            # rank makes the same module calls (FSDP's hooks gather over "data" in them under fsdp+ep) and the
            # received rows and the weights stay in the graph (every rank's backward runs both reverse exchanges;
            # the weights get a zero gradient, as unsharded)
            xr, local = torch.cat([xr, xr.new_zeros(1, D)]), local.new_zeros(1)
        yr = experts(xr, local[:, None].to(torch.int32))[:R, 0]  # (R, D): Experts' kernels on the local stacks
        ys = _AllToAll.apply(yr, send, recv, self.group)  # (len(order), D) back in the order sent
        if ys.shape[0] == N * k:  # dropless: every row came back
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            return ys.index_select(0, inverse).view(N, k, D)
        return ys.new_zeros(N * k, D).index_copy(0, order, ys).view(N, k, D)  # dropped rows: 0

    def _within_capacity(self, flat: torch.Tensor, M: int) -> torch.Tensor:
        """The rows (M,) that fit: the first C to each destination rank in (token, slot) order; counts the rest."""
        C = math.ceil(self.capacity_factor * M / self.n)
        dest = flat // self.per  # (M,)
        onehot = torch.nn.functional.one_hot(dest, self.n)  # (M, n)
        place = (onehot.cumsum(0) * onehot).sum(1) - 1  # (M,) the row's place among those to its rank
        keep = place < C
        self.dropped += int((~keep).sum())
        return keep.nonzero()[:, 0]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows x (sum(send), ...) -> (sum(recv), ...); its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _AllToAll.apply(grad.contiguous(), ctx.send, ctx.recv, ctx.group), None, None, None
