"""The pytest plugin (parity/plugin.py) as a user's suite sees it: run through pytester, in process."""

import numpy as np

import mythos_jax  # noqa: F401  (in sys.modules before pytester snapshots it: the inner runs reuse the twins)
import mythos_torch  # noqa: F401
import parity.golden  # noqa: F401
from parity.plugin import compare_outputs

pytest_plugins = ["pytester"]


def test_parity_check_passes_on_tiny_and_fails_with_the_report(pytester):
    pytester.makepyfile("""
        import mythos_torch

        def test_agree(parity_check):
            report = parity_check("tiny", dtype="float64", both_directions=False)
            assert report.passed and report.row("logits").status == "ok"

        def test_disagree(parity_check, monkeypatch):
            real = mythos_torch.forward

            def moved(*args, **kwargs):
                out = real(*args, **kwargs)
                return out._replace(logits=out.logits * (1 + 1e-6))

            monkeypatch.setattr(mythos_torch, "forward", moved)
            parity_check("tiny", dtype="float64", both_directions=False)
    """)
    result = pytester.runpytest("-p", "parity.plugin")  # explicit, besides the installed entry point
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*parity tiny (float64*torch (reference) vs jax*", "*logits*FAIL*",
                                 "*logits: max abs*", "*FAIL: 1 failure(s)*"])
    assert "Traceback" not in result.stdout.str()  # the report is the message


def test_parity_pair_names_what_differs_in_a_table(pytester):
    pytester.makepyfile("""
        import numpy as np

        def reference():
            x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
            return {"logits": x @ x.T, "ids": np.arange(8), "mask": np.ones(8, bool)}

        def mine():
            out = reference()
            out["logits"] = out["logits"] + np.float32(1e-3)
            out["ids"][3] = 0
            return out

        def anchor():  # the reference in float64: its distance measures float32's rounding noise
            x = np.linspace(-1, 1, 64).reshape(8, 8)
            return {"logits": x @ x.T}

        def test_same(parity_pair):
            report = parity_pair(reference, reference, anchor=anchor)
            assert report.passed and report.rows[0].tolerance.startswith("abs <= ")

        def test_differ(parity_pair):
            parity_pair(reference, mine, atol={"logits": 1e-5}, names=("numpy", "mine"))

        def test_derived(parity_pair):
            parity_pair(reference, mine, anchor=anchor)
    """)
    result = pytester.runpytest("-p", "parity.plugin")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*numpy (reference) vs mine*", "*logits*float32 (8, 8)*1.00e-03*abs <= 1.0e-05*FAIL*",
                                 "*ids*int64 (8,)*1/8*equal*FAIL*", "*mask*ok*", "*logits: max abs 1.000e-03 > 1.0e-05*",
                                 "*ids: 1 of 8 value(s) differ (first at (3,): 3 vs 0)*"])


def test_the_entry_point_loads_the_plugin_without_p(pytester):
    pytester.makepyfile("def test_fixtures(parity_check, parity_pair, parity_golden):\n    pass\n")
    pytester.runpytest().assert_outcomes(passed=1)


def test_compare_outputs_missing_names_shapes_and_frameworks():
    import torch

    ref = {"a": np.zeros(3), "b": np.zeros((2, 2)), "c": torch.zeros(4, dtype=torch.bfloat16)}
    oth = {"b": np.zeros((2, 3)), "c": torch.zeros(4, dtype=torch.bfloat16), "d": np.zeros(1)}
    r = compare_outputs(ref, oth)
    assert not r.passed
    assert [(row.output, row.status) for row in r.rows] == [("a", "FAIL"), ("d", "FAIL"), ("b", "FAIL"), ("c", "ok")]
    assert r.shapes["c"] == "bfloat16 (4,)" and "shape (2, 2) vs (2, 3)" in " ".join(r.failures)
    # a derived bound: 64 ulps of the reference's dtype x max(1, |ref|)
    x = np.full(4, 2.0, np.float32)
    assert compare_outputs({"x": x}, {"x": x + 2 ** -22}).passed
    assert not compare_outputs({"x": x}, {"x": x + 2 ** -16}).passed


def test_parity_golden_fixture(pytester, tmp_path):
    path = parity.golden.record("tiny", tmp_path / "tiny.npz", dtype="float64")
    pytester.makepyfile(f"""
        def test_golden(parity_golden):
            assert parity_golden({str(path)!r}, backends=("torch",), recalibrate=False).passed
    """)
    pytester.runpytest("-p", "parity.plugin").assert_outcomes(passed=1)
