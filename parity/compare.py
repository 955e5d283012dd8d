"""Run both twins on the same weights and tokens and say whether they compute the same thing.

    >>> import parity
    >>> r = parity.compare("tiny", dtype="float32")
    >>> r.passed, r.row("logits").max_abs, r.near_ties

What is compared (ARCHITECTURE.md section 7):
- weights: `dump_arrays` of both twins after `build`, exactly (both load the same manifest arrays).
  By default these are probe weights (parity/probe.py): every parameter moved off its structured
  init and the halting head calibrated so that loop counts spread over the whole range.
- logits and every trace field; continuous outputs by max abs (state_norm: max rel) error.
- discrete decisions: loop counts, `halted`, `n_steps`, `running`, the routed expert sets.

The verdict, in each direction (each twin in turn is the reference; both must pass):
1. Non-finite values in either twin fail, naming the output (unless `allow_nonfinite`).
2. Bounds are derived, not fixed (`derive_tolerances`): below float64, each twin is re-run in
   float64 with its own decisions forced, and a bound is NOISE_FACTOR times the reference twin's
   measured rounding noise plus a floor of a few ulps of the output's magnitude. In float64 under
   `mythos` semantics a bound is F64_SAFETY ulps of the output's magnitude per layer and sqrt(width);
   under `openmythos-0.5` (RoPE rotated in float32, as upstream) the noise anchor is a float32 run.
3. Decisions: in float64 under `mythos` semantics every decision must match exactly (ties are
   broken by the documented rules: lower expert index, `>=` at the threshold); near ties are
   reported but excuse nothing unless `allow_near_ties`. Otherwise a disagreement whose reference
   margin is below the derived near-tie bound is a near tie. Both twins are then re-run with ONLY
   the near-tie decisions forced to the reference's (`force_halt`/`force_experts`, -1 elsewhere:
   each twin decides every other position by its own rule on its own values). A disagreement left
   in such a replay must itself be a near tie (it is forced in the next round) or it fails. Each
   disagreement of the free run that is not a near tie must have vanished in the replay AND be
   within reach of a forced near tie (an earlier step at an earlier or equal position of the same
   row, through attention; for halting, the same position's own routing at that step); the report
   lists it with that tie (`report.excused`).
4. The final replay (all decisions agreeing) compares every continuous output against its bound.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

import spec as S
from weights_bridge import backends as registry

from .probe import calibrate_halting, perturbed_arrays, probe_loops, spread_routing
from .report import DIVERGED, FAIL, NA, NEAR_TIE, OK, Excusal, NearTie, ParityReport, Row

DTYPES = ("float64", "float32", "bfloat16")
TWINS = registry.BACKENDS
WEIGHTS = ("probe", "init")
ADVERSARIAL_KINDS = ("zero_router", "halt_at_once", "never_halt", "at_threshold")
TRACE_FIELDS = ("state_norm", "halt_p", "cum_p", "running", "expert_idx", "router_margin")

# unit roundoff of each compute dtype
EPS = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}
# a bound is this many times the reference twin's measured rounding noise (the two twins' errors
# add, with different accumulation orders; measured ratios of twin distance to noise stay below ~3)
NOISE_FACTOR = 8.0
# ... plus this many ulps of the output's magnitude, for outputs whose measured noise is 0
FLOOR_ULPS = 16.0
# float64 under mythos semantics: ulps of the magnitude per layer and per sqrt(width)
F64_SAFETY = 64.0
# the most replay rounds (each forces the near ties found in the previous one)
MAX_ROUNDS = 6
# the most probe runs that raise the router bias of unrouted experts
ROUTING_ROUNDS = 6


@dataclass(frozen=True)
class Tolerances:
    """The bounds of one comparison, derived for its model, input and reference twin (`how`)."""

    logits: float  # abs
    values: float  # abs, out.values
    value: float  # abs, trace.value
    state_norm: float  # rel: ||h_t|| is O(sqrt(dim))
    halt_p: float  # abs
    cum_p: float  # abs
    router_margin: float  # abs, a difference of two biased router logits
    near_tie_halting: float  # |c + p - threshold| below this: a halting disagreement may be a near tie
    near_tie_routing: float  # k-th minus (k+1)-th biased router logit below this: a near tie
    how: str = ""


class ParityInputError(ValueError):
    """Bad arguments to compare (dtype, shapes, token ids); the message names the argument."""


class Outputs(NamedTuple):
    """One forward's outputs as NumPy: floats as float64, counts as int64."""

    logits: np.ndarray  # (B, T, V)
    loop_counts: np.ndarray  # (B, T)
    halted: np.ndarray  # (B, T) bool
    n_steps: int
    traces: dict[str, np.ndarray]  # TRACE_FIELDS (and "value" with a value head), leading dim N
    values: np.ndarray | None = None  # (B, T) value head, None without one


# --------------------------------------------------------------------------- inputs and weights


