"""mythos_jax: parameters, dtypes, causality, ACT, while_loop = scan, MoE, LoRA, LTI, replay, compiles, grads, twin.

References are independent: float64 NumPy recomputations, naive per-token loops, and (when it is
importable) the torch twin. Compiling dominates JAX test time, so every forward here uses one input
shape (B, T) = (2, 12) and a few specs; weights, token ids and seeds are drawn freely, since they do
not change the compiled program, and every forward runs N = 6 loop steps (beyond max_loop_iters = 4,
so the LoRA index clamp is always exercised). Specs: GQA (graves remainder), MLA (openmythos remainder),
a dense recurrent FFN, the openmythos-0.5 semantics; about a dozen compiled programs in all.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import mythos_jax as mj
import spec as S
from reference import act_reference, naive_moe

M = TypeVar("M", bound=nnx.Module)
DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}
B, T, V = 2, 12, 64  # the one input shape of every forward below
N = 6  # loop steps of every forward below (tiny trains 4)
GQA = {}  # graves remainder
MLA = {"attention.type": "mla", "halting.remainder": "openmythos"}


def tiny(**overrides: object) -> S.Spec:
    return S.load("tiny", overrides=overrides)


def ids_for(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (B, T))


def run(m: mj.Mythos, ids: np.ndarray, n_loops: int = N, **kw: object) -> mj.ModelOutput:
    """The compiled forward, outputs as NumPy."""
    return jax.tree.map(np.asarray, mj.forward(m, ids, n_loops, **kw))


def spread_weights(s: S.Spec, seed: int, spread: float) -> dict[str, np.ndarray]:
    """init_arrays with the halting weight x40 and its bias centred (plus `spread`), so loop counts vary."""
    w = S.init_arrays(s, seed)
    w["recurrent.act.halt.weight"] = w["recurrent.act.halt.weight"] * 40.0
    out = run(mj.build(s, seed, "float64", weights=w), ids_for(12345))  # the same compiled program as the tests
    p = np.clip(out.traces.halt_p[: int(out.n_steps)], 1e-12, 1 - 1e-12)
    w["recurrent.act.halt.bias"] = w["recurrent.act.halt.bias"] - np.log(p / (1 - p)).mean() - 1.0 + spread
    return w


@functools.lru_cache(maxsize=None)
def model(dtype: str = "float64", seed: int = 0, spread: float | None = None, halt_bias: float | None = None,
          **overrides: object) -> mj.Mythos:
    """A tiny model (cached: do not mutate it); spread / halt_bias move the halting head."""
    s = tiny(**overrides)
    w = S.init_arrays(s, seed) if spread is None else spread_weights(s, seed, spread)
    if halt_bias is not None:
        w["recurrent.act.halt.bias"] = np.full(1, halt_bias)
    return mj.build(s, seed, dtype, weights=w)


def abstract(make: Callable[[], M]) -> M:
    """A module built without running its initialisers (each would compile); the test sets every value."""
    return nnx.eval_shape(make)


def report(name: str, a: np.ndarray, b: np.ndarray) -> float:
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


def nnx_path(p: S.Param) -> tuple[str | int, ...]:
    """The nnx state path of a manifest entry: `kernel` for Linear weights, `embedding` for the embedding."""
    *mods, leaf = p.path.split(".")
    leaf = {"linear": "kernel", "embedding": "embedding"}.get(p.kind, leaf)
    return tuple(int(m) if m.isdigit() else m for m in mods) + (leaf,)


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_variables_equal_manifest(overrides, dtype):
    s = tiny(**overrides)
    m = mj.build(s, 0, dtype)
    want = {nnx_path(p): (p.shape[::-1] if p.kind == "linear" else p.shape, p.kind) for p in S.manifest(s)}
    got = {path: v for path, v in nnx.to_flat_state(nnx.state(m))}
    assert set(got) == set(want)
    for path, v in got.items():
        shape, kind = want[path]
        assert tuple(v.get_value().shape) == shape, path
        if kind == "buffer":  # router_bias: not a gradient parameter, float32 in a bfloat16 model
            assert isinstance(v, mj.moe.RouterBias) and not isinstance(v, nnx.Param)
            assert v.get_value().dtype == (jnp.float32 if dtype == "bfloat16" else DTYPES[dtype])
        else:
            assert isinstance(v, nnx.Param) and v.get_value().dtype == DTYPES[dtype], path


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dump_equals_init_arrays_cast_bitwise(dtype):
    s = tiny()
    d = mj.dump_arrays(mj.build(s, 1, dtype))
    init = S.init_arrays(s, 1)
    assert list(d) == [p.path for p in S.manifest(s)]
    np_dtype = {"float32": np.float32, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}[dtype]
    for k, a in d.items():
        want = init[k].astype(np.float32 if k.endswith("router_bias") and dtype == "bfloat16" else np_dtype)
        assert a.dtype == want.dtype and a.shape == want.shape, k
        assert a.tobytes() == want.tobytes(), k  # bitwise
    other = mj.dump_arrays(mj.build(s, 2, dtype))
    assert any(not np.array_equal(d[k], other[k]) for k in d if not k.endswith("router_bias"))


def test_bfloat16_round_trip_through_load_arrays():
    s = tiny(**{"attention.type": "mla"})
    d = mj.dump_arrays(mj.build(s, 3, "bfloat16"))
    m = mj.build(s, 0, "bfloat16", weights=d)
    for k, a in mj.dump_arrays(m).items():
        assert a.tobytes() == d[k].tobytes(), k


def test_load_arrays_reports_every_problem_at_once():
    s = tiny()
    w = S.init_arrays(s, 0)
    del w["norm.weight"]
    w["recurrent.lora.B"] = np.zeros((3, 3))
    w["bogus"] = np.zeros(1)
    with pytest.raises(ValueError) as err:
        mj.build(s, weights=w)
    msg = str(err.value)
    assert "3 problem" in msg and "'norm.weight'" in msg and "recurrent.lora.B" in msg and "'bogus'" in msg


def test_build_errors_are_clear():
    with pytest.raises(ValueError, match="float16"):
        mj.build(tiny(), dtype="float16")
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            mj.build(tiny(), dtype="float64")
    finally:
        mj.set_parity_precision()
    assert jax.config.jax_default_matmul_precision == "float32" and jax.config.jax_enable_x64


# ------------------------------------------------------------------------------------- forward


def test_float32_model_stays_float32():
    m = model("float32")
    out = mj.forward(m, ids_for(0), N)
    assert out.logits.shape == (B, T, V) and out.logits.dtype == jnp.float32
    assert out.loop_counts.dtype == jnp.int32 and out.halted.dtype == jnp.bool_ and out.n_steps.dtype == jnp.int32
    tr = out.traces
    assert tr.state_norm.shape == (N, B, T) and tr.state_norm.dtype == jnp.float32
    assert tr.halt_p.dtype == tr.cum_p.dtype == tr.router_margin.dtype == jnp.float32
    assert tr.running.dtype == jnp.bool_
    assert tr.expert_idx.shape == (N, B, T, 2) and tr.expert_idx.dtype == jnp.int32
    assert all(x.dtype != jnp.float64 for x in jax.tree.leaves(out))  # under jax_enable_x64, too
    assert np.isfinite(np.asarray(out.logits)).all()


def test_bfloat16_follows_float32_under_replayed_decisions():
    ids = ids_for(5)
    ref = run(model("float32"), ids)
    forced = np.where(ref.halted, ref.loop_counts, 0)
    out = run(model("bfloat16"), ids, force_halt=forced, force_experts=ref.traces.expert_idx)
    assert out.logits.dtype == ml_dtypes.bfloat16 and out.traces.halt_p.dtype == np.float32
    assert report("bf16 vs f32 logits", out.logits.astype(np.float32), ref.logits) < 2e-2
    np.testing.assert_array_equal(out.loop_counts, ref.loop_counts)


def test_ids_of_any_integer_dtype():
    m = model()
    ids = ids_for(1)
    ref = run(m, ids).logits
    for dt in (np.int32, np.int16, np.uint8):
        np.testing.assert_array_equal(run(m, ids.astype(dt)).logits, ref)
    np.testing.assert_array_equal(run(m, jnp.asarray(ids, dtype=jnp.int32)).logits, ref)


@given(seed=st.integers(0, 2**16), j=st.integers(1, T - 1), variant=st.sampled_from(["gqa", "mla"]))
def test_causality(seed, j, variant):
    m = model(spread=0.0, **(GQA if variant == "gqa" else MLA))
    ids = ids_for(seed)
    other = ids.copy()
    other[:, j] = (other[:, j] + 1 + seed % (V - 1)) % V
    a, b = run(m, ids), run(m, other)
    np.testing.assert_allclose(a.logits[:, :j], b.logits[:, :j], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(a.loop_counts[:, :j], b.loop_counts[:, :j])
    assert not np.allclose(a.logits[:, j], b.logits[:, j])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_n_loops_below_one_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="n_loops"):
        mj.forward(model(), ids_for(0), bad)
    assert model()._check_loops(None) == 4  # None: max_loop_iters


def test_bad_inputs_are_clear_errors():
    m = model()
    with pytest.raises(ValueError, match="vocab_size"):
        mj.forward(m, np.full((1, 4), V))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        mj.forward(m, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="max_seq_len"):
        mj.forward(m, np.zeros((1, 65), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        mj.forward(m, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="force_halt"):
        mj.forward(m, ids_for(0), 2, force_halt=np.full((B, T), 3))
    with pytest.raises(ValueError, match="force_experts"):
        mj.forward(m, ids_for(0), 2, force_experts=np.zeros((3, B, T, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="experts in 0..3"):
        mj.forward(m, ids_for(0), 2, force_experts=np.full((2, B, T, 2), 4))


# ------------------------------------------------------------------------------------- ACT



# no subnormal p: XLA on the CPU flushes subnormals to zero (torch and NumPy keep them)
@given(p=st.lists(st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=5, max_size=5), min_size=1, max_size=6),
       threshold=st.sampled_from([0.5, 0.99, 1.0]), graves=st.booleans())
def test_act_step_equals_reference(p, threshold, graves):
    p = np.array(p, dtype=np.float64)
    n = p.shape[0]
    w_ref, c_ref, run_ref, counts_ref, _ = act_reference(p, threshold, graves, n)
    c, running = jnp.zeros(5, dtype=jnp.float64), jnp.ones(5, dtype=jnp.bool_)
    counts = np.full(5, n)
    for t in range(n):
        np.testing.assert_array_equal(np.asarray(running), run_ref[t])
        w, c, running, halts = mj.act_step(jnp.asarray(p[t]), c, running, threshold, graves and t == n - 1)
        np.testing.assert_array_equal(np.asarray(w), w_ref[t])
        np.testing.assert_array_equal(np.asarray(c), c_ref[t])
        counts = np.where(np.asarray(halts), t + 1, counts)
    np.testing.assert_array_equal(counts, counts_ref)


@given(seed=st.integers(0, 2**16), variant=st.sampled_from(["gqa", "mla"]), shift=st.sampled_from([0.0, 1.5, -2.0]))
def test_act_invariants_from_traces(seed, variant, shift):
    m = model(spread=shift, **(GQA if variant == "gqa" else MLA))
    graves = m.spec.halting.remainder == "graves"
    out = run(m, ids_for(seed))
    tr, n = out.traces, int(out.n_steps)
    assert 1 <= n <= N
    # independent float64 recomputation of the halting decisions from the traced p
    p = tr.halt_p[:n].reshape(n, -1)
    w, c_after, running_before, counts, halted = act_reference(p, m.spec.halting.threshold, graves, N)
    np.testing.assert_array_equal(tr.running[:n].reshape(n, -1), running_before)
    np.testing.assert_array_equal(tr.cum_p[:n].reshape(n, -1), c_after)
    np.testing.assert_array_equal(out.loop_counts.reshape(-1), counts)
    np.testing.assert_array_equal(out.halted.reshape(-1), halted)
    assert ((1 <= out.loop_counts) & (out.loop_counts <= N)).all()
    assert n == out.loop_counts.max()  # the loop stopped when the last position halted
    if graves:
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=0, atol=1e-12)
        assert out.halted.all()
    else:
        assert (w.sum(0) <= 1.0 + 1e-12).all()
        assert np.all(w.sum(0)[~halted] < 1.0)


@given(seed=st.integers(0, 2**16), variant=st.sampled_from(["gqa", "mla"]), shift=st.sampled_from([0.0, 1.5, -2.0]))
def test_while_loop_equals_scan(seed, variant, shift):
    m = model(spread=shift, **(GQA if variant == "gqa" else MLA))
    ids = ids_for(seed)
    a, b = run(m, ids, early_exit=True), run(m, ids, early_exit=False)
    assert int(b.n_steps) == N and 1 <= int(a.n_steps) <= N
    assert report("while_loop vs scan logits", a.logits, b.logits) <= 1e-13
    np.testing.assert_array_equal(a.loop_counts, b.loop_counts)
    np.testing.assert_array_equal(a.halted, b.halted)
    n = int(a.n_steps)
    for name, x, y in zip(a.traces._fields, a.traces, b.traces):
        if x is None:  # an option that is off (value head, attention probabilities)
            assert y is None, name
            continue
        np.testing.assert_allclose(x[:n], y[:n], rtol=0, atol=1e-13, err_msg=name)


def test_trace_fill_values_for_steps_not_run():
    m = model(halt_bias=5.0)  # p ~ 1: everything halts at step 1
    out = run(m, ids_for(0))
    assert int(out.n_steps) == 1 and (out.loop_counts == 1).all()
    tr = out.traces
    assert (tr.state_norm[1:] == 0).all() and (tr.halt_p[1:] == 0).all() and (tr.cum_p[1:] == 0).all()
    assert not tr.running[1:].any() and (tr.expert_idx[1:] == -1).all() and np.isinf(tr.router_margin[1:]).all()
    assert tr.running[0].all() and (tr.expert_idx[0] >= 0).all()


def test_force_replay_reproduces_the_unforced_run():
    m = model(spread=0.0, **GQA)
    ids = ids_for(7)
    ref = run(m, ids)
    assert len(set(ref.loop_counts.flatten().tolist())) > 1  # the replay is not trivial
    forced = np.where(ref.halted, ref.loop_counts, 0)
    # rows of steps not run hold -1 in the trace: such rows are not forced
    out = run(m, ids, force_halt=forced, force_experts=ref.traces.expert_idx)
    np.testing.assert_array_equal(out.logits, ref.logits)
    np.testing.assert_array_equal(out.loop_counts, ref.loop_counts)
    np.testing.assert_array_equal(out.halted, ref.halted)
    for name, x, y in zip(ref.traces._fields, ref.traces, out.traces):
        np.testing.assert_array_equal(x, y, err_msg=name)
    # forcing something else changes the run (always both arrays: one compiled program)
    one = run(m, ids, force_halt=np.ones((B, T), dtype=np.int64), force_experts=ref.traces.expert_idx)
    assert (one.loop_counts == 1).all() and one.halted.all() and int(one.n_steps) == 1
    other = ref.traces.expert_idx[..., ::-1]  # same experts, other slot order: weights follow the experts
    out = run(m, ids, force_halt=forced, force_experts=other)
    assert report("slot order", out.logits, ref.logits) < 1e-12
    shifted = np.where(ref.traces.expert_idx < 0, -1, np.minimum(ref.traces.expert_idx + 1, 3))
    assert not np.allclose(run(m, ids, force_halt=forced, force_experts=shifted).logits, ref.logits)


def test_dense_recurrent_ffn_has_empty_expert_traces():
    m = model(**{"recurrent.ffn": "dense"})
    out = run(m, ids_for(0))
    assert out.traces.expert_idx.shape == (N, B, T, 0)
    assert np.isinf(out.traces.router_margin).all()
    with pytest.raises(ValueError, match="dense"):
        mj.update_router_bias(m, np.zeros(4))


# ------------------------------------------------------------------------------------- MoE



MOE_SHAPES = {"k<E": (5, 2, 2), "k=E": (3, 3, 0)}  # (n_experts, top_k, n_shared): one compile each
MOE_TOKENS, MOE_D, MOE_HIDDEN = 9, 8, 5


@functools.lru_cache(maxsize=None)
def moe_call(shape: str) -> tuple[mj.MoE, Callable[..., tuple[jax.Array, jax.Array, jax.Array]]]:
    """A float64 MoE of one MOE_SHAPES entry and its compiled call (weights are set per example)."""
    E, k, n_shared = MOE_SHAPES[shape]
    moe = abstract(lambda: mj.MoE(MOE_D, S.MoESpec(n_experts=E, n_shared_experts=n_shared, top_k=k,
                                                   expert_dim=MOE_HIDDEN), dtype=jnp.float64, rngs=nnx.Rngs(0)))
    return moe, nnx.jit(lambda moe, x, force: moe(x, force))


@given(seed=st.integers(0, 2**16), shape=st.sampled_from(list(MOE_SHAPES)), bias_scale=st.sampled_from([0.0, 0.3, 3.0]),
       forced=st.floats(0.0, 1.0))
def test_moe_dispatch_equals_naive_per_token_loop(seed, shape, bias_scale, forced):
    E, k, n_shared = MOE_SHAPES[shape]
    moe, call = moe_call(shape)
    rng = np.random.default_rng(seed)
    D, Hd = MOE_D, MOE_HIDDEN
    arrays = {"router": rng.normal(size=(E, D)), "bias": rng.normal(size=E) * bias_scale,
              "gate": rng.normal(size=(E, D, Hd)), "up": rng.normal(size=(E, D, Hd)),
              "down": rng.normal(size=(E, Hd, D))}
    moe.router.kernel.set_value(jnp.asarray(arrays["router"].T))
    moe.router_bias.set_value(jnp.asarray(arrays["bias"]))
    for n in ("gate", "up", "down"):
        getattr(moe.experts, n).set_value(jnp.asarray(arrays[n]))
    for j, sh in enumerate(moe.shared_experts):
        for n in ("gate", "up", "down"):
            kernel = getattr(sh, n).kernel
            arrays[f"shared.{j}.{n}"] = rng.normal(size=kernel.shape[::-1])  # torch layout [out, in]
            kernel.set_value(jnp.asarray(arrays[f"shared.{j}.{n}"].T))
    x = rng.normal(size=(MOE_TOKENS, D))
    # a share `forced` of the tokens gets drawn experts (repeats allowed); the others -1, i.e. not forced
    force = np.where(rng.random((MOE_TOKENS, 1)) < forced, rng.integers(0, E, (MOE_TOKENS, k)), -1)
    ref, chosen = naive_moe(x, arrays, k, n_shared, force)
    out, idx, margin = call(moe, jnp.asarray(x)[None], jnp.asarray(force)[None])
    assert report("MoE vs naive", np.asarray(out[0]), ref) < 1e-10
    np.testing.assert_array_equal(np.asarray(idx[0]), chosen)
    assert idx.dtype == jnp.int32
    biased = np.sort(x @ arrays["router"].T + arrays["bias"], axis=-1)[:, ::-1]
    want = biased[:, k - 1] - biased[:, k] if k < E else np.full(MOE_TOKENS, np.inf)
    np.testing.assert_allclose(np.asarray(margin[0]), want, rtol=0, atol=1e-12)


def test_router_ties_go_to_the_lower_expert_index():
    logits = jnp.zeros((3, 7), dtype=jnp.float64)  # zero router weights: every logit ties
    idx, w, margin = mj.route(logits, jnp.zeros(7, dtype=jnp.float64), 3)
    assert np.asarray(idx).tolist() == [[0, 1, 2]] * 3 and np.allclose(np.asarray(w), 1 / 3)
    assert (np.asarray(margin) == 0).all()
    idx, _, _ = mj.route(logits, jnp.asarray([0.0, 1.0, 0.5, 1.0, 0.5, 0.0, 1.0]), 4)
    assert np.asarray(idx).tolist() == [[1, 3, 6, 2]] * 3
    # in the model: zero router weights make every token choose experts 0..k-1
    s = tiny()
    w0 = S.init_arrays(s, 0)
    w0["recurrent.block.ffn.router.weight"] = np.zeros_like(w0["recurrent.block.ffn.router.weight"])
    out = run(mj.build(s, 0, "float64", weights=w0), ids_for(0))
    n = int(out.n_steps)
    assert (out.traces.expert_idx[:n] == np.array([0, 1])).all()


def test_expert_load_counts_entries_of_running_positions():
    out = run(model(spread=0.0), ids_for(2), early_exit=False)
    tr = out.traces
    load = mj.expert_load(jnp.asarray(tr.expert_idx), jnp.asarray(tr.running), 4)
    ref = np.zeros(4, dtype=np.int64)
    for t, b, i in zip(*np.nonzero(tr.running)):
        for e in tr.expert_idx[t, b, i].tolist():
            ref[e] += 1
    assert load.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(load), ref)
    assert int(load.sum()) == int(tr.running.sum()) * 2


def test_update_router_bias_moves_the_bias_and_the_compiled_forward_sees_it():
    s = tiny()
    m = mj.build(s, 4, "float64")
    ids = ids_for(4)
    before = run(m, ids)
    load = mj.expert_load(jnp.asarray(before.traces.expert_idx), jnp.asarray(before.traces.running), 4)
    mj.update_router_bias(m, load)
    bias = np.asarray(m.recurrent.block.ffn.router_bias.get_value())
    lf = np.asarray(load, dtype=np.float64)
    np.testing.assert_array_equal(bias, s.moe.bias_update_rate * np.sign(lf.mean() - lf))
    after = run(m, ids)  # the bias is state, not a constant: the new value reaches the compiled program
    assert not np.array_equal(after.traces.router_margin[0], before.traces.router_margin[0])
    # bfloat16 model: the bias stays float32
    mb = mj.build(s, 4, "bfloat16")
    mj.update_router_bias(mb, load)
    rb = mb.recurrent.block.ffn.router_bias.get_value()
    assert rb.dtype == jnp.float32 and np.array_equal(np.asarray(rb), bias.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        mj.update_router_bias(m, np.zeros(3))


# ------------------------------------------------------------------------------------- LoRA, LTI, loop embedding


def test_lora_index_clamp_uses_the_last_scale_row():
    rng = np.random.default_rng(0)
    lora = abstract(lambda: mj.LoRA(6, 3, 4, dtype=jnp.float64, rngs=nnx.Rngs(0)))
    down, Bm, scale = rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(4, 3))
    lora.down.kernel.set_value(jnp.asarray(down.T))
    lora.B.set_value(jnp.asarray(Bm))
    lora.scale.set_value(jnp.asarray(scale))
    o = rng.normal(size=(2, 5, 6))
    for t in range(7):
        ref = ((o @ down.T) * scale[min(t, 3)]) @ Bm
        np.testing.assert_allclose(np.asarray(lora(jnp.asarray(o), jnp.int32(t))), ref, rtol=0, atol=1e-12)
    # in the model: all N = 6 steps run, and a change of the last scale row (index 3) shows from step 4 on
    m = model()
    ids, never, free = ids_for(0), np.zeros((B, T), dtype=np.int64), np.full((N, B, T, 2), -1)
    w = mj.dump_arrays(m)
    w["recurrent.lora.scale"] = w["recurrent.lora.scale"].copy()
    w["recurrent.lora.scale"][-1] += 1.0
    a = run(m, ids, force_halt=never, force_experts=free)
    b = run(mj.build(m.spec, 0, "float64", weights=w), ids, force_halt=never, force_experts=free)
    assert int(a.n_steps) == N and not np.allclose(a.logits, b.logits)
    np.testing.assert_array_equal(a.traces.state_norm[:3], b.traces.state_norm[:3])
    assert all(not np.array_equal(a.traces.state_norm[t], b.traces.state_norm[t]) for t in range(3, N))


BIG = float(np.float32(3e38))  # near float32's largest; the sum log_dt + log_A overflows to +-inf


@given(log_A=st.lists(st.floats(-BIG, BIG, width=32), min_size=4, max_size=4),
       log_dt=st.floats(-BIG, BIG, width=32), dtype=st.sampled_from(list(DTYPES)))
def test_lti_decay_is_strictly_inside_zero_one(log_A, log_dt, dtype):
    inj = abstract(lambda: mj.LTIInjection(4, dtype=DTYPES[dtype], rngs=nnx.Rngs(0)))
    inj.log_A.set_value(jnp.asarray(np.asarray(log_A), dtype=DTYPES[dtype]))
    inj.log_dt.set_value(jnp.full((1,), log_dt, dtype=DTYPES[dtype]))
    A = inj.decay()
    assert A.dtype == DTYPES[dtype]
    a = np.asarray(A, dtype=np.float64)
    assert ((a > 0) & (a < 1)).all(), a
    z = np.clip(np.asarray(inj.log_dt.get_value(), np.float64) + np.asarray(inj.log_A.get_value(), np.float64), -20, 20)
    if dtype == "float64" and np.all(np.abs(z) < 5):  # the plain formula wherever it is representable
        np.testing.assert_allclose(a, np.exp(-np.exp(z)), rtol=1e-15)


@pytest.mark.parametrize("semantics", ["mythos", "openmythos-0.5"])
def test_loop_embedding_rows_and_placement(semantics):
    s = tiny(semantics=semantics, **({"halting.remainder": "openmythos"} if semantics != "mythos" else {}))
    L, t = s.loop_dim, 3
    w = 10000.0 ** (-np.arange(0, L, 2) / L)
    table = S.loop_table(s, 5, "float64")
    np.testing.assert_allclose(table[t], np.concatenate([np.sin(t * w), np.cos(t * w)]), rtol=0, atol=1e-14)
    out = np.asarray(mj.add_loop_embedding(jnp.zeros((1, 1, s.dim), dtype=jnp.float64), jnp.asarray(table[t])))[0, 0]
    np.testing.assert_array_equal(out[:L], table[t])
    assert (out[L:] == 0).all()


# ------------------------------------------------------------------------------------- compiles and gradients


def test_forward_compiles_once_per_shape():
    compiles: list[float] = []

    def listener(event: str, duration: float, **kw: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    m = model()
    run(m, ids_for(0))  # warm
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x * 3)(jnp.zeros(7, dtype=jnp.float64))  # the listener does see compiles
        assert len(compiles) == 1
        compiles.clear()
        run(m, ids_for(1))  # other ids
        run(mj.build(m.spec, 9, "float64"), ids_for(2))  # other weights, another model object
        assert compiles == []
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_grad_through_scan_is_finite_and_matches_finite_differences():
    m = model(spread=0.0)
    ids = ids_for(3)
    r = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, V)))

    def loss(m: mj.Mythos) -> jax.Array:
        return jnp.sum(mj.forward(m, ids, N, early_exit=False).logits * r)

    g = nnx.jit(nnx.grad(loss))(m)  # gradients of every nnx.Param (router_bias is not one)
    flat = dict(nnx.to_flat_state(g))
    assert len(flat) == sum(p.kind != "buffer" for p in S.manifest(m.spec))
    assert all(np.isfinite(np.asarray(v.get_value())).all() for v in flat.values())
    for path in [("recurrent", "block", "ffn", "experts", "gate"), ("recurrent", "lora", "scale"),
                 ("recurrent", "injection", "log_A"), ("recurrent", "act", "halt", "kernel"), ("embed", "embedding")]:
        assert np.abs(np.asarray(flat[path].get_value())).max() > 0, path
    # the directional derivative against central differences (float64; no decision moves at this eps)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
    eps = 1e-6
    shifted = [nnx.merge(graphdef, jax.tree.map(lambda p, d: p + sign * eps * d, params, v), rest) for sign in (1, -1)]
    fd = float(loss(shifted[0]) - loss(shifted[1])) / (2 * eps)
    ad = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(nnx.state(g)), jax.tree.leaves(v))))
    assert abs(fd - ad) <= 1e-6 * max(1.0, abs(ad)), (fd, ad)


# ------------------------------------------------------------------------------------- the torch twin

TWIN_SPECS = {
    "gqa-moe-graves": GQA,
    "mla-moe-openmythos": MLA,
    "gqa-dense": {"recurrent.ffn": "dense"},
    "mla-moe-openmythos-0.5": {"attention.type": "mla", "semantics": "openmythos-0.5",
                               "halting.remainder": "openmythos"},
}


@pytest.mark.parametrize("name", list(TWIN_SPECS))
def test_twin_parity_float64(name):
    torch = pytest.importorskip("torch")
    mt = pytest.importorskip("mythos_torch")
    jm = model(spread=0.0, **TWIN_SPECS[name])
    tm = mt.build(jm.spec, 0, "float64", weights=mj.dump_arrays(jm))
    for seed in (0, 1):
        ids = ids_for(seed)
        a = run(jm, ids)
        with torch.no_grad():
            b = tm(torch.from_numpy(ids), N)
        assert report(f"{name} logits jax vs torch", a.logits, b.logits.numpy()) <= 1e-10
        np.testing.assert_array_equal(a.loop_counts, b.loop_counts.numpy())
        np.testing.assert_array_equal(a.halted, b.halted.numpy())
        assert int(a.n_steps) == b.n_steps
        np.testing.assert_array_equal(a.traces.expert_idx, b.traces.expert_idx.numpy())
        np.testing.assert_array_equal(a.traces.running, b.traces.running.numpy())
        for field in ("state_norm", "halt_p", "cum_p", "router_margin"):
            x, y = getattr(a.traces, field), getattr(b.traces, field).numpy()
            np.testing.assert_array_equal(np.isinf(x), np.isinf(y))
            fin = ~np.isinf(x)
            assert not fin.any() or report(f"{name} {field}", x[fin], y[fin]) <= 1e-10
