"""The science knobs of issue #14 (docs/semantics.md "Readout modes, NoPE and the attention window"):
attention.rope (NoPE), attention.window, halting.mode act | last | ponder, step-wise logits and the PonderNet
loss. The twins agree (float64, 1e-10; counts and halted identical) on a sampled subset of mode x rope x
window x attention type (with the loop embedding and depth LoRA off in some); each mode's readout equals an
independent computation (step_logits, a shorter run, a NumPy PonderNet); a window hides exactly the keys
outside it, also in cached decoding; NoPE is the rope model with identity tables; the optimizer steps of
both twins agree for mode last and ponder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mythos_jax as mj
import mythos_torch as mt
import spec as S
from helpers import ids_for, spread_halting
from mythos_jax import train as JT
from mythos_torch import train as TT
from mythos_torch.attention import causal_attention
from mythos_torch.losses import ponder_distribution, total_loss
from spec.training import TrainConfig

TOL = 1e-10


def knobs(mode: str = "act", rope: bool = True, window: int | None = None, attn: str = "gqa", **extra) -> S.Spec:
    """The tiny preset with the knobs set (and any further dotted overrides)."""
    o = {"halting.mode": mode, "attention.rope": rope, "attention.window": window, "attention.type": attn, **extra}
    return S.load("tiny", overrides=o)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))


def torch_run(s: S.Spec, w, ids, n_loops=None, **kw):
    with torch.no_grad():
        return mt.build(s, 0, "float64", weights=w)(torch.from_numpy(ids), n_loops, **kw)


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize("field, value, words", [
    ("attention.window", 0, "attention.window=0"),
    ("attention.window", -3, "attention.window=-3"),
    ("halting.ponder_lambda", 1.0, "halting.ponder_lambda=1.0"),
    ("halting.ponder_lambda", 0.0, "halting.ponder_lambda=0.0"),
    ("halting.ponder_beta", -0.1, "halting.ponder_beta=-0.1"),
    ("halting.mode", "foo", "halting.mode='foo'"),
    ("attention.rope", "no", "attention.rope='no'"),
])
def test_bad_knobs_are_spec_errors_naming_the_field(field, value, words):
    with pytest.raises(S.SpecError, match=words.replace(".", r"\.").replace("(", r"\(")):
        S.load("tiny", overrides={field: value})


@pytest.mark.parametrize("field, value", [("attention.rope", False), ("attention.window", 4), ("halting.mode", "last")])
def test_openmythos_semantics_fixes_the_knobs(field, value):
    with pytest.raises(S.SpecError, match=f"{field}.*conflicts with semantics=openmythos-0.5"):
        S.load("tiny", overrides={"semantics": "openmythos-0.5", "moe.n_shared_experts": 1, field: value})


def test_defaults_and_round_trip():
    s = S.preset("tiny")
    assert (s.attention.rope, s.attention.window, s.halting.mode) == (True, None, "act")
    assert (s.halting.ponder_lambda, s.halting.ponder_beta) == (0.2, 0.01)
    k = knobs("ponder", False, 3, **{"halting.ponder_lambda": 0.3, "halting.ponder_beta": 0.5})
    assert S.load(S.dump(k)) == k


def test_nope_tables_are_the_identity_rotation_and_the_rope_model_with_them():
    s = knobs(rope=False)
    cos, sin = S.rope_table(s, 9)
    assert cos.shape == (9, s.rope_dim // 2) and (cos == 1).all() and (sin == 0).all()
    ids = ids_for(1, 2, 12)
    nope = mt.build(s, 0, "float64")
    rope = mt.build(knobs(rope=True), 0, "float64")
    assert not torch.equal(rope.rope_sin, nope.rope_sin)
    with torch.no_grad():
        base = rope(torch.from_numpy(ids)).logits
        rope.rope_cos.fill_(1.0)
        rope.rope_sin.zero_()
        a, b = nope(torch.from_numpy(ids)), rope(torch.from_numpy(ids))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loop_counts, b.loop_counts)
    assert not torch.allclose(base, a.logits)  # positions did matter with RoPE on


# --------------------------------------------------------------------------- twins

# a sampled subset of mode x rope x window x attention type (x left padding), with the loop embedding / LoRA
# off in some; the default tier runs the first four (each JAX compile costs seconds), -m slow the rest
SLOW = pytest.mark.slow
COMBOS = [
    ("last", False, 2, "gqa", {"recurrent.loop_embedding.enabled": False, "recurrent.lora_rank": 0,
                               "recurrent.block_residual": False}, False),  # the depth-extrapolation recipe
    ("ponder", True, 2, "mla", {"recurrent.loop_embedding.enabled": False}, True),
    ("ponder", False, None, "gqa", {"recurrent.lora_rank": 0}, False),
    ("act", False, 3, "gqa", {}, True),
    pytest.param("act", True, None, "mla", {}, False, marks=SLOW),
    pytest.param("last", True, None, "mla", {"recurrent.lora_rank": 0}, True, marks=SLOW),
    pytest.param("last", True, 3, "gqa", {}, False, marks=SLOW),
    pytest.param("ponder", False, 2, "gqa", {"recurrent.loop_embedding.enabled": False, "recurrent.lora_rank": 0},
                 True, marks=SLOW),
    pytest.param("ponder", True, 2, "gqa", {"recurrent.ffn": "dense"}, False, marks=SLOW),
]


def _combo_id(c) -> str:
    mode, rope, window, attn, extra, padded = c.values if hasattr(c, "values") else c
    off = "".join(f"-no_{k.split('.')[1]}" for k in extra if extra[k] in (False, 0)) + \
        "".join(f"-{v}" for v in extra.values() if isinstance(v, str))
    return f"{mode}-{'rope' if rope else 'nope'}-w{window}-{attn}{off}{'-padded' if padded else ''}"


@pytest.mark.parametrize("mode, rope, window, attn, extra, padded", COMBOS, ids=[_combo_id(c) for c in COMBOS])
def test_twins_agree(mode, rope, window, attn, extra, padded):
    s = knobs(mode, rope, window, attn, **{"halting.threshold": 0.6, **extra})
    ids = ids_for(3, 2, 12)
    w = spread_halting(s, ids)
    mask = np.ones((2, 12), dtype=np.int64)
    mask[1, :3] = 0  # left padding in row 1
    for attention_mask in ([mask] if padded else [None]):
        t = torch_run(s, w, ids, 4, step_logits=True, attention_mask=None if attention_mask is None
                      else torch.from_numpy(attention_mask))
        j = mj.forward(mj.build(s, 0, "float64", weights=w), ids, 4, step_logits=True,
                       attention_mask=attention_mask)
        assert int(t.n_steps) == int(j.n_steps)
        np.testing.assert_array_equal(t.loop_counts.numpy(), np.asarray(j.loop_counts))
        np.testing.assert_array_equal(t.halted.numpy(), np.asarray(j.halted))
        np.testing.assert_array_equal(t.traces.running.numpy(), np.asarray(j.traces.running))
        real = np.ones((2, 12), bool) if attention_mask is None else attention_mask.astype(bool)
        assert rel(t.logits.numpy()[real], np.asarray(j.logits)[real]) < TOL
        assert rel(t.step_logits.numpy()[:, real], np.asarray(j.step_logits)[:, real]) < TOL
        assert rel(t.traces.cum_p.numpy(), np.asarray(j.traces.cum_p)) < TOL
        assert rel(t.traces.halt_p.numpy(), np.asarray(j.traces.halt_p)) < TOL
    if mode == "ponder":  # the halting spread: the comparison covered more than one loop count
        assert len(np.unique(t.loop_counts.numpy()[real])) > 1


# --------------------------------------------------------------------------- readouts


def test_act_step_logits_default_none_and_last_step_is_the_state_after_step_n():
    s = knobs("act")
    ids = ids_for(2, 2, 10)
    out = torch_run(s, None, ids)
    assert out.step_logits is None
    # ACT's readout is a mixture: it is not the last state's logits (so the `last` tests below can fail)
    full = torch_run(s, None, ids, early_exit=False, step_logits=True)
    assert not torch.allclose(full.logits, full.step_logits[-1])


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_last_reads_the_state_after_step_n(attn):
    s = knobs("last", attn=attn)
    ids = ids_for(4, 2, 10)
    N = 5
    out = torch_run(s, None, ids, N, step_logits=True)
    assert out.n_steps == N and (out.loop_counts == N).all() and not out.halted.any()
    assert rel(out.logits.numpy(), out.step_logits[-1].numpy()) < 1e-13
    assert out.traces.running.all()
    np.testing.assert_allclose(out.traces.cum_p.numpy(), np.cumsum(out.traces.halt_p.numpy(), 0), rtol=1e-14)
    # a strong independent check: step t's logits are the logits of a run stopped at t
    for t in range(1, N + 1):
        short = torch_run(s, None, ids, t)
        assert rel(short.logits.numpy(), out.step_logits[t - 1].numpy()) < 1e-12, t
    # the threshold and early exit change nothing
    low = torch_run(knobs("last", attn=attn, **{"halting.threshold": 0.01}), None, ids, N)
    assert torch.equal(low.logits, out.logits) and low.n_steps == N


@pytest.mark.parametrize("block_residual", [True, False])
def test_block_residual_adds_the_blocks_input_or_not(block_residual):
    # with the looped block's attention and FFN outputs zeroed, its output is its input n = RMSNorm(h + e): the
    # update is h' = A*h + B*e + n (block_residual) or h' = A*h + B*e (not), computed here in NumPy
    s = knobs("last", **{"recurrent.block_residual": block_residual, "recurrent.ffn": "dense",
                         "recurrent.lora_rank": 0, "recurrent.loop_embedding.enabled": False})
    model = mt.build(s, 0, "float64")
    rec = model.recurrent
    with torch.no_grad():
        rec.block.attn.wo.weight.zero_()
        rec.block.ffn.down.weight.zero_()
        ids = torch.from_numpy(ids_for(5, 2, 8))
        e = model.embed(ids)
        cos, sin = model.rope_cos[:8], model.rope_sin[:8]
        for block in model.prelude:
            e, _, _ = block(e, cos, sin)
        e = e.numpy()
        A, B = rec.injection.decay().numpy(), rec.injection.B.numpy()
        w, eps = rec.norm.weight.numpy(), s.norm_eps
        h = e
        for _ in range(3):
            x = h + e
            n = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
            h = A * h + B * e + (n if block_residual else 0.0)
        out = model(ids, 3)
    norms = np.linalg.norm(h, axis=-1)
    np.testing.assert_allclose(out.traces.state_norm[-1].numpy(), norms, rtol=1e-12)


def test_last_refuses_a_forced_halt_but_takes_the_replay_of_nothing_halting():
    s = knobs("last")
    ids = ids_for(5, 1, 6)
    model = mt.build(s, 0, "float64")
    with pytest.raises(ValueError, match="halting.mode='last'"):
        model(torch.from_numpy(ids), 3, force_halt=torch.full((1, 6), 2))
    a = model(torch.from_numpy(ids), 3, force_halt=torch.zeros(1, 6, dtype=torch.long))
    assert torch.equal(a.logits, model(torch.from_numpy(ids), 3).logits)


def test_ponder_hard_readout_at_the_first_step_past_the_threshold():
    # no coda: its attention would mix positions halted at different steps, so a position's logits are then
    # exactly a function of its own readout y = h_count (with a coda they are not step_logits[count - 1])
    s = knobs("ponder", **{"halting.threshold": 0.6, "coda_layers": 0})
    ids = ids_for(6, 2, 12)
    w = spread_halting(s, ids)
    N = 4
    out = torch_run(s, w, ids, N, step_logits=True, early_exit=False)
    counts = out.loop_counts.numpy()
    assert len(np.unique(counts)) > 1
    lam = out.traces.halt_p.numpy()  # (N, B, T)
    C = 1.0 - np.cumprod(1.0 - lam, 0)  # by hand
    crossed = C >= 0.6
    want = np.where(crossed.any(0), crossed.argmax(0) + 1, N)
    np.testing.assert_array_equal(counts, want)
    np.testing.assert_array_equal(out.halted.numpy(), crossed.any(0))
    # cum_p holds C_t up to the halting step, then keeps it
    steps = np.arange(1, N + 1)[:, None, None]
    np.testing.assert_allclose(out.traces.cum_p.numpy(), np.where(steps <= counts, C, C[counts - 1, np.arange(2)[:, None],
                                                                                         np.arange(12)]), rtol=1e-13)
    sl = out.step_logits.numpy()
    pick = np.take_along_axis(sl, (counts - 1)[None, ..., None], 0)[0]
    # weight 1 at the halting step: that step's logits (the stacked batch may round differently: 1e-13)
    assert rel(out.logits.numpy(), pick) < 1e-13
    # early exit: the same readout, steps not run hold 0 in step_logits
    ee = torch_run(s, w, ids, N, step_logits=True)
    assert torch.equal(ee.logits, out.logits) and ee.n_steps == counts.max()
    assert (ee.step_logits[ee.n_steps:] == 0).all()
    # force_halt replays the decisions
    fh = torch.from_numpy(np.where(out.halted.numpy(), counts, 0))
    rep = torch_run(s, w, ids, N, force_halt=fh)
    assert torch.equal(rep.loop_counts, out.loop_counts) and torch.equal(rep.halted, out.halted)


def test_ponder_distribution_sums_to_one_and_matches_numpy():
    rng = np.random.default_rng(0)
    lam = rng.uniform(0.01, 0.99, (5, 2, 3))
    P = ponder_distribution(torch.from_numpy(lam)).numpy()
    want = np.empty_like(lam)
    for t in range(5):
        surv = np.prod(1.0 - lam[:t], 0)
        want[t] = surv if t == 4 else lam[t] * surv
    np.testing.assert_allclose(P, want, rtol=1e-14)
    np.testing.assert_allclose(P.sum(0), 1.0, rtol=1e-14)
    j = np.asarray(mj.losses.ponder_distribution(mj.losses.jnp.asarray(lam)))
    np.testing.assert_allclose(j, P, rtol=1e-14)


def test_ponder_loss_matches_numpy_from_the_traces_and_step_logits():
    s = knobs("ponder", **{"halting.ponder_lambda": 0.3, "halting.ponder_beta": 0.7})
    ids = ids_for(7, 2, 8)
    w = spread_halting(s, ids)
    targets = ids_for(8, 2, 8)
    mask = np.zeros((2, 8), bool)
    mask[:, 3:] = True
    N = 4
    out = torch_run(s, w, ids, N, step_logits=True, early_exit=False)
    loss, parts = total_loss(s, out, torch.from_numpy(targets), torch.from_numpy(mask))
    lam = out.traces.halt_p.numpy()
    P = np.concatenate([lam[:-1] * np.cumprod(np.concatenate([np.ones_like(lam[:1]), 1 - lam[:-2]]), 0),
                        np.prod(1 - lam[:-1], 0)[None]])
    sl = out.step_logits.numpy()
    logp = sl - sl.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.broadcast_to(targets[None, ..., None], (N, 2, 8, 1)), -1)[..., 0]
    lamp = 0.3
    prior = np.array([lamp * (1 - lamp) ** t for t in range(N - 1)] + [(1 - lamp) ** (N - 1)])
    assert abs(prior.sum() - 1) < 1e-15
    rec = (P * nll).sum(0)[mask].mean()
    kl = (P * (np.log(P) - np.log(prior)[:, None, None])).sum(0)[mask].mean()
    assert abs(float(parts["ce"]) - rec) < 1e-12 * rec
    assert abs(float(parts["ponder_kl"]) - kl) < 1e-12 * max(kl, 1e-12)
    assert abs(float(loss) - (rec + 0.7 * kl)) < 1e-12 * rec
    assert {"ce", "ponder_kl", "ponder", "halting_entropy", "loops"} <= set(parts)
    with pytest.raises(ValueError, match="step_logits=True"):
        total_loss(s, torch_run(s, w, ids, N), torch.from_numpy(targets), torch.from_numpy(mask))


def test_step_logits_refused_with_a_cache():
    s = knobs("last")
    model = mt.build(s, 0, "float64")
    cache = model.init_cache(1, 16, 3)
    with pytest.raises(ValueError, match="step_logits"):
        model(torch.zeros(1, 4, dtype=torch.long), 3, cache=cache, step_logits=True)


# --------------------------------------------------------------------------- the window


@pytest.mark.parametrize("window", [1, 2, 3])
def test_attention_window_hides_exactly_the_keys_outside_it(window):
    rng = np.random.default_rng(window)
    B, T, H, Hkv, K = 1, 7, 4, 2, 8
    q, k, v = (torch.from_numpy(rng.standard_normal((B, T, h, K))) for h in (H, Hkv, Hkv))
    explicit, probs = causal_attention(q, k, v, 0.3, window=window, attn_probs=True)
    base, _ = causal_attention(q, k, v, 0.3, window=window)  # the fused kernel with the window mask
    assert rel(base.numpy(), explicit.numpy()) < 1e-14
    i = 5
    for j in range(T):
        k2, v2 = k.clone(), v.clone()
        k2[:, j] += 1.0
        v2[:, j] += 1.0
        out, _ = causal_attention(q, k2, v2, 0.3, window=window)
        inside = i - window < j <= i
        assert torch.equal(out[:, i], base[:, i]) != inside, (window, j)
        assert (probs[0, :, i, j] > 0).all() == inside
    # a window as wide as the sequence is the plain causal mask
    assert torch.equal(causal_attention(q, k, v, 0.3, window=T)[0], causal_attention(q, k, v, 0.3)[0])


def test_model_window_bounds_the_receptive_field():
    # 1 prelude + 2 loop steps + 1 coda = 4 attention layers of window 2: query i depends on tokens >= i - 4 only
    s = knobs("last", window=2)
    ids = ids_for(9, 1, 12)
    base = torch_run(s, None, ids, 2).logits
    ids2 = ids.copy()
    ids2[0, 3] = (ids2[0, 3] + 1) % s.vocab_size
    out = torch_run(s, None, ids2, 2).logits
    assert torch.equal(out[0, 8:], base[0, 8:])
    assert not torch.allclose(out[0, 3:8], base[0, 3:8])
    full = torch_run(knobs("last"), None, ids2, 2).logits, torch_run(knobs("last"), None, ids, 2).logits
    assert not torch.allclose(full[0][0, 8:], full[1][0, 8:])  # without the window it does reach


@pytest.mark.parametrize("attn, halted_kv", [("gqa", "compute"), ("mla", "compute"), ("gqa", "freeze")])
def test_window_decode_with_a_cache_equals_the_full_forward(attn, halted_kv):
    s = knobs("act", window=3, attn=attn, **{"decode.halted_kv": halted_kv})
    ids = ids_for(10, 2, 11)
    model = mt.build(s, 0, "float64")
    with torch.no_grad():
        full = model(torch.from_numpy(ids), 3, early_exit=halted_kv == "freeze")
        cache = model.init_cache(2, 16, 3)
        parts = [model(torch.from_numpy(ids[:, :5]), 3, cache=cache).logits]
        for p in range(5, 11):
            parts.append(model(torch.from_numpy(ids[:, p:p + 1]), 3, cache=cache, start_pos=p).logits)
    assert rel(full.logits.numpy(), torch.cat(parts, 1).numpy()) < 1e-12


def test_window_decode_twins_agree():
    s = knobs("ponder", window=2, **{"halting.threshold": 0.6})
    ids = ids_for(11, 1, 6)
    t = mt.build(s, 0, "float64").generate(torch.from_numpy(ids), 5, n_loops=3)
    j = mj.build(s, 0, "float64").generate(ids, 5, n_loops=3)
    np.testing.assert_array_equal(np.asarray(t), np.asarray(j))


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("mode", [pytest.param("last", marks=SLOW), "ponder"])  # each compiles a JAX train step
def test_optimizer_steps_agree_between_the_twins(mode):
    from mythos.tasks import get_task, make_batch
    s = knobs(mode, rope=mode == "last", window=3 if mode == "ponder" else None,
              **{"recurrent.loop_embedding.enabled": False, "halting.ponder_beta": 0.5})
    cfg = TrainConfig(steps=4, batch_size=2, lr=3e-3, warmup_steps=1, weight_decay=0.1, grad_clip=1.0, seed=0,
                      dtype="float64")
    tt, jt = TT.Trainer(mt.build(s, 0, "float64"), cfg), JT.Trainer(mj.build(s, 0, "float64"), cfg)
    task = get_task("modadd")
    for step in range(cfg.steps):
        b = make_batch(task, 0, step, 2, (2, 4))
        a, c = TT.train_step(tt, b.ids, b.targets, b.mask, 3), JT.train_step(jt, b.ids, b.targets, b.mask, 3)
        assert abs(a.loss - c.loss) <= TOL * abs(a.loss), (step, a.loss, c.loss)
        assert abs(a.grad_norm - c.grad_norm) <= TOL * a.grad_norm
        assert a.parts["loops"] == c.parts["loops"]
        if mode == "ponder":
            assert abs(a.parts["ponder_kl"] - c.parts["ponder_kl"]) <= TOL * max(abs(a.parts["ponder_kl"]), 1e-12)
    A, B = mt.dump_arrays(tt.model), mj.dump_arrays(jt.model)
    assert max(rel(A[k], B[k]) for k in A) < 1e-9


def test_window_paged_decoding_of_rows_of_different_lengths_equals_their_solo_forwards():
    s = knobs("act", window=2)
    ids = ids_for(12, 2, 10)
    m = mt.build(s, 0, "float64")
    tables = np.array([[0, 1, 2], [3, 4, 5]])
    pool = mt.PagedPool(m, 8, 4, 3)
    with torch.no_grad():
        mt.paged_forward(m, pool, torch.from_numpy(ids[:1, :6]), tables[:1], np.array([0]), 3)
        mt.paged_forward(m, pool, torch.from_numpy(ids[1:, :3]), tables[1:], np.array([0]), 3)
        step = torch.from_numpy(np.array([[ids[0, 6]], [ids[1, 3]]]))
        out = mt.paged_forward(m, pool, step, tables, np.array([6, 3]), 3).logits
        solo = [m(torch.from_numpy(ids[b:b + 1, :n]), 3, early_exit=False).logits[0, -1] for b, n in ((0, 7), (1, 4))]
    for b in range(2):
        assert rel(solo[b].numpy(), out[b, 0].numpy()) < 1e-12


def test_vllm_plugin_refuses_a_window():
    from mythos.vllm_plugin import check_servable
    with pytest.raises(ValueError, match="attention.window"):
        check_servable(knobs(window=2), 2, torch.float32)


@pytest.mark.parametrize("mode", ["last", "ponder"])
def test_while_loop_form_equals_the_eager_loop(mode):
    # loop_form="while" (one torch.while_loop, for torch.export / ONNX) with the new modes and a window
    s = knobs(mode, window=2, **{"halting.threshold": 0.6})
    ids = ids_for(13, 2, 9)
    w = spread_halting(s, ids)
    m = mt.build(s, 0, "float64", weights=w)
    with torch.no_grad():
        a = m(torch.from_numpy(ids), 3)
        m.loop_form = "while"
        b = m(torch.from_numpy(ids), 3)
        with pytest.raises(ValueError, match="step_logits"):
            m(torch.from_numpy(ids), 3, step_logits=True)
    assert torch.equal(a.loop_counts, b.loop_counts) and torch.equal(a.halted, b.halted)
    assert int(a.n_steps) == int(b.n_steps) and rel(a.logits.numpy(), b.logits.numpy()) < 1e-13
