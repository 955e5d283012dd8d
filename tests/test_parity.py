"""Whole-model parity of the twins: float64 exact decisions, float32 up to reported near ties,
adversarial weights, the comparison harness itself (does it catch a broken twin?), and `mythos parity`."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

import mythos_jax
import parity
from mythos.cli import app
from parity.report import FAIL, OK
from strategies import MOE_SHAPES, SHAPES, Case, adversarial_cases, cases, fixed_case

DECISIONS = ("loop_counts", "halted", "n_steps", "trace.running", "trace.expert_idx")


def run(case: Case, dtype: str, reference: str = "torch", **kw) -> parity.ParityReport:
    return parity.compare(case.spec, seed=case.seed, dtype=dtype, ids=case.ids, weights=case.weights,
                          n_loops=case.n_loops, reference=reference, **kw)


def shown(report: parity.ParityReport) -> str:
    """The rendered report, for assertion messages."""
    buf = io.StringIO()
    parity.render(report, Console(file=buf, width=160, color_system=None), max_ties=20)
    return buf.getvalue()


def disagreements(report: parity.ParityReport, phase: str = "run") -> int:
    return sum(r.disagreements or 0 for r in report.rows if r.phase == phase and r.kind == "decision")


# --------------------------------------------------------------------------- random examples


@given(case=cases())
def test_float64_logits_and_every_decision_agree(case):
    r = run(case, "float64")
    assert r.passed, shown(r)
    assert r.row("logits").max_abs <= 1e-10, shown(r)
    assert disagreements(r) == 0 and not r.near_ties, shown(r)
    assert r.row("loop_counts").disagreements == 0 and r.row("halted").disagreements == 0
    if case.spec.recurrent.ffn == "moe":
        np.testing.assert_array_equal(r.outputs["torch"].traces["expert_idx"], r.outputs["jax"].traces["expert_idx"])
    np.testing.assert_array_equal(r.outputs["torch"].loop_counts, r.outputs["jax"].loop_counts)


@given(case=cases(), reference=st.sampled_from(["torch", "jax"]))
def test_float32_agrees_up_to_reported_near_ties(case, reference):
    r = run(case, "float32", reference)
    assert r.passed, shown(r)
    if disagreements(r):
        # every discrete disagreement is a near tie or downstream of one, and the replay matched
        assert r.near_ties and r.replayed, shown(r)
        assert all(row.status == OK for row in r.rows if row.phase == "replay"), shown(r)
        assert r.row("logits", "replay").max_abs <= 2e-5
    else:
        assert r.row("logits").max_abs <= 2e-5, shown(r)


@pytest.mark.parametrize("shape", ["gqa-moe", "mla-dense-8"])
def test_replaying_the_references_own_decisions_changes_nothing(shape):
    """force_halt / force_experts: both twins, forced to the reference's decisions, give its run back."""
    r = run(fixed_case(shape, 4), "float64", replay=True)
    assert r.passed and r.replayed, shown(r)
    np.testing.assert_array_equal(r.outputs["torch"].logits, r.outputs["torch/replay"].logits)
    np.testing.assert_allclose(r.outputs["jax"].logits, r.outputs["jax/replay"].logits, rtol=0, atol=1e-12)
    for name in ("torch", "jax"):
        np.testing.assert_array_equal(r.outputs[name].loop_counts, r.outputs[f"{name}/replay"].loop_counts)
        np.testing.assert_array_equal(r.outputs[name].traces["expert_idx"], r.outputs[f"{name}/replay"].traces["expert_idx"])


# --------------------------------------------------------------------------- adversarial weights


def _adversarial_expectations(kind: str, case: Case, r: parity.ParityReport) -> None:
    s, N = case.spec, case.n_loops or case.spec.recurrent.max_loop_iters
    for name in ("torch", "jax"):
        o = r.outputs[name]
        if kind == "zero_router":
            # every expert ties at every token: the lower indices win, in both twins
            k = s.moe.top_k
            np.testing.assert_array_equal(o.traces["expert_idx"][:o.n_steps], np.broadcast_to(np.arange(k), o.traces["expert_idx"][:o.n_steps].shape))
            assert o.traces["router_margin"][:o.n_steps].max() == (np.inf if k == s.moe.n_experts else 0.0)
        elif kind == "halt_at_once":
            assert o.n_steps == 1 and (o.loop_counts == 1).all() and o.halted.all()
        elif kind == "never_halt":
            assert o.n_steps == N and (o.loop_counts == N).all()
            assert (o.halted == (s.halting.remainder == "graves")).all()


def _adversarial_case(shape: str, kind: str, seed: int) -> Case:
    return fixed_case(shape, seed, parity.adversarial_weights(SHAPES[shape], seed, kind), kind)


