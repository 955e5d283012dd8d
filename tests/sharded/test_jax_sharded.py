"""The JAX twin on a jax.sharding.Mesh (mythos_jax/sharding.py, docs/scaling.md): for every strategy the
sharded model computes what the unsharded one computes, run by the same compiled entry points.

- forward (float64): logits within 1e-12 relative, loop counts, `halted`, n_steps, `running` and the
  routed experts (slot order too) identical; the while loop (ACT early exit) and the scan;
- forward (float32): the project's float32 bounds (parity.derive_tolerances from the unsharded model's
  measured float32 noise) with parity's near-tie rule for decisions;
- inputs whose shards diverge: rows halting at different steps (each shard's own last step differs, the
  loop runs to the global one) and, in the scan, skewed routing (forced: most rows to one device's experts);
- decoding (model.generate and a cached step; DECODED): the same tokens, the cache split over the mesh,
  one compiled step for every token;
- three training steps (TRAINED): losses (ponder and halting-entropy terms on: global denominators),
  weights, optimizer state and router bias equal the unsharded run's, every placement kept, no recompile;
- the compiled programs' collectives: none of a parameter under dp, parameter all-gathers under fsdp,
  activation all-reduces in the loop under tp, all-to-alls and no whole expert stack under ep, the global
  "any position running" in the while loop's condition; against spec.sharding.collectives_per_step.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -m sharded tests/sharded/test_jax_sharded.py -s

Compiling dominates the time (about 2 minutes on 2 busy cores, 24 programs): the tiny preset (8 experts) at
B=8, T=6, every unsharded reference run once per module, and decoding and training on the strategies that
cover every rule (DECODED, TRAINED: a training step compiles for ~10 s).
"""

from __future__ import annotations

import collections
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mythos_jax as mj
import spec as S
from mythos_jax import sharding as JS
from mythos_jax import train as JT
from mythos_jax.generate import TRACE_COUNTS
from mythos_jax.weights import _variable
from parity import Outputs, derive_tolerances
from parity.probe import calibrate_halting, perturbed_arrays
from spec import sharding as SS
from spec.schema import SpecError
from spec.training import TrainConfig

SPEC = S.load("tiny", overrides={"moe.n_experts": 8, "loss.ponder": 0.01, "loss.halting_entropy": 0.01})
B, T, N, NEW = 8, 6, 4, 4  # batch, tokens, loop steps, decoded tokens
REL = 1e-12  # float64: sharded vs unsharded, relative to the output's magnitude
# name -> (mesh, strategy); "tp" runs with data parallelism beside it, as a real tp run would
STRATEGIES = {
    "dp": ({"data": 8}, "dp"),
    "fsdp": ({"data": 8}, "fsdp"),
    "tp": ({"data": 4, "model": 2}, "dp+tp"),
    "fsdp+tp": ({"data": 4, "model": 2}, "fsdp+tp"),
    "ep": ({"expert": 4}, "ep"),
    "dp+ep": ({"data": 2, "expert": 4}, "dp+ep"),
}
# a training step compiles for ~10 s: these two cover every rule (dp's gradient all-reduce is dp+ep's)
TRAINED = ("fsdp+tp", "dp+ep")
DECODED = ("dp", "fsdp+tp", "dp+ep")  # batch-split caches, kv heads split under tp
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


# --------------------------------------------------------------------------- inputs, weights, models


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(7).integers(0, SPEC.vocab_size, size=(B, T))


@functools.lru_cache(maxsize=None)
def _reference(dtype: str) -> mj.Mythos:
    """The unsharded model (weights set by the `weights` fixture)."""
    return mj.build(SPEC, seed=0, dtype=dtype)


@pytest.fixture(scope="module")
def weights(jax_devices, ids) -> dict[str, np.ndarray]:
    """parity's perturbed weights with the halting head calibrated on `ids` (loop counts spread over 1..N), its
    bias then moved so that the batch shards of every strategy end at different steps and no position runs
    all N (the while loop exits early); test_the_shards_halt_at_different_steps asserts both."""
    mj.set_parity_precision()
    ref = _reference("float64")
    arrays = perturbed_arrays(SPEC, 0)
    mj.load_arrays(ref, arrays)
    arrays = calibrate_halting(SPEC, arrays, _halt_logits(ref, ids))
    mj.load_arrays(ref, arrays)
    z = _halt_logits(ref, ids)  # the bias shifts these alone: the state does not depend on the halting head
    best, shift = (-1, 0.0), 0.0
    for d in np.linspace(-4.0, 4.0, 81):
        last = _row_last_steps(z + d)
        if last.max() >= N or last.min() < 2:
            continue
        score = (min(len(set(_shard_max(last, name))) for name in STRATEGIES), -abs(d))
        best, shift = max((best, shift), (score, float(d)))
    arrays["recurrent.act.halt.bias"] = arrays["recurrent.act.halt.bias"] + shift
    for dtype in ("float64", "float32"):
        mj.load_arrays(_reference(dtype), arrays)
    return arrays


