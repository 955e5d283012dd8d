"""JAX expert parallelism (mythos_jax/expert_parallel.py) on 8 fake CPU devices: the all-to-all dispatch gives
Experts' values (float64), the whole model with it gives the unsharded logits, loop counts and expert choices
(while loop and scan), gradients match and the expert gradients stay split on "expert", and the compiled
programs hold the all-to-alls and never gather an expert stack whole.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -m sharded tests/sharded/test_jax_ep.py
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import mythos_jax as mj
import spec as S
from mythos_jax.experts import dense_reference
from mythos_jax.expert_parallel import ragged_supported, shard_experts

E = 8  # the probe: tiny with 8 experts, 2 per device over expert=4
SPEC_OVERRIDES = {"moe.n_experts": E}
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


@pytest.fixture(scope="module")
def spec() -> S.Spec:
    mj.set_parity_precision()
    return S.load("tiny", overrides=SPEC_OVERRIDES)


def make(spec: S.Spec, devices: list, shape: tuple[int, ...], names: tuple[str, ...], **kw: object) -> mj.Mythos:
    """A float64 tiny model with its experts split over a mesh of `shape` (a fresh model each call)."""
    model = mj.build(spec, seed=0, dtype="float64")
    mesh = jax.sharding.Mesh(np.asarray(devices[:int(np.prod(shape))], dtype=object).reshape(shape), names)
    shard_experts(model.recurrent.block.ffn, mesh, **kw)
    return model


@pytest.fixture(scope="module")
def models(spec, jax_devices) -> tuple[mj.Mythos, mj.Mythos]:
    """(expert-parallel over data=2 x expert=4, unsharded reference): the same weights."""
    return make(spec, jax_devices, (2, 4), ("data", "expert")), mj.build(spec, seed=0, dtype="float64")


def rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def collectives(hlo: str) -> dict[str, list[str]]:
    """The collective ops of a compiled program's text: op -> its instruction lines."""
    out: dict[str, list[str]] = {op: [] for op in COLLECTIVES}
    for line in hlo.splitlines():
        for op in COLLECTIVES:
            if re.search(rf" {op}(-start)?\(", line):
                out[op].append(line.strip())
    return out


def full_stack_gathers(hlo: str, spec: S.Spec) -> list[str]:
    """all-gather instructions whose result holds a whole (E, D, hidden) or (E, hidden, D) expert stack."""
    D, H = spec.dim, spec.moe.expert_dim
    stacks = (f"[{E},{D},{H}]", f"[{E},{H},{D}]")
    return [line for line in collectives(hlo)["all-gather"] if any(s in line.split(" all-gather(")[0] for s in stacks)]


# --------------------------------------------------------------------------- the dispatch alone


