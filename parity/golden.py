"""Golden reports: the reference twin's outputs of one run, stored, and every backend compared with them later.

    >>> from parity import golden
    >>> golden.record("tiny", "tiny-float64.npz", dtype="float64")     # torch's outputs, versions, spec, digests
    >>> r = golden.against("tiny-float64.npz")                        # torch and jax today vs the golden
    >>> r.passed, r.moved()                                           # ["jax: logits", ...] when an output moved

`parity.compare` says whether today's twins agree with each other; a golden says whether an upgrade of
torch, jax or the model code moved an output, even when both twins moved together.

What a golden (.npz, np.savez_compressed, written atomically) holds:
- `format`, `meta` (JSON: spec label, dtype, seed, batch, seq, n_loops, weights, reference twin, the
  library versions), `spec_yaml` (spec.dump), `ids` (B, T);
- the reference twin's free run in float64: `logits.sample` (all columns when V <= LOGIT_COLUMNS, else
  LOGIT_COLUMNS seeded columns with 0 and V-1, `logits.columns`), the per-position `logits.max`,
  `logits.min` and `logits.lse` over all V columns, `logits.sha256` (of the full float64 logits),
  `loop_counts`, `halted`, `n_steps`, `values`, every trace field over the executed steps (`trace.*`);
- the weights without trusting a model run: `weights.paths` (manifest order) with `weights.sha256`, and
  for probe weights the arrays calibrated on a model run (`probe.*`: the halting head, a spread router bias),
  the rest being `parity.probe.perturbed_arrays`;
- below float64 (and under openmythos-0.5), `noise.*`: the reference twin's measured rounding noise.

How `against` decides, per backend (docs/regression.md): the weights are rebuilt and their digests must
match; the bounds are `derive_tolerances` of the golden with the golden's own recorded noise (a backend
cannot loosen its bound by being noisy); in float64 under mythos semantics every decision must match
exactly; below float64 a disagreement whose golden margin is a near tie is forced to the golden's
decision in a replay of the backend (the golden's replay is its free run), as `parity.compare` does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import spec as S
from weights_bridge import backends as registry
from weights_bridge.atomic import atomic_write

from .compare import (
    MAX_ROUNDS, TRACE_FIELDS, WEIGHTS, Outputs, ParityInputError, _check_inputs, _diff, _err, _excuse,
    _forced_all, _load_spec, _nonfinite, _replay_rows, _run_rows, _Verdict, _where, derive_tolerances,
    forward_outputs, make_ids, probe_weights, rounding_noise, set_parity_precision,
)
from .probe import _halt_paths, perturbed_arrays, probe_loops
from .report import FAIL, OK, ParityReport, Row, _finite, _render_direction

FORMAT = "mythos-golden/1"
LOGIT_COLUMNS = 256  # vocabularies larger than this store a seeded sample of columns (plus max, min, lse of all)
CALIBRATION_RTOL = 1e-9  # a re-calibrated probe halting head further than this (relative) has moved
MAX_BYTES = 256 * 1024 * 1024  # uncompressed: a golden of a 2 x 16 input is ~100 KB
VERSIONED = ("torch", "jax", "jaxlib", "flax", "numpy", "mythos")
FILL = {"state_norm": 0.0, "halt_p": 0.0, "cum_p": 0.0, "running": False, "expert_idx": -1,
        "router_margin": np.inf, "value": 0.0}  # the twins' values in rows of steps not run (model.Traces)


class GoldenError(ValueError):
    """A golden file that is missing, corrupt, not a golden, or recorded for another spec; the message says which."""


@dataclass(frozen=True)
class Golden:
    """A golden file, read and checked (`read`). `outputs.logits` is the stored view: sampled columns, max, min."""

    path: Path
    meta: dict
    spec: S.Spec
    ids: np.ndarray  # (B, T) int64
    outputs: Outputs  # traces padded to n_loops with the twins' fill values
    columns: np.ndarray  # (K,) the stored logit columns
    lse: np.ndarray  # (B, T) logsumexp over all V columns
    logits_sha256: str
    weight_digests: dict[str, str]  # manifest path -> sha256, manifest order
    calibrated: dict[str, np.ndarray]  # probe weights: the arrays a model run calibrated; {} for init weights
    noise: dict[str, float] | None  # the reference twin's rounding noise (None: float64, mythos semantics)

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def n_loops(self) -> int:
        return self.meta["n_loops"]


@dataclass
class GoldenReport:
    """What `against` found: per backend a ParityReport with the golden as the reference; `passed` is the verdict."""

    path: str
    spec: str
    dtype: str
    seed: int
    n_loops: int
    weights: str
    recorded_by: str  # the reference twin that recorded the golden
    recorded: dict[str, str]  # library versions then
    current: dict[str, str]  # and now
    rows: list[Row] = field(default_factory=list)  # golden-level checks: weight digests, probe calibration
    checks: dict[str, ParityReport] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # golden-level failures
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures and all(r.passed for r in self.checks.values())

    def all_failures(self) -> list[str]:
        return [*self.failures, *(f"[{name} vs golden] {f}" for name, r in self.checks.items() for f in r.failures)]

    def moved(self) -> list[str]:
        """The outputs that moved beyond their bound, as "backend: output" (golden-level: "weights", ...)."""
        out = [r.output for r in self.rows if r.status == FAIL]
        for name, rep in self.checks.items():
            out += [f"{name}: {r.output}" + (" (replay)" if r.phase == "replay" else "")
                    for r in rep.rows if r.status == FAIL]
        return out

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("path", "spec", "dtype", "seed", "n_loops", "weights", "recorded_by",
                                            "recorded", "current", "failures", "timings")}
        d.update(passed=self.passed, moved=self.moved(), rows=[asdict(r) for r in self.rows],
                 checks={name: r.to_dict() for name, r in self.checks.items()})
        return _finite(d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save_json(self, path: str | Path) -> None:
        atomic_write(path, (self.to_json() + "\n").encode())

    def render(self, console: Console | None = None) -> None:
        render(self, console)


# --------------------------------------------------------------------------- recording


def versions() -> dict[str, str]:
    """The installed versions of the libraries a golden depends on ("-" when one is not installed)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def weight_digest(a: np.ndarray) -> str:
    """SHA-256 of a manifest array: its shape and its float64 little-endian bytes."""
    h = hashlib.sha256(str(tuple(a.shape)).encode())
    h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()


