"""The torch twin on a DeviceMesh (mythos_torch/sharding.py, docs/scaling.md) on gloo ranks: dp, fsdp, tp (GQA
and MLA attention) and ep on 2 ranks; dp+tp and fsdp+tp (data=2, model=2), dp+ep and fsdp+ep (data=2,
expert=2) on 4.
Every sharded run equals the unsharded run of the same weights and batch, computed in this (the parent)
process:

- forward (float64, the eager loop with ACT's early exit): logits within 1e-12 relative, loop counts,
  `halted`, n_steps, `running` and the routed experts identical; float32: parity's derived bounds
  (parity.derive_tolerances from the unsharded model's measured float32 noise) and its near-tie rule;
- shards that diverge: rows forced to halt at step 1 on the first batch shard and at step 3 on the second
  (alone, each shard would stop at its own step: the early exit is the global "any position running");
- decoding: model.generate's tokens; with stop sequences that end the first shard's rows after one token
  while the second shard's go on (the decode loop stops on every rank together);
- three training steps with the ponder and halting-entropy terms on and unequal answer tokens per shard
  (the per-shard means differ from the global ones, asserted): loss and parts, gradient norm (clipping
  active), weights, AdamW state (optimizer_arrays, and load_optimizer_arrays back) and the router bias
  (the per-shard expert loads differ, asserted) equal the unsharded run's;
- the collectives each strategy issues per loop step, read with torch.profiler (forward, backward, and
  the early exit's flag), printed for docs/scaling.md and asserted.

    python -m pytest -m sharded tests/sharded/test_torch_sharded.py -s
"""

from __future__ import annotations

import collections
import functools

import numpy as np
import pytest
import torch

import mythos_torch as mt
import spec as S
from mythos_torch import train as TT
from parity import derive_tolerances
from parity.compare import forward_outputs, probe_weights, rounding_noise
from spec.training import TrainConfig

from .ranks import run_ranks

SPEC = S.load("tiny", overrides={"moe.n_experts": 8, "loss.ponder": 0.01, "loss.halting_entropy": 0.01})
SPECS = {"gqa": SPEC, "mla": S.load("tiny", overrides={"moe.n_experts": 8, "loss.ponder": 0.01,
                                                     "loss.halting_entropy": 0.01, "attention.type": "mla"})}
SEEDS = {"gqa": 12, "mla": 39}  # of the inputs: the stop tokens of the first shard's rows are not the second's
B, T, N, PROMPT, NEW = 4, 8, 4, 4, 3  # batch, tokens, loop steps, prompt tokens, decoded tokens
REL = 1e-12  # float64: sharded vs unsharded, relative to the output's magnitude
CFG = TrainConfig(steps=3, batch_size=B, lr=3e-3, warmup_steps=1, weight_decay=0.1, grad_clip=0.3,
                  dtype="float64")
# name -> (spec, mesh, strategy); run_ranks spawns once per world size
RUNS = {2: {"dp": ("gqa", {"data": 2}, "dp"), "fsdp": ("gqa", {"data": 2}, "fsdp"), "tp": ("gqa", {"model": 2}, "tp"),
            "tp-mla": ("mla", {"model": 2}, "tp"), "ep": ("gqa", {"expert": 2}, "ep")},
        4: {"dp+tp": ("gqa", {"data": 2, "model": 2}, "dp+tp"), "fsdp+tp": ("gqa", {"data": 2, "model": 2}, "fsdp+tp"),
            "dp+ep": ("gqa", {"data": 2, "expert": 2}, "dp+ep"), "fsdp+ep": ("gqa", {"data": 2, "expert": 2}, "fsdp+ep")}}
