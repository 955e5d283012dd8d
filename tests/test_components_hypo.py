"""The hypothesised components (docs/components.md) held to the core's parity: cross-loop attention, the
context compressor (and its decoding cache), the memory gate, the value head, straight-through halting,
checkpointed loop steps and truncated backprop (no_grad_steps).

Specs come from strategies.COMPONENT_SHAPES (each component alone on the tiny shape, and all at once on an
MLA shape), one input shape each, so every JAX program compiles once; weights and tokens are drawn freely.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings

import mythos_jax as mj
import mythos_torch as mt
import parity
import spec as S
from helpers import to_numpy as _np
from strategies import COMPONENT_INPUT, COMPONENT_SHAPES, component_cases

ALL = COMPONENT_SHAPES["all"]


def _ids(spec: S.Spec, seed: int, shape: tuple[int, int] = COMPONENT_INPUT) -> np.ndarray:
    return parity.make_ids(spec, *shape, seed)


@pytest.fixture(scope="module")
def all_models():
    """Both twins of the all-components spec in float64, seed 3."""
    return mt.build(ALL, 3, "float64"), mj.build(ALL, 3, "float64")


# --------------------------------------------------------------------------- forward parity


@settings(max_examples=12)
@given(case=component_cases())
def test_forward_parity_float64(case):
    """Each component alone and all at once: float64 outputs to 1e-10, identical loop counts and experts."""
    r = parity.compare(case.spec, seed=case.seed, dtype="float64", ids=case.ids, weights=case.weights, replay=False)
    assert r.passed, f"{case}\n{r.failures}"
    assert not r.near_ties and r.downstream == 0, f"{case}: float64 decisions must agree exactly: {r.near_ties}"
    rows = {row.output for row in r.rows}
    if case.spec.value_head.enabled:
        assert {"values", "trace.value"} <= rows, rows
    print(case.shape, {row.output: f"{row.max_abs:.1e}" for row in r.rows if row.kind == "continuous"})


def test_forward_parity_float32_all_components():
    """float32, every component on: within the suite's tolerance, near ties reported and replayed."""
    r = parity.compare(ALL, seed=5, dtype="float32", ids=_ids(ALL, 5))
    assert r.passed, r.failures
    print({row.output: f"{row.max_abs:.1e}" for row in r.rows if row.kind == "continuous"}, "near ties:", r.near_ties)


def test_trace_structure_matches(all_models):
    """Both twins return the same trace keys, shapes and dtypes; attention probabilities on request."""
    tm, jm = all_models
    ids = _ids(ALL, 0)
    to = tm(torch.from_numpy(ids), early_exit=False, attn_probs=True)
    jo = mj.forward(jm, jnp.asarray(ids), early_exit=False, attn_probs=True)
    assert to.traces._fields == jo.traces._fields and to._fields == jo._fields
    assert to._fields[-2:] == ("values", "step_logits") and to.traces._fields[-2:] == ("value", "attn_probs")
    N, (B, T) = ALL.recurrent.max_loop_iters, ids.shape
    for name in to.traces._fields:
        a, b = _np(getattr(to.traces, name)), _np(getattr(jo.traces, name))
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    assert to.traces.attn_probs.shape == (N, B, ALL.attention.n_heads, T, T)
    assert to.values.shape == (B, T) and to.traces.value.shape == (N, B, T)
    p = _np(to.traces.attn_probs)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)  # rows of a softmax
    assert np.all(np.triu(p, 1) == 0)  # causal: no key after the query
    np.testing.assert_allclose(p, _np(jo.traces.attn_probs), atol=1e-12)
    # without the option: none
    assert tm(torch.from_numpy(ids)).traces.attn_probs is None
    off = mt.build(COMPONENT_SHAPES["straight-through"], 0, "float64")(torch.from_numpy(ids))
    assert off.values is None and off.traces.value is None


