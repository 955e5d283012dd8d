"""A pytest plugin for a user's own test suite: parity checks that fail with the report as the message.

    pytest -p parity.plugin        # installed with the package, the `pytest11` entry point loads it too

    def test_my_spec(parity_check):            # parity.compare, any of its keywords
        parity_check("my-model.yaml", dtype="float32")

    def test_my_port(parity_pair):             # two callables returning {name: array}
        parity_pair(lambda: reference_impl(x), lambda: my_impl(x), atol={"logits": 1e-5})

    def test_no_drift(parity_golden):          # parity.golden.against, any of its keywords
        parity_golden("tests/goldens/my-model-float32.npz")

Each returns its report when it passes and fails the test with the rendered report (a table of every
output, its error, its bound and its status) when it does not. docs/regression.md has the details.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
import pytest
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from weights_bridge import backends as registry

from .compare import F64_SAFETY, FLOOR_ULPS, NOISE_FACTOR, _err, _magnitude
from .golden import render_text
from .report import FAIL, OK, Row, _num

# unit roundoff by array dtype (the outputs of a user's callables may come in any of these)
EPS = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
Outputs = Mapping[str, object]  # name -> NumPy, torch or JAX array


@dataclass
class PairReport:
    """What `compare_outputs` found: one Row per output name; `passed` is the verdict."""

    reference: str
    other: str
    how: str  # how the bounds were chosen
    rows: list[Row] = field(default_factory=list)
    shapes: dict[str, str] = field(default_factory=dict)  # name -> "float32 (2, 16, 64)"
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def render(self, console: Console | None = None) -> None:
        console = console or Console()
        t = Table(title=escape(f"{self.reference} (reference) vs {self.other}"))
        for col in ("output", "array", "max abs", "max rel", "disagree", "tolerance", "status"):
            t.add_column(col, justify="right" if col in ("max abs", "max rel", "disagree") else "left")
        for r in self.rows:
            dis = "-" if r.disagreements is None else f"{r.disagreements}/{r.compared}"
            status = ("[green]ok[/]" if r.status == OK else "[bold red]FAIL[/]") + escape(f" ({r.note})" if r.note else "")
            t.add_row(escape(r.output), escape(self.shapes.get(r.output, "-")), _num(r.max_abs), _num(r.max_rel), dis,
                      escape(r.tolerance), status)
        console.print(t)
        console.print(escape(f"bounds: {self.how}"), style="dim")
        for f in self.failures:
            console.print(f"[red]  - {escape(f)}[/red]")
        console.print("[bold green]PASS[/bold green]" if self.passed else
                      f"[bold red]FAIL[/bold red]: {len(self.failures)} failure(s)")


def _array(x: object) -> tuple[np.ndarray, str]:
    a = registry.to_numpy(x)
    dtype = "bfloat16" if a.dtype == ml_dtypes.bfloat16 else str(a.dtype)
    return registry.widen(a), dtype


def _per_name(value: float | Mapping[str, float] | None, name: str) -> float | None:
    return value.get(name) if isinstance(value, Mapping) else value


def compare_outputs(reference: Outputs, other: Outputs, *, atol: float | Mapping[str, float] | None = None,
                    rtol: float | Mapping[str, float] = 0.0, anchor: Outputs | None = None,
                    names: tuple[str, str] = ("reference", "other")) -> PairReport:
    """Compare two dicts of named outputs: floats against a bound, integers and booleans exactly.

    Args:
        reference, other: name -> array (NumPy, torch or JAX); the same names and shapes.
        atol, rtol: the bound of a float output is atol + rtol x max |reference| (one value, or per name).
            Without atol for a name the bound is derived, as parity.compare derives its own: with `anchor`
            (the reference computed in a more precise dtype, the same names) NOISE_FACTOR x max |reference -
            anchor| + FLOOR_ULPS ulps of the reference's dtype x max(1, |reference|); without, F64_SAFETY ulps
            x max(1, |reference|) (sound only for short computations: give an anchor or atol otherwise).
        names: what to call the two sides in the report.
    Returns:
        PairReport; `passed` is the verdict.
    """
    ref_name, oth_name = names
    how = ("atol + rtol x max|ref| where given; elsewhere " if atol is not None else "") + (
        f"{NOISE_FACTOR:.0f} x the reference's distance to its anchor + {FLOOR_ULPS:.0f} ulps x max(1, |ref|)"
        if anchor is not None else f"{F64_SAFETY:.0f} ulps of the reference's dtype x max(1, |ref|) (no anchor given)")
    rep = PairReport(ref_name, oth_name, how)
    for name in sorted(set(reference) ^ set(other)):
        side = ref_name if name in reference else oth_name
        rep.rows.append(Row(name, "run", "missing", 0, "-", FAIL, note=f"only in {side}"))
        rep.failures.append(f"{name}: only {side} returns it")
    for name in [n for n in reference if n in other]:
        r, r_dtype = _array(reference[name])
        o, o_dtype = _array(other[name])
        rep.shapes[name] = f"{r_dtype} {tuple(r.shape)}"
        if r.shape != o.shape:
            rep.rows.append(Row(name, "run", "shape", 0, "same shape", FAIL, note=f"{r.shape} vs {o.shape}"))
            rep.failures.append(f"{name}: shape {tuple(r.shape)} vs {tuple(o.shape)}")
            continue
        if r.dtype.kind in "biu" and o.dtype.kind in "biu":
            dis = int((r != o).sum())
            rep.rows.append(Row(name, "run", "decision", int(r.size), "equal", FAIL if dis else OK, disagreements=dis))
            if dis:
                first = tuple(int(i) for i in np.argwhere(r != o)[0])
                rep.failures.append(f"{name}: {dis} of {r.size} value(s) differ (first at {first}: {r[first]} vs "
                                    f"{o[first]})")
            continue
        r, o = r.astype(np.float64), o.astype(np.float64)
        bound, rel_bound = _per_name(atol, name), _per_name(rtol, name) or 0.0
        scale = max(1.0, _magnitude(r))
        if bound is not None:
            bound += rel_bound * _magnitude(r)
        elif anchor is not None and name in anchor:
            noise = _err(_array(anchor[name])[0].astype(np.float64), r)[0]
            bound = NOISE_FACTOR * noise + FLOOR_ULPS * EPS.get(r_dtype, EPS["float64"]) * scale
        else:
            bound = F64_SAFETY * EPS.get(r_dtype, EPS["float64"]) * scale
        max_abs, max_rel = _err(r, o)
        ok = max_abs <= bound
        rep.rows.append(Row(name, "run", "continuous", int(r.size), f"abs <= {bound:.1e}", OK if ok else FAIL,
                            max_abs, max_rel))
        if not ok:
            rep.failures.append(f"{name}: max abs {max_abs:.3e} > {bound:.1e} (max rel {max_rel:.1e})")
    return rep


def _assert(report):
    if not report.passed:
        pytest.fail(render_text(report), pytrace=False)
    return report


@pytest.fixture
def parity_check() -> Callable:
    """parity_check(spec, **compare_keywords): run parity.compare; fail with the rendered report."""
    from .compare import compare

    return lambda spec, **kwargs: _assert(compare(spec, **kwargs))


@pytest.fixture
def parity_pair() -> Callable:
    """parity_pair(reference, other, atol=..., rtol=..., anchor=..., names=...): call both (callables returning
    {name: array}, or the dicts themselves), compare_outputs; fail with the table."""
    def check(reference: Callable[[], Outputs] | Outputs, other: Callable[[], Outputs] | Outputs, **kwargs) -> PairReport:
        ref = reference() if callable(reference) else reference
        oth = other() if callable(other) else other
        anchor = kwargs.get("anchor")
        if callable(anchor):
            kwargs["anchor"] = anchor()
        return _assert(compare_outputs(ref, oth, **kwargs))

    return check


@pytest.fixture
def parity_golden() -> Callable:
    """parity_golden(path, **against_keywords): parity.golden.against; fail with the rendered report."""
    from .golden import against

    return lambda path, **kwargs: _assert(against(path, **kwargs))
