"""The paged KV cache (docs/serving.md "The paged KV cache"): every cache the model has, in one pool of
blocks of block_size positions shared by all sequences; a sequence's block table lists its blocks in
position order (position p lives at offset p % block_size of block table[p // block_size]).

The bookkeeping (which blocks a sequence owns, prefix sharing, copy-on-write decisions) is
spec/paging.py; this file holds the arrays, a per-call view the model uses as its cache (PagedView, a
pytree), and paged_forward, which runs a batch of sequences at different lengths through the model's
left-padding machinery: start_pos = max(lengths), pad[b] = start_pos - lengths[b], so slot s of row b is
position s - pad[b], and row b's logits equal its solo dense-cache run.
"""

from __future__ import annotations

import functools
import numbers
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spec import Spec, cache_shapes
from spec.paging import build_block_tables, check_pairs, check_tables  # noqa: F401 (exported)

from .generate import TRACE_COUNTS, _split, _Static
from .model import ModelOutput, Mythos

def pool_shapes(spec: Spec, n_blocks: int, block_size: int, max_loops: int) -> dict[str, tuple[int, ...]]:
    """The pool's arrays by name and shape (the dense cache's, spec.cache_shapes, with blocks for sequences).

    Attention (L = P + max_loops + C layers): GQA `k`, `v` (L, n_blocks, block_size, H_kv, K); MLA `c_kv`
    (L, n_blocks, block_size, R) and `k_r` (L, n_blocks, block_size, 1 or H, rope). Compressor, per loop
    step: `summaries` (max_loops, n_blocks, block_size / c, m, D), the summary of chunk g at slot g % (bs / c)
    of block table[g // (bs / c)]; `chunk_states` (max_loops, n_blocks, block_size, D), one row per position.
    """
    shapes = {}
    for name, sh in cache_shapes(spec, 1, block_size, max_loops).items():
        if name == "chunk_states":  # per position, not a ring of c slots: a shared block carries its rows
            shapes[name] = (sh[0], n_blocks, block_size, sh[-1])
        else:
            shapes[name] = (sh[0], n_blocks, *sh[2:])
    return shapes


class PagedPool:
    """Every cache of `model` for n_blocks blocks of block_size positions, run with up to max_loops loop steps.

    arrays: pool_shapes' arrays in the model's dtype, zeros at first; paged_forward donates them and
    stores the updated ones (jax arrays are immutable); layers prelude 0..P-1, loop steps 0..max_loops-1,
    coda 0..C-1 on the leading axis.
    """

    def __init__(self, model: Mythos, n_blocks: int, block_size: int, max_loops: int):
        s = model.spec
        for name, v in (("n_blocks", n_blocks), ("block_size", block_size), ("max_loops", max_loops)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"PagedPool: {name}={v!r} must be an integer >= 1")
        cp = s.recurrent.compressor
        if cp.enabled and block_size % cp.chunk:
            raise ValueError(f"PagedPool: block_size={block_size} must be a multiple of recurrent.compressor.chunk="
                             f"{cp.chunk} (a block holds whole chunks, so a shared block carries their summaries)")
        if model.sharding is not None:
            raise ValueError("PagedPool: a sharded model (sharding.shard) is not supported; page an unsharded model")
        dtype = model.embed.embedding.dtype
        self.spec = s
        self._split: tuple | None = None  # (weakref to the model, static, leaves): see paged_forward
        self.n_blocks, self.block_size, self.max_loops = int(n_blocks), int(block_size), int(max_loops)
        self.n_prelude, self.n_coda = s.prelude_layers, s.coda_layers
        self.arrays = {n: jnp.zeros(sh, dtype=dtype)
                       for n, sh in pool_shapes(s, self.n_blocks, self.block_size, self.max_loops).items()}

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block holds, all arrays and layers together."""
        return sum(a.size // a.shape[1] * a.dtype.itemsize for a in self.arrays.values())

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block src -> block dst for each (src, dst), every array and layer."""
        src, dst = check_pairs(pairs, self.n_blocks)
        if src:
            self.arrays = _copy_blocks(self.arrays, jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32))


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_blocks(arrays: dict[str, jax.Array], src: jax.Array, dst: jax.Array) -> dict[str, jax.Array]:
    """Every array's blocks src copied to dst (the gather first: a chain a -> b, b -> c reads the old blocks)."""
    return {n: a.at[:, dst].set(a[:, src]) for n, a in arrays.items()}


