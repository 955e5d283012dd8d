"""Run both twins on the same weights and tokens and say whether they compute the same thing.

    >>> import parity
    >>> r = parity.compare("tiny", dtype="float32")
    >>> r.passed, r.row("logits").max_abs, r.near_ties

What is compared (ARCHITECTURE.md section 7):
- weights: `dump_arrays` of both twins after `build`, exactly (both load the same manifest arrays).
- logits and every trace field, masked to the loop steps both twins executed; continuous outputs by
  max abs / max rel error against a per-dtype tolerance. With the value head (`value_head.enabled`)
  also `values` and the per-step `trace.value`, at the logits' tolerance.
- discrete decisions: loop counts, `halted`, `n_steps`, `running`, the routed expert sets; counted.

A discrete disagreement whose reference margin is below the near-tie tolerance (halting:
`|c + p - threshold|`, routing: k-th minus (k+1)-th biased router logit) is a NEAR TIE: reported, not
a failure. A later disagreement in the same batch row, at or after a near tie's position (causal
attention carries a different expert choice forward in position and depth), is counted as downstream
of it. Any other disagreement is a failure. When decisions disagree, both twins are re-run with the
reference's decisions forced (`force_halt`, `force_experts`) and every continuous output is compared
again; in the replay each twin's own halting decision (`cum_p >= threshold`) must also agree with the
forced one unless its margin is a near tie.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import numpy as np

import spec as S

from .report import DIVERGED, FAIL, NA, NEAR_TIE, OK, NearTie, ParityReport, Row

DTYPES = ("float64", "float32", "bfloat16")
TWINS = ("torch", "jax")
ADVERSARIAL_KINDS = ("zero_router", "halt_at_once", "never_halt", "at_threshold")
TRACE_FIELDS = ("state_norm", "halt_p", "cum_p", "running", "expert_idx", "router_margin")


@dataclass(frozen=True)
class Tolerances:
    """Bounds for one dtype. Continuous bounds are on max |torch - jax|; state_norm is relative."""

    logits: float  # abs
    probs: float  # abs, trace.halt_p and trace.cum_p (values in [0, 1] and [0, N])
    state_norm: float  # rel, ||h_t|| is O(sqrt(dim)), so an abs bound would depend on the width
    router_margin: float  # abs, a difference of two biased router logits
    near_tie_halting: float  # |c + p - threshold| below this: a halting disagreement is a near tie
    near_tie_routing: float  # k-th minus (k+1)-th biased router logit below this: a near tie


# float64: the twins agree to ~1e-14 at test sizes (measured, see docs); 1e-10 leaves 1e4 headroom,
# and a near tie is 1e-9: far above the ~1e-15 noise on c+p or a router logit, far below any margin
# seen at random init.
# float32: logits ~1e-6 apart at test sizes; 2e-5 is the bound the issue states. Halting sums and
# router logits differ by ~1e-7..1e-6 between the twins (a few float32 ulps of O(1) values, grown by
# the loop); a near tie is 1e-4, two orders of magnitude above that noise, so a disagreement with a
# larger margin cannot come from rounding.
# bfloat16: 8 mantissa bits (ulp 2^-8 = 3.9e-3 at 1.0). Activations round to bf16 after each op in
# both twins, at different points (fused vs unfused, accumulation order), so logits and traces differ
# by a few bf16 ulps; decisions are made in float32 on bf16 states, whose differences reach ~1e-2.
TOLERANCES: dict[str, Tolerances] = {
    "float64": Tolerances(logits=1e-10, probs=1e-10, state_norm=1e-10, router_margin=1e-10,
                          near_tie_halting=1e-9, near_tie_routing=1e-9),
    "float32": Tolerances(logits=2e-5, probs=2e-5, state_norm=2e-5, router_margin=2e-5,
                          near_tie_halting=1e-4, near_tie_routing=1e-4),
    "bfloat16": Tolerances(logits=5e-2, probs=5e-2, state_norm=5e-2, router_margin=5e-2,
                           near_tie_halting=5e-2, near_tie_routing=5e-2),
}


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


# --------------------------------------------------------------------------- running the twins


def _twin(name: str):
    if name == "torch":
        import mythos_torch
        return mythos_torch
    import mythos_jax
    return mythos_jax


def set_parity_precision() -> None:
    """Both twins' parity switches: float32 matmuls, TF32 off, JAX float64 on (global, idempotent)."""
    for name in TWINS:
        _twin(name).set_parity_precision()


