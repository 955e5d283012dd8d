"""Analytic costs from the spec alone: FLOPs per token and KV-cache bytes per token."""

from __future__ import annotations

import math

from .schema import Spec

COMPRESSOR_ARRAYS = ("summaries", "chunk_states")  # per loop step, not per attention layer
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def _attn_matmul_params(s: Spec) -> int:
    a, d = s.attention, s.dim
    if a.type == "gqa":
        hd = s.head_dim
        return d * a.n_heads * hd * 2 + d * a.n_kv_heads * hd * 2
    return (d * a.q_lora_rank + a.q_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
            + d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
            + a.n_heads * a.v_head_dim * d)


def _attn_score_flops(s: Spec, context: float) -> float:
    """FLOPs of q.k and p.v for one query against ``context`` keys (MLA: keys re-expanded per step)."""
    a = s.attention
    if a.type == "gqa":
        return 2 * context * a.n_heads * s.head_dim * 2
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    return 2 * context * a.n_heads * (qk + a.v_head_dim)


def flops_per_token(s: Spec, seq_len: int, n_loops: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token (multiply-add = 2), averaged over a causal sequence of ``seq_len``."""
    n = s.recurrent.max_loop_iters if n_loops is None else n_loops
    d, m, r = s.dim, s.moe, s.recurrent
    ctx = (seq_len + 1) / 2
    attn = 2 * _attn_matmul_params(s) + _attn_score_flops(s, ctx)
    dense_ffn = 2 * 3 * d * s.ffn_hidden
    if r.ffn == "moe":
        rec_ffn = 2 * (d * m.n_experts + 3 * d * m.expert_dim * m.top_k + m.n_shared_experts * 3 * d * s.shared_expert_dim)
    else:
        rec_ffn = dense_ffn
    lora = 2 * 2 * d * r.lora_rank
    halt = 2 * d if s.halting.head == "linear" else 2 * (d * s.halting.mlp_hidden + s.halting.mlp_hidden)
    out = {
        "prelude": s.prelude_layers * (attn + dense_ffn),
        "recurrent": n * (attn + rec_ffn + lora + halt),
        "coda": s.coda_layers * (attn + dense_ffn),
        "head": 2 * d * s.vocab_size,
    }
    # the hypothesised components (docs/components.md), rows only when enabled
    if r.cross_loop_attention.enabled:
        # per step: q and o projections, k and v of the new memory entry (4 d x d); scores and p.v over the
        # t + 1 entries of step t (mean (n + 1) / 2 over the n steps)
        out["cross_loop"] = n * 2 * 4 * d * d + 2 * 2 * d * n * (n + 1) / 2
    if r.compressor.enabled:
        cp = r.compressor
        c, m_ = cp.chunk, cp.n_summaries
        visible = sum(i // c for i in range(seq_len)) / seq_len  # chunks a query reads, mean over positions
        write = 2 * 2 * d * d + 2 * 2 * m_ * d  # k, v of each position; m queries x c rows, per position
        read = 2 * 2 * d * d + 2 * 2 * (m_ / c) * d * d + 2 * 2 * d * (1 + m_ * visible)  # q, o; k, v of summaries
        out["compressor"] = n * (write + read)
    if r.memory_gate.enabled:
        out["memory_gate"] = n * 2 * 2 * d * d  # W_f and W_i
    if s.value_head.enabled:
        out["value_head"] = (n + 1) * 2 * d  # values, and the per-step value trace
    out["total"] = sum(out.values())
    return out


def cache_shapes(s: Spec, batch: int, seq: int, n_loops: int | None = None) -> dict[str, tuple[int, ...]]:
    """The KV cache's arrays by name and shape, for ``batch`` sequences of ``seq`` positions (both twins).

    The leading axis L of the attention entries is the attention layer, prelude 0..P-1, loop step
    0..N-1, coda 0..C-1. GQA: ``k`` (after RoPE) and ``v``, (L, B, S, H_kv, K). MLA: the latent
    ``c_kv`` (L, B, S, kv_lora_rank) and one rotated rope key per token ``k_r`` (L, B, S, 1, rope);
    under openmythos-0.5 (L, B, S, H, rope), as upstream caches it per head. With the compressor, per
    loop step: the summaries of every chunk (N, B, ceil(S / c), m, D) and the rows of the chunk still
    open (N, B, c, D).
    """
    a = s.attention
    n = s.recurrent.max_loop_iters if n_loops is None else n_loops
    L = s.prelude_layers + n + s.coda_layers
    if a.type == "gqa":
        shapes = {"k": (L, batch, seq, a.n_kv_heads, s.head_dim), "v": (L, batch, seq, a.n_kv_heads, s.head_dim)}
    else:
        heads = a.n_heads if s.semantics == "openmythos-0.5" else 1
        shapes = {"c_kv": (L, batch, seq, a.kv_lora_rank), "k_r": (L, batch, seq, heads, a.qk_rope_head_dim)}
    cp = s.recurrent.compressor
    if cp.enabled:
        shapes["summaries"] = (n, batch, -(-seq // cp.chunk), cp.n_summaries, s.dim)
        shapes["chunk_states"] = (n, batch, cp.chunk, s.dim)
    return shapes


def kv_cache_bytes_per_token(s: Spec, dtype: str = "float32", n_loops: int | None = None,
                             max_len: int | None = None) -> dict[str, int]:
    """Bytes cached per token: per attention layer, and in total for ``n_loops`` recurrent steps.

    With the compressor, ``compressor`` is its cache amortised over a capacity of ``max_len`` positions
    (None: max_seq_len): per loop step ceil(S / c) chunks of m summaries, and the c rows of the chunk
    still open, (ceil(S / c) m + c) d values, divided by S; ``total`` then is the whole cache's bytes
    over S, rounded down (``KVCache.bytes_per_token()``).
    """
    n = s.recurrent.max_loop_iters if n_loops is None else n_loops
    S = s.max_seq_len if max_len is None else max_len
    shapes = cache_shapes(s, 1, S, n)
    b = DTYPE_BYTES[dtype]
    attn = [shape for name, shape in shapes.items() if name not in COMPRESSOR_ARRAYS]
    per_layer = sum(math.prod(shape[3:]) for shape in attn)  # values per position per layer
    layers = attn[0][0]
    out = {"per_layer": per_layer * b, "layers": layers, "total": per_layer * b * layers}
    if s.recurrent.compressor.enabled:
        cmp = sum(math.prod(shapes[name]) for name in COMPRESSOR_ARRAYS) * b  # bytes for S positions
        out["compressor"] = cmp // S
        out["total"] = (per_layer * b * layers * S + cmp) // S
    return out
