"""Causal self-attention: GQA and MLA (ARCHITECTURE.md section 2; their decoding cache is in cache.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache
from .layers import RMSNorm, acc_dtype, apply_rope


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_start: int | None = None,
                     *, attn_probs: bool = False, pad: torch.Tensor | None = None, window: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale, causal) v; q (B,T,H,K), k (B,S,H_kv,K), v (B,S,H_kv,K_v) -> (out (B,T,H,K_v), probs).

    Query head j reads key/value head j // (H / H_kv). Key s sits at absolute position s, query i at
    q_start + i (None: the queries are the last T keys). probs: with attn_probs the probabilities
    (B, H, T, S) in the acc dtype, 0 at masked keys (computed by `attention_probs`); else None.
    pad (B,) int: row b's first pad[b] keys are left padding, seen by no query but their own (None: none).
    window (attention.window): query i sees keys j with i - window < j <= i (None: every earlier key).
    """
    T, S = q.shape[1], k.shape[1]
    start = S - T if q_start is None else q_start
    if window is not None and isinstance(start, int) and window >= start + T:
        window = None  # every query's window reaches key 0: the plain causal mask (and its fast paths)
    if attn_probs:
        p = attention_probs(q, k, scale, start, pad, window)  # (B, H, T, S)
        return _weighted_values(p.to(v.dtype), v), p
    # one fused kernel (softmax in float32 for bfloat16, float64 stays float64); enable_gqa: query
    # head j reads kv head j // (H / H_kv), no repeated keys
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, K), (B, H_kv, S, K)
    if pad is not None:  # left padding: a per-row mask (B, 1, T, S), built only when some row is padded
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_causal_mask(T, S, start, q.device, pad,
                                                                                window)[:, None],
                                             scale=scale, enable_gqa=True)
    elif window is not None:  # a sliding window: the explicit (T, S) mask, never the is_causal fast path
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_causal_mask(T, S, start, q.device, None, window),
                                             scale=scale, enable_gqa=True)
    elif start == 0 and T == S:  # no cache: the plain causal mask
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    elif T == 1 and start == S - 1:  # one query at the last key sees every key: nothing to mask
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_causal_mask(T, S, start, q.device), scale=scale,
                                             enable_gqa=True)
    return out.transpose(1, 2), None  # (B, T, H, K_v)


