"""Both twins, one test each: parameters, dtypes, causality, ACT, early exit, replay, MoE, LoRA, LTI,
gradients, truncated backprop, and the twins against each other.

Every test but the last one takes the `twin` fixture (conftest.py: "torch", then "jax";
helpers.TorchTwin / JaxTwin, NumPy in and out); a test that only one framework can run says so in its
name and restricts the fixture. References are independent: float64 NumPy recomputations, naive per-token loops, a
hand-detached loop, central differences, and the other twin. Compiling dominates JAX time, so
forwards use one input shape (B, T) = (2, 12), N = 6 loop steps (beyond max_loop_iters = 4: the LoRA
index clamp is exercised) and a few specs; where a test draws n_loops or a spec freely for torch,
the JAX run keeps to the compiled ones.
"""

from __future__ import annotations

import functools
import inspect

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import helpers
import spec as S
from helpers import as_float64, ids_for, report, tiny, to_numpy
from reference import act_reference, naive_moe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, T, V = 2, 12, 64  # the input shape of every forward below
N = 6  # loop steps of the forwards below (tiny trains 4)
NP_DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}
SPECS = {  # tiny overrides by name
    "gqa": {},  # graves remainder
    "gqa-om": {"halting.remainder": "openmythos"},
    "mla": {"attention.type": "mla"},
    "mla-om": {"attention.type": "mla", "halting.remainder": "openmythos"},
}
TORCH = pytest.mark.parametrize("twin", ["torch"], indirect=True)
JAX = pytest.mark.parametrize("twin", ["jax"], indirect=True)


def spread_weights(twin, s: S.Spec, seed: int, spread: float) -> dict[str, np.ndarray]:
    """init_arrays with the halting weight x40 and its bias centred (plus `spread`), so loop counts vary."""
    w = S.init_arrays(s, seed)
    w["recurrent.act.halt.weight"] = w["recurrent.act.halt.weight"] * 40.0
    out = twin.forward(twin.build(s, seed, "float64", weights=w), ids_for(12345), N)  # jax: the tests' program
    p = np.clip(out.traces.halt_p[: int(out.n_steps)], 1e-12, 1 - 1e-12)
    w["recurrent.act.halt.bias"] = w["recurrent.act.halt.bias"] - np.log(p / (1 - p)).mean() - 1.0 + spread
    return w


@functools.lru_cache(maxsize=None)
def model(twin, dtype: str = "float64", seed: int = 0, spread: float | None = None, halt_bias: float | None = None,
          **overrides: object):
    """A tiny model of the twin (cached: do not mutate it); spread / halt_bias move the halting head."""
    s = tiny(**overrides)
    w = S.init_arrays(s, seed) if spread is None else spread_weights(twin, s, seed, spread)
    if halt_bias is not None:
        w["recurrent.act.halt.bias"] = np.full(1, halt_bias)
    return twin.build(s, seed, dtype, weights=w)


def leaves(x) -> list[np.ndarray]:
    """The arrays of a NumPy ModelOutput (NamedTuples of arrays; None and ints left out)."""
    if isinstance(x, tuple):
        return [a for v in x for a in leaves(v)]
    return [x] if isinstance(x, np.ndarray) else []


def assert_same(name: str, x: np.ndarray | None, y: np.ndarray | None, atol: float = 0.0) -> None:
    """Equal (None: an option that is off, in both), or within atol for floating arrays."""
    if x is None or y is None:
        assert x is None and y is None, name
    elif atol == 0.0 or as_float64(x).dtype != np.float64:
        np.testing.assert_array_equal(x, y, err_msg=name)
    else:
        np.testing.assert_allclose(as_float64(x), as_float64(y), rtol=0, atol=atol, err_msg=name)


# ------------------------------------------------------------------------------------- parameters

VARIANTS = [
    {},
    {"attention.type": "mla"},
    {"recurrent.ffn": "dense", "halting.head": "mlp"},
    {"tie_embeddings": False, "recurrent.lora_rank": 0, "recurrent.loop_embedding.enabled": False},
    {"moe.n_shared_experts": 2, "prelude_layers": 2, "coda_layers": 0, "moe.top_k": 4},
]


@TORCH
@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
@pytest.mark.parametrize("dtype", list(NP_DTYPES))
def test_torch_registration_order_and_shapes_equal_manifest(twin, overrides, dtype):
    s = tiny(**overrides)
    m = twin.pkg.Mythos(s, dtype=twin.dtypes[dtype])
    man = S.manifest(s)
    shape = {p.path: p.shape for p in man}
    params = [p.path for p in man if p.kind != "buffer"]  # manifest order is torch's traversal order
    buffers = [p.path for p in man if p.kind == "buffer"]
    assert [(n, tuple(t.shape)) for n, t in m.named_parameters()] == [(p, shape[p]) for p in params]
    persistent = [(n, tuple(t.shape)) for n, t in m.named_buffers() if n in m.state_dict()]
    assert persistent == [(p, shape[p]) for p in buffers]
    assert sorted(m.state_dict()) == sorted(p.path for p in man)  # RoPE tables are non-persistent
    for n, t in m.state_dict().items():
        want = twin.torch.float32 if n.endswith("router_bias") and dtype == "bfloat16" else twin.dtypes[dtype]
        assert t.dtype == want, n