def make_ids(spec: S.Spec, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """Seeded token ids (batch, seq) int64 that contain both vocabulary edges, 0 and V-1."""
    V = spec.vocab_size
    rng = np.random.default_rng([seed, 0x1D5])  # a stream apart from the weight draw of `seed`
    ids = rng.integers(0, V, size=(batch, seq), dtype=np.int64)
    flat = ids.reshape(-1)
    flat[0] = 0
    if flat.size > 1:
        flat[-1] = V - 1
    if flat.size > 3:  # and once more each at random positions
        i, j = rng.choice(np.arange(1, flat.size - 1), size=2, replace=False)
        flat[i], flat[j] = 0, V - 1
    return ids


def _halt_bias_path(spec: S.Spec) -> str:
    return "recurrent.act.halt.bias" if spec.halting.head == "linear" else "recurrent.act.halt.fc2.bias"


# sigmoid(+-50) rounds to exactly 1 (and ~2e-22) in every dtype, whatever the halting weights add (|w.h| << 10)
ADVERSARIAL_HALT_BIAS = 50.0


def adversarial_weights(spec: S.Spec | str, seed: int = 0, kind: str = "zero_router") -> dict[str, np.ndarray]:
    """Manifest arrays (float64) of `spec.init_arrays(spec, seed)`, edited to provoke ties and extremes.

    kind:
        "zero_router": router weight and bias zero, so every expert ties at every token (the
            selection must be experts 0..k-1 in both twins: ties go to the lower index).
        "halt_at_once": halting bias +50, p = 1: every position halts at step 1.
        "never_halt": halting bias -50, p ~ 0: no position reaches the threshold (graves: all halt
            at the last step; openmythos: none halts).
        "at_threshold": halting weights zero and bias logit(threshold), so p = threshold up to
            rounding at every position: every step-1 halting decision is a tie within an ulp, and
            the twins may round it either way (a near tie by construction).
    """
    spec = _load_spec(spec)
    if kind not in ADVERSARIAL_KINDS:
        raise ValueError(f"kind={kind!r} is not allowed; allowed: {', '.join(ADVERSARIAL_KINDS)}")
    w = S.init_arrays(spec, seed)
    if kind == "zero_router":
        if spec.recurrent.ffn != "moe":
            raise ValueError("kind='zero_router' needs recurrent.ffn=moe; this spec's recurrent FFN is dense (no router)")
        w["recurrent.block.ffn.router.weight"][...] = 0.0
        w["recurrent.block.ffn.router_bias"][...] = 0.0
    elif kind == "at_threshold":
        thr = spec.halting.threshold
        if thr >= 1.0:
            raise ValueError("kind='at_threshold' needs halting.threshold < 1 (p never reaches 1)")
        bias = _halt_bias_path(spec)
        w[bias.removesuffix("bias") + "weight"][...] = 0.0
        w[bias][...] = np.log(thr) - np.log1p(-thr)  # logit(threshold): sigmoid gives it back within an ulp
    else:
        sign = 1.0 if kind == "halt_at_once" else -1.0
        w[_halt_bias_path(spec)][...] = sign * ADVERSARIAL_HALT_BIAS
    return w


def probe_weights(spec: S.Spec | str, seed: int = 0, ids: np.ndarray | None = None,
                  n_loops: int | None = None) -> dict[str, np.ndarray]:
    """Probe weights (parity/probe.py) calibrated on `ids` (default: make_ids(spec, 2, 16, seed)).

    The halting head is calibrated on one float64 torch run with every step executed.
    """
    s = _load_spec(spec)
    ids = make_ids(s, 2, 16, seed) if ids is None else np.asarray(ids, dtype=np.int64)
    N = probe_loops(s) if n_loops is None else n_loops
    arrays = perturbed_arrays(s, seed)
    registry.enable_float64("torch")
    mt = registry.twin("torch")
    model = mt.build(s, seed=seed, dtype="float64", weights=arrays)
    for _ in range(ROUTING_ROUNDS):  # every expert routed to at least once
        tr = registry.forward("torch", model, ids, N, early_exit=False).traces
        # every executed (step, position): halted positions still feed the others through attention
        spread = spread_routing(s, arrays, registry.to_numpy(tr.expert_idx), np.ones(tr.running.shape, bool))
        if spread is None:
            break
        arrays = spread
        mt.load_arrays(model, arrays)
    p = registry.to_numpy(registry.forward("torch", model, ids, N, early_exit=False).traces.halt_p)
    p = np.clip(p.astype(np.float64), 1e-300, 1 - 1e-16)
    return calibrate_halting(s, arrays, np.log(p) - np.log1p(-p))


# --------------------------------------------------------------------------- running the twins


def set_parity_precision() -> None:
    """Both twins' parity switches: float32 matmuls, TF32 off, JAX float64 on (global, idempotent)."""
    for name in TWINS:
        registry.enable_float64(name)


def _np(x) -> np.ndarray:
    return registry.widen(registry.to_numpy(x))


def _outputs(out) -> Outputs:
    def f(x):
        return _np(x).astype(np.float64)

    tr = out.traces
    traces = {
        "state_norm": f(tr.state_norm), "halt_p": f(tr.halt_p), "cum_p": f(tr.cum_p),
        "running": _np(tr.running).astype(bool), "expert_idx": _np(tr.expert_idx).astype(np.int64),
        "router_margin": f(tr.router_margin),
    }
    if tr.value is not None:
        traces["value"] = f(tr.value)
    values = None if out.values is None else f(out.values)
    return Outputs(f(out.logits), _np(out.loop_counts).astype(np.int64), _np(out.halted).astype(bool),
                   int(out.n_steps), traces, values)  # n_steps: torch a Python int; jax an int32 scalar


def _forward(name: str, model, ids: np.ndarray, n_loops: int,
             force_halt: np.ndarray | None = None, force_experts: np.ndarray | None = None) -> Outputs:
    def arg(a):
        return None if a is None else registry.from_numpy(name, np.ascontiguousarray(a, dtype=np.int64))

    out = registry.forward(name, model, ids, n_loops, early_exit=True, force_halt=arg(force_halt),
                           force_experts=arg(force_experts))
    return _outputs(out)


def _dump(name: str, model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v).astype(np.float64) for k, v in registry.twin(name).dump_arrays(model).items()}


def _forced_all(o: Outputs) -> tuple[np.ndarray, np.ndarray | None]:
    """force_halt and force_experts that reproduce every decision of o."""
    k = o.traces["expert_idx"].shape[-1]
    # rows of steps the run never reached hold -1: not forced (those steps do not run either)
    return np.where(o.halted, o.loop_counts, 0), (o.traces["expert_idx"] if k else None)


# --------------------------------------------------------------------------- tolerances


def _magnitude(a: np.ndarray) -> float:
    finite = np.abs(a[np.isfinite(a)])
    return float(finite.max()) if finite.size else 0.0


def _continuous_fields(o: Outputs) -> dict[str, tuple[np.ndarray, bool]]:
    """Each continuous output by report name: (array over executed steps, relative bound?)."""
    n = o.n_steps
    out = {"logits": (o.logits, False)}
    if o.values is not None:
        out["values"] = (o.values, False)
    tr = o.traces
    if "value" in tr:
        out["trace.value"] = (tr["value"][:n], False)
    out["trace.state_norm"] = (tr["state_norm"][:n], True)
    out["trace.halt_p"] = (tr["halt_p"][:n], False)
    out["trace.cum_p"] = (tr["cum_p"][:n], False)
    if tr["expert_idx"].shape[-1]:
        out["trace.router_margin"] = (tr["router_margin"][:n], False)
    return out


FIELD_OF = {"logits": "logits", "values": "values", "trace.value": "value", "trace.state_norm": "state_norm",
            "trace.halt_p": "halt_p", "trace.cum_p": "cum_p", "trace.router_margin": "router_margin"}


def _noise(o: Outputs, anchor: Outputs) -> dict[str, float]:
    """Per continuous output: max |o - anchor| (state_norm: relative), the rounding noise of o's dtype."""
    a, b = _continuous_fields(o), _continuous_fields(anchor)
    return {name: _err(b[name][0], x)[1 if rel else 0] for name, (x, rel) in a.items()}


