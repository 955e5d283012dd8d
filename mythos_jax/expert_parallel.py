"""Expert parallelism (docs/scaling.md, strategy `ep`): the routed experts split over the mesh's "expert"
axis, each (token, slot) row sent to its expert's device and back with all_to_all inside a shard_map.

    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))
    >>> shard_experts(model.recurrent.block.ffn, mesh)     # sharding.shard(model, mesh, "dp+ep") calls it
    >>> out = forward(model, ids)                          # the MoE now calls moe.dispatch

One dispatch, per loop step, on each device of the mesh (token rows split over the batch axes, data then
expert; the expert stacks split on E over expert, so a device holds E / n_expert of them):
    1. its n local rows x (n, D) and their k experts: (token, slot) row m goes to device expert // (E / n_expert);
    2. a fixed-capacity send buffer (n_expert, C, D) and the local expert id of each entry (E / n_expert: empty);
    3. all_to_all over "expert" (the rows, then the ids), the local experts on what arrived (the tiled
       kernel of experts.py on the local weight slices; empty entries are zero rows no tile writes),
       all_to_all of the results back, and the rows put back in (token, slot) order (n, k, D).
Compiled (tests/sharded/test_jax_ep.py reads the programs), per loop step: three all-to-alls in the forward
(rows, ids, results), two more in the backward (the cotangents of results and rows) and one all-reduce of
the local expert-gradient blocks (E / n_expert, ...) over the data axis (the devices that share those
experts); no all-gather: expert weights never leave their device and their gradients stay split on E.
Routing runs per row shard too (`route`): XLA's partitioner would gather the router logits for lax.top_k.
A token count not divisible by the row shards (a decode step at batch 1) is padded with rows sent nowhere.

Capacity C per (source device, destination device) pair: by default C = n * k, every row of a device
could go to one device, so no row is ever dropped (the tests use it). With capacity_factor f,
C = min(n * k, ceil(f * n * k / n_expert)): a (token, slot) row whose rank among its device's rows bound
for the same destination is C or more is dropped, its output is zero (the token keeps its other slots,
not renormalised, and the shared experts), and `dispatch.kept(idx)` / `dispatch.dropped(idx)` give which
rows and how many for the idx a call saw (the forward's traces.expert_idx of a step, reshaped to (B * T, k)).

Dropless without the worst-case buffer is jax.lax.ragged_all_to_all: each pair sends only its rows (sizes
exchanged by a first all_to_all). XLA implements it on GPU and TPU, not on XLA:CPU ("HLO opcode
`ragged-all-to-all` is not supported by XLA:CPU"); `ragged_supported(mesh)` probes the backend. This file
runs the fixed-capacity path everywhere: the ragged path would replace steps 2-3 on GPU/TPU meshes, and no
backend here can run (hence test) it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from .experts import SMALL_ROWS, Experts, _gathered, _tile_sizes, _tiles, expert_tiles
from .moe import MoE, route

AXIS = "expert"  # the mesh axis the experts split over
ROW_AXES = ("data", "expert")  # the mesh axes token rows split over (spec.sharding.batch_axes), when present


def shard_experts(moe: MoE, mesh: jax.sharding.Mesh, capacity_factor: float | None = None) -> None:
    """Split moe's routed experts over the mesh's "expert" axis and make its dispatch the all-to-all (in place).

    Args:
        moe: the looped block's MoE FFN (model.recurrent.block.ffn).
        mesh: a jax.sharding.Mesh with an "expert" axis whose size divides the expert count.
        capacity_factor: None (default): capacity for every row of a device on one device, none dropped;
            f > 0: C = ceil(f * n * k / n_expert) rows per device pair, rows past it dropped (module docstring).
    """
    if not isinstance(moe, MoE):
        raise ValueError(f"shard_experts needs the MoE FFN (model.recurrent.block.ffn), got {type(moe).__name__}: "
                         "a dense FFN (recurrent.ffn=dense) has no experts to split")
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"shard_experts: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if AXIS not in mesh.axis_names:
        raise ValueError(f"shard_experts: the mesh has axes {tuple(mesh.axis_names)}, no {AXIS!r} axis to split "
                         "the experts over")
    explicit = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
    if explicit:
        raise ValueError(f"shard_experts: mesh axes {tuple(explicit)} are not AxisType.Auto (jax.make_mesh's default "
                         "is Explicit); the twin runs under GSPMD: build the mesh with mythos_jax.sharding.make_mesh "
                         "or jax.sharding.Mesh(devices, names)")
    n = mesh.shape[AXIS]
    E = moe.experts.gate.shape[0]
    if E % n:
        raise ValueError(f"shard_experts: moe.n_experts={E} is not divisible by mesh axis {AXIS}={n}")
    if capacity_factor is not None and (isinstance(capacity_factor, bool)
                                        or not isinstance(capacity_factor, (int, float))
                                        or not math.isfinite(capacity_factor) or capacity_factor <= 0):
        raise ValueError(f"shard_experts: capacity_factor={capacity_factor!r} must be a number > 0 (or None: "
                         "no row dropped)")
    stacks = NamedSharding(mesh, PartitionSpec(AXIS, None, None))  # (E, in, out) split on E
    for name in ("gate", "up", "down"):
        var = getattr(moe.experts, name)
        var.set_value(jax.device_put(var.get_value(), stacks))
    moe.dispatch = _AllToAll(mesh, E, None if capacity_factor is None else float(capacity_factor))


def shard_rows(moe: MoE, mesh: jax.sharding.Mesh) -> None:
    """Without ep, on a mesh that splits the batch: route and run the experts per row shard (in place).

    The experts stay where the rule table put them (whole, or split on D under fsdp, which gathers them as
    FSDP does); each device ranks, sorts and multiplies its own rows. Under GSPMD alone the MoE ran as one
    global computation: the expert sort all-gathered every id, bincount and the sorted-row gather
    all-reduced, lax.top_k all-gathered the router logits, every loop step (measured in the compiled HLO).
    """
    if not isinstance(moe, MoE):
        raise ValueError(f"shard_rows needs the MoE FFN (model.recurrent.block.ffn), got {type(moe).__name__}")
    moe.dispatch = _PerShard(mesh)


@dataclasses.dataclass(frozen=True)
class _RowShards:
    """What both dispatches share: the mesh, its row (batch) axes and shard count, and routing per row shard.

    Frozen and hashable: nnx keeps a dispatch in the model's static graph, so jit compiles it into the program.
    """
    mesh: jax.sharding.Mesh

    @property
    def row_axes(self) -> tuple[str, ...]:
        return _row_axes(self.mesh)

    @property
    def shards(self) -> int:
        return _shards(self.mesh)

    def route(self, logits: jax.Array, bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """moe.route on each row shard (inside a shard_map): the same idx, weights and margin, and no collective.

        Routing is per token, yet XLA's partitioner gathers every row's logits to one lax.top_k per device
        (an all-gather of (B, T, E) per loop step, measured); per shard, each device ranks its own rows.
        """
        return _route_per_shard(self.mesh, self.row_axes, self.shards, logits, bias, top_k)


@dataclasses.dataclass(frozen=True)
class _PerShard(_RowShards):
    """MoE.dispatch of a batch-split mesh without ep: the values of experts(x, idx), each row shard on its own."""

    def __call__(self, experts: Experts, x: jax.Array, idx: jax.Array) -> jax.Array:
        N, k = idx.shape
        pad = -(-N // self.shards) * self.shards - N  # rows of zeros to whole shards, cut off after
        if pad:
            x, idx = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(idx, ((0, pad), (0, 0)))
        rows, whole = PartitionSpec(self.row_axes), PartitionSpec()

        def local(x: jax.Array, idx: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
            n, k = idx.shape  # (token, slot) rows, each through its expert: Experts' sorted tiles
            return _local_experts(jnp.repeat(x, k, axis=0), idx.reshape(n * k), gate, up, down).reshape(n, k, -1)

        y = jax.shard_map(local, mesh=self.mesh, in_specs=(rows, rows, whole, whole, whole), out_specs=rows,
                          check_vma=False)(x, idx, experts.gate[...], experts.up[...], experts.down[...])
        return y[:N]


@dataclasses.dataclass(frozen=True)
class _AllToAll(_RowShards):
    """MoE.dispatch under ep: (experts, x (N, D), idx (N, k)) -> (N, k, D), the values of experts(x, idx)."""
    n_experts: int  # E, the routed experts (E / n_expert per device)
    capacity_factor: float | None = None

    def capacity(self, rows: int, k: int) -> int:
        """C, the (token, slot) rows one device may send to one device, for `rows` local tokens of k slots."""
        M = rows * k
        if self.capacity_factor is None:
            return M
        return max(1, min(M, math.ceil(self.capacity_factor * M / self.mesh.shape[AXIS])))

    def __call__(self, experts: Experts, x: jax.Array, idx: jax.Array) -> jax.Array:
        N, k = idx.shape
        n = -(-N // self.shards)  # local rows; rows past N (padding to whole shards) are sent nowhere
        pad = n * self.shards - N
        valid = jnp.arange(N + pad) < N
        if pad:
            x = jnp.pad(x, ((0, pad), (0, 0)))
            idx = jnp.pad(idx, ((0, pad), (0, 0)))
        rows, stacks = PartitionSpec(self.row_axes), PartitionSpec(AXIS)
        args = (x, idx, valid, experts.gate[...], experts.up[...], experts.down[...])
        specs = (rows, rows, rows, stacks, stacks, stacks)
        # check_vma=False: the tile loop's carries start as zeros (invariant) and turn device-varying, which
        # the varying-axes check rejects; the transpose then sums weight gradients over the unmentioned axes
        local = functools.partial(_exchange, capacity=self.capacity(n, k), n_dest=self.mesh.shape[AXIS])
        y = jax.shard_map(local, mesh=self.mesh, in_specs=specs, out_specs=rows, check_vma=False)(*args)
        return y[:N]

    def kept(self, idx: jax.Array) -> jax.Array:
        """(N, k) bool: which (token, slot) rows of a call with idx (N, k) reach their expert (False: dropped)."""
        idx = jnp.asarray(idx)
        N, k = idx.shape
        n = -(-N // self.shards)
        pad = n * self.shards - N
        ids = jnp.pad(idx, ((0, pad), (0, 0))).reshape(self.shards, n * k)  # shard s holds rows s*n .. s*n+n-1
        ok = jnp.repeat(jnp.arange(N + pad) < N, k).reshape(self.shards, n * k)
        slots = functools.partial(_slots, local=self.n_experts // self.mesh.shape[AXIS],
                                  n_dest=self.mesh.shape[AXIS], capacity=self.capacity(n, k))
        keep = jax.vmap(lambda e, v: slots(e, v)[2])(ids, ok)
        return keep.reshape(n * self.shards, k)[:N]

    def dropped(self, idx: jax.Array) -> jax.Array:
        """() int32: (token, slot) rows of a call with idx (N, k) that capacity dropped (0 by default)."""
        return jnp.sum(~self.kept(idx), dtype=jnp.int32)


def _row_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes token rows split over (ROW_AXES present in the mesh)."""
    return tuple(a for a in ROW_AXES if a in mesh.axis_names)