def _torch_np(x) -> np.ndarray:
    import torch
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        x = x.float()  # NumPy has no bfloat16; every bf16 value is exact in float32
    return x.numpy()


def _jax_np(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: widen exactly
        a = a.astype(np.float32)
    return a


def _outputs(out, to_np: Callable) -> Outputs:
    def f(x):
        return to_np(x).astype(np.float64)

    tr = out.traces
    traces = {
        "state_norm": f(tr.state_norm), "halt_p": f(tr.halt_p), "cum_p": f(tr.cum_p),
        "running": to_np(tr.running).astype(bool), "expert_idx": to_np(tr.expert_idx).astype(np.int64),
        "router_margin": f(tr.router_margin),
    }
    if tr.value is not None:
        traces["value"] = f(tr.value)
    values = None if out.values is None else f(out.values)
    return Outputs(f(out.logits), to_np(out.loop_counts).astype(np.int64), to_np(out.halted).astype(bool),
                   int(out.n_steps), traces, values)  # n_steps: torch a Python int; jax an int32 scalar


def _forward(name: str, model, ids: np.ndarray, n_loops: int,
             force_halt: np.ndarray | None = None, force_experts: np.ndarray | None = None) -> Outputs:
    twin = _twin(name)
    if name == "torch":
        import torch
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        with torch.no_grad():
            out = twin.forward(model, t(ids), n_loops, early_exit=True, force_halt=t(force_halt), force_experts=t(force_experts))
        return _outputs(out, _torch_np)
    import jax.numpy as jnp
    j = lambda a: None if a is None else jnp.asarray(a, dtype=jnp.int32)  # noqa: E731
    out = twin.forward(model, j(ids), n_loops, early_exit=True, force_halt=j(force_halt), force_experts=j(force_experts))
    return _outputs(out, _jax_np)


def _dump(name: str, model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v).astype(np.float64) for k, v in _twin(name).dump_arrays(model).items()}


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
    finite = np.abs(ref[np.isfinite(ref)])
    scale = finite.max() if finite.size else 0.0
    max_abs = float(d.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, float(max_rel)


def _e(x: float) -> str:
    """1e-10, 2e-5: a tolerance as written in the docs."""
    return f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e")


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


def _halt_decisions(o: Outputs, N: int) -> np.ndarray:
    """(N, B, T) bool: the position halted by its own decision at step t+1."""
    steps = np.arange(1, N + 1)[:, None, None]
    return o.halted[None] & (o.loop_counts[None] == steps)


def _halt_margins(o: Outputs, spec: S.Spec, N: int) -> np.ndarray:
    """(N, B, T) |c + p - threshold| where the decision is the threshold's; +inf elsewhere.

    Excluded: steps not executed, positions not running, and the last step in `graves` mode (every
    running position halts there whatever c + p is).
    """
    tr = o.traces
    m = np.abs(tr["cum_p"] - spec.halting.threshold)
    keep = tr["running"].copy()
    keep[o.n_steps:] = False
    if spec.halting.remainder == "graves":
        keep[N - 1] = False
    return np.where(keep, m, np.inf)


def _expert_sets(o: Outputs, n: int) -> np.ndarray:
    return np.sort(o.traces["expert_idx"][:n], axis=-1)


def _min(x: np.ndarray) -> float | None:
    return float(x.min()) if x.size else None


def _where(mask: np.ndarray) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in w) for w in np.argwhere(mask)]


