"""mythos_torch: manifest order, determinism, causality, ACT, MoE, LoRA, LTI, replay, open-mythos parity.

References are independent: float64 NumPy recomputations, naive per-token loops, and open-mythos'
own model (its weights mapped here by hand).
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mythos_torch as mt
import spec as S
from reference import act_reference, naive_moe

DT = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one intra-op thread is fastest and avoids OpenMP spin contention on small CI boxes
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**overrides: object) -> S.Spec:
    return S.load("tiny", overrides=overrides)


@functools.lru_cache(maxsize=None)
def model(dtype: str = "float64", seed: int = 0, spread: float | None = None, halt_bias: float | None = None,
          **overrides: object) -> mt.Mythos:
    """A tiny model. spread: halting weight x40 and its bias centred (plus `spread`) so loop counts vary."""
    s = tiny(**overrides)
    w = S.init_arrays(s, seed)
    if spread is not None:
        w["recurrent.act.halt.weight"] = w["recurrent.act.halt.weight"] * 40.0
        out = run(mt.build(s, seed, "float64", weights=w), ids_for(12345, B=4, T=16), early_exit=False)
        z = float(torch.logit(out.traces.halt_p).mean())
        w["recurrent.act.halt.bias"] = w["recurrent.act.halt.bias"] - z - 1.0 + spread  # p ~ 0.3 on average
    if halt_bias is not None:
        w["recurrent.act.halt.bias"] = np.full(1, halt_bias)
    return mt.build(s, seed, dtype, weights=w)


def ids_for(seed: int, B: int = 2, T: int = 12, V: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, V, (B, T)))


def run(m: mt.Mythos, ids: torch.Tensor, n_loops: int | None = None, **kw: object) -> mt.ModelOutput:
    with torch.no_grad():
        return m(ids, n_loops, **kw)


def report(name: str, a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    print(f"{name}: max {d.max():.3e} mean {d.mean():.3e}")
    return float(d.max())


# ------------------------------------------------------------------------------------- parameters

VARIANTS = [
    {},
    {"attention.type": "mla"},
    {"recurrent.ffn": "dense", "halting.head": "mlp"},
    {"tie_embeddings": False, "recurrent.lora_rank": 0, "recurrent.loop_embedding.enabled": False},
    {"moe.n_shared_experts": 2, "prelude_layers": 2, "coda_layers": 0, "moe.top_k": 4},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
@pytest.mark.parametrize("dtype", list(DT))
def test_registration_order_and_shapes_equal_manifest(overrides, dtype):
    s = tiny(**overrides)
    m = mt.Mythos(s, dtype=DT[dtype])
    man = S.manifest(s)
    shape = {p.path: p.shape for p in man}
    params = [p.path for p in man if p.kind != "buffer"]  # manifest order is torch's traversal order
    buffers = [p.path for p in man if p.kind == "buffer"]
    assert [(n, tuple(t.shape)) for n, t in m.named_parameters()] == [(p, shape[p]) for p in params]
    persistent = [(n, tuple(t.shape)) for n, t in m.named_buffers() if n in m.state_dict()]
    assert persistent == [(p, shape[p]) for p in buffers]
    assert sorted(m.state_dict()) == sorted(p.path for p in man)  # RoPE tables are non-persistent
    for n, t in m.state_dict().items():
        want = torch.float32 if n.endswith("router_bias") and dtype == "bfloat16" else DT[dtype]
        assert t.dtype == want, n


def test_build_is_deterministic_per_seed_and_equals_init_arrays():
    s = tiny()
    a, b, c = (mt.dump_arrays(mt.build(s, seed, "float64")) for seed in (1, 1, 2))
    init = S.init_arrays(s, 1)
    assert list(a) == [p.path for p in S.manifest(s)]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], init[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a if k != "recurrent.block.ffn.router_bias")
    f32 = mt.dump_arrays(mt.build(s, 1, "float32"))
    assert all(np.array_equal(f32[k], init[k].astype(np.float32)) for k in init)


def test_bfloat16_dump_is_exact_and_round_trips():
    s = tiny()
    m = mt.build(s, 3, "bfloat16")
    d = mt.dump_arrays(m)
    init = S.init_arrays(s, 3)
    assert d["embed.weight"].dtype == ml_dtypes.bfloat16
    assert d["recurrent.block.ffn.router_bias"].dtype == np.float32
    assert np.array_equal(d["embed.weight"].view(np.uint16), init["embed.weight"].astype(ml_dtypes.bfloat16).view(np.uint16))
    m2 = mt.Mythos(s, dtype=torch.bfloat16)
    mt.load_arrays(m2, d)
    for k, v in mt.dump_arrays(m2).items():
        assert np.array_equal(v.view(np.uint8), d[k].view(np.uint8)), k


def test_load_arrays_reports_every_problem_at_once():
    s = tiny()
    w = S.init_arrays(s, 0)
    del w["norm.weight"]
    w["recurrent.lora.B"] = np.zeros((3, 3))
    w["bogus"] = np.zeros(1)
    with pytest.raises(ValueError) as err:
        mt.build(s, weights=w)
    msg = str(err.value)
    assert "3 problem" in msg and "'norm.weight'" in msg and "recurrent.lora.B" in msg and "'bogus'" in msg


# ------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_every_dtype_runs(dtype, attn):
    m = model(dtype, **{"attention.type": attn})
    out = run(m, ids_for(0))
    N = m.spec.recurrent.max_loop_iters
    acc = torch.float64 if dtype == "float64" else torch.float32
    assert out.logits.shape == (2, 12, 64) and out.logits.dtype == DT[dtype]
    assert torch.isfinite(out.logits.float()).all()
    assert out.loop_counts.dtype == torch.int32 and out.halted.dtype == torch.bool
    tr = out.traces
    assert tr.state_norm.shape == (N, 2, 12) and tr.state_norm.dtype == DT[dtype]
    assert tr.halt_p.dtype == tr.cum_p.dtype == tr.router_margin.dtype == acc
    assert tr.running.dtype == torch.bool
    assert tr.expert_idx.shape == (N, 2, 12, 2) and tr.expert_idx.dtype == torch.int32
    assert torch.equal(mt.forward(m, ids_for(0)).logits, out.logits)


def test_bfloat16_follows_float32_under_replayed_decisions():
    ids = ids_for(5)
    ref = run(model("float32"), ids)
    forced = torch.where(ref.halted, ref.loop_counts, 0)
    out = run(model("bfloat16"), ids, force_halt=forced, force_experts=ref.traces.expert_idx)
    assert report("bf16 vs f32 logits", out.logits.float(), ref.logits) < 2e-2
    assert torch.equal(out.loop_counts, ref.loop_counts)


def test_ids_of_any_integer_dtype():
    m = model()
    ids = ids_for(1)
    ref = run(m, ids).logits
    for dt in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(run(m, ids.to(dt)).logits, ref)


@given(seed=st.integers(0, 2**16), j=st.integers(1, 11), attn=st.sampled_from(["gqa", "mla"]))
def test_causality(seed, j, attn):
    m = model(spread=0.0, **{"attention.type": attn})
    ids = ids_for(seed)
    other = ids.clone()
    other[:, j] = (other[:, j] + 1 + seed % 63) % 64
    a, b = run(m, ids), run(m, other)
    assert torch.allclose(a.logits[:, :j], b.logits[:, :j], rtol=0, atol=1e-12)
    assert torch.equal(a.loop_counts[:, :j], b.loop_counts[:, :j])


def test_backward_reaches_every_parameter():
    m = mt.build(tiny(**{"attention.type": "mla"}), 0, "float64")
    for early_exit in (True, False):
        m.zero_grad(set_to_none=True)
        out = m(ids_for(3), 3, early_exit=early_exit)
        (out.logits.square().mean() + out.traces.state_norm.mean()).backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert m.recurrent.block.ffn.experts.gate.grad.abs().sum() > 0


def test_n_loops_accepts_numpy_integers():
    assert run(model(), ids_for(0), np.int64(2)).traces.halt_p.shape[0] == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_n_loops_below_one_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="n_loops"):
        run(model(), ids_for(0), bad)


def test_bad_inputs_are_clear_errors():
    m = model()
    with pytest.raises(ValueError, match="vocab_size"):
        run(m, torch.full((1, 4), 64))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        run(m, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        run(m, torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        run(m, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="force_halt"):
        run(m, ids_for(0), 2, force_halt=torch.full((2, 12), 3))
    with pytest.raises(ValueError, match="force_experts"):
        run(m, ids_for(0), 2, force_experts=torch.zeros(3, 2, 12, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="experts in 0..3"):
        run(m, ids_for(0), 2, force_experts=torch.full((2, 2, 12, 2), 4))
    with pytest.raises(ValueError, match="-1: not forced"):
        run(m, ids_for(0), 2, force_experts=torch.full((2, 2, 12, 2), -2))
    with pytest.raises(ValueError, match="float16"):
        mt.build(tiny(), dtype="float16")


# ------------------------------------------------------------------------------------- ACT



@given(p=st.lists(st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5), min_size=1, max_size=6),
       threshold=st.sampled_from([0.5, 0.99, 1.0]), graves=st.booleans())
def test_act_step_equals_reference_and_graves_weights_sum_to_one(p, threshold, graves):
    p = np.array(p, dtype=np.float64)
    N = p.shape[0]
    w_ref, c_ref, run_ref, counts_ref, halted_ref = act_reference(p, threshold, graves, N)
    c, running = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.bool)
    total = torch.zeros(5, dtype=torch.float64)
    counts = torch.full((5,), N)
    for t in range(N):
        assert torch.equal(running, torch.from_numpy(run_ref[t]))
        w, c, running, halts = mt.act_step(torch.from_numpy(p[t]), c, running, threshold, graves and t == N - 1)
        np.testing.assert_array_equal(w.numpy(), w_ref[t])
        np.testing.assert_array_equal(c.numpy(), c_ref[t])
        total += w
        counts = torch.where(halts, t + 1, counts)
    assert ((1 <= counts) & (counts <= N)).all()
    np.testing.assert_array_equal(counts.numpy(), counts_ref)
    if graves:
        np.testing.assert_allclose(total.numpy(), 1.0, rtol=0, atol=1e-12)
    else:
        assert (total.numpy() <= 1.0 + 1e-12).all()


def capture_states(m: mt.Mythos, ids: torch.Tensor, n_loops: int, **kw: object
                   ) -> tuple[mt.ModelOutput, list[torch.Tensor], torch.Tensor]:
    """Forward with hooks: the new state h_t of every executed step and the ACT output y."""
    states: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    h1 = m.recurrent.register_forward_hook(lambda mod, args, out: states.append(out[0]))
    h2 = m.coda[0].register_forward_pre_hook(lambda mod, args: ys.append(args[0]))
    try:
        out = run(m, ids, n_loops, **kw)
    finally:
        h1.remove()
        h2.remove()
    return out, states, ys[0]


@given(seed=st.integers(0, 2**16), n_loops=st.integers(1, 6), remainder=st.sampled_from(["graves", "openmythos"]),
       shift=st.sampled_from([0.0, 1.5, -2.0]))
def test_act_output_equals_float64_recomputation_from_traces(seed, n_loops, remainder, shift):
    m = model(spread=shift, **{"halting.remainder": remainder})
    graves = remainder == "graves"
    out, states, y = capture_states(m, ids_for(seed), n_loops)
    tr = out.traces
    n = out.n_steps
    assert len(states) == n and 1 <= n <= n_loops
    p = tr.halt_p[:n].reshape(n, -1).numpy()
    w, c_after, run_before, counts, halted = act_reference(p, 0.99, graves, n_loops)
    np.testing.assert_array_equal(tr.running[:n].reshape(n, -1).numpy(), run_before)
    np.testing.assert_array_equal(tr.cum_p[:n].reshape(n, -1).numpy(), c_after)
    np.testing.assert_array_equal(out.loop_counts.reshape(-1).numpy(), counts)
    np.testing.assert_array_equal(out.halted.reshape(-1).numpy(), halted)
    assert ((1 <= counts) & (counts <= n_loops)).all()
    h = torch.stack(states).reshape(n, -1, m.spec.dim).numpy()
    y_ref = np.einsum("tp,tpd->pd", w, h)
    assert report("ACT y", y.reshape(-1, m.spec.dim), y_ref) < 1e-12
    if graves:
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=0, atol=1e-12)
        assert out.halted.all()
    else:
        assert (w.sum(0) <= 1.0 + 1e-12).all()
        assert np.all(w.sum(0)[~halted] < 1.0)


@given(seed=st.integers(0, 2**16), n_loops=st.integers(1, 7), remainder=st.sampled_from(["graves", "openmythos"]),
       attn=st.sampled_from(["gqa", "mla"]))
def test_early_exit_equals_running_all_steps(seed, n_loops, remainder, attn):
    m = model(spread=0.0, **{"halting.remainder": remainder, "attention.type": attn})
    ids = ids_for(seed)
    a, b = run(m, ids, n_loops, early_exit=True), run(m, ids, n_loops, early_exit=False)
    assert b.n_steps == n_loops and a.n_steps <= n_loops
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loop_counts, b.loop_counts) and torch.equal(a.halted, b.halted)
    n = a.n_steps
    for name, x, y in zip(a.traces._fields, a.traces, b.traces):
        assert (x is None and y is None) if x is None else torch.equal(x[:n], y[:n]), name  # None: option off


def test_trace_fill_values_for_steps_not_run():
    m = model(halt_bias=5.0)  # p ~ 1: everything halts at step 1
    out = run(m, ids_for(0), 6)
    assert out.n_steps == 1 and (out.loop_counts == 1).all()
    tr = out.traces
    assert (tr.state_norm[1:] == 0).all() and (tr.halt_p[1:] == 0).all() and (tr.cum_p[1:] == 0).all()
    assert not tr.running[1:].any() and (tr.expert_idx[1:] == -1).all() and torch.isinf(tr.router_margin[1:]).all()
    assert tr.running[0].all() and (tr.expert_idx[0] >= 0).all()


@pytest.mark.parametrize("remainder", ["graves", "openmythos"])
@pytest.mark.parametrize("early_exit", [True, False])
def test_force_replay_reproduces_the_unforced_run(remainder, early_exit):
    m = model(spread=0.0, **{"halting.remainder": remainder})
    ids = ids_for(7, B=3)
    ref = run(m, ids, 5, early_exit=early_exit)
    assert len(set(ref.loop_counts.flatten().tolist())) > 1  # the replay is not trivial
    forced = torch.where(ref.halted, ref.loop_counts, 0)
    out = run(m, ids, 5, early_exit=early_exit, force_halt=forced, force_experts=ref.traces.expert_idx)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loop_counts, ref.loop_counts) and torch.equal(out.halted, ref.halted)
    for name, x, y in zip(ref.traces._fields, ref.traces, out.traces):
        assert (x is None and y is None) if x is None else torch.equal(x, y), name  # None: option off
    # -1 (the fill of steps not run) means "not forced": an early-exit trace replays into a full run
    full = run(m, ids, 5, early_exit=False)
    again = run(m, ids, 5, early_exit=False, force_experts=run(m, ids, 5).traces.expert_idx)
    assert torch.equal(again.logits, full.logits) and torch.equal(again.traces.expert_idx, full.traces.expert_idx)
    # forcing something else changes the run
    one = run(m, ids, 5, early_exit=early_exit, force_halt=torch.ones(3, 12, dtype=torch.long))
    assert (one.loop_counts == 1).all() and one.halted.all()
    other = ref.traces.expert_idx.flip(-1)  # same experts, other slot order: weights follow the experts
    assert torch.allclose(run(m, ids, 5, early_exit=early_exit, force_experts=other).logits, ref.logits,
                          rtol=0, atol=1e-12)
    shifted = (ref.traces.expert_idx + 1).clamp(max=3)
    assert not torch.allclose(run(m, ids, 5, early_exit=early_exit, force_experts=shifted).logits, ref.logits)


def test_dense_recurrent_ffn_has_empty_expert_traces():
    m = model(**{"recurrent.ffn": "dense"})
    out = run(m, ids_for(0), 3)
    assert out.traces.expert_idx.shape == (3, 2, 12, 0)
    assert torch.isinf(out.traces.router_margin).all()
    with pytest.raises(ValueError, match="dense"):
        mt.update_router_bias(m, torch.zeros(4))


# ------------------------------------------------------------------------------------- MoE



@given(seed=st.integers(0, 2**16), n_experts=st.integers(1, 6), top_k=st.integers(1, 6), n_shared=st.integers(0, 2),
       tokens=st.integers(1, 9), forced=st.booleans())
def test_moe_dispatch_equals_naive_per_token_loop(seed, n_experts, top_k, n_shared, tokens, forced):
    top_k = min(top_k, n_experts)
    rng = np.random.default_rng(seed)
    D, Hd = 8, 5
    moe = mt.MoE(D, S.MoESpec(n_experts=n_experts, n_shared_experts=n_shared, top_k=top_k, expert_dim=Hd),
                 dtype=torch.float64)
    arrays = {"router": rng.normal(size=(n_experts, D)), "bias": rng.normal(size=n_experts) * 0.3,
              "gate": rng.normal(size=(n_experts, D, Hd)), "up": rng.normal(size=(n_experts, D, Hd)),
              "down": rng.normal(size=(n_experts, Hd, D))}
    with torch.no_grad():
        moe.router.weight.copy_(torch.from_numpy(arrays["router"]))
        moe.router_bias.copy_(torch.from_numpy(arrays["bias"]))
        for n in ("gate", "up", "down"):
            getattr(moe.experts, n).copy_(torch.from_numpy(arrays[n]))
        for j, sh in enumerate(moe.shared_experts):
            for n in ("gate", "up", "down"):
                arrays[f"shared.{j}.{n}"] = rng.normal(size=tuple(getattr(sh, n).weight.shape))
                getattr(sh, n).weight.copy_(torch.from_numpy(arrays[f"shared.{j}.{n}"]))
    x = rng.normal(size=(tokens, D))
    force = rng.integers(0, n_experts, (tokens, top_k)) if forced else None
    ref, chosen = naive_moe(x, arrays, top_k, n_shared, force)
    with torch.no_grad():
        out, idx, margin = moe(torch.from_numpy(x)[None], None if force is None else torch.from_numpy(force)[None])
    assert report("MoE vs naive", out[0], ref) < 1e-10
    np.testing.assert_array_equal(idx[0].numpy(), chosen)
    assert idx.dtype == torch.int32
    biased = np.sort(x @ arrays["router"].T + arrays["bias"], axis=-1)[:, ::-1]
    want = biased[:, top_k - 1] - biased[:, top_k] if top_k < n_experts else np.full(tokens, np.inf)
    np.testing.assert_allclose(margin[0].numpy(), want, rtol=0, atol=1e-12)


def test_router_ties_go_to_the_lower_expert_index():
    logits = torch.zeros(3, 7, dtype=torch.float64)  # zero router weights: every logit ties
    idx, w, margin = mt.route(logits, torch.zeros(7, dtype=torch.float64), 3)
    assert idx.tolist() == [[0, 1, 2]] * 3 and torch.allclose(w, torch.full_like(w, 1 / 3))
    assert (margin == 0).all()
    idx, _, _ = mt.route(logits, torch.tensor([0.0, 1.0, 0.5, 1.0, 0.5, 0.0, 1.0], dtype=torch.float64), 4)
    assert idx.tolist() == [[1, 3, 6, 2]] * 3
    # in the model: zero router weights make every token choose experts 0..k-1
    s = tiny()
    w0 = S.init_arrays(s, 0)
    w0["recurrent.block.ffn.router.weight"] = np.zeros_like(w0["recurrent.block.ffn.router.weight"])
    out = run(mt.build(s, weights=w0), ids_for(0), 3)
    n = out.n_steps
    assert (out.traces.expert_idx[:n] == torch.tensor([0, 1], dtype=torch.int32)).all()


def test_expert_load_counts_entries_of_running_positions():
    out = run(model(spread=0.0), ids_for(2, B=3), 4, early_exit=False)
    tr = out.traces
    load = mt.expert_load(tr.expert_idx, tr.running, 4)
    ref = np.zeros(4, dtype=np.int64)
    for t, b, i in zip(*np.nonzero(tr.running.numpy())):
        for e in tr.expert_idx[t, b, i].tolist():
            ref[e] += 1
    assert load.dtype == torch.int32
    np.testing.assert_array_equal(load.numpy(), ref)
    assert int(load.sum()) == int(tr.running.sum()) * 2


def test_update_router_bias_moves_toward_under_loaded_experts():
    s = tiny(**{"moe.bias_update_rate": 0.5})
    m = mt.build(s, 4, "float64")
    ids = ids_for(4, B=4)
    before = run(m, ids, early_exit=False)
    load = mt.expert_load(before.traces.expert_idx, before.traces.running, 4)
    mt.update_router_bias(m, load)
    bias = m.recurrent.block.ffn.router_bias
    lf = load.double()
    np.testing.assert_array_equal(bias.numpy(), 0.5 * np.sign(lf.mean().item() - lf.numpy()))
    after = run(m, ids, early_exit=False)
    load2 = mt.expert_load(after.traces.expert_idx, after.traces.running, 4)
    under = lf < lf.mean()
    assert under.any() and (load2[under] > load[under]).all()
    # bfloat16 model: the bias stays float32
    mb = mt.build(s, 4, "bfloat16")
    mt.update_router_bias(mb, load)
    assert mb.recurrent.block.ffn.router_bias.dtype == torch.float32
    assert torch.equal(mb.recurrent.block.ffn.router_bias, bias.float())


# ------------------------------------------------------------------------------------- LoRA, LTI, loop embedding


def test_lora_index_clamp_uses_the_last_scale_row():
    rng = np.random.default_rng(0)
    lora = mt.LoRA(6, 3, 4, dtype=torch.float64)
    down, B, scale = rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(4, 3))
    with torch.no_grad():
        lora.down.weight.copy_(torch.from_numpy(down))
        lora.B.copy_(torch.from_numpy(B))
        lora.scale.copy_(torch.from_numpy(scale))
    o = rng.normal(size=(2, 5, 6))
    for t in range(7):
        ref = ((o @ down.T) * scale[min(t, 3)]) @ B
        with torch.no_grad():
            np.testing.assert_allclose(lora(torch.from_numpy(o), t).numpy(), ref, rtol=0, atol=1e-12)
    # in the model: steps beyond max_loop_iters run, and changing only the last scale row changes them
    m = model()
    N = m.spec.recurrent.max_loop_iters
    ids = ids_for(0)
    a = run(m, ids, N + 2, force_halt=torch.zeros(2, 12, dtype=torch.long))
    w = mt.dump_arrays(m)
    w["recurrent.lora.scale"] = w["recurrent.lora.scale"].copy()
    w["recurrent.lora.scale"][-1] += 1.0
    b = run(mt.build(m.spec, dtype="float64", weights=w), ids, N + 2, force_halt=torch.zeros(2, 12, dtype=torch.long))
    assert a.n_steps == N + 2 and not torch.allclose(a.logits, b.logits)
    c = run(m, ids, N - 1, force_halt=torch.zeros(2, 12, dtype=torch.long))
    d = run(mt.build(m.spec, dtype="float64", weights=w), ids, N - 1, force_halt=torch.zeros(2, 12, dtype=torch.long))
    assert torch.equal(c.logits, d.logits)  # the last row is used only from step N on


BIG = float(np.float32(3e38))  # near float32's largest; the sum log_dt + log_A overflows to +-inf


@given(log_A=st.lists(st.floats(-BIG, BIG, width=32), min_size=4, max_size=4),
       log_dt=st.floats(-BIG, BIG, width=32), dtype=st.sampled_from(list(DT)))
def test_lti_decay_is_strictly_inside_zero_one(log_A, log_dt, dtype):
    inj = mt.LTIInjection(4, dtype=DT[dtype])
    with torch.no_grad():
        inj.log_A.copy_(torch.tensor(log_A, dtype=torch.float64))
        inj.log_dt.fill_(log_dt)
        A = inj.decay()
    assert A.dtype == DT[dtype]
    assert ((A > 0) & (A < 1)).all(), A
    z = np.clip(inj.log_dt.detach().double().numpy() + inj.log_A.detach().double().numpy(), -20, 20)
    if dtype == "float64" and np.all(np.abs(z) < 5):  # the plain formula wherever it is representable
        np.testing.assert_allclose(A.numpy(), np.exp(-np.exp(z)), rtol=1e-15)


@pytest.mark.parametrize("semantics", ["mythos", "openmythos-0.5"])
def test_loop_embedding_rows_and_placement(semantics):
    s = tiny(semantics=semantics, **({"halting.remainder": "openmythos"} if semantics != "mythos" else {}))
    L = s.loop_dim
    t = 3
    w = 10000.0 ** (-np.arange(0, L, 2) / L)
    row = np.concatenate([np.sin(t * w), np.cos(t * w)])
    table = S.loop_table(s, 5, "float64")
    np.testing.assert_allclose(table[t], row, rtol=0, atol=1e-14)
    h = torch.zeros(1, 1, s.dim, dtype=torch.float64)
    out = mt.add_loop_embedding(h, torch.from_numpy(table[t]))[0, 0].numpy()
    np.testing.assert_array_equal(out[:L], table[t])
    assert (out[L:] == 0).all()


# ------------------------------------------------------------------------------------- open-mythos


def open_mythos_arrays(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """open-mythos' state dict -> our manifest arrays (torch layout), by hand."""
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for k, v in sd.items():
        if k.startswith("freqs_cis") or k == "head.weight":  # RoPE tables; the head is tied to embed
            continue
        a = v.detach().double().numpy()
        if ".routed_experts." in k:  # routed_experts.{e}.gate.weight (h, d) -> experts.gate[e] (d, h)
            prefix, rest = k.split(".routed_experts.")
            e, name, _ = rest.split(".")
            experts.setdefault(f"{prefix}.experts.{name}", {})[int(e)] = a.T
        elif k == "recurrent.lora.scale.weight":  # an nn.Embedding there, a plain parameter here
            out["recurrent.lora.scale"] = a
        else:
            out[k] = a
    for k, per in experts.items():
        out[k] = np.stack([per[e] for e in sorted(per)])
    return out


