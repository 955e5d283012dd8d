"""Training losses (ARCHITECTURE.md 4 and 5e): cross-entropy, ponder cost, halting entropy, consistency.

Every term is computed in the acc dtype (float64 for a float64 model, else float32). The total is
    loss = ce + w_ponder * ponder - w_entropy * entropy + w_consistency * consistency
with the weights of spec.loss; a term whose weight is 0 is reported in `parts` but not added. Under
halting.mode=ponder (PonderNet) ce is the expected cross-entropy sum_t P_t nll_t of the step-wise logits
plus halting.ponder_beta * KL(P || geometric prior); under mode=last it is the output's (h_N's) cross-entropy.

Data parallel (`group`, the batch ranks of a sharded model: sharding.batch_group): each rank holds its rows
of the batch, and every mean takes the global denominator (the count all-reduced over the group) times the
ranks, so that the average of the ranks' terms, and of their gradients (FSDP's and replicate's reduction),
is the unsharded term and gradient. Without a group each term is the plain mean, unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spec import Spec

from .layers import acc_dtype
from .model import ModelOutput


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                  group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over the positions where mask is set.

    logits (B, T, V), targets (B, T) int, mask (B, T) bool or 0/1 -> scalar (acc dtype). group: the batch
    ranks (this rank's share of the global mean, times the ranks; module docstring).
    """
    acc = acc_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(acc), dim=-1)  # (B, T, V)
    nll = -logp.gather(-1, targets.long()[..., None])[..., 0]  # (B, T)
    m = mask.to(acc)
    if group is not None:
        return _global_mean((nll * m).sum(), m.sum(), group)
    return (nll * m).sum() / m.sum().clamp(min=1)


