"""Golden reports (parity/golden.py): both twins against every shipped golden, a moved output is a named failure,
a corrupt, foreign or other-spec golden is refused. The shipped goldens are re-recorded only deliberately:
python -m parity.golden --rerecord tests/goldens (docs/regression.md)."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import mythos_jax  # noqa: F401  (imported before any JAX array: the parity switches in conftest)
import mythos_torch
import spec as S
from mythos.cli import app
from parity import golden
from parity.golden import GoldenError

GOLDENS = Path(__file__).parent / "goldens"
# the default tier checks these (both attention types, both dtypes); the rest run with -m slow
FAST = ("tiny-float64", "tiny-float32", "bench-s-gqa-float32", "bench-s-mla-float64")
SHIPPED = sorted(GOLDENS.glob("*.npz"))
runner = CliRunner()


def test_every_preset_is_shipped_in_both_dtypes():
    names = {p.stem for p in SHIPPED}
    assert names == {f"{p}-{dt}" for p in golden.SHIPPED for dt in golden.SHIPPED_DTYPES}
    assert all(p.stat().st_size < 128 * 1024 for p in SHIPPED), [(p.name, p.stat().st_size) for p in SHIPPED]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=() if p.stem in FAST else pytest.mark.slow)
                                  for p in SHIPPED])
def test_twins_reproduce_the_shipped_golden(path):
    r = golden.against(path)
    assert r.passed, golden.render_text(r)
    assert list(r.checks) == ["torch", "jax"] and r.moved() == []
    g = golden.read(path)
    assert g.meta["versions"]["torch"].startswith("2.13.0")  # recorded with the pinned torch
    assert g.spec == S.preset(g.meta["spec_label"])  # and today's preset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A float64 golden of tiny, recorded here (torch only: fast)."""
    return golden.record("tiny", tmp_path_factory.mktemp("golden") / "tiny.npz", dtype="float64")


def _moving(monkeypatch, output: str, by: float = 1e-9) -> None:
    """The torch twin's forward with one output moved by `by` (relative for state_norm)."""
    real = mythos_torch.forward

    def moved(*args, **kwargs):
        out = real(*args, **kwargs)
        if output == "logits":
            return out._replace(logits=out.logits + by)
        tr = out.traces
        return out._replace(traces=tr._replace(state_norm=tr.state_norm * (1 + by)))

    monkeypatch.setattr(mythos_torch, "forward", moved)


@pytest.mark.parametrize("output", ["logits", "trace.state_norm"])
def test_an_output_moved_by_1e9_is_a_named_failure(tiny, monkeypatch, output):
    assert golden.against(tiny, backends=("torch",), recalibrate=False).passed
    _moving(monkeypatch, output)
    r = golden.against(tiny, backends=("torch",), recalibrate=False)
    assert not r.passed
    assert f"torch: {output}" in r.moved()
    expected = {"logits": ["torch: logits", "torch: logits.logsumexp"], "trace.state_norm": ["torch: trace.state_norm"]}
    assert r.moved() == expected[output]  # nothing else moved
    line = next(f for f in r.all_failures() if f.startswith(f"[torch vs golden] {output}:"))
    assert "max " in line and " > " in line, line  # by how much, and the bound
    text = golden.render_text(r)
    assert "FAIL" in text and output in text
    assert r.to_dict()["moved"] == r.moved()  # and in the JSON


def test_moved_weights_and_probe_are_named(tiny, monkeypatch):
    real_perturbed, real_probe = golden.perturbed_arrays, golden.probe_weights

    def perturbed(s, seed=0):
        out = real_perturbed(s, seed)
        out["coda.0.attn.wq.weight"] = out["coda.0.attn.wq.weight"] + 1e-12
        return out

    monkeypatch.setattr(golden, "perturbed_arrays", perturbed)
    r = golden.against(tiny, backends=("torch",))
    assert r.moved() == ["weights"] and not r.checks
    assert "coda.0.attn.wq.weight" in r.failures[0]
    monkeypatch.setattr(golden, "perturbed_arrays", real_perturbed)

    def probe(*args, **kwargs):
        out = real_probe(*args, **kwargs)
        out["recurrent.act.halt.bias"] = out["recurrent.act.halt.bias"] + 1e-6
        return out

    monkeypatch.setattr(golden, "probe_weights", probe)
    r = golden.against(tiny, backends=("torch",))
    assert r.moved() == ["probe calibration"] and r.checks["torch"].passed  # the outputs, on the golden's head
    assert "probe weights moved" in r.failures[0]


def _rewrite(src: Path, dst: Path, drop: tuple[str, ...] = (), **replace) -> Path:
    with np.load(src) as f:
        data = {k: f[k] for k in f.files if k not in drop}
    data.update(replace)
    np.savez_compressed(dst, **data)
    return dst