# --------------------------------------------------------------------------- decoding with the cache


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_decode_with_cache_equals_full_forward(all_models, twin):
    """Prefill and decode in pieces (chunks of 3 complete inside calls and between them): every logit,
    value and value trace equals the full forward's (float64)."""
    tm, jm = all_models
    ids = _ids(ALL, 7)
    N = ALL.recurrent.max_loop_iters
    full = tm(torch.from_numpy(ids), early_exit=False)
    model = tm if twin == "torch" else jm
    cache = model.init_cache(ids.shape[0], 12, N)
    got = []
    for start, T in [(0, 2), (2, 2), (4, 1), (5, 2), (7, 1), (8, 2)]:
        x = ids[:, start:start + T]
        if twin == "torch":
            with torch.no_grad():
                o = mt.forward(tm, torch.from_numpy(x), cache=cache, start_pos=start)
        else:
            o = mj.forward(jm, jnp.asarray(x), cache=cache, start_pos=start)
        cache = o.cache
        got.append((_np(o.logits), _np(o.values), _np(o.traces.value), _np(o.traces.halt_p)))
    for i, name in enumerate(["logits", "values", "trace.value", "trace.halt_p"]):
        a = np.concatenate([g[i] for g in got], axis=-2 if name == "logits" else -1)
        want = _np({"logits": full.logits, "values": full.values, "trace.value": full.traces.value,
                    "trace.halt_p": full.traces.halt_p}[name])
        err = np.abs(a - want).max()
        assert err < 1e-10, f"{twin} {name}: max abs {err:.3e}"
    # the summaries of the 3 complete chunks are cached at every step, later chunks untouched
    summ = _np(cache.arrays["summaries"])
    assert summ.shape == (N, ids.shape[0], 4, ALL.recurrent.compressor.n_summaries, ALL.dim)
    assert np.all(np.abs(summ[:, :, :3]).sum(-1) > 0) and np.all(summ[:, :, 3] == 0)


