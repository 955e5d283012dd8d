"""The looped block: loop-index embedding, depth-wise LoRA, LTI injection, ACT (ARCHITECTURE.md 2-4)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from spec import Spec

from .components import ContextCompressor, CrossLoopAttention, MemoryGate
from .layers import RMSNorm, acc_dtype

if TYPE_CHECKING:
    from .attention import KVCache
    from .model import Block


def add_loop_embedding(h: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """h (B, T, D) plus one loop_table row (L,) on its first L channels (a row of D channels: as is)."""
    return h + (row if row.shape[-1] == h.shape[-1] else F.pad(row, (0, h.shape[-1] - row.shape[-1])))


class LoRA(nn.Module):
    """Depth-wise LoRA: (down(o) * scale[min(t, N_train - 1)]) @ B."""

    def __init__(self, dim: int, rank: int, n_train: int, *, dtype: torch.dtype):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False, dtype=dtype)
        self.B = nn.Parameter(torch.empty(rank, dim, dtype=dtype))
        self.scale = nn.Parameter(torch.empty(n_train, rank, dtype=dtype))

    def forward(self, o: torch.Tensor, t: int) -> torch.Tensor:
        # steps beyond training depth reuse the last trained scale row (depth extrapolation)
        s = self.scale[min(t, self.scale.shape[0] - 1)]  # (r,)
        return (self.down(o) * s) @ self.B


class LTIInjection(nn.Module):
    """Stable injection h' = A*h + B*e + o with a per-channel decay A in (0, 1)."""

    def __init__(self, dim: int, *, dtype: torch.dtype):
        super().__init__()
        self.log_A = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.log_dt = nn.Parameter(torch.zeros(1, dtype=dtype))
        self.B = nn.Parameter(torch.full((dim,), 0.1, dtype=dtype))

    def decay(self) -> torch.Tensor:
        """A = exp(-exp(clip(log_dt + log_A, -20, 20))), (D,), strictly inside (0, 1)."""
        A = torch.exp(-torch.exp((self.log_dt + self.log_A).clamp(-20, 20)))
        # at the ends of the clip exp(-exp(.)) rounds to 0 or 1; keep A strictly inside (0, 1)
        # (a no-op unless |log_dt + log_A| > ~4.4 in float32, so open-mythos parity is unaffected)
        fi = torch.finfo(A.dtype)
        return A.clamp(fi.tiny, 1.0 - fi.eps / 2)

    def forward(self, h: torch.Tensor, e: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return self.decay() * h + self.B * e + o


class HaltMLP(nn.Module):
    """Halting head d -> hidden -> 1 with SiLU (`fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int, *, dtype: torch.dtype):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, 1, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(h)))


class ACT(nn.Module):
    """Halting probability p = sigmoid(halt(h)) of the new state, (B, T) in acc dtype."""

    def __init__(self, dim: int, head: str, mlp_hidden: int, *, dtype: torch.dtype):
        super().__init__()
        self.halt = nn.Linear(dim, 1, dtype=dtype) if head == "linear" else HaltMLP(dim, mlp_hidden, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.halt(h).squeeze(-1).to(acc_dtype(h.dtype)))


def act_step(p: torch.Tensor, c: torch.Tensor, running: torch.Tensor, threshold: float, last: bool,
             forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ACT step (ARCHITECTURE.md section 4) on (B, T) -> (weight, new c, still running, halts now).

    last: Graves' remainder, every running position halts now. forced (B, T) bool replaces the
    threshold decision (replay of force_halt).
    """
    decide = c + p >= threshold if forced is None else forced
    halts = running & (decide | last)
    w = torch.where(running, torch.where(halts, 1.0 - c, p), 0.0)
    c = c + torch.where(running, p, 0.0)  # open-mythos: c + p * running
    return w, c, running & ~halts, halts


class StepOut(NamedTuple):
    """What one loop step returns (RecurrentBlock)."""
    h: torch.Tensor  # (B, T, D) the new state
    p: torch.Tensor  # (B, T) acc dtype, halting probability of the new state
    idx: torch.Tensor  # (B, T, k) int32 routed experts
    margin: torch.Tensor  # (B, T) acc dtype router margin
    entry: tuple[torch.Tensor, torch.Tensor] | None  # cross-loop memory key/value of the new state, (B, T, H, K)
    summaries: torch.Tensor | None  # compressor summaries of this step's complete chunks (B, J, m, D), no cache
    probs: torch.Tensor | None  # (B, H, T, S) self-attention probabilities when asked for


class RecurrentBlock(nn.Module):
    """One loop step (ARCHITECTURE.md section 3): embed t, [cross-loop attention, compressor read], block,
    LoRA, LTI injection [memory gate], halting p [compressor write]."""

    def __init__(self, spec: Spec, block: Block, *, dtype: torch.dtype):
        super().__init__()
        r, d, eps = spec.recurrent, spec.dim, spec.norm_eps
        self.norm = RMSNorm(d, eps, dtype=dtype)
        self.block = block
        self.lora = LoRA(d, r.lora_rank, r.max_loop_iters, dtype=dtype) if r.lora_rank > 0 else None
        self.injection = LTIInjection(d, dtype=dtype)
        self.act = ACT(d, spec.halting.head, spec.halting.mlp_hidden, dtype=dtype)
        cl, cp = r.cross_loop_attention, r.compressor
        self.cross_loop = CrossLoopAttention(d, cl.n_heads, eps, dtype=dtype) if cl.enabled else None
        self.compressor = ContextCompressor(d, cp.chunk, cp.n_summaries, cp.n_heads, eps, dtype=dtype) \
            if cp.enabled else None
        self.memory_gate = MemoryGate(d, eps, dtype=dtype) if r.memory_gate.enabled else None

    def forward(self, h: torch.Tensor, e: torch.Tensor, t: int, row: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, force_idx: torch.Tensor | None = None, *, cache: KVCache | None = None,
                layer: int = 0, start_pos: int = 0, memory: tuple[torch.Tensor, ...] | None = None,
                summaries: torch.Tensor | None = None, return_probs: bool = False) -> StepOut:
        """Step t: h (B, T, D) -> StepOut(new h, halting p (B, T), expert idx (B, T, k), router margin (B, T), ...).

        memory: the cross-loop memory (keys, values), (M, B, T, H, K) each; summaries: the compressor's
        summaries of step t-1 (B, J, m, D) (None at step 0). With a cache, the block's attention writes
        and reads cache layer `layer` (P + t), and the compressor reads and writes its cache rows.
        """
        # the loop embedding feeds the block input only; the injection uses the un-embedded h
        x = add_loop_embedding(h, row)  # h~
        if self.cross_loop is not None:
            x = x + self.cross_loop(x, *memory)
        if self.compressor is not None:
            T = h.shape[1]
            if cache is not None:  # step t-1's summaries of every chunk so far (unwritten ones are masked)
                summaries = cache.arrays["summaries"][t - 1] if t > 0 else None
            n_visible = torch.arange(start_pos, start_pos + T, device=h.device) // self.compressor.chunk
            x = x + self.compressor.read(x, summaries, n_visible)
        n = self.norm(x + e)  # (h + emb) + e, open-mythos' association
        if return_probs:
            o, idx, margin, probs = self.block(n, cos, sin, force_idx, cache=cache, layer=layer, start_pos=start_pos,
                                               return_probs=True)
        else:
            o, idx, margin = self.block(n, cos, sin, force_idx, cache=cache, layer=layer, start_pos=start_pos)
            probs = None
        if self.lora is not None:
            o = o + self.lora(o, t)
        if self.memory_gate is None:
            h_new = self.injection(h, e, o)
        else:
            h_new = self.memory_gate(h, e, o, self.injection.decay(), self.injection.B)
        entry = None if self.cross_loop is None else self.cross_loop.entry(h_new)
        new_summaries = None
        if self.compressor is not None:
            c = self.compressor.chunk
            if cache is None:
                J = h_new.shape[1] // c  # complete chunks
                new_summaries = self.compressor.write(h_new[:, :J * c].unflatten(1, (J, c)))
            else:
                self.compressor.write_cached(h_new, t, cache, start_pos)
        return StepOut(h_new, self.act(h_new), idx, margin, entry, new_summaries, probs)