FORCED = (1, 3)  # the step at which the rows of the first / second batch shard are forced to halt
# measured per loop step (forward / backward / an early-exit forward): FSDP gathers the looped block (and,
# under ep, the experts) once per forward (reshard_after_forward=False) and again for each call's backward;
# tp all-reduces the attention and FFN outputs in the forward and their inputs' gradients in the backward;
# ep's dispatch exchanges the row counts, the rows and the results (all_to_all_single), the backward the
# rows' gradients both ways; the early exit adds one all-reduce of a flag over the batch ranks
PER_STEP = {
    "dp": ({}, {}, {"allreduce": 1}),
    "fsdp": ({}, {"allgather": 1}, {"allreduce": 1}),
    "tp": ({"allreduce": 2}, {"allreduce": 2}, {"allreduce": 2}),
    # MLA: three Colwise projections of two inputs (q_up_nope and q_up_rope read c_q, kv_up reads c_kv) and the
    # shared RoPE key's gradient: four all-reduces in the attention's backward, one in the FFN's
    "tp-mla": ({"allreduce": 2}, {"allreduce": 5}, {"allreduce": 2}),
    "ep": ({"alltoall": 3}, {"alltoall": 2}, {"alltoall": 3, "allreduce": 1}),
    "dp+tp": ({"allreduce": 2}, {"allreduce": 2}, {"allreduce": 3}),
    "fsdp+tp": ({"allreduce": 2}, {"allreduce": 2, "allgather": 1}, {"allreduce": 3}),
    "dp+ep": ({"alltoall": 3}, {"alltoall": 2}, {"alltoall": 3, "allreduce": 1}),
    "fsdp+ep": ({"alltoall": 3}, {"allgather": 2, "alltoall": 2}, {"alltoall": 3, "allreduce": 1}),
}


# --------------------------------------------------------------------------- inputs (the parent's)


@functools.lru_cache(maxsize=None)
def inputs(kind: str) -> dict:
    """Weights (parity's probe weights: loop counts spread over 1..N, every expert routed), ids, the forcing,
    the prompt, stop sequences and three training batches, as NumPy (sent to the ranks as they are)."""
    spec = SPECS[kind]
    rng = np.random.default_rng(SEEDS[kind])
    ids = rng.integers(0, spec.vocab_size, size=(B, T))
    weights = probe_weights(spec, 0, ids, N)
    half = B // 2
    force = np.repeat(np.array(FORCED), half)[:, None].repeat(T, 1)  # (B, T)
    batches = []
    for _ in range(3):
        x = rng.integers(0, spec.vocab_size, size=(B, T + 1))
        mask = np.zeros((B, T), dtype=bool)
        mask[:half, 1:] = True  # the first shard: 7 answer tokens per row, the second: 1 and 2
        mask[half, -1] = mask[half + 1, -2:] = True
        batches.append((x[:, :-1], x[:, 1:], mask))
    prompt = ids[:, :PROMPT]
    ref = _model(kind, "float64", weights)
    first = ref.generate(torch.from_numpy(prompt), 1)[:, -1].tolist()
    stop = [[t] for t in first[:half]]  # the first shard's rows stop after one token
    assert not set(first[half:]) & set(first[:half]), "the stop tokens would end the second shard's rows too"
    return {"weights": weights, "ids": ids, "force": force, "prompt": prompt, "stop": stop, "batches": batches}


def _model(kind: str, dtype: str, weights: dict[str, np.ndarray]) -> mt.Mythos:
    return mt.build(SPECS[kind], seed=0, dtype=dtype, weights=weights)


def outputs(out: mt.ModelOutput) -> dict:
    """The ModelOutput fields compared, as NumPy (floats as float64)."""
    tr = out.traces
    f = lambda x: x.detach().double().numpy()  # noqa: E731
    return {"logits": f(out.logits), "loop_counts": out.loop_counts.numpy(), "halted": out.halted.numpy(),
            "n_steps": int(out.n_steps), "running": tr.running.numpy(), "expert_idx": tr.expert_idx.numpy(),
            "state_norm": f(tr.state_norm), "halt_p": f(tr.halt_p), "cum_p": f(tr.cum_p),
            "router_margin": f(tr.router_margin)}


# --------------------------------------------------------------------------- the ranks


