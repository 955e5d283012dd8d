"""Stopping rules: choose an inference step per row from step-wise logits, and score every step at once.

NumPy only (either twin's `ModelOutput.step_logits`, converted with weights_bridge.backends.to_numpy).
Legend: N loop steps (step t = 1..N), B rows, T positions, V vocabulary, J answers of the longest row.
A row's answer positions are its `mask` (B, T); steps are 1-based everywhere (step t = the state after t
loop steps, `step_logits[t - 1]`).

| rule | `--stop` | the row's step |
|---|---|---|
| `fixed(s)` | `fixed:S` | s |
| `max_confidence` | `max_confidence` | argmax_t conf_t, conf_t = mean over the row's answer positions of max_v softmax(logits_t)_v (Fan et al. 2025); the earliest step on ties |
| `kl(eps)` | `kl:EPS` | the first t >= 2 with mean over answer positions of KL(p_t ‖ p_{t-1}) < eps (Huginn, Geiping et al. 2025); N if none |
| `cumulative(c)` | `cumulative:C` | per answer position the first t with cum_p_t >= c (N if none); the row's step = the max over its answer positions (the row is done when its slowest answer is: exact match needs them all) |

`cumulative` reads the model's halting trace `cum_p` (N, B, T): ACT's running sum of p, PonderNet's
C_t = 1 - prod(1 - lambda_s). Evaluation: `sweep` (exact match of every row at every step), `position_sweep`
(accuracy per answer index at every step), `at_steps` (the logits at each row's chosen step).

    >>> from mythos.stopping import choose, sweep
    >>> correct = sweep(step_logits, targets, mask)              # (N, B) bool
    >>> steps = choose("kl:1e-3", step_logits, mask)             # (B,) 1-based
    >>> correct[steps - 1, np.arange(len(steps))].mean()         # exact match with the rule
"""

from __future__ import annotations

import numpy as np

from .tasks import position_accuracy

RULES = ("fixed", "max_confidence", "kl", "cumulative")


def _f64(x: np.ndarray, what: str, ndim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} axes, got shape {x.shape}")
    return x


