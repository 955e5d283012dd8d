"""The parity report: what `parity.compare` found, as data, a rich table and JSON.

A report holds one `Row` per compared output and phase (`run`: both twins deciding for themselves;
`replay`: both twins re-run with the reference's decisions forced), the near ties that explain
discrete disagreements, and the failures. `passed` is true when the failure list is empty.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

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
    downstream: int = 0  # disagreements caused by an earlier near tie (same batch row, not before it)
    replayed: bool = False
    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    # numpy outputs of each run ("torch", "jax", "torch/replay", "jax/replay"); not serialised
    outputs: dict = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        return not self.failures

    def row(self, output: str, phase: str = "run") -> Row:
        """The row for `output` in `phase`; KeyError names the rows that exist."""
        for r in self.rows:
            if r.output == output and r.phase == phase:
                return r
        raise KeyError(f"no row {output!r} in phase {phase!r}; rows: {[(r.output, r.phase) for r in self.rows]}")

    def has_row(self, output: str, phase: str = "run") -> bool:
        return any(r.output == output and r.phase == phase for r in self.rows)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "outputs"}
        d["passed"] = self.passed
        return _finite(d)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (infinities as the strings "inf"/"-inf", NaN as "nan")."""
        return json.dumps(self.to_dict(), indent=indent)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def render(self, console: Console | None = None) -> None:
        render(self, console)


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
    """Print the tables, the near ties (at most `max_ties`), the failures and a PASS/FAIL line."""
    console = console or Console()
    console.print(table(report, "run"))
    if report.replayed:
        console.print(table(report, "replay"))
    if report.near_ties:
        console.print(f"near ties ({len(report.near_ties)}; margin = the {report.reference} twin's, "
                      f"below tolerance {_tie_tols(report)}):")
        for nt in report.near_ties[:max_ties]:
            console.print(escape(f"  {nt.kind:8s} step {nt.step} batch {nt.batch} position {nt.position}: margin {nt.margin:.2e}; "
                                 f"{report.reference} {nt.reference}, {report.other} {nt.other}"))
        if len(report.near_ties) > max_ties:
            console.print(f"  ... and {len(report.near_ties) - max_ties} more (see --json)")
    if report.downstream:
        console.print(f"  {report.downstream} later disagreement(s) follow from these near ties (same batch row, "
                      "at or after them); the replay checks the continuous outputs")
    for f in report.failures:
        console.print(f"[red]  - {escape(f)}[/red]")
    secs = sum(report.timings.values())
    if report.passed:
        ties = f", {len(report.near_ties)} near tie(s) replayed" if report.near_ties else ""
        console.print(f"[bold green]PASS[/bold green]: the twins agree{ties} ({secs:.1f} s)")
    else:
        console.print(f"[bold red]FAIL[/bold red]: {len(report.failures)} failure(s) ({secs:.1f} s)")


def _tie_tols(report: ParityReport) -> str:
    t = report.tolerances
    return f"halting {t.get('near_tie_halting', float('nan')):.0e}, routing {t.get('near_tie_routing', float('nan')):.0e}"
