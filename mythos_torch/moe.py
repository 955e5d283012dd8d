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
        """Token n of x (N, D) through each of its experts expert[n] (N, k) -> (N, k, D), slot by slot.

        The N*k (token, slot) rows are sorted by expert (stable) and grouped: one grouped matmul per
        weight over the sorted rows (F.grouped_mm), so no row is padded and no Python loop runs over
        experts. What grouped_mm refuses (float64; rows not a multiple of 16 bytes) pads every group
        to the largest instead (`_padded`, the float64 path of parity runs).
        """
        N, k = expert.shape
        E, _, hidden = self.gate.shape
        flat = expert.reshape(-1).long()  # (M,), row m = (token m // k, slot m % k)
        if not _grouped_mm_takes(x, hidden):
            return _padded(x.repeat_interleave(k, dim=0), flat, self.gate, self.up, self.down).view(N, k, -1)
        order = torch.argsort(flat, stable=True)  # (M,) rows sorted by expert
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)  # (E,) end of each group
        xs = x.index_select(0, order // k)  # (M, D) sorted rows (index_select: ~2x faster than x[...])
        hs = F.silu(F.grouped_mm(xs, self.gate, offs=offs)) * F.grouped_mm(xs, self.up, offs=offs)  # (M, hidden)
        ys = F.grouped_mm(hs, self.down, offs=offs)  # (M, D)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # sorted position of row m
        return ys.index_select(0, inverse).view(N, k, -1)  # back to (token, slot) order


def _grouped_mm_takes(x: torch.Tensor, hidden: int) -> bool:
    """Whether F.grouped_mm takes rows like x (M, D) with this hidden width: float32 or bfloat16 on the CPU,
    bfloat16 on CUDA sm80+ (torch 2.13), and rows of 16-byte multiples."""
    if x.device.type == "cpu":
        dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    elif x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (8, 0):
        dtypes = (torch.bfloat16,)
    else:
        return False
    size = x.element_size()
    return x.dtype in dtypes and x.shape[-1] * size % 16 == 0 and hidden * size % 16 == 0


def _padded(x: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """Row m of x (M, D) through expert[m] (M,): each group zero-padded to the largest, batched matmuls."""
    M, D = x.shape
    E = gate.shape[0]
    order = torch.argsort(expert, stable=True)  # rows sorted by expert
    counts = torch.bincount(expert, minlength=E)  # (E,)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(M, device=x.device) - starts[expert[order]]  # (M,) place in its group
    G = int(counts.max()) if M > 0 else 0
    xg = x.new_zeros(E, G, D)  # (E, G, D): each expert's rows, zero-padded to the largest group
    xg[expert, rank] = x
    hg = F.silu(torch.bmm(xg, gate)) * torch.bmm(xg, up)  # (E, G, hidden)
    yg = torch.bmm(hg, down)  # (E, G, D)
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
        y = self.experts(flat, idx.reshape(B * T, k))  # (B*T, k, D)
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