def _halt_logits(model: mj.Mythos, ids: np.ndarray) -> np.ndarray:
    """(N, B, T) float64 halting logits of every step (the scan runs them all; force_experts of -1 forces
    nothing, and the scan with skewed routing reuses the compiled program)."""
    free = np.full((N, B, T, SPEC.moe.top_k), -1)
    p = np.asarray(mj.forward(model, ids, N, early_exit=False, force_experts=free).traces.halt_p, dtype=np.float64)
    p = np.clip(p, 1e-300, 1 - 1e-16)
    return np.log(p) - np.log1p(-p)


def _row_last_steps(z: np.ndarray) -> np.ndarray:
    """(B,) the step (1-based) at which each row's last position halts, for halting logits z (N, B, T)."""
    c = np.cumsum(1.0 / (1.0 + np.exp(-z)), axis=0)
    counts = np.where((c >= SPEC.halting.threshold).any(0), (c >= SPEC.halting.threshold).argmax(0) + 1, N)
    return counts.max(-1)


def _shard_max(per_row: np.ndarray, name: str) -> list[int]:
    """The largest value of each batch shard of strategy `name` (rows split evenly, in order)."""
    mesh, strategy = STRATEGIES[name]
    n = math.prod(mesh[a] for a in SS.batch_axes(mesh, SS.parse_strategy(strategy, mesh)))
    return [int(x) for x in per_row.reshape(n, -1).max(-1)]


@functools.lru_cache(maxsize=None)
def _sharded(name: str, dtype: str) -> mj.Mythos:
    """A sharded copy of the reference (built once per strategy and dtype; training uses fresh ones)."""
    return _shard(name, dtype)


def _shard(name: str, dtype: str) -> mj.Mythos:
    mesh, strategy = STRATEGIES[name]
    model = mj.build(SPEC, seed=0, dtype=dtype, weights=mj.dump_arrays(_reference(dtype)))
    return JS.shard(model, JS.make_mesh(mesh, jax.devices("cpu")), strategy)


@pytest.fixture(scope="module")
def free64(weights, ids) -> Outputs:
    """The unsharded float64 while loop (ACT early exit)."""
    return outputs(mj.forward(_reference("float64"), ids, N))


def outputs(out: mj.ModelOutput) -> Outputs:
    """A ModelOutput as parity.Outputs (NumPy; floats as float64)."""
    tr = out.traces
    f = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
    traces = {"state_norm": f(tr.state_norm), "halt_p": f(tr.halt_p), "cum_p": f(tr.cum_p),
              "running": np.asarray(tr.running), "expert_idx": np.asarray(tr.expert_idx).astype(np.int64),
              "router_margin": f(tr.router_margin)}
    return Outputs(f(out.logits), np.asarray(out.loop_counts).astype(np.int64), np.asarray(out.halted),
                   int(out.n_steps), traces)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |a| (over finite values; equal infinities are equal)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # equal infinities are equal
        d = np.abs(np.where(a == b, 0.0, a - b))
    scale = np.abs(a[np.isfinite(a)]).max(initial=0.0)
    return float(d.max(initial=0.0)) / (scale if scale > 0 else 1.0)


def assert_same(ref: Outputs, got: Outputs, what: str) -> None:
    """float64: every decision identical, every continuous output within REL."""
    assert got.n_steps == ref.n_steps, f"{what}: n_steps {got.n_steps} vs {ref.n_steps}"
    for name, a, b in (("loop_counts", ref.loop_counts, got.loop_counts), ("halted", ref.halted, got.halted),
                       ("running", ref.traces["running"], got.traces["running"]),
                       ("expert_idx", ref.traces["expert_idx"], got.traces["expert_idx"])):
        bad = np.argwhere(a != b)
        assert not bad.size, f"{what}: {name} differs at {len(bad)} place(s), first {tuple(bad[0])}"
    errs = {"logits": rel(ref.logits, got.logits)}
    errs.update({f"trace.{k}": rel(ref.traces[k], got.traces[k]) for k in ("state_norm", "halt_p", "cum_p",
                                                                           "router_margin")})
    print(f"{what}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    worst = max(errs, key=errs.get)
    assert errs[worst] <= REL, f"{what}: {worst} relative error {errs[worst]:.2e} > {REL:.0e}"


def placed(model: mj.Mythos) -> dict[str, jax.sharding.Sharding]:
    """Every manifest tensor's sharding, by manifest path."""
    return {p.path: _variable(model, p).get_value().sharding for p in S.manifest(SPEC)}


# --------------------------------------------------------------------------- compiled programs

_HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


class Collective(collections.namedtuple("Collective", "op shapes")):
    """One collective instruction: op (COLLECTIVES) and its result arrays ((dtype, shape), ...)."""

    @property
    def nbytes(self) -> int:
        size = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "bf16": 2}
        return sum(size.get(d, 4) * math.prod(s) for d, s in self.shapes)


