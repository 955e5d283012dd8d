"""The routed experts' dispatch kernels (ARCHITECTURE.md section 2): E SwiGLU experts with stacked weights,
and the paths that run each token through its chosen experts (the one file the twins write differently)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        to the largest instead (`_padded`, the float64 path of parity runs). At most SMALL_ROWS rows
        (decoding at batch 1) skip the sorting and grouping, which cost more ops than the products:
        row by row on the CPU (`_row_by_row`), else (GPUs, torch.compile) through gathered weights
        (`_gathered`, no host read of the expert ids). Under torch.compile up to COMPILED_ROWS rows
        keep static shapes: `_gathered`, or `_dense` once there are at least as many rows as experts. Under
        torch.export (ONNX) always `_gathered`: sparse, and one graph for every batch and length.
        """
        N, k = expert.shape
        E, _, hidden = self.gate.shape
        if torch.compiler.is_exporting():
            # torch.export (ONNX): sparse (only the chosen experts' products), no data-dependent shapes, no
            # branch on the (symbolic) number of rows, so dynamic batch and length keep the same graph
            return _gathered(x, expert, self.gate, self.up, self.down)
        compiling = torch.compiler.is_compiling()
        if N * k <= SMALL_ROWS and x.device.type == "cpu" and not compiling:
            return _row_by_row(x, expert, self.gate, self.up, self.down)
        if N * k <= SMALL_ROWS or (compiling and N * k <= COMPILED_ROWS):
            if N * k >= E:  # every expert's weights read once instead of copies of more than E
                return _dense(x, expert, self.gate, self.up, self.down)
            return _gathered(x, expert, self.gate, self.up, self.down)
        flat = expert.reshape(-1).long()  # (M,), row m = (token m // k, slot m % k)
        if not _grouped_mm_takes(x, hidden) or compiling:  # grouped_mm's CPU meta kernel: bfloat16 only
            return _padded(x.repeat_interleave(k, dim=0), flat, self.gate, self.up, self.down).view(N, k, -1)
        order = torch.argsort(flat, stable=True)  # (M,) rows sorted by expert
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)  # (E,) end of each group
        xs = x.index_select(0, order // k)  # (M, D) sorted rows (index_select: ~2x faster than x[...])
        hs = F.silu(F.grouped_mm(xs, self.gate, offs=offs)) * F.grouped_mm(xs, self.up, offs=offs)  # (M, hidden)
        ys = F.grouped_mm(hs, self.down, offs=offs)  # (M, D)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # sorted position of row m
        return ys.index_select(0, inverse).view(N, k, -1)  # back to (token, slot) order


# (token, slot) rows up to which Experts runs row by row on the CPU. A decoding token at batch 1 (k = 2,
# E = 8, D = 256): 54 us row by row, 112 us through the grouped path; at 16 rows 640 vs 340 us
SMALL_ROWS = 4
# rows up to which a torch.compile'd Experts keeps static shapes (the grouped and padded paths have
# data-dependent group sizes: graph breaks and a recompile per size)
COMPILED_ROWS = 64


def _row_by_row(x: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Token n of x (N, D) through each of its experts expert[n] (N, k) -> (N, k, D): (1, D) products
    with the chosen experts' weights in place (views), no sort, no grouping, no copy of weights.

    The expert ids are read on the host (on the CPU, where this path runs, that waits for nothing).
    """
    ys = []
    for n, row in enumerate(expert.tolist()):
        xn = x[n:n + 1]  # (1, D)
        for e in row:
            ys.append(torch.mm(F.silu(torch.mm(xn, gate[e])) * torch.mm(xn, up[e]), down[e]))  # (1, D)
    return torch.cat(ys).view(*expert.shape, -1)


def _gathered(x: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
              down: torch.Tensor) -> torch.Tensor:
    """Token n of x (N, D) through each of its experts expert[n] (N, k) -> (N, k, D): each row's expert
    weights gathered (a copy per row), batched (1, D) products; no host read, so torch.compile traces it whole."""
    N, k = expert.shape
    flat = expert.reshape(-1).long()  # (M,), row m = (token m // k, slot m % k)
    xs = x.repeat_interleave(k, dim=0)[:, None]  # (M, 1, D)
    hs = F.silu(torch.bmm(xs, gate[flat])) * torch.bmm(xs, up[flat])  # (M, 1, hidden)
    return torch.bmm(hs, down[flat]).view(N, k, -1)


def _dense(x: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
           down: torch.Tensor) -> torch.Tensor:
    """Token n of x (N, D) through each of its experts expert[n] (N, k) -> (N, k, D): every expert on
    every token, the chosen ones kept (E / k times the products; static shapes, for torch.compile)."""
    N = x.shape[0]
    hs = F.silu(torch.matmul(x, gate)) * torch.matmul(x, up)  # (E, N, hidden)
    ys = torch.bmm(hs, down)  # (E, N, D)
    return ys[expert.long(), torch.arange(N, device=x.device)[:, None]]  # (N, k, D)


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


def dense_reference(x: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """Token n of x (N, D) through each of its experts expert[n] (N, k) -> (N, k, D) by the plain formula
    (the chosen weights gathered, einsums): the reference the dispatch paths are tested against."""
    e = expert.long()
    h = F.silu(torch.einsum("nd,nkdf->nkf", x, gate[e])) * torch.einsum("nd,nkdf->nkf", x, up[e])  # (N, k, hidden)
    return torch.einsum("nkf,nkfd->nkd", h, down[e])