def _check(step_logits: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = _f64(step_logits, "step_logits (N, B, T, V)", 4)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != z.shape[1:3]:
        raise ValueError(f"mask {mask.shape} must be step_logits' (B, T) = {z.shape[1:3]}")
    return z, mask


def log_softmax(step_logits: np.ndarray) -> np.ndarray:
    """(..., V) float64 log-probabilities (max-shifted)."""
    z = np.asarray(step_logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _row_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, B): mean of x (N, B, T) over each row's answer positions (0 for a row without answers)."""
    return (x * mask).sum(-1) / np.maximum(mask.sum(-1), 1)


# --------------------------------------------------------------------------- evaluation at every step


def sweep(step_logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, B) bool: row b is exactly right at step t (every answer position's argmax equals its target)."""
    z, mask = _check(step_logits, mask)
    right = (z.argmax(-1) == np.asarray(targets)) | ~mask
    return right.all(-1)


def position_sweep(step_logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, J) float64: accuracy of answer index j at step t, over the rows that have a j-th answer."""
    z, mask = _check(step_logits, mask)
    return position_accuracy(z.argmax(-1), np.asarray(targets), mask)


def confidence(step_logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, B): mean over the row's answer positions of the largest softmax probability at step t."""
    z, mask = _check(step_logits, mask)
    return _row_mean(np.exp(log_softmax(z).max(-1)), mask)


def step_kl(step_logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N - 1, B): entry t - 2 = mean over answer positions of KL(p_t ‖ p_{t-1}), t = 2..N."""
    z, mask = _check(step_logits, mask)
    lp = log_softmax(z)
    kl = (np.exp(lp[1:]) * (lp[1:] - lp[:-1])).sum(-1)  # (N-1, B, T)
    return _row_mean(np.maximum(kl, 0.0), mask)  # >= 0 in exact arithmetic; rounding can leave -1e-17


def at_steps(step_logits: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The logits at each row's step: steps (B,) -> (B, T, V), or per position steps (B, T) -> (B, T, V)."""
    z = np.asarray(step_logits)
    N, B, T = z.shape[:3]
    steps = np.asarray(steps)
    if steps.shape not in ((B,), (B, T)) or steps.min(initial=1) < 1 or steps.max(initial=1) > N:
        raise ValueError(f"steps {steps.shape} must be (B,) = ({B},) or (B, T) = ({B}, {T}) in 1..{N}")
    if steps.ndim == 1:
        return z[steps - 1, np.arange(B)]
    return z[steps - 1, np.arange(B)[:, None], np.arange(T)[None, :]]


# --------------------------------------------------------------------------- the rules


def fixed(step_logits: np.ndarray, mask: np.ndarray, s: int) -> np.ndarray:
    """(B,) all s (1 <= s <= N)."""
    z, mask = _check(step_logits, mask)
    if not 1 <= int(s) <= z.shape[0]:
        raise ValueError(f"fixed step {s} must lie in 1..{z.shape[0]} (the steps run)")
    return np.full(z.shape[1], int(s), dtype=np.int64)


def max_confidence(step_logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B,) the step of the highest `confidence` (the earliest on ties)."""
    return confidence(step_logits, mask).argmax(0).astype(np.int64) + 1


def kl(step_logits: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """(B,) the first step t >= 2 whose `step_kl` is below threshold; N when none is."""
    if not threshold > 0:
        raise ValueError(f"kl threshold {threshold} must be > 0")
    d = step_kl(step_logits, mask)  # (N-1, B)
    N = d.shape[0] + 1
    below = d < threshold
    return np.where(below.any(0), below.argmax(0) + 2, N).astype(np.int64)


def cumulative_positions(cum_p: np.ndarray, threshold: float) -> np.ndarray:
    """(B, T) per position the first step t with cum_p_t >= threshold; N when none is."""
    c = _f64(cum_p, "cum_p (N, B, T)", 3)
    if not 0 < threshold <= 1:
        raise ValueError(f"cumulative threshold {threshold} must lie in (0, 1]")
    over = c >= threshold
    return np.where(over.any(0), over.argmax(0) + 1, c.shape[0]).astype(np.int64)


def cumulative(cum_p: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """(B,) the max over the row's answer positions of `cumulative_positions` (1 for a row without answers)."""
    pos = cumulative_positions(cum_p, threshold)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != pos.shape:
        raise ValueError(f"mask {mask.shape} must be cum_p's (B, T) = {pos.shape}")
    return np.where(mask, pos, 1).max(-1).astype(np.int64)


def parse_rule(text: str) -> tuple[str, float | None]:
    """'max_confidence' -> ('max_confidence', None); 'kl:1e-3' -> ('kl', 0.001); 'fixed:10'; 'cumulative:0.9'."""
    name, sep, arg = str(text).strip().partition(":")
    if name not in RULES:
        raise ValueError(f"--stop rule {text!r}: unknown rule {name!r}; rules: max_confidence, kl:EPS, "
                         "cumulative:C, fixed:S")
    if name == "max_confidence":
        if sep:
            raise ValueError(f"--stop rule {text!r}: max_confidence takes no value")
        return name, None
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"--stop rule {text!r}: {name} needs a number, e.g. "
                         f"{ {'kl': 'kl:1e-3', 'cumulative': 'cumulative:0.9', 'fixed': 'fixed:10'}[name]}") from None
    if not np.isfinite(value) or value <= 0 or (name == "cumulative" and value > 1) or \
            (name == "fixed" and value != int(value)):
        allowed = {"kl": "a number > 0", "cumulative": "a number in (0, 1]", "fixed": "an integer >= 1"}[name]
        raise ValueError(f"--stop rule {text!r}: {name}'s value must be {allowed}")
    return name, value


def choose(rule: str, step_logits: np.ndarray, mask: np.ndarray, cum_p: np.ndarray | None = None) -> np.ndarray:
    """(B,) 1-based steps chosen by a rule written as on the command line (`parse_rule`)."""
    name, value = parse_rule(rule)
    if name == "fixed":
        return fixed(step_logits, mask, int(value))
    if name == "max_confidence":
        return max_confidence(step_logits, mask)
    if name == "kl":
        return kl(step_logits, mask, value)
    if cum_p is None:
        raise ValueError(f"--stop rule {rule!r} needs the model's halting trace cum_p (N, B, T)")
    return cumulative(cum_p, mask, value)