class Program:
    """A compiled (SPMD-partitioned) HLO module: its computations, the recurrent loop and its collectives."""

    def __init__(self, text: str):
        self.comps: dict[str, list[tuple[str, str, str, list[str]]]] = {}  # name -> (shape, op, rest, called)
        self.entry = ""
        cur = None
        for line in text.splitlines():
            m = _HEAD.match(line)
            if m:
                cur = m.group(2)
                self.comps[cur] = []
                self.entry = cur if m.group(1) else self.entry
            elif line.startswith("}"):
                cur = None
            elif cur is not None and (i := _INSTR.match(line)):
                rest = i.group(4)
                called = _CALLED.findall(rest) + [c.strip().lstrip("%") for b in _BRANCHES.findall(rest)
                                                  for c in b.split(",")]
                self.comps[cur].append((i.group(2), i.group(3), rest, called))

    def reach(self, root: str) -> set[str]:
        """root and every computation it calls, transitively."""
        seen, todo = set(), [root]
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo += [x for ins in self.comps[c] for x in ins[3]]
        return seen

    def collectives(self, comps: set[str] | None = None) -> list[Collective]:
        out = []
        for c in self.reach(self.entry) if comps is None else comps:
            for shape, op, _, _ in self.comps[c]:
                op = op.removesuffix("-start")
                if op in COLLECTIVES:
                    out.append(Collective(op, tuple((d, tuple(int(x) for x in s.split(",") if x))
                                                    for d, s in _ARRAY.findall(shape))))
        return out

    def loops(self) -> list[tuple[set[str], set[str]]]:
        """(body, condition) computations of each top-level while loop (nested loops are part of a body)."""
        out, seen, todo = [], set(), [self.entry]
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            for _, op, rest, called in self.comps[c]:
                if op == "while":
                    body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
                    cond = re.search(r"condition=%?([\w.\-]+)", rest).group(1)
                    out.append((self.reach(body), self.reach(cond)))
                else:
                    todo += called
        return out


def count(cs: list[Collective]) -> dict[str, int]:
    return dict(sorted(collections.Counter(c.op for c in cs).items()))


