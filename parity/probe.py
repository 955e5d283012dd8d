"""Probe weights: every parameter moved off its structured initial value, so a parity check has power.

At `spec.init_arrays` weights the check is blind to many real bugs: RMSNorm scales are exactly 1,
biases exactly 0, the LTI parameters and the router bias sit at their constants, and ACT halts
every position after 2-3 steps. A twin that ignores a norm weight, drops a bias, flips the sign of
`log_dt` or miscomputes step 5 then gives the same outputs as a correct one. The probe weights
below move every tensor (same manifest, same seed => the same arrays for every backend):

| init rule (spec/manifest.py)   | probe value                                             |
|--------------------------------|---------------------------------------------------------|
| ones (RMSNorm weights)         | U(0.5, 1.5)                                             |
| zeros (biases, log_A, log_dt)  | N(0, 0.1); log_A and log_dt N(0, 0.5), two log_A channels at +-24 (past the +-20 clip) |
| const v (LTI B, gate biases)   | v * U(0.5, 1.5)                                         |
| router_bias (buffer)           | N(0, 0.5 * std * sqrt(dim)), then raised for unrouted experts (below) |
| normal (std) and uniform       | drawn as by init_arrays                                 |
| halting head (last layer)      | calibrated on the compared tokens (below)               |

Routing is spread over every expert: a bug confined to an expert that no token reaches is invisible,
so a few float64 runs move the router bias by the model's own aux-loss-free balancing rule
(b += gamma * sign(mean load - load)) until every expert is used at least once (at most 6 runs).

The halting head is calibrated, because the loop counts it yields depend on the states it reads:
one float64 run of a twin with all steps (`early_exit=False`) gives the halting logits
z[t, b, j] = w . h_t + b. Halting never changes a state, so an affine change of (w, b) moves every
z by the same map, and the counts it gives can be computed from z alone. The map is chosen so that
the loop counts spread over 1..N with some positions running to the end without halting.

`probe_loops(spec)` is the loop count a probe check runs: two more than trained, so the depth-LoRA
clamp (`scale[min(t, N_train - 1)]`) is exercised.
"""

from __future__ import annotations

import numpy as np

import spec as S

# seed stream of the probe draws, apart from the init draw of the same seed
_STREAM = 0x9B0BE


def probe_loops(spec: S.Spec) -> int:
    """Loop steps of a probe check: the trained depth plus two (the LoRA scale clamp is exercised)."""
    return spec.recurrent.max_loop_iters + 2


def _halt_paths(spec: S.Spec) -> tuple[str, str]:
    """(weight, bias) paths of the halting head's last linear layer."""
    base = "recurrent.act.halt" if spec.halting.head == "linear" else "recurrent.act.halt.fc2"
    return f"{base}.weight", f"{base}.bias"


def perturbed_arrays(spec: S.Spec, seed: int = 0) -> dict[str, np.ndarray]:
    """init_arrays(spec, seed) with every structured value moved (the table above), halting head uncalibrated."""
    arrays = S.init_arrays(spec, seed)
    rng = np.random.default_rng([seed, _STREAM])
    std = spec.init.std
    for p in S.manifest(spec):
        a, rule = arrays[p.path], p.init[0]
        if p.path.endswith("router_bias"):
            arrays[p.path] = rng.standard_normal(p.shape) * 0.5 * std * np.sqrt(spec.dim)
        elif rule == "ones":
            arrays[p.path] = rng.uniform(0.5, 1.5, p.shape)
        elif rule == "zeros":
            scale = 0.5 if p.path.endswith(("log_A", "log_dt")) else 0.1
            arrays[p.path] = rng.standard_normal(p.shape) * scale
            if p.path.endswith("log_A") and p.shape[0] >= 4:
                arrays[p.path][:2] = (24.0, -24.0)  # A at both ends of the clip: exp(-exp(+-20))
        elif rule == "const":
            arrays[p.path] = a * rng.uniform(0.5, 1.5, p.shape)
    return arrays


def spread_routing(spec: S.Spec, arrays: dict[str, np.ndarray], expert_idx: np.ndarray,
                   running: np.ndarray) -> dict[str, np.ndarray] | None:
    """arrays with the router bias raised for the experts no running (step, position) chose; None if all were.

    expert_idx (N, B, T, k) and running (N, B, T) of one run of these arrays.
    """
    path = "recurrent.block.ffn.router_bias"
    if path not in arrays:
        return None
    E = spec.moe.n_experts
    used = np.bincount(expert_idx[running].reshape(-1), minlength=E)[:E] if running.any() else np.zeros(E, int)
    if (used > 0).all():
        return None
    step = 0.5 * spec.init.std * np.sqrt(spec.dim)  # the scale of the router logits at RMS-normalised inputs
    out = dict(arrays)
    # the balancing rule of the model's own router-bias update: b += gamma * sign(mean load - load)
    out[path] = arrays[path] + 0.25 * step * np.sign(used.mean() - used)
    return out


def _counts(z: np.ndarray, threshold: float, graves: bool) -> tuple[np.ndarray, np.ndarray]:
    """Loop counts (B, T) and `halted` of halting logits z (N, B, T) by ARCHITECTURE.md section 4."""
    N = z.shape[0]
    p = 1.0 / (1.0 + np.exp(-z))
    c = np.cumsum(p, axis=0)
    hit = c >= threshold
    halted = hit.any(0)
    counts = np.where(halted, hit.argmax(0) + 1, N)
    return counts, halted | graves


def calibrate_halting(spec: S.Spec, arrays: dict[str, np.ndarray], z: np.ndarray) -> dict[str, np.ndarray]:
    """arrays with the halting head's last layer mapped so that the counts of z spread over 1..N.

    z: (N, B, T) float64 halting logits of a run of these arrays with every step executed.
    Target: the largest spread (entropy) of loop counts, with 5-30% of positions never reaching
    the threshold; z is first standardised and given a standard deviation of 1.5.
    """
    w_path, b_path = _halt_paths(spec)
    mu, sd = float(z.mean()), float(z.std())
    a = 1.5 / sd if sd > 0 else 1.0
    zs = (z - mu) * a
    N = z.shape[0]
    best, best_shift = -1.0, 0.0
    for shift in np.linspace(-8.0, 4.0, 97):
        counts, _ = _counts(zs + shift, spec.halting.threshold, False)
        never = float((np.cumsum(1.0 / (1.0 + np.exp(-(zs + shift))), axis=0)[-1] < spec.halting.threshold).mean())
        hist = np.bincount(counts.reshape(-1), minlength=N + 1)[1:] / counts.size
        entropy = -float(np.sum(hist[hist > 0] * np.log(hist[hist > 0])))
        score = entropy - (0.0 if 0.05 <= never <= 0.3 else 1.0 + abs(never - 0.15))
        if score > best:
            best, best_shift = score, float(shift)
    out = dict(arrays)
    out[w_path] = arrays[w_path] * a
    out[b_path] = (arrays[b_path] - mu) * a + best_shift
    return out
