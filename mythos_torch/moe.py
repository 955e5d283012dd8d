"""DeepSeek-style MoE FFN with aux-loss-free balancing (ARCHITECTURE.md section 2)."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from spec import MoESpec

from .experts import Experts
from .layers import SwiGLU, acc_dtype


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of logits + bias (ties to the lower index) -> idx (..., k) int32, weights (..., k), margin (...).

    Weights are the softmax scores of the chosen experts renormalised to sum to one; the margin is
    the k-th minus the (k+1)-th biased logit (+inf when k = E).
    """
    scores = torch.softmax(logits, dim=-1)
    # a stable descending sort puts the lower index first on ties (torch.topk guarantees no order)
    ranked, order = torch.sort(logits + bias, dim=-1, descending=True, stable=True)  # (..., E) each
    idx = order[..., :top_k]
    w = scores.gather(-1, idx)
    w = w / w.sum(-1, keepdim=True)
    if top_k < logits.shape[-1]:
        margin = ranked[..., top_k - 1] - ranked[..., top_k]  # the sorted biased logits themselves
    else:
        margin = torch.full(logits.shape[:-1], float("inf"), dtype=logits.dtype, device=logits.device)
    return idx.to(torch.int32), w, margin


class Route(NamedTuple):
    """What the router chose for each position (MoE's second output)."""
    idx: torch.Tensor  # (B, T, k) int32 routed experts, slot order = descending biased logit
    margin: torch.Tensor  # (B, T) acc dtype, k-th minus (k+1)-th biased logit (+inf when k = E)


class MoE(nn.Module):
    """Routed experts (top-k of biased router logits) plus always-on shared experts."""

    def __init__(self, dim: int, m: MoESpec, *, dtype: torch.dtype):
        super().__init__()
        self.top_k = m.top_k
        self.n_experts = m.n_experts
        self.router = nn.Linear(dim, m.n_experts, bias=False, dtype=dtype)
        # not a gradient parameter: moved by update_router_bias; float32 in a bfloat16 model
        self.register_buffer("router_bias", torch.zeros(m.n_experts, dtype=acc_dtype(dtype)))
        self.experts = Experts(m.n_experts, dim, m.expert_dim, dtype=dtype)
        self.shared_experts = nn.ModuleList(
            [SwiGLU(dim, m.expert_dim * m.top_k, dtype=dtype) for _ in range(m.n_shared_experts)])
        # expert parallelism (sharding.shard with strategy ep): dispatch(experts, x (N, D), idx (N, k)) -> (N, k, D)
        # sends each row to its experts' rank and back (expert_parallel.py); None: every expert is local
        self.dispatch: Callable[[Experts, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, force_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, Route]:
        """x (B, T, D) -> out (B, T, D), Route(expert idx (B, T, k) int32, router margin (B, T)).

        force_idx (B, T, k) replaces the top-k choice (replay); weights then come from the same scores.
        A position whose force_idx holds -1 (the trace fill of a step not run) keeps the top-k choice.
        """
        B, T, D = x.shape
        k = self.top_k
        acc = acc_dtype(x.dtype)
        W = self.router.weight
        # router logits in acc dtype (B, T, E); the casts only where they change something (decoding is op-bound)
        z = F.linear(x if x.dtype == acc else x.to(acc), W if W.dtype == acc else W.to(acc))
        idx, w, margin = route(z, self.router_bias, k)
        if force_idx is not None:
            free = (force_idx < 0).any(-1, keepdim=True)  # (B, T, 1): -1 means "not forced", as in the jax twin
            idx = torch.where(free, idx, force_idx.to(torch.int32))
            s = torch.softmax(z, dim=-1).gather(-1, idx.long())
            w = s / s.sum(-1, keepdim=True)
        flat = x.reshape(B * T, D)
        experts = self.experts if self.dispatch is None else functools.partial(self.dispatch, self.experts)
        y = experts(flat, idx.reshape(B * T, k))  # (B*T, k, D)
        wy = w.reshape(B * T, k, 1).to(x.dtype) * y  # (B*T, k, D): slot j's w_j * expert_j(x)
        out = wy[:, 0]
        for j in range(1, k):  # slot by slot, the summation order of open-mythos (0 + w_0 y_0 == w_0 y_0)
            out = out + wy[:, j]
        for shared in self.shared_experts:
            out = out + shared(flat)[0]
        return out.view(B, T, D), Route(idx, margin)


def expert_load(expert_idx: torch.Tensor, running: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (E,) int32, counting (step, position, slot) entries of running positions.

    expert_idx (N, B, T, k) and running (N, B, T) as in `Traces`.
    """
    chosen = expert_idx[running.bool()]  # (entries, k)
    return torch.bincount(chosen.reshape(-1).long(), minlength=n_experts).to(torch.int32)


@torch.no_grad()
def update_router_bias(moe: MoE, load: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing after an optimizer step: b += rate * sign(mean(load) - load), rate = gamma."""
    if not isinstance(moe, MoE):
        raise ValueError(f"update_router_bias needs the MoE FFN (model.recurrent.block.ffn), got {type(moe).__name__}: "
                         "a dense FFN (recurrent.ffn=dense) has no router")
    load = torch.as_tensor(load, device=moe.router_bias.device).to(torch.float64)
    if load.shape != moe.router_bias.shape:
        raise ValueError(f"update_router_bias: load has shape {tuple(load.shape)}, expected ({moe.n_experts},)")
    step = rate * torch.sign(load.mean() - load)
    moe.router_bias += step.to(moe.router_bias.dtype)
