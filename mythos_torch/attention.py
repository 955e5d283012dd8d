"""Causal self-attention: GQA and MLA (ARCHITECTURE.md section 2)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import RMSNorm, acc_dtype, apply_rope


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v; q (B,T,H,K), k (B,S,H,K), v (B,S,H,K) -> (B,T,H,K)."""
    T, S = q.shape[1], k.shape[1]
    scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale  # (B, H, T, S)
    # causal mask by absolute position: the T queries are the last T of the S key positions
    q_pos = torch.arange(S - T, S, device=q.device)
    k_pos = torch.arange(S, device=q.device)
    mask = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    # softmax in float32 for bfloat16 (both twins)
    scores = scores.to(acc_dtype(scores.dtype)).masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return (p @ v.transpose(1, 2)).transpose(1, 2)  # (B, T, H, K)


class GQAttention(nn.Module):
    """Grouped-query attention: query head j reads key/value head j // (H / H_kv)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, *, dtype: torch.dtype):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        hd = self.head_dim
        self.wq = nn.Linear(dim, n_heads * hd, bias=False, dtype=dtype)
        self.wk = nn.Linear(dim, n_kv_heads * hd, bias=False, dtype=dtype)
        self.wv = nn.Linear(dim, n_kv_heads * hd, bias=False, dtype=dtype)
        self.wo = nn.Linear(n_heads * hd, dim, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, hd), cos, sin)  # (B, T, H, K)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, hd), cos, sin)  # (B, S, H_kv, K)
        v = self.wv(x).view(B, T, self.n_kv_heads, hd)
        groups = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(groups, dim=2)  # (B, S, H, K): head j uses kv head j // groups
        v = v.repeat_interleave(groups, dim=2)
        out = causal_attention(q, k, v, hd**-0.5)  # hd**-0.5 as open-mythos (not always == 1/sqrt(hd))
        return self.wo(out.reshape(B, T, self.n_heads * hd))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2): low-rank q and kv, one shared RoPE key."""

    def __init__(self, dim: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 qk_nope_head_dim: int, v_head_dim: int, eps: float, *, dtype: torch.dtype):
        super().__init__()
        self.n_heads = n_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.v_head_dim = v_head_dim
        H = n_heads
        self.q_down = nn.Linear(dim, q_lora_rank, bias=False, dtype=dtype)
        self.q_norm = RMSNorm(q_lora_rank, eps, dtype=dtype)
        self.q_up_nope = nn.Linear(q_lora_rank, H * qk_nope_head_dim, bias=False, dtype=dtype)
        self.q_up_rope = nn.Linear(q_lora_rank, H * qk_rope_head_dim, bias=False, dtype=dtype)
        self.kv_down = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False, dtype=dtype)
        self.kv_norm = RMSNorm(kv_lora_rank, eps, dtype=dtype)
        self.kv_up = nn.Linear(kv_lora_rank, H * (qk_nope_head_dim + v_head_dim), bias=False, dtype=dtype)
        self.wo = nn.Linear(H * v_head_dim, dim, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, nope, rope, vd = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).view(B, T, H, nope)
        q_rope = apply_rope(self.q_up_rope(c_q).view(B, T, H, rope), cos, sin)
        c_kv, k_r = self.kv_down(x).split([self.kv_lora_rank, rope], dim=-1)  # (B, S, kv_lora_rank), (B, S, rope)
        k_r = apply_rope(k_r.view(B, T, 1, rope), cos, sin)  # (B, S, 1, rope): one rotated key per token
        k_nope, v = self.kv_up(self.kv_norm(c_kv)).view(B, T, H, nope + vd).split([nope, vd], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, nope + rope)
        k = torch.cat([k_nope, k_r.expand(B, T, H, rope)], dim=-1)  # (B, S, H, nope + rope)
        out = causal_attention(q, k, v, (nope + rope) ** -0.5)  # (B, T, H, vd); scale as open-mythos
        return self.wo(out.reshape(B, T, H * vd))