def nnx_path(p: S.Param) -> tuple[str | int, ...]:
    """The nnx state path of a manifest entry: `kernel` for Linear weights, `embedding` for the embedding."""
    *mods, leaf = p.path.split(".")
    leaf = {"linear": "kernel", "embedding": "embedding"}.get(p.kind, leaf)
    return tuple(int(m) if m.isdigit() else m for m in mods) + (leaf,)


@JAX
@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
@pytest.mark.parametrize("dtype", list(NP_DTYPES))
def test_jax_variables_equal_manifest(twin, overrides, dtype):
    nnx = twin.nnx
    s = tiny(**overrides)
    m = twin.build(s, 0, dtype)
    want = {nnx_path(p): (p.shape[::-1] if p.kind == "linear" else p.shape, p.kind) for p in S.manifest(s)}
    got = {path: v for path, v in nnx.to_flat_state(nnx.state(m))}
    assert set(got) == set(want)
    for path, v in got.items():
        shape, kind = want[path]
        assert tuple(v.get_value().shape) == shape, path
        if kind == "buffer":  # router_bias: not a gradient parameter, float32 in a bfloat16 model
            assert isinstance(v, twin.pkg.moe.RouterBias) and not isinstance(v, nnx.Param)
            assert v.get_value().dtype == (np.float32 if dtype == "bfloat16" else NP_DTYPES[dtype])
        else:
            assert isinstance(v, nnx.Param) and v.get_value().dtype == NP_DTYPES[dtype], path


@pytest.mark.parametrize("dtype", list(NP_DTYPES))
def test_build_is_deterministic_per_seed_and_equals_init_arrays_cast_bitwise(twin, dtype):
    s = tiny()
    d, again, other = (twin.pkg.dump_arrays(twin.build(s, seed, dtype)) for seed in (1, 1, 2))
    init = S.init_arrays(s, 1)
    assert list(d) == [p.path for p in S.manifest(s)]
    for k, a in d.items():
        want = init[k].astype(np.float32 if k.endswith("router_bias") and dtype == "bfloat16" else NP_DTYPES[dtype])
        assert a.dtype == want.dtype and a.shape == want.shape, k
        assert a.tobytes() == want.tobytes() == again[k].tobytes(), k  # bitwise
    assert any(not np.array_equal(d[k], other[k]) for k in d if not k.endswith("router_bias"))


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_bfloat16_dump_is_exact_and_round_trips(twin, attn):
    s = tiny(**{"attention.type": attn})
    d = twin.pkg.dump_arrays(twin.build(s, 3, "bfloat16"))
    init = S.init_arrays(s, 3)
    assert d["embed.weight"].dtype == ml_dtypes.bfloat16
    assert d["recurrent.block.ffn.router_bias"].dtype == np.float32
    assert d["embed.weight"].tobytes() == init["embed.weight"].astype(ml_dtypes.bfloat16).tobytes()
    loaded = twin.build(s, 0, "bfloat16")
    twin.pkg.load_arrays(loaded, d)
    for m in (twin.build(s, 0, "bfloat16", weights=d), loaded):
        for k, a in twin.pkg.dump_arrays(m).items():
            assert a.dtype == d[k].dtype and a.tobytes() == d[k].tobytes(), k


def test_load_arrays_reports_every_problem_at_once(twin):
    s = tiny()
    w = S.init_arrays(s, 0)
    del w["norm.weight"]
    w["recurrent.lora.B"] = np.zeros((3, 3))
    w["bogus"] = np.zeros(1)
    with pytest.raises(ValueError) as err:
        twin.build(s, weights=w)
    msg = str(err.value)
    assert "3 problem" in msg and "'norm.weight'" in msg and "recurrent.lora.B" in msg and "'bogus'" in msg


def test_build_refuses_an_unknown_dtype(twin):
    with pytest.raises(ValueError, match="float16"):
        twin.build(tiny(), dtype="float16")


@JAX
def test_jax_float64_build_needs_x64(twin):
    jax = twin.jax
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            twin.build(tiny(), dtype="float64")
    finally:
        twin.pkg.set_parity_precision()
    assert jax.config.jax_default_matmul_precision == "float32" and jax.config.jax_enable_x64


# ------------------------------------------------------------------------------------- forward


# jax: MLA in float64 only (each (spec, dtype) is a compiled program)
DTYPE_CASES = [(tw, d, a) for tw in helpers.TWIN_NAMES for a in ("gqa", "mla") for d in NP_DTYPES
               if tw == "torch" or a == "gqa" or d == "float64"]


