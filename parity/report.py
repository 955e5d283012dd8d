"""The parity report: what `parity.compare` found, as data, a rich table and JSON.

A report holds one `Row` per compared output and phase (`run`: both twins deciding for themselves;
`replay`: both twins re-run with the reference's decisions forced), the near ties that explain
discrete disagreements, and the failures. `passed` is true when the failure list is empty.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from weights_bridge.atomic import atomic_write

# Row statuses. Only FAIL makes a report fail; "diverged" marks continuous outputs that differ
# because a near tie sent the twins down different branches (the replay compares them instead).
OK, FAIL, NEAR_TIE, DIVERGED, NA = "ok", "FAIL", "near tie", "diverged", "n/a"


@dataclass
class Row:
    """One compared output in one phase."""

    output: str  # "logits", "trace.halt_p", "loop_counts", ...
    phase: str  # "run" | "replay"
    kind: str  # "continuous" | "decision" | "exact"
    compared: int  # elements (continuous) or decisions compared
    tolerance: str  # human-readable bound, e.g. "abs <= 1e-10"
    status: str
    max_abs: float | None = None
    max_rel: float | None = None
    disagreements: int | None = None
    min_margin: float | None = None  # smallest reference decision margin (decision rows)
    note: str = ""


@dataclass
class NearTie:
    """A discrete disagreement whose reference margin is below the near-tie tolerance."""

    kind: str  # "halting" | "routing"
    step: int  # 1-based loop step
    batch: int
    position: int
    margin: float  # the reference twin's margin at this decision
    reference: str  # what the reference decided ("halt", "continue", "experts [0, 2]")
    other: str  # what the other twin decided
    phase: str = "run"  # found in the free run, or in replay round r ("replay r")


@dataclass
class Excusal:
    """A disagreement of the free run that is not a near tie itself, with the forced near tie it follows from.

    It vanished once the near ties were forced (each twin deciding everything else by its own rule),
    and `tie_*` names a forced near tie that can reach it through `chain`.
    """

    kind: str  # "halting" | "routing": the excused decision
    step: int
    batch: int
    position: int
    tie_kind: str  # the near tie it descends from
    tie_step: int
    tie_batch: int
    tie_position: int
    chain: str  # how the tie reaches it


@dataclass
class ParityReport:
    """Everything `parity.compare` measured; `passed` is the verdict."""

    spec: str  # preset name or "custom"
    dtype: str
    seed: int
    batch: int
    seq: int
    n_loops: int
    reference: str  # "torch" | "jax"
    other: str
    threshold: float
    tolerances: dict[str, float]
    rows: list[Row] = field(default_factory=list)
    near_ties: list[NearTie] = field(default_factory=list)
    excused: list[Excusal] = field(default_factory=list)  # free-run disagreements that follow from near ties
    replayed: bool = False
    rounds: int = 0  # replay rounds run (each forces the near ties found so far)
    weights: str = "probe"  # "probe" | "init" | "custom"
    strict: bool = False  # float64 under mythos semantics: every decision must match, near ties excuse nothing
    reverse: ParityReport | None = None  # the same check with the other twin as the reference
    pairs: list[ParityReport] = field(default_factory=list)  # more backends: each other pair checked (compare(backends=...))
    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    # numpy outputs of each run ("torch", "jax", "torch/replay", "jax/replay"); not serialised
    outputs: dict = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        return (not self.failures and (self.reverse is None or self.reverse.passed)
                and all(p.passed for p in self.pairs))

    @property
    def downstream(self) -> int:
        """Disagreements excused as following from a forced near tie."""
        return len(self.excused)

    def all_failures(self) -> list[str]:
        """The failures of both directions, the reverse ones labelled with their reference."""
        more = ([] if self.reverse is None else [self.reverse]) + self.pairs
        return [*self.failures, *(f"[{p.other} against {p.reference}] {f}" for p in more for f in p.failures)]

    def row(self, output: str, phase: str = "run") -> Row:
        """The row for `output` in `phase`; KeyError names the rows that exist."""
        for r in self.rows:
            if r.output == output and r.phase == phase:
                return r
        raise KeyError(f"no row {output!r} in phase {phase!r}; rows: {[(r.output, r.phase) for r in self.rows]}")

    def has_row(self, output: str, phase: str = "run") -> bool:
        return any(r.output == output and r.phase == phase for r in self.rows)

    def to_dict(self) -> dict:
        d = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in ("outputs", "reverse", "pairs")}
        d["passed"] = self.passed
        d["downstream"] = self.downstream
        d["reverse"] = None if self.reverse is None else self.reverse.to_dict()
        d["pairs"] = [p.to_dict() for p in self.pairs]
        return _finite(d)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (infinities as the strings "inf"/"-inf", NaN as "nan")."""
        return json.dumps(self.to_dict(), indent=indent)

    def save_json(self, path: str | Path) -> None:
        """Write the JSON report atomically (a reader never sees half a file)."""
        atomic_write(path, (self.to_json() + "\n").encode())

    def render(self, console: Console | None = None) -> None:
        render(self, console)


def _plain(x):
    """Dataclasses (rows, ties) as dicts, lists of them as lists; anything else as is."""
    if isinstance(x, list):
        return [asdict(v) if hasattr(v, "__dataclass_fields__") else v for v in x]
    return x


