"""The hypothesised components (ARCHITECTURE.md section 5; docs/components.md): cross-loop attention over
each position's own loop states, the context compressor (chunk summaries between loop steps, and their
decoding cache), and the memory gate on the recurrent update."""

from __future__ import annotations

import torch
import torch.nn as nn

from .cache import KVCache
from .layers import RMSNorm, acc_dtype


class CrossLoopAttention(nn.Module):
    """Attention(Q, K_prev, V_prev): h~ attends over its own position's depth memory [e, h_1, ..., h_t]."""

    def __init__(self, dim: int, n_heads: int, eps: float, *, dtype: torch.dtype):
        super().__init__()
        self.n_heads = n_heads
        self.q_norm = RMSNorm(dim, eps, dtype=dtype)
        self.kv_norm = RMSNorm(dim, eps, dtype=dtype)
        self.wq = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.wk = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.wv = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.wo = nn.Linear(dim, dim, bias=False, dtype=dtype)

    def entry(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A memory entry's key and value, (B, T, H, K) each, from RMSNorm(h): computed once per state."""
        x = self.kv_norm(h)
        return self.wk(x).unflatten(-1, (self.n_heads, -1)), self.wv(x).unflatten(-1, (self.n_heads, -1))

    def forward(self, x: torch.Tensor, k_mem: torch.Tensor, v_mem: torch.Tensor,
                n_valid: int | None = None) -> torch.Tensor:
        """x (B, T, D) = h~, memory keys/values (M, B, T, H, K); entries m >= n_valid are masked."""
        q = self.wq(self.q_norm(x)).unflatten(-1, (self.n_heads, -1))  # (B, T, H, K)
        scores = torch.einsum("bthk,mbthk->bthm", q, k_mem) * q.shape[-1] ** -0.5
        scores = scores.to(acc_dtype(scores.dtype))  # softmax in float32 for bfloat16 (both twins)
        if n_valid is not None:
            scores = scores.masked_fill(torch.arange(k_mem.shape[0], device=x.device) >= n_valid, float("-inf"))
        p = torch.softmax(scores, dim=-1).to(v_mem.dtype)
        return self.wo(torch.einsum("bthm,mbthk->bthk", p, v_mem).flatten(-2))


class ContextCompressor(nn.Module):
    """Chunk summaries: m learned queries attend over RMSNorm(h_t) of each complete chunk of c positions
    (write); at the next step h~ attends over the summaries of chunks ending before its own chunk began,
    plus a learned null slot (read)."""

    def __init__(self, dim: int, chunk: int, n_summaries: int, n_heads: int, eps: float, *, dtype: torch.dtype):
        super().__init__()
        self.chunk = chunk
        self.n_heads = n_heads
        self.queries = nn.Parameter(torch.empty(n_summaries, dim, dtype=dtype))  # write queries, (m, D)
        self.null_k = nn.Parameter(torch.empty(dim, dtype=dtype))  # the null slot's key and value (D,)
        self.null_v = nn.Parameter(torch.empty(dim, dtype=dtype))
        self.write_norm = RMSNorm(dim, eps, dtype=dtype)
        self.write_k = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.write_v = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.read_norm = RMSNorm(dim, eps, dtype=dtype)
        self.read_q = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.read_k = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.read_v = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.read_o = nn.Linear(dim, dim, bias=False, dtype=dtype)

    def write(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, J, c, D): the states of J complete chunks -> their summaries (B, J, m, D)."""
        H = self.n_heads
        x = self.write_norm(rows)
        k = self.write_k(x).unflatten(-1, (H, -1))  # (B, J, c, H, K)
        v = self.write_v(x).unflatten(-1, (H, -1))
        q = self.queries.unflatten(-1, (H, -1))  # (m, H, K)
        scores = torch.einsum("mhk,bjchk->bjhmc", q, k) * q.shape[-1] ** -0.5
        p = torch.softmax(scores.to(acc_dtype(scores.dtype)), dim=-1).to(v.dtype)
        return torch.einsum("bjhmc,bjchk->bjmhk", p, v).flatten(-2)  # (B, J, m, D)

    def read(self, x: torch.Tensor, summaries: torch.Tensor | None, n_visible: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) = h~; summaries (B, J, m, D) or None; query i sees chunks j < n_visible[i] (T,)."""
        B, T, D = x.shape
        H = self.n_heads
        q = self.read_q(self.read_norm(x)).unflatten(-1, (H, -1))  # (B, T, H, K)
        scale = q.shape[-1] ** -0.5
        null_k, null_v = self.null_k.view(H, -1), self.null_v.view(H, -1)
        scores = torch.einsum("bthk,hk->bth", q, null_k)[..., None] * scale  # (B, T, H, 1)
        if summaries is not None:
            J, m = summaries.shape[1], summaries.shape[2]
            k = self.read_k(summaries).unflatten(-1, (H, -1)).flatten(1, 2)  # (B, J*m, H, K)
            v = self.read_v(summaries).unflatten(-1, (H, -1)).flatten(1, 2)
            s = torch.einsum("bthk,bnhk->bthn", q, k) * scale  # (B, T, H, J*m)
            chunk = torch.arange(J, device=x.device).repeat_interleave(m)  # (J*m,) chunk of each summary
            s = s.masked_fill(~(chunk[None, :] < n_visible[:, None])[None, :, None, :], float("-inf"))
            scores = torch.cat([scores, s], dim=-1)
        p = torch.softmax(scores.to(acc_dtype(scores.dtype)), dim=-1).to(x.dtype)  # (B, T, H, 1 + J*m)
        out = p[..., :1] * null_v  # (B, T, H, K)
        if summaries is not None:
            out = out + torch.einsum("bthn,bnhk->bthk", p[..., 1:], v)
        return self.read_o(out.flatten(-2))

    def write_cached(self, h: torch.Tensor, t: int, cache: KVCache, start_pos: int) -> None:
        """Step t's write at decode time: h (B, T, D) are positions start_pos.. . Chunks completed by
        them get summaries in cache `summaries` (N, B, C, m, D); the rows of the chunk still open go to
        `chunk_states` (N, B, c, D), slot = position mod c, until it completes."""
        c = self.chunk
        first = start_pos // c  # the chunk holding start_pos; its earlier rows are in chunk_states
        win = torch.cat([cache.chunk_states(t)[:, :start_pos - first * c], h], dim=1)
        J = win.shape[1] // c  # chunks completed by this call
        if J:
            cache.write_summaries(t, first, self.write(win[:, :J * c].unflatten(1, (J, c))), J)
        cache.write_chunk_states(t, win[:, J * c:])  # the open chunk's rows


def _open_unit(x: torch.Tensor) -> torch.Tensor:
    """x clamped strictly inside (0, 1), as LTIInjection.decay: a no-op unless x rounds to 0 or 1."""
    fi = torch.finfo(x.dtype)
    return x.clamp(fi.tiny, 1.0 - fi.eps / 2)


class MemoryGate(nn.Module):
    """LSTM-like gates on the recurrent update: h' = f*A*h + B*e + g*o, f and g per channel from RMSNorm(h)."""

    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(dim, eps, dtype=dtype)
        self.forget_gate = nn.Linear(dim, dim, dtype=dtype)
        self.input_gate = nn.Linear(dim, dim, dtype=dtype)

    def gates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, g) = (sigmoid(RMSNorm(h) W_f + b_f), sigmoid(RMSNorm(h) W_i + b_i)), (B, T, D) each."""
        x = self.norm(h)
        return torch.sigmoid(self.forget_gate(x)), torch.sigmoid(self.input_gate(x))

    def decay(self, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """The gated decay f*A (B, T, D), strictly inside (0, 1)."""
        return _open_unit(self.gates(h)[0] * A)

    def forward(self, h: torch.Tensor, e: torch.Tensor, o: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """h' = (f*A)*h + B*e + g*o; f*A stays strictly inside (0, 1), so the update is contractive in h."""
        f, g = self.gates(h)
        return _open_unit(f * A) * h + B * e + g * o
