"""The paged KV cache (docs/serving.md "The paged KV cache"): every cache the model has, in one pool of
blocks of block_size positions shared by all sequences; a sequence's block table lists its blocks in
position order (position p lives at offset p % block_size of block table[p // block_size]).

The bookkeeping (which blocks a sequence owns, prefix sharing, copy-on-write decisions) is
spec/paging.py; this file holds the tensors, a per-call view the model uses as its cache (PagedView),
and paged_forward, which runs a batch of sequences at different lengths through the model's left-padding
machinery: start_pos = max(lengths), pad[b] = start_pos - lengths[b], so slot s of row b is position
s - pad[b], and row b's logits equal its solo dense-cache run.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np
import torch

from spec import Spec, cache_shapes
from spec.paging import build_block_tables, check_pairs, check_tables  # noqa: F401 (exported)

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

    arrays: pool_shapes' arrays in the model's dtype and device, zeros at first, updated in place by
    paged_forward; layers prelude 0..P-1, loop steps 0..max_loops-1, coda 0..C-1 on the leading axis.
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
        w = model.embed.weight
        self.spec = s
        self.n_blocks, self.block_size, self.max_loops = int(n_blocks), int(block_size), int(max_loops)
        self.n_prelude, self.n_coda = s.prelude_layers, s.coda_layers
        self.arrays = {n: torch.zeros(sh, dtype=w.dtype, device=w.device)
                       for n, sh in pool_shapes(s, self.n_blocks, self.block_size, self.max_loops).items()}

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block holds, all arrays and layers together."""
        return sum(a[:, 0].numel() * a.element_size() for a in self.arrays.values())

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block src -> block dst for each (src, dst), every array and layer, in place."""
        src, dst = check_pairs(pairs, self.n_blocks)
        if not src:
            return
        dev = next(iter(self.arrays.values())).device
        s, d = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
        for a in self.arrays.values():
            a[:, d] = a[:, s]  # the gather copies first: a pair chain (a -> b, b -> c) reads the old blocks


class PagedView:
    """The cache the model sees for one paged_forward call: the KVCache methods on top of the pool.

    Row b (block table row b, lengths[b] positions cached) sits at slots shifted by shift[b] = start_pos -
    lengths[b]: slot s is position s - shift[b]. write() stores the T new rows (B, T, ...) at positions
    lengths[b].. and returns slots 0..start_pos+T-1 (slots before shift[b]: position 0, masked as padding).
    Loop layer P + t is pool layer P + t; coda layer P + N + j is pool layer P + max_loops + j. The
    compressor (equal lengths only) keeps its summaries per chunk and its open chunk's rows per position.
    """

    def __init__(self, arrays: dict[str, torch.Tensor], tables: torch.Tensor, lengths: torch.Tensor, n_loops: int,
                 geometry: tuple[int, ...]):
        self.arrays = arrays  # the pool's, written in place
        self.tables, self.lengths = tables, lengths  # (B, W), (B,) int64
        self.n_loops = n_loops
        # block_size, max_loops, P, C, compressor chunk (0: none), T (new tokens of the call)
        self.geometry = geometry
        self._start = int(lengths.max())
        self.pad = self.shift  # the model's _forward sets it to the padding it runs with
        T = geometry[5]
        self._new = self._blocks(lengths[:, None] + torch.arange(T, device=tables.device))  # (B, T) the new rows
        self._read = self._blocks(torch.arange(self._start + T, device=tables.device)[None, :] - self.shift[:, None])

    @property
    def start_pos(self) -> int:
        return self._start

    @property
    def shift(self) -> torch.Tensor:
        return self._start - self.lengths  # (B,)

    @property
    def batch(self) -> int:
        return self.tables.shape[0]

    @property
    def capacity(self) -> int:
        return self.tables.shape[1] * self.geometry[0]

    @property
    def n_layers(self) -> int:
        return self.geometry[2] + self.n_loops + self.geometry[3]

    def _layer(self, layer: int) -> int:
        """The pool layer of the model's layer index (coda P + N + j -> P + max_loops + j)."""
        P, N, M = self.geometry[2], self.n_loops, self.geometry[1]
        return layer if layer < P + N else layer - N + M

    def _blocks(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks and offsets (B, n) of positions pos (B, n) (clipped to the table: masked slots)."""
        bs, W = self.geometry[0], self.tables.shape[1]
        pos = pos.clamp(0, W * bs - 1)
        return self.tables.gather(1, pos // bs), pos % bs

    def write(self, layer: int, start_pos: int, **rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store rows (B, T, ...) at positions lengths.. of `layer`; return its slots 0..start_pos+T-1 (B, S, ...)."""
        out = []
        for name, r in rows.items():
            buf = self.arrays[name][self._layer(layer)]  # (n_blocks, block_size, ...), a view
            buf[self._new] = r  # in place; a (B, T, 1, rope) key broadcasts to a per-head layout
            out.append(buf[self._read])
        return tuple(out)

    def summaries(self, step: int) -> torch.Tensor:
        """Loop step `step`'s compressor summaries of every chunk of the table, (B, W * block_size / c, m, D)."""
        return self.arrays["summaries"][step][self.tables].flatten(1, 2)  # from (B, W, bs / c, m, D)

    def _chunk_rows(self, first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positions (B, c) of chunk `first` and their blocks and offsets (B, c)."""
        c = self.geometry[4]
        p = (first * c + torch.arange(c, device=self.tables.device)).expand(self.batch, c)
        return (p, *self._blocks(p))

    def chunk_states(self, step: int) -> torch.Tensor:
        """Loop step `step`'s rows of the chunk holding start_pos, (B, c, D) (slot = position mod c)."""
        _, blk, off = self._chunk_rows(self._start // self.geometry[4])
        return self.arrays["chunk_states"][step][blk, off]

    def write_summaries(self, step: int, first: int, rows: torch.Tensor, n: int) -> None:
        """Store rows[:, :n] (rows (B, J, m, D)) as the summaries of chunks first..first+n-1 of loop step `step`."""
        per = self.arrays["summaries"].shape[2]  # chunks per block
        g = first + torch.arange(n, device=self.tables.device)
        self.arrays["summaries"][step][self.tables[:, g // per], g % per] = rows[:, :n]

    def write_chunk_states(self, step: int, rows: torch.Tensor) -> None:
        """Store the open chunk's rows (B, r, D), positions from the chunk of start_pos + T on; only the new ones."""
        c, T = self.geometry[4], self.geometry[5]
        first = (self._start + T) // c
        _, blk, off = self._chunk_rows(first)
        keep = slice(max(0, self._start - first * c), rows.shape[1])  # rows before start_pos are stored already
        self.arrays["chunk_states"][step][blk[:, keep], off[:, keep]] = rows[:, keep]

    def copy(self) -> PagedView:
        """A new view over the same arrays (the torch cache is written in place: it shares the writes)."""
        view = PagedView(self.arrays, self.tables, self.lengths, self.n_loops, self.geometry)
        view.pad = self.pad
        return view


def paged_forward(model: Mythos, pool: PagedPool, ids: torch.Tensor, block_tables: np.ndarray,
                  lengths: np.ndarray, n_loops: int) -> ModelOutput:
    """Run T new tokens of B sequences against their cached positions in the pool, writing their rows.

    Args:
        model: the Mythos the pool was built for.
        pool: a PagedPool(model, ...).
        ids: (B, T) token ids; row b's sit at positions lengths[b] .. lengths[b] + T - 1.
        block_tables: (B, W) int, row b's blocks in position order (W * block_size >= lengths + T; entries
            past its last block: any value).
        lengths: (B,) int, tokens already cached for each row.
        n_loops: loop steps N of this call, 1..pool.max_loops.
    Returns:
        ModelOutput(logits (B, T, V), loop_counts, halted, n_steps, traces, cache=None, values); row b equals
        its solo dense-cache run. The pool's arrays hold the new rows.
    """
    if model.spec != pool.spec:
        raise ValueError("pool was built for another spec than the model's (PagedPool(model, ...))")
    ids = model._check_ids(ids)
    B, T = ids.shape
    if isinstance(n_loops, bool) or not isinstance(n_loops, numbers.Integral) or not 1 <= n_loops <= pool.max_loops:
        raise ValueError(f"n_loops={n_loops!r} must be an integer in 1..max_loops={pool.max_loops} (the pool's)")
    tables, lengths = check_tables(pool, block_tables, lengths, B, T)
    dev = model.embed.weight.device
    cp = pool.spec.recurrent.compressor
    geometry = (pool.block_size, pool.max_loops, pool.n_prelude, pool.n_coda, cp.chunk if cp.enabled else 0, T)
    view = PagedView(pool.arrays, torch.from_numpy(tables).to(dev), torch.from_numpy(lengths).to(dev), int(n_loops),
                     geometry)
    pad = view.shift.clone() if bool(view.shift.any()) else None
    with torch.no_grad():
        # early_exit: honoured under decode.halted_kv=freeze (the skipped steps get frozen rows), else every step runs
        out = model._forward(ids, int(n_loops), True, None, None, view, view.start_pos, pad=pad)
    return out._replace(cache=None)