def _finite(x):
    # JSON has no infinities: write them as strings so every parser reads the file
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    return f"{x:.2e}"


def _disagree(r: Row) -> str:
    if r.disagreements is None:
        return "-"
    return f"{r.disagreements}/{r.compared}"


STATUS_STYLE = {OK: "green", FAIL: "bold red", NEAR_TIE: "yellow", DIVERGED: "yellow", NA: "dim"}
COLUMNS = (("output", "left"), ("max abs", "right"), ("max rel", "right"), ("disagree", "right"),
           ("min margin", "right"), ("tolerance", "left"), ("status", "left"))


def table(report: ParityReport, phase: str = "run") -> Table:
    """One phase of the report as a rich Table: output | max abs | max rel | disagree | min margin | tolerance | status.

    `max rel` is normwise (max error / max |reference|); `disagree` counts differing decisions out of
    those compared; `min margin` is the reference twin's smallest decision margin.
    """
    if phase == "run":
        title = (f"parity {report.spec} ({report.dtype}, seed {report.seed}, {report.batch} x {report.seq} tokens, "
                 f"{report.n_loops} loops): {report.reference} (reference) vs {report.other}")
    else:
        title = f"replay: both twins forced to the {report.reference} twin's loop counts and experts"
    t = Table(title=escape(title))
    for col, justify in COLUMNS:
        t.add_column(col, justify=justify)
    for r in report.rows:
        if r.phase != phase:
            continue
        status = f"[{STATUS_STYLE.get(r.status, 'default')}]{r.status}[/]" + (escape(f" ({r.note})") if r.note else "")
        t.add_row(escape(r.output), _num(r.max_abs), _num(r.max_rel), _disagree(r), _num(r.min_margin), r.tolerance, status)
    return t


def render(report: ParityReport, console: Console | None = None, max_ties: int = 8) -> None:
    """Print the tables, the near ties and excusals (at most `max_ties` each), the bounds, both directions'
    failures and a PASS/FAIL line."""
    console = console or Console()
    _render_direction(report, console, max_ties)
    if report.reverse is not None:
        rev = report.reverse
        console.print(f"reverse direction ({rev.reference} as reference): "
                      + ("[green]agrees[/green]" if rev.passed else f"[bold red]{len(rev.failures)} failure(s)[/]")
                      + (f", {len(rev.near_ties)} near tie(s), {len(rev.excused)} excused" if rev.near_ties else ""))
        if not rev.passed:
            _render_direction(rev, console, max_ties, tables=True)
    for pair in report.pairs:
        console.print(f"{pair.other} against {pair.reference}: "
                      + ("[green]agrees[/green]" if pair.passed else f"[bold red]{len(pair.failures)} failure(s)[/]"))
        if not pair.passed:
            _render_direction(pair, console, max_ties, tables=True)
    secs = sum(report.timings.values())
    n_fail = len(report.all_failures())
    if report.passed:
        ties = f", {len(report.near_ties)} near tie(s) forced in replay" if report.near_ties else ""
        console.print(f"[bold green]PASS[/bold green]: the twins agree{ties} ({secs:.1f} s)")
    else:
        console.print(f"[bold red]FAIL[/bold red]: {n_fail} failure(s) ({secs:.1f} s)")


def _render_direction(report: ParityReport, console: Console, max_ties: int, tables: bool = True) -> None:
    if tables:
        console.print(table(report, "run"))
        if report.replayed:
            console.print(table(report, "replay"))
    how = report.tolerances.get("how", "")
    console.print(escape(f"weights: {report.weights}; bounds: {how}"), style="dim")
    if report.strict:
        console.print("float64 under mythos semantics: every decision must match (near ties excuse nothing)", style="dim")
    if report.near_ties:
        console.print(f"near ties ({len(report.near_ties)}; margin = the {report.reference} twin's, "
                      f"below the bound {_tie_tols(report)}):")
        for nt in report.near_ties[:max_ties]:
            console.print(escape(f"  {nt.kind:8s} step {nt.step} batch {nt.batch} position {nt.position}: margin "
                                 f"{nt.margin:.2e}; {report.reference} {nt.reference}, {report.other} {nt.other} "
                                 f"[{nt.phase}]"))
        if len(report.near_ties) > max_ties:
            console.print(f"  ... and {len(report.near_ties) - max_ties} more (see --json)")
    if report.excused:
        console.print(f"excused ({len(report.excused)}: gone once the near ties were forced, each reached by one):")
        for ex in report.excused[:max_ties]:
            console.print(escape(f"  {ex.kind:8s} step {ex.step} batch {ex.batch} position {ex.position} <- "
                                 f"{ex.tie_kind} tie step {ex.tie_step} position {ex.tie_position} ({ex.chain})"))
        if len(report.excused) > max_ties:
            console.print(f"  ... and {len(report.excused) - max_ties} more (see --json)")
    for f in report.failures:
        console.print(f"[red]  - {escape(f)}[/red]")


def _tie_tols(report: ParityReport) -> str:
    t = report.tolerances
    return f"halting {t.get('near_tie_halting', float('nan')):.1e}, routing {t.get('near_tie_routing', float('nan')):.1e}"
