"""The hypothesised components (ARCHITECTURE.md section 5; docs/components.md): cross-loop attention over
each position's own loop states, the context compressor (chunk summaries between loop steps, and their
decoding cache), and the memory gate on the recurrent update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .cache import KVCache
from .layers import RMSNorm, acc_dtype


def _linear(d_in: int, d_out: int, dtype: jnp.dtype, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class CrossLoopAttention(nnx.Module):
    """Attention(Q, K_prev, V_prev): h~ attends over its own position's depth memory [e, h_1, ..., h_t]."""

    def __init__(self, dim: int, n_heads: int, eps: float, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.q_norm = RMSNorm(dim, eps, dtype=dtype, rngs=rngs)
        self.kv_norm = RMSNorm(dim, eps, dtype=dtype, rngs=rngs)
        self.wq = _linear(dim, dim, dtype, rngs)
        self.wk = _linear(dim, dim, dtype, rngs)
        self.wv = _linear(dim, dim, dtype, rngs)
        self.wo = _linear(dim, dim, dtype, rngs)

    def entry(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A memory entry's key and value, (B, T, H, K) each, from RMSNorm(h): computed once per state."""
        x = self.kv_norm(h)
        split = lambda a: a.reshape(*a.shape[:-1], self.n_heads, -1)  # noqa: E731
        return split(self.wk(x)), split(self.wv(x))

    def __call__(self, x: jax.Array, k_mem: jax.Array, v_mem: jax.Array,
                 n_valid: jax.Array | None = None) -> jax.Array:
        """x (B, T, D) = h~, memory keys/values (M, B, T, H, K); entries m >= n_valid are masked."""
        q = self.wq(self.q_norm(x))
        q = q.reshape(*q.shape[:-1], self.n_heads, -1)  # (B, T, H, K)
        scores = jnp.einsum("bthk,mbthk->bthm", q, k_mem) * q.shape[-1] ** -0.5
        scores = scores.astype(acc_dtype(scores.dtype))  # softmax in float32 for bfloat16 (both twins)
        if n_valid is not None:
            scores = jnp.where(jnp.arange(k_mem.shape[0]) < n_valid, scores, jnp.array(-jnp.inf, scores.dtype))
        p = jax.nn.softmax(scores, axis=-1).astype(v_mem.dtype)
        out = jnp.einsum("bthm,mbthk->bthk", p, v_mem)
        return self.wo(out.reshape(*out.shape[:-2], -1))


class ContextCompressor(nnx.Module):
    """Chunk summaries: m learned queries attend over RMSNorm(h_t) of each complete chunk of c positions
    (write); at the next step h~ attends over the summaries of chunks ending before its own chunk began,
    plus a learned null slot (read)."""

    def __init__(self, dim: int, chunk: int, n_summaries: int, n_heads: int, eps: float, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.chunk = chunk
        self.n_heads = n_heads
        self.queries = nnx.Param(jnp.zeros((n_summaries, dim), dtype=dtype))  # write queries, (m, D)
        self.null_k = nnx.Param(jnp.zeros((dim,), dtype=dtype))  # the null slot's key and value (D,)
        self.null_v = nnx.Param(jnp.zeros((dim,), dtype=dtype))
        self.write_norm = RMSNorm(dim, eps, dtype=dtype, rngs=rngs)
        self.write_k = _linear(dim, dim, dtype, rngs)
        self.write_v = _linear(dim, dim, dtype, rngs)
        self.read_norm = RMSNorm(dim, eps, dtype=dtype, rngs=rngs)
        self.read_q = _linear(dim, dim, dtype, rngs)
        self.read_k = _linear(dim, dim, dtype, rngs)
        self.read_v = _linear(dim, dim, dtype, rngs)
        self.read_o = _linear(dim, dim, dtype, rngs)

    def _split(self, a: jax.Array) -> jax.Array:
        return a.reshape(*a.shape[:-1], self.n_heads, -1)

    def write(self, rows: jax.Array) -> jax.Array:
        """rows (B, J, c, D): the states of J complete chunks -> their summaries (B, J, m, D)."""
        x = self.write_norm(rows)
        k, v = self._split(self.write_k(x)), self._split(self.write_v(x))  # (B, J, c, H, K)
        q = self._split(self.queries[...])  # (m, H, K)
        scores = jnp.einsum("mhk,bjchk->bjhmc", q, k) * q.shape[-1] ** -0.5
        p = jax.nn.softmax(scores.astype(acc_dtype(scores.dtype)), axis=-1).astype(v.dtype)
        out = jnp.einsum("bjhmc,bjchk->bjmhk", p, v)
        return out.reshape(*out.shape[:-2], -1)  # (B, J, m, D)

    def read(self, x: jax.Array, summaries: jax.Array | None, n_visible: jax.Array) -> jax.Array:
        """x (B, T, D) = h~; summaries (B, J, m, D) or None; query i sees chunks j < n_visible[i] (T,)."""
        q = self._split(self.read_q(self.read_norm(x)))  # (B, T, H, K)
        scale = q.shape[-1] ** -0.5
        null_k, null_v = self._split(self.null_k[...]), self._split(self.null_v[...])
        scores = jnp.einsum("bthk,hk->bth", q, null_k)[..., None] * scale  # (B, T, H, 1)
        if summaries is not None:
            B, J, m, _ = summaries.shape
            k = self._split(self.read_k(summaries)).reshape(B, J * m, self.n_heads, -1)  # (B, J*m, H, K)
            v = self._split(self.read_v(summaries)).reshape(B, J * m, self.n_heads, -1)
            s = jnp.einsum("bthk,bnhk->bthn", q, k) * scale  # (B, T, H, J*m)
            chunk = jnp.repeat(jnp.arange(J), m)  # (J*m,) chunk of each summary
            visible = chunk[None, :] < n_visible[:, None]  # (T, J*m)
            s = jnp.where(visible[None, :, None, :], s, jnp.array(-jnp.inf, s.dtype))
            scores = jnp.concatenate([scores, s], axis=-1)
        p = jax.nn.softmax(scores.astype(acc_dtype(scores.dtype)), axis=-1).astype(x.dtype)  # (B, T, H, 1 + J*m)
        out = p[..., :1] * null_v  # (B, T, H, K)
        if summaries is not None:
            out = out + jnp.einsum("bthn,bnhk->bthk", p[..., 1:], v)
        return self.read_o(out.reshape(*out.shape[:-2], -1))

    def write_cached(self, h: jax.Array, t: jax.Array, cache: KVCache, start_pos: int | jax.Array) -> None:
        """Step t's write at decode time: h (B, T, D) are positions start_pos.. . Chunks completed by
        them get summaries in cache `summaries` (N, B, C, m, D); the rows of the chunk still open go to
        `chunk_states` (N, B, c, D), slot = position mod c, until it completes.

        start_pos may be traced: a static window of n = ceil((c + T) / c) chunks starting at the chunk of
        start_pos is summarised, and only its complete chunks are scattered into the cache.
        """
        c = self.chunk
        B, T, D = h.shape
        n = -(-(c + T) // c)
        start_pos = jnp.asarray(start_pos, jnp.int32)
        first, off = start_pos // c, start_pos % c  # the chunk holding start_pos, and its rows before it
        ring = cache.chunk_states(t)  # (B, c, D): slots < off are positions first*c..
        win = jnp.concatenate([ring, jnp.zeros((B, n * c, D), h.dtype)], axis=1)  # (B, (n + 1) c, D)
        zero = jnp.zeros((), jnp.int32)
        win = jax.lax.dynamic_update_slice(win, h, (zero, off, zero))  # row r: position first*c + r, r < off + T
        summ = self.write(win[:, :n * c].reshape(B, n, c, D))  # (B, n, m, D)
        cache.write_summaries(t, first, summ, (off + T) // c)  # the window's complete chunks
        cache.write_chunk_states(t, jax.lax.dynamic_slice_in_dim(win, (off + T) // c * c, c, axis=1))  # the open one


def _open_unit(x: jax.Array) -> jax.Array:
    """x clipped strictly inside (0, 1), as LTIInjection.decay: a no-op unless x rounds to 0 or 1."""
    fi = jnp.finfo(x.dtype)
    return jnp.clip(x, jnp.asarray(fi.tiny, dtype=x.dtype), jnp.asarray(1.0 - fi.eps / 2, dtype=x.dtype))


class MemoryGate(nnx.Module):
    """LSTM-like gates on the recurrent update: h' = f*A*h + B*e + g*o, f and g per channel from RMSNorm(h)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, eps, dtype=dtype, rngs=rngs)
        self.forget_gate = _linear(dim, dim, dtype, rngs, bias=True)
        self.input_gate = _linear(dim, dim, dtype, rngs, bias=True)

    def gates(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(f, g) = (sigmoid(RMSNorm(h) W_f + b_f), sigmoid(RMSNorm(h) W_i + b_i)), (B, T, D) each."""
        x = self.norm(h)
        return jax.nn.sigmoid(self.forget_gate(x)), jax.nn.sigmoid(self.input_gate(x))

    def decay(self, h: jax.Array, A: jax.Array) -> jax.Array:
        """The gated decay f*A (B, T, D), strictly inside (0, 1)."""
        return _open_unit(self.gates(h)[0] * A)

    def __call__(self, h: jax.Array, e: jax.Array, o: jax.Array, A: jax.Array, B: jax.Array) -> jax.Array:
        """h' = (f*A)*h + B*e + g*o; f*A stays strictly inside (0, 1), so the update is contractive in h."""
        f, g = self.gates(h)
        return _open_unit(f * A) * h + B * e + g * o
