"""Expert parallelism in the torch twin (mythos_torch/expert_parallel.py) on gloo ranks: the all-to-all dispatch
equals Experts on the whole stacks, an expert-parallel model equals the unsharded one (float64 logits, loop counts,
expert ids; gradients), the expert stacks are never gathered, and the collectives per loop step are counted.

Each test spawns its ranks once (tests/sharded/ranks.py) and checks several things in them."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from .ranks import run_ranks

E = 8  # routed experts: 4 per rank on 2 ranks, 2 on 4
GATHERS = ("all_gather", "all_gather_single", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced",
           "all_gather_object", "gather")
WATCHED = ("all_to_all_single", "all_to_all", "all_reduce", *GATHERS, "reduce_scatter", "reduce_scatter_single",
           "reduce_scatter_tensor", "scatter", "broadcast", "send", "recv", "isend", "irecv")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


class _Count:
    """Counts the torch.distributed collectives called while active (the module functions are wrapped)."""

    def __init__(self):
        self.calls: collections.Counter[str] = collections.Counter()
        self._orig = {}

    def __enter__(self):
        for name in WATCHED:
            f = self._orig[name] = getattr(dist, name)

            def wrapped(*a, _f=f, _name=name, **kw):
                self.calls[_name] += 1
                return _f(*a, **kw)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, f in self._orig.items():
            setattr(dist, name, f)


def _moe(seed: int):
    """A float64 MoE FFN of width 6 with E experts of hidden 5, every weight from one NumPy generator."""
    from mythos_torch import MoE
    from spec import MoESpec

    moe = MoE(6, MoESpec(n_experts=E, n_shared_experts=1, top_k=2, expert_dim=5), dtype=torch.float64)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape))))
    return moe


def _dispatch_ranks(rank: int, world: int) -> dict:
    """dispatch == Experts on the whole stacks (values and gradients) for random, skewed and empty routings."""
    from torch.distributed.device_mesh import init_device_mesh

    from mythos_torch.expert_parallel import full_expert_arrays, shard_experts

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("expert",))
    whole, moe = _moe(0), _moe(0)
    shard_experts(moe, mesh)
    per = E // world
    out: dict = {"shapes": [tuple(p.shape) for p in (moe.experts.gate, moe.experts.up, moe.experts.down)]}
    rng = np.random.default_rng(100 + rank)
    N = 3 + 4 * rank  # a different token count on every rank
    x = torch.from_numpy(rng.normal(size=(N, 6)))
    routings = {
        "random": np.stack([rng.permutation(E)[:2] for _ in range(N)]),
        "skewed": np.zeros((N, 2), dtype=np.int64) + np.array([E - 1, 0]),  # every row to the first and last expert
        "one_expert": np.zeros((N, 2), dtype=np.int64),  # every (token, slot) row to expert 0, on rank 0
        "large": None,  # enough rows for Experts' grouped path (more than SMALL_ROWS per rank)
    }
    errors = {}
    for name, idx in routings.items():
        xi = x if idx is not None else torch.from_numpy(rng.normal(size=(40 + rank, 6)))
        if idx is None:
            idx = rng.integers(0, E, size=(xi.shape[0], 2))
        idx = torch.from_numpy(idx).to(torch.int32)
        xa, xb = xi.clone().requires_grad_(), xi.clone().requires_grad_()
        want = whole.experts(xa, idx)
        got = moe.dispatch(moe.experts, xb, idx)
        g = torch.from_numpy(np.random.default_rng(7 + rank).normal(size=tuple(want.shape)))
        (want * g).sum().backward()
        (got * g).sum().backward()
        errors[name] = {"y": _rel(got, want), "dx": _rel(xb.grad, xa.grad)}
    # the local expert gradients: the sum over every rank's rows, equal to the matching slice of the whole grads
    for pname in ("gate", "up", "down"):
        mine, full = getattr(moe.experts, pname).grad, getattr(whole.experts, pname).grad.clone()
        dist.all_reduce(full)  # the whole stacks' gradient of every rank's rows
        errors[f"d{pname}"] = _rel(mine, full[rank * per:(rank + 1) * per])
    out["errors"] = errors
    # no token at all on the last rank
    n0 = 0 if rank == world - 1 else 5
    x0 = torch.from_numpy(rng.normal(size=(n0, 6)))
    idx0 = torch.from_numpy(rng.integers(0, E, size=(n0, 2))).to(torch.int32)
    got0 = moe.dispatch(moe.experts, x0, idx0)
    out["empty"] = (tuple(got0.shape), 0.0 if n0 == 0 else _rel(got0, whole.experts(x0, idx0)))
    full_arrays = full_expert_arrays(moe, mesh)
    out["full_arrays"] = all(np.array_equal(full_arrays[p], getattr(whole.experts, p).detach().numpy())
                             for p in ("gate", "up", "down"))
    # a fixed capacity: at most ceil(0.5 * N * k / world) rows from this rank to each rank, in (token, slot) order
    capped = _moe(0)
    shard_experts(capped, mesh, capacity_factor=0.5)
    N = 12
    x = torch.from_numpy(rng.normal(size=(N, 6)))
    idx = torch.from_numpy(np.where(np.arange(N)[:, None] < 9, [0, 1], [E - 1, 0])).to(torch.int32)
    got = capped.dispatch(capped.experts, x, idx)
    want = whole.experts(x, idx)
    C = math.ceil(0.5 * N * 2 / world)
    dest = idx.long().reshape(-1) // per
    place = np.array([int((dest[:m] == dest[m]).sum()) for m in range(N * 2)])  # rows before it to its rank
    kept = torch.from_numpy(place < C).view(N, 2)
    out["capacity"] = {"dropped": capped.dispatch.dropped, "expected": int((~kept).sum()),
                       "kept_err": _rel(got[kept], want[kept]), "dropped_zero": bool((got[~kept] == 0).all())}
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_equals_experts(world):
    for rank, r in enumerate(run_ranks(_dispatch_ranks, world)):
        per = E // world
        assert r["shapes"] == [(per, 6, 5), (per, 6, 5), (per, 5, 6)], f"rank {rank} keeps {r['shapes']}"
        for name, err in r["errors"].items():
            errs = err.values() if isinstance(err, dict) else [err]
            assert max(errs) <= 1e-12, f"rank {rank}, {name}: relative error {err} (dispatch vs Experts, float64)"
        assert r["empty"][0] == ((0, 2, 6) if rank == world - 1 else (5, 2, 6)) and r["empty"][1] <= 1e-12, r["empty"]
        assert r["full_arrays"], f"rank {rank}: full_expert_arrays differs from the whole stacks"
        cap = r["capacity"]
        assert cap["expected"] > 0 and cap["dropped"] == cap["expected"], f"rank {rank}: {cap}"
        assert cap["kept_err"] <= 1e-12 and cap["dropped_zero"], f"rank {rank}: {cap}"


def _spec():
    import spec as S

    return S.preset("tiny", {"moe.n_experts": E})


def _model_ranks(rank: int, world: int, mesh_shape: tuple[tuple[str, int], ...]) -> dict:
    """The expert-parallel model on this rank's rows vs the unsharded model on the whole batch (float64)."""
    from torch.distributed.device_mesh import init_device_mesh

    import mythos_torch as mt
    from mythos_torch.expert_parallel import shard_experts

    names, sizes = tuple(a for a, _ in mesh_shape), tuple(n for _, n in mesh_shape)
    mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
    n_ep = dict(mesh_shape)["expert"]
    er = mesh.get_local_rank("expert")
    per = E // n_ep
    s = _spec()
    whole, ep = mt.build(s, seed=0, dtype="float64"), mt.build(s, seed=0, dtype="float64")
    shard_experts(ep.recurrent.block.ffn, mesh)
    B, T, N = 2 * world, 8, s.recurrent.max_loop_iters
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, s.vocab_size, size=(B, T)))
    rows = slice(rank * 2, rank * 2 + 2)  # this rank's rows: the batch is split over every rank
    G = torch.from_numpy(rng.normal(size=(B, T, s.vocab_size)))
    # skewed: every token of every step to experts 0 and 1 (rank 0 of the expert group; the others get no row)
    skew = torch.zeros(N, B, T, 2, dtype=torch.long)
    skew[..., 1] = 1
    # halting steps 1..3 that differ per position, and step 3 somewhere on every rank: the early exits agree
    halt = torch.from_numpy(rng.integers(1, 4, size=(B, T)))
    halt[::2, 0] = 3
    cases = {"all_steps": dict(early_exit=False), "early_exit": dict(force_halt=halt),
             "skewed": dict(early_exit=False, force_experts=skew)}
    out: dict = {"steps": {}}
    for name, kw in cases.items():
        local = {k: (v[rows] if k == "force_halt" else v[:, rows] if k == "force_experts" else v) for k, v in kw.items()}
        whole.zero_grad(set_to_none=True)
        ep.zero_grad(set_to_none=True)
        ref = whole(ids, **kw)
        (ref.logits * G).sum().backward()
        with _Count() as fwd:
            got = ep(ids[rows], **local)
        with _Count() as bwd:
            (got.logits * G[rows]).sum().backward()
        r = {"logits": _rel(got.logits, ref.logits[rows]),
             "counts": bool(torch.equal(got.loop_counts, ref.loop_counts[rows])),
             "experts": bool(torch.equal(got.traces.expert_idx, ref.traces.expert_idx[:, rows])),
             "n_steps": (got.n_steps, ref.n_steps), "fwd": dict(fwd.calls), "bwd": dict(bwd.calls)}
        grads = {}
        ref_grads = dict(whole.named_parameters())
        for pname, p in ep.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            want = ref_grads[pname].grad
            if ".experts." in pname:  # local slice: every rank of its expert group sent its rows' gradient here
                if "data" in names:
                    dist.all_reduce(g, group=mesh.get_group("data"))  # the data replicas' shares
                want = want[er * per:(er + 1) * per]
            else:
                dist.all_reduce(g)  # replicated parameters: every rank's share of the gradient
            grads[pname] = _rel(g, want)
        r["grads"] = grads
        r["distinct_counts"] = len(set(got.loop_counts.flatten().tolist()))
        out["steps"][name] = r
    out["shapes"] = tuple(ep.recurrent.block.ffn.experts.gate.shape)
    # float32: the same decisions where the router margin is not a near tie, then logits within float32 rounding
    w32, e32 = mt.build(s, seed=0, dtype="float32"), mt.build(s, seed=0, dtype="float32")
    shard_experts(e32.recurrent.block.ffn, mesh)
    with torch.no_grad():
        ref, got = w32(ids, early_exit=False), e32(ids[rows], early_exit=False)
    differ = (ref.traces.expert_idx[:, rows] != got.traces.expert_idx).any(-1)
    out["f32"] = {"differ": int(differ.sum()),
                  "near_tie": bool((ref.traces.router_margin[:, rows][differ] < 1e-4).all()),
                  "logits": _rel(got.logits, ref.logits[rows]) if not bool(differ.any()) else None,
                  "counts": bool(torch.equal(got.loop_counts, ref.loop_counts[rows]))}
    return out