def test_cache_bytes_include_the_compressor():
    """KVCache.bytes_per_token() equals spec.kv_cache_bytes_per_token at that capacity, with the compressor."""
    s = COMPONENT_SHAPES["compressor"]
    for cap in (10, 12, 64):
        want = S.kv_cache_bytes_per_token(s, "float32", 3, max_len=cap)
        plain = S.kv_cache_bytes_per_token(COMPONENT_SHAPES["value-head"], "float32", 3)
        cp = s.recurrent.compressor
        extra = 3 * (-(-cap // cp.chunk) * cp.n_summaries + cp.chunk) * s.dim * 4  # counted by hand
        assert want["total"] == (plain["total"] * cap + extra) // cap
        for mod in (mt, mj):
            m = mod.build(s, 0, "float32") if mod is mt else nnx.eval_shape(
                lambda: mj.Mythos(s, dtype=jnp.float32, rngs=nnx.Rngs(0)))
            assert m.init_cache(2, cap, 3).bytes_per_token() == want["total"], (mod.__name__, cap)


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("j", [0, 4, 9])
def test_causality_every_option_on(all_models, j):
    """Changing token j changes no logit, value or trace (any field) at a position before j."""
    tm, jm = all_models
    ids = _ids(ALL, 11)
    ids2 = ids.copy()
    ids2[:, j] = (ids2[:, j] + 1 + np.arange(ids.shape[0])) % ALL.vocab_size
    for twin in ("torch", "jax"):
        outs = []
        for x in (ids, ids2):
            if twin == "torch":
                outs.append(tm(torch.from_numpy(x), early_exit=False, attn_probs=True))
            else:
                outs.append(mj.forward(jm, jnp.asarray(x), early_exit=False, attn_probs=True))
        a, b = outs
        assert not np.array_equal(_np(a.logits)[:, j:], _np(b.logits)[:, j:]), "the change must be visible at j"
        np.testing.assert_array_equal(_np(a.logits)[:, :j], _np(b.logits)[:, :j], err_msg=twin)
        np.testing.assert_array_equal(_np(a.values)[:, :j], _np(b.values)[:, :j], err_msg=twin)
        np.testing.assert_array_equal(_np(a.loop_counts)[:, :j], _np(b.loop_counts)[:, :j], err_msg=twin)
        for name in a.traces._fields:
            x, y = _np(getattr(a.traces, name)), _np(getattr(b.traces, name))
            if name == "attn_probs":  # (N, B, H, T, S): query rows before j
                x, y = x[:, :, :, :j], y[:, :, :, :j]
            else:
                x, y = x[:, :, :j], y[:, :, :j]
            np.testing.assert_array_equal(x, y, err_msg=f"{twin} trace.{name}")


# --------------------------------------------------------------------------- gradients


def _loss_weights(spec: S.Spec, ids: np.ndarray, seed: int) -> list[np.ndarray]:
    N, (B, T) = spec.recurrent.max_loop_iters, ids.shape
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in [(B, T, spec.vocab_size), (B, T), (N, B, T), (N, B, T), (N, B, T)]]


def _mix(out, R, as_array) -> object:
    """A scalar mixing logits, values, halt_p, cum_p and the value trace (the last two only with a value head)."""
    tr = out.traces
    parts = [out.logits, tr.halt_p, tr.cum_p] + ([out.values, tr.value] if out.values is not None else [])
    ws = [R[0], R[2], R[4]] + ([R[1], R[3]] if out.values is not None else [])
    return sum((as_array(w) * x).sum() for w, x in zip(ws, parts))


def torch_grads(model: mt.Mythos, ids: np.ndarray, R, no_grad_steps: int = 0) -> dict[str, np.ndarray]:
    model.zero_grad(set_to_none=True)
    out = model(torch.from_numpy(ids), early_exit=False, no_grad_steps=no_grad_steps)
    _mix(out, R, torch.from_numpy).backward()
    return {k: (np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy().copy())
            for k, p in model.named_parameters()}


@nnx.jit
def _jax_grad_state(model: mj.Mythos, ids: jax.Array, R: list[jax.Array], k: jax.Array) -> nnx.State:
    # no_grad_steps traced: one compiled program serves every k
    return nnx.grad(lambda m: _mix(m(ids, early_exit=False, no_grad_steps=k), R, jnp.asarray))(model)


def jax_grads(model: mj.Mythos, spec: S.Spec, ids: np.ndarray, R, no_grad_steps: int = 0) -> dict[str, np.ndarray]:
    g = _jax_grad_state(model, jnp.asarray(ids), [jnp.asarray(r) for r in R], jnp.int32(no_grad_steps))
    holder = mj.build(spec, 0, "float64")
    nnx.update(holder, g)  # the gradients in the model's layout, read back in torch layout by dump_arrays
    return {p.path: v for p, v in zip(S.manifest(spec), mj.dump_arrays(holder).values()) if p.kind != "buffer"}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = np.abs(a).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(b).max())


CKPT = S.load(ALL, overrides={"recurrent.checkpoint": True})


@pytest.fixture(scope="module")
def grads_all(all_models):
    """Gradients on the all-components spec for no_grad_steps 0, 1 and N: torch plain, jax with checkpointed
    loop steps (one compiled program: checkpointing must not change a gradient, so this also checks it)."""
    tm, _ = all_models
    jm = mj.build(CKPT, 3, "float64")
    ids = _ids(ALL, 13)
    R = _loss_weights(ALL, ids, 13)
    return {k: (torch_grads(tm, ids, R, k), jax_grads(jm, CKPT, ids, R, k)) for k in (0, 1, 3)}


@pytest.mark.parametrize("k", [0, 1])
def test_gradient_parity_float64(grads_all, k):
    """Every parameter's gradient agrees to 1e-9 relative (loss: logits, values, halt_p, cum_p, value trace)."""
    tg, jg = grads_all[k]
    assert set(tg) == set(jg)
    errs = {name: _rel(tg[name], jg[name]) for name in tg}
    worst = max(errs, key=errs.get)
    print(f"no_grad_steps={k}: worst {worst} {errs[worst]:.2e}")
    assert errs[worst] < 1e-9, {n: e for n, e in errs.items() if e >= 1e-9}
    comp = [n for n in tg if n.startswith(("recurrent.cross_loop", "recurrent.compressor", "recurrent.memory_gate",
                                           "value_head"))]
    assert comp and all(np.abs(tg[n]).max() > 0 for n in comp), "every component parameter gets a gradient"