def routing(pattern: str, N: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if pattern == "uniform":
        return rng.integers(0, E, (N, k))
    if pattern == "one":  # every (token, slot) row on the last expert: one device receives them all
        return np.full((N, k), E - 1)
    if pattern == "skewed":  # most rows on experts 1 and 6 (two devices), a few elsewhere
        p = np.full(E, 0.04 / (E - 2))
        p[[1, 6]] = 0.48
        return rng.choice(E, size=(N, k), p=p / p.sum())
    raise ValueError(pattern)


@pytest.fixture(scope="module")
def calls(models):
    """Jitted (dispatch, Experts, dense formula) of the models' experts: one compiled program per shape."""
    model, ref = models
    moe, ex = model.recurrent.block.ffn, ref.recurrent.block.ffn.experts
    return (jax.jit(lambda x, idx: moe.dispatch(moe.experts, x, idx)), jax.jit(lambda x, idx: ex(x, idx)),
            jax.jit(lambda x, idx: dense_reference(x, idx, ex.gate[...], ex.up[...], ex.down[...])))


@pytest.mark.parametrize("pattern,N", [("uniform", 48), ("one", 48), ("skewed", 48), ("uniform", 5)])
def test_dispatch_equals_experts(models, calls, pattern, N):
    """dispatch(experts, x, idx) == Experts(x, idx) in float64; N=5 rows over 8 shards pads to whole shards."""
    moe = models[0].recurrent.block.ffn
    rng = np.random.default_rng(len(pattern) + N)
    x = jnp.asarray(rng.standard_normal((N, models[0].spec.dim)))
    idx = jnp.asarray(routing(pattern, N, 2, rng), dtype=jnp.int32)
    got, want, plain = (f(x, idx) for f in calls)
    print(f"{pattern} N={N}: vs Experts {rel(got, want):.2e}, vs dense {rel(got, plain):.2e}")
    assert got.shape == (N, 2, models[0].spec.dim)
    assert rel(got, want) <= 1e-12 and rel(got, plain) <= 1e-12
    assert int(moe.dispatch.dropped(idx)) == 0  # the default capacity holds every row


def test_experts_split_on_the_expert_axis(models):
    model, _ = models
    for name in ("gate", "up", "down"):
        a = getattr(model.recurrent.block.ffn.experts, name)[...]
        assert a.sharding.spec[0] == "expert"
        assert {s.data.shape[0] for s in a.addressable_shards} == {E // 4}  # 2 experts per device


# --------------------------------------------------------------------------- the whole model


# rows 0, 2, 4, 6 halt by force at steps 1..4 (each data x expert shard holds one row), the others by threshold
FORCE_HALT = np.array([1, -1, 3, -1, 2, -1, 4, -1])


@pytest.mark.parametrize("early_exit", [True, False], ids=["while", "scan"])
def test_forward_equals_unsharded(models, early_exit):
    """Logits (float64, 1e-12 relative), loop counts, halting, steps run and expert ids equal the unsharded
    model's; the compiled program holds the three all-to-alls of the dispatch and no gathered expert stack."""
    model, ref = models
    B, T = 8, 8
    ids = np.random.default_rng(3).integers(0, model.spec.vocab_size, (B, T))
    halt = np.repeat(FORCE_HALT[:, None], T, axis=1)
    mesh = model.recurrent.block.ffn.dispatch.mesh
    ids_s = jax.device_put(jnp.asarray(ids), NamedSharding(mesh, PartitionSpec(("data", "expert"))))
    graphdef, state = nnx.split(model)

    def f(state: nnx.State, ids: jax.Array, halt: jax.Array) -> mj.ModelOutput:
        return nnx.merge(graphdef, state)(ids, 4, early_exit=early_exit, force_halt=halt)

    compiled = jax.jit(f).lower(state, ids_s, jnp.asarray(halt)).compile()
    got = compiled(state, ids_s, jnp.asarray(halt))
    want = mj.forward(ref, ids, 4, early_exit=early_exit, force_halt=halt)
    print(f"early_exit={early_exit}: logits {rel(got.logits, want.logits):.2e}, n_steps {int(got.n_steps)}, "
          f"loop counts per row {np.asarray(got.loop_counts)[:, 0].tolist()}")
    assert rel(got.logits, want.logits) <= 1e-12
    for name in ("loop_counts", "halted", "n_steps"):
        assert np.array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name))), name
    assert np.array_equal(np.asarray(got.traces.expert_idx), np.asarray(want.traces.expert_idx))
    assert np.array_equal(np.asarray(got.traces.running), np.asarray(want.traces.running))
    assert len(set(np.asarray(got.loop_counts)[:, 0].tolist())) > 1  # the shards really halt at different steps

    hlo = compiled.as_text()
    found = collectives(hlo)
    print({op: len(lines) for op, lines in found.items()})
    # one loop body: rows, expert ids, results, each over the 4 devices of a data group
    assert len(found["all-to-all"]) == 3
    assert all("replica_groups={{0,1,2,3},{4,5,6,7}}" in line for line in found["all-to-all"])
    # nothing gathered at all: no expert stack, and no router logits (routing runs per row shard)
    assert found["all-gather"] == [], found["all-gather"]