def _shards(mesh: jax.sharding.Mesh) -> int:
    """Row shards: the product of the row axes' sizes."""
    return math.prod(mesh.shape[a] for a in _row_axes(mesh))


def _route_per_shard(mesh: jax.sharding.Mesh, row_axes: tuple[str, ...], shards: int, logits: jax.Array,
                     bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """moe.route of logits (..., E) with the rows split over row_axes, inside a shard_map: no collective."""
    *lead, E = logits.shape
    z = logits.reshape(-1, E)
    N = z.shape[0]
    pad = -(-N // shards) * shards - N  # a decode step at batch 1: rows of zeros, cut off after
    if pad:
        z = jnp.pad(z, ((0, pad), (0, 0)))
    rows = PartitionSpec(row_axes)
    local = functools.partial(route, top_k=top_k)
    idx, w, margin = jax.shard_map(local, mesh=mesh, in_specs=(rows, PartitionSpec()),
                                   out_specs=(rows, rows, rows), check_vma=False)(z, bias)
    return idx[:N].reshape(*lead, top_k), w[:N].reshape(*lead, top_k), margin[:N].reshape(lead)


def _slots(expert: jax.Array, valid: jax.Array, local: int, n_dest: int, capacity: int
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each of a device's M (token, slot) rows goes: expert (M,) and valid (M,) -> its destination
    device (M,), its send-buffer entry dest * C + rank among the rows bound there (M,; n_dest * C: none),
    and whether it is sent (M,) bool (valid and its rank below the capacity C)."""
    dest = expert // local  # (M,) the device holding the row's expert
    bound = (dest[:, None] == jnp.arange(n_dest, dtype=dest.dtype)) & valid[:, None]  # (M, n_dest)
    rank = jnp.take_along_axis(jnp.cumsum(bound, axis=0, dtype=jnp.int32) - bound, dest[:, None], axis=1)[:, 0]
    keep = valid & (rank < capacity)
    return dest, jnp.where(keep, dest * capacity + rank, n_dest * capacity), keep


def _exchange(x: jax.Array, idx: jax.Array, valid: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, *,
              capacity: int, n_dest: int) -> jax.Array:
    """One device's part of the dispatch (inside shard_map): its rows x (n, D), their experts idx (n, k),
    valid (n,), the local expert stacks (E / n_dest, ...) -> its rows through their experts (n, k, D)."""
    n, k = idx.shape
    D = x.shape[-1]
    local = gate.shape[0]
    C = capacity
    expert = idx.reshape(n * k)  # row m = (token m // k, slot m % k)
    _, entry, keep = _slots(expert, jnp.repeat(valid, k), local, n_dest, C)
    # the send buffers, one extra entry that takes the rows not sent (cut off before sending)
    send_x = jnp.zeros((n_dest * C + 1, D), x.dtype).at[entry].set(jnp.repeat(x, k, axis=0))[:-1]
    send_e = jnp.full((n_dest * C + 1,), local, jnp.int32).at[entry].set(expert % local)[:-1]  # local: empty
    # entry j * C + c goes to device j; what arrives from device j lands at j * C + c
    recv_x = jax.lax.all_to_all(send_x.reshape(n_dest, C, D), AXIS, 0, 0, tiled=True).reshape(n_dest * C, D)
    recv_e = jax.lax.all_to_all(send_e.reshape(n_dest, C), AXIS, 0, 0, tiled=True).reshape(n_dest * C)
    y = _local_experts(recv_x, recv_e, gate, up, down)  # (n_dest * C, D); empty entries 0
    back = jax.lax.all_to_all(y.reshape(n_dest, C, D), AXIS, 0, 0, tiled=True).reshape(n_dest * C, D)
    out = back[jnp.minimum(entry, n_dest * C - 1)]  # row m's result, where it was sent
    return jnp.where(keep[:, None], out, 0).reshape(n, k, D)


def _local_experts(x: jax.Array, expert: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Row r of x (R, D) through local expert expert[r] (R,) -> (R, D); expert == E_local (empty) -> zero row.

    Experts.__call__ with one slot on the local weight slices: rows sorted by expert, tiles of sorted rows
    (experts.py); the empty rows sort last, past every tile (bincount drops them), so nothing writes them.
    """
    R, D = x.shape
    E = gate.shape[0]
    if R <= SMALL_ROWS:  # static, as in Experts
        ys = _gathered(x, jnp.minimum(expert, E - 1)[:, None], gate, up, down)[:, 0]
        return jnp.where((expert < E)[:, None], ys, 0)
    sizes = _tile_sizes(R, E)
    order = jnp.argsort(expert, stable=True).astype(jnp.int32)  # (R,) rows sorted by expert, empty ones last
    counts = jnp.bincount(expert, length=E).astype(jnp.int32)  # (E,), the empty rows not counted
    src = jnp.concatenate([order, jnp.full((sizes[-1],), R, dtype=jnp.int32)])
    xs = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[src]  # (R + b, D); row R is the zero row
    ys = expert_tiles(xs, gate, up, down, _tiles(counts, sizes, R), sizes)  # (R + b, D)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(R, dtype=jnp.int32))
    return ys[inverse]


@functools.lru_cache(maxsize=None)
def _ragged_probe(device: jax.Device) -> bool:
    """Whether a one-device ragged_all_to_all compiles on the device's backend (once per device)."""
    mesh = jax.sharding.Mesh(np.array([device]), (AXIS,))

    def f(x: jax.Array) -> jax.Array:
        one = jnp.ones((1,), jnp.int32)
        zero = jnp.zeros((1,), jnp.int32)
        return jax.lax.ragged_all_to_all(x, jnp.zeros_like(x), zero, one, zero, one, axis_name=AXIS)

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=PartitionSpec(AXIS), out_specs=PartitionSpec(AXIS)))
    try:
        g.lower(jax.ShapeDtypeStruct((1, 1), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 - XLA's "not supported" comes as a runtime error of its own type
        return False
    return True


def ragged_supported(mesh: jax.sharding.Mesh) -> bool:
    """Whether the mesh's backend compiles jax.lax.ragged_all_to_all (GPU, TPU: yes; XLA:CPU: no)."""
    return _ragged_probe(mesh.devices.flat[0])
