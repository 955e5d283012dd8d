"""The twin on a torch.distributed DeviceMesh (docs/scaling.md): the spec's rule table (spec/sharding.py)
applied with torch's own engines: FSDP2 `fully_shard` (fsdp), FSDP2's `replicate` (dp), a DTensor
`parallelize_module` plan (tp) and the all-to-all expert-parallel MoE (ep, expert_parallel.py).

    >>> mesh = make_mesh({"data": 2, "model": 2})          # torchrun --nproc-per-node 4
    >>> model = shard(build(spec, seed=0), mesh, "fsdp+tp")
    >>> out = model(shard_batch(model, ids))               # this rank's rows of the batch

Each rank runs its own rows of the batch (the batch shards: spec.sharding.batch_axes). What must agree
across ranks does: the loop's early exit (`any_running`: every rank runs the steps of the longest row),
the loss denominators (losses.py: global counts, so that the averaged gradients are the unsharded
gradient) and the router-bias load (train.py: summed over the ranks).
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from spec.sharding import MESH_AXES, Strategy, batch_axes, check_batch, format_mesh, mesh_size, parse_strategy, \
    partition
from spec.schema import SpecError

from .attention import GQAttention, MLAttention
from .layers import SwiGLU
from .moe import MoE



def make_mesh(mesh: dict[str, int], *, device_type: str = "cpu") -> DeviceMesh:
    """A DeviceMesh over this job's ranks with the dict's axes, in order (spec.sharding.parse_mesh's dict).

    Args:
        mesh: mesh axis -> size, e.g. {"data": 2, "model": 2}; axes among data, model, expert; the sizes
            multiply to the world size (torchrun --nproc-per-node).
        device_type: "cpu" (gloo) or "cuda" (NCCL).
    Returns:
        init_device_mesh(device_type, sizes, mesh_dim_names=axes).
    """
    if not isinstance(mesh, dict) or not mesh:
        raise SpecError(f"make_mesh: mesh must be a non-empty dict of axis -> size (spec.sharding.parse_mesh), "
                        f"got {mesh!r}")
    for axis, size in mesh.items():
        if axis not in MESH_AXES:
            raise SpecError(f"make_mesh: unknown mesh axis {axis!r}; allowed: {', '.join(MESH_AXES)}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SpecError(f"make_mesh: {axis}={size!r} must be an integer >= 1")
    if not dist.is_initialized() and "RANK" not in os.environ:
        raise SpecError("make_mesh: torch.distributed is not initialised: run under torchrun "
                        "(torchrun --nproc-per-node N -m mythos ...) or call dist.init_process_group first")
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if mesh_size(mesh) != world:
        raise SpecError(f"make_mesh: mesh {format_mesh(mesh)} holds {mesh_size(mesh)} ranks, the job has {world} "
                        f"(torchrun --nproc-per-node {mesh_size(mesh)})")
    return init_device_mesh(device_type, tuple(mesh.values()), mesh_dim_names=tuple(mesh))


def shard(model: nn.Module, mesh: DeviceMesh, strategy: str | Sequence[str] | None = None) -> nn.Module:
    """Shard `model` over `mesh` by spec.sharding.partition, in place; returns the model.

    - tp: parallelize_module over the "model" dimension, Megatron style, the plan read from the rule table:
      a Linear whose weight splits on its output dim (attention q/k/v, SwiGLU gate/up) is ColwiseParallel,
      one split on its input dim (attention wo, SwiGLU down) RowwiseParallel; routed experts stay whole.
    - ep: expert_parallel.shard_experts (this rank keeps E / n experts; the all-to-all dispatch).
    - fsdp: fully_shard over "data" on each prelude and coda block, the looped block and the root, each
      parameter split on the dimension the rule table gives it (`embed`; Shard(0) for the rest). The looped
      block keeps its gathered parameters from the first loop step on (reshard_after_forward=False): one
      all-gather in the forward instead of N, and N - 1 in the backward (FSDP2 reshards after each call's
      backward), N per training step where resharding after each call would take 2N.
    - dp: FSDP2's replicate over the batch ranks (all-reduced gradients, one group: the root).
    Data parallelism spans every batch axis (spec.sharding.batch_axes: data, and expert under ep). Gradients
    are averaged over the batch ranks; the routed experts' (whose gradient an all-to-all already sums over
    the expert ranks) are divided by all the batch ranks, as torchtitan does.

    Args:
        model: a Mythos model, not sharded yet, on this rank; shard before making the optimizer (Trainer).
        mesh: from make_mesh; dimension names among data, model, expert.
        strategy: "dp", "fsdp", "tp", "ep" or a "+" combination (a str or a tuple of names); None: the
            mesh's default (data -> dp, model -> tp, expert -> ep).
    Returns:
        The model, with model.sharding = Sharding(mesh, strategy).
    Raises:
        SpecError: an unknown strategy or axis, or a dimension the mesh axis does not divide (naming the
            parameter, the axis and both sizes).
    """
    if not isinstance(mesh, DeviceMesh):
        raise SpecError(f"shard: mesh must be a torch.distributed DeviceMesh (make_mesh), got {type(mesh).__name__}")
    if getattr(model, "sharding", None) is not None:
        raise SpecError(f"shard: the model is already sharded ({_describe(model.sharding)}); build a new one")
    sizes = _sizes(mesh)
    strategy = _strategy(strategy, sizes)
    table = partition(model.spec, sizes, strategy)  # SpecError naming the tensor, axis and sizes
    if "tp" in strategy:
        _tensor_parallel(model, mesh["model"], table)
    if "ep" in strategy:
        from .expert_parallel import shard_experts  # imports experts.py and the all-to-all

        shard_experts(model.recurrent.block.ffn, mesh)
    if batch_axes(sizes, strategy):
        _data_parallel(model, mesh, strategy, table)
    model.sharding = Sharding(mesh, strategy)
    return model


def shard_batch(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a batch x (B, ...): the batch split evenly over the batch axes, in mesh order
    (the JAX twin's shard_batch places the same rows on the same mesh coordinates).

    Raises:
        SpecError: the model is not sharded, or B does not split evenly over the batch shards.
    """
    sh = _require(model, "shard_batch")
    x = torch.as_tensor(x)
    if x.dim() < 1:
        raise SpecError(f"shard_batch: x must have a leading batch axis, got shape {tuple(x.shape)}")
    sizes = _sizes(sh.mesh)
    check_batch(sizes, sh.strategy, x.shape[0])
    index, n = _batch_index(sh)
    rows = x.shape[0] // n
    return x[index * rows:(index + 1) * rows]


