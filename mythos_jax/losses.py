"""Training losses (ARCHITECTURE.md 4 and 5e): cross-entropy, ponder cost, halting entropy, consistency.

Every term is computed in the acc dtype (float64 for a float64 model, else float32). The total is
    loss = ce + w_ponder * ponder - w_entropy * entropy + w_consistency * consistency
with the weights of spec.loss; a term whose weight is 0 is reported in `parts` but not added. Under
halting.mode=ponder (PonderNet) ce is the expected cross-entropy sum_t P_t nll_t of the step-wise logits
plus halting.ponder_beta * KL(P || geometric prior); under mode=last it is the output's (h_N's) cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spec import Spec

from .layers import acc_dtype
from .model import ModelOutput


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of -log softmax(logits)[target] over the positions where mask is set.

    logits (B, T, V), targets (B, T) int, mask (B, T) bool or 0/1 -> scalar (acc dtype).
    """
    acc = acc_dtype(logits.dtype)
    nll = _nll(logits.astype(acc), targets.astype(jnp.int32))  # (B, T)
    m = jnp.asarray(mask).astype(acc)
    return (nll * m).sum() / jnp.maximum(m.sum(), 1)


def step_nll(step_logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(step t's logits)[target] per step and position: step_logits (N, B, T, V) -> (N, B, T) acc dtype."""
    idx = jnp.broadcast_to(targets.astype(jnp.int32)[None], step_logits.shape[:-1])
    return _nll(step_logits.astype(acc_dtype(step_logits.dtype)), idx)


@jax.custom_vjp
def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] along the last axis: logits (..., V), targets (...) int32 -> (...).

    The value is log_softmax's, bit for bit (log sum exp(x - max) - (x_t - max)); the gradient is written
    out as softmax - onehot (a custom VJP; torch's log_softmax backward is one kernel). Autodiff through
    log_softmax and take_along_axis wrote the (..., V) gradient several times, transposed once for the
    head's weight gradient: about 60 ms of a 590 ms bench-s-gqa forward+backward.
    """
    return _nll_fwd(logits, targets)[0]


def _nll_fwd(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))  # (...) log sum exp(x - max)
    picked = jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]  # x_t - max
    return lse - picked, (shifted, lse, targets)


def _nll_bwd(res: tuple[jax.Array, ...], g: jax.Array) -> tuple[jax.Array, None]:
    shifted, lse, targets = res
    onehot = jnp.arange(shifted.shape[-1], dtype=jnp.int32) == targets[..., None]
    return g[..., None] * (jnp.exp(shifted - lse[..., None]) - onehot), None


_nll.defvjp(_nll_fwd, _nll_bwd)


def ponder_distribution(halt_p: jax.Array) -> jax.Array:
    """PonderNet's halting distribution over the N steps: halt_p (N, B, T) lambda_t -> P (N, B, T).

    P_t = lambda_t prod_{s<t} (1 - lambda_s) for t < N, P_N = prod_{s<N} (1 - lambda_s) (the remainder:
    sum_t P_t = 1 in exact arithmetic).
    """
    survive = jnp.cumprod(1.0 - halt_p, axis=0)  # (N, B, T) prod_{s<=t} (1 - lambda_s)
    before = jnp.concatenate([jnp.ones_like(halt_p[:1]), survive[:-1]])  # prod_{s<t} (1 - lambda_s)
    return jnp.concatenate([halt_p[:-1] * before[:-1], before[-1:]])


def geometric_prior(lam: float, N: int, dtype: jnp.dtype) -> jax.Array:
    """log of the geometric prior truncated at N, (N,): lam (1 - lam)^(t-1) for t < N, (1 - lam)^(N-1) at N."""
    t = jnp.arange(N, dtype=dtype)  # t - 1 for steps t = 1..N
    log_q = t * jnp.log1p(-jnp.asarray(lam, dtype))
    return jnp.where(t < N - 1, jnp.log(jnp.asarray(lam, dtype)) + log_q, log_q)


def ponder_loss(step_logits: jax.Array, halt_p: jax.Array, targets: jax.Array, mask: jax.Array, lam: float
                ) -> tuple[jax.Array, jax.Array]:
    """PonderNet's terms (rec, KL), each averaged over the positions where mask is set (scalars, acc dtype).

    rec = sum_t P_t nll_t, KL = sum_t P_t (log P_t - log prior_t) with P = ponder_distribution(halt_p) and
    the geometric prior of lam; step_logits (N, B, T, V), halt_p (N, B, T), targets, mask (B, T).
    """
    P = ponder_distribution(halt_p)  # (N, B, T)
    rec = (P * step_nll(step_logits, targets)).sum(0)  # (B, T)
    log_prior = geometric_prior(lam, P.shape[0], P.dtype)[:, None, None]
    # P clipped at tiny before the log (a P_t that underflowed to 0 contributes 0 * finite)
    kl = (P * (jnp.log(jnp.maximum(P, jnp.finfo(P.dtype).tiny)) - log_prior)).sum(0)  # (B, T)
    m = jnp.asarray(mask).astype(P.dtype)
    n = jnp.maximum(m.sum(), 1)
    return (rec * m).sum() / n, (kl * m).sum() / n


def ponder_cost(cum_p: jax.Array, loop_counts: jax.Array) -> jax.Array:
    """mean_i(count_i + R_i), R_i = 1 - c before the halting step; gradient through R only.

    cum_p (N, B, T) c after each step, loop_counts (B, T) int -> scalar. c before step s is c after
    step s - 1 (0 before the first), read directly rather than as cum_p - halt_p (no rounding).
    Left padding (loop count 0) is left out of the mean.
    """
    c_before = jnp.concatenate([jnp.zeros_like(cum_p[:1]), cum_p[:-1]])  # (N, B, T)
    step = jnp.maximum(loop_counts.astype(jnp.int32) - 1, 0)  # (B, T) 0-based halting step
    R = 1.0 - jnp.take_along_axis(c_before, step[None], axis=0)[0]  # (B, T)
    real = loop_counts > 0
    # the mean over real positions as mean * (n / n_real): exactly the plain mean without padding
    return jnp.where(real, loop_counts.astype(cum_p.dtype) + R, 0.0).mean() * _real_share(real, cum_p.dtype)


def halting_entropy(halt_p: jax.Array, running: jax.Array) -> jax.Array:
    """Mean of H(p) = -p log p - (1-p) log(1-p) over the running (step, position) entries.

    halt_p, running (N, B, T) -> scalar. The loss subtracts beta times it (a regulariser that keeps
    halting from collapsing early).
    """
    # p is clipped into [eps, 1 - eps]: a saturated sigmoid (p == 1.0) would give 0 * log 0
    eps = jnp.finfo(halt_p.dtype).eps
    p = jnp.clip(halt_p, eps, 1.0 - eps)
    H = -(p * jnp.log(p) + (1.0 - p) * jnp.log1p(-p))  # (N, B, T)
    r = running.astype(halt_p.dtype)
    return (H * r).sum() / jnp.maximum(r.sum(), 1)


def consistency(value_steps: jax.Array, values: jax.Array, running: jax.Array) -> jax.Array:
    """Mean of (v(h_t) - sg(v(y)))^2 over the running (step, position) entries, i.e. steps t < count_i.

    value_steps (N, B, T) value head of each step's state, values (B, T) of the ACT output,
    running (N, B, T) -> scalar (acc dtype).
    """
    acc = acc_dtype(value_steps.dtype)
    d = value_steps.astype(acc) - jax.lax.stop_gradient(values).astype(acc)[None]  # (N, B, T)
    r = running.astype(acc)
    return (d * d * r).sum() / jnp.maximum(r.sum(), 1)


def _real_share(real: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """n / n_real in dtype for a bool of real positions (B, T): 1.0 without padding (mean * it = the plain mean)."""
    return real.size / jnp.maximum(real.sum(), 1).astype(dtype)


def _mean_loops(loop_counts: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The mean loop count over real positions (left padding, loop count 0, left out), a scalar in dtype."""
    return loop_counts.astype(dtype).mean() * _real_share(loop_counts > 0, dtype)


def total_loss(spec: Spec, out: ModelOutput, targets: jax.Array, mask: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of spec.loss and its parts.

    Args:
        spec: the model's spec (spec.loss holds the weights).
        out: the model's ModelOutput (run with early_exit=False for training).
        targets: (B, T) int, the token each position should predict.
        mask: (B, T) bool, positions that count in the cross-entropy (answer tokens).
    Returns:
        (loss scalar, parts): parts holds "ce", "ponder", "halting_entropy" and, with a value head,
        "consistency" (each without gradient), plus "loops" the mean loop count; under halting.mode=ponder
        "ce" is PonderNet's expected cross-entropy and "ponder_kl" the KL to the prior (out needs step_logits).
    """
    w, tr = spec.loss, out.traces
    sg = jax.lax.stop_gradient
    kl = None
    if spec.halting.mode == "ponder":
        if out.step_logits is None:
            raise ValueError("halting.mode='ponder' trains on every step's logits: run the forward with "
                             "step_logits=True (and early_exit=False)")
        ce, kl = ponder_loss(out.step_logits, tr.halt_p, targets, mask, spec.halting.ponder_lambda)
    else:
        ce = cross_entropy(out.logits, targets, mask)
    ponder = ponder_cost(tr.cum_p, out.loop_counts)
    entropy = halting_entropy(tr.halt_p, tr.running)
    loss = ce if kl is None else ce + spec.halting.ponder_beta * kl
    if w.ponder > 0:
        loss = loss + w.ponder * ponder
    if w.halting_entropy > 0:
        loss = loss - w.halting_entropy * entropy
    parts = {"ce": sg(ce), "ponder": sg(ponder), "halting_entropy": sg(entropy),
             "loops": _mean_loops(out.loop_counts, ce.dtype)}
    if kl is not None:
        parts["ponder_kl"] = sg(kl)
    if spec.value_head.enabled:
        cons = consistency(tr.value, out.values, tr.running)
        if w.consistency > 0:
            loss = loss + w.consistency * cons
        parts["consistency"] = sg(cons)
    return loss, parts