def test_no_grad_steps(grads_all, all_models):
    """no_grad_steps = N: the loop's parameters get no gradient (in both twins); out of range: ValueError."""
    tg, jg = grads_all[3]
    N = ALL.recurrent.max_loop_iters
    for name in tg:
        if name.startswith("recurrent."):
            assert not tg[name].any() and not jg[name].any(), name
    assert np.abs(tg["value_head.weight"]).max() > 0  # the head still learns
    # k = 1 drops step 1's contribution: the loop gradients change
    assert _rel(grads_all[0][0]["recurrent.act.halt.fc1.weight"], grads_all[1][0]["recurrent.act.halt.fc1.weight"]) > 1e-6
    tm, jm = all_models
    ids = _ids(ALL, 0)
    for bad in (-1, N + 1, 1.5):
        with pytest.raises(ValueError, match="no_grad_steps"):
            tm(torch.from_numpy(ids), no_grad_steps=bad)
        with pytest.raises(ValueError, match="no_grad_steps"):
            mj.forward(jm, jnp.asarray(ids), no_grad_steps=bad)


def test_checkpoint_gives_the_same_gradients_torch(grads_all):
    """recurrent.checkpoint recomputes each loop step in the backward pass (torch.utils.checkpoint,
    use_reentrant=False): the same gradients as without it (the jax twin's are checked against these
    torch gradients in test_gradient_parity_float64, and against its own plain ones in the slow test)."""
    ids = _ids(ALL, 13)
    R = _loss_weights(ALL, ids, 13)
    m = mt.build(CKPT, 3, "float64")
    tg = torch_grads(m, ids, R)
    plain = grads_all[0][0]
    for name in tg:
        assert _rel(plain[name], tg[name]) < 1e-12, name


@pytest.mark.slow
def test_checkpoint_gives_the_same_gradients_jax(grads_all):
    """jax.checkpoint per loop step: the same gradients as the plain lax.scan (a second compiled program)."""
    ids = _ids(ALL, 13)
    R = _loss_weights(ALL, ids, 13)
    plain = jax_grads(mj.build(ALL, 3, "float64"), ALL, ids, R)
    ckpt = grads_all[0][1]
    for name in plain:
        assert _rel(plain[name], ckpt[name]) < 1e-12, name


# --------------------------------------------------------------------------- straight-through, memory gate


def test_straight_through_forward_is_the_halting_state():
    """With straight-through halting y is the state at the position's halting step: without a coda the
    value head of y equals the value trace at step loop_count (both twins), and the soft model's differs."""
    s = S.load(ALL, overrides={"coda_layers": 0})
    ids = _ids(s, 17)
    w0 = S.init_arrays(s, 17)
    for name in ("recurrent.act.halt.fc1.weight", "recurrent.act.halt.fc2.weight"):
        w0[name] = w0[name] * 30  # p varies between positions
    # a halting bias that gives a mix of loop counts, including positions that never halt (openmythos
    # remainder: their weight goes to the last step)
    for shift in np.linspace(-3, 3, 25):
        w = {**w0, "recurrent.act.halt.fc2.bias": w0["recurrent.act.halt.fc2.bias"] + shift}
        to = mt.build(s, weights=w, dtype="float64")(torch.from_numpy(ids), early_exit=False)
        if len(np.unique(_np(to.loop_counts))) > 1 and not _np(to.halted).all():
            break
    else:
        pytest.fail("no halting bias gave a mix of loop counts")
    counts = _np(to.loop_counts)
    at_count = np.take_along_axis(_np(to.traces.value), counts[None] - 1, axis=0)[0]
    np.testing.assert_allclose(_np(to.values), at_count, rtol=0, atol=1e-12)
    soft = S.load(s, overrides={"halting.straight_through": False})
    so = mt.build(soft, weights=w, dtype="float64")(torch.from_numpy(ids), early_exit=False)
    assert np.abs(_np(so.values) - _np(to.values)).max() > 1e-6