def _status(n_dis: int, n_fail: int) -> str:
    return FAIL if n_fail else (NEAR_TIE if n_dis else OK)


def _compare_run(spec: S.Spec, N: int, R: Outputs, O: Outputs, tol: Tolerances, report: ParityReport) -> bool:
    """Rows of the `run` phase; returns whether any discrete decision disagreed."""
    rows, failures = report.rows, report.failures
    thr = spec.halting.threshold
    n_cmp = min(R.n_steps, O.n_steps)
    B, T = R.loop_counts.shape
    k = R.traces["expert_idx"].shape[-1]

    # ---- routing: the set of routed experts per (step, batch, position) over steps both ran
    rdiff = np.zeros((N, B, T), bool)
    swaps = 0
    if k:
        rdiff[:n_cmp] = (_expert_sets(R, n_cmp) != _expert_sets(O, n_cmp)).any(-1)
        swaps = int(((R.traces["expert_idx"][:n_cmp] != O.traces["expert_idx"][:n_cmp]).any(-1) & ~rdiff[:n_cmp]).sum())
    rmargin = R.traces["router_margin"]
    # upstream[t, b, j]: some routing disagreement at a step <= t, same batch row, position <= j
    upstream = np.logical_or.accumulate(np.logical_or.accumulate(rdiff, axis=0), axis=2)
    before = np.zeros_like(upstream)
    before[1:] = upstream[:-1]  # ... at a step < t
    r_tie = rdiff & (rmargin < tol.near_tie_routing)
    r_down = rdiff & ~r_tie & before
    r_fail = rdiff & ~r_tie & ~before
    for t, b, j in _where(r_tie):
        report.near_ties.append(NearTie("routing", t + 1, b, j, float(rmargin[t, b, j]),
                                        f"experts {R.traces['expert_idx'][t, b, j].tolist()}",
                                        f"experts {O.traces['expert_idx'][t, b, j].tolist()}"))

    # ---- halting: the first step at which the two twins' decisions for a position differ
    DR, DO = _halt_decisions(R, N), _halt_decisions(O, N)
    hdiff_any = (DR != DO).any(0)  # (B, T)
    first = (DR != DO).argmax(0)  # (B, T) step index, valid where hdiff_any
    hm = _halt_margins(R, spec, N)
    h_tie = np.zeros((B, T), bool)
    h_down = np.zeros((B, T), bool)
    h_fail = np.zeros((B, T), bool)
    for b, j in _where(hdiff_any):
        s = int(first[b, j])
        margin = float(abs(R.traces["cum_p"][s, b, j] - thr)) if s < R.n_steps else float("inf")
        if margin < tol.near_tie_halting:
            h_tie[b, j] = True
            what = {True: "halt", False: "continue"}
            report.near_ties.append(NearTie("halting", s + 1, b, j, margin, what[bool(DR[s, b, j])], what[bool(DO[s, b, j])]))
        elif before[s, b, j] or rdiff[s, b, j]:
            h_down[b, j] = True  # its state already differs: a routing disagreement upstream of it
        else:
            h_fail[b, j] = True
    steps_fail = R.n_steps != O.n_steps and not hdiff_any.any()
    report.downstream += int(r_down.sum() + h_down.sum() + (R.n_steps != O.n_steps and not steps_fail))

    # ---- which continuous values the disagreements reach (so the rest can still be compared)
    pos_hit = rdiff.any(0) | hdiff_any  # (B, T)
    logits_hit = np.logical_or.accumulate(pos_hit, axis=1)  # causal: every later position in the row
    steps = np.arange(N)[:, None, None]
    cum_hit = upstream | (hdiff_any[None] & (steps >= first[None]))
    executed = np.zeros((N, B, T), bool)
    executed[:n_cmp] = True
    any_dis = bool(rdiff.any() or hdiff_any.any() or R.n_steps != O.n_steps)
    note = "all after a tie" if any_dis else ""

    def part(mask_all: np.ndarray, mask: np.ndarray) -> str:
        # values the disagreements cannot reach are still compared; the rest wait for the replay
        return f"{int(mask.sum())}/{int(mask_all.sum())} pre-tie" if mask.sum() != mask_all.sum() else ""

    def cont(output, ref, oth, mask_all, hit, bound, relative):
        mask = mask_all & ~hit
        row = _continuous(output, "run", ref, oth, mask, bound, relative, failures, part(mask_all, mask))
        if not mask.any() and mask_all.any():
            row.note = note
        rows.append(row)

    all_pos = np.ones((B, T), bool)
    cont("logits", R.logits, O.logits, all_pos, logits_hit, tol.logits, False)
    if R.values is not None:  # the value head reads the same RMSNorm_f(y) as the logits
        cont("values", R.values, O.values, all_pos, logits_hit, tol.logits, False)
    Rt, Ot = R.traces, O.traces
    if "value" in Rt:  # v(h_t): a function of the state, reached by routing differences only
        cont("trace.value", Rt["value"], Ot["value"], executed, upstream, tol.logits, False)
    cont("trace.state_norm", Rt["state_norm"], Ot["state_norm"], executed, upstream, tol.state_norm, True)
    cont("trace.halt_p", Rt["halt_p"], Ot["halt_p"], executed, upstream, tol.probs, False)
    cont("trace.cum_p", Rt["cum_p"], Ot["cum_p"], executed, cum_hit, tol.probs, False)
    if k:
        cont("trace.router_margin", Rt["router_margin"], Ot["router_margin"], executed, before, tol.router_margin, False)

    # ---- decision rows
    pos_count_dis = R.loop_counts != O.loop_counts
    run_dis = (Rt["running"][:n_cmp] != Ot["running"][:n_cmp])
    # loop counts, `halted` and `running` all follow from the per-step halting decisions: a difference
    # in any of them at a position whose decisions agree is a bookkeeping bug in one twin
    incoherent = (pos_count_dis | (R.halted != O.halted) | run_dis.any(0)) & ~hdiff_any
    h_fail |= incoherent
    n_h_fail = int(h_fail.sum())
    hm_min = _min(hm[np.isfinite(hm)])
    rows.append(Row("loop_counts", "run", "decision", B * T, f"equal, tie < {_e(tol.near_tie_halting)}",
                    _status(int(pos_count_dis.sum()), int((pos_count_dis & h_fail).sum())),
                    disagreements=int(pos_count_dis.sum()), min_margin=hm_min))
    halted_dis = R.halted != O.halted
    rows.append(Row("halted", "run", "decision", B * T, "equal",
                    _status(int(halted_dis.sum()), int((halted_dis & h_fail).sum())), disagreements=int(halted_dis.sum())))
    rows.append(Row("n_steps", "run", "decision", 1, "equal", FAIL if steps_fail else _status(int(R.n_steps != O.n_steps), 0),
                    disagreements=int(R.n_steps != O.n_steps), note=f"{R.n_steps}" if R.n_steps == O.n_steps else f"{R.n_steps} vs {O.n_steps}"))
    rows.append(Row("trace.running", "run", "decision", int(run_dis.size), "equal",
                    _status(int(run_dis.sum()), int((run_dis & h_fail[None]).sum())), disagreements=int(run_dis.sum())))
    if k:
        # slot order is descending biased logit: in float64 even its ties must be broken alike
        strict = report.dtype == "float64"
        slot_note = f"+{swaps} swaps" if swaps else ""  # same experts, other slot order
        if swaps and strict:
            failures.append(f"trace.expert_idx: {swaps} slot-order swaps (same experts, different order) in float64")
        rm_min = _min(rmargin[:R.n_steps][np.isfinite(rmargin[:R.n_steps])])
        rows.append(Row("trace.expert_idx", "run", "decision", int(n_cmp * B * T),
                        f"equal sets, tie < {_e(tol.near_tie_routing)}",
                        FAIL if (r_fail.any() or (swaps and strict)) else _status(int(rdiff.sum()), 0),
                        disagreements=int(rdiff.sum()), min_margin=rm_min, note=slot_note))
    else:
        rows.append(Row("trace.expert_idx", "run", "decision", 0, "dense FFN: no routing", NA))

    # ---- failure messages, first occurrence named
    if r_fail.any():
        t, b, j = _where(r_fail)[0]
        failures.append(f"routing: {int(r_fail.sum())} expert choices differ with reference margin >= {tol.near_tie_routing:.0e} "
                        f"(first: step {t + 1} batch {b} position {j}, margin {rmargin[t, b, j]:.3e}: "
                        f"{R.traces['expert_idx'][t, b, j].tolist()} vs {O.traces['expert_idx'][t, b, j].tolist()})")
    if incoherent.any():
        b, j = _where(incoherent)[0]
        failures.append(f"halting bookkeeping: {int(incoherent.sum())} positions differ in loop_counts/halted/running although "
                        f"their per-step decisions agree (first: batch {b} position {j}: loop counts {R.loop_counts[b, j]} vs "
                        f"{O.loop_counts[b, j]}, halted {bool(R.halted[b, j])} vs {bool(O.halted[b, j])})")
    h_fail &= ~incoherent
    n_h_fail = int(h_fail.sum())
    if n_h_fail:
        b, j = _where(h_fail)[0]
        s = int(first[b, j])
        failures.append(f"halting: {n_h_fail} positions decide differently with reference margin >= {tol.near_tie_halting:.0e} "
                        f"(first: step {s + 1} batch {b} position {j}, |c+p-threshold| = {abs(R.traces['cum_p'][s, b, j] - thr):.3e}; "
                        f"loop counts {R.loop_counts[b, j]} vs {O.loop_counts[b, j]})")
    if steps_fail:
        failures.append(f"n_steps: {R.n_steps} vs {O.n_steps} although every loop count agrees")
    return any_dis