def derive_tolerances(spec: S.Spec, dtype: str, ref: Outputs, noise: dict[str, float] | None, anchor: str) -> Tolerances:
    """The bounds for comparing against `ref`: from its measured noise, or (float64, mythos) from magnitudes.

    noise: per output, the reference twin's distance to its `anchor`-dtype run under the same
    decisions (None in float64 under mythos semantics, where no more precise run exists).
    """
    fields = _continuous_fields(ref)
    eps = EPS[dtype]
    bounds: dict[str, float] = {}
    if noise is None:
        layers = spec.prelude_layers + ref.traces["halt_p"].shape[0] + spec.coda_layers
        grow = F64_SAFETY * eps * layers * np.sqrt(spec.dim)
        for name, (x, rel) in fields.items():
            bounds[name] = grow * (1.0 if rel else max(1.0, _magnitude(x)))
        how = (f"float64, mythos semantics: {F64_SAFETY:.0f} ulps x {layers} layers x sqrt(dim={spec.dim}) "
               "x max(1, |output|)")
    else:
        for name, (x, rel) in fields.items():
            floor = FLOOR_ULPS * eps * (1.0 if rel else max(1.0, _magnitude(x)))
            bounds[name] = NOISE_FACTOR * noise.get(name, 0.0) + floor
        how = (f"{NOISE_FACTOR:.0f} x the reference twin's measured distance to its own {anchor} run "
               f"(same decisions) + {FLOOR_ULPS:.0f} ulps of {dtype} x max(1, |output|)")
    tie_h = bounds["trace.cum_p"]
    tie_r = bounds.get("trace.router_margin", 0.0)
    return Tolerances(logits=bounds["logits"], values=bounds.get("values", bounds["logits"]),
                      value=bounds.get("trace.value", bounds["logits"]), state_norm=bounds["trace.state_norm"],
                      halt_p=bounds["trace.halt_p"], cum_p=bounds["trace.cum_p"], router_margin=tie_r,
                      near_tie_halting=tie_h, near_tie_routing=tie_r, how=how)


def _bound(tol: Tolerances, name: str) -> float:
    return getattr(tol, FIELD_OF[name])


# --------------------------------------------------------------------------- comparing


def _err(ref: np.ndarray, oth: np.ndarray) -> tuple[float, float]:
    """(max abs, max rel) of oth against ref; equal infinities are equal, a NaN on one side is inf.

    The relative error is normwise: max |oth - ref| / max |ref| (over finite values), so outputs near
    zero (most logits) do not blow it up.
    """
    if ref.size == 0:
        return 0.0, 0.0
    same = (ref == oth) | (np.isnan(ref) & np.isnan(oth))
    with np.errstate(invalid="ignore"):  # inf - inf where a router margin is +inf in both
        d = np.where(same, 0.0, np.abs(ref - oth))
    d = np.where(np.isnan(d), np.inf, d)
    scale = _magnitude(ref)
    max_abs = float(d.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, float(max_rel)


def _e(x: float) -> str:
    """1e-10, 2.4e-5: a bound as written in the report."""
    return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e").replace(".0e", "e")


def _continuous(output: str, phase: str, ref: np.ndarray, oth: np.ndarray, mask: np.ndarray | None,
                bound: float, relative: bool, failures: list[str], note: str = "") -> Row:
    if mask is not None:
        ref, oth = ref[mask], oth[mask]
    n = int(ref.size)
    tol = f"{'rel' if relative else 'abs'} <= {_e(bound)}"
    if n == 0:
        return Row(output, phase, "continuous", 0, tol, DIVERGED if note else NA, note=note)
    max_abs, max_rel = _err(ref, oth)
    ok = (max_rel if relative else max_abs) <= bound
    if not ok:
        failures.append(f"{output}{' (replay)' if phase == 'replay' else ''}: max {'rel' if relative else 'abs'} "
                        f"{max_rel if relative else max_abs:.3e} > {_e(bound)}")
    return Row(output, phase, "continuous", n, tol, OK if ok else FAIL, max_abs, max_rel, note=note)


def _nonfinite(name: str, o: Outputs) -> list[str]:
    """Failures for non-finite values in o (router margins may be +inf: k = E, or a dense FFN)."""
    out = []
    for output, (x, _) in _continuous_fields(o).items():
        bad = np.isnan(x) if output == "trace.router_margin" else ~np.isfinite(x)
        if bad.any():
            out.append(f"{name}: {output} has {int(bad.sum())} non-finite value(s) of {x.size} "
                       f"(NaN/inf; pass allow_nonfinite=True / --allow-nonfinite to compare their patterns)")
    return out


def _halt_decisions(o: Outputs, N: int) -> np.ndarray:
    """(N, B, T) bool: the position halted by its own decision at step t+1."""
    steps = np.arange(1, N + 1)[:, None, None]
    return o.halted[None] & (o.loop_counts[None] == steps)


def _threshold(spec: S.Spec, dtype: str) -> float:
    """The threshold as the twins compare it: in the accumulation dtype (float32 below float64)."""
    thr = spec.halting.threshold
    return thr if dtype == "float64" else float(np.float32(thr))


def _halt_margins(o: Outputs, spec: S.Spec, N: int, dtype: str) -> np.ndarray:
    """(N, B, T) |c + p - threshold| where the decision is the threshold's; +inf elsewhere.

    Excluded: steps not executed, positions not running, and the last step in `graves` mode (every
    running position halts there whatever c + p is).
    """
    tr = o.traces
    m = np.abs(tr["cum_p"] - _threshold(spec, dtype))
    keep = tr["running"].copy()
    keep[o.n_steps:] = False
    if spec.halting.remainder == "graves":
        keep[N - 1] = False
    return np.where(keep, m, np.inf)


def _min(x: np.ndarray) -> float | None:
    return float(x.min()) if x.size else None


def _where(mask: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in w) for w in np.argwhere(mask)]


def _status(n_dis: int, n_fail: int) -> str:
    return FAIL if n_fail else (NEAR_TIE if n_dis else OK)


class Diff(NamedTuple):
    """Where two runs' decisions differ."""

    route: np.ndarray  # (N, B, T) bool: routed expert sets differ (steps both ran)
    swaps: int  # same experts in another slot order
    halt: np.ndarray  # (B, T) bool: some per-step halting decision differs
    first: np.ndarray  # (B, T) int: the first step index at which it does (valid where halt)
    incoherent: np.ndarray  # (B, T) bool: counts/halted/running differ although the decisions agree
    steps: bool  # n_steps differ

    def any(self) -> bool:
        return bool(self.route.any() or self.halt.any() or self.incoherent.any() or self.steps)


