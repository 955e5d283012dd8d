"""The pre-norm transformer block of the prelude, the loop and the coda (ARCHITECTURE.md section 2)."""

from __future__ import annotations

import torch
import torch.nn as nn

from spec import Spec

from .attention import FrozenRows, GQAttention, MLAttention
from .cache import KVCache
from .layers import RMSNorm, SwiGLU
from .moe import MoE, Route


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, dim: int, attn: GQAttention | MLAttention, ffn: SwiGLU | MoE, eps: float, *,
                 dtype: torch.dtype):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps, dtype=dtype)
        self.attn = attn
        self.ffn_norm = RMSNorm(dim, eps, dtype=dtype)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, force_idx: torch.Tensor | None = None,
                *, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0, attn_probs: bool = False,
                pad: torch.Tensor | None = None, frozen: FrozenRows | None = None
                ) -> tuple[torch.Tensor, Route | None, torch.Tensor | None]:
        """x (B, T, D) -> (x, route (None for a dense FFN), attention probabilities (B, H, T, S) or None).

        attn_probs: return the attention probabilities in acc dtype; force_idx (B, T, k) goes to the MoE;
        pad (B,): each row's left padding, for the attention (None: none); frozen: the looped block under
        decode.halted_kv=freeze, for the attention (attention.FrozenRows).
        """
        a, probs = self.attn(self.attn_norm(x), cos, sin, cache=cache, layer=layer, start_pos=start_pos,
                             attn_probs=attn_probs, pad=pad, frozen=frozen)
        x = x + a
        f, route = self.ffn(self.ffn_norm(x), force_idx)
        return x + f, route, probs


def make_block(spec: Spec, moe: bool, *, dtype: torch.dtype) -> Block:
    """A prelude/coda block (dense SwiGLU) or the looped block (MoE or dense, by spec)."""
    a, d = spec.attention, spec.dim
    if a.type == "gqa":
        attn = GQAttention(d, a.n_heads, a.n_kv_heads, a.window, dtype=dtype)
    else:
        attn = MLAttention(d, a.n_heads, a.q_lora_rank, a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim,
                           a.v_head_dim, spec.norm_eps, a.window, dtype=dtype)
    ffn = MoE(d, spec.moe, dtype=dtype) if moe else SwiGLU(d, spec.ffn_hidden, dtype=dtype)
    return Block(d, attn, ffn, spec.norm_eps, dtype=dtype)