class Sharding(NamedTuple):
    """How a model is sharded (model.sharding; None: one process)."""
    mesh: DeviceMesh
    strategy: Strategy  # e.g. ("fsdp", "tp")


def reshard(model: nn.Module) -> None:
    """Register FSDP's sharded parameters on every module again: a forward without a backward (inference,
    generate) leaves the gathered ones; an optimizer must be made over the sharded ones (train.Trainer)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def any_running(sh: Sharding | None, running: torch.Tensor) -> bool:
    """Whether any position of any batch shard is still running: the loop's early exit, the same on every rank
    (ranks that stopped at different steps would issue different collectives: gloo aborts, NCCL hangs)."""
    flag = running.any()
    group = batch_group(sh)
    if group is None:
        return bool(flag)
    flag = flag.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag)


def batch_group(sh: Sharding | None) -> dist.ProcessGroup | None:
    """The process group of the ranks holding different rows of the batch (None: unsharded, or tp only)."""
    return None if sh is None else _batch_group(sh.mesh, sh.strategy)


@functools.lru_cache(maxsize=None)
def _batch_group(mesh: DeviceMesh, strategy: Strategy) -> dist.ProcessGroup | None:
    """batch_group, found once per mesh and strategy (the early exit asks at every loop step)."""
    axes = batch_axes(_sizes(mesh), strategy)
    if not axes or all(mesh[a].size() == 1 for a in axes):
        return None
    return _batch_mesh(mesh, axes).get_group()


def full_tensor(sh: Sharding | None, path: str, t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of manifest path `path` from this rank's piece of it (a collective on sharded pieces):
    a DTensor gathered, and under ep a routed expert stack gathered over the expert ranks."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if sh is not None and "ep" in sh.strategy and _is_expert(path):
        group, n = sh.mesh.get_group("expert"), sh.mesh["expert"].size()
        full = t.new_empty(n * t.shape[0], *t.shape[1:])  # rank order = expert order (expert_parallel.py)
        dist.all_gather_into_tensor(full, t.detach().contiguous(), group=group)
        t = full
    return t


def local_tensor(sh: Sharding | None, path: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of full_tensor: this rank's piece of a whole tensor, placed as `like` (no collective)."""
    if sh is not None and "ep" in sh.strategy and _is_expert(path):
        n = sh.mesh["expert"].size()
        per = full.shape[0] // n
        r = sh.mesh.get_local_rank("expert")
        full = full[r * per:(r + 1) * per]
    if isinstance(like, DTensor):  # every rank holds the whole tensor: each keeps its own piece
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.device, like.dtype)