def _diff(R: Outputs, O: Outputs, N: int) -> Diff:
    n_cmp = min(R.n_steps, O.n_steps)
    B, T = R.loop_counts.shape
    route = np.zeros((N, B, T), bool)
    swaps = 0
    if R.traces["expert_idx"].shape[-1]:
        er, eo = R.traces["expert_idx"][:n_cmp], O.traces["expert_idx"][:n_cmp]
        route[:n_cmp] = (np.sort(er, -1) != np.sort(eo, -1)).any(-1)
        swaps = int(((er != eo).any(-1) & ~route[:n_cmp]).sum())
    DR, DO = _halt_decisions(R, N), _halt_decisions(O, N)
    halt = (DR != DO).any(0)
    first = (DR != DO).argmax(0)
    run_dis = (R.traces["running"][:n_cmp] != O.traces["running"][:n_cmp]).any(0)
    # loop counts, `halted` and `running` all follow from the per-step halting decisions: a difference
    # in any of them at a position whose decisions agree is a bookkeeping bug in one twin
    incoherent = ((R.loop_counts != O.loop_counts) | (R.halted != O.halted) | run_dis) & ~halt
    return Diff(route, swaps, halt, first, incoherent, R.n_steps != O.n_steps)


def _route_reach(route_ties: np.ndarray) -> np.ndarray:
    """(N, B, T) bool: decisions of step t at position j that a routing tie at (t' < t, j' <= j) can reach."""
    upstream = np.logical_or.accumulate(np.logical_or.accumulate(route_ties, axis=0), axis=2)
    before = np.zeros_like(upstream)
    before[1:] = upstream[:-1]
    return before


class _Verdict:
    """The decision check of one direction: free-run disagreements, near-tie replays, excusals."""

    def __init__(self, spec: S.Spec, N: int, tol: Tolerances, strict: bool, report: ParityReport):
        self.spec, self.N, self.tol, self.strict, self.report = spec, N, tol, strict, report
        self.thr = _threshold(spec, report.dtype)

    def ties(self, R: Outputs, d: Diff) -> tuple[np.ndarray, np.ndarray]:
        """Near ties among the disagreements d, by R's margins: routing (N, B, T), halting (B, T)."""
        route = d.route & (R.traces["router_margin"] < self.tol.near_tie_routing)
        halt = np.zeros_like(d.halt)
        for b, j in _where(d.halt):
            s = int(d.first[b, j])
            margin = abs(R.traces["cum_p"][s, b, j] - self.thr) if s < R.n_steps and R.traces["running"][s, b, j] else np.inf
            halt[b, j] = margin < self.tol.near_tie_halting
        return route, halt

    def record_ties(self, R: Outputs, O: Outputs, d: Diff, route: np.ndarray, halt: np.ndarray, phase: str) -> None:
        thr = self.thr
        for t, b, j in _where(route):
            self.report.near_ties.append(NearTie(
                "routing", t + 1, b, j, float(R.traces["router_margin"][t, b, j]),
                f"experts {R.traces['expert_idx'][t, b, j].tolist()}", f"experts {O.traces['expert_idx'][t, b, j].tolist()}",
                phase))
        what = {True: "halt", False: "continue"}
        DR, DO = _halt_decisions(R, self.N), _halt_decisions(O, self.N)
        for b, j in _where(halt):
            s = int(d.first[b, j])
            self.report.near_ties.append(NearTie("halting", s + 1, b, j, float(abs(R.traces["cum_p"][s, b, j] - thr)),
                                                 what[bool(DR[s, b, j])], what[bool(DO[s, b, j])], phase))

    def describe(self, R: Outputs, O: Outputs, d: Diff, mask_route: np.ndarray, mask_halt: np.ndarray,
                 why: str) -> None:
        """Failure lines for the disagreements in the masks, first occurrence named."""
        thr = self.thr
        if mask_route.any():
            t, b, j = _where(mask_route)[0]
            self.report.failures.append(
                f"routing: {int(mask_route.sum())} expert choice(s) differ {why} (first: step {t + 1} batch {b} "
                f"position {j}, {self.report.reference} margin {R.traces['router_margin'][t, b, j]:.3e}: "
                f"{R.traces['expert_idx'][t, b, j].tolist()} vs {O.traces['expert_idx'][t, b, j].tolist()})")
        if mask_halt.any():
            b, j = _where(mask_halt)[0]
            s = int(d.first[b, j])
            m = abs(R.traces["cum_p"][s, b, j] - thr) if s < R.n_steps else float("inf")
            self.report.failures.append(
                f"halting: {int(mask_halt.sum())} position(s) decide differently {why} (first: step {s + 1} batch {b} "
                f"position {j}, {self.report.reference} |c+p-threshold| = {m:.3e}; loop counts "
                f"{R.loop_counts[b, j]} vs {O.loop_counts[b, j]})")

    def bookkeeping(self, R: Outputs, O: Outputs, d: Diff, phase: str) -> None:
        if d.incoherent.any():
            b, j = _where(d.incoherent)[0]
            self.report.failures.append(
                f"halting bookkeeping{' (replay)' if phase == 'replay' else ''}: {int(d.incoherent.sum())} position(s) "
                f"differ in loop_counts/halted/running although their per-step decisions agree (first: batch {b} "
                f"position {j}: loop counts {R.loop_counts[b, j]} vs {O.loop_counts[b, j]}, halted "
                f"{bool(R.halted[b, j])} vs {bool(O.halted[b, j])})")
        if d.steps and not d.halt.any():
            self.report.failures.append(f"n_steps{' (replay)' if phase == 'replay' else ''}: {R.n_steps} vs "
                                        f"{O.n_steps} although every halting decision agrees")
        if d.swaps and self.strict:
            # slot order is descending biased logit: in float64 even its ties must be broken alike
            self.report.failures.append(f"trace.expert_idx: {d.swaps} slot-order swap(s) (same experts, different "
                                        f"order) in float64")