@pytest.mark.parametrize("kind", ["zero_router", "halt_at_once", "never_halt"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_adversarial_weights_float64(kind, shape):
    if kind == "zero_router" and shape not in MOE_SHAPES:
        with pytest.raises(ValueError, match="dense"):
            parity.adversarial_weights(SHAPES[shape], 0, kind)
        return
    case = _adversarial_case(shape, kind, 1)
    r = run(case, "float64")
    assert r.passed and disagreements(r) == 0, shown(r)
    _adversarial_expectations(kind, case, r)


@given(kc=adversarial_cases(kinds=("zero_router", "halt_at_once", "never_halt")))
def test_adversarial_weights_float32(kc):
    kind, case = kc
    r = run(case, "float32")
    assert r.passed, shown(r)
    _adversarial_expectations(kind, case, r)  # the forced extreme is decided alike by both twins


@pytest.mark.parametrize("kind", ["zero_router", "halt_at_once", "never_halt"])
def test_adversarial_weights_bfloat16(kind):
    case = _adversarial_case("gqa-moe", kind, 5)
    r = run(case, "bfloat16")
    assert r.passed, shown(r)
    _adversarial_expectations(kind, case, r)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", ["gqa-moe", "mla-dense-8"])
def test_halting_exactly_at_the_threshold_is_a_near_tie_or_agrees(shape, dtype):
    """p = threshold up to rounding everywhere: the twins may round differently; the harness must say near tie."""
    r = run(_adversarial_case(shape, "at_threshold", 2), dtype)
    assert r.passed, shown(r)
    assert r.row("loop_counts").min_margin < r.tolerances["near_tie_halting"] or dtype == "float64", shown(r)
    if r.row("loop_counts").disagreements:
        assert r.replayed and all(nt.kind == "halting" for nt in r.near_ties), shown(r)


def test_adversarial_kind_is_checked():
    with pytest.raises(ValueError, match="allowed"):
        parity.adversarial_weights(SHAPES["gqa-moe"], 0, "zero_halting")


# --------------------------------------------------------------------------- the harness catches a broken twin


def _sabotage(monkeypatch, edit):
    """Wrap mythos_jax.forward; `edit(out, forced)` returns a changed ModelOutput."""
    real = mythos_jax.forward

    def forward(model, ids, n_loops=None, **kw):
        out = real(model, ids, n_loops, **kw)
        return edit(out, kw.get("force_halt") is not None)

    monkeypatch.setattr(mythos_jax, "forward", forward)


def _set(a, index, value):
    import jax.numpy as jnp
    b = np.array(a)
    b[index] = value
    return jnp.asarray(b)


TINY = SHAPES["gqa-moe"]


def test_harness_fails_on_a_logits_error_of_1e_9(monkeypatch):
    _sabotage(monkeypatch, lambda out, forced: out._replace(logits=_set(out.logits, (0, 3, 5), float(out.logits[0, 3, 5]) + 1e-9)))
    r = parity.compare(TINY, dtype="float64")
    assert not r.passed and r.row("logits").status == FAIL
    assert "logits" in r.failures[0]


def test_harness_fails_on_a_wrong_expert_with_a_clear_margin(monkeypatch):
    def edit(out, forced):
        idx = np.array(out.traces.expert_idx)
        free = [e for e in range(TINY.moe.n_experts) if e not in idx[0, 1, 4]][0]
        return out._replace(traces=out.traces._replace(expert_idx=_set(idx, (0, 1, 4, 1), free)))

    _sabotage(monkeypatch, edit)
    r = parity.compare(TINY, dtype="float32")
    assert not r.passed and r.row("trace.expert_idx").status == FAIL
    assert any(f.startswith("routing") and "step 1 batch 1 position 4" in f for f in r.failures), r.failures


def test_harness_fails_on_a_wrong_loop_count_with_a_clear_margin(monkeypatch):
    def edit(out, forced):
        c = int(out.loop_counts[0, 2])
        return out._replace(loop_counts=_set(out.loop_counts, (0, 2), c + 1 if c < TINY.recurrent.max_loop_iters else c - 1))

    _sabotage(monkeypatch, edit)
    r = parity.compare(TINY, dtype="float64")
    assert not r.passed and r.row("loop_counts").status == FAIL
    assert any(f.startswith("halting") for f in r.failures), r.failures


def test_harness_calls_a_routing_disagreement_at_an_exact_tie_a_near_tie_and_replays(monkeypatch):
    """Zero router: every margin is 0. A twin choosing other experts there is a near tie, not a failure;
    the replay (both twins forced to the reference's experts) must then agree."""
    def edit(out, forced):
        if forced:
            return out
        idx = np.array(out.traces.expert_idx)
        return out._replace(traces=out.traces._replace(expert_idx=_set(idx, (1, 0, 6), [3, 2])))

    _sabotage(monkeypatch, edit)
    w = parity.adversarial_weights(TINY, 0, "zero_router")
    strict = parity.compare(TINY, dtype="float64", weights=w, both_directions=False)
    assert not strict.passed and "every decision must match" in strict.failures[0], shown(strict)
    r = parity.compare(TINY, dtype="float64", weights=w, allow_near_ties=True, both_directions=False)
    assert r.passed, shown(r)
    assert [(nt.kind, nt.step, nt.batch, nt.position, nt.margin) for nt in r.near_ties] == [("routing", 2, 0, 6, 0.0)]
    assert r.replayed and r.row("logits", "replay").status == OK
    assert "near ties (1;" in shown(r)


def test_harness_does_not_excuse_a_wrong_decision_in_the_replay(monkeypatch):
    """A twin that ignores force_halt is caught in the replay."""
    def edit(out, forced):
        if not forced:
            return out
        return out._replace(loop_counts=_set(out.loop_counts, (0, 0), int(out.loop_counts[0, 0]) % TINY.recurrent.max_loop_iters + 1))

    _sabotage(monkeypatch, edit)
    r = parity.compare(TINY, dtype="float64", replay=True)
    assert not r.passed and r.row("loop_counts", "replay").status == FAIL


# --------------------------------------------------------------------------- inputs and the report


def test_default_ids_hold_both_vocabulary_edges():
    s = SHAPES["mla-dense-8"]
    for b, t in [(1, 2), (2, 16), (3, 64)]:
        ids = parity.make_ids(s, b, t, seed=3)
        assert ids.shape == (b, t) and ids.min() == 0 and ids.max() == s.vocab_size - 1
    np.testing.assert_array_equal(parity.make_ids(s, 2, 16, 3), parity.make_ids(s, 2, 16, 3))


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "float16"}, "dtype='float16' is not allowed"),
    ({"reference": "numpy"}, "reference='numpy'"),
    ({"seq": 65}, "seq=65 must be an integer between 1 and max_seq_len=64"),
    ({"batch": 0}, "batch=0"),
    ({"n_loops": 0}, "n_loops=0"),
    ({"ids": np.array([[0, 64]])}, r"ids must lie in \[0, vocab_size=64\)"),
    ({"ids": np.zeros(3, int)}, "ids must be a non-empty"),
])
def test_bad_inputs_are_named(kwargs, match):
    with pytest.raises(parity.ParityInputError, match=match):
        parity.compare(TINY, **kwargs)