def test_grads_equal_unsharded_and_stay_split(models):
    """jax.grad of the training loss (scan form): every gradient equals the unsharded one, the expert stacks'
    come out split on "expert" (2 experts per device); the backward adds two all-to-alls and sums the expert
    gradients over the data axis only, on their local (E/4, ...) blocks."""
    model, ref = models
    B, T = 8, 8
    rng = np.random.default_rng(4)
    ids = rng.integers(0, model.spec.vocab_size, (B, T))
    targets = jnp.asarray(rng.integers(0, model.spec.vocab_size, (B, T)))
    mask = jnp.asarray(rng.random((B, T)) < 0.8)
    mesh = model.recurrent.block.ffn.dispatch.mesh
    ids_s = jax.device_put(jnp.asarray(ids), NamedSharding(mesh, PartitionSpec(("data", "expert"))))

    def loss(m: mj.Mythos, ids: jax.Array) -> jax.Array:
        return mj.total_loss(m.spec, m(ids, 4, early_exit=False), targets, mask)[0]

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grad(params: nnx.State, ids: jax.Array) -> nnx.State:
        return jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), ids))(params)

    compiled = jax.jit(grad).lower(params, ids_s).compile()
    got = dict(nnx.to_flat_state(compiled(params, ids_s)))
    want = dict(nnx.to_flat_state(nnx.jit(nnx.grad(loss))(ref, jnp.asarray(ids))))
    assert got.keys() == want.keys()
    worst = max((rel(got[p].get_value(), want[p].get_value()), p) for p in want)
    print(f"worst gradient {worst[0]:.2e} at {'.'.join(map(str, worst[1]))}")
    assert worst[0] <= 1e-12
    for name in ("gate", "up", "down"):
        g = got[("recurrent", "block", "ffn", "experts", name)].get_value()
        assert g.sharding.spec[0] == "expert", name
        assert {s.data.shape[0] for s in g.addressable_shards} == {E // 4}, name

    hlo = compiled.as_text()
    found = collectives(hlo)
    print({op: len(lines) for op, lines in found.items()})
    assert len(found["all-to-all"]) == 5  # forward 3 (rows, ids, results) + backward 2 (result and row cotangents)
    assert full_stack_gathers(hlo, model.spec) == []
    D, H = model.spec.dim, model.spec.moe.expert_dim
    local = f"f64[{E // 4},{D},{H}]"
    stack_sums = [line for line in found["all-reduce"] if local in line.split(" all-reduce(")[0]]
    assert stack_sums and all("replica_groups={{0,4},{1,5},{2,6},{3,7}}" in line for line in stack_sums)


def test_decode_matches_unsharded(models):
    """model.generate through the KV cache: a decode step has B rows (4 < 8 shards: padded), same tokens."""
    model, ref = models
    ids = np.random.default_rng(5).integers(0, model.spec.vocab_size, (4, 6))
    got, want = model.generate(ids, 3), ref.generate(ids, 3)
    assert np.array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("N", [20, 2])
def test_tensor_and_expert_axes(spec, jax_devices, N):
    """data=2 x model=2 x expert=2: rows replicated over model, experts split over expert; the dispatch's
    values and gradients (rows and expert stacks) equal the dense formula's. N=2: one row per shard, the
    4 received rows take the gathered path of experts.py (SMALL_ROWS) with an empty entry among them."""
    model = make(spec, jax_devices, (2, 2, 2), ("data", "model", "expert"))
    moe = model.recurrent.block.ffn
    rng = np.random.default_rng(6)
    D = spec.dim
    x = jnp.asarray(rng.standard_normal((N, D)))
    idx = jnp.asarray(routing("skewed", N, 2, rng), dtype=jnp.int32)
    c = jnp.asarray(rng.standard_normal((N, 2, D)))
    stacks = (moe.experts.gate[...], moe.experts.up[...], moe.experts.down[...])

    @dataclasses.dataclass
    class Stacks:  # what the dispatch reads of an Experts module
        gate: jax.Array
        up: jax.Array
        down: jax.Array

    def ep(x: jax.Array, *w: jax.Array) -> jax.Array:
        return jnp.sum(moe.dispatch(Stacks(*w), x, idx) * c)

    def dense(x: jax.Array, *w: jax.Array) -> jax.Array:
        return jnp.sum(dense_reference(x, idx, *w) * c)

    got = jax.jit(jax.value_and_grad(ep, argnums=(0, 1, 2, 3)))(x, *stacks)
    want = jax.jit(jax.value_and_grad(dense, argnums=(0, 1, 2, 3)))(x, *stacks)
    assert rel(got[0], want[0]) <= 1e-12
    for name, a, b in zip(("x", "gate", "up", "down"), got[1], want[1]):
        assert rel(a, b) <= 1e-12, name
    assert got[1][1].sharding.spec[0] == "expert"


# --------------------------------------------------------------------------- capacity


def test_capacity_factor_drops_and_counts(spec, jax_devices):
    """capacity_factor=0.5: C = ceil(0.5 * n * k / 4) per device pair; the rows past it (counted here from
    the routing alone) come out zero, dispatch.kept/dropped name exactly them, the others are exact."""
    model = make(spec, jax_devices, (2, 4), ("data", "expert"), capacity_factor=0.5)
    moe = model.recurrent.block.ffn
    N, k, D = 64, 2, spec.dim
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((N, D)))
    idx = routing("skewed", N, k, rng)
    n = N // 8  # rows per data x expert shard
    C = int(np.ceil(0.5 * n * k / 4))
    assert moe.dispatch.capacity(n, k) == C
    # independent count: shard s sends its (token, slot) rows in order; the C-th and later to a device drop
    kept = np.zeros((N, k), dtype=bool)
    for s in range(8):
        sent = np.zeros(4, dtype=int)
        for m in range(n * k):
            row, slot = s * n + m // k, m % k
            dest = idx[row, slot] // (E // 4)
            kept[row, slot] = sent[dest] < C
            sent[dest] += 1
    y = jax.jit(lambda x, idx: moe.dispatch(moe.experts, x, idx))(x, jnp.asarray(idx, dtype=jnp.int32))
    ex = moe.experts
    want = np.asarray(dense_reference(x, jnp.asarray(idx), ex.gate[...], ex.up[...], ex.down[...]))
    print(f"C={C}: dropped {int((~kept).sum())} of {N * k} rows")
    assert (~kept).sum() > 0
    assert np.array_equal(np.asarray(moe.dispatch.kept(jnp.asarray(idx))), kept)
    assert int(moe.dispatch.dropped(jnp.asarray(idx))) == int((~kept).sum())
    assert np.all(np.asarray(y)[~kept] == 0)
    assert rel(np.asarray(y)[kept], want[kept]) <= 1e-12


