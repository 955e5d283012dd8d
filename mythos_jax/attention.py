"""Causal self-attention: GQA and MLA (ARCHITECTURE.md section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import RMSNorm, acc_dtype, apply_rope


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale, causal) v; q (B,T,H,K), k (B,S,H,K), v (B,S,H,K) -> (B,T,H,K)."""
    T, S = q.shape[1], k.shape[1]
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * scale  # (B, H, T, S)
    # causal mask by absolute position: the T queries are the last T of the S key positions
    q_pos = jnp.arange(S - T, S, dtype=jnp.int32)
    k_pos = jnp.arange(S, dtype=jnp.int32)
    mask = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    # softmax in float32 for bfloat16 (both twins)
    scores = scores.astype(acc_dtype(scores.dtype))
    scores = jnp.where(mask, scores, jnp.array(-jnp.inf, dtype=scores.dtype))
    p = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshk->bthk", p, v)  # (B, T, H, K)


class GQAttention(nnx.Module):
    """Grouped-query attention: query head j reads key/value head j // (H / H_kv)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        hd = self.head_dim
        self.wq = nnx.Linear(dim, n_heads * hd, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.wk = nnx.Linear(dim, n_kv_heads * hd, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.wv = nnx.Linear(dim, n_kv_heads * hd, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.wo = nnx.Linear(n_heads * hd, dim, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        hd = self.head_dim
        q = apply_rope(self.wq(x).reshape(B, T, self.n_heads, hd), cos, sin)  # (B, T, H, K)
        k = apply_rope(self.wk(x).reshape(B, T, self.n_kv_heads, hd), cos, sin)  # (B, S, H_kv, K)
        v = self.wv(x).reshape(B, T, self.n_kv_heads, hd)
        groups = self.n_heads // self.n_kv_heads
        k = jnp.repeat(k, groups, axis=2)  # (B, S, H, K): head j uses kv head j // groups
        v = jnp.repeat(v, groups, axis=2)
        out = causal_attention(q, k, v, hd**-0.5)  # hd**-0.5 as open-mythos (not always == 1/sqrt(hd))
        return self.wo(out.reshape(B, T, self.n_heads * hd))


class MLAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2): low-rank q and kv, one shared RoPE key."""

    def __init__(self, dim: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 qk_nope_head_dim: int, v_head_dim: int, eps: float, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.v_head_dim = v_head_dim
        H = n_heads
        self.q_down = nnx.Linear(dim, q_lora_rank, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(q_lora_rank, eps, dtype=dtype, rngs=rngs)
        self.q_up_nope = nnx.Linear(q_lora_rank, H * qk_nope_head_dim, use_bias=False, dtype=dtype,
                                    param_dtype=dtype, rngs=rngs)
        self.q_up_rope = nnx.Linear(q_lora_rank, H * qk_rope_head_dim, use_bias=False, dtype=dtype,
                                    param_dtype=dtype, rngs=rngs)
        self.kv_down = nnx.Linear(dim, kv_lora_rank + qk_rope_head_dim, use_bias=False, dtype=dtype,
                                  param_dtype=dtype, rngs=rngs)
        self.kv_norm = RMSNorm(kv_lora_rank, eps, dtype=dtype, rngs=rngs)
        self.kv_up = nnx.Linear(kv_lora_rank, H * (qk_nope_head_dim + v_head_dim), use_bias=False, dtype=dtype,
                                param_dtype=dtype, rngs=rngs)
        self.wo = nnx.Linear(H * v_head_dim, dim, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        H, nope, rope, vd = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).reshape(B, T, H, nope)
        q_rope = apply_rope(self.q_up_rope(c_q).reshape(B, T, H, rope), cos, sin)
        c_kv, k_r = jnp.split(self.kv_down(x), [self.kv_lora_rank], axis=-1)  # (B, S, kv_lora_rank), (B, S, rope)
        k_r = apply_rope(k_r.reshape(B, T, 1, rope), cos, sin)  # (B, S, 1, rope): one rotated key per token
        k_nope, v = jnp.split(self.kv_up(self.kv_norm(c_kv)).reshape(B, T, H, nope + vd), [nope], axis=-1)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)  # (B, T, H, nope + rope)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_r, (B, T, H, rope))], axis=-1)  # (B, S, H, nope + rope)
        out = causal_attention(q, k, v, (nope + rope) ** -0.5)  # (B, T, H, vd); scale as open-mythos
        return self.wo(out.reshape(B, T, H * vd))