def _compare_replay(spec: S.Spec, N: int, R0: Outputs, R: Outputs, O: Outputs, tol: Tolerances, report: ParityReport,
                    acc32: bool) -> None:
    """Rows of the `replay` phase: R0 the reference's own run, R and O both twins under its decisions."""
    rows, failures = report.rows, report.failures
    B, T = R.loop_counts.shape
    k = R.traces["expert_idx"].shape[-1]
    n = R.n_steps
    executed = np.zeros((N, B, T), bool)
    executed[:n] = True
    rows.append(_continuous("logits", "replay", R.logits, O.logits, None, tol.logits, False, failures))
    if R.values is not None:
        rows.append(_continuous("values", "replay", R.values, O.values, None, tol.logits, False, failures))
    if "value" in R.traces:
        rows.append(_continuous("trace.value", "replay", R.traces["value"], O.traces["value"], executed, tol.logits,
                                False, failures))
    for name, bound, rel in (("state_norm", tol.state_norm, True), ("halt_p", tol.probs, False), ("cum_p", tol.probs, False),
                             ("router_margin", tol.router_margin, False)):
        if name == "router_margin" and not k:
            continue
        rows.append(_continuous(f"trace.{name}", "replay", R.traces[name], O.traces[name], executed, bound, rel, failures))
    # forcing its own decisions must give the reference's first run back
    rows.append(_continuous(f"logits: {report.reference} forced=free", "replay", R0.logits, R.logits, None,
                            tol.logits, False, failures))
    # the forced decisions themselves: identical by construction, so any difference is a forcing bug
    for name, a, b in (("loop_counts", R0.loop_counts, O.loop_counts), ("halted", R0.halted, O.halted)):
        dis = int((a != b).sum())
        rows.append(Row(name, "replay", "decision", a.size, "equal (forced)", FAIL if dis else OK, disagreements=dis))
        if dis:
            failures.append(f"{name} (replay): {dis} positions differ from the forced reference decisions")
    steps_bad = R.n_steps != O.n_steps or R.n_steps != R0.n_steps
    rows.append(Row("n_steps", "replay", "decision", 1, "equal (forced)", FAIL if steps_bad else OK, disagreements=int(steps_bad),
                    note=f"{R0.n_steps}" if not steps_bad else f"run {R0.n_steps}, replays {R.n_steps} and {O.n_steps}"))
    if steps_bad:
        failures.append(f"n_steps (replay): {R0.n_steps} (reference run), {R.n_steps} and {O.n_steps} (replays)")
    if k:
        dis = int((R0.traces["expert_idx"][:n] != O.traces["expert_idx"][:n]).any(-1).sum())
        rows.append(Row("trace.expert_idx", "replay", "decision", n * B * T, "equal (forced)", FAIL if dis else OK,
                        disagreements=dis))
        if dis:
            failures.append(f"trace.expert_idx (replay): {dis} positions differ from the forced reference experts")
    # each twin's own halting decision c + p >= threshold, against the forced one (where the threshold decides)
    thr = np.float32(spec.halting.threshold) if acc32 else spec.halting.threshold
    forced = _halt_decisions(R0, N)
    margin = _halt_margins(R, spec, N)
    decides = np.isfinite(margin)
    own = O.traces["cum_p"] >= thr
    dis = decides & (own != forced)
    bad = dis & (margin >= tol.near_tie_halting)
    rows.append(Row(f"{report.other}'s own halting", "replay", "decision", int(decides.sum()),
                    f"= forced, tie < {_e(tol.near_tie_halting)}", _status(int(dis.sum()), int(bad.sum())),
                    disagreements=int(dis.sum()), min_margin=_min(margin[decides])))
    if bad.any():
        t, b, j = _where(bad)[0]
        failures.append(f"halting (replay): {report.other} would decide {int(bad.sum())} (step, position) pairs differently "
                        f"with margin >= {tol.near_tie_halting:.0e} (first: step {t + 1} batch {b} position {j}, "
                        f"margin {margin[t, b, j]:.3e})")