def test_missing_corrupt_and_foreign_goldens_are_refused(tiny, tmp_path):
    bad = {
        "missing": tmp_path / "nope.npz",
        "not a zip": tmp_path / "garbage.npz",
        "truncated": tmp_path / "truncated.npz",
        "foreign": tmp_path / "foreign.npz",
        "pickled": tmp_path / "pickled.npz",
        "no logits": _rewrite(tiny, tmp_path / "no-logits.npz", drop=("logits.sample",)),
        "other format": _rewrite(tiny, tmp_path / "v9.npz", format=np.array("mythos-golden/9")),
        "bad shape": _rewrite(tiny, tmp_path / "shape.npz", loop_counts=np.zeros((3, 3), np.int64)),
        "bad metadata": _rewrite(tiny, tmp_path / "meta.npz", meta=np.array("{not json")),
    }
    bad["not a zip"].write_bytes(b"not a golden\n" * 10)
    bad["truncated"].write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    np.savez(bad["foreign"], x=np.arange(3))
    np.savez(bad["pickled"], format=np.array("mythos-golden/1"), x=np.array([{"a": 1}], dtype=object))
    messages = {"missing": "no such golden file", "not a zip": "not a readable golden", "truncated": "not a readable",
                "foreign": "not a Mythos golden", "pickled": "not a readable", "no logits": "'logits.sample' is missing",
                "other format": "mythos-golden/9", "bad shape": "'loop_counts'", "bad metadata": "not JSON"}
    for what, path in bad.items():
        with pytest.raises(GoldenError, match=messages[what]):
            golden.against(path)
        r = runner.invoke(app, ["parity", "tiny", "--against", str(path)])
        assert r.exit_code == 2 and messages[what].split("'")[0] in r.output.replace("\n", ""), (what, r.output)


def test_a_golden_of_another_spec_is_refused(tiny):
    with pytest.raises(GoldenError, match="different spec.*moe.top_k: 2 vs 1"):
        golden.against(tiny, spec=S.preset("tiny", {"moe.top_k": 1}))
    r = runner.invoke(app, ["parity", "bench-s-gqa", "--against", str(tiny)])
    assert r.exit_code == 2 and "different spec" in r.output and "vocab_size: 64 vs 4096" in r.output
    r = runner.invoke(app, ["parity", "tiny", "--set", "halting.threshold=0.9", "--against", str(tiny)])
    assert r.exit_code == 2 and "halting.threshold: 0.99 vs 0.9" in r.output


def test_cli_refuses_conflicting_options_before_any_work(tiny, tmp_path):
    cases = {
        ("--seed", "3", "--against", str(tiny)): "--seed 3 differs from the golden's 0",
        ("--dtype", "float32", "--against", str(tiny)): "--dtype float32 differs",
        ("--record", str(tmp_path / "a.npz"), "--against", str(tiny)): "exclude each other",
        ("--record", str(tmp_path / "no" / "a.npz")): "does not exist",
        ("--record", str(tmp_path)): "is a directory",
    }
    for args, message in cases.items():
        r = runner.invoke(app, ["parity", "tiny", *args])
        assert r.exit_code == 2 and message in r.output.replace("\n", " "), (args, r.output)


def test_cli_record_then_against_and_a_moved_output_exits_1(tmp_path, monkeypatch):
    path, report = tmp_path / "g.npz", tmp_path / "g.json"
    r = runner.invoke(app, ["parity", "tiny", "--one-direction", "--record", str(path)])
    assert r.exit_code == 0 and path.is_file() and "golden written" in r.output, r.output
    assert golden.read(path).meta["spec_label"] == "tiny"
    r = runner.invoke(app, ["parity", "tiny", "--against", str(path), "--json", str(report)])
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    _moving(monkeypatch, "logits")
    r = runner.invoke(app, ["parity", "tiny", "--against", str(path), "--json", str(report)])
    assert r.exit_code == 1 and "FAIL" in r.output and "torch: logits" in r.output.replace("\n", " "), r.output
    import json

    d = json.loads(report.read_text())
    assert d["passed"] is False and "torch: logits" in d["moved"] and d["checks"]["jax"]["passed"] is True


def test_the_golden_is_compact_and_complete(tiny):
    with zipfile.ZipFile(tiny) as z:
        names = {i.filename.removesuffix(".npy") for i in z.infolist()}
    assert {"format", "meta", "spec_yaml", "ids", "logits.sample", "logits.lse", "loop_counts", "halted", "n_steps",
            "weights.paths", "weights.sha256", "trace.expert_idx", "trace.cum_p",
            "probe.recurrent.act.halt.weight"} <= names
    g = golden.read(tiny)
    assert set(g.meta["versions"]) == set(golden.VERSIONED) and g.noise is None  # float64: no noise run
    assert g.columns.size == 64 and g.outputs.logits.shape == (2, 16, 66)  # all columns, + max, min
    arrays, moved = golden.rebuild_weights(g)
    assert moved == [] and list(arrays) == [p.path for p in S.manifest(g.spec)]
    buf = io.BytesIO(tiny.read_bytes())
    assert buf.getbuffer().nbytes < 64 * 1024
