"""The decoding cache (ARCHITECTURE.md section 6): every attention layer's keys and values, and the
compressor's per-step summaries, preallocated to a capacity of S positions (a pytree, returned updated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spec import Spec, cache_shapes


@jax.tree_util.register_pytree_node_class
class KVCache:
    """Decoding cache, a pytree of fixed capacity: for each attention layer (prelude 0..P-1, loop steps
    0..N-1, coda 0..C-1, on the leading axis L) the rows of positions 0..S-1 (S = capacity).

    GQA: `k` (after RoPE) and `v`, (L, B, S, H_kv, K) each. MLA: `c_kv` (L, B, S, R) and the rotated
    `k_r` (L, B, S, 1, rope), one per token; (L, B, S, H, rope) under openmythos-0.5, as upstream.
    With the compressor, per loop step: `summaries` (N, B, C, m, D) of every chunk and the rows of the
    chunk still open, `chunk_states` (N, B, c, D) (docs/components.md).
    `pad` (B,) int32: each row's left padding, set by the prefill's attention_mask (docs/semantics.md
    "Padding"); zeros: no padding.
    """

    def __init__(self, arrays: dict[str, jax.Array], n_loops: int, pad: jax.Array | None = None):
        self.arrays = dict(arrays)
        self.n_loops = n_loops
        self.pad = jnp.zeros(next(iter(self.arrays.values())).shape[1], dtype=jnp.int32) if pad is None else pad

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

    def summaries(self, step: int | jax.Array) -> jax.Array:
        """Loop step `step`'s compressor summaries of every chunk, (B, C, m, D) (unwritten chunks: zeros or stale)."""
        return jnp.take(self.arrays["summaries"], step, axis=0)

    def chunk_states(self, step: int | jax.Array) -> jax.Array:
        """Loop step `step`'s rows of the chunk still open, (B, c, D) (slot = position mod c)."""
        return jnp.take(self.arrays["chunk_states"], step, axis=0)

    def write_summaries(self, step: int | jax.Array, first: int | jax.Array, rows: jax.Array,
                        n: int | jax.Array) -> None:
        """Store rows[:, :n] (rows (B, J, m, D)) as the summaries of chunks first..first+n-1 of loop step `step`."""
        u = jnp.arange(rows.shape[1])
        chunks = jnp.where(u < n, first + u, self.arrays["summaries"].shape[2])  # rows past n go out of bounds: dropped
        # advanced indices first: the update is (J, B, m, D)
        self.arrays["summaries"] = self.arrays["summaries"].at[step, :, chunks].set(jnp.moveaxis(rows, 1, 0),
                                                                                     mode="drop")

    def write_chunk_states(self, step: int | jax.Array, rows: jax.Array) -> None:
        """Store the open chunk's rows (B, c, D) at slots 0..c-1 of loop step `step`."""
        self.arrays["chunk_states"] = jax.lax.dynamic_update_index_in_dim(self.arrays["chunk_states"], rows, step, 0)

    def copy(self) -> KVCache:
        """A new cache object holding the same arrays (writes to it leave this one unchanged)."""
        return KVCache(self.arrays, self.n_loops, self.pad)

    def tree_flatten(self) -> tuple[tuple[jax.Array, ...], tuple[tuple[str, ...], int]]:
        return (*self.arrays.values(), self.pad), (tuple(self.arrays), self.n_loops)

    @classmethod
    def tree_unflatten(cls, aux: tuple[tuple[str, ...], int], leaves: tuple[jax.Array, ...]) -> KVCache:
        cache = cls.__new__(cls)  # not __init__: jax may unflatten with placeholder leaves (no shapes)
        cache.arrays, cache.n_loops, cache.pad = dict(zip(aux[0], leaves[:-1])), aux[1], leaves[-1]
        return cache


def init_cache(spec: Spec, batch: int, max_len: int, n_loops: int, dtype: jnp.dtype) -> KVCache:
    """A zero KVCache for `batch` sequences of max_len positions and n_loops loop steps (spec.cache_shapes)."""
    shapes = cache_shapes(spec, batch, max_len, n_loops)
    return KVCache({n: jnp.zeros(shape, dtype=dtype) for n, shape in shapes.items()}, n_loops)