def _logit_columns(V: int, k: int | None, seed: int) -> np.ndarray:
    if k is None or V <= k:
        return np.arange(V, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x601D])  # a stream apart from the weight and token draws
    inner = rng.choice(np.arange(1, V - 1), size=max(k - 2, 0), replace=False)
    return np.sort(np.concatenate([[0, V - 1], inner])).astype(np.int64)


def _view(logits: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(B, T, K + 2): the stored columns, then max and min over all V (each moves by at most max |d logits|)."""
    return np.concatenate([logits[..., columns], logits.max(-1, keepdims=True), logits.min(-1, keepdims=True)], -1)


def _lse(logits: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]


def _anchor_dtype(s: S.Spec, dtype: str) -> str | None:
    """compare's rule: the more precise run that measures the rounding noise (None: float64, mythos semantics)."""
    return "float64" if dtype != "float64" else ("float32" if s.semantics != "mythos" else None)


def record(spec: S.Spec | str, path: str | Path, *, dtype: str, seed: int = 0, batch: int = 2, seq: int = 16,
           n_loops: int | None = None, weights: str = "probe", reference: str = "torch",
           logit_columns: int | None = LOGIT_COLUMNS, label: str | None = None,
           progress: Callable[[str], None] | None = None) -> Path:
    """Run the reference twin as `parity.compare` would and store its outputs as a golden file (atomically).

    Args:
        spec: a Spec, a preset name or a YAML path.
        path: the .npz file to write.
        dtype, seed, batch, seq, n_loops, weights, reference: as `parity.compare` ("probe" | "init" weights:
            a golden must be able to rebuild its weights).
        logit_columns: vocabularies above this store this many seeded logit columns (with 0 and V-1) plus the
            max, min and logsumexp over all columns; None stores every column.
        label: the spec's name in reports (default: the preset name, or "custom").
    Returns:
        The path written.
    Raises:
        ParityInputError: bad arguments; GoldenError: non-finite outputs (a golden of NaN compares nothing).
    """
    s = _load_spec(spec)
    _check_inputs(s, dtype, batch, seq, n_loops, None, reference, weights, tuple(dict.fromkeys((reference, *registry.BACKENDS))))
    if not isinstance(weights, str):
        raise ParityInputError(f"weights must be one of {', '.join(WEIGHTS)} for a golden (it rebuilds them)")
    if logit_columns is not None and logit_columns < 2:
        raise ParityInputError(f"logit_columns={logit_columns} must be None or at least 2 (columns 0 and V-1)")
    say = progress or (lambda msg: None)
    probe = weights == "probe"
    N = int(n_loops) if n_loops is not None else (probe_loops(s) if probe else s.recurrent.max_loop_iters)
    ids = make_ids(s, batch, seq, seed)
    set_parity_precision()
    say("calibrating the probe weights (one float64 torch run)" if probe else "initial weights")
    arrays = probe_weights(s, seed, ids, N) if probe else S.init_arrays(s, seed)
    say(f"running the {reference} twin ({dtype})")
    twin = registry.twin(reference)
    free = forward_outputs(reference, twin.build(s, seed=seed, dtype=dtype, weights=arrays), ids, N)
    bad = _nonfinite(reference, free)
    if bad:
        raise GoldenError(f"not recording: {'; '.join(bad)}")
    anchor = _anchor_dtype(s, dtype)
    data: dict[str, np.ndarray] = {}
    if anchor:
        say(f"the {reference} twin in {anchor} (rounding noise)")
        m = twin.build(s, seed=seed, dtype=anchor, weights=arrays)
        a = forward_outputs(reference, m, ids, N)
        if _diff(free, a, N).any() or not np.array_equal(free.traces["expert_idx"], a.traces["expert_idx"]):
            a = forward_outputs(reference, m, ids, N, *_forced_all(free))  # the noise under the same decisions
        noise = rounding_noise(free, a)
        data["noise.names"] = np.array(list(noise))
        data["noise.values"] = np.array(list(noise.values()), dtype=np.float64)
    cols = _logit_columns(s.vocab_size, logit_columns, seed)
    n = free.n_steps
    paths = [p.path for p in S.manifest(s)]
    meta = {"spec_label": label or (spec if isinstance(spec, str) and spec in S.preset_names() else "custom"),
            "dtype": dtype, "seed": seed, "batch": int(ids.shape[0]), "seq": int(ids.shape[1]), "n_loops": N,
            "weights": weights, "reference": reference, "anchor": anchor, "versions": versions()}
    data.update({
        "format": np.array(FORMAT), "meta": np.array(json.dumps(meta)), "spec_yaml": np.array(S.dump(s)), "ids": ids,
        "logits.columns": cols, "logits.sample": free.logits[..., cols], "logits.max": free.logits.max(-1),
        "logits.min": free.logits.min(-1), "logits.lse": _lse(free.logits),
        "logits.sha256": np.array(hashlib.sha256(np.ascontiguousarray(free.logits, "<f8").tobytes()).hexdigest()),
        "loop_counts": free.loop_counts, "halted": free.halted, "n_steps": np.array(n, dtype=np.int64),
        "weights.paths": np.array(paths), "weights.sha256": np.array([weight_digest(arrays[p]) for p in paths]),
    })
    if free.values is not None:
        data["values"] = free.values
    for name, a in free.traces.items():
        data[f"trace.{name}"] = a[:n]
    if probe:
        base = perturbed_arrays(s, seed)  # what a model run changed (halting head, router bias) is stored
        for p in paths:
            if p in _halt_paths(s) or not np.array_equal(arrays[p], base[p]):
                data[f"probe.{p}"] = arrays[p]
    buf = io.BytesIO()
    np.savez_compressed(buf, **data)
    return atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------- reading


def read(path: str | Path) -> Golden:
    """A golden file, checked entry by entry; GoldenError names what is missing, corrupt or foreign."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise GoldenError(f"{where}: no such golden file" if not path.exists() else f"{where}: not a file")
    try:
        with zipfile.ZipFile(path) as z:
            size = sum(i.file_size for i in z.infolist())
        if size > MAX_BYTES:
            raise GoldenError(f"{where}: {size:,} bytes uncompressed, more than a golden holds ({MAX_BYTES:,})")
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    except GoldenError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise GoldenError(f"{where}: not a readable golden file (an .npz written by parity.golden.record): {e}") from None
    if "format" not in raw or not _is_text(raw["format"]):
        raise GoldenError(f"{where}: not a Mythos golden file (no 'format' entry; entries: {', '.join(sorted(raw)[:8])})")
    if str(raw["format"]) != FORMAT:
        raise GoldenError(f"{where}: golden format {str(raw['format'])!r} is not the one this version reads ({FORMAT!r})")
    return _parse(raw, path)


def _is_text(a: np.ndarray) -> bool:
    return a.shape == () and a.dtype.kind == "U"


def _parse(raw: dict[str, np.ndarray], path: Path) -> Golden:
    where = str(path)

    def need(key: str, kind: str, shape: tuple | None = None) -> np.ndarray:
        if key not in raw:
            raise GoldenError(f"{where}: entry {key!r} is missing (a corrupt or truncated golden)")
        a = raw[key]
        if a.dtype.kind not in kind or (shape is not None and a.shape != shape):
            want = f"shape {shape}" if shape is not None else "its kind"
            raise GoldenError(f"{where}: entry {key!r} has dtype {a.dtype} and shape {a.shape}; expected {want}")
        return a

    try:
        meta = json.loads(str(need("meta", "U", ())))
        spec_text = str(need("spec_yaml", "U", ()))
        keys = ("spec_label", "dtype", "seed", "batch", "seq", "n_loops", "weights", "reference", "versions")
        missing = [k for k in keys if k not in meta]
        if missing:
            raise GoldenError(f"{where}: metadata lacks {', '.join(missing)}")
    except json.JSONDecodeError as e:
        raise GoldenError(f"{where}: its metadata is not JSON: {e}") from None
    try:
        s = S.loads(spec_text, where=f"{where}: spec_yaml")
    except S.SpecError as e:
        raise GoldenError(f"{where}: its spec does not load with this version: {e}") from None
    B, T, N = meta["batch"], meta["seq"], meta["n_loops"]
    k = s.moe.top_k if s.recurrent.ffn == "moe" else 0
    ids = need("ids", "iu", (B, T)).astype(np.int64)
    n = int(need("n_steps", "iu", ()))
    if not 1 <= n <= N:
        raise GoldenError(f"{where}: n_steps={n} outside 1..n_loops={N}")
    cols = need("logits.columns", "iu").astype(np.int64)
    if cols.ndim != 1 or not cols.size or cols.min() < 0 or cols.max() >= s.vocab_size:
        raise GoldenError(f"{where}: entry 'logits.columns' does not index vocab_size={s.vocab_size}")
    stats = {name: need(f"logits.{name}", "f", (B, T)) for name in ("max", "min", "lse")}
    view = np.concatenate([need("logits.sample", "f", (B, T, cols.size)), stats["max"][..., None],
                           stats["min"][..., None]], -1).astype(np.float64)
    traces = {}
    for name in (*TRACE_FIELDS, *(("value",) if "trace.value" in raw else ())):
        shape = (n, B, T, k) if name == "expert_idx" else (n, B, T)
        a = need(f"trace.{name}", "b" if name == "running" else "iu" if name == "expert_idx" else "f", shape)
        full = np.full((N, *shape[1:]), FILL[name], dtype=a.dtype)
        full[:n] = a
        traces[name] = full.astype(np.int64) if name == "expert_idx" else full
    values = need("values", "f", (B, T)) if "values" in raw else None
    outputs = Outputs(view, need("loop_counts", "iu", (B, T)).astype(np.int64), need("halted", "b", (B, T)), n,
                      traces, values)
    paths = [str(p) for p in need("weights.paths", "U")]
    digests = [str(d) for d in need("weights.sha256", "U", (len(paths),))]
    if paths != [p.path for p in S.manifest(s)]:
        raise GoldenError(f"{where}: its weight list is not the manifest of its own spec (a corrupt golden)")
    calibrated = {}
    if meta["weights"] == "probe":
        shapes = {p.path: tuple(p.shape) for p in S.manifest(s)}
        stored = [k.removeprefix("probe.") for k in raw if k.startswith("probe.")]
        if not set(_halt_paths(s)) <= set(stored) or not set(stored) <= set(shapes):
            raise GoldenError(f"{where}: its probe entries are not its spec's calibrated arrays (a corrupt golden)")
        calibrated = {p: need(f"probe.{p}", "f", shapes[p]) for p in paths if p in stored}
    noise = None
    if "noise.names" in raw:
        names = [str(x) for x in need("noise.names", "U")]
        noise = dict(zip(names, need("noise.values", "f", (len(names),)).tolist()))
    return Golden(path, meta, s, ids, outputs, cols, stats["lse"], str(need("logits.sha256", "U", ())),
                  dict(zip(paths, digests)), calibrated, noise)


def spec_differences(a: S.Spec, b: S.Spec) -> list[str]:
    """Fields that differ, as "attention.type: gqa vs mla" (dotted paths, in spec order)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, v in d.items():
            out.update(flat(v, f"{prefix}{key}.") if isinstance(v, dict) else {f"{prefix}{key}": v})
        return out

    fa, fb = flat(S.to_dict(a)), flat(S.to_dict(b))
    return [f"{key}: {fa.get(key, '-')!r} vs {fb.get(key, '-')!r}" for key in dict.fromkeys([*fa, *fb])
            if fa.get(key) != fb.get(key)]


# --------------------------------------------------------------------------- comparing with a golden


def rebuild_weights(g: Golden) -> tuple[dict[str, np.ndarray], list[str]]:
    """The golden's weights from its spec and seed without a model run, and the paths whose digests differ."""
    s, seed = g.spec, g.meta["seed"]
    arrays = perturbed_arrays(s, seed) if g.meta["weights"] == "probe" else S.init_arrays(s, seed)
    arrays.update({p: np.asarray(v, dtype=np.float64) for p, v in g.calibrated.items()})
    return arrays, [p for p, d in g.weight_digests.items() if weight_digest(arrays[p]) != d]


def against(path: str | Path, *, backends: Sequence[str] = registry.BACKENDS, spec: S.Spec | str | None = None,
            recalibrate: bool = True, progress: Callable[[str], None] | None = None) -> GoldenReport:
    """Run each backend on the golden's weights and tokens and compare it with the golden's outputs.

    Args:
        path: a golden file written by `record`.
        backends: the backends to check (each is compared with the golden, not with the others).
        spec: when given, the golden must have been recorded for this spec (else GoldenError naming the fields).
        recalibrate: also re-calibrate the probe halting head on today's torch float64 run and report
            "the probe weights moved" when it lands elsewhere (the outputs are compared on the golden's own
            head either way).
        progress: called with a short description before each stage.
    Returns:
        GoldenReport; `passed` is the verdict, `moved()` names what moved, its rows say by how much.
    Raises:
        GoldenError: a missing, corrupt or foreign golden file, or one recorded for another spec.
    """
    g = read(path)
    for name in backends:
        if name not in registry.ALL_BACKENDS or g.dtype not in registry.dtypes_of(name):
            raise ParityInputError(f"backends: {name!r} cannot run this {g.dtype} golden; allowed: "
                                   f"{', '.join(n for n in registry.ALL_BACKENDS if g.dtype in registry.dtypes_of(n))}")
    if spec is not None:
        diff = spec_differences(g.spec, _load_spec(spec))
        if diff:
            raise GoldenError(f"{path}: recorded for a different spec ({len(diff)} field(s) differ, golden vs "
                              f"given: {'; '.join(diff[:5])}{'; ...' if len(diff) > 5 else ''})")
    say = progress or (lambda msg: None)
    m, s, N, dtype = g.meta, g.spec, g.n_loops, g.dtype
    rep = GoldenReport(str(path), m["spec_label"], dtype, m["seed"], N, m["weights"], m["reference"],
                       dict(m["versions"]), versions())
    timings = rep.timings

    def timed(stage: str, msg: str, fn):
        say(msg)
        t0 = time.perf_counter()
        out = fn()
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
        return out

    set_parity_precision()
    arrays, moved = timed("weights", "rebuilding the weights from the spec and seed", lambda: rebuild_weights(g))
    n_params = sum(a.size for a in arrays.values())
    rep.rows.append(Row("weights", "run", "exact", len(g.weight_digests), "sha256 equal", FAIL if moved else OK,
                        disagreements=len(moved), note=f"{n_params:,} values"))
    if moved:
        rep.failures.append(f"weights: {len(moved)} of {len(g.weight_digests)} array(s) rebuilt from the spec and "
                            f"seed differ from the golden's digests (first: {', '.join(moved[:3])}): spec.init_arrays "
                            "or parity/probe.py changed; nothing else is compared")
        return rep
    if g.calibrated and recalibrate:
        fresh = timed("probe weights", "re-calibrating the probe weights (float64 torch runs)",
                      lambda: probe_weights(s, m["seed"], g.ids, N))
        rel = {p: float(np.abs(fresh[p] - a).max()) / (float(np.abs(a).max()) or 1.0) for p, a in arrays.items()}
        worst = max(rel, key=rel.get)
        d = float(np.abs(fresh[worst] - arrays[worst]).max())
        ok = rel[worst] <= CALIBRATION_RTOL
        rep.rows.append(Row("probe calibration", "run", "continuous", n_params, f"rel <= {CALIBRATION_RTOL:.0e}",
                            OK if ok else FAIL, max_abs=d, max_rel=rel[worst], note=f"worst: {worst}"))
        if not ok:
            rep.failures.append(f"probe weights moved: re-calibrating on today's torch float64 runs lands {d:.3e} "
                                f"from the golden's {worst} (rel {rel[worst]:.1e} > {CALIBRATION_RTOL:.0e}): the "
                                "torch twin's halting logits or routing, or parity/probe.py changed (the outputs are "
                                "compared on the golden's own weights)")
    G = g.outputs
    tol = derive_tolerances(s, dtype, G, g.noise, m.get("anchor") or "float64")
    strict = dtype == "float64" and s.semantics == "mythos"
    for name in backends:
        r = ParityReport(spec=rep.spec, dtype=dtype, seed=m["seed"], batch=m["batch"], seq=m["seq"], n_loops=N,
                         reference="golden", other=name, threshold=s.halting.threshold, tolerances=asdict(tol),
                         weights=m["weights"], strict=strict)
        if g.noise is not None:
            r.tolerances["how"] += f" (the golden's {m['reference']} noise, recorded)"
        model = timed(f"build {name}", f"building the {name} twin ({dtype})",
                      lambda name=name: registry.twin(name).build(s, seed=m["seed"], dtype=dtype, weights=arrays))
        _check_backend(g, name, model, tol, strict, r, timed)
        rep.checks[name] = r
    return rep


def _with_view(g: Golden, o: Outputs) -> tuple[Outputs, np.ndarray]:
    """o with its logits as the golden stores them (columns, max, min), and their logsumexp."""
    return o._replace(logits=_view(o.logits, g.columns)), _lse(o.logits)


def _check_backend(g: Golden, name: str, model, tol, strict: bool, report: ParityReport, timed: Callable) -> None:
    """parity.compare's verdict with the golden as the reference: its free run is also its replay."""
    s, N, ids, G = g.spec, g.n_loops, g.ids, g.outputs
    full = timed(f"run {name}", f"running the {name} twin", lambda: forward_outputs(name, model, ids, N))
    report.outputs[name] = full
    report.failures.extend(_nonfinite(name, full))
    O, lse = _with_view(g, full)
    v = _Verdict(s, N, tol, strict, report)
    d = _diff(G, O, N)
    route_tie, halt_tie = v.ties(G, d)
    failed_route, failed_halt = np.zeros_like(d.route), np.zeros_like(d.halt)
    v.record_ties(G, O, d, route_tie, halt_tie, "run")
    v.bookkeeping(G, O, d, "run")
    k = G.traces["expert_idx"].shape[-1]
    rep, force_halt, force_experts = None, None, None
    if strict and (d.route.any() or d.halt.any()):
        failed_route, failed_halt = d.route, d.halt
        v.describe(G, O, d, d.route, d.halt, f"from the golden in {g.dtype}, where every decision must match")
    else:
        forced_route, forced_halt = route_tie.copy(), halt_tie.copy()
        converged = False
        for round_ in range(1, MAX_ROUNDS + 1 if d.any() else 1):
            if not forced_route.any() and not forced_halt.any():
                break  # nothing to force: the disagreements are not near ties
            force_halt = np.where(forced_halt, np.where(G.halted, G.loop_counts, 0), -1)
            force_experts = np.where(forced_route[..., None], G.traces["expert_idx"], -1) if k else None
            out = timed("replay", f"replay {round_}: the golden's near ties forced in the {name} twin",
                        lambda: forward_outputs(name, model, ids, N, force_halt, force_experts))
            rep, rep_lse = _with_view(g, out)
            report.replayed, report.rounds = True, round_
            d_rep = _diff(G, rep, N)
            new_route, new_halt = d_rep.route & ~forced_route, d_rep.halt & ~forced_halt
            if not new_route.any() and not new_halt.any():
                v.bookkeeping(G, rep, d_rep, "replay")
                converged = True
                break
            r_tie, h_tie = v.ties(G, d_rep)
            v.record_ties(G, rep, d_rep, r_tie & new_route, h_tie & new_halt, f"replay {round_}")
            bad_route, bad_halt = new_route & ~r_tie, new_halt & ~h_tie
            if bad_route.any() or bad_halt.any():
                failed_route |= bad_route
                failed_halt |= bad_halt
                v.describe(G, rep, d_rep, bad_route, bad_halt, "with a margin above the near-tie bound, with the "
                           "golden's near ties forced: no near tie explains them")
                break
            forced_route |= new_route
            forced_halt |= new_halt
        else:
            if d.any() and (forced_route.any() or forced_halt.any()):
                report.failures.append(f"replay: disagreements still new after {MAX_ROUNDS} rounds of forcing near ties")
        _excuse(G, d, route_tie, halt_tie, failed_route, failed_halt, forced_route, forced_halt, converged, v, O, report)
    _run_rows(s, N, G, O, d, tol, report, route_tie, halt_tie, failed_route, failed_halt)
    hit = np.logical_or.accumulate(d.route.any(0) | d.halt, axis=1)  # causal: a disagreement reaches later positions
    _lse_row(g, "run", lse, ~hit, tol.logits, report)
    if rep is not None:
        _replay_rows(s, N, G, G, rep, tol, report, force_halt, force_experts)
        report.rows = [r for r in report.rows if "forced=free" not in r.output]  # the golden's replay is its free run
        _lse_row(g, "replay", rep_lse, np.ones_like(hit), tol.logits, report)
    cols, V = g.columns.size, s.vocab_size
    for r in report.rows:
        if r.output == "logits" and cols < V:
            r.note = (r.note + "; " if r.note else "") + f"{cols} of {V} columns + max, min"


def _lse_row(g: Golden, phase: str, lse: np.ndarray, mask: np.ndarray, bound: float, report: ParityReport) -> None:
    """logsumexp over all V columns: it moves by at most max |d logits|, so it takes the logits' bound."""
    ref, oth = g.lse[mask], lse[mask]
    tol = f"abs <= {bound:.1e}"
    if not ref.size:
        report.rows.append(Row("logits.logsumexp", phase, "continuous", 0, tol, "diverged", note="all after a disagreement"))
        return
    max_abs, max_rel = _err(ref, oth)
    ok = max_abs <= bound
    if not ok:
        report.failures.append(f"logits.logsumexp{' (replay)' if phase == 'replay' else ''}: max abs {max_abs:.3e} "
                               f"> {bound:.1e}")
    report.rows.append(Row("logits.logsumexp", phase, "continuous", int(ref.size), tol, OK if ok else FAIL,
                           max_abs, max_rel, note="over all columns"))


# --------------------------------------------------------------------------- the report


def render(report: GoldenReport, console: Console | None = None, max_ties: int = 8) -> None:
    """Each backend's tables against the golden, what moved, the versions then and now, and a PASS/FAIL line."""
    console = console or Console()
    t = Table(title=escape(f"golden {report.path}: {report.spec} ({report.dtype}, seed {report.seed}, "
                           f"{report.n_loops} loops, {report.weights} weights, recorded by {report.recorded_by})"))
    for col in ("check", "compared", "max abs", "max rel", "tolerance", "status"):
        t.add_column(col)
    for r in report.rows:
        t.add_row(r.output, str(r.compared), "-" if r.max_abs is None else f"{r.max_abs:.2e}",
                  "-" if r.max_rel is None else f"{r.max_rel:.2e}", r.tolerance,
                  ("[green]ok[/]" if r.status == OK else "[bold red]FAIL[/]") + escape(f" ({r.note})" if r.note else ""))
    console.print(t)
    for f in report.failures:
        console.print(f"[red]  - {escape(f)}[/red]")
    for name, r in report.checks.items():
        _render_direction(r, console, max_ties)
    changed = [f"{k} {report.recorded.get(k, '-')} -> {v}" for k, v in report.current.items()
               if report.recorded.get(k) != v]
    console.print(escape("recorded with " + ", ".join(f"{k} {v}" for k, v in report.recorded.items())
                         + ("; now " + ", ".join(changed) if changed else "; the same versions now")), style="dim")
    secs = sum(report.timings.values())
    names = ", ".join(report.checks) or "nothing"
    if report.passed:
        console.print(f"[bold green]PASS[/bold green]: {escape(names)} reproduce the golden ({secs:.1f} s)")
    else:
        moved = report.moved()
        console.print(f"[bold red]FAIL[/bold red]: {len(report.all_failures())} failure(s); moved: "
                      f"{escape(', '.join(moved) if moved else 'see the failures above')} ({secs:.1f} s)")


def render_text(report: GoldenReport | ParityReport, width: int = 120) -> str:
    """The rendered report as plain text (for an assertion message or a log)."""
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    report.render(console)
    return console.export_text()


# --------------------------------------------------------------------------- re-recording

SHIPPED = ("tiny", "bench-s-gqa", "bench-s-mla", "bench-m-moe64")
SHIPPED_DTYPES = ("float64", "float32")


def rerecord(folder: str | Path, *, check: bool = True) -> list[Path]:
    """Re-record every golden in `folder` with its own settings (a preset label: today's preset); an empty or
    missing folder gets the shipped set (SHIPPED x SHIPPED_DTYPES). A deliberate act after a reviewed change.

    check: first run parity.compare with the same settings and refuse (GoldenError) when the twins disagree.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.npz"))
    jobs = []
    for f in files:
        g = read(f)
        m = g.meta
        label = m["spec_label"]
        spec = label if label in S.preset_names() else g.spec
        cols = None if g.columns.size == g.spec.vocab_size else int(g.columns.size)
        jobs.append((f, spec, dict(dtype=m["dtype"], seed=m["seed"], batch=m["batch"], seq=m["seq"],
                                   n_loops=m["n_loops"], weights=m["weights"], reference=m["reference"],
                                   logit_columns=cols, label=label)))
    if not files:
        jobs = [(folder / f"{p}-{dt}.npz", p, dict(dtype=dt)) for p in SHIPPED for dt in SHIPPED_DTYPES]
    if check:
        from .compare import compare

        for f, spec, kw in jobs:
            args = {k: v for k, v in kw.items() if k not in ("logit_columns", "label")}
            r = compare(spec, **args)
            if not r.passed:
                raise GoldenError(f"not re-recording {f}: the twins disagree ({'; '.join(r.all_failures()[:3])})")
    return [record(spec, f, **kw) for f, spec, kw in jobs]


def main(argv: Sequence[str] | None = None) -> int:
    """python -m parity.golden --rerecord tests/goldens"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m parity.golden", description=rerecord.__doc__)
    ap.add_argument("--rerecord", metavar="FOLDER", required=True, help="the folder of goldens to re-record")
    args = ap.parse_args(argv)
    for p in rerecord(args.rerecord):
        print(f"{p}  {p.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
