"""Causal self-attention: GQA and MLA (ARCHITECTURE.md section 2); their decoding cache is cache.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from .cache import KVCache
from .layers import RMSNorm, acc_dtype, apply_rope
from .precision import acc_einsum, mm_einsum


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, q_start: int | jax.Array | None = None,
                     *, attn_probs: bool = False, pad: jax.Array | None = None,
                     window: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """softmax(q k^T * scale, causal) v; q (B,T,H,K), k (B,S,H_kv,K), v (B,S,H_kv,K_v) -> (out (B,T,H,K_v), probs).

    Query head j reads key/value head j // (H / H_kv). Key s sits at absolute position s, query i at
    q_start + i (None: the queries are the last T keys). probs: with attn_probs, the probabilities
    (B, H, T, S) in the acc dtype, 0 at masked keys (computed by `attention_probs`); else None.
    pad (B,) int: row b's first pad[b] keys are left padding, seen by no query but their own (None: none).
    window (attention.window): query i sees keys j with i - window < j <= i (None: every earlier key).
    """
    T, S = q.shape[1], k.shape[1]
    start = S - T if q_start is None else q_start
    if attn_probs:
        p = attention_probs(q, k, scale, start, pad, window)  # (B, H, T, S)
        return _weighted_values(p.astype(v.dtype), v), p
    if q_start is None and T == S and q.dtype != jnp.float64 and pad is None:
        # no cache, float32/bfloat16: query blocks that skip the masked keys (_blocked_attention; logits and
        # softmax in float32 also for bfloat16, as XLA's fused form computed them). A float64 model keeps the
        # explicit path (exact float64 parity), and so does left padding
        return _blocked_attention(q, k, v, scale, window), None
    return _weighted_values(attention_probs(q, k, scale, start, pad, window).astype(v.dtype), v), None


# query rows per block of _blocked_attention: blocks skip the keys after their last query, so the masked
# upper triangle is neither computed nor written (bench-s-gqa's (4, 256, 8 heads / 2 kv heads, 32) on this
# CPU: forward 8.2 -> 4.7-6.0 ms a call, forward+backward 33 -> 15-17 ms, against XLA's fused form; issue 18;
# heads-major operands: 6.8 -> 3.3 ms and 13.8 -> 8.6 ms, 128-row blocks a little ahead of 64)
Q_BLOCK = 128


def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, window: int | None = None
                       ) -> jax.Array:
    """causal_attention without a cache (query i at key i) in blocks of Q_BLOCK query rows (at most 16 blocks):
    block [lo, hi) reads keys k0..hi-1 only (k0 = 0, or lo - window + 1 under a window). Logits and softmax
    in float32 (also for bfloat16), p in v's dtype. q (B,T,H,K), k (B,T,H_kv,K), v (B,T,H_kv,K_v) -> (B,T,H,K_v).

    q, k and v are laid out heads-major once ((B, H_kv, G, T, K), (B, H_kv, T, K)), so each block's two
    products are plain batched matmuls over (B, H_kv) with no per-block transposes (half the time of the
    token-major einsums on XLA:CPU). The backward is written out (`_attention_core`'s VJP); a loop step's
    backward keeps the output (model.py's remat policy); the log-sum-exp, a residual of the VJP, is recomputed."""
    B, T, H, K = q.shape
    Hkv = k.shape[2]
    qh = q.reshape(B, T, Hkv, H // Hkv, K).transpose(0, 2, 3, 1, 4)  # query head n*G + g reads kv head n
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, H_kv, T, K), (B, H_kv, T, K_v)
    out = checkpoint_name(_attention_core(qh, kh, vh, scale, window)[0], ATTENTION_OUT)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, -1)


# the name under which the attention core's output is saved for the backward pass
ATTENTION_OUT = "attention_out"


def _blocks(T: int, window: int | None) -> list[tuple[int, int, int, jax.Array]]:
    """The query blocks [lo, hi) of _blocked_attention, each with its first key k0 and its (t, s) mask."""
    C = max(Q_BLOCK, -(-T // 16))  # each block is its own code in the program: at most 16 of them
    out = []
    for lo in range(0, T, C):
        hi = min(lo + C, T)
        k0 = 0 if window is None else max(0, lo - window + 1)
        i = jnp.arange(lo, hi, dtype=jnp.int32)[:, None]  # (t, 1) the block's query positions
        j = jnp.arange(k0, hi, dtype=jnp.int32)[None, :]  # (1, s) its keys'
        causal = j <= i  # (t, s); a window: also j > i - window (a query always sees its own key)
        if window is not None:
            causal = causal & (j > i - window)
        out.append((lo, hi, k0, causal))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention_core(qh: jax.Array, kh: jax.Array, vh: jax.Array, scale: float, window: int | None
                    ) -> tuple[jax.Array, jax.Array]:
    """Heads-major blocked causal attention: qh (B, H_kv, G, T, K), kh (B, H_kv, T, K), vh (B, H_kv, T, K_v)
    -> (out (B, H_kv, G, T, K_v), the logits' log-sum-exp per query (B, H_kv, G, T) in the acc dtype)."""
    acc = acc_dtype(qh.dtype)
    outs, lses = [], []
    for lo, hi, k0, causal in _blocks(qh.shape[3], window):
        scores = acc_einsum("bngtk,bnsk->bngts", qh[:, :, :, lo:hi], kh[:, :, k0:hi], acc) * scale
        scores = jnp.where(causal, scores, jnp.array(-jnp.inf, acc))
        top = jnp.max(scores, axis=-1, keepdims=True)  # every query sees its own key: finite
        e = jnp.exp(scores - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        p = (e / total).astype(vh.dtype)  # jax.nn.softmax's arithmetic
        outs.append(mm_einsum("bngts,bnsk->bngtk", p, vh[:, :, k0:hi]))  # (B, H_kv, G, t, K_v)
        lses.append((top + jnp.log(total))[..., 0])
    if len(outs) == 1:
        return outs[0], lses[0]
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


def _attention_core_fwd(qh: jax.Array, kh: jax.Array, vh: jax.Array, scale: float, window: int | None
                        ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    out, lse = _attention_core(qh, kh, vh, scale, window)
    return (out, lse), (qh, kh, vh, out, lse)


def _attention_core_bwd(scale: float, window: int | None, res: tuple[jax.Array, ...],
                        g: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The attention gradients block by block from the saved log-sum-exp (FlashAttention's backward):
    p = exp(s - lse), dv = p^T do, ds = p (do v^T - rowsum(do * out) + d lse), dq = ds k scale, dk = ds^T q scale.
    The row sums rowsum(do * out) replace the softmax backward's sums over keys (K_v long rows, not S long)."""
    qh, kh, vh, out, lse = res
    g_out, g_lse = g
    acc = acc_dtype(qh.dtype)
    T = qh.shape[3]
    rows = jnp.sum(g_out.astype(acc) * out.astype(acc), axis=-1)  # (B, H_kv, G, T)
    dq, dk, dv = [], jnp.zeros(kh.shape, acc), jnp.zeros(vh.shape, acc)
    for lo, hi, k0, causal in _blocks(T, window):
        q_b, k_b, v_b, do = qh[:, :, :, lo:hi], kh[:, :, k0:hi], vh[:, :, k0:hi], g_out[:, :, :, lo:hi]
        scores = acc_einsum("bngtk,bnsk->bngts", q_b, k_b, acc) * scale
        p = jnp.where(causal, jnp.exp(scores - lse[:, :, :, lo:hi, None]), 0)  # (B, H_kv, G, t, s) acc
        dp = acc_einsum("bngtk,bnsk->bngts", do, v_b, acc)
        ds = p * (dp - rows[:, :, :, lo:hi, None] + g_lse[:, :, :, lo:hi, None].astype(acc)) * scale
        pad = ((0, 0), (0, 0), (k0, T - hi), (0, 0))  # this block's keys k0..hi-1 of all T
        dv = dv + jnp.pad(acc_einsum("bngts,bngtk->bnsk", p.astype(vh.dtype), do, acc), pad)
        dk = dk + jnp.pad(acc_einsum("bngts,bngtk->bnsk", ds, q_b, acc), pad)
        dq.append(acc_einsum("bngts,bnsk->bngtk", ds, k_b, acc))
    dq = dq[0] if len(dq) == 1 else jnp.concatenate(dq, axis=3)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def attention_probs(q: jax.Array, k: jax.Array, scale: float, start: int | jax.Array,
                    pad: jax.Array | None = None, window: int | None = None) -> jax.Array:
    """softmax(q k^T * scale) under the causal (and window) mask, (B, H, T, S) in the acc dtype (the explicit
    computation)."""
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
    i = (start + jnp.arange(T, dtype=jnp.int32))[:, None]  # (T, 1) the queries' absolute positions
    j = jnp.arange(S, dtype=jnp.int32)[None, :]  # (1, S) the keys'
    mask = j <= i  # (T, S)
    if window is not None:  # attention.window: keys i - window < j <= i (a pad's own key is always inside)
        mask = mask & (j > i - window)
    if pad is not None:  # left padding (docs/semantics.md "Padding"): keys j < pad[b] seen only by their own query
        own = j == i  # (T, S): a pad sees itself
        mask = (mask & ((j >= pad[:, None, None]) | own))[:, None, None]  # (B, 1, 1, T, S)
    scores = jnp.where(mask, scores, jnp.array(-jnp.inf, dtype=scores.dtype))
    return jax.nn.softmax(scores, axis=-1).reshape(B, H, T, S)  # head n*G + g = query head j


def _weighted_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p (B, H, T, S) @ v (B, S, H_kv, K_v) with query head j reading kv head j // (H / H_kv) -> (B, T, H, K_v)."""
    B, H, T, S = p.shape
    Hkv = v.shape[2]
    out = mm_einsum("bngts,bsnk->btngk", p.reshape(B, Hkv, H // Hkv, T, S), v)  # (B, T, H_kv, G, K_v)
    return out.reshape(B, T, H, -1)  # (B, T, H, K_v)


class FrozenRows:
    """decode.halted_kv=freeze (docs/semantics.md "Halted tokens at deeper loop steps"): the looped attention's
    rows (B, T, ...) of positions that do not run at this step are the carried rows of the last step they ran.

    keep (B, T) bool: not running before this step (None: every row computed); rows: the carried rows
    (GQA: k after RoPE, v; MLA: c_kv, k_r), and after `select` this step's rows, which the loop carries on.
    """

    def __init__(self, keep: jax.Array | None, rows: tuple[jax.Array, ...] | None):
        self.keep = keep
        self.rows = rows

    def select(self, *rows: jax.Array) -> tuple[jax.Array, ...]:
        """rows (B, T, ...) as computed -> where(keep, carried, computed), also kept as self.rows."""
        if self.keep is not None:
            rows = tuple(jnp.where(self.keep.reshape(*self.keep.shape, *(1,) * (r.ndim - 2)), old, r)
                         for old, r in zip(self.rows, rows))
        self.rows = rows
        return rows


class GQAttention(nnx.Module):
    """Grouped-query attention: query head j reads key/value head j // (H / H_kv)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, window: int | None = None, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.window = window  # attention.window (None: full causal)
        self.head_dim = dim // n_heads
        hd = self.head_dim
        self.wq = nnx.Linear(dim, n_heads * hd, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.wk = nnx.Linear(dim, n_kv_heads * hd, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.wv = nnx.Linear(dim, n_kv_heads * hd, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.wo = nnx.Linear(n_heads * hd, dim, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *, cache: KVCache | None = None,
                 layer: int | jax.Array = 0, start_pos: int | jax.Array = 0, attn_probs: bool = False,
                 pad: jax.Array | None = None, frozen: FrozenRows | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """x (B, T, D) -> (out (B, T, D), attention probabilities (B, H, T, S) in acc dtype if attn_probs else None).

        cos, sin: (T, K/2), or (B, T, K/2) per row with left padding; pad (B,) or None (causal_attention);
        frozen: the looped block under decode.halted_kv=freeze (FrozenRows picks k, v per position)."""
        B, T, _ = x.shape
        hd = self.head_dim
        qk = jnp.concatenate([self.wq(x).reshape(B, T, self.n_heads, hd),
                              self.wk(x).reshape(B, T, self.n_kv_heads, hd)], axis=2)
        q, k = jnp.split(apply_rope(qk, cos, sin), [self.n_heads], axis=2)  # (B, T, H, K), (B, S, H_kv, K)
        v = self.wv(x).reshape(B, T, self.n_kv_heads, hd)
        if frozen is not None:
            k, v = frozen.select(k, v)
        if cache is not None:
            k, v = cache.write(layer, start_pos, k=k, v=v)  # all S positions of the cache
        q_start = None if cache is None else start_pos
        # head j uses kv head j // (H / H_kv); hd**-0.5 as open-mythos (not always == 1/sqrt(hd))
        out, p = causal_attention(q, k, v, hd**-0.5, q_start, attn_probs=attn_probs, pad=pad, window=self.window)
        return self.wo(out.reshape(B, T, self.n_heads * hd)), p


class MLAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2): low-rank q and kv, one shared RoPE key."""

    def __init__(self, dim: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 qk_nope_head_dim: int, v_head_dim: int, eps: float, window: int | None = None, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.window = window  # attention.window (None: full causal)
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
                 layer: int | jax.Array = 0, start_pos: int | jax.Array = 0, attn_probs: bool = False,
                 pad: jax.Array | None = None, frozen: FrozenRows | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """x (B, T, D) -> (out (B, T, D), attention probabilities (B, H, T, S) in acc dtype if attn_probs else None).

        cos, sin: (T, K/2), or (B, T, K/2) per row with left padding; pad (B,) or None (causal_attention);
        frozen: the looped block under decode.halted_kv=freeze (FrozenRows picks c_kv, k_r per position)."""
        B, T, _ = x.shape
        H, nope, rope, vd = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).reshape(B, T, H, nope)
        q_rope = apply_rope(self.q_up_rope(c_q).reshape(B, T, H, rope), cos, sin)
        c_kv, k_r = jnp.split(self.kv_down(x), [self.kv_lora_rank], axis=-1)  # (B, S, kv_lora_rank), (B, S, rope)
        k_r = apply_rope(k_r.reshape(B, T, 1, rope), cos, sin)  # (B, S, 1, rope): one rotated key per token
        if frozen is not None:
            c_kv, k_r = frozen.select(c_kv, k_r)
        if cache is not None:
            c_kv, k_r = cache.write(layer, start_pos, c_kv=c_kv, k_r=k_r)  # all S positions of the cache
        S = c_kv.shape[1]
        k_nope, v = jnp.split(self.kv_up(self.kv_norm(c_kv)).reshape(B, S, H, nope + vd), [nope], axis=-1)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)  # (B, T, H, nope + rope)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_r, (B, S, H, rope))], axis=-1)  # (B, S, H, nope + rope)
        q_start = None if cache is None else start_pos
        # (B, T, H, vd); scale as open-mythos
        out, p = causal_attention(q, k, v, (nope + rope) ** -0.5, q_start, attn_probs=attn_probs, pad=pad,
                                  window=self.window)
        return self.wo(out.reshape(B, T, H * vd)), p