@pytest.mark.parametrize("twin, dtype, attn", DTYPE_CASES, indirect=["twin"])
def test_every_dtype_runs(twin, dtype, attn):
    m = model(twin, dtype, **{"attention.type": attn})
    out = twin.forward(m, ids_for(0), N)  # n_loops=None: test_n_loops_accepts_numpy_integers_and_none
    acc = np.float64 if dtype == "float64" else np.float32
    assert out.logits.shape == (B, T, V) and out.logits.dtype == NP_DTYPES[dtype]
    assert np.isfinite(as_float64(out.logits)).all()
    assert out.loop_counts.dtype == np.int32 and out.halted.dtype == np.bool_
    # n_steps: a jax int32 scalar, a Python int in torch
    assert out.n_steps.dtype == np.int32 if twin.name == "jax" else isinstance(out.n_steps, int)
    tr = out.traces
    assert tr.state_norm.shape == (N, B, T) and tr.state_norm.dtype == NP_DTYPES[dtype]
    assert tr.halt_p.dtype == tr.cum_p.dtype == tr.router_margin.dtype == acc
    assert tr.running.dtype == np.bool_
    assert tr.expert_idx.shape == (N, B, T, 2) and tr.expert_idx.dtype == np.int32
    if dtype != "float64":
        assert all(x.dtype != np.float64 for x in leaves(out))  # under jax_enable_x64, too
    if twin.name == "torch" or (dtype, attn) == ("float64", "gqa"):  # the module call (eager JAX is slow)
        call = twin.call(m, ids_for(0), N)
        if twin.name == "torch":
            np.testing.assert_array_equal(call.logits, out.logits)
        else:  # eager and compiled XLA programs differ by a few ulps
            assert report("eager vs compiled logits", call.logits, out.logits) <= 1e-13
        np.testing.assert_array_equal(call.loop_counts, out.loop_counts)


def test_bfloat16_follows_float32_under_replayed_decisions(twin):
    ids = ids_for(5)
    ref = twin.forward(model(twin, "float32"), ids, N)
    forced = np.where(ref.halted, ref.loop_counts, 0)
    out = twin.forward(model(twin, "bfloat16"), ids, N, force_halt=forced, force_experts=ref.traces.expert_idx)
    assert out.logits.dtype == ml_dtypes.bfloat16 and out.traces.halt_p.dtype == np.float32
    assert report("bf16 vs f32 logits", out.logits, ref.logits) < 2e-2
    np.testing.assert_array_equal(out.loop_counts, ref.loop_counts)


def test_ids_of_any_integer_dtype(twin):
    m = model(twin)
    ids = ids_for(1)
    ref = twin.forward(m, ids, N).logits
    for dt in (np.int32, np.int16, np.uint8):
        np.testing.assert_array_equal(twin.forward(m, ids.astype(dt), N).logits, ref)
    # the twin's own int32 array (jax: a jax.Array; torch: a tensor)
    np.testing.assert_array_equal(twin.forward(m, twin.array(ids.astype(np.int32)), N).logits, ref)


