"""Causal self-attention: GQA and MLA, and their decoding cache (ARCHITECTURE.md sections 2 and 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import RMSNorm, acc_dtype, apply_rope


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, q_start: int | jax.Array | None = None,
                     *, return_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """softmax(q k^T * scale, causal) v; q (B,T,H,K), k (B,S,H_kv,K), v (B,S,H_kv,K_v) -> (B,T,H,K_v).

    Query head j reads key/value head j // (H / H_kv). Key s sits at absolute position s, query i at
    q_start + i (None: the queries are the last T keys). return_probs: also the probabilities
    (B, H, T, S) in the acc dtype, 0 at masked keys (computed by `attention_probs`).
    """
    T, S = q.shape[1], k.shape[1]
    start = S - T if q_start is None else q_start
    if return_probs:
        p = attention_probs(q, k, scale, start)  # (B, H, T, S)
        return _weighted_values(p.astype(v.dtype), v), p
    if q_start is None and T == S and q.dtype != jnp.float64 and v.shape[-1] == q.shape[-1]:
        # no cache: XLA's fused form, 8-12% faster forwards here, the same float32 arithmetic (logits in
        # float32 also for bfloat16, softmax in float32). It always soft-maxes in float32, so a float64
        # model keeps the explicit path (exact float64 parity); it also needs K_v == K (MLA may differ)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="xla")
    return _weighted_values(attention_probs(q, k, scale, start).astype(v.dtype), v)


def attention_probs(q: jax.Array, k: jax.Array, scale: float, start: int | jax.Array) -> jax.Array:
    """softmax(q k^T * scale) under the causal mask, (B, H, T, S) in the acc dtype (the explicit computation)."""
    B, T, H, K = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    # the G query heads of a kv head share its keys (n indexes kv heads, g the heads of a group)
    qg = q.reshape(B, T, Hkv, G, K)
    scores = jnp.einsum("btngk,bsnk->bngts", qg, k) * scale  # (B, H_kv, G, T, S)
    # softmax in float32 for bfloat16 (both twins)
    scores = scores.astype(acc_dtype(scores.dtype))
    # causal mask by absolute position: query start + i sees keys 0..start + i (with a cache, start is
    # traced and keys past it hold zeros or stale rows: always masked)
    mask = jnp.arange(S, dtype=jnp.int32)[None, :] <= (start + jnp.arange(T, dtype=jnp.int32))[:, None]  # (T, S)
    scores = jnp.where(mask, scores, jnp.array(-jnp.inf, dtype=scores.dtype))
    return jax.nn.softmax(scores, axis=-1).reshape(B, H, T, S)  # head n*G + g = query head j


def _weighted_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p (B, H, T, S) @ v (B, S, H_kv, K_v) with query head j reading kv head j // (H / H_kv) -> (B, T, H, K_v)."""
    B, H, T, S = p.shape
    Hkv = v.shape[2]
    out = jnp.einsum("bngts,bsnk->btngk", p.reshape(B, Hkv, H // Hkv, T, S), v)  # (B, T, H_kv, G, K_v)
    return out.reshape(B, T, H, -1)  # (B, T, H, K_v)


@jax.tree_util.register_pytree_node_class
class KVCache:
    """Decoding cache, a pytree of fixed capacity: for each attention layer (prelude 0..P-1, loop steps
    0..N-1, coda 0..C-1, on the leading axis L) the rows of positions 0..S-1 (S = capacity).

    GQA: `k` (after RoPE) and `v`, (L, B, S, H_kv, K) each. MLA: `c_kv` (L, B, S, R) and the rotated
    `k_r` (L, B, S, 1, rope), one per token; (L, B, S, H, rope) under openmythos-0.5, as upstream.
    """

    def __init__(self, arrays: dict[str, jax.Array], n_loops: int):
        self.arrays = dict(arrays)
        self.n_loops = n_loops

    @property
    def batch(self) -> int:
        return next(iter(self.arrays.values())).shape[1]

    @property
    def capacity(self) -> int:
        return next(iter(self.arrays.values())).shape[2]

    @property
    def n_layers(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def bytes_per_token(self) -> int:
        """Bytes held per cached token, all layers together (spec.kv_cache_bytes_per_token's total)."""
        return sum(a.size * a.dtype.itemsize for a in self.arrays.values()) // (self.batch * self.capacity)

    def write(self, layer: int | jax.Array, start_pos: int | jax.Array, **rows: jax.Array) -> tuple[jax.Array, ...]:
        """Store rows (B, T, ...) at positions start_pos.. of `layer`; return its rows at all S positions.

        Positions beyond start_pos+T-1 hold zeros or stale rows: the causal mask hides them.
        """
        out = []
        for name, r in rows.items():
            buf = self.arrays[name]
            r = jnp.broadcast_to(r, (*r.shape[:2], *buf.shape[3:])).astype(buf.dtype)  # (B, T, 1, rope) per head
            zero = jnp.zeros((), dtype=jnp.int32)
            at = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(start_pos, jnp.int32)) + (zero,) * (buf.ndim - 3)
            # in place under jit (a donated or loop-carried buffer): one compiled step serves every position
            buf = jax.lax.dynamic_update_slice(buf, r[None], at)
            self.arrays[name] = buf  # the cache now holds the updated buffer (jax arrays are immutable)
            out.append(buf[layer])
        return tuple(out)

    def copy(self) -> KVCache:
        """A new cache object holding the same arrays (writes to it leave this one unchanged)."""
        return KVCache(self.arrays, self.n_loops)

    def tree_flatten(self) -> tuple[tuple[jax.Array, ...], tuple[tuple[str, ...], int]]:
        return tuple(self.arrays.values()), (tuple(self.arrays), self.n_loops)

    @classmethod
    def tree_unflatten(cls, aux: tuple[tuple[str, ...], int], leaves: tuple[jax.Array, ...]) -> KVCache:
        return cls(dict(zip(aux[0], leaves)), aux[1])


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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *, cache: KVCache | None = None,
                 layer: int | jax.Array = 0, start_pos: int | jax.Array = 0, return_probs: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """x (B, T, D) -> (B, T, D); return_probs: also the attention probabilities (B, H, T, S), acc dtype."""
        B, T, _ = x.shape
        hd = self.head_dim
        qk = jnp.concatenate([self.wq(x).reshape(B, T, self.n_heads, hd),
                              self.wk(x).reshape(B, T, self.n_kv_heads, hd)], axis=2)
        q, k = jnp.split(apply_rope(qk, cos, sin), [self.n_heads], axis=2)  # (B, T, H, K), (B, S, H_kv, K)
        v = self.wv(x).reshape(B, T, self.n_kv_heads, hd)
        if cache is not None:
            k, v = cache.write(layer, start_pos, k=k, v=v)  # all S positions of the cache
        q_start = None if cache is None else start_pos
        # head j uses kv head j // (H / H_kv); hd**-0.5 as open-mythos (not always == 1/sqrt(hd))
        out = causal_attention(q, k, v, hd**-0.5, q_start, return_probs=return_probs)
        if return_probs:
            out, p = out
            return self.wo(out.reshape(B, T, self.n_heads * hd)), p
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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *, cache: KVCache | None = None,
                 layer: int | jax.Array = 0, start_pos: int | jax.Array = 0, return_probs: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """x (B, T, D) -> (B, T, D); return_probs: also the attention probabilities (B, H, T, S), acc dtype."""
        B, T, _ = x.shape
        H, nope, rope, vd = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).reshape(B, T, H, nope)
        q_rope = apply_rope(self.q_up_rope(c_q).reshape(B, T, H, rope), cos, sin)
        c_kv, k_r = jnp.split(self.kv_down(x), [self.kv_lora_rank], axis=-1)  # (B, S, kv_lora_rank), (B, S, rope)
        k_r = apply_rope(k_r.reshape(B, T, 1, rope), cos, sin)  # (B, S, 1, rope): one rotated key per token
        if cache is not None:
            c_kv, k_r = cache.write(layer, start_pos, c_kv=c_kv, k_r=k_r)  # all S positions of the cache
        S = c_kv.shape[1]
        k_nope, v = jnp.split(self.kv_up(self.kv_norm(c_kv)).reshape(B, S, H, nope + vd), [nope], axis=-1)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)  # (B, T, H, nope + rope)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_r, (B, S, H, rope))], axis=-1)  # (B, S, H, nope + rope)
        q_start = None if cache is None else start_pos
        # (B, T, H, vd); scale as open-mythos
        out = causal_attention(q, k, v, (nope + rope) ** -0.5, q_start, return_probs=return_probs)
        if return_probs:
            out, p = out
            return self.wo(out.reshape(B, T, H * vd)), p
        return self.wo(out.reshape(B, T, H * vd))