def _ranks(rank: int, world: int, runs: dict[str, tuple[str, dict[str, int], str]], inputs: dict[str, dict]) -> dict:
    """Every check of every run of `runs` on this rank; returns its rows' results (rank 0: the whole weights
    and optimizer state too)."""
    from mythos_torch import sharding as SH

    results = {}
    for name, (kind, mesh, strategy) in runs.items():
        inp = inputs[kind]
        device_mesh = SH.make_mesh(mesh)
        model = SH.shard(_model(kind, "float64", inp["weights"]), device_mesh, strategy)
        local = lambda a: SH.shard_batch(model, torch.from_numpy(np.asarray(a)))  # noqa: E731
        res: dict = {"rows": local(np.arange(B)).numpy()}
        res["free"] = outputs(model(local(inp["ids"]), N))
        res["forced"] = outputs(model(local(inp["ids"]), N, force_halt=local(inp["force"])))
        res["generate"] = model.generate(local(inp["prompt"]), NEW).numpy()
        res["stopped"] = model.generate(local(inp["prompt"]), NEW, stop=inp["stop"]).numpy()
        res["collectives"] = _collectives(model, local(inp["ids"]))
        tr = TT.Trainer(model, CFG)
        res["steps"] = [TT.train_step(tr, local(x), local(y), local(m), N)._asdict() for x, y, m in inp["batches"]]
        sh = model.sharding
        weights = {k: SH.full_tensor(sh, k, v.detach()).numpy() for k, v in model.state_dict().items()}
        state = TT.optimizer_arrays(tr)
        TT.load_optimizer_arrays(tr, state)  # each rank keeps its piece of the whole arrays
        again = TT.optimizer_arrays(tr)
        res["reloaded"] = sorted(again) == sorted(state) and all(np.array_equal(again[k], state[k]) for k in state)
        if rank == 0:
            res["weights"], res["optimizer"] = weights, state
        res["bias"] = model.recurrent.block.ffn.router_bias.numpy().copy()
        model32 = SH.shard(_model(kind, "float32", inp["weights"]), SH.make_mesh(mesh), strategy)
        res["f32"] = outputs(model32(local(inp["ids"]), N))
        results[name] = res
    results["errors"] = _errors(world, inputs["gqa"])
    return results


def _errors(world: int, inp: dict) -> list[str]:
    """The messages of what shard and make_mesh refuse (each call must raise)."""
    from mythos_torch import sharding as SH

    mesh = SH.make_mesh({"data": world})
    model = SH.shard(_model("gqa", "float64", inp["weights"]), mesh, "dp")
    calls = [lambda: SH.make_mesh({"data": world + 1}),
             lambda: SH.shard(model, mesh, "dp"),
             lambda: SH.shard(_model("gqa", "float64", inp["weights"]), mesh, "ep"),
             lambda: SH.shard(_model("gqa", "float64", inp["weights"]), mesh, "dp+fsdp"),
             lambda: SH.shard_batch(model, torch.zeros(world + 1, T, dtype=torch.long))]
    model.loop_form = "while"
    calls.append(lambda: model(torch.zeros(1, T, dtype=torch.long), N))
    out = []
    for call in calls:
        try:
            call()
        except (ValueError, S.SpecError) as e:
            out.append(f"{type(e).__name__}: {e}")
        else:
            out.append("no error")
    return out


def _collectives(model: mt.Mythos, x: torch.Tensor) -> dict[str, dict[str, dict[str, int]]]:
    """The c10d collectives of a forward, its backward and an early-exit forward (no position halts: every
    step runs) at 2 and 3 loop steps, counted with torch.profiler: {phase: {"2": counts, "3": counts}}.
    Counted in the steady state of training: after a forward and backward (the earlier calls here were
    inference, which leaves FSDP's gathered parameters in place)."""
    from torch.profiler import ProfilerActivity, profile

    from mythos_torch import sharding as SH

    SH.reshard(model)
    model(x, 2, early_exit=False).logits.sum().backward()

    def counted(fn) -> tuple[object, dict[str, int]]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:  # from the sharded state (a backward's end)
            out = fn()
        names = (e.name for e in prof.events() if e.name.startswith("c10d::"))
        return out, dict(collections.Counter(n.removeprefix("c10d::").strip("_").removesuffix("_base") for n in names))

    res: dict = {"forward": {}, "backward": {}, "early_exit": {}}
    never = torch.zeros_like(x)  # force_halt 0: no position halts by its threshold
    for n in (2, 3):
        out, res["forward"][n] = counted(lambda: model(x, n, early_exit=False))
        _, res["backward"][n] = counted(lambda: out.logits.sum().backward())
        with torch.no_grad():
            _, res["early_exit"][n] = counted(lambda: model(x, n, force_halt=never))
        SH.reshard(model)  # an inference forward leaves the gathered parameters
    model.zero_grad(set_to_none=True)
    return res