def _run_rows(spec: S.Spec, N: int, R: Outputs, O: Outputs, d: Diff, tol: Tolerances, report: ParityReport,
              route_tie: np.ndarray, halt_tie: np.ndarray, failed_route: np.ndarray, failed_halt: np.ndarray) -> None:
    """Rows of the `run` phase. Continuous values that a disagreement can reach wait for the replay."""
    rows, failures = report.rows, report.failures
    B, T = R.loop_counts.shape
    k = R.traces["expert_idx"].shape[-1]
    n_cmp = min(R.n_steps, O.n_steps)
    upstream = np.logical_or.accumulate(np.logical_or.accumulate(d.route, axis=0), axis=2)
    before = _route_reach(d.route)
    pos_hit = d.route.any(0) | d.halt  # (B, T)
    logits_hit = np.logical_or.accumulate(pos_hit, axis=1)  # causal: every later position in the row
    steps = np.arange(N)[:, None, None]
    cum_hit = upstream | (d.halt[None] & (steps >= d.first[None]))
    executed = np.zeros((N, B, T), bool)
    executed[:n_cmp] = True
    note = "all after a disagreement" if d.any() else ""

    def cont(output, ref, oth, mask_all, hit, relative):
        mask = mask_all & ~hit
        part = f"{int(mask.sum())}/{int(mask_all.sum())} unreached" if mask.sum() != mask_all.sum() else ""
        row = _continuous(output, "run", ref, oth, mask, _bound(tol, output), relative, failures, part)
        if not mask.any() and mask_all.any():
            row.note = note
        rows.append(row)

    all_pos = np.ones((B, T), bool)
    cont("logits", R.logits, O.logits, all_pos, logits_hit, False)
    if R.values is not None:  # the value head reads the same RMSNorm_f(y) as the logits
        cont("values", R.values, O.values, all_pos, logits_hit, False)
    Rt, Ot = R.traces, O.traces
    if "value" in Rt:  # v(h_t): a function of the state, reached by routing differences only
        cont("trace.value", Rt["value"], Ot["value"], executed, upstream, False)
    cont("trace.state_norm", Rt["state_norm"], Ot["state_norm"], executed, upstream, True)
    cont("trace.halt_p", Rt["halt_p"], Ot["halt_p"], executed, upstream, False)
    cont("trace.cum_p", Rt["cum_p"], Ot["cum_p"], executed, cum_hit, False)
    if k:
        cont("trace.router_margin", Rt["router_margin"], Ot["router_margin"], executed, before, False)

    # ---- decision rows: FAIL where a disagreement is not accounted for
    hm = _halt_margins(R, spec, N, report.dtype)
    bad_pos = failed_halt | d.incoherent
    count_dis = R.loop_counts != O.loop_counts
    rows.append(Row("loop_counts", "run", "decision", B * T, f"equal, tie < {_e(tol.near_tie_halting)}",
                    _status(int(count_dis.sum()), int((count_dis & bad_pos).sum() + d.incoherent.sum())),
                    disagreements=int(count_dis.sum()), min_margin=_min(hm[np.isfinite(hm)])))
    halted_dis = R.halted != O.halted
    rows.append(Row("halted", "run", "decision", B * T, "equal",
                    _status(int(halted_dis.sum()), int((halted_dis & bad_pos).sum())), disagreements=int(halted_dis.sum())))
    steps_bad = d.steps and not d.halt.any()
    rows.append(Row("n_steps", "run", "decision", 1, "equal", FAIL if steps_bad else _status(int(d.steps), 0),
                    disagreements=int(d.steps), note=f"{R.n_steps}" if not d.steps else f"{R.n_steps} vs {O.n_steps}"))
    run_dis = Rt["running"][:n_cmp] != Ot["running"][:n_cmp]
    rows.append(Row("trace.running", "run", "decision", int(run_dis.size), "equal",
                    _status(int(run_dis.sum()), int((run_dis & bad_pos[None]).sum())), disagreements=int(run_dis.sum())))
    if k:
        strict_swaps = d.swaps and report.strict
        rm = Rt["router_margin"][:R.n_steps]
        rows.append(Row("trace.expert_idx", "run", "decision", int(n_cmp * B * T),
                        f"equal sets, tie < {_e(tol.near_tie_routing)}",
                        FAIL if (failed_route.any() or strict_swaps) else _status(int(d.route.sum()), 0),
                        disagreements=int(d.route.sum()), min_margin=_min(rm[np.isfinite(rm)]),
                        note=f"+{d.swaps} swaps" if d.swaps else ""))
    else:
        rows.append(Row("trace.expert_idx", "run", "decision", 0, "dense FFN: no routing", NA))


def _replay_rows(spec: S.Spec, N: int, R0: Outputs, R: Outputs, O: Outputs, tol: Tolerances, report: ParityReport,
                 force_halt: np.ndarray, force_experts: np.ndarray | None) -> None:
    """Rows of the final replay: R0 the reference's free run, R and O both twins under the forced near ties."""
    rows, failures = report.rows, report.failures
    B, T = R.loop_counts.shape
    k = R.traces["expert_idx"].shape[-1]
    n = min(R.n_steps, O.n_steps)
    executed = np.zeros((N, B, T), bool)
    executed[:n] = True
    rows.append(_continuous("logits", "replay", R.logits, O.logits, None, tol.logits, False, failures))
    if R.values is not None:
        rows.append(_continuous("values", "replay", R.values, O.values, None, tol.values, False, failures))
    if "value" in R.traces:
        rows.append(_continuous("trace.value", "replay", R.traces["value"], O.traces["value"], executed, tol.value,
                                False, failures))
    for name, bound, rel in (("state_norm", tol.state_norm, True), ("halt_p", tol.halt_p, False),
                             ("cum_p", tol.cum_p, False), ("router_margin", tol.router_margin, False)):
        if name == "router_margin" and not k:
            continue
        rows.append(_continuous(f"trace.{name}", "replay", R.traces[name], O.traces[name], executed, bound, rel, failures))
    # forcing the reference's own decisions must give its free run back
    rows.append(_continuous(f"logits: {report.reference} forced=free", "replay", R0.logits, R.logits, None,
                            tol.logits, False, failures))
    # every decision: forced ones must be honoured, free ones must agree (checked by the rounds)
    fh = force_halt >= 0
    for name, a, b in (("loop_counts", R.loop_counts, O.loop_counts), ("halted", R.halted, O.halted)):
        dis = int((a != b).sum())
        rows.append(Row(name, "replay", "decision", a.size, f"equal ({int(fh.sum())} forced)", FAIL if dis else OK,
                        disagreements=dis))
        if dis:
            failures.append(f"{name} (replay): {dis} position(s) differ between the twins under the same forced near ties")
    honour = (R0.loop_counts != O.loop_counts) & fh
    if honour.any():
        failures.append(f"force_halt: {report.other} did not honour {int(honour.sum())} forced loop count(s)")
    steps_bad = R.n_steps != O.n_steps
    rows.append(Row("n_steps", "replay", "decision", 1, "equal", FAIL if steps_bad else OK, disagreements=int(steps_bad),
                    note=f"{R.n_steps}" if not steps_bad else f"{R.n_steps} vs {O.n_steps}"))
    if steps_bad:
        failures.append(f"n_steps (replay): {R.n_steps} vs {O.n_steps}")
    if k:
        ex_r, ex_o = R.traces["expert_idx"][:n], O.traces["expert_idx"][:n]
        dis = int((np.sort(ex_r, -1) != np.sort(ex_o, -1)).any(-1).sum())
        forced = 0 if force_experts is None else int((force_experts[:n] >= 0).all(-1).sum())
        rows.append(Row("trace.expert_idx", "replay", "decision", n * B * T, f"equal sets ({forced} forced)",
                        FAIL if dis else OK, disagreements=dis))
        if dis:
            failures.append(f"trace.expert_idx (replay): {dis} expert set(s) differ under the same forced near ties")
        if force_experts is not None:
            mask = (force_experts[:n] >= 0).all(-1)
            not_honoured = int(((ex_o != force_experts[:n]).any(-1) & mask).sum())
            if not_honoured:
                failures.append(f"force_experts: {report.other} did not honour {not_honoured} forced expert set(s)")


