"""Mutation tier (issue 17, "the default check has power"): `pytest -m mutation tests/test_mutation.py -s`.

Each mutant of tests/mutations.py is planted, alone, into a copy of the project's packages, and the
default `python -m mythos.cli parity PRESET` (float64, probe weights, both directions) runs on the
copy in a subprocess, for every small shipped preset. Exit 1 with a FAIL verdict is a kill; a crash
of the mutated twin (a traceback, exit 2 from an error the mutant raised, a timeout) is a kill too,
recorded apart; exit 0 (PASS) is a survival. Asserted: the unmutated copy passes every preset, at
least 95% of the (mutant, preset) pairs whose mutated code runs are killed, and the survivors are
exactly those listed in mutations.SURVIVORS. The table (-s shows it) lists every run.

The openmythos-* presets (1B to 1T parameters) are skipped: one float64 forward of each needs more
memory and time than this tier has. Environment: MYTHOS_MUTATION_ONLY=name,name runs only those
mutants; MYTHOS_MUTATION_LOG=DIR keeps each run's output there (default: pytest's tmp dir).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import spec as S

from mutations import MUTATIONS, SURVIVORS, Mutation

pytestmark = pytest.mark.mutation

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("spec", "mythos_torch", "mythos_jax", "weights_bridge", "parity", "mythos")
PRESETS = ("tiny", "bench-s-gqa", "bench-s-mla", "bench-m-moe64")
SKIPPED_PREFIX = "openmythos-"  # multi-billion-parameter presets: not run (module docstring)
WORKERS = min(2, os.cpu_count() or 1)  # the issue: 2 workers at most
TIMEOUT_S = 600  # one parity run; the largest small preset takes ~20 s
MIN_KILL_RATE = 0.95
VERDICT_FAIL = re.compile(r"^FAIL: \d+ failure", re.M)
VERDICT_PASS = re.compile(r"^PASS: the twins agree", re.M)


def uses(s: S.Spec, needs: str) -> bool:
    """Whether the default `mythos parity` on spec s runs the code a mutant with this `needs` changes."""
    if needs == "":
        return True
    if needs in ("gqa", "mla"):
        return s.attention.type == needs
    if needs in ("halt_linear", "halt_mlp"):
        return s.halting.head == needs.removeprefix("halt_")
    if needs == "value_head":
        return s.value_head.enabled
    if needs == "memory_gate":
        return s.recurrent.memory_gate.enabled
    if needs == "compressor":
        return s.recurrent.compressor.enabled
    if needs == "cross_loop":
        return s.recurrent.cross_loop_attention.enabled
    if needs in ("float32", "decode", "replay", "exact_tie"):
        return False  # mutations.py: never reached (or never told apart) by the default check
    raise ValueError(f"unknown Mutation.needs {needs!r}")


def selected() -> list[Mutation]:
    only = os.environ.get("MYTHOS_MUTATION_ONLY", "")
    if not only:
        return list(MUTATIONS)
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {m.name for m in MUTATIONS}
    assert not unknown, f"MYTHOS_MUTATION_ONLY names unknown mutants: {sorted(unknown)}"
    return [m for m in MUTATIONS if m.name in names]


def plan(mutants: list[Mutation]) -> list[tuple[Mutation, str]]:
    """(mutant, preset) runs: every preset whose default check runs the mutated code, plus the first
    one that does not (a witness that the mutant survives there for the stated reason)."""
    specs = {p: S.preset(p) for p in PRESETS}
    runs = []
    for m in mutants:
        used = [p for p in PRESETS if uses(specs[p], m.needs)]
        unused = [p for p in PRESETS if p not in used]
        runs += [(m, p) for p in used + unused[:1]]
    return runs


def make_copy(dest: Path, m: Mutation | None) -> Path:
    """The project's packages copied to dest, with m planted (None: unmutated)."""
    dest.mkdir(parents=True)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if m is not None:
        path = dest / f"mythos_{m.twin}" / m.file
        src = path.read_text()
        assert src.count(m.old) == 1, f"{m.name}: {m.old!r} must occur once in mythos_{m.twin}/{m.file}"
        path.write_text(src.replace(m.old, m.new))
    return dest


