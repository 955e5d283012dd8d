"""The twin on a jax.sharding.Mesh (docs/scaling.md): every variable placed by the spec's rule table
(spec/sharding.py), the batch split over the batch axes; jit then compiles one GSPMD program for the mesh.

    >>> mesh = make_mesh({"data": 2, "expert": 4})
    >>> model = shard(build(spec, seed=0), mesh, "dp+ep")
    >>> out = forward(model, shard_batch(model, ids))

With GSPMD every reduction runs over the global arrays, so the loss denominators, ACT's "any position
still running" and the expert load are global by construction (no code here). Expert parallelism
(`ep`) replaces the MoE's dispatch with a shard_map all-to-all (expert_parallel.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spec import Spec, manifest
from spec.sharding import MESH_AXES, Strategy, batch_axes, check_batch, format_mesh, parse_strategy, partition
from spec.schema import SpecError

from .cache import KVCache
from .weights import _variable, torch_path



def make_mesh(mesh: dict[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A jax.sharding.Mesh with the dict's axes, in order (spec.sharding.parse_mesh's dict).

    Args:
        mesh: mesh axis -> size, e.g. {"data": 2, "expert": 4}; axes among data, model, expert.
        devices: the devices to lay out (None: jax.devices()); the first prod(sizes) are used.
    Returns:
        jax.sharding.Mesh of shape tuple(mesh.values()) with axis names tuple(mesh).
    """
    if not isinstance(mesh, dict) or not mesh:
        raise SpecError(f"make_mesh: mesh must be a non-empty dict of axis -> size (spec.sharding.parse_mesh), "
                        f"got {mesh!r}")
    for axis, size in mesh.items():
        if axis not in MESH_AXES:
            raise SpecError(f"make_mesh: unknown mesh axis {axis!r}; allowed: {', '.join(MESH_AXES)}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SpecError(f"make_mesh: {axis}={size!r} must be an integer >= 1")
    devices = list(jax.devices() if devices is None else devices)
    n = int(np.prod(list(mesh.values())))
    if n > len(devices):
        raise SpecError(f"make_mesh: mesh {format_mesh(mesh)} needs {n} devices, {len(devices)} available "
                        f"(on the CPU: XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    grid = np.asarray(devices[:n], dtype=object).reshape(tuple(mesh.values()))
    return jax.sharding.Mesh(grid, tuple(mesh))


def shard(model: nnx.Module, mesh: jax.sharding.Mesh, strategy: str | Sequence[str] | None = None) -> nnx.Module:
    """Place every variable of `model` on `mesh` by spec.sharding.partition, in place; returns the model.

    A linear kernel is the torch weight transposed, so its mesh axes are the manifest's reversed. With
    `ep` the MoE's experts also get the all-to-all dispatch (expert_parallel.shard_experts).

    Args:
        model: a Mythos model (not already sharded).
        mesh: from make_mesh; axis names among data, model, expert.
        strategy: "dp", "fsdp", "tp", "ep" or a "+" combination (a str or a tuple of names); every
            strategy's axis must be in the mesh and every mesh axis of size > 1 used by one. None: the
            mesh's default (data -> dp, model -> tp, expert -> ep).
    Returns:
        The model, with model.sharding = Sharding(mesh, strategy).
    Raises:
        SpecError: an unknown strategy or axis, or a dimension the mesh axis does not divide (naming the
            parameter, the axis and both sizes).
    """
    if not isinstance(mesh, jax.sharding.Mesh):
        raise SpecError(f"shard: mesh must be a jax.sharding.Mesh (make_mesh), got {type(mesh).__name__}")
    explicit = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != jax.sharding.AxisType.Auto]
    if explicit:
        raise SpecError(f"shard: mesh axes {tuple(explicit)} are not AxisType.Auto (jax.make_mesh's default is "
                        "Explicit); the twin runs under GSPMD: build the mesh with make_mesh")
    if getattr(model, "sharding", None) is not None:
        raise SpecError(f"shard: the model is already sharded ({_describe(model.sharding)}); build a new one")
    sizes = _sizes(mesh)
    strategy = _strategy(strategy, sizes)
    table = partition(model.spec, sizes, strategy)  # SpecError naming the tensor, axis and sizes
    if "ep" in strategy:  # first: the loop below then places the expert stacks as the rule table says
        from .expert_parallel import shard_experts  # expert_parallel.py imports moe.py and jax's shard_map

        shard_experts(model.recurrent.block.ffn, mesh)
    elif model.spec.recurrent.ffn == "moe" and batch_axes(sizes, strategy):
        from .expert_parallel import shard_rows

        shard_rows(model.recurrent.block.ffn, mesh)  # route and multiply per row shard, no global sort
    placed = set()
    for p in manifest(model.spec):
        var = _variable(model, p)
        axes = table[p.path][::-1] if p.kind == "linear" else table[p.path]  # torch [out, in] vs nnx [in, out]
        var.set_value(jax.device_put(var.get_value(), _named(mesh, axes)))
        placed.add(id(var))
    replicated = NamedSharding(mesh, PartitionSpec())
    for _, var in nnx.to_flat_state(nnx.state(model)):  # none today: every variable is in the manifest
        if id(var) not in placed and isinstance(var, nnx.Variable):
            var.set_value(jax.device_put(var.get_value(), replicated))
    model.sharding = Sharding(mesh, strategy)
    return model


def shard_batch(model: nnx.Module, x: jax.Array | np.ndarray) -> jax.Array:
    """x (B, ...) placed with its batch axis split over the model's batch axes (spec.sharding.batch_axes).

    Raises:
        SpecError: the model is not sharded, or B does not split evenly over the batch shards.
    """
    sh = _require(model, "shard_batch")
    x = jax.numpy.asarray(x)
    if x.ndim < 1:
        raise SpecError(f"shard_batch: x must have a leading batch axis, got shape {tuple(x.shape)}")
    check_batch(_sizes(sh.mesh), sh.strategy, x.shape[0])
    return jax.device_put(x, _batch_sharding(sh, x.ndim))


class Sharding(NamedTuple):
    """How a model is sharded (model.sharding; None: one device)."""
    mesh: jax.sharding.Mesh
    strategy: Strategy  # e.g. ("fsdp", "tp")


def _sizes(mesh: jax.sharding.Mesh) -> dict[str, int]:
    """The mesh as spec.sharding's dict: axis -> size, in mesh order."""
    for name in mesh.axis_names:
        if name not in MESH_AXES:
            raise SpecError(f"mesh axis {name!r} is not a Mythos mesh axis; allowed: {', '.join(MESH_AXES)}")
    return {str(a): int(n) for a, n in mesh.shape.items()}


def _strategy(strategy: str | Sequence[str] | None, sizes: dict[str, int]) -> Strategy:
    """strategy as spec.sharding.parse_strategy's validated tuple (None: the mesh's default)."""
    if strategy is None:
        return parse_strategy(None, sizes)
    if isinstance(strategy, str):
        text = strategy
    elif isinstance(strategy, (tuple, list)) and all(isinstance(s, str) for s in strategy):
        text = "+".join(strategy)
    else:
        raise SpecError(f"shard: strategy must be a str like 'fsdp+tp' or a tuple of names, got {strategy!r}")
    if not text:
        raise SpecError("shard: strategy is empty; name one of dp, fsdp, tp, ep (or a '+' combination)")
    return parse_strategy(text, sizes)


def _require(model: nnx.Module, who: str) -> Sharding:
    sh = getattr(model, "sharding", None)
    if sh is None:
        raise SpecError(f"{who}: the model is not sharded; call mythos_jax.sharding.shard(model, mesh, strategy) first")
    return sh


def _describe(sh: Sharding) -> str:
    return f"mesh {format_mesh(_sizes(sh.mesh))}, strategy {'+'.join(sh.strategy)}"


def _batch_sharding(sh: Sharding, ndim: int, axis: int = 0, heads: int | None = None) -> NamedSharding:
    """NamedSharding of an array whose dimension `axis` is the batch (split over the batch axes) and, under
    tp, dimension `heads` the kv heads (split over model)."""
    spec: list[str | tuple[str, ...] | None] = [None] * ndim
    axes = batch_axes(_sizes(sh.mesh), sh.strategy)
    spec[axis] = axes if len(axes) > 1 else (axes[0] if axes else None)
    if heads is not None and "tp" in sh.strategy:
        spec[heads] = "model"
    return _named(sh.mesh, spec)


def _named(mesh: jax.sharding.Mesh, axes: Sequence[str | tuple[str, ...] | None]) -> NamedSharding:
    """NamedSharding(mesh, PartitionSpec(*axes)) without trailing Nones, the form jit gives its outputs (P(None,)
    and P() place alike, but a jitted step fed one and returning the other would compile twice)."""
    axes = list(axes)
    while axes and axes[-1] is None:
        axes.pop()
    return NamedSharding(mesh, PartitionSpec(*axes))


def _place_cache(model: nnx.Module, cache: KVCache,
                 put: Callable[[jax.Array, NamedSharding], jax.Array] = jax.device_put) -> KVCache:
    """A sharded model's cache: split on its batch axis over the batch axes, and the GQA keys and values
    (L, B, S, H_kv, K) on their kv heads over `model` under tp. put: jax.device_put (model.init_cache) or
    jax.lax.with_sharding_constraint (the forward's updated cache: each decode step returns the cache placed
    as it came, so its buffers are donated in place and one compiled step serves every token)."""
    sh = model.sharding
    check_batch(_sizes(sh.mesh), sh.strategy, cache.batch)
    gqa = model.spec.attention.type == "gqa"
    arrays = {name: put(a, _batch_sharding(sh, a.ndim, 1, 3 if gqa and name in ("k", "v") else None))
              for name, a in cache.arrays.items()}
    return KVCache(arrays, cache.n_loops, put(cache.pad, _batch_sharding(sh, 1)))


def _constrain(sh: Sharding | None, x: jax.Array) -> jax.Array:
    """Activations x (B, ...) of a sharded model kept split on their batch axis (None: one device, x as is).

    Without it GSPMD may follow a parameter's split instead: under fsdp the embedding's `embed` split
    spread to every activation (the batch replicated, each matmul's partial sums all-reduced), not the
    all-gathered weights that fsdp means.
    """
    return x if sh is None else jax.lax.with_sharding_constraint(x, _batch_sharding(sh, x.ndim))


def _param_shardings(sh: Sharding, spec: Spec, params: nnx.State) -> nnx.State:
    """The NamedSharding of every leaf of a parameter-shaped nnx.State (the params, Adam's moments), by path."""
    table = partition(spec, _sizes(sh.mesh), sh.strategy)
    flat = []
    for path, v in nnx.to_flat_state(params):
        name, kind = torch_path(tuple(str(p) for p in path))
        axes = table[name][::-1] if kind == "linear" else table[name]
        s = _named(sh.mesh, axes)
        flat.append((path, v.replace(s) if isinstance(v, nnx.Variable) else s))
    return nnx.from_flat_state(flat)


def _place_state(sh: Sharding, spec: Spec, params: nnx.State, opt_state: optax.OptState,
                 put: Callable[[jax.Array, NamedSharding], jax.Array]) -> tuple[nnx.State, optax.OptState]:
    """params and the optimizer state placed as shard() placed the parameters: every subtree shaped like
    params (Adam's moments) split like them, every other leaf (step counts) replicated. put: jax.device_put
    (eagerly) or jax.lax.with_sharding_constraint (inside jit, so the step's outputs keep its inputs' placement)."""
    shardings = _param_shardings(sh, spec, params)
    like = jax.tree.structure(params)
    replicated = NamedSharding(sh.mesh, PartitionSpec())

    def place(node: object) -> object:
        if jax.tree.structure(node) == like:
            return jax.tree.map(put, node, shardings)
        return jax.tree.map(lambda a: put(a, replicated), node)

    return jax.tree.map(put, params, shardings), jax.tree.map(place, opt_state,
                                                              is_leaf=lambda n: jax.tree.structure(n) == like)