def _causal_mask(T: int, S: int, start: int, device: torch.device, pad: torch.Tensor | None = None,
                 window: int | None = None) -> torch.Tensor:
    """(T, S) bool, True where query start + i sees key j (j <= start + i; with a window also
    j > start + i - window, docs/semantics.md "Readout modes, NoPE and the attention window"); with pad (B,):
    (B, T, S), and row b's keys j < pad[b] seen only by their own query (docs/semantics.md "Padding")."""
    i = torch.arange(start, start + T, device=device)[:, None]  # (T, 1) the queries' absolute positions
    j = torch.arange(S, device=device)[None, :]  # (1, S) the keys'
    mask = j <= i  # (T, S)
    if window is not None:  # a pad's own key is always inside its window
        mask = mask & (j > i - window)
    if pad is None:
        return mask
    own = j == i  # (T, S): a pad sees itself
    return mask & ((j >= pad[:, None, None]) | own)  # (B, T, S)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, start: int,
                    pad: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) under the causal (and window) mask, (B, H, T, S) in the acc dtype (the explicit
    computation)."""
    B, T, H, K = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    # the G query heads of a kv head share its keys: (B, H_kv, G*T, K) rows against (B, H_kv, K, S)
    qg = q.reshape(B, T, Hkv, G, K).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, K)
    scores = (qg @ k.permute(0, 2, 3, 1)) * scale  # (B, H_kv, G*T, S)
    # softmax in float32 for bfloat16 (both twins)
    scores = scores.to(acc_dtype(scores.dtype)).view(B, Hkv, G, T, S)
    if pad is not None:  # (B, 1, 1, T, S) broadcast
        scores = scores.masked_fill(~_causal_mask(T, S, start, q.device, pad, window)[:, None, None], float("-inf"))
    elif window is not None:
        scores = scores.masked_fill(~_causal_mask(T, S, start, q.device, None, window), float("-inf"))
    elif T > 1 or start != S - 1:  # one query at the last key sees every key: nothing to mask
        scores = scores.masked_fill(~_causal_mask(T, S, start, q.device), float("-inf"))  # (T, S) broadcast
    return torch.softmax(scores, dim=-1).view(B, H, T, S)  # head n*G + g = query head j


def _weighted_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, H, T, S) @ v (B, S, H_kv, K_v) with query head j reading kv head j // (H / H_kv) -> (B, T, H, K_v)."""
    B, H, T, S = p.shape
    Hkv = v.shape[2]
    out = p.reshape(B, Hkv, (H // Hkv) * T, S) @ v.transpose(1, 2)  # (B, H_kv, G*T, K_v)
    return out.view(B, H, T, -1).transpose(1, 2)  # (B, T, H, K_v)


class FrozenRows:
    """decode.halted_kv=freeze (docs/semantics.md "Halted tokens at deeper loop steps"): the looped attention's
    rows (B, T, ...) of positions that do not run at this step are the carried rows of the last step they ran.

    keep (B, T) bool: not running before this step (None: step 0, every row computed); rows: the carried
    rows (GQA: k after RoPE, v; MLA: c_kv, k_r), and after `select` this step's rows, which the loop carries on.
    """

    def __init__(self, keep: torch.Tensor | None, rows: tuple[torch.Tensor, ...] | None):
        self.keep = keep
        self.rows = rows

    def select(self, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """rows (B, T, ...) as computed -> where(keep, carried, computed), also kept as self.rows."""
        if self.keep is not None:
            rows = tuple(torch.where(self.keep.view(*self.keep.shape, *(1,) * (r.dim() - 2)), old, r)
                         for old, r in zip(self.rows, rows))
        self.rows = rows
        return rows


class GQAttention(nn.Module):
    """Grouped-query attention: query head j reads key/value head j // (H / H_kv)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, window: int | None = None, *, dtype: torch.dtype):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.window = window  # attention.window (None: full causal)
        self.head_dim = dim // n_heads
        hd = self.head_dim
        self.wq = nn.Linear(dim, n_heads * hd, bias=False, dtype=dtype)
        self.wk = nn.Linear(dim, n_kv_heads * hd, bias=False, dtype=dtype)
        self.wv = nn.Linear(dim, n_kv_heads * hd, bias=False, dtype=dtype)
        self.wo = nn.Linear(n_heads * hd, dim, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cache: KVCache | None = None,
                layer: int = 0, start_pos: int = 0, attn_probs: bool = False, pad: torch.Tensor | None = None,
                frozen: FrozenRows | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> (out (B, T, D), probs): attn_probs: the probabilities (B, H, T, S), acc dtype; else None.

        cos, sin: (T, K/2), or (B, T, K/2) per row with left padding; pad (B,) or None (causal_attention);
        frozen: the looped block under decode.halted_kv=freeze (FrozenRows picks k, v per position)."""
        B, T, _ = x.shape
        hd = self.head_dim
        # -1 heads: under tensor parallelism (sharding.py) wq/wk/wv give this rank's heads only
        q, k, v = self.wq(x).view(B, T, -1, hd), self.wk(x).view(B, T, -1, hd), self.wv(x).view(B, T, -1, hd)
        H, Hkv = q.shape[2], k.shape[2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, T, H, K), (B, S, H_kv, K); no cat/split copies
        if frozen is not None:
            k, v = frozen.select(k, v)
        if cache is not None:
            k, v = cache.write(layer, start_pos, k=k, v=v)  # positions 0..start_pos+T-1
        q_start = None if cache is None else start_pos
        # head j uses kv head j // (H / H_kv); hd**-0.5 as open-mythos (not always == 1/sqrt(hd))
        out, probs = causal_attention(q, k, v, hd**-0.5, q_start, attn_probs=attn_probs, pad=pad, window=self.window)
        return self.wo(out.reshape(B, T, H * hd)), probs


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2): low-rank q and kv, one shared RoPE key."""

    def __init__(self, dim: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 qk_nope_head_dim: int, v_head_dim: int, eps: float, window: int | None = None, *,
                 dtype: torch.dtype):
        super().__init__()
        self.n_heads = n_heads
        self.window = window  # attention.window (None: full causal)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cache: KVCache | None = None,
                layer: int = 0, start_pos: int = 0, attn_probs: bool = False, pad: torch.Tensor | None = None,
                frozen: FrozenRows | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> (out (B, T, D), probs): attn_probs: the probabilities (B, H, T, S), acc dtype; else None.

        cos, sin: (T, K/2), or (B, T, K/2) per row with left padding; pad (B,) or None (causal_attention);
        frozen: the looped block under decode.halted_kv=freeze (FrozenRows picks c_kv, k_r per position)."""
        B, T, _ = x.shape
        nope, rope, vd = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).view(B, T, -1, nope)  # -1: this rank's heads under tensor parallelism
        H = q_nope.shape[2]
        q_rope = apply_rope(self.q_up_rope(c_q).view(B, T, H, rope), cos, sin)
        c_kv, k_r = self.kv_down(x).split([self.kv_lora_rank, rope], dim=-1)  # (B, S, kv_lora_rank), (B, S, rope)
        k_r = apply_rope(k_r.view(B, T, 1, rope), cos, sin)  # (B, S, 1, rope): one rotated key per token
        if frozen is not None:
            c_kv, k_r = frozen.select(c_kv, k_r)
        if cache is not None:
            c_kv, k_r = cache.write(layer, start_pos, c_kv=c_kv, k_r=k_r)  # positions 0..start_pos+T-1
        S = c_kv.shape[1]
        k_nope, v = self.kv_up(self.kv_norm(c_kv)).view(B, S, H, nope + vd).split([nope, vd], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, nope + rope)
        # k_r[:, :, :1]: the openmythos-0.5 cache holds the one key per head (copies); tp splits the heads
        k = torch.cat([k_nope, k_r[:, :, :1].expand(B, S, H, rope)], dim=-1)  # (B, S, H, nope + rope)
        q_start = None if cache is None else start_pos
        # (B, T, H, vd); scale as open-mythos
        out, probs = causal_attention(q, k, v, (nope + rope) ** -0.5, q_start, attn_probs=attn_probs, pad=pad,
                                      window=self.window)
        return self.wo(out.reshape(B, T, H * vd)), probs
