"""Independent NumPy references shared by the twins' tests: naive loops, one position at a time."""

from __future__ import annotations

import numpy as np


def silu(a: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) in float64."""
    return a / (1.0 + np.exp(-a))


def act_reference(p: np.ndarray, threshold: float, graves: bool, n_loops: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ACT (ARCHITECTURE.md section 4) over halting probabilities p (steps, ...), position by position.

    Accumulates in p's dtype, as the twins do in their acc dtype. n_loops (default: steps) is N, the
    step at which `graves` halts every still-running position; it may exceed the steps given.
    Returns weights, c after each step, running before each step (all (steps, ...)), loop counts and
    halted (both (...)).
    """
    steps, rest = p.shape[0], p.shape[1:]
    n_loops = steps if n_loops is None else n_loops
    q = p.reshape(steps, -1)
    P = q.shape[1]
    w, c_after, run_before = np.zeros((steps, P)), np.zeros((steps, P)), np.zeros((steps, P), bool)
    counts, halted = np.full(P, n_loops), np.zeros(P, bool)
    for i in range(P):
        c, running = q.dtype.type(0), True
        for t in range(steps):
            run_before[t, i] = running
            if running:
                halt = c + q[t, i] >= q.dtype.type(threshold) or (graves and t == n_loops - 1)
                w[t, i] = 1.0 - c if halt else q[t, i]
                c = c + q[t, i]
                if halt:
                    running, counts[i], halted[i] = False, t + 1, True
            c_after[t, i] = c
    return (w.reshape(p.shape), c_after.reshape(p.shape), run_before.reshape(p.shape), counts.reshape(rest),
            halted.reshape(rest))


def naive_moe(x: np.ndarray, arrays: dict[str, np.ndarray], top_k: int, n_shared: int,
              force: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MoE token by token, slot by slot, in float64: output (M, D) and chosen experts (M, k).

    arrays: router (E, D), bias (E,), stacked gate/up (E, D, H), down (E, H, D), and the shared experts
    in torch layout. Selection: top-k of z + b with ties to the lower index; a row of force replaces
    it unless it holds -1 (not forced).
    """
    Wr, b = arrays["router"], arrays["bias"]
    E = Wr.shape[0]
    out, chosen = np.zeros_like(x), np.zeros((len(x), top_k), dtype=np.int64)
    for i, xi in enumerate(x):
        z = Wr @ xi
        s = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        sel = sorted(range(E), key=lambda e: (-(z[e] + b[e]), e))[:top_k]
        if force is not None and (force[i] >= 0).all():
            sel = list(force[i])
        chosen[i] = sel
        w = s[sel] / s[sel].sum()
        for j, e in enumerate(sel):
            out[i] += w[j] * ((silu(xi @ arrays["gate"][e]) * (xi @ arrays["up"][e])) @ arrays["down"][e])
        for j in range(n_shared):
            g, u, d = (arrays[f"shared.{j}.{n}"] for n in ("gate", "up", "down"))
            out[i] += d @ (silu(g @ xi) * (u @ xi))
    return out, chosen