class PagedView:
    """The cache the model sees for one paged_forward call: the KVCache methods on top of the pool (a pytree).

    Row b (block table row b, lengths[b] positions cached) sits at slots shifted by shift[b] = start_pos -
    lengths[b]: slot s is position s - shift[b]. write() stores the T new rows (B, T, ...) at positions
    lengths[b].. and returns all capacity = W * block_size slots (slots before shift[b]: position 0, masked
    as padding; slots past start_pos + T: stale rows, masked as the future). Loop layer P + t is pool layer
    P + t; coda layer P + N + j is pool layer P + max_loops + j. The compressor (equal lengths only) keeps
    its summaries per chunk and its open chunk's rows per position.
    """

    def __init__(self, arrays: dict[str, jax.Array], tables: jax.Array, lengths: jax.Array, n_loops: int,
                 geometry: tuple[int, ...]):
        self.arrays = dict(arrays)
        self.tables, self.lengths = tables, lengths  # (B, W), (B,) int32
        self.n_loops = n_loops
        # static: block_size, max_loops, P, C, compressor chunk (0: none), T (new tokens of the call)
        self.geometry = geometry
        self.pad = self.shift  # the model's _forward sets it to the padding it runs with

    @property
    def start_pos(self) -> jax.Array:
        return jnp.max(self.lengths)

    @property
    def shift(self) -> jax.Array:
        return self.start_pos - self.lengths  # (B,)

    @property
    def batch(self) -> int:
        return self.tables.shape[0]

    @property
    def capacity(self) -> int:
        return self.tables.shape[1] * self.geometry[0]

    @property
    def n_layers(self) -> int:
        return self.geometry[2] + self.n_loops + self.geometry[3]

    def _layer(self, layer: int | jax.Array) -> int | jax.Array:
        """The pool layer of the model's layer index (coda P + N + j -> P + max_loops + j)."""
        P, N, M = self.geometry[2], self.n_loops, self.geometry[1]
        if isinstance(layer, int):
            return layer if layer < P + N else layer - N + M
        return jnp.where(layer < P + N, layer, layer - N + M)

    def _blocks(self, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Blocks and offsets (B, n) of positions pos (B, n) (clipped to the table: masked slots)."""
        bs, W = self.geometry[0], self.tables.shape[1]
        pos = jnp.clip(pos, 0, W * bs - 1)
        return jnp.take_along_axis(self.tables, pos // bs, axis=1), pos % bs

    def write(self, layer: int | jax.Array, start_pos: int | jax.Array, **rows: jax.Array) -> tuple[jax.Array, ...]:
        """Store rows (B, T, ...) at positions lengths.. of `layer`; return its rows at all capacity slots (B, S, ...)."""
        L = self._layer(layer)
        T = next(iter(rows.values())).shape[1]
        blk, off = self._blocks(self.lengths[:, None] + jnp.arange(T, dtype=jnp.int32))  # (B, T) the new rows
        rblk, roff = self._blocks(jnp.arange(self.capacity, dtype=jnp.int32)[None, :] - self.shift[:, None])
        out = []
        for name, r in rows.items():
            buf = self.arrays[name]  # (L, n_blocks, block_size, ...)
            r = jnp.broadcast_to(r, (*r.shape[:2], *buf.shape[3:])).astype(buf.dtype)  # (B, T, 1, rope) per head
            buf = buf.at[L, blk, off].set(r)  # in place under jit (donated, or carried by the loop)
            self.arrays[name] = buf
            out.append(buf[L, rblk, roff])
        return tuple(out)

    def summaries(self, step: int | jax.Array) -> jax.Array:
        """Loop step `step`'s compressor summaries of every chunk of the table, (B, W * block_size / c, m, D)."""
        s = jnp.take(self.arrays["summaries"], step, axis=0)[self.tables]  # (B, W, bs / c, m, D)
        return s.reshape(s.shape[0], -1, *s.shape[3:])

    def _chunk_rows(self, first: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The positions (B, c) of chunk `first` and their blocks and offsets (B, c)."""
        c = self.geometry[4]
        p = jnp.broadcast_to(first * c + jnp.arange(c, dtype=jnp.int32), (self.batch, c))
        return (p, *self._blocks(p))

    def chunk_states(self, step: int | jax.Array) -> jax.Array:
        """Loop step `step`'s rows of the chunk holding start_pos, (B, c, D) (slot = position mod c)."""
        _, blk, off = self._chunk_rows(self.start_pos // self.geometry[4])
        return self.arrays["chunk_states"][step, blk, off]

    def write_summaries(self, step: int | jax.Array, first: int | jax.Array, rows: jax.Array,
                        n: int | jax.Array) -> None:
        """Store rows[:, :n] (rows (B, J, m, D)) as the summaries of chunks first..first+n-1 of loop step `step`."""
        a = self.arrays["summaries"]
        per, J = a.shape[2], rows.shape[1]  # chunks per block
        u = jnp.arange(J, dtype=jnp.int32)
        g = jnp.broadcast_to(first + u, (self.batch, J))
        blk = jnp.take_along_axis(self.tables, jnp.clip(g // per, 0, self.tables.shape[1] - 1), axis=1)
        blk = jnp.where(u < n, blk, a.shape[1])  # rows past n go out of bounds: dropped
        self.arrays["summaries"] = a.at[step, blk, g % per].set(rows.astype(a.dtype), mode="drop")

    def write_chunk_states(self, step: int | jax.Array, rows: jax.Array) -> None:
        """Store the open chunk's rows (B, c, D), positions from the chunk of start_pos + T on; only the new ones."""
        a = self.arrays["chunk_states"]
        T = self.geometry[5]
        p, blk, off = self._chunk_rows((self.start_pos + T) // self.geometry[4])
        new = (p >= self.lengths[:, None]) & (p < self.lengths[:, None] + T)  # rows before: stored already
        blk = jnp.where(new, blk, a.shape[1])  # out of bounds: dropped
        self.arrays["chunk_states"] = a.at[step, blk, off].set(rows.astype(a.dtype), mode="drop")

    def copy(self) -> PagedView:
        """A new view holding the same arrays (writes to it leave this one unchanged)."""
        view = PagedView(self.arrays, self.tables, self.lengths, self.n_loops, self.geometry)
        view.pad = self.pad
        return view



def _flatten(view: PagedView) -> tuple[tuple[jax.Array, ...], tuple[tuple[str, ...], int, tuple[int, ...]]]:
    """PagedView as pytree leaves (arrays, tables, lengths, pad) and static aux (names, n_loops, geometry)."""
    return (*view.arrays.values(), view.tables, view.lengths, view.pad), (tuple(view.arrays), view.n_loops,
                                                                          view.geometry)


def _unflatten(aux: tuple[tuple[str, ...], int, tuple[int, ...]], leaves: tuple[jax.Array, ...]) -> PagedView:
    view = PagedView.__new__(PagedView)  # not __init__: jax may unflatten with placeholder leaves (no shapes)
    names, view.n_loops, view.geometry = aux
    view.arrays = dict(zip(names, leaves[:-3]))
    view.tables, view.lengths, view.pad = leaves[-3:]
    return view


# a pytree: the view rides in the loop's carry (lax.scan / while_loop) and in jit's arguments and results
jax.tree_util.register_pytree_node(PagedView, _flatten, _unflatten)


def paged_forward(model: Mythos, pool: PagedPool, ids: jax.Array, block_tables: np.ndarray,
                  lengths: np.ndarray, n_loops: int) -> ModelOutput:
    """Run T new tokens of B sequences against their cached positions in the pool, writing their rows.

    Args:
        model: the Mythos the pool was built for.
        pool: a PagedPool(model, ...); its arrays are donated and replaced by the updated ones.
        ids: (B, T) token ids; row b's sit at positions lengths[b] .. lengths[b] + T - 1.
        block_tables: (B, W) int, row b's blocks in position order (W * block_size >= lengths + T; entries
            past its last block: any value). W is rounded up to a power of two, so decode steps share
            one compiled program per (B, T, n_loops) until a row needs twice the blocks.
        lengths: (B,) int, tokens already cached for each row.
        n_loops: loop steps N of this call, 1..pool.max_loops.
    Returns:
        ModelOutput(logits (B, T, V), loop_counts, halted, n_steps, traces, cache=None, values); row b equals
        its solo dense-cache run. The pool's arrays hold the new rows.
    """
    if model.spec != pool.spec:
        raise ValueError("pool was built for another spec than the model's (PagedPool(model, ...))")
    ids = model._check_ids(jnp.asarray(ids))
    B, T = ids.shape
    if isinstance(n_loops, bool) or not isinstance(n_loops, numbers.Integral) or not 1 <= n_loops <= pool.max_loops:
        raise ValueError(f"n_loops={n_loops!r} must be an integer in 1..max_loops={pool.max_loops} (the pool's)")
    tables, lengths = check_tables(pool, block_tables, lengths, B, T)
    W = 1 << (tables.shape[1] - 1).bit_length()  # a power of two: shapes repeat
    tables = np.pad(tables, ((0, 0), (0, W - tables.shape[1])))
    cp = pool.spec.recurrent.compressor
    geometry = (pool.block_size, pool.max_loops, pool.n_prelude, pool.n_coda, cp.chunk if cp.enabled else 0, T)
    padded = len(set(lengths.tolist())) > 1
    # the model split once per pool and model (nnx.split walks the whole graph, ~2 ms a call on tiny): the pool
    # serves the weights the model had at its first call; a model whose weights change needs a new pool
    if pool._split is None or pool._split[0]() is not model:
        pool._split = (weakref.ref(model), *_split(model))
    out, pool.arrays = _paged_forward(*pool._split[1:], pool.arrays, ids, jnp.asarray(tables, jnp.int32),
                                      jnp.asarray(lengths, jnp.int32), int(n_loops), geometry, padded)
    return out


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8), donate_argnums=(2,))
def _paged_forward(static: _Static, leaves: list[jax.Array], arrays: dict[str, jax.Array], ids: jax.Array,
                   tables: jax.Array, lengths: jax.Array, n_loops: int, geometry: tuple[int, ...], padded: bool
                   ) -> tuple[ModelOutput, dict[str, jax.Array]]:
    """paged_forward's compiled step, once per shapes (B, T, W), n_loops and padded (some row shorter than
    another: the left-padding program); lengths are traced, so every decode step reuses it. -> (ModelOutput
    without its cache, the pool's updated arrays)."""
    TRACE_COUNTS["paged_forward"] += 1
    graphdef, treedef = static.value
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    view = PagedView(arrays, tables, lengths, n_loops, geometry)
    pad = view.shift if padded else None
    # early_exit: honoured under decode.halted_kv=freeze (the skipped steps get frozen rows), else every step runs
    out = model._forward(ids, n_loops, True, None, None, view, view.start_pos, pad=pad)
    return out._replace(cache=None), out.cache.arrays
