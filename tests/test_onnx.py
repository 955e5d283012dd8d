"""The ONNX path: the torch twin's torch.while_loop form, `mythos export onnx`, and ONNX Runtime as a backend.

The while_loop form must equal the eager loop bit for bit (it is the same loop_step); the exported graph,
run by onnxruntime, must equal the torch twin within float32 / float64 rounding, with identical loop
counts, halting, n_steps and experts, and honour forced decisions (replay). One float64 export of tiny
(through the CLI) serves the default tier; float32, MLA and dense specs through backends.twin("onnx")
are `slow` (an export takes ~20 s on a shared 2-core box). The decode-step graph (`--cache`) must equal
the twin's cached forward row for row, and its generate the twin's tokens; hypothesis draws the inputs
(shapes, ids, forced decisions) over the strategies' spec shapes, one export per shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

import spec as S
import mythos_torch as mt
from helpers import ids_for
from mythos.cli import app
from weights_bridge import backends

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
TOL = {"float64": 1e-10, "float32": 1e-6}
N = 4


def _onnx():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mythos[onnx]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'mythos[onnx]')")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'mythos[onnx]')")
    return backends.twin("onnx")


def _torch_out(model, ids, n, fh=None, fe=None):
    with torch.no_grad():
        return mt.forward(model, torch.from_numpy(ids), n, force_halt=None if fh is None else torch.from_numpy(fh),
                          force_experts=None if fe is None else torch.from_numpy(fe))


def assert_same(a, o, dtype: str) -> None:
    """torch ModelOutput a vs onnx ModelOutput o: floats within TOL (relative to the magnitude for the
    unbounded state norms), decisions identical; prints max errors."""
    tol = TOL[dtype]
    assert int(a.n_steps) == o.n_steps
    np.testing.assert_array_equal(a.loop_counts.numpy(), o.loop_counts)
    np.testing.assert_array_equal(a.halted.numpy(), o.halted)
    err = float(np.abs(a.logits.numpy() - o.logits).max())
    print(f"logits max err {err:.2e} (n_steps {o.n_steps})")
    assert err <= tol
    for f in ("state_norm", "halt_p", "cum_p", "running", "expert_idx", "router_margin", "value"):
        x, y = getattr(a.traces, f), getattr(o.traces, f)
        if x is None:
            assert y is None, f
            continue
        x = x.numpy()
        assert x.shape == y.shape and x.dtype == y.dtype, (f, x.shape, y.shape, x.dtype, y.dtype)
        if x.dtype.kind != "f":
            np.testing.assert_array_equal(x, y, err_msg=f)
            continue
        fin = np.isfinite(x)
        np.testing.assert_array_equal(fin, np.isfinite(y), err_msg=f)  # +inf margins (fills, k = E) in both
        scale = max(1.0, float(np.abs(x[fin]).max())) if fin.any() else 1.0
        assert float(np.abs(x[fin] - y[fin]).max(initial=0.0)) <= tol * scale, f


# --------------------------------------------------------------------------- the while_loop form (torch only)

@pytest.mark.parametrize("overrides", [
    {}, {"attention.type": "mla"}, {"recurrent.ffn": "dense"},
    {"value_head.enabled": True, "recurrent.cross_loop_attention.enabled": True,
     "recurrent.memory_gate.enabled": True, "recurrent.compressor.enabled": True, "recurrent.compressor.chunk": 4},
], ids=["tiny", "mla", "dense", "components"])
def test_while_loop_form_equals_the_eager_loop(overrides):
    s = S.preset("tiny", overrides=overrides)
    model = mt.build(s, seed=0, dtype="float64")
    ids = ids_for(1)
    fh = np.array([[1, 2, 0, -1, 3, 4] * 2] * 2)
    for n, force in ((N, None), (8, None), (2, None), (N, fh)):
        model.loop_form = "for"
        a = _torch_out(model, ids, n, force)
        model.loop_form = "while"
        b = _torch_out(model, ids, n, force)
        assert a.n_steps == int(b.n_steps)
        for x, y in zip((a.logits, a.loop_counts, a.halted, *a.traces), (b.logits, b.loop_counts, b.halted, *b.traces)):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y) or (x.dtype.is_floating_point and torch.equal(x.isnan(), y.isnan()))


def test_while_loop_form_refuses_training():
    model = mt.build(S.preset("tiny"), seed=0, dtype="float32")
    model.loop_form = "while"
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(torch.from_numpy(ids_for(0)), 2)


# --------------------------------------------------------------------------- export + onnxruntime (default tier)

@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """tiny, float64, N = 4, dynamic batch and seq: exported once through the CLI, loaded from the file."""
    return _export_tiny64(tmp_path_factory, "tiny.onnx")


def _export_tiny64(tmp_path_factory, name: str, *flags: str):
    """(path, OnnxModel from the file, the torch twin): tiny in float64 with N = 4, through `mythos export onnx`."""
    ox = _onnx()
    out = tmp_path_factory.mktemp("onnx") / name
    r = runner.invoke(app, ["export", "onnx", "tiny", str(out), "--dtype", "float64", "--loops", str(N), *flags])
    assert r.exit_code == 0, r.output
    s = S.preset("tiny")
    return out, ox.OnnxModel.from_file(out, s, threads=1), mt.build(s, seed=0, dtype="float64")


def test_graph_has_one_loop_node_and_the_documented_io(tiny64):
    import onnx

    path, _, _ = tiny64
    g = onnx.load(str(path)).graph
    ops = [n.op_type for n in g.node]
    print(f"{len(ops)} nodes")
    assert ops.count("Loop") == 1
    ox = backends.twin("onnx")
    assert [i.name for i in g.input] == list(ox.INPUTS)
    assert [o.name for o in g.output] == list(ox.OUTPUTS)


def test_onnxruntime_equals_torch_float64_dynamic_shapes(tiny64):
    _, om, tm = tiny64
    for B, T in ((2, 12), (1, 1), (3, 5), (1, 64)):  # example shape (2, 8): every one of these is dynamic
        ids = ids_for(B * 100 + T, B=B, T=T)
        assert_same(_torch_out(tm, ids, N), backends.forward("onnx", om, ids, N), "float64")


def test_forced_decisions_are_honoured(tiny64):
    _, om, tm = tiny64
    ids = ids_for(3)
    fh = np.array([[1, 2, 3, 4, 0, -1] * 2, [4, 0, -1, 3, 2, 1] * 2])
    fe = np.random.default_rng(0).integers(-1, 4, (N, 2, 12, 2))
    o = backends.forward("onnx", om, ids, N, force_halt=fh, force_experts=fe)
    assert_same(_torch_out(tm, ids, N, fh, fe), o, "float64")
    forced = fh > 0
    np.testing.assert_array_equal(o.loop_counts[forced], fh[forced])
    assert o.n_steps == N
    ran = o.traces.running  # (N, B, T): where a forced expert is given and the position runs, it is used
    given = (fe >= 0).all(-1) & ran
    np.testing.assert_array_equal(o.traces.expert_idx[given], fe[given])


def test_onnx_backend_refuses_bad_input(tiny64):
    _, om, _ = tiny64
    ox = backends.twin("onnx")
    with pytest.raises(ValueError, match="vocab_size"):
        ox.forward(om, np.full((1, 3), 64), N)
    with pytest.raises(ValueError, match="force_experts must have shape"):
        ox.forward(om, ids_for(0), N, force_experts=np.zeros((N, 2, 12, 3), np.int64))
    with pytest.raises(ValueError, match=r"\(n_loops=4\); it has no full-sequence graph for n_loops=3"):
        ox.forward(om, ids_for(0), 3)
    with pytest.raises(ValueError, match="it has no decode-step graph for n_loops=4 .*--loops 4 --cache"):
        ox.generate(om, ids_for(0), 2, N)
    with pytest.raises(ValueError, match="holds no weights"):
        ox.dump_arrays(om)


def test_registry_lists_onnx_as_a_runtime_not_a_twin():
    assert backends.BACKENDS == ("torch", "jax")
    assert backends.RUNTIMES == ("onnx",) and backends.ALL_BACKENDS == ("torch", "jax", "onnx")
    assert backends.dtypes_of("onnx") == ("float32", "float64")
    ox = backends.twin("onnx")
    for name in ("build", "forward", "init_cache", "decode", "generate", "dump_arrays", "set_parity_precision",
                 "OnnxModel"):
        assert hasattr(ox, name), name
    with pytest.raises(ValueError, match="allowed: torch, jax$"):
        backends.other("onnx")


@pytest.mark.parametrize("args, message", [
    (["--dtype", "bfloat16"], "--dtype 'bfloat16' is not allowed"),
    (["--dynamic", "batch,heads"], "--dynamic 'heads' is not allowed"),
    (["--loops", "0"], "--loops 0 must be an integer >= 1"),
    (["--cache", "--set", "recurrent.compressor.enabled=true", "--set", "recurrent.compressor.chunk=4"],
     "the compressor's per-chunk summaries (recurrent.compressor.enabled) are not positions"),
    (["--set", "dim=33"], "dim"),
])
def test_export_cli_refuses_bad_input(tmp_path, args, message):
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", "onnx", "tiny", str(out), *args])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output
    assert not out.exists()


def test_export_cli_refuses_a_missing_folder(tmp_path):
    r = runner.invoke(app, ["export", "onnx", "tiny", str(tmp_path / "no" / "m.onnx")])
    assert r.exit_code == 2 and "does not exist" in r.output


# --------------------------------------------------------------------------- the decode-step graph (default tier)

@pytest.fixture(scope="module")
def tiny64_step(tmp_path_factory):
    """tiny, float64, N = 4: the decode-step graph (`--cache`), exported once through the CLI."""
    return _export_tiny64(tmp_path_factory, "tiny-step.onnx", "--cache")


def test_decode_graph_io_past_in_present_out(tiny64_step):
    import onnx

    path, _, _ = tiny64_step
    g = onnx.load(str(path)).graph
    assert [i.name for i in g.input] == ["ids", "past_k", "past_v"]
    assert [o.name for o in g.output] == [*backends.twin("onnx").OUTPUTS, "present_k", "present_v"]
    dims = [d.dim_param or d.dim_value for d in g.input[1].type.tensor_type.shape.dim]
    assert dims[1:3] == ["batch", "past"], dims  # (L, B, P, H_kv, K): batch and past length dynamic


def assert_cache_same(torch_cache, present: dict, end: int, tol: float) -> None:
    """The twin's KVCache rows 0..end-1 against the graph's present arrays."""
    for name, a in present.items():
        ref = torch_cache.arrays[name][:, :, :end].numpy()
        assert a.shape == ref.shape, (name, a.shape, ref.shape)
        assert float(np.abs(a - ref).max()) <= tol, name


def test_decode_graph_equals_the_torch_cached_decode(tiny64_step):
    """Prefill (P = 0), a chunk, then single tokens: logits, decisions, traces and every cache row as the
    twin's cached forward on the same positions, and the last logits as the full forward's."""
    _, om, tm = tiny64_step
    ox = backends.twin("onnx")
    ids = ids_for(7, B=3, T=11)
    cache = tm.init_cache(3, 11, N)
    past, pos = ox.init_cache(om, 3, N), 0
    for chunk in (5, 3, 1, 1, 1):
        with torch.no_grad():
            a = mt.forward(tm, torch.from_numpy(ids[:, pos:pos + chunk]), N, cache=cache, start_pos=pos)
        o = ox.decode(om, ids[:, pos:pos + chunk], N, past)
        assert_same(a, o, "float64")
        pos += chunk
        assert_cache_same(cache, o.cache, pos, TOL["float64"])
        past = o.cache
    full = _torch_out(tm, ids, N)
    assert float(np.abs(o.logits[:, -1] - full.logits[:, -1].numpy()).max()) <= TOL["float64"]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": 5},
                                      {"temperature": 1.0, "top_p": 0.9, "seed": 1, "eos_id": 3}],
                         ids=["greedy", "top-k", "top-p-eos"])
def test_onnx_generate_equals_the_torch_twin(tiny64_step, sampling):
    """The same host sampler (spec.sampling) on logits that agree to 1e-12: the same tokens, row by row."""
    _, om, tm = tiny64_step
    ids = ids_for(11, B=2, T=6)
    want = tm.generate(torch.from_numpy(ids), 12, N, **sampling).numpy()
    got = backends.twin("onnx").generate(om, ids, 12, N, **sampling)
    np.testing.assert_array_equal(got, want)


def test_decode_graph_refuses_bad_input(tiny64_step):
    _, om, _ = tiny64_step
    ox = backends.twin("onnx")
    with pytest.raises(ValueError, match="cache must hold the arrays k, v"):
        ox.decode(om, ids_for(0), N, {"k": np.zeros((1,))})
    past = ox.init_cache(om, 2, N)
    past = {n: np.zeros((*a.shape[:2], 60, *a.shape[3:])) for n, a in past.items()}
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        ox.decode(om, ids_for(0), N, past)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ox.generate(om, ids_for(0), -1, N)


# --------------------------------------------------------------------------- hypothesis over spec shapes

def _shape_onnx(name: str, dtype: str):
    """(spec, n_loops, torch model, onnx model) of a strategies shape, seed-0 weights: one export per shape and
    dtype in the process (backends.twin("onnx") keeps graphs by weight digest), shared by the drawn inputs."""
    from strategies import SHAPE_TABLE, SHAPES

    s = SHAPES[name]
    n = SHAPE_TABLE[name][1] or s.recurrent.max_loop_iters
    tm = mt.build(s, seed=0, dtype=dtype)
    return s, n, tm, _onnx().build(s, 0, dtype, mt.dump_arrays(tm))


@st.composite
def onnx_inputs(draw, shapes: list[str]):
    """(shape name, ids, force_halt or None, force_experts or None): the graph's dynamic inputs, drawn."""
    from strategies import SHAPE_TABLE, SHAPES, token_ids

    name = draw(st.sampled_from(shapes))
    s = SHAPES[name]
    n = SHAPE_TABLE[name][1] or s.recurrent.max_loop_iters
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    ids = draw(token_ids(s, (B, T)))
    fh = draw(st.none() | hnp.arrays(np.int64, (B, T), elements=st.integers(-1, n)))
    k = s.moe.top_k if s.recurrent.ffn == "moe" else 0
    fe = None
    if k and draw(st.booleans()):
        fe = draw(hnp.arrays(np.int64, (n, B, T, k), elements=st.integers(-1, s.moe.n_experts - 1)))
    return name, ids, fh, fe