OM_SHAPE = dict(vocab_size=64, dim=32, max_seq_len=32, prelude_layers=1, coda_layers=2)
OM_ATTN = dict(n_heads=4, n_kv_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
               v_head_dim=8)
OM_MOE = dict(n_experts=5, n_shared_experts=1, top_k=2, expert_dim=16)


@pytest.mark.interop
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_logits_and_loop_counts_equal_open_mythos(attn, dtype):
    om_main = pytest.importorskip("open_mythos.main")
    N = 4
    cfg = om_main.MythosConfig(**OM_SHAPE, **OM_ATTN, attn_type=attn, max_loop_iters=N, lora_rank=4,
                               n_experts=OM_MOE["n_experts"], n_shared_experts=OM_MOE["n_shared_experts"],
                               n_experts_per_tok=OM_MOE["top_k"], expert_dim=OM_MOE["expert_dim"])
    torch.manual_seed(0)
    om = om_main.OpenMythos(cfg).eval()
    probs: list[torch.Tensor] = []
    om.recurrent.act.register_forward_hook(lambda mod, args, out: probs.append(out.detach().clone()))
    with torch.no_grad():  # spread the halting probabilities so positions halt at different steps
        om.recurrent.block.ffn.router_bias.copy_(torch.randn(OM_MOE["n_experts"]) * 0.05)
        om.recurrent.act.halt.weight.mul_(40.0)
        om(torch.from_numpy(np.random.default_rng(99).integers(0, 64, (4, 16))), n_loops=N)
        om.recurrent.act.halt.bias.sub_(torch.logit(torch.stack(probs)).mean() + 1.0)  # p ~ 0.3 on average
    s = S.load({"semantics": "openmythos-0.5", **OM_SHAPE, "attention": {"type": attn, **OM_ATTN},
                "recurrent": {"max_loop_iters": N, "lora_rank": 4}, "moe": OM_MOE})
    ours = mt.build(s, dtype=dtype, weights=open_mythos_arrays(om.state_dict()))
    # float64: both rotate in float32, where NumPy's cos/sin table and torch's vectorised complex
    # multiply differ from ours by 1 ulp in some entries (see test_openmythos_rope_...), ~1e-11 here
    tol = 1e-5 if dtype == "float32" else 1e-10
    om = om.double() if dtype == "float64" else om  # its RoPE tables stay complex64
    seen = set()
    for n_loops in (1, 3, N, N + 2):  # N + 2: beyond training depth (LoRA index clamp)
        ids = torch.from_numpy(np.random.default_rng(n_loops).integers(0, 64, (3, 16)))
        probs.clear()
        with torch.no_grad():
            ref = om(ids, n_loops=n_loops)
        out = run(ours, ids, n_loops)
        assert report(f"{attn} {dtype} n_loops={n_loops} logits vs open-mythos", out.logits, ref) < tol
        # loop counts implied by open-mythos' own halting probabilities, recomputed in their dtype
        p = torch.stack(probs).reshape(len(probs), -1).numpy()
        _, _, _, counts, halted = act_reference(p, 0.99, graves=False, n_loops=n_loops)
        assert len(probs) == out.n_steps
        np.testing.assert_array_equal(out.loop_counts.reshape(-1).numpy(), counts)
        np.testing.assert_array_equal(out.halted.reshape(-1).numpy(), halted)
        seen |= set(zip(counts.tolist(), halted.tolist()))
    print(f"{attn}: (count, halted) pairs seen: {sorted(seen)}")
    assert len(seen) >= 3  # several halting steps and never-halted positions were exercised


@pytest.mark.interop
def test_openmythos_rope_rotates_in_float32_even_in_a_float64_model():
    om_main = pytest.importorskip("open_mythos.main")
    s = tiny(semantics="openmythos-0.5", **{"halting.remainder": "openmythos"})
    m = mt.Mythos(s, dtype=torch.float64)
    assert m.rope_cos.dtype == m.rope_sin.dtype == torch.float32
    freqs = om_main.precompute_rope_freqs(s.rope_dim, s.max_seq_len, s.rope_theta)
    ulp = 2.0**-23
    assert report("rope table vs torch.polar", m.rope_cos, freqs.real) <= ulp
    assert report("rope table vs torch.polar", m.rope_sin, freqs.imag) <= ulp
    x = torch.randn(3, 16, 4, s.rope_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = mt.apply_rope(x, m.rope_cos[:16], m.rope_sin[:16])
    ref = om_main.apply_rope(x, freqs[:16])
    assert ours.dtype == torch.float64 and torch.equal(ours, ours.float().double())  # rotated in float32
    assert report("rotation vs open-mythos", ours, ref) <= 4 * ulp * x.abs().max().item()
    assert (ours == ref).double().mean() > 0.5