def test_report_json_and_table():
    r = parity.compare("tiny", dtype="float32", reference="jax")
    d = json.loads(r.to_json())
    assert d["passed"] is True and d["reference"] == "jax" and d["dtype"] == "float32"
    rows = {(row["output"], row["phase"]): row for row in d["rows"]}
    assert rows[("logits", "run")]["max_abs"] <= 2e-5
    assert rows[("loop_counts", "run")]["disagreements"] == 0
    assert set(d["tolerances"]) == {"logits", "values", "value", "state_norm", "halt_p", "cum_p", "router_margin",
                                    "near_tie_halting", "near_tie_routing", "how"}
    assert d["reverse"]["reference"] == "torch" and d["reverse"]["passed"] is True and d["weights"] == "probe"
    text = shown(r)
    for word in ("output", "max abs", "max rel", "disagree", "min margin", "tolerance", "status", "PASS"):
        assert word in text


# --------------------------------------------------------------------------- the CLI


cli = CliRunner()


def test_cli_parity_passes_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    res = cli.invoke(app, ["parity", "tiny", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "logits" in res.output
    d = json.loads(out.read_text())
    assert d["passed"] is True and d["spec"] == "tiny" and d["dtype"] == "float64" and d["n_loops"] == 6  # probe: 4 trained + 2


@pytest.mark.parametrize("args, match", [
    (["parity", "no-such-preset"], "spec error"),
    (["parity", "tiny", "--set", "attention.n_heads=5"], "attention.n_heads=5 must divide dim=32"),
    (["parity", "tiny", "--set", "nonsense"], "spec error"),
    (["parity", "tiny", "--dtype", "float16"], "--dtype 'float16' is not allowed"),
    (["parity", "tiny", "--seq", "65"], "--seq=65 must be an integer in [1, 64]"),
    (["parity", "tiny", "--reference", "numpy"], "--reference 'numpy'"),
    (["parity", "tiny", "--backends", "torch,numpy"], "--backends 'numpy' is not allowed; allowed: torch, jax, onnx"),
    (["parity", "tiny", "--backends", "jax"], "must name at least two different backends"),
    (["parity", "tiny", "--backends", "torch,jax", "--reference", "onnx"], "--reference 'onnx' is not allowed"),
    (["parity", "tiny", "--batch", "0"], "Invalid value for '--batch'"),  # typer: min=1
    (["parity", "tiny", "--loops", "0"], "--loops=0 must be an integer in [1, 256]"),
])
def test_cli_bad_input_exits_2(args, match):
    res = cli.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert match in res.output
    assert "Traceback" not in res.output


def test_cli_parity_failure_exits_1(monkeypatch, tmp_path):
    _sabotage(monkeypatch, lambda out, forced: out._replace(logits=out.logits * 1.001))
    out = tmp_path / "r.json"
    res = cli.invoke(app, ["parity", "tiny", "--dtype", "float32", "--json", str(out)])
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output
    assert json.loads(out.read_text())["passed"] is False


def test_cli_entry_point_runs_in_a_fresh_process():
    res = subprocess.run([sys.executable, "-m", "mythos.cli", "parity", "tiny", "--dtype", "float32", "--set", "attention.type=mla",
                          "--batch", "1", "--seq", "5", "--loops", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout and "tiny (attention.type=mla)" in res.stdout