def _is_expert(path: str) -> bool:
    return ".experts." in path


def _tensor_parallel(model: nn.Module, mesh: DeviceMesh, table: dict[str, tuple[str | None, ...]]) -> None:
    """Megatron tensor parallelism from the rule table: Colwise where a Linear's output dim splits on
    `model`, Rowwise where its input dim does (the matching Colwise feeds it its local slice). A GQA
    attention or SwiGLU takes its input as one replicated DTensor that its Colwise projections share, so
    the backward all-reduces the input's gradient once per module (Megatron's f), not once per projection."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan: dict[str, ParallelStyle] = {}
    modules = dict(model.named_modules())
    for path, axes in table.items():
        name = path.rsplit(".", 1)[0]
        module = modules.get(name)
        if "model" not in axes or not (isinstance(module, nn.Linear) and path.endswith(".weight")):
            continue
        if module.bias is not None:  # pragma: no cover - no split Linear of the twin has a bias
            raise SpecError(f"tp: {path} has a bias; the rule table splits only bias-free projections")
        plan[name] = ColwiseParallel() if axes[0] == "model" else RowwiseParallel()
        parent = name.rsplit(".", 1)[0]
        if axes[0] == "model" and isinstance(modules[parent], (GQAttention, SwiGLU)):  # x feeds only these
            plan[parent] = _ReplicatedInput()
        if isinstance(modules[parent], MLAttention):  # its one RoPE key meets this rank's heads only
            plan[f"{parent}.kv_down"] = _AllReducedRopeKey(modules[parent].qk_rope_head_dim)
    parallelize_module(model, mesh, plan)


class _ReplicatedInput(ParallelStyle):
    """A module's first input as a Replicate DTensor (the rest as they are): the gradients of its Colwise
    projections add up as one Partial DTensor, all-reduced once when they leave the module."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(_: nn.Module, args: tuple) -> tuple:
            return (DTensor.from_local(args[0], device_mesh, [Replicate()], run_check=False), *args[1:])

        module.register_forward_pre_hook(to_dtensor)
        return module