@functools.lru_cache(maxsize=None)
def sharded_results() -> dict:
    """run name -> the results of every rank (one spawn per world size)."""
    out = {}
    for world, runs in RUNS.items():
        per_rank = run_ranks(_ranks, world, runs, {kind: inputs(kind) for kind in SPECS})
        for name in runs:
            out[name] = [r[name] for r in per_rank]
        out["errors", world] = per_rank[0]["errors"]
    return out


# --------------------------------------------------------------------------- the unsharded references


@functools.lru_cache(maxsize=None)
def reference(kind: str) -> dict:
    """The unsharded runs of every check (and the float32 bounds) for the spec `kind`."""
    spec, inp = SPECS[kind], inputs(kind)
    ref = _model(kind, "float64", inp["weights"])
    ids, force = torch.from_numpy(inp["ids"]), torch.from_numpy(inp["force"])
    res = {"free": outputs(ref(ids, N)), "forced": outputs(ref(ids, N, force_halt=force))}
    half = B // 2
    # alone, each batch shard would stop at its own forced step
    res["alone"] = [int(ref(ids[rows], N, force_halt=force[rows]).n_steps) for rows in (slice(0, half),
                                                                                       slice(half, B))]
    prompt = torch.from_numpy(inp["prompt"])
    res["generate"] = ref.generate(prompt, NEW).numpy()
    res["stopped"] = ref.generate(prompt, NEW, stop=inp["stop"]).numpy()
    tr = TT.Trainer(ref, CFG)
    res["naive"] = _per_shard_terms(spec, ref, inp["batches"][0])
    res["steps"] = [TT.train_step(tr, x, y, m, N)._asdict() for x, y, m in inp["batches"]]
    res["weights"] = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    res["optimizer"] = TT.optimizer_arrays(tr)
    res["bias"] = ref.recurrent.block.ffn.router_bias.numpy().copy()
    # float32: the unsharded run, and its rounding noise against float64 with its own decisions
    ref32 = _model(kind, "float32", inp["weights"])
    o32 = forward_outputs("torch", ref32, inp["ids"], N)
    fh, fx = np.where(o32.halted, o32.loop_counts, 0), o32.traces["expert_idx"]
    o64 = forward_outputs("torch", ref, inp["ids"], N, force_halt=fh, force_experts=fx)
    res["f32"] = outputs(ref32(ids, N))
    res["tol32"] = derive_tolerances(spec, "float32", o32, rounding_noise(o32, o64), "float64")
    return res


def _per_shard_terms(spec: S.Spec, model: mt.Mythos, batch: tuple) -> dict:
    """The first batch's loss terms and expert loads shard by shard (each shard's own denominators) and whole."""
    x, y, m = (torch.from_numpy(np.asarray(a)) for a in batch)
    half = B // 2
    with torch.no_grad():
        whole = model(x, N, early_exit=False)
        parts = [model(x[r], N, early_exit=False) for r in (slice(0, half), slice(half, B))]
        terms = {"whole": mt.total_loss(spec, whole, y, m)[0].item(),
                 "shards": [mt.total_loss(spec, o, y[r], m[r])[0].item()
                            for o, r in zip(parts, (slice(0, half), slice(half, B)))]}
        E = spec.moe.n_experts
        terms["loads"] = [mt.expert_load(o.traces.expert_idx, o.traces.running, E).numpy() for o in parts]
    return terms


# --------------------------------------------------------------------------- comparisons


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |a| (over finite values; equal infinities are equal)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf where both are +inf (router margins at k = E)
        d = np.where(a == b, 0.0, np.abs(a - b))
    scale = np.abs(a[np.isfinite(a)]).max(initial=0.0)
    return float(d.max(initial=0.0)) / (scale if scale > 0 else 1.0)