@pytest.mark.parametrize("mesh_shape", [(("expert", 2),), (("expert", 4),), (("data", 2), ("expert", 2))],
                         ids=["expert=2", "expert=4", "data=2,expert=2"])
def test_model_ep_equals_unsharded(mesh_shape):
    world = math.prod(n for _, n in mesh_shape)
    N = _spec().recurrent.max_loop_iters
    per = E // dict(mesh_shape)["expert"]
    for rank, r in enumerate(run_ranks(_model_ranks, world, mesh_shape)):
        assert r["shapes"] == (per, 32, 16), f"rank {rank} holds expert stacks {r['shapes']}"
        for name, c in r["steps"].items():
            where = f"rank {rank}, {name}"
            assert c["logits"] <= 1e-12, f"{where}: logits relative error {c['logits']:.3g}"
            assert c["counts"] and c["experts"], f"{where}: loop counts equal {c['counts']}, experts {c['experts']}"
            steps = 3 if name == "early_exit" else N
            assert c["n_steps"] == (steps, steps), f"{where}: n_steps {c['n_steps']}"
            if name == "early_exit":  # the positions of one rank halt at different steps
                assert c["distinct_counts"] > 1, f"{where}: every position halts at the same step"
            bad = {k: v for k, v in c["grads"].items() if not v <= 1e-12}
            assert not bad, f"{where}: gradients off (relative error): {bad}"
            for phase in ("fwd", "bwd"):
                gathers = {k: c[phase].get(k, 0) for k in GATHERS if c[phase].get(k)}
                assert not gathers, f"{where}: {phase} gathered {gathers} (expert stacks must stay split)"
            # per loop step: counts, rows, results forward; the two reverse exchanges backward; nothing else
            assert c["fwd"] == {"all_to_all_single": 3 * steps}, f"{where}: forward collectives {c['fwd']}"
            assert c["bwd"] == {"all_to_all_single": 2 * steps}, f"{where}: backward collectives {c['bwd']}"
        f32 = r["f32"]
        assert f32["near_tie"], f"rank {rank}, float32: an expert choice differs away from a near tie: {f32}"
        if f32["differ"] == 0:
            assert f32["logits"] <= 1e-5 and f32["counts"], f"rank {rank}, float32: {f32}"