@given(seed=st.integers(0, 2**16), j=st.integers(1, T - 1), variant=st.sampled_from(["gqa", "mla", "mla-om"]))
def test_causality(twin, seed, j, variant):
    m = model(twin, spread=0.0, **SPECS[variant])
    ids = ids_for(seed)
    other = ids.copy()
    other[:, j] = (other[:, j] + 1 + seed % (V - 1)) % V
    a, b = twin.forward(m, ids, N), twin.forward(m, other, N)
    np.testing.assert_allclose(a.logits[:, :j], b.logits[:, :j], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(a.loop_counts[:, :j], b.loop_counts[:, :j])
    assert not np.allclose(a.logits[:, j], b.logits[:, j])


def test_n_loops_accepts_numpy_integers_and_none(twin):
    m = model(twin)
    assert twin.forward(m, ids_for(0), np.int64(N)).traces.halt_p.shape[0] == N
    assert twin.forward(m, ids_for(0), None).traces.halt_p.shape[0] == m.spec.recurrent.max_loop_iters == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_n_loops_below_one_is_a_clear_error(twin, bad):
    with pytest.raises(ValueError, match="n_loops"):
        twin.forward(model(twin), ids_for(0), bad)


def test_bad_inputs_are_clear_errors(twin):
    m = model(twin)
    with pytest.raises(ValueError, match="vocab_size"):
        twin.forward(m, np.full((1, 4), V))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        twin.forward(m, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="max_seq_len"):
        twin.forward(m, np.zeros((1, 65), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        twin.forward(m, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="force_halt"):
        twin.forward(m, ids_for(0), 2, force_halt=np.full((B, T), 3))
    with pytest.raises(ValueError, match="force_experts"):
        twin.forward(m, ids_for(0), 2, force_experts=np.zeros((3, B, T, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="experts in 0..3"):
        twin.forward(m, ids_for(0), 2, force_experts=np.full((2, B, T, 2), 4))
    with pytest.raises(ValueError, match="-1: not forced"):
        twin.forward(m, ids_for(0), 2, force_experts=np.full((2, B, T, 2), -2))


# ------------------------------------------------------------------------------------- ACT


@given(p=st.lists(st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5), min_size=1, max_size=6),
       threshold=st.sampled_from([0.5, 0.99, 1.0]), graves=st.booleans())
def test_act_step_equals_reference_and_graves_weights_sum_to_one(twin, p, threshold, graves):
    p = np.array(p, dtype=np.float64)
    if twin.name == "jax":  # XLA on the CPU flushes subnormals to zero (torch and NumPy keep them)
        p = np.where(p < np.finfo(np.float64).tiny, 0.0, p)
    n = p.shape[0]
    w_ref, c_ref, run_ref, counts_ref, halted_ref = act_reference(p, threshold, graves, n)
    c, running = twin.array(np.zeros(5)), twin.array(np.ones(5, dtype=bool))
    total, counts = np.zeros(5), np.full(5, n)
    for t in range(n):
        np.testing.assert_array_equal(to_numpy(running), run_ref[t])
        w, c, running, halts = twin.pkg.act_step(twin.array(p[t]), c, running, threshold, graves and t == n - 1)
        np.testing.assert_array_equal(to_numpy(w), w_ref[t])
        np.testing.assert_array_equal(to_numpy(c), c_ref[t])
        total += to_numpy(w)
        counts = np.where(to_numpy(halts), t + 1, counts)
    assert ((1 <= counts) & (counts <= n)).all()
    np.testing.assert_array_equal(counts, counts_ref)
    if graves:
        np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    else:
        assert (total <= 1.0 + 1e-12).all()


@given(data=st.data(), seed=st.integers(0, 2**16), variant=st.sampled_from(["gqa", "gqa-om", "mla-om"]),
       shift=st.sampled_from([0.0, 1.5, -2.0]))
def test_act_invariants_from_traces(twin, data, seed, variant, shift):
    # jax: each n_loops is another compiled program
    n_loops = data.draw(st.integers(1, N), label="n_loops") if twin.name == "torch" else N
    m = model(twin, spread=shift, **SPECS[variant])
    graves = m.spec.halting.remainder == "graves"
    out = twin.forward(m, ids_for(seed), n_loops)
    tr, n = out.traces, int(out.n_steps)
    assert 1 <= n <= n_loops
    # independent float64 recomputation of the halting decisions from the traced p
    p = tr.halt_p[:n].reshape(n, -1)
    w, c_after, running_before, counts, halted = act_reference(p, m.spec.halting.threshold, graves, n_loops)
    np.testing.assert_array_equal(tr.running[:n].reshape(n, -1), running_before)
    np.testing.assert_array_equal(tr.cum_p[:n].reshape(n, -1), c_after)
    np.testing.assert_array_equal(out.loop_counts.reshape(-1), counts)
    np.testing.assert_array_equal(out.halted.reshape(-1), halted)
    assert ((1 <= out.loop_counts) & (out.loop_counts <= n_loops)).all()
    assert n == out.loop_counts.max()  # the loop stopped when the last position halted
    if graves:
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=0, atol=1e-12)
        assert out.halted.all()
    else:
        assert (w.sum(0) <= 1.0 + 1e-12).all()
        assert np.all(w.sum(0)[~halted] < 1.0)


@TORCH
@given(seed=st.integers(0, 2**16), n_loops=st.integers(1, 6), variant=st.sampled_from(["gqa", "gqa-om"]),
       shift=st.sampled_from([0.0, 1.5, -2.0]))
def test_torch_act_output_equals_float64_recomputation_from_states(twin, seed, n_loops, variant, shift):
    """y (the coda's input, read by a pre-hook) = sum_t w_t h_t with the states h_t read by a forward hook."""
    m = model(twin, spread=shift, **SPECS[variant])
    states, ys = [], []
    h1 = m.recurrent.register_forward_hook(lambda mod, args, out: states.append(out[0]))
    h2 = m.coda[0].register_forward_pre_hook(lambda mod, args: ys.append(args[0]))
    try:
        out = twin.forward(m, ids_for(seed), n_loops)
    finally:
        h1.remove()
        h2.remove()
    n = int(out.n_steps)
    assert len(states) == n
    p = out.traces.halt_p[:n].reshape(n, -1)
    w, *_ = act_reference(p, m.spec.halting.threshold, m.spec.halting.remainder == "graves", n_loops)
    h = np.stack([to_numpy(x) for x in states]).reshape(n, -1, m.spec.dim)
    assert report("ACT y", to_numpy(ys[0]).reshape(-1, m.spec.dim), np.einsum("tp,tpd->pd", w, h)) < 1e-12


# torch: a Python loop that breaks, bitwise equal to running every step. jax: lax.while_loop and
# lax.scan are two compiled programs (fusion and reassociation differ): a few ulps.
EARLY_EXIT_ATOL = {"torch": 0.0, "jax": 1e-13}


@given(data=st.data(), seed=st.integers(0, 2**16), shift=st.sampled_from([0.0, 1.5, -2.0]))
def test_early_exit_equals_running_all_steps(twin, data, seed, shift):
    if twin.name == "torch":
        variant = data.draw(st.sampled_from(list(SPECS)), label="variant")
        n_loops = data.draw(st.integers(1, 7), label="n_loops")
    else:  # two specs, one n_loops: each is a compiled program
        variant, n_loops = data.draw(st.sampled_from(["gqa", "mla-om"]), label="variant"), N
    atol = EARLY_EXIT_ATOL[twin.name]
    m = model(twin, spread=shift, **SPECS[variant])
    ids = ids_for(seed)
    a, b = twin.forward(m, ids, n_loops, early_exit=True), twin.forward(m, ids, n_loops, early_exit=False)
    assert int(b.n_steps) == n_loops and 1 <= int(a.n_steps) <= n_loops
    assert report("early exit vs all steps logits", a.logits, b.logits) <= atol
    np.testing.assert_array_equal(a.loop_counts, b.loop_counts)
    np.testing.assert_array_equal(a.halted, b.halted)
    n = int(a.n_steps)
    for name, x, y in zip(a.traces._fields, a.traces, b.traces):  # None: an option that is off
        assert_same(name, None if x is None else x[:n], None if y is None else y[:n], atol)


def test_trace_fill_values_for_steps_not_run(twin):
    m = model(twin, halt_bias=5.0)  # p ~ 1: everything halts at step 1
    out = twin.forward(m, ids_for(0), N)
    assert int(out.n_steps) == 1 and (out.loop_counts == 1).all()
    tr = out.traces
    assert (tr.state_norm[1:] == 0).all() and (tr.halt_p[1:] == 0).all() and (tr.cum_p[1:] == 0).all()
    assert not tr.running[1:].any() and (tr.expert_idx[1:] == -1).all() and np.isinf(tr.router_margin[1:]).all()
    assert tr.running[0].all() and (tr.expert_idx[0] >= 0).all()


REPLAY_CASES = [("torch", v, ee) for v in ("gqa", "gqa-om") for ee in (True, False)] + [("jax", "gqa", True)]


@pytest.mark.parametrize("twin, variant, early_exit", REPLAY_CASES, indirect=["twin"])
def test_force_replay_reproduces_the_unforced_run(twin, variant, early_exit):
    m = model(twin, spread=0.0, **SPECS[variant])
    ids = ids_for(7)

    def run(**kw):
        return twin.forward(m, ids, N, **{"early_exit": early_exit, **kw})

    ref = run()
    assert len(set(ref.loop_counts.flatten().tolist())) > 1  # the replay is not trivial
    forced = np.where(ref.halted, ref.loop_counts, 0)
    out = run(force_halt=forced, force_experts=ref.traces.expert_idx)
    np.testing.assert_array_equal(out.logits, ref.logits)
    np.testing.assert_array_equal(out.loop_counts, ref.loop_counts)
    np.testing.assert_array_equal(out.halted, ref.halted)
    for name, x, y in zip(ref.traces._fields, ref.traces, out.traces):
        assert_same(name, x, y)
    # -1 (the fill of steps not run) means "not forced": an early-exit trace replays into a full run
    full = run(early_exit=False)
    again = run(early_exit=False, force_experts=run(early_exit=True).traces.expert_idx)
    np.testing.assert_array_equal(again.logits, full.logits)
    np.testing.assert_array_equal(again.traces.expert_idx, full.traces.expert_idx)
    # forcing something else changes the run
    one = run(force_halt=np.ones((B, T), dtype=np.int64), force_experts=ref.traces.expert_idx)
    assert (one.loop_counts == 1).all() and one.halted.all() and int(one.n_steps) == (1 if early_exit else N)
    other = ref.traces.expert_idx[..., ::-1]  # same experts, other slot order: weights follow the experts
    assert report("slot order", run(force_experts=other).logits, ref.logits) < 1e-12
    shifted = np.where(ref.traces.expert_idx < 0, -1, np.minimum(ref.traces.expert_idx + 1, 3))
    assert not np.allclose(run(force_experts=shifted).logits, ref.logits)


def test_dense_recurrent_ffn_has_empty_expert_traces(twin):
    m = model(twin, **{"recurrent.ffn": "dense"})
    out = twin.forward(m, ids_for(0), N)
    assert out.traces.expert_idx.shape == (N, B, T, 0)
    assert np.isinf(out.traces.router_margin).all()
    with pytest.raises(ValueError, match="dense"):
        twin.pkg.update_router_bias(m.recurrent.block.ffn, twin.array(np.zeros(4)), m.spec.moe.bias_update_rate)


# ------------------------------------------------------------------------------------- MoE

MOE_SHAPES = [(5, 2, 2), (3, 3, 0)]  # jax: (n_experts, top_k, n_shared), one compiled program each
MOE_D, MOE_HIDDEN = 8, 5


@given(data=st.data(), seed=st.integers(0, 2**16), bias_scale=st.sampled_from([0.0, 0.3, 3.0]),
       forced=st.floats(0.0, 1.0))
def test_moe_dispatch_equals_naive_per_token_loop(twin, data, seed, bias_scale, forced):
    if twin.name == "torch":
        E = data.draw(st.integers(1, 6), label="n_experts")
        k = min(data.draw(st.integers(1, 6), label="top_k"), E)
        n_shared = data.draw(st.integers(0, 2), label="n_shared")
        tokens = data.draw(st.integers(1, 9), label="tokens")
    else:
        E, k, n_shared = data.draw(st.sampled_from(MOE_SHAPES), label="(E, k, n_shared)")
        tokens = 9
    rng = np.random.default_rng(seed)
    D, Hd = MOE_D, MOE_HIDDEN
    moe = twin.module("MoE", D, S.MoESpec(n_experts=E, n_shared_experts=n_shared, top_k=k, expert_dim=Hd))
    arrays = {"router": rng.normal(size=(E, D)), "bias": rng.normal(size=E) * bias_scale,
              "gate": rng.normal(size=(E, D, Hd)), "up": rng.normal(size=(E, D, Hd)),
              "down": rng.normal(size=(E, Hd, D))}
    values = {"router.weight": arrays["router"], "router_bias": arrays["bias"],
              **{f"experts.{n}": arrays[n] for n in ("gate", "up", "down")}}
    for j in range(n_shared):
        for n in ("gate", "up", "down"):
            path = f"shared_experts.{j}.{n}.weight"  # torch layout [out, in]
            arrays[f"shared.{j}.{n}"] = values[path] = rng.normal(size=twin.shape(moe, path))
    twin.set_values(moe, values)
    x = rng.normal(size=(tokens, D))
    # a share `forced` of the tokens gets drawn experts (repeats allowed); the others -1, i.e. not forced
    force = np.where(rng.random((tokens, 1)) < forced, rng.integers(0, E, (tokens, k)), -1)
    ref, chosen = naive_moe(x, arrays, k, n_shared, force)
    out, (idx, margin) = twin.apply(moe, x[None], force[None])
    assert report("MoE vs naive", out[0], ref) < 1e-10
    np.testing.assert_array_equal(idx[0], chosen)
    assert idx.dtype == np.int32
    biased = np.sort(x @ arrays["router"].T + arrays["bias"], axis=-1)[:, ::-1]
    want = biased[:, k - 1] - biased[:, k] if k < E else np.full(tokens, np.inf)
    np.testing.assert_allclose(margin[0], want, rtol=0, atol=1e-12)


def test_router_ties_go_to_the_lower_expert_index(twin):
    logits = twin.array(np.zeros((3, 7)))  # zero router weights: every logit ties
    idx, w, margin = twin.pkg.route(logits, twin.array(np.zeros(7)), 3)
    assert to_numpy(idx).tolist() == [[0, 1, 2]] * 3 and np.allclose(to_numpy(w), 1 / 3)
    assert (to_numpy(margin) == 0).all()
    idx, _, _ = twin.pkg.route(logits, twin.array(np.array([0.0, 1.0, 0.5, 1.0, 0.5, 0.0, 1.0])), 4)
    assert to_numpy(idx).tolist() == [[1, 3, 6, 2]] * 3
    # in the model: zero router weights make every token choose experts 0..k-1
    s = tiny()
    w0 = S.init_arrays(s, 0)
    w0["recurrent.block.ffn.router.weight"] = np.zeros_like(w0["recurrent.block.ffn.router.weight"])
    out = twin.forward(twin.build(s, 0, "float64", weights=w0), ids_for(0), N)
    n = int(out.n_steps)
    assert (out.traces.expert_idx[:n] == np.array([0, 1])).all()


def expert_load(twin, out) -> np.ndarray:
    """The twin's expert_load of a NumPy ModelOutput's traces (4 experts), as NumPy."""
    tr = out.traces
    return to_numpy(twin.pkg.expert_load(twin.array(tr.expert_idx), twin.array(tr.running), 4))


def test_expert_load_counts_entries_of_running_positions(twin):
    out = twin.forward(model(twin, spread=0.0), ids_for(2), N, early_exit=False)
    tr = out.traces
    load = expert_load(twin, out)
    ref = np.zeros(4, dtype=np.int64)
    for t, b, i in zip(*np.nonzero(tr.running)):
        for e in tr.expert_idx[t, b, i].tolist():
            ref[e] += 1
    assert load.dtype == np.int32
    np.testing.assert_array_equal(load, ref)
    assert int(load.sum()) == int(tr.running.sum()) * 2


def test_update_router_bias_moves_toward_under_loaded_experts_and_the_forward_sees_it(twin):
    s = tiny(**{"moe.bias_update_rate": 0.5})
    rate = s.moe.bias_update_rate
    m = twin.build(s, 4, "float64")
    ids = ids_for(4)
    before = twin.forward(m, ids, N, early_exit=False)
    load = expert_load(twin, before)
    twin.pkg.update_router_bias(m.recurrent.block.ffn, twin.array(load), rate)
    bias = twin.pkg.dump_arrays(m)["recurrent.block.ffn.router_bias"]
    lf = load.astype(np.float64)
    np.testing.assert_array_equal(bias, rate * np.sign(lf.mean() - lf))
    after = twin.forward(m, ids, N, early_exit=False)  # jax: the bias is state, it reaches the compiled program
    assert not np.array_equal(after.traces.router_margin[0], before.traces.router_margin[0])
    load2 = expert_load(twin, after)
    under = lf < lf.mean()
    assert under.any() and (load2[under] > load[under]).all()
    # bfloat16 model: the bias stays float32
    mb = twin.build(s, 4, "bfloat16")
    twin.pkg.update_router_bias(mb.recurrent.block.ffn, twin.array(load), rate)
    rb = twin.pkg.dump_arrays(mb)["recurrent.block.ffn.router_bias"]
    assert rb.dtype == np.float32 and np.array_equal(rb, bias.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        twin.pkg.update_router_bias(m.recurrent.block.ffn, twin.array(np.zeros(3)), rate)


# ------------------------------------------------------------------------------------- LoRA, LTI, loop embedding


def test_lora_index_clamp_uses_the_last_scale_row(twin):
    rng = np.random.default_rng(0)
    lora = twin.module("LoRA", 6, 3, 4)
    down, Bm, scale = rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(4, 3))
    twin.set_values(lora, {"down.weight": down, "B": Bm, "scale": scale})
    o = rng.normal(size=(2, 5, 6))
    for t in range(7):
        ref = ((o @ down.T) * scale[min(t, 3)]) @ Bm
        np.testing.assert_allclose(twin.apply(lora, o, t), ref, rtol=0, atol=1e-12)
    # in the model: all N = 6 steps run, and a change of the last scale row (index 3) shows from step 4 on
    m = model(twin)
    w = twin.pkg.dump_arrays(m)
    w["recurrent.lora.scale"] = w["recurrent.lora.scale"].copy()
    w["recurrent.lora.scale"][-1] += 1.0
    changed = twin.build(m.spec, 0, "float64", weights=w)
    never = np.zeros((B, T), dtype=np.int64)
    for n_loops in (N, 3):  # jax: forced arrays always given, as everywhere here (one compiled program)
        free = np.full((n_loops, B, T, 2), -1)
        a, b = (twin.forward(x, ids_for(0), n_loops, force_halt=never, force_experts=free) for x in (m, changed))
        assert int(a.n_steps) == n_loops
        np.testing.assert_array_equal(a.traces.state_norm[:3], b.traces.state_norm[:3])
        assert all(not np.array_equal(a.traces.state_norm[t], b.traces.state_norm[t]) for t in range(3, n_loops))
        if n_loops == N:
            assert not np.allclose(a.logits, b.logits)
        else:  # the last row is used only from step 4 on
            np.testing.assert_array_equal(a.logits, b.logits)


BIG = float(np.float32(3e38))  # near float32's largest; the sum log_dt + log_A overflows to +-inf


@given(log_A=st.lists(st.floats(-BIG, BIG, width=32), min_size=4, max_size=4),
       log_dt=st.floats(-BIG, BIG, width=32), dtype=st.sampled_from(list(NP_DTYPES)))
def test_lti_decay_is_strictly_inside_zero_one(twin, log_A, log_dt, dtype):
    inj = twin.module("LTIInjection", 4, dtype=dtype)
    twin.set_values(inj, {"log_A": np.asarray(log_A), "log_dt": np.full(1, log_dt)})
    A = to_numpy(inj.decay())
    assert A.dtype == NP_DTYPES[dtype]
    a = as_float64(A)
    assert ((a > 0) & (a < 1)).all(), a
    z = np.clip(as_float64(twin.get_value(inj, "log_dt")) + as_float64(twin.get_value(inj, "log_A")), -20, 20)
    if dtype == "float64" and np.all(np.abs(z) < 5):  # the plain formula wherever it is representable
        np.testing.assert_allclose(a, np.exp(-np.exp(z)), rtol=1e-15)


@pytest.mark.parametrize("semantics", ["mythos", "openmythos-0.5"])
def test_loop_embedding_rows_and_placement(twin, semantics):
    s = tiny(semantics=semantics, **({"halting.remainder": "openmythos"} if semantics != "mythos" else {}))
    L, t = s.loop_dim, 3
    w = 10000.0 ** (-np.arange(0, L, 2) / L)
    table = S.loop_table(s, 5, "float64")
    np.testing.assert_allclose(table[t], np.concatenate([np.sin(t * w), np.cos(t * w)]), rtol=0, atol=1e-14)
    out = to_numpy(twin.pkg.add_loop_embedding(twin.array(np.zeros((1, 1, s.dim))), twin.array(table[t])))[0, 0]
    np.testing.assert_array_equal(out[:L], table[t])
    assert (out[L:] == 0).all()


# ------------------------------------------------------------------------------------- compiles


@JAX
def test_jax_forward_compiles_once_per_shape(twin):
    jax, jnp = twin.jax, twin.jnp
    compiles: list[float] = []

    def listener(event: str, duration: float, **kw: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    m = model(twin)
    twin.forward(m, ids_for(0), N)  # warm
    x = jnp.zeros(7, dtype=jnp.float64)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x * 3)(x)  # the listener does see compiles
        assert len(compiles) == 1
        compiles.clear()
        twin.forward(m, ids_for(1), N)  # other ids
        twin.forward(twin.build(m.spec, 9, "float64"), ids_for(2), N)  # other weights, another model object
        assert compiles == []
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ------------------------------------------------------------------------------------- gradients

NONZERO_GRADS = ["recurrent.block.ffn.experts.gate", "recurrent.lora.scale", "recurrent.injection.log_A",
                 "recurrent.act.halt.weight", "embed.weight"]


@pytest.mark.parametrize("twin, variant", [("torch", "gqa"), ("torch", "mla"), ("jax", "gqa")], indirect=["twin"])
def test_gradients_reach_every_parameter_and_match_central_differences(twin, variant):
    m = model(twin, spread=0.0, **SPECS[variant])
    ids = ids_for(3)
    rng = np.random.default_rng(0)
    R, R2 = rng.normal(size=(B, T, V)), rng.normal(size=(N, B, T))
    r, r2 = twin.array(R), twin.array(R2)

    def loss(out):  # twin arrays in, a scalar out
        return (out.logits * r).sum() + (out.traces.state_norm * r2).sum()

    def loss_of(weights: dict[str, np.ndarray], early_exit: bool) -> float:
        out = twin.forward(twin.build(m.spec, 0, "float64", weights=weights), ids, N, early_exit=early_exit)
        return float((out.logits * R).sum() + (out.traces.state_norm * R2).sum())

    trainable = {p.path for p in S.manifest(m.spec) if p.kind != "buffer"}
    w = twin.pkg.dump_arrays(m)
    # jax: reverse mode through lax.scan (early_exit=False); torch also through its early exit
    for early_exit in (True, False) if twin.name == "torch" else (False,):
        value, g = twin.grads(m, loss, ids, N, early_exit=early_exit)
        assert value == pytest.approx(loss_of(w, early_exit), rel=1e-12)
        assert set(g) == trainable
        for name, a in g.items():
            assert a is not None and np.isfinite(a).all(), name
        for name in NONZERO_GRADS:
            assert np.abs(g[name]).max() > 0, name
        # the directional derivative against central differences (float64; no decision moves at this eps)
        v = {k: np.random.default_rng(1).normal(size=g[k].shape) for k in sorted(g)}
        eps = 1e-6
        fd = (loss_of({k: a + eps * v[k] if k in v else a for k, a in w.items()}, early_exit)
              - loss_of({k: a - eps * v[k] if k in v else a for k, a in w.items()}, early_exit)) / (2 * eps)
        ad = sum(float(np.vdot(g[k], v[k])) for k in v)
        assert abs(fd - ad) <= 1e-6 * max(1.0, abs(ad)), (fd, ad)


TB_LOOPS = 4  # loop steps of the truncated-backprop test


@pytest.mark.parametrize("twin, k", [("torch", 1), ("torch", 3), ("jax", 2)], indirect=["twin"])  # jax: 3 compiles each
def test_truncated_backprop_equals_a_hand_detached_reference(twin, k, monkeypatch):
    """no_grad_steps=k gives the gradients of a model whose looped block's outputs at steps t < k pass
    through a stop-gradient inserted by hand (torch: detach; jax: where(t < k, stop_gradient(x), x)): a
    reference that freezes what the step returns, where the twins freeze what the loop carries and traces.
    The twin's loss also weighs the value-head trace of the frozen steps, which must add no gradient (the
    reference leaves it out: there the value head still sees the detached states)."""
    m = model(twin, halt_bias=-3.0, **{"value_head.enabled": True})  # p ~ 0.05: every step carries weight
    ids = ids_for(11)
    rng = np.random.default_rng(k)
    R = {"logits": (B, T, V), "values": (B, T), "halt_p": (TB_LOOPS, B, T), "cum_p": (TB_LOOPS, B, T),
         "state_norm": (TB_LOOPS, B, T), "value": (TB_LOOPS, B, T)}
    r = {name: twin.array(rng.normal(size=shape)) for name, shape in R.items()}

    def loss(out):  # every output that carries gradient; the value trace of the steps t >= k
        tr = out.traces
        return ((out.logits * r["logits"]).sum() + (out.values * r["values"]).sum()
                + (tr.halt_p * r["halt_p"]).sum() + (tr.cum_p * r["cum_p"]).sum()
                + (tr.state_norm * r["state_norm"]).sum() + (tr.value[k:] * r["value"][k:]).sum())

    def loss_and_frozen_values(out):
        return loss(out) + (out.traces.value[:k] * r["value"][:k]).sum()

    _, got = twin.grads(m, loss_and_frozen_values, ids, TB_LOOPS, early_exit=False, no_grad_steps=k)
    _, full = twin.grads(m, loss, ids, TB_LOOPS, early_exit=False)

    cls = type(m.recurrent)
    step = getattr(cls, twin.call_method)
    signature = inspect.signature(step)

    def detached_first_steps(self, *args, **kw):
        t = signature.bind(self, *args, **kw).arguments["t"]
        return twin.stop_gradient_if(t < k, step(self, *args, **kw))

    monkeypatch.setattr(cls, twin.call_method, detached_first_steps)
    _, ref = twin.grads(m, loss, ids, TB_LOOPS, early_exit=False)
    monkeypatch.undo()

    assert set(got) == set(ref) == {p.path for p in S.manifest(m.spec) if p.kind != "buffer"}
    for name in sorted(ref):
        assert got[name] is not None and ref[name] is not None, name
        scale = max(1.0, float(np.abs(ref[name]).max()))
        assert report(f"no_grad_steps={k} {name} vs hand-detached", got[name], ref[name]) <= 1e-12 * scale, name
    # the truncation matters, and the loop's parameters still learn from steps k..N-1
    assert any(not np.allclose(got[n], full[n], rtol=0, atol=1e-12) for n in got)
    assert np.abs(got["recurrent.act.halt.weight"]).max() > 0


# ------------------------------------------------------------------------------------- the twins together

TWIN_SPECS = {
    "gqa-moe-graves": SPECS["gqa"],
    "mla-moe-openmythos": SPECS["mla-om"],
    "gqa-dense": {"recurrent.ffn": "dense"},
    "mla-moe-openmythos-0.5": {"attention.type": "mla", "semantics": "openmythos-0.5",
                               "halting.remainder": "openmythos"},
}


@pytest.mark.parametrize("name", list(TWIN_SPECS))
def test_twins_agree_in_float64(name):
    tt, jt = helpers.twin("torch"), helpers.twin("jax")
    jm = model(jt, spread=0.0, **TWIN_SPECS[name])
    tm = tt.build(jm.spec, 0, "float64", weights=jt.pkg.dump_arrays(jm))
    for seed in (0, 1):
        ids = ids_for(seed)
        a, b = jt.forward(jm, ids, N), tt.forward(tm, ids, N)
        assert report(f"{name} logits jax vs torch", a.logits, b.logits) <= 1e-10
        np.testing.assert_array_equal(a.loop_counts, b.loop_counts)
        np.testing.assert_array_equal(a.halted, b.halted)
        assert int(a.n_steps) == b.n_steps
        np.testing.assert_array_equal(a.traces.expert_idx, b.traces.expert_idx)
        np.testing.assert_array_equal(a.traces.running, b.traces.running)
        for field in ("state_norm", "halt_p", "cum_p", "router_margin"):
            x, y = getattr(a.traces, field), getattr(b.traces, field)
            np.testing.assert_array_equal(np.isinf(x), np.isinf(y))
            fin = ~np.isinf(x)
            assert not fin.any() or report(f"{name} {field}", x[fin], y[fin]) <= 1e-10