DECISIONS = ("loop_counts", "halted", "running", "expert_idx")
CONTINUOUS = ("logits", "state_norm", "halt_p", "cum_p", "router_margin")


def rows_of(ref: dict, rows: np.ndarray) -> dict:
    """The reference outputs of a rank's batch rows (traces have the batch on their axis 1)."""
    out = {}
    for k, v in ref.items():
        if isinstance(v, np.ndarray):
            out[k] = v[:, rows] if k in ("running", "expert_idx", "state_norm", "halt_p", "cum_p",
                                         "router_margin") else v[rows]
        else:
            out[k] = v
    return out


def assert_same(ref: dict, got: dict, what: str) -> None:
    """float64: every decision identical, every continuous output within REL."""
    assert got["n_steps"] == ref["n_steps"], f"{what}: n_steps {got['n_steps']} vs {ref['n_steps']}"
    for name in DECISIONS:
        bad = np.argwhere(ref[name] != got[name])
        assert not bad.size, f"{what}: {name} differs at {len(bad)} place(s), first {tuple(bad[0])}"
    errs = {k: rel(ref[k], got[k]) for k in CONTINUOUS}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= REL, f"{what}: {worst} relative error {errs[worst]:.2e} > {REL:.0e}"


@pytest.fixture(scope="module")
def runs() -> dict:
    torch.set_num_threads(1)
    return sharded_results()


NAMES = [name for runs in RUNS.values() for name in runs]
KIND = {name: kind for runs in RUNS.values() for name, (kind, _, _) in runs.items()}


@pytest.mark.parametrize("kind", SPECS)
def test_the_inputs_make_the_shards_diverge(kind):
    """Alone, each batch shard's forced rows end the loop at their own step; together the loop runs to the
    last one. The free run's loop counts spread over several steps."""
    ref = reference(kind)
    assert ref["alone"] == list(FORCED), ref["alone"]
    assert ref["forced"]["n_steps"] == max(FORCED)
    assert len(np.unique(ref["free"]["loop_counts"])) >= 2, ref["free"]["loop_counts"]


@pytest.mark.parametrize("name", NAMES)
def test_forward_float64(runs, name):
    ref = reference(KIND[name])
    for rank, r in enumerate(runs[name]):
        assert_same(rows_of(ref["free"], r["rows"]), r["free"], f"{name} rank {rank}: free run")
        # every rank ran the global number of steps, though its own rows halted at step 1 or 3
        assert_same(rows_of(ref["forced"], r["rows"]), r["forced"], f"{name} rank {rank}: forced halting")


@pytest.mark.parametrize("name", NAMES)
def test_forward_float32(runs, name):
    """Within parity's float32 bounds; a decision may differ only at a near tie (none is expected here)."""
    ref = reference(KIND[name])
    tol = ref["tol32"]
    for rank, r in enumerate(runs[name]):
        want, got = rows_of(ref["f32"], r["rows"]), r["f32"]
        assert got["n_steps"] == want["n_steps"]
        halt = np.argwhere(want["loop_counts"] != got["loop_counts"])
        for b, j in halt:  # the reference's distance to the threshold at the step it halted
            s = want["loop_counts"][b, j] - 1
            assert abs(want["cum_p"][s, b, j] - SPEC.halting.threshold) <= tol.near_tie_halting, (name, b, j)
        route = np.argwhere((want["expert_idx"] != got["expert_idx"]).any(-1))
        for s, b, j in route:
            assert want["router_margin"][s, b, j] <= tol.near_tie_routing, (name, s, b, j)
        ok = np.ones(len(r["rows"]), bool)  # rows with a near-tie decision are compared no further
        ok[halt[:, 0]] = False
        ok[route[:, 1]] = False
        err = float(np.abs(want["logits"][ok] - got["logits"][ok]).max(initial=0.0))
        assert ok.any() and err <= tol.logits, f"{name} rank {rank}: logits {err:.2e} > {tol.logits:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_decode(runs, name):
    ref = reference(KIND[name])
    stopped = ref["stopped"]
    half = B // 2
    assert (stopped[:half, PROMPT + 1:] == -1).all() and (stopped[half:, PROMPT + 1:] != -1).all(), stopped
    for r in runs[name]:
        np.testing.assert_array_equal(r["generate"], ref["generate"][r["rows"]])
        np.testing.assert_array_equal(r["stopped"], stopped[r["rows"]])