def subprocess_env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update(PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", COLUMNS="160", NO_COLOR="1",
               # one thread per run: WORKERS runs share the cores (the control runs prove the twins still agree)
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    return env


@dataclass
class Run:
    mutant: str  # "" for the unmutated control
    preset: str
    used: bool  # the default check runs the mutated code on this preset
    rc: int
    outcome: str  # killed | crash | survived (mutants); passed | broken (control)
    secs: float
    log: str  # file holding the run's output


def run_parity(copy: Path, preset: str, log: Path) -> tuple[int, str, float]:
    """`python -m mythos.cli parity PRESET` on the copy: (exit status, output, seconds)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "mythos.cli", "parity", preset], cwd=copy,
                           env=subprocess_env(copy), capture_output=True, text=True, timeout=TIMEOUT_S)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"TIMEOUT after {TIMEOUT_S} s\n{e.stdout or ''}{e.stderr or ''}"
    secs = time.perf_counter() - t0
    log.write_text(out)
    return rc, out, secs


def classify(rc: int, out: str) -> str:
    if rc == 0 and VERDICT_PASS.search(out):
        return "survived"
    if rc == 1 and VERDICT_FAIL.search(out) and "Traceback" not in out:
        return "killed"
    return "crash"  # the mutated twin raised (a traceback, exit 2 from its own ValueError) or hung


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> list[Run]:
    base = tmp_path_factory.mktemp("mutation")
    logs = Path(os.environ.get("MYTHOS_MUTATION_LOG", base / "logs"))
    logs.mkdir(parents=True, exist_ok=True)
    mutants = selected()
    specs = {p: S.preset(p) for p in PRESETS}
    copies = {"": make_copy(base / "control", None)}
    for m in mutants:
        copies[m.name] = make_copy(base / m.name, m)
    jobs = [("", p) for p in PRESETS] + [(m.name, p) for m, p in plan(mutants)]
    by_name = {m.name: m for m in mutants}
    # the largest preset first, so the two workers finish together
    order = {p: i for i, p in enumerate(("bench-m-moe64", "bench-s-mla", "bench-s-gqa", "tiny"))}
    jobs.sort(key=lambda j: (j[0] != "", order[j[1]]))

    def one(job: tuple[str, str]) -> Run:
        name, preset = job
        log = logs / f"{name or 'control'}@{preset}.txt"
        rc, out, secs = run_parity(copies[name], preset, log)
        if name == "":
            return Run("", preset, True, rc, "passed" if rc == 0 and VERDICT_PASS.search(out) else "broken",
                       secs, str(log))
        return Run(name, preset, uses(specs[preset], by_name[name].needs), rc, classify(rc, out), secs, str(log))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        runs = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    print_table(runs, mutants, wall, logs)
    (logs / "results.json").write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    return runs


def print_table(runs: list[Run], mutants: list[Mutation], wall: float, logs: Path) -> None:
    cell = {(r.mutant, r.preset): r for r in runs}
    mark = {"killed": "killed", "crash": "crash", "survived": "SURVIVED"}
    skipped = [p for p in S.preset_names() if p.startswith(SKIPPED_PREFIX)]
    lines = [f"\nmutation tier: {len(mutants)} mutants x {len(PRESETS)} presets, {len(runs)} parity runs, "
             f"{WORKERS} workers, wall {wall:.0f} s (skipped presets: {', '.join(skipped)})",
             "| mutant | twin | " + " | ".join(PRESETS) + " |", "|---|---|" + "---|" * len(PRESETS)]
    ctrl = [cell.get(("", p)) for p in PRESETS]
    lines.append("| (control: unmutated) | both | " + " | ".join(
        f"{c.outcome} ({c.secs:.0f} s)" if c else "-" for c in ctrl) + " |")
    for m in mutants:
        row = []
        for p in PRESETS:
            r = cell.get((m.name, p))
            if r is None:
                row.append("- (not run: unused)")
            else:
                row.append(mark[r.outcome] + ("" if r.used else " (unused)"))
        lines.append(f"| {m.name} | {m.twin} | " + " | ".join(row) + " |")
    used = [r for r in runs if r.mutant and r.used]
    dead = [r for r in used if r.outcome in ("killed", "crash")]
    crashes = [r for r in used if r.outcome == "crash"]
    rate = len(dead) / len(used) if used else float("nan")
    lines.append(f"\nkill rate over used (mutant, preset) pairs: {len(dead)}/{len(used)} = {rate:.1%} "
                 f"({len(crashes)} of them crashes: {', '.join(f'{r.mutant}@{r.preset}' for r in crashes) or '-'})")
    surv = [r for r in runs if r.mutant and r.outcome == "survived"]
    lines.append("survivors: " + (", ".join(f"{r.mutant}@{r.preset}{'' if r.used else ' (unused)'}" for r in surv)
                                  or "-"))
    lines.append(f"logs: {logs}")
    print("\n".join(lines))
    (logs / "table.md").write_text("\n".join(lines) + "\n")


def survivor_reason(name: str, preset: str) -> str | None:
    return SURVIVORS.get((name, preset)) or SURVIVORS.get((name, "*"))


# --------------------------------------------------------------------------- the list itself


def test_mutants_are_distinct_one_line_and_planted_once() -> None:
    assert len(MUTATIONS) >= 25
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS), "mutant names must be unique"
    assert len({(m.twin, m.file, m.old, m.new) for m in MUTATIONS}) == len(MUTATIONS), "duplicate mutants"
    for twin in ("torch", "jax"):
        assert sum(m.twin == twin for m in MUTATIONS) >= 10, f"too few mutants of the {twin} twin"
    for m in MUTATIONS:
        assert m.twin in ("torch", "jax"), m.name
        uses(S.preset("tiny"), m.needs)  # a known needs tag
        path = ROOT / f"mythos_{m.twin}" / m.file
        src = path.read_text()
        # loud on refactors: the snippet must still be there, once
        assert src.count(m.old) == 1, (f"{m.name}: {m.old!r} occurs {src.count(m.old)} times in "
                                       f"mythos_{m.twin}/{m.file} (must be exactly once: update tests/mutations.py)")
        assert m.old != m.new and "\n" not in m.new.strip("\n"), f"{m.name}: the bug must be one changed line"
        ast.parse(src.replace(m.old, m.new))  # a semantic bug, not a syntax error


def test_survivors_name_known_mutants_and_presets() -> None:
    names = {m.name for m in MUTATIONS}
    for (name, preset), why in SURVIVORS.items():
        assert name in names, f"SURVIVORS names an unknown mutant {name!r}"
        assert preset == "*" or preset in PRESETS, f"SURVIVORS: unknown preset {preset!r} for {name}"
        assert why.strip(), f"SURVIVORS[{name}, {preset}] needs a reason"


def test_shipped_small_presets_are_the_ones_run() -> None:
    names = S.preset_names()
    assert set(PRESETS) <= set(names)
    assert set(names) - set(PRESETS) == {p for p in names if p.startswith(SKIPPED_PREFIX)}, \
        "a new small shipped preset: add it to PRESETS"


def test_subprocess_imports_the_mutated_copy(tmp_path: Path) -> None:
    m = MUTATIONS[0]
    copy = make_copy(tmp_path / "copy", m)
    code = ("import inspect, importlib, mythos.cli, parity.compare, spec, weights_bridge, mythos_torch, mythos_jax\n"
            f"mod = importlib.import_module('mythos_{m.twin}.{m.file.removesuffix('.py')}')\n"
            "for x in (mythos.cli, parity.compare, spec, weights_bridge, mythos_torch, mythos_jax, mod):\n"
            "    print(inspect.getsourcefile(x))\n"
            f"print({m.new!r} in inspect.getsource(mod))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=copy, env=subprocess_env(copy), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    *files, planted = p.stdout.split()
    print(f"\nthe subprocess imports: {files[0]} ... {files[-1]}")
    for f in files:
        assert Path(f).resolve().is_relative_to(copy.resolve()), f"imported {f}, not the mutated copy in {copy}"
    assert planted == "True", "the imported module does not hold the planted bug"


# --------------------------------------------------------------------------- the runs


def test_control_copy_passes_every_preset(matrix: list[Run]) -> None:
    broken = [r for r in matrix if r.mutant == "" and r.outcome != "passed"]
    assert not broken, "the unmutated copy must pass (else the harness, not the check, is broken): " + \
        ", ".join(f"{r.preset} rc={r.rc} ({r.log})" for r in broken)


def test_kill_rate(matrix: list[Run]) -> None:
    if os.environ.get("MYTHOS_MUTATION_ONLY"):
        pytest.skip("the kill rate is asserted over the whole list (MYTHOS_MUTATION_ONLY selects a subset)")
    used = [r for r in matrix if r.mutant and r.used]
    dead = [r for r in used if r.outcome in ("killed", "crash")]
    assert used
    rate = len(dead) / len(used)
    assert rate >= MIN_KILL_RATE, (f"the default check kills {len(dead)}/{len(used)} = {rate:.1%} of the used "
                                   f"(mutant, preset) pairs, below {MIN_KILL_RATE:.0%}")


def test_survivors_are_listed_and_the_list_is_honest(matrix: list[Run]) -> None:
    problems = []
    for r in matrix:
        if not r.mutant:
            continue
        why = survivor_reason(r.mutant, r.preset)
        if r.outcome == "survived" and why is None:
            problems.append(f"{r.mutant}@{r.preset} survived and is not in SURVIVORS (see {r.log})")
        if r.outcome != "survived" and why is not None:
            problems.append(f"{r.mutant}@{r.preset} is listed in SURVIVORS but was {r.outcome} ({r.log})")
    ran = {(r.mutant, r.preset) for r in matrix if r.mutant}
    ran_names = {n for n, _ in ran}
    for (name, preset) in SURVIVORS:
        if name in ran_names and preset != "*" and (name, preset) not in ran:
            problems.append(f"SURVIVORS lists {name}@{preset}, which the tier does not run")
    assert not problems, "\n".join(problems)