def param_shapes(local: dict[str, tuple[str | None, ...]] | None = None, mesh: dict[str, int] | None = None,
                 dtype: str = "f64") -> set[tuple[str, tuple[int, ...]]]:
    """The (dtype, nnx-layout shape) of every manifest tensor: whole, or split by `local` (partition) over mesh."""
    out = set()
    for p in S.manifest(SPEC):
        if local is not None and p.path not in local:
            continue
        shape = p.shape[::-1] if p.kind == "linear" else p.shape
        axes = (local[p.path][::-1] if p.kind == "linear" else local[p.path]) if local else (None,) * len(shape)
        out.add((dtype, tuple(n // (mesh[a] if a else 1) for n, a in zip(shape, axes))))
    return out


def forward_program(model: mj.Mythos, x: jax.Array, early_exit: bool = True) -> Program:
    """The program mythos_jax.forward(model, x, N, early_exit=...) compiled (the same arguments: a cache hit)."""
    from mythos_jax.model import _forward
    return Program(_forward.lower(model, model._check_ids(x), N, early_exit, None, None, False, 0, None)
                   .compile().as_text())


def batch_split(name: str) -> tuple[str | tuple[str, ...] | None, int]:
    """The PartitionSpec entry of the batch axis under strategy `name`, and the batch shards."""
    mesh, strategy = STRATEGIES[name]
    axes = SS.batch_axes(mesh, SS.parse_strategy(strategy, mesh))
    return (axes[0] if len(axes) == 1 else axes), math.prod(mesh[a] for a in axes)


# --------------------------------------------------------------------------- placement and bad input


def test_shard_places_every_tensor_by_the_rule_table(weights):
    for name, (mesh, strategy) in STRATEGIES.items():
        model = _sharded(name, "float64")
        assert model.sharding.strategy == SS.parse_strategy(strategy, mesh)
        table = SS.partition(SPEC, mesh, model.sharding.strategy)
        for p in S.manifest(SPEC):
            axes = table[p.path][::-1] if p.kind == "linear" else table[p.path]
            got = _variable(model, p).get_value().sharding
            want = jax.sharding.NamedSharding(model.sharding.mesh, jax.sharding.PartitionSpec(*axes))
            assert got.is_equivalent_to(want, len(p.shape)), (name, p.path, got.spec, axes)
        dispatch = type(model.recurrent.block.ffn.dispatch).__name__
        if "ep" in model.sharding.strategy:  # tokens travel to their experts
            assert dispatch == "_AllToAll"
            assert model.recurrent.block.ffn.experts.gate.get_value().sharding.spec[0] == "expert"
        elif SS.batch_axes(SS.parse_mesh(",".join(f"{a}={n}" for a, n in model.sharding.mesh.shape.items())),
                           model.sharding.strategy):
            assert dispatch == "_PerShard"  # a split batch routes and multiplies per row shard
        else:
            assert dispatch == "NoneType"
    assert _reference("float64").sharding is None


def test_bad_input_is_named(jax_devices):
    mesh = JS.make_mesh({"data": 2, "model": 4}, jax_devices)
    with pytest.raises(SpecError, match=r"attn.wk.weight: dimension 0 \(kv_heads, 2 kv heads\).*model=4"):
        JS.shard(mj.build(SPEC, 0, "float64"), mesh, "dp+tp")  # 2 kv heads do not split 4 ways
    with pytest.raises(SpecError, match="mesh axis model=4 is used by no strategy"):
        JS.shard(mj.build(SPEC, 0, "float64"), mesh, "dp")
    with pytest.raises(SpecError, match="unknown strategy 'zero'"):
        JS.shard(mj.build(SPEC, 0, "float64"), mesh, "zero")
    with pytest.raises(SpecError, match="needs 16 devices, 8 available"):
        JS.make_mesh({"data": 16}, jax_devices)
    with pytest.raises(SpecError, match="unknown mesh axis 'pipe'"):
        JS.make_mesh({"pipe": 2}, jax_devices)
    with pytest.raises(SpecError, match="not a Mythos mesh axis"):
        JS.shard(mj.build(SPEC, 0, "float64"), jax.sharding.Mesh(np.asarray(jax_devices[:2]), ("batch",)), "dp")
    with pytest.raises(SpecError, match="the model is not sharded"):
        JS.shard_batch(mj.build(SPEC, 0, "float64"), np.zeros((8, 4), np.int32))
    model = JS.shard(mj.build(SPEC, 0, "float64"), JS.make_mesh({"data": 8}, jax_devices), "dp")
    with pytest.raises(SpecError, match="batch 6 is not divisible by the 8 batch shards"):
        JS.shard_batch(model, np.zeros((6, 4), np.int32))
    with pytest.raises(SpecError, match="batch 6 is not divisible"):
        model.init_cache(6, 16, N)
    with pytest.raises(SpecError, match="already sharded"):
        JS.shard(model, JS.make_mesh({"data": 8}, jax_devices), "fsdp")


# --------------------------------------------------------------------------- forward, float64


def test_the_shards_halt_at_different_steps(free64):
    """The input makes the shards diverge: each strategy's batch shards end their loop at different steps,
    and the loop exits before N (so the while loop's global "any position running" decides its length)."""
    last = free64.loop_counts.max(-1)
    assert free64.n_steps == last.max() < N, (free64.n_steps, last)
    for name in STRATEGIES:
        per_shard = _shard_max(last, name)
        assert len(set(per_shard)) >= 2, f"{name}: every batch shard ends at the same step: {per_shard}"
    print("last step of each row:", last.tolist())


@pytest.mark.parametrize("name", STRATEGIES)
def test_forward_float64_while_loop(free64, ids, name):
    model = _sharded(name, "float64")
    x = JS.shard_batch(model, ids)
    out = mj.forward(model, x, N)
    assert_same(free64, outputs(out), f"{name} while loop")
    split, _ = batch_split(name)
    mesh = model.sharding.mesh
    assert out.logits.sharding.device_set == set(mesh.devices.flat)
    assert out.logits.sharding.spec[0] == split, out.logits.sharding  # the activations stayed split on B
    # every shard ran the global number of steps: n_steps is one value, the last row's halting step
    per_shard = _shard_max(free64.loop_counts.max(-1), name)
    assert int(out.n_steps) == max(per_shard) and min(per_shard) < max(per_shard)
    check_forward_collectives(name, forward_program(model, x), model)


def skewed_experts(seed: int = 3) -> np.ndarray:
    """force_experts (N, B, T, k): rows 0..5 send their two slots to experts 0 and 1 (one device's under
    expert=4) at 7 of 8 (step, position)s, to random experts otherwise; rows 6 and 7 are not forced (-1)."""
    rng = np.random.default_rng(seed)
    E, k = SPEC.moe.n_experts, SPEC.moe.top_k
    fx = np.stack([rng.permutation(E)[:k] for _ in range(N * B * T)]).reshape(N, B, T, k)
    fx[rng.random((N, B, T)) < 7 / 8] = np.arange(k)
    fx[:, 6:] = -1
    return fx


@pytest.fixture(scope="module")
def scan64(weights, ids) -> Outputs:
    """The unsharded float64 scan with skewed routing (skewed_experts)."""
    out = outputs(mj.forward(_reference("float64"), ids, N, early_exit=False, force_experts=skewed_experts()))
    idx, fx = out.traces["expert_idx"], skewed_experts()
    assert (idx[:, :6] == fx[:, :6]).all() and (idx[:, 6:] >= 0).all()
    load = np.bincount(idx[out.traces["running"]].reshape(-1), minlength=SPEC.moe.n_experts)
    assert load[:2].sum() > 0.6 * load.sum(), f"routing is not skewed: load {load.tolist()}"
    return out


@pytest.mark.parametrize("name", STRATEGIES)
def test_forward_float64_scan_with_skewed_routing(scan64, ids, name):
    """The scan (every step runs: training's loop), most rows' tokens forced to experts 0 and 1 (under ep
    one device's experts take most rows of every device), two rows routed freely."""
    model = _sharded(name, "float64")
    out = mj.forward(model, JS.shard_batch(model, ids), N, early_exit=False, force_experts=skewed_experts())
    assert_same(scan64, outputs(out), f"{name} scan, skewed routing")


# --------------------------------------------------------------------------- forward, float32


def _noise(o: Outputs, anchor: Outputs) -> dict[str, float]:
    """parity's measured rounding noise of o against the float64 anchor (same decisions), per output."""
    n = o.n_steps
    out = {"logits": float(np.abs(o.logits - anchor.logits).max()),
           "trace.state_norm": rel(anchor.traces["state_norm"][:n], o.traces["state_norm"][:n])}
    for k in ("halt_p", "cum_p", "router_margin"):
        out[f"trace.{k}"] = float(np.abs(o.traces[k][:n] - anchor.traces[k][:n]).max())
    return out


def same_decisions(a: Outputs, b: Outputs) -> bool:
    return (a.n_steps == b.n_steps and (a.loop_counts == b.loop_counts).all() and (a.halted == b.halted).all()
            and (np.sort(a.traces["expert_idx"], -1) == np.sort(b.traces["expert_idx"], -1)).all())


@pytest.fixture(scope="module")
def free32(free64, ids):
    """The unsharded float32 while loop and its bounds (parity.derive_tolerances from its noise against
    the float64 run, which must make the same decisions here: else the anchor would need a replay)."""
    ref = outputs(mj.forward(_reference("float32"), ids, N))
    assert same_decisions(ref, free64), "the float32 reference decides otherwise than float64: pick other ids"
    return ref, derive_tolerances(SPEC, "float32", ref, _noise(ref, free64), "float64")


@pytest.mark.parametrize("name", STRATEGIES)
def test_forward_float32_while_loop(free32, ids, name):
    """Within the float32 bounds; a decision may differ only at a near tie (parity's rule: the reference's
    margin below the derived bound), and then both runs replay with the reference's decisions forced."""
    ref, tol = free32
    model = _sharded(name, "float32")
    x = JS.shard_batch(model, ids)
    got = outputs(mj.forward(model, x, N))
    n = min(ref.n_steps, got.n_steps)
    thr = float(np.float32(SPEC.halting.threshold))
    route = (np.sort(ref.traces["expert_idx"][:n], -1) != np.sort(got.traces["expert_idx"][:n], -1)).any(-1)
    halt = (ref.loop_counts != got.loop_counts) | (ref.halted != got.halted)
    far_route = route & (ref.traces["router_margin"][:n] >= tol.near_tie_routing)
    margin = np.where(ref.traces["running"][:n], np.abs(ref.traces["cum_p"][:n] - thr), np.inf).min(0)
    far_halt = halt & (margin >= tol.near_tie_halting)
    assert not far_route.any(), f"{name}: {int(far_route.sum())} expert choice(s) differ beyond a near tie"
    assert not far_halt.any(), f"{name}: {int(far_halt.sum())} loop count(s) differ beyond a near tie"
    if route.any() or halt.any():  # near ties: replay both with the reference's decisions forced
        fh, fx = np.where(ref.halted, ref.loop_counts, 0), ref.traces["expert_idx"]
        ref = outputs(mj.forward(_reference("float32"), ids, N, force_halt=fh, force_experts=fx))
        got = outputs(mj.forward(model, x, N, force_halt=JS.shard_batch(model, fh), force_experts=fx))
        assert same_decisions(ref, got), f"{name}: decisions differ under the forced near ties"
    n = ref.n_steps
    errs = {"logits": (float(np.abs(ref.logits - got.logits).max()), tol.logits),
            "state_norm": (rel(ref.traces["state_norm"][:n], got.traces["state_norm"][:n]), tol.state_norm)}
    for k in ("halt_p", "cum_p", "router_margin"):
        errs[k] = (float(np.abs(ref.traces[k][:n] - got.traces[k][:n]).max()), getattr(tol, k))
    print(f"{name} float32: " + ", ".join(f"{k} {e:.1e} (bound {b:.1e})" for k, (e, b) in errs.items()))
    for k, (e, b) in errs.items():
        assert e <= b, f"{name} float32: {k} error {e:.2e} above the bound {b:.2e} ({tol.how})"


# --------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def decoded64(weights, ids) -> tuple[np.ndarray, Outputs]:
    """The unsharded reference: generate's tokens, and the outputs of the cached step after the prefill."""
    ref = _reference("float64")
    seq = np.asarray(ref.generate(ids, NEW, N))
    out = mj.forward(ref, ids, N, cache=ref.init_cache(B, 16, N))
    step = mj.forward(ref, jnp.asarray(seq[:, T:T + 1], dtype=jnp.int32), N, cache=out.cache, start_pos=T)
    return seq, outputs(step)


@pytest.mark.parametrize("name", DECODED)
def test_decode(decoded64, ids, name):
    seq, step64 = decoded64
    model = _sharded(name, "float64")
    x = JS.shard_batch(model, ids)
    before, loops = TRACE_COUNTS["cached_forward"], TRACE_COUNTS["greedy_steps"]
    got = np.asarray(model.generate(x, NEW, N))
    assert (got == seq).all(), f"{name}: generated {got[:, T:].tolist()} vs {seq[:, T:].tolist()}"
    # generate's capacity is 16 here: the prefill, then one on-device loop for every token (greedy, no callback)
    assert (TRACE_COUNTS["cached_forward"] - before, TRACE_COUNTS["greedy_steps"] - loops) == (1, 1)
    cache = model.init_cache(B, 16, N)
    split, _ = batch_split(name)
    tp = "tp" in model.sharding.strategy
    want = {n: (None, split, None, "model" if tp and n in ("k", "v") else None, None)[:a.ndim]
            for n, a in cache.arrays.items()}
    assert {n: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec)) for n, a in cache.arrays.items()} \
        == want
    out = mj.forward(model, x, N, cache=cache)
    step = mj.forward(model, jnp.asarray(seq[:, T:T + 1], dtype=jnp.int32), N, cache=out.cache, start_pos=T)
    assert TRACE_COUNTS["cached_forward"] - before == 2  # the prefill's program again, and the decode step's
    for n, a in step.cache.arrays.items():  # the updated cache keeps the placement (donated in place)
        assert a.sharding.is_equivalent_to(cache.arrays[n].sharding, a.ndim), n
    assert_same(step64, outputs(step), f"{name} decode step")


# --------------------------------------------------------------------------- training

CFG = TrainConfig(steps=3, batch_size=B, lr=3e-3, warmup_steps=1, weight_decay=0.1, grad_clip=1.0, seed=0,
                  dtype="float64")
TRAIN_LOOPS = 3


@pytest.fixture(scope="module")
def batches() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Three (ids, targets, mask) batches; masks with holes of different sizes per row (global denominators)."""
    rng = np.random.default_rng(11)
    V = SPEC.vocab_size
    keep = np.linspace(0.3, 1.0, B)[:, None]  # row b keeps about keep[b] of its positions
    return [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T)), rng.random((B, T)) < keep) for _ in range(3)]


@pytest.fixture(scope="module")
def trained64(weights, batches):
    model = mj.build(SPEC, seed=0, dtype="float64", weights=weights)
    tr = JT.Trainer(model, CFG)
    return tr, [JT.train_step(tr, *b, TRAIN_LOOPS) for b in batches]


@pytest.mark.parametrize("name", TRAINED)
def test_three_training_steps(trained64, batches, name):
    ref, ref_log = trained64
    model = _shard(name, "float64")
    before = placed(model)
    tr = JT.Trainer(model, CFG)
    compiled = JT._step._cache_size()
    log = [JT.train_step(tr, *(JS.shard_batch(model, a) for a in b), TRAIN_LOOPS) for b in batches]
    assert JT._step._cache_size() - compiled == 1, "the step recompiled: its outputs left their placement"
    for i, (a, b) in enumerate(zip(ref_log, log)):
        for what, x, y in [("loss", a.loss, b.loss), ("grad_norm", a.grad_norm, b.grad_norm),
                           *((k, a.parts[k], b.parts[k]) for k in a.parts)]:
            assert abs(x - y) <= REL * max(abs(x), 1e-300), f"{name} step {i}: {what} {x!r} vs {y!r}"
    A, Bm = mj.dump_arrays(ref.model), mj.dump_arrays(model)
    errs = {k: rel(A[k], Bm[k]) for k in A}
    worst = max(errs, key=errs.get)
    print(f"{name}: after 3 steps worst weight error {errs[worst]:.1e} ({worst})")
    assert errs[worst] <= REL, (worst, errs[worst])
    bias = "recurrent.block.ffn.router_bias"
    assert np.array_equal(A[bias], Bm[bias]) and np.abs(A[bias]).max() > 0, (A[bias], Bm[bias])
    oa, ob = JT.optimizer_arrays(ref), JT.optimizer_arrays(tr)
    assert oa.keys() == ob.keys() and int(ob["step"]) == 3
    errs = {k: rel(oa[k], ob[k]) for k in oa}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= REL, (worst, errs[worst])
    # every tensor kept its placement, Adam's moments are split like their parameters
    after = placed(model)
    moved = [p for p in before if not after[p].is_equivalent_to(before[p], len(after[p].spec or ()) or 1)]
    assert not moved, moved
    shardings = JS._param_shardings(model.sharding, SPEC, nnx.state(model, nnx.Param))
    JT.load_optimizer_arrays(tr, ob)  # a resume places the restored moments on the mesh too
    for (path, v), (_, s) in zip(nnx.to_flat_state(JT._adam_state(tr.opt_state).mu), nnx.to_flat_state(shardings)):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        want = s.get_value() if isinstance(s, nnx.Variable) else s
        assert value.sharding.is_equivalent_to(want, value.ndim), path
    restored = JT.optimizer_arrays(tr)
    assert all(np.array_equal(restored[k], ob[k]) for k in ob)
    # the step's compiled program (a cache hit: the same arguments as the last step)
    ids, targets, mask = (JS.shard_batch(model, a) for a in batches[-1])
    _, params, rest = nnx.split(model, nnx.Param, ...)
    prog = Program(JT._step.lower(tr.graphdef, tr.tx, SPEC, params, rest, tr.opt_state, model._check_ids(ids),
                                  targets, mask, n_loops=TRAIN_LOOPS, no_grad_steps=0).compile().as_text())
    check_train_collectives(name, prog, model)


# --------------------------------------------------------------------------- collectives


def analytic(name: str, model: mj.Mythos) -> list[SS.Collective]:
    mesh, strategy = STRATEGIES[name]
    # the dispatch's default capacity takes every row of a device (none dropped): capacity factor = expert size
    return SS.collectives_per_step(SPEC, mesh, strategy, batch=B, seq_len=T, dtype="float64",
                                   capacity_factor=float(mesh.get("expert", 1)))


def ring(op: str, nbytes: int, n: int) -> int:
    """Bytes one device sends for a collective whose result is nbytes (spec.sharding's textbook formulas)."""
    return 2 * (n - 1) * nbytes // n if op == "all-reduce" else (n - 1) * nbytes // n


def check_forward_collectives(name: str, prog: Program, model: mj.Mythos) -> None:
    """The forward's compiled while loop against the strategy's rules and spec.sharding.collectives_per_step."""
    mesh, _ = STRATEGIES[name]
    strategy = model.sharding.strategy
    loops = prog.loops()
    assert len(loops) == 1, f"{name}: {len(loops)} top-level loops, expected the recurrent one"
    body, cond = (prog.collectives(c) for c in loops[0])
    every = prog.collectives()
    print(f"{name} forward: per loop step {count(body)}, condition {count(cond)}, whole program {count(every)}")
    rows = [r for r in analytic(name, model) if r.phase == "forward"]
    full = param_shapes()
    # ACT's early exit: the loop condition reduces "any position running" over the batch shards, once per step
    act = [r for r in rows if "early exit" in r.what]
    assert [c.op for c in cond] == ["all-reduce"] * sum(r.count for r in act), (name, cond, act)
    stacks = {("f64", s) for s in ((8, 32, 16), (8, 16, 32))}
    if "ep" in strategy:  # expert parallelism never moves an expert stack whole
        assert not [c for c in every if set(c.shapes) & stacks], f"{name}: an expert stack travels whole"
    if "fsdp" not in strategy:  # no parameter travels: dp and ep replicate (or keep) them, tp keeps its shards
        hit = [(c.op, s) for c in every for s in c.shapes if s in full]
        assert not hit, f"{name}: collectives of whole parameters {hit}"
    else:  # every data-split tensor is gathered (XLA hoists the loop block's gathers out of the while loop),
        # but the routed expert stacks: GSPMD contracts their split D in place inside the tile loop and
        # all-reduces the partial (rows, hidden) products instead (a training step gathers them)
        table = {p: ax for p, ax in SS.partition(SPEC, mesh, strategy).items() if ".experts." not in p}
        no_data = {a: (n if a != "data" else 1) for a, n in mesh.items()}
        want = param_shapes({p: ax for p, ax in table.items() if "data" in ax}, no_data) - param_shapes(
            {p: ax for p, ax in table.items() if "data" not in ax}, no_data)
        gathered = {s for c in every if c.op == "all-gather" for s in c.shapes}
        assert want <= gathered, f"{name}: data-split tensors not all-gathered: {want - gathered}"
        assert any(r.kind == "all-gather" and r.strategy == "fsdp" for r in rows)  # the analytic count knows it
    if "tp" in strategy:  # Megatron: the attention and FFN outputs all-reduced over model, per loop step
        n = mesh["model"]
        B_l = B // batch_split(name)[1]
        acts = [c for c in body if c.op == "all-reduce" and c.shapes[0] in (("f64", (B_l, T, SPEC.dim)),
                                                                           ("f64", (B_l * T, SPEC.dim)))]
        tp = [r for r in rows if r.strategy == "tp" and r.kind == "all-reduce" and r not in act]
        assert len(acts) == sum(r.count for r in tp), (name, acts, tp)
        assert sum(ring("all-reduce", c.nbytes, n) for c in acts) == sum(r.bytes for r in tp)
    if "ep" in strategy:  # tokens travel to their experts: the dispatch and combine all-to-alls of rows
        n = mesh["expert"]
        rows_a2a = [c for c in body if c.op == "all-to-all" and c.shapes[0][0] == "f64"]
        ep = [r for r in rows if r.strategy == "ep" and r.kind == "all-to-all"]
        assert len(rows_a2a) == sum(r.count for r in ep), (name, rows_a2a, ep)
        assert sum(ring("all-to-all", c.nbytes, n) for c in rows_a2a) == sum(r.bytes for r in ep)


def check_train_collectives(name: str, prog: Program, model: mj.Mythos) -> None:
    """The training step: gradients synchronised, and under ep the expert stacks and their gradients never
    whole (an all-gather or all-reduce of a whole (E, D, hidden) stack would show a replicated gradient)."""
    strategy = model.sharding.strategy
    every = prog.collectives()
    loops = prog.loops()
    print(f"{name} training step: " + "; ".join(f"loop {i}: {count(prog.collectives(b))}"
                                                 for i, (b, _) in enumerate(loops)) + f"; whole {count(every)}")
    assert len(loops) == 2, f"{name}: expected the forward scan and its transpose, got {len(loops)} loops"
    stacks = {("f64", s) for s in ((8, 32, 16), (8, 16, 32))}
    if "ep" in strategy:
        assert not [c for c in every if set(c.shapes) & stacks], f"{name}: an expert stack (or its gradient) is whole"
    full = param_shapes()
    grads = [c for c in every if c.op in ("all-reduce", "reduce-scatter") and set(c.shapes) & full]
    if "dp" in strategy:  # replicated tensors' gradients summed over the batch shards
        assert grads, f"{name}: no gradient all-reduce"
    if "ep" in strategy:
        for body, _ in loops:  # forward and backward both send rows to their experts and back
            a2a = [c for c in prog.collectives(body) if c.op == "all-to-all" and c.shapes[0][0] == "f64"]
            assert len(a2a) >= 2, (name, count(prog.collectives(body)))