@pytest.mark.parametrize("kind", SPECS)
def test_per_shard_denominators_and_loads_differ(kind):
    """What the global denominators and the summed load correct: the shards' own means average to another
    loss, and the shards route different loads (the bias would move differently on each)."""
    naive = reference(kind)["naive"]
    # far outside the 1e-12 the sharded runs keep (the CE of random targets is near log V on every row)
    assert abs(np.mean(naive["shards"]) - naive["whole"]) > 1e-3 * abs(naive["whole"]), naive
    a, b = naive["loads"]
    assert not np.array_equal(np.sign(a.mean() - a), np.sign(b.mean() - b)), naive["loads"]


@pytest.mark.parametrize("name", NAMES)
def test_three_training_steps(runs, name):
    ref = reference(KIND[name])
    assert any(s["grad_norm"] > CFG.grad_clip for s in ref["steps"]), "clipping should be active"
    for rank, r in enumerate(runs[name]):
        for i, (a, b) in enumerate(zip(ref["steps"], r["steps"])):
            for k in ("loss", "grad_norm", "lr"):
                assert abs(a[k] - b[k]) <= REL * abs(a[k]), (name, rank, i, k, a[k], b[k])
            for k in a["parts"]:
                assert abs(a["parts"][k] - b["parts"][k]) <= REL * max(1.0, abs(a["parts"][k])), (name, rank, i, k)
        np.testing.assert_array_equal(r["bias"], ref["bias"])
        assert r["reloaded"], f"{name} rank {rank}: load_optimizer_arrays then optimizer_arrays changed the state"
    got = runs[name][0]
    assert sorted(got["weights"]) == sorted(ref["weights"])
    errs = {k: rel(ref["weights"][k], got["weights"][k]) for k in ref["weights"]}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= REL, f"{name}: weights {worst} {errs[worst]:.2e}"
    assert sorted(got["optimizer"]) == sorted(ref["optimizer"])
    errs = {k: rel(ref["optimizer"][k], got["optimizer"][k]) for k in ref["optimizer"]}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= REL, f"{name}: optimizer state {worst} {errs[worst]:.2e}"


def test_bad_input_gets_a_clear_error(runs):
    from mythos_torch import sharding as SH

    with pytest.raises(S.SpecError, match="torch.distributed is not initialised"):
        SH.make_mesh({"data": 2})  # this process has no process group
    for world in RUNS:
        want = [f"mesh data={world + 1} holds {world + 1} ranks, the job has {world}",
                f"already sharded (mesh data={world}, strategy dp)", "strategy ep needs mesh axis 'expert'",
                "dp and fsdp both use the data axis", f"batch {world + 1} is not divisible by the {world} batch shards",
                'loop_form="while"']
        got = runs["errors", world]
        assert len(got) == len(want), got
        for g, w in zip(got, want):
            assert w in g, (w, g)


@pytest.mark.parametrize("name", NAMES)
def test_collectives_per_loop_step(runs, name):
    """Per loop step: counts at 3 steps minus counts at 2, the same on every rank; printed for docs/scaling.md."""
    per_rank = []
    for r in runs[name]:
        c = r["collectives"]
        step = []
        for phase in ("forward", "backward", "early_exit"):
            two, three = collections.Counter(c[phase][2]), collections.Counter(c[phase][3])
            three.subtract(two)
            step.append({k: v for k, v in three.items() if v})
        per_rank.append(tuple(step))
        print(f"{name}: per loop step forward {step[0]}, backward {step[1]}, early-exit forward {step[2]}; "
              f"whole forward at 2 steps {c['forward'][2]}, its backward {c['backward'][2]}")
    assert all(p == per_rank[0] for p in per_rank), per_rank
    assert per_rank[0] == PER_STEP[name], per_rank[0]