# --------------------------------------------------------------------------- the entry point


def _load_spec(spec: S.Spec | str) -> S.Spec:
    return spec if isinstance(spec, S.Spec) else S.load(spec)


def _check_inputs(s: S.Spec, dtype: str, batch: int, seq: int, n_loops: int | None, ids, reference: str) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ParityInputError(msg)

    need(dtype in DTYPES, f"dtype={dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    need(reference in TWINS, f"reference={reference!r} is not allowed; allowed: {', '.join(TWINS)}")
    need(n_loops is None or n_loops >= 1, f"n_loops={n_loops} must be >= 1")
    if ids is None:
        need(batch >= 1, f"batch={batch} must be >= 1")
        need(1 <= seq <= s.max_seq_len, f"seq={seq} must be between 1 and max_seq_len={s.max_seq_len}")
    else:
        a = np.asarray(ids)
        need(a.ndim == 2 and a.size > 0, f"ids must be a non-empty (batch, seq) array, got shape {a.shape}")
        need(np.issubdtype(a.dtype, np.integer), f"ids must be integers, got {a.dtype}")
        need(a.shape[1] <= s.max_seq_len, f"ids has {a.shape[1]} positions; max_seq_len={s.max_seq_len}")
        need(int(a.min()) >= 0 and int(a.max()) < s.vocab_size,
             f"ids must lie in [0, vocab_size={s.vocab_size}), got [{int(a.min())}, {int(a.max())}]")


def compare(spec: S.Spec | str, seed: int = 0, dtype: str = "float64", batch: int = 2, seq: int = 16,
            n_loops: int | None = None, ids: np.ndarray | None = None, weights: dict[str, np.ndarray] | None = None,
            reference: str = "torch", *, replay: bool | None = None,
            progress: Callable[[str], None] | None = None) -> ParityReport:
    """Build both twins from the same weights, run them on the same tokens, compare every output.

    Turns on both twins' parity precision switches (global: JAX float64 and float32 matmuls).

    Args:
        spec: a Spec, a preset name or a YAML path.
        seed: weight seed (`spec.init_arrays`) and token seed.
        dtype: "float64" | "float32" | "bfloat16".
        batch, seq: shape of the seeded token ids (ignored when `ids` is given).
        n_loops: loop steps; None -> spec.recurrent.max_loop_iters.
        ids: (B, T) int token ids; default `make_ids(spec, batch, seq, seed)` (contains 0 and V-1).
        weights: manifest arrays (torch layout, keyed by manifest path); default init_arrays(spec, seed).
        reference: the twin whose decisions are the reference ("torch" | "jax").
        replay: re-run with the reference's decisions forced: None -> when decisions disagree.
        progress: called with a short description before each stage.
    Returns:
        ParityReport; `report.passed` is the verdict.
    Raises:
        ParityInputError: bad dtype, reference, shapes or token ids.
        spec.SpecError: a spec that does not load.
    """
    s = _load_spec(spec)
    _check_inputs(s, dtype, batch, seq, n_loops, ids, reference)
    say = progress or (lambda msg: None)
    N = n_loops or s.recurrent.max_loop_iters
    ids = make_ids(s, batch, seq, seed) if ids is None else np.asarray(ids, dtype=np.int64)
    other = "jax" if reference == "torch" else "torch"
    tol = TOLERANCES[dtype]
    label = spec if isinstance(spec, str) else f"({s.attention.type}, {s.recurrent.ffn}, dim {s.dim}, {s.semantics})"
    report = ParityReport(spec=label, dtype=dtype, seed=seed, batch=ids.shape[0],
                          seq=ids.shape[1], n_loops=N, reference=reference, other=other, threshold=s.halting.threshold,
                          tolerances=asdict(tol))

    def timed(stage: str, msg: str, fn):
        say(msg)
        t0 = time.perf_counter()
        out = fn()
        report.timings[stage] = report.timings.get(stage, 0.0) + time.perf_counter() - t0
        return out

    set_parity_precision()
    arrays = S.init_arrays(s, seed) if weights is None else weights
    models = {}
    for name in TWINS:
        models[name] = timed(f"build {name}", f"building the {name} twin ({dtype})",
                             lambda name=name: _twin(name).build(s, seed=seed, dtype=dtype, weights=arrays))

    # the weights both twins hold, exactly (they load the same arrays)
    wa, wb = _dump(reference, models[reference]), _dump(other, models[other])
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

    msg = {"torch": "running the torch twin", "jax": "compiling and running the jax twin"}
    outs = {name: timed(f"run {name}", msg[name], lambda name=name: _forward(name, models[name], ids, N)) for name in TWINS}
    report.outputs.update(outs)
    R, O = outs[reference], outs[other]
    disagreed = _compare_run(s, N, R, O, tol, report)

    if replay or (replay is None and disagreed):
        force_halt = np.where(R.halted, R.loop_counts, 0)
        k = R.traces["expert_idx"].shape[-1]
        # rows of steps the reference never ran hold -1; those steps do not run under forced halting either
        force_experts = np.maximum(R.traces["expert_idx"], 0) if k else None
        rep = {name: timed("replay", f"replaying the {reference} twin's decisions in the {name} twin",
                           lambda name=name: _forward(name, models[name], ids, N, force_halt, force_experts))
               for name in TWINS}
        report.outputs.update({f"{name}/replay": o for name, o in rep.items()})
        report.replayed = True
        _compare_replay(s, N, R, rep[reference], rep[other], tol, report, acc32=dtype != "float64")
    return report
