"""DeepSeek-style MoE FFN with aux-loss-free balancing (ARCHITECTURE.md section 2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from spec import MoESpec

from .layers import SwiGLU, acc_dtype

if TYPE_CHECKING:
    from .model import Mythos


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of logits + bias (ties to the lower index) -> idx (..., k) int32, weights (..., k), margin (...).

    Weights are the softmax scores of the chosen experts renormalised to sum to one; the margin is
    the k-th minus the (k+1)-th biased logit (+inf when k = E).
    """
    scores = torch.softmax(logits, dim=-1)
    biased = logits + bias
    # a stable descending sort puts the lower index first on ties (torch.topk guarantees no order)
    order = torch.sort(biased, dim=-1, descending=True, stable=True).indices  # (..., E)
    idx = order[..., :top_k]
    w = scores.gather(-1, idx)
    w = w / w.sum(-1, keepdim=True)
    if top_k < logits.shape[-1]:
        kth = biased.gather(-1, order[..., top_k - 1 : top_k + 1])
        margin = kth[..., 0] - kth[..., 1]
    else:
        margin = torch.full(logits.shape[:-1], float("inf"), dtype=logits.dtype, device=logits.device)
    return idx.to(torch.int32), w, margin


class Experts(nn.Module):
    """E routed SwiGLU experts, weights stacked [E, in, out] (`gate`, `up`, `down`)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, *, dtype: torch.dtype):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(n_experts, dim, hidden, dtype=dtype))
        self.up = nn.Parameter(torch.empty(n_experts, dim, hidden, dtype=dtype))
        self.down = nn.Parameter(torch.empty(n_experts, hidden, dim, dtype=dtype))

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Row m of x (M, D) through expert[m] (M,): grouped by expert, padded, batched matmuls."""
        M, D = x.shape
        E = self.gate.shape[0]
        expert = expert.long()
        order = torch.argsort(expert, stable=True)  # rows sorted by expert
        counts = torch.bincount(expert, minlength=E)  # (E,)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(M, device=x.device) - starts[expert[order]]  # (M,) place in its group
        G = int(counts.max()) if M > 0 else 0
        xg = x.new_zeros(E, G, D)  # (E, G, D): each expert's rows, zero-padded to the largest group
        xg[expert, rank] = x
        hg = F.silu(torch.bmm(xg, self.gate)) * torch.bmm(xg, self.up)  # (E, G, hidden)
        yg = torch.bmm(hg, self.down)  # (E, G, D)
        return yg[expert, rank]  # (M, D)


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

    def forward(self, x: torch.Tensor, force_idx: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> out (B, T, D), expert idx (B, T, k) int32, router margin (B, T).

        force_idx (B, T, k) replaces the top-k choice (replay); weights then come from the same scores.
        A position whose force_idx holds -1 (the trace fill of a step not run) keeps the top-k choice.
        """
        B, T, D = x.shape
        k = self.top_k
        acc = acc_dtype(x.dtype)
        z = F.linear(x.to(acc), self.router.weight.to(acc))  # (B, T, E) router logits in acc dtype
        idx, w, margin = route(z, self.router_bias, k)
        if force_idx is not None:
            free = (force_idx < 0).any(-1, keepdim=True)  # (B, T, 1): -1 means "not forced", as in the jax twin
            idx = torch.where(free, idx, force_idx.to(torch.int32))
            s = torch.softmax(z, dim=-1).gather(-1, idx.long())
            w = s / s.sum(-1, keepdim=True)
        flat = x.reshape(B * T, D)
        y = self.experts(flat.repeat_interleave(k, dim=0), idx.reshape(-1)).view(B * T, k, D)
        w = w.reshape(B * T, k).to(x.dtype)
        out = torch.zeros_like(flat)
        for j in range(k):  # slot by slot, the summation order of open-mythos
            out = out + w[:, j, None] * y[:, j]
        for shared in self.shared_experts:
            out = out + shared(flat)
        return out.view(B, T, D), idx, margin


def expert_load(expert_idx: torch.Tensor, running: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (E,) int32, counting (step, position, slot) entries of running positions.

    expert_idx (N, B, T, k) and running (N, B, T) as in `Traces`.
    """
    chosen = expert_idx[running.bool()]  # (entries, k)
    return torch.bincount(chosen.reshape(-1).long(), minlength=n_experts).to(torch.int32)


@torch.no_grad()
def update_router_bias(model: Mythos, load: torch.Tensor) -> None:
    """Aux-loss-free balancing, after an optimizer step: b += gamma * sign(mean(load) - load)."""
    moe = model.recurrent.block.ffn
    if not isinstance(moe, MoE):
        raise ValueError("update_router_bias: the recurrent FFN is dense (recurrent.ffn=dense); it has no router")
    load = torch.as_tensor(load, device=moe.router_bias.device).to(torch.float64)
    if load.shape != moe.router_bias.shape:
        raise ValueError(f"update_router_bias: load has shape {tuple(load.shape)}, expected ({moe.n_experts},)")
    step = model.spec.moe.bias_update_rate * torch.sign(load.mean() - load)
    moe.router_bias += step.to(moe.router_bias.dtype)