def _direction(spec: S.Spec, N: int, dtype: str, models: dict, ids: np.ndarray, free: dict[str, Outputs],
               reference: str, other: str, tol: Tolerances, strict: bool, replay: bool | None, report: ParityReport,
               timed: Callable) -> None:
    """The verdict of `other` against `reference`, into `report`."""
    R, O = free[reference], free[other]
    v = _Verdict(spec, N, tol, strict, report)
    d = _diff(R, O, N)
    route_tie, halt_tie = v.ties(R, d)
    failed_route, failed_halt = np.zeros_like(d.route), np.zeros_like(d.halt)
    v.record_ties(R, O, d, route_tie, halt_tie, "run")
    v.bookkeeping(R, O, d, "run")

    if strict and (d.route.any() or d.halt.any()):
        failed_route, failed_halt = d.route, d.halt
        v.describe(R, O, d, d.route, d.halt, f"in {dtype}, where every decision must match (near ties excuse "
                                            "nothing here unless allow_near_ties / --allow-near-ties)")
        _run_rows(spec, N, R, O, d, tol, report, route_tie, halt_tie, failed_route, failed_halt)
        return

    B, T = R.loop_counts.shape
    k = R.traces["expert_idx"].shape[-1]
    force_halt = np.full((B, T), -1, dtype=np.int64)
    force_experts = np.full((N, B, T, k), -1, dtype=np.int64) if k else None
    forced_route, forced_halt = route_tie.copy(), halt_tie.copy()
    needs_replay = bool(replay) or (replay is None and d.any())
    reps: dict[str, Outputs] = {}
    converged = False  # the last replay left no disagreement that was not forced
    for round_ in range(1, MAX_ROUNDS + 1 if needs_replay else 1):
        if not forced_route.any() and not forced_halt.any() and not replay:
            break  # nothing to force: the free run's disagreements are not near ties
        force_halt = np.where(forced_halt, np.where(R.halted, R.loop_counts, 0), -1)
        if k:
            force_experts = np.where(forced_route[..., None], R.traces["expert_idx"], -1)
        if replay and round_ == 1 and not forced_route.any() and not forced_halt.any():
            force_halt, force_experts = _forced_all(R)  # asked for: every decision forced
        reps = {name: timed("replay", f"replay {round_}: {reference} near ties forced in the {name} twin",
                            lambda name=name: _forward(name, models[name], ids, N, force_halt, force_experts))
                for name in (reference, other)}
        report.replayed, report.rounds = True, round_
        d_rep = _diff(reps[reference], reps[other], N)
        new_route = d_rep.route & ~forced_route
        new_halt = d_rep.halt & ~forced_halt
        if not new_route.any() and not new_halt.any():
            v.bookkeeping(reps[reference], reps[other], d_rep, "replay")
            converged = True
            break
        r_tie, h_tie = v.ties(reps[reference], d_rep)
        v.record_ties(reps[reference], reps[other], d_rep, r_tie & new_route, h_tie & new_halt, f"replay {round_}")
        bad_route, bad_halt = new_route & ~r_tie, new_halt & ~h_tie
        if bad_route.any() or bad_halt.any():
            failed_route |= bad_route
            failed_halt |= bad_halt
            forced = f"{int(forced_route.sum())} routing and {int(forced_halt.sum())} halting near tie(s) forced"
            v.describe(reps[reference], reps[other], d_rep, bad_route, bad_halt,
                       f"with a margin above the near-tie bound, with {forced}: no near tie explains them")
            break
        forced_route |= new_route
        forced_halt |= new_halt
    else:
        if needs_replay and (forced_route.any() or forced_halt.any()):
            report.failures.append(f"replay: disagreements still new after {MAX_ROUNDS} rounds of forcing near ties")

    # ---- every free-run disagreement that is not a near tie must have vanished under the forced near
    # ties (converged) and be within reach of one: its own tie found in a replay, or a routing tie upstream
    _excuse(R, d, route_tie, halt_tie, failed_route, failed_halt, forced_route, forced_halt, converged, v, O, report)
    _run_rows(spec, N, R, O, d, tol, report, route_tie, halt_tie, failed_route, failed_halt)
    if reps:
        _replay_rows(spec, N, R, reps[reference], reps[other], tol, report, force_halt, force_experts)
        report.outputs.update({f"{name}/replay": o for name, o in reps.items()})


def _excuse(R: Outputs, d: Diff, route_tie, halt_tie, failed_route, failed_halt, forced_route, forced_halt, converged: bool,
            v: _Verdict, O: Outputs, report: ParityReport) -> None:
    """A free-run disagreement that is not a near tie must have vanished in the replay (converged) and be reached
    by a forced near tie; each excusal goes to report.excused, the rest into failed_* (in place) and a failure."""
    down_route = d.route & ~route_tie & ~failed_route
    down_halt = d.halt & ~halt_tie & ~failed_halt
    lost_route, lost_halt = np.zeros_like(down_route), np.zeros_like(down_halt)
    for t, b, j in _where(down_route):
        tie = (t, b, j) if forced_route[t, b, j] else _first_tie(forced_route, t - 1, b, j)
        if not converged or tie is None:
            lost_route[t, b, j] = True
            continue
        chain = "itself a near tie in a replay" if tie == (t, b, j) else \
            "an earlier step at an earlier or equal position (attention)"
        report.excused.append(Excusal("routing", t + 1, b, j, "routing", tie[0] + 1, tie[1], tie[2], chain))
    for b, j in _where(down_halt):
        s = int(d.first[b, j])
        if forced_halt[b, j]:
            tie, kind, chain = (s, b, j), "halting", "itself a near tie in a replay"
        elif forced_route[s, b, j]:
            tie, kind, chain = (s, b, j), "routing", "its own routing at that step"
        else:
            tie, kind, chain = _first_tie(forced_route, s - 1, b, j), "routing", \
                "an earlier step at an earlier or equal position (attention)"
        if not converged or tie is None:
            lost_halt[b, j] = True
            continue
        report.excused.append(Excusal("halting", s + 1, b, j, kind, tie[0] + 1, tie[1], tie[2], chain))
    if lost_route.any() or lost_halt.any():
        failed_route |= lost_route
        failed_halt |= lost_halt
        why = "and no forced near tie explains them" if converged else "and the replay did not resolve them"
        v.describe(R, O, d, lost_route, lost_halt, why)