class _AllReducedRopeKey(ParallelStyle):
    """MLA's kv_down (replicated) under tp: the shared RoPE key k_r (its last `rope` outputs) is read by this
    rank's heads only, so its gradient is partial; it passes an identity whose backward all-reduces it
    (Megatron's f). The latent c_kv's gradient is whole already (kv_up's Colwise input all-reduces it)."""

    def __init__(self, rope: int):
        super().__init__()
        self.rope = rope

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def all_reduced_key(_: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            c_kv, k_r = out.split([out.shape[-1] - self.rope, self.rope], dim=-1)
            k_r = DTensor.from_local(k_r, device_mesh, [Replicate()], run_check=False).to_local(
                grad_placements=[Partial()])  # forward: the same values; backward: summed over the ranks
            return torch.cat([c_kv, k_r], dim=-1)

        module.register_forward_hook(all_reduced_key)
        return module


def _data_parallel(model: nn.Module, mesh: DeviceMesh, strategy: Strategy,
                   table: dict[str, tuple[str | None, ...]]) -> None:
    """FSDP2 over the batch ranks: fully_shard (fsdp, split over data, replicated over expert) or replicate."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import fully_shard

    sizes = _sizes(mesh)
    axes = batch_axes(sizes, strategy)
    moe = model.recurrent.block.ffn
    names = {id(p): n for n, p in model.named_parameters()}
    modules: list[nn.Module] = []  # every FSDP module, for the settings below

    def placement(p: nn.Parameter) -> Shard | None:
        """The parameter's `data` dimension of the rule table; None (Shard(0)) when it has none."""
        dims = [d for d, a in enumerate(table[names[id(p)]]) if a == "data"]
        return Shard(dims[0]) if dims else None

    ignored: set[nn.Parameter] = set()
    if "ep" in strategy:
        # the all-to-all's backward sums the experts' gradient over the expert ranks, the data-parallel
        # reduction averages it over their replicas on data: divided by the expert ranks too, it is the
        # average over every batch rank, as the other parameters' (torchtitan divides the same way)
        experts, n_expert = moe.experts, float(sizes["expert"])
        params = list(experts.parameters())
        if sizes.get("data", 1) > 1:
            if "fsdp" in strategy:
                fully_shard(experts, mesh=mesh["data"], shard_placement_fn=placement, reshard_after_forward=False)
            else:
                replicate(experts, mesh=mesh["data"])
            # (not set_gradient_divide_factor: torch 2.13's replicate divides by that factor twice)
            experts.set_all_reduce_hook(lambda g: g.div_(n_expert))
            modules.append(experts)
        else:  # one replica of each expert: no reduction, the sum over the expert ranks scaled here
            _divide_grads(moe, experts, n_expert)
            ignored = set(params)
    if "fsdp" in strategy:
        # split over data; replicated over expert when the batch also splits over it (HSDP: replicate, shard)
        dense = mesh["data"] if "ep" not in strategy else DeviceMesh._concatenate([mesh["expert"], mesh["data"]])
        for block in list(model.prelude) + list(model.coda):
            modules.append(fully_shard(block, mesh=dense, shard_placement_fn=placement))
        # the looped block runs N times per forward: gathered once, kept until its backward
        modules.append(fully_shard(model.recurrent.block, mesh=dense, shard_placement_fn=placement,
                                   reshard_after_forward=False))
        modules.append(fully_shard(model, mesh=dense, shard_placement_fn=placement))
    else:
        modules.append(replicate(model, mesh=_batch_mesh(mesh, axes), ignored_params=ignored or None))
    if mesh.device_type == "cpu":  # gloo has neither AVG nor PREMUL_SUM: sum, then divide
        for m in modules:
            m.set_force_sum_reduction_for_comms(True)


def _divide_grads(moe: MoE, experts: nn.Module, n: float) -> None:
    """Divide the gradients of `experts`' parameters by n: a hook on each parameter, put there before every MoE
    forward, so that parameters replaced after shard get it too (to_empty of a model sharded on the meta
    device, as torchtitan's trainer materialises it, makes new Parameters; hooks stay with the old ones)."""
    hooked: dict[int, weakref.ref] = {}

    def before_forward(module: nn.Module, args: tuple) -> None:
        for p in experts.parameters():
            ref = hooked.get(id(p))
            if p.requires_grad and (ref is None or ref() is not p):
                p.register_hook(lambda g: g / n)
                hooked[id(p)] = weakref.ref(p)

    moe.register_forward_pre_hook(before_forward)


def _batch_mesh(mesh: DeviceMesh, axes: tuple[str, ...]) -> DeviceMesh:
    """The 1-D mesh of the batch shards: one axis, or data x expert flattened (data major, as shard_batch)."""
    return mesh[axes[0]] if len(axes) == 1 else mesh[axes]._flatten("_".join(axes))


def _batch_index(sh: Sharding) -> tuple[int, int]:
    """(this rank's batch shard, the number of batch shards): data major, expert minor."""
    index, n = 0, 1
    for a in batch_axes(_sizes(sh.mesh), sh.strategy):
        size = sh.mesh[a].size()
        index, n = index * size + sh.mesh.get_local_rank(a), n * size
    return index, n


def _sizes(mesh: DeviceMesh) -> dict[str, int]:
    """The mesh as spec.sharding's dict: axis -> size, in mesh order."""
    names = mesh.mesh_dim_names
    if names is None:
        raise SpecError("shard: the DeviceMesh has no dimension names; make it with make_mesh (or "
                        "init_device_mesh(..., mesh_dim_names=...)) naming data, model, expert")
    for name in names:
        if name not in MESH_AXES:
            raise SpecError(f"mesh dimension {name!r} is not a Mythos mesh axis; allowed: {', '.join(MESH_AXES)}")
    return {str(a): int(mesh.size(i)) for i, a in enumerate(names)}


def _strategy(strategy: str | Sequence[str] | None, sizes: dict[str, int]) -> Strategy:
    """strategy as spec.sharding.parse_strategy's validated tuple (None: the mesh's default)."""
    if strategy is None or isinstance(strategy, str):
        text = strategy
    elif isinstance(strategy, (tuple, list)) and all(isinstance(s, str) for s in strategy):
        text = "+".join(strategy)
    else:
        raise SpecError(f"shard: strategy must be a str like 'fsdp+tp' or a tuple of names, got {strategy!r}")
    return parse_strategy(text, sizes)


def _require(model: nn.Module, who: str) -> Sharding:
    sh = getattr(model, "sharding", None)
    if sh is None:
        raise SpecError(f"{who}: the model is not sharded; call mythos_torch.sharding.shard(model, mesh, strategy) "
                        "first")
    return sh


def _describe(sh: Sharding) -> str:
    return f"mesh {format_mesh(_sizes(sh.mesh))}, strategy {'+'.join(sh.strategy)}"