def test_straight_through_gradient_is_the_soft_one():
    """The backward pass uses the soft ACT weights: d<r, y>/d(halting head) is the soft model's."""
    s = S.load(ALL, overrides={"recurrent.checkpoint": False})
    soft = S.load(s, overrides={"halting.straight_through": False})
    ids = torch.from_numpy(_ids(s, 19))
    r = torch.from_numpy(np.random.default_rng(19).standard_normal((*ids.shape, s.dim)))
    grads = []
    for sp in (s, soft):
        m = mt.build(sp, 19, "float64")
        cos, sin = m.rope_cos[:ids.shape[1]], m.rope_sin[:ids.shape[1]]
        e = m.embed(ids)
        for blk in m.prelude:
            e, _, _ = blk(e, cos, sin)
        y = m.loop(e, cos, sin, sp.recurrent.max_loop_iters, False, None, None)[0]
        halt = [p for n, p in m.named_parameters() if n.startswith("recurrent.act.")]
        grads.append(torch.autograd.grad((r * y).sum(), halt))
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_memory_gate_is_contractive(dtype):
    """f * A lies in (0, 1) for any state, even with extreme gate biases and decays."""
    d, rng = 16, np.random.default_rng(0)
    tg = mt.MemoryGate(d, 1e-6, dtype=getattr(torch, dtype))
    jg = nnx.eval_shape(lambda: mj.MemoryGate(d, 1e-6, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    inj = mt.LTIInjection(d, dtype=getattr(torch, dtype))
    for bias in (-30.0, 0.0, 3.0, 40.0):
        W = rng.standard_normal((d, d))
        with torch.no_grad():
            tg.forget_gate.weight.copy_(torch.from_numpy(W))
            tg.forget_gate.bias.fill_(bias)
            inj.log_A.copy_(torch.from_numpy(rng.uniform(-40, 40, d)))
        jg.forget_gate.kernel.set_value(jnp.asarray(W.T, dtype))
        jg.forget_gate.bias.set_value(jnp.full((d,), bias, dtype))
        jg.input_gate.kernel.set_value(jnp.zeros((d, d), dtype))
        jg.input_gate.bias.set_value(jnp.zeros((d,), dtype))
        jg.norm.weight.set_value(jnp.ones((d,), dtype))
        h = rng.standard_normal((2, 5, d)) * 10
        A = inj.decay()
        for fA in (tg.decay(torch.from_numpy(h).to(A.dtype), A), jg.decay(jnp.asarray(h, dtype), jnp.asarray(_np(A)))):
            fA = _np(fA)
            assert np.all(fA > 0) and np.all(fA < 1), (bias, fA.min(), fA.max())


# --------------------------------------------------------------------------- spec, manifest, costs


def test_manifest_order_and_costs():
    """The manifest lists the new parameters in torch registration order; info's tables have their rows."""
    s = S.load(ALL, overrides={"prelude_layers": 1})
    m = mt.build(s, 0, "float32")
    params = [n for n, _ in m.named_parameters()]
    assert params == [p.path for p in S.manifest(s) if p.kind != "buffer"]
    groups = S.count_params(s)
    d, cp = s.dim, s.recurrent.compressor
    assert groups["recurrent.cross_loop"] == 2 * d + 4 * d * d
    assert groups["recurrent.compressor"] == (cp.n_summaries + 2) * d + 2 * d + 6 * d * d
    assert groups["recurrent.memory_gate"] == d + 2 * (d * d + d)
    assert groups["value_head"] == d + 1
    w = S.init_arrays(s, 0)
    assert np.all(w["recurrent.memory_gate.forget_gate.bias"] == s.recurrent.memory_gate.forget_bias)
    assert np.all(w["value_head.bias"] == 0)
    f = S.flops_per_token(s, 16)
    assert {"cross_loop", "compressor", "memory_gate", "value_head"} <= set(f)
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    off = S.flops_per_token(COMPONENT_SHAPES["straight-through"], 16)
    assert not {"cross_loop", "compressor", "memory_gate", "value_head"} & set(off)