# --------------------------------------------------------------------------- backends and bad input


def test_ragged_all_to_all_is_not_on_xla_cpu(jax_devices):
    """The dropless ragged path needs ragged_all_to_all, which XLA:CPU does not compile: the probe says so."""
    mesh = jax.sharding.Mesh(np.asarray(jax_devices[:4], dtype=object), ("expert",))
    assert ragged_supported(mesh) is False


def test_bad_input_is_named(spec, jax_devices):
    model = mj.build(spec, seed=0, dtype="float64")
    moe = model.recurrent.block.ffn
    grid = np.asarray(jax_devices[:8], dtype=object)
    with pytest.raises(ValueError, match="no 'expert' axis"):
        shard_experts(moe, jax.sharding.Mesh(grid, ("data",)))
    with pytest.raises(ValueError, match="n_experts=8 is not divisible by mesh axis expert=3"):
        shard_experts(moe, jax.sharding.Mesh(grid[:3], ("expert",)))
    with pytest.raises(ValueError, match="capacity_factor=0 must be a number > 0"):
        shard_experts(moe, jax.sharding.Mesh(grid[:4], ("expert",)), capacity_factor=0)
    with pytest.raises(ValueError, match="not AxisType.Auto"):
        shard_experts(moe, jax.make_mesh((4,), ("expert",), devices=jax_devices[:4]))
    with pytest.raises(ValueError, match="needs the MoE FFN"):
        shard_experts(model.recurrent.block.attn, jax.sharding.Mesh(grid[:4], ("expert",)))
    assert moe.dispatch is None  # nothing was changed by the refused calls


def test_a_data_parallel_moe_forward_holds_no_collective(spec, jax_devices):
    """dp without ep: every MoE call routes and multiplies its own rows (shard_rows), so the compiled scan
    forward holds no collective at all (GSPMD alone gathered ids and router logits at every loop step)."""
    model = mj.build(spec, seed=0, dtype="float64")
    ref = mj.build(spec, seed=0, dtype="float64")
    mj.shard(model, mj.make_mesh({"data": 8}, jax_devices), "dp")
    assert type(model.recurrent.block.ffn.dispatch).__name__ == "_PerShard"
    ids = np.random.default_rng(5).integers(0, spec.vocab_size, (8, 6))
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, 4, early_exit=False).logits)
    compiled = f.lower(state, mj.shard_batch(model, ids)).compile()
    assert rel(compiled(state, mj.shard_batch(model, ids)), mj.forward(ref, ids, 4, early_exit=False).logits) <= 1e-12
    found = collectives(compiled.as_text())
    assert all(not lines for lines in found.values()), {op: len(lines) for op, lines in found.items()}