def _first_tie(ties: np.ndarray, t_max: int, b: int, j: int) -> tuple[int, int, int] | None:
    """The latest-step, nearest-position routing tie at a step <= t_max and position <= j of row b."""
    if t_max < 0:
        return None
    hits = np.argwhere(ties[:t_max + 1, b, :j + 1])
    if not hits.size:
        return None
    t, jj = hits[-1]
    return int(t), b, int(jj)


# --------------------------------------------------------------------------- the entry point


def _load_spec(spec: S.Spec | str) -> S.Spec:
    return spec if isinstance(spec, S.Spec) else S.load(spec)


def _check_inputs(s: S.Spec, dtype: str, batch: int, seq: int, n_loops: int | None, ids, reference: str,
                  weights, names: tuple[str, ...]) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ParityInputError(msg)

    need(dtype in DTYPES, f"dtype={dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    every = registry.ALL_BACKENDS
    need(len(names) >= 2 and len(set(names)) == len(names) and all(n in every for n in names),
         f"backends={','.join(map(str, names))!r} is not allowed: name at least two different ones of {', '.join(every)}")
    need(reference in names, f"reference={reference!r} is not allowed; allowed: {', '.join(names)}")
    for n in names:
        need(dtype in registry.dtypes_of(n), f"dtype={dtype!r} is not supported by the {n} backend; it runs "
                                            f"{', '.join(registry.dtypes_of(n))}")
    need(n_loops is None or (isinstance(n_loops, (int, np.integer)) and n_loops >= 1), f"n_loops={n_loops} must be an integer >= 1")
    need(isinstance(weights, dict) or weights in WEIGHTS,
         f"weights={weights!r} is not allowed; allowed: {', '.join(WEIGHTS)} or a dict of manifest arrays")
    if ids is None:
        need(isinstance(batch, (int, np.integer)) and batch >= 1, f"batch={batch} must be an integer >= 1")
        need(isinstance(seq, (int, np.integer)) and 1 <= seq <= s.max_seq_len,
             f"seq={seq} must be an integer between 1 and max_seq_len={s.max_seq_len}")
    else:
        a = np.asarray(ids)
        need(a.ndim == 2 and a.size > 0, f"ids must be a non-empty (batch, seq) array, got shape {a.shape}")
        need(np.issubdtype(a.dtype, np.integer), f"ids must be integers, got {a.dtype}")
        need(a.shape[1] <= s.max_seq_len, f"ids has {a.shape[1]} positions; max_seq_len={s.max_seq_len}")
        need(int(a.min()) >= 0 and int(a.max()) < s.vocab_size,
             f"ids must lie in [0, vocab_size={s.vocab_size}), got [{int(a.min())}, {int(a.max())}]")


def compare(spec: S.Spec | str, seed: int = 0, dtype: str = "float64", batch: int = 2, seq: int = 16,
            n_loops: int | None = None, ids: np.ndarray | None = None,
            weights: str | dict[str, np.ndarray] = "probe", reference: str = "torch", *,
            backends: Sequence[str] = TWINS, both_directions: bool = True, allow_near_ties: bool | None = None, allow_nonfinite: bool = False,
            replay: bool | None = None, progress: Callable[[str], None] | None = None) -> ParityReport:
    """Build both twins from the same weights, run them on the same tokens, compare every output.

    Turns on both twins' parity precision switches (global: JAX float64 and float32 matmuls).

    Args:
        spec: a Spec, a preset name or a YAML path.
        seed: weight seed (`spec.init_arrays`) and token seed.
        dtype: "float64" | "float32" | "bfloat16".
        batch, seq: shape of the seeded token ids (ignored when `ids` is given).
        n_loops: loop steps; None -> with probe weights spec.recurrent.max_loop_iters + 2, else max_loop_iters.
        ids: (B, T) int token ids; default `make_ids(spec, batch, seq, seed)` (contains 0 and V-1).
        weights: "probe" (default: every parameter off its structured init, parity/probe.py), "init"
            (spec.init_arrays), or manifest arrays (torch layout, keyed by manifest path).
        reference: the backend whose decisions are the reference in the main direction ("torch" | "jax" | "onnx").
        backends: the backends to compare, at least two: the twins ("torch", "jax") and runtimes ("onnx",
            the torch twin's exported graph in ONNX Runtime); each other one is checked against the reference.
        both_directions: also check each pair with the other backend as the reference (`report.reverse` for
            the first, `report.pairs` for the rest); every check must pass.
        allow_near_ties: let near ties excuse decisions in float64 under mythos semantics too
            (None: only below float64 or under openmythos-0.5).
        allow_nonfinite: compare NaN/inf patterns instead of failing on them.
        replay: force and re-run even when no decision disagrees (every decision forced), for its rows;
            None: replay when a decision disagrees.
        progress: called with a short description before each stage.
    Returns:
        ParityReport; `report.passed` is the verdict (of both directions).
    Raises:
        ParityInputError: bad dtype, reference, weights, shapes or token ids.
        spec.SpecError: a spec that does not load.
    """
    s = _load_spec(spec)
    names = tuple(backends)
    _check_inputs(s, dtype, batch, seq, n_loops, ids, reference, weights, names)
    others = [n for n in names if n != reference]
    say = progress or (lambda msg: None)
    probe = isinstance(weights, str) and weights == "probe"
    N = int(n_loops) if n_loops is not None else (probe_loops(s) if probe else s.recurrent.max_loop_iters)
    ids = make_ids(s, batch, seq, seed) if ids is None else np.asarray(ids, dtype=np.int64)
    label = spec if isinstance(spec, str) else f"({s.attention.type}, {s.recurrent.ffn}, dim {s.dim}, {s.semantics})"
    strict = dtype == "float64" and s.semantics == "mythos" and not allow_near_ties
    timings: dict[str, float] = {}

    def timed(stage: str, msg: str, fn):
        say(msg)
        t0 = time.perf_counter()
        out = fn()
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
        return out

    set_parity_precision()
    if probe:
        arrays = timed("probe weights", "calibrating the probe weights (one float64 torch run)",
                       lambda: probe_weights(s, seed, ids, N))
    else:
        arrays = S.init_arrays(s, seed) if isinstance(weights, str) else weights
    models = {name: timed(f"build {name}", f"building the {name} twin ({dtype})",
                          lambda name=name: registry.twin(name).build(s, seed=seed, dtype=dtype, weights=arrays))
              for name in names}
    msg = {"torch": "running the torch twin", "jax": "compiling and running the jax twin",
           "onnx": "exporting the torch twin and running it in ONNX Runtime"}
    free = {name: timed(f"run {name}", msg.get(name, f"running {name}"), lambda name=name: _forward(name, models[name], ids, N))
            for name in names}

    # the rounding noise of each twin: its distance to a more precise run of itself (same decisions)
    anchor = "float64" if dtype != "float64" else ("float32" if s.semantics != "mythos" else None)
    anchors: dict[str, Outputs] = {}
    noise: dict[str, dict[str, float] | None] = {name: None for name in names}
    for name in (names if anchor else ()):
        def run_anchor(name=name):
            m = registry.twin(name).build(s, seed=seed, dtype=anchor, weights=arrays)
            a = _forward(name, m, ids, N)
            same = not _diff(free[name], a, N).any() and np.array_equal(free[name].traces["expert_idx"],
                                                                       a.traces["expert_idx"])
            return a, (a if same else _forward(name, m, ids, N, *_forced_all(free[name])))
        anchors[name], forced_anchor = timed("anchor", f"the {name} twin in {anchor} (rounding noise)", run_anchor)
        noise[name] = _noise(free[name], forced_anchor)
    # below float64 (mythos semantics) the float64 runs must also decide alike, exactly: the tie rules
    # (lower expert index, >= at the threshold) are asked there, where rounding cannot excuse them
    anchor_failures = []
    if anchor == "float64" and s.semantics == "mythos" and not allow_near_ties:
        anchor_failures = [f for o in others for f in _anchor_decisions(anchors, reference, o, N)]

    # each other backend against the reference, then (both directions) the reference against each
    pairs = [(reference, o) for o in others] + ([(o, reference) for o in others] if both_directions else [])
    reports = []
    for ref, oth in pairs:
        tol = derive_tolerances(s, dtype, free[ref], noise[ref], anchor or "float64")
        rep = ParityReport(spec=label, dtype=dtype, seed=seed, batch=ids.shape[0], seq=ids.shape[1], n_loops=N,
                           reference=ref, other=oth, threshold=s.halting.threshold, tolerances=asdict(tol),
                           weights=weights if isinstance(weights, str) else "custom", strict=strict)
        _weights_row(models, ref, oth, rep)
        failures = [f for name in (ref, oth) for f in _nonfinite(name, free[name])] if not allow_nonfinite else []
        rep.failures.extend(failures + anchor_failures)
        rep.outputs.update(free)
        rep.outputs.update({f"{name}/{anchor}": o for name, o in anchors.items()})
        _direction(s, N, dtype, models, ids, free, ref, oth, tol, strict, replay, rep, timed)
        reports.append(rep)
    main = reports[0]
    main.timings = timings
    if both_directions:
        main.reverse = reports[len(others)]  # the first other backend as the reference
    main.pairs = [r for r in reports[1:] if r is not main.reverse]
    return main


def _anchor_decisions(anchors: dict[str, Outputs], a: str, b: str, N: int) -> list[str]:
    """Failures where two backends' free float64 runs decide differently (any margin: float64 is exact)."""
    T, J = anchors[a], anchors[b]
    d = _diff(T, J, N)
    out = []
    if d.route.any():
        t, b, j = _where(d.route)[0]
        out.append(f"float64 decisions: {int(d.route.sum())} expert choice(s) differ between the float64 runs of {a} and {b} "
                   f"(first: step {t + 1} batch {b} position {j}, margin {T.traces['router_margin'][t, b, j]:.3e}: "
                   f"{T.traces['expert_idx'][t, b, j].tolist()} vs {J.traces['expert_idx'][t, b, j].tolist()}); ties "
                   "go to the lower expert index in both")
    if d.halt.any() or d.incoherent.any() or d.steps:
        bad = d.halt | d.incoherent
        b, j = _where(bad)[0] if bad.any() else (0, 0)
        out.append(f"float64 decisions: {int(bad.sum())} loop count(s) differ between the float64 runs of {a} and {b} "
                   f"(first: batch {b} position {j}: {T.loop_counts[b, j]} vs {J.loop_counts[b, j]}; n_steps "
                   f"{T.n_steps} vs {J.n_steps}); a position halts when c + p >= threshold in both")
    if d.swaps:
        out.append(f"float64 decisions: {d.swaps} slot-order swap(s) between the float64 runs of {a} and {b}")
    return out


def _weights_row(models: dict, ref: str, oth: str, report: ParityReport) -> None:
    """The weights both twins hold, exactly (they load the same arrays)."""
    wa, wb = _dump(ref, models[ref]), _dump(oth, models[oth])
    keys = sorted(set(wa) | set(wb))
    missing = sorted(set(wa) ^ set(wb))
    wdiff = max((float(np.abs(wa[k] - wb[k]).max()) if wa[k].shape == wb[k].shape else float("inf"))
                for k in keys if k in wa and k in wb) if keys else 0.0
    ok = not missing and wdiff == 0.0
    report.rows.append(Row("weights", "run", "exact", sum(v.size for v in wa.values()), "bit-identical", OK if ok else FAIL,
                           max_abs=wdiff, note=f"only in one twin: {missing[:3]}" if missing else ""))
    if not ok:
        report.failures.append(f"weights: the twins hold different weights after build (max abs {wdiff:.3e}"
                               f"{', keys only in one twin: ' + ', '.join(missing[:5]) if missing else ''})")


# --------------------------------------------------------------------------- for parity.golden and parity.plugin


def forward_outputs(backend: str, model, ids: np.ndarray, n_loops: int, force_halt: np.ndarray | None = None,
                    force_experts: np.ndarray | None = None) -> Outputs:
    """One forward of a built `backend` model as compare runs it (early exit; -1 in the forcing: not forced)."""
    return _forward(backend, model, ids, n_loops, force_halt, force_experts)


def rounding_noise(o: Outputs, anchor: Outputs) -> dict[str, float]:
    """Per continuous output (report names): max |o - anchor| (state_norm: relative), anchor a more precise run
    of the same weights with o's decisions (the `noise` of derive_tolerances)."""
    return _noise(o, anchor)
