"""Analytic costs from the spec alone: FLOPs per token and KV-cache bytes per token."""

from __future__ import annotations

from .schema import Spec

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
    out["total"] = sum(out.values())
    return out


def kv_cache_bytes_per_token(s: Spec, dtype: str = "float32", n_loops: int | None = None) -> dict[str, int]:
    """Bytes cached per token: per attention layer, and in total for ``n_loops`` recurrent steps."""
    a = s.attention
    n = s.recurrent.max_loop_iters if n_loops is None else n_loops
    if a.type == "gqa":
        per_layer = 2 * a.n_kv_heads * s.head_dim
    elif s.semantics == "openmythos-0.5":
        per_layer = a.kv_lora_rank + a.n_heads * a.qk_rope_head_dim  # its rope key is cached per head
    else:
        per_layer = a.kv_lora_rank + a.qk_rope_head_dim
    layers = s.prelude_layers + s.coda_layers + n
    b = DTYPE_BYTES[dtype]
    return {"per_layer": per_layer * b, "layers": layers, "total": per_layer * b * layers}