DEFAULT_SHAPES = ["mla-moe-mlp", "gqa-dense-1"]  # tiny (gqa-moe) is the fixtures' spec; all six under -m slow


@settings(max_examples=8)
@given(inp=onnx_inputs(DEFAULT_SHAPES))
def test_onnx_equals_torch_over_spec_shapes(inp):
    """float64 (decisions exact: onnxruntime lands ~1e-11 from torch): drawn shapes, lengths, ids and forced
    decisions through one dynamic graph per spec shape."""
    name, ids, fh, fe = inp
    s, n, tm, om = _shape_onnx(name, "float64")
    assert_same(_torch_out(tm, ids, n, fh, fe), backends.forward("onnx", om, ids, n, force_halt=fh, force_experts=fe),
                "float64")


@pytest.mark.slow
@settings(max_examples=40)
@given(inp=onnx_inputs(["gqa-moe", "mla-moe-mlp", "gqa-dense-1", "mla-dense-8", "gqa-moe-all-k", "om-0.5"]),
       chunks=st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_onnx_full_and_decode_graphs_equal_torch_over_all_shapes(inp, chunks):
    """Every strategies shape: the full graph as the forward, and the decode-step graph over drawn chunks as
    the twin's cached decode."""
    name, ids, fh, fe = inp
    s, n, tm, om = _shape_onnx(name, "float64")
    assert_same(_torch_out(tm, ids, n, fh, fe), backends.forward("onnx", om, ids, n, force_halt=fh, force_experts=fe),
                "float64")
    ox = backends.twin("onnx")
    B, T = ids.shape
    cache, past, pos = tm.init_cache(B, T, n), ox.init_cache(om, B, n), 0
    for c in chunks + [T]:
        if pos >= T:
            break
        c = min(c, T - pos)
        with torch.no_grad():
            a = mt.forward(tm, torch.from_numpy(ids[:, pos:pos + c]), n, cache=cache, start_pos=pos)
        o = ox.decode(om, ids[:, pos:pos + c], n, past)
        assert_same(a, o, "float64")
        pos += c
        assert_cache_same(cache, o.cache, pos, TOL["float64"])
        past = o.cache


# --------------------------------------------------------------------------- more specs and dtypes (slow)

@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("overrides", [{}, {"attention.type": "mla"}, {"recurrent.ffn": "dense"},
                                       {"value_head.enabled": True, "recurrent.cross_loop_attention.enabled": True}],
                         ids=["tiny", "mla", "dense", "value-crossloop"])
def test_built_onnx_backend_equals_torch(dtype, overrides):
    ox = _onnx()
    s = S.preset("tiny", overrides=overrides)
    tm = mt.build(s, seed=0, dtype=dtype)
    om = ox.build(s, 0, dtype, mt.dump_arrays(tm))
    for B, T in ((2, 12), (1, 7)):
        ids = ids_for(B * 10 + T, B=B, T=T)
        assert_same(_torch_out(tm, ids, 3), ox.forward(om, ids, 3), dtype)
    fh = np.array([[1, 3, 0, -1, 2, 1] * 2] * 2)
    ids = ids_for(5)
    assert_same(_torch_out(tm, ids, 3, fh), ox.forward(om, ids, 3, force_halt=fh), dtype)
    assert ox.dump_arrays(om).keys() == mt.dump_arrays(tm).keys()


def test_parity_with_onnx_as_a_third_backend():
    """`mythos parity --backends torch,jax,onnx`: every pair against the reference, both directions, one verdict.

    float32, where bounds come from each backend's measured noise: in float64 onnxruntime's CPU kernels
    land ~9e-12 from torch (tiny, probe weights), above the twins' float64 bound of 3.2e-13 (the twins agree
    to ~1e-15), so a float64 comparison with onnx fails by design; docs/verdicts.md says so.
    """
    _onnx()
    import parity

    r = parity.compare("tiny", dtype="float32", backends=("torch", "jax", "onnx"))
    assert r.passed, r.all_failures()
    assert (r.reverse.reference, r.reverse.other) == ("jax", "torch")
    assert [(p.reference, p.other) for p in r.pairs] == [("torch", "onnx"), ("onnx", "torch")]
    np.testing.assert_array_equal(r.outputs["torch"].loop_counts, r.outputs["onnx"].loop_counts)