def step_nll(step_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(step t's logits)[target] per step and position: step_logits (N, B, T, V) -> (N, B, T) acc dtype."""
    logp = torch.log_softmax(step_logits.to(acc_dtype(step_logits.dtype)), dim=-1)  # (N, B, T, V)
    idx = targets.long()[None, ..., None].expand(*step_logits.shape[:-1], 1)
    return -logp.gather(-1, idx)[..., 0]


def ponder_distribution(halt_p: torch.Tensor) -> torch.Tensor:
    """PonderNet's halting distribution over the N steps: halt_p (N, B, T) lambda_t -> P (N, B, T).

    P_t = lambda_t prod_{s<t} (1 - lambda_s) for t < N, P_N = prod_{s<N} (1 - lambda_s) (the remainder:
    sum_t P_t = 1 in exact arithmetic).
    """
    survive = torch.cumprod(1.0 - halt_p, dim=0)  # (N, B, T) prod_{s<=t} (1 - lambda_s)
    before = torch.cat([torch.ones_like(halt_p[:1]), survive[:-1]])  # prod_{s<t} (1 - lambda_s)
    return torch.cat([halt_p[:-1] * before[:-1], before[-1:]])


def geometric_prior(lam: float, N: int, dtype: torch.dtype) -> torch.Tensor:
    """log of the geometric prior truncated at N, (N,): lam (1 - lam)^(t-1) for t < N, (1 - lam)^(N-1) at N."""
    t = torch.arange(N, dtype=dtype)  # t - 1 for steps t = 1..N
    log_q = t * torch.log1p(-torch.tensor(lam, dtype=dtype))
    return torch.where(t < N - 1, torch.log(torch.tensor(lam, dtype=dtype)) + log_q, log_q)


def ponder_loss(step_logits: torch.Tensor, halt_p: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                lam: float, *, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PonderNet's terms (rec, KL), each averaged over the positions where mask is set (scalars, acc dtype).

    rec = sum_t P_t nll_t, KL = sum_t P_t (log P_t - log prior_t) with P = ponder_distribution(halt_p) and
    the geometric prior of lam; step_logits (N, B, T, V), halt_p (N, B, T), targets, mask (B, T). group: the
    batch ranks (module docstring).
    """
    P = ponder_distribution(halt_p)  # (N, B, T)
    rec = (P * step_nll(step_logits, targets)).sum(0)  # (B, T)
    log_prior = geometric_prior(lam, P.shape[0], P.dtype).to(P.device)[:, None, None]
    # P clipped at tiny before the log (a P_t that underflowed to 0 contributes 0 * finite)
    kl = (P * (torch.log(P.clamp(min=torch.finfo(P.dtype).tiny)) - log_prior)).sum(0)  # (B, T)
    m = mask.to(P.dtype)
    if group is not None:
        return _global_mean((rec * m).sum(), m.sum(), group), _global_mean((kl * m).sum(), m.sum(), group)
    n = m.sum().clamp(min=1)
    return (rec * m).sum() / n, (kl * m).sum() / n


def ponder_cost(cum_p: torch.Tensor, loop_counts: torch.Tensor, *,
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """mean_i(count_i + R_i), R_i = 1 - c before the halting step; gradient through R only.

    cum_p (N, B, T) c after each step, loop_counts (B, T) int -> scalar. c before step s is c after
    step s - 1 (0 before the first), read directly rather than as cum_p - halt_p (no rounding).
    Left padding (loop count 0) is left out of the mean. group: the batch ranks (module docstring).
    """
    c_before = torch.cat([torch.zeros_like(cum_p[:1]), cum_p[:-1]])  # (N, B, T)
    step = (loop_counts.long() - 1).clamp(min=0)  # (B, T) 0-based halting step
    R = 1.0 - c_before.gather(0, step[None])[0]  # (B, T)
    real = loop_counts > 0
    cost = torch.where(real, loop_counts.to(cum_p.dtype) + R, 0.0)  # (B, T)
    if group is not None:
        return _global_mean(cost.sum(), real.sum().to(cum_p.dtype), group)
    # the mean over real positions as mean * (n / n_real): exactly the plain mean without padding
    return cost.mean() * _real_share(real, cum_p.dtype)


def halting_entropy(halt_p: torch.Tensor, running: torch.Tensor, *,
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean of H(p) = -p log p - (1-p) log(1-p) over the running (step, position) entries.

    halt_p, running (N, B, T) -> scalar. The loss subtracts beta times it (a regulariser that keeps
    halting from collapsing early). group: the batch ranks (module docstring).
    """
    # p is clipped into [eps, 1 - eps]: a saturated sigmoid (p == 1.0) would give 0 * log 0
    eps = torch.finfo(halt_p.dtype).eps
    p = halt_p.clamp(eps, 1.0 - eps)
    H = -(p * torch.log(p) + (1.0 - p) * torch.log1p(-p))  # (N, B, T)
    r = running.to(halt_p.dtype)
    if group is not None:
        return _global_mean((H * r).sum(), r.sum(), group)
    return (H * r).sum() / r.sum().clamp(min=1)


def consistency(value_steps: torch.Tensor, values: torch.Tensor, running: torch.Tensor, *,
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean of (v(h_t) - sg(v(y)))^2 over the running (step, position) entries, i.e. steps t < count_i.

    value_steps (N, B, T) value head of each step's state, values (B, T) of the ACT output,
    running (N, B, T) -> scalar (acc dtype). group: the batch ranks (module docstring).
    """
    acc = acc_dtype(value_steps.dtype)
    d = value_steps.to(acc) - values.detach().to(acc)[None]  # (N, B, T)
    r = running.to(acc)
    if group is not None:
        return _global_mean((d * d * r).sum(), r.sum(), group)
    return (d * d * r).sum() / r.sum().clamp(min=1)


def _global_mean(total: torch.Tensor, count: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's total over the count of every rank in group, times the ranks: the ranks' average of it is
    the global mean (and of its gradient, the unsharded gradient). The count carries no gradient."""
    n = count.detach().clone()
    dist.all_reduce(n, group=group)  # sum over the batch ranks
    return total * dist.get_world_size(group) / n.clamp(min=1)


def _real_share(real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """n / n_real in dtype for a bool of real positions (B, T): 1.0 without padding (mean * it = the plain mean)."""
    return real.numel() / real.sum().clamp(min=1).to(dtype)


def _mean_loops(loop_counts: torch.Tensor, dtype: torch.dtype, group: dist.ProcessGroup | None = None
                ) -> torch.Tensor:
    """The mean loop count over real positions (left padding, loop count 0, left out), a scalar in dtype."""
    if group is not None:
        return _global_mean(loop_counts.to(dtype).sum(), (loop_counts > 0).sum().to(dtype), group)
    return loop_counts.to(dtype).mean() * _real_share(loop_counts > 0, dtype)


def total_loss(spec: Spec, out: ModelOutput, targets: torch.Tensor, mask: torch.Tensor, *,
               group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of spec.loss and its parts.

    Args:
        spec: the model's spec (spec.loss holds the weights).
        out: the model's ModelOutput (run with early_exit=False for training).
        targets: (B, T) int, the token each position should predict.
        mask: (B, T) bool, positions that count in the cross-entropy (answer tokens).
        group: a sharded model's batch ranks (sharding.batch_group; None: unsharded): every term is this
            rank's share of the global mean times the ranks, so that the ranks' average is the global value.
    Returns:
        (loss scalar, parts): parts holds "ce", "ponder", "halting_entropy" and, with a value head,
        "consistency" (each detached), plus "loops" the mean loop count; under halting.mode=ponder "ce" is
        PonderNet's expected cross-entropy and "ponder_kl" the KL to the prior (out needs step_logits).
    """
    w, tr = spec.loss, out.traces
    kl = None
    if spec.halting.mode == "ponder":
        if out.step_logits is None:
            raise ValueError("halting.mode='ponder' trains on every step's logits: run the forward with "
                             "step_logits=True (and early_exit=False)")
        ce, kl = ponder_loss(out.step_logits, tr.halt_p, targets, mask, spec.halting.ponder_lambda, group=group)
    else:
        ce = cross_entropy(out.logits, targets, mask, group=group)
    ponder = ponder_cost(tr.cum_p, out.loop_counts, group=group)
    entropy = halting_entropy(tr.halt_p, tr.running, group=group)
    loss = ce if kl is None else ce + spec.halting.ponder_beta * kl
    if w.ponder > 0:
        loss = loss + w.ponder * ponder
    if w.halting_entropy > 0:
        loss = loss - w.halting_entropy * entropy
    parts = {"ce": ce.detach(), "ponder": ponder.detach(), "halting_entropy": entropy.detach(),
             "loops": _mean_loops(out.loop_counts, ce.dtype, group)}
    if kl is not None:
        parts["ponder_kl"] = kl.detach()
    if spec.value_head.enabled:
        cons = consistency(tr.value, out.values, tr.running, group=group)
        if w.consistency > 0:
            loss = loss + w.consistency * cons
        parts["consistency"] = cons.detach()
    return loss, parts
