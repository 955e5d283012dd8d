"""Block bookkeeping of the paged KV cache (docs/serving.md "Continuous batching"), framework-free.

The tensors live in each twin's PagedPool (mythos_torch/paged.py, mythos_jax/paged.py); this file only
says which of its n_blocks blocks of block_size positions each sequence owns, in position order (its
block table). A block is in exactly one of three states:

    free        ref 0, on the free list, holds nothing worth keeping
    referenced  ref >= 1: held by that many block tables (fork shares blocks between sequences)
    evictable   ref 0, but a FULL block in the prefix cache: a later sequence with the same prefix takes
                it back (no recompute); evicted least recently used when the free list runs dry

The prefix cache maps (key, the token ids of the whole prefix up to the block's end) to a full block,
where key is whatever else changes the cached rows (the engine passes the request's loop count N:
rows computed with N loop steps differ from rows computed with another N). A block enters it when
commit() fills it. Writes only ever go to positions at or past a sequence's length; a block about to
be written that another table also holds (a fork's shared partial block) or that the prefix cache
holds is copied first (copy-on-write): reserve() returns those (src, dst) copies for the pool.
"""

from __future__ import annotations

import collections
import numbers
from typing import Hashable, Sequence

import numpy as np


class _Seq:
    """One sequence's state: its block table, the tokens whose rows are written, its prefix-cache key."""

    def __init__(self, key: Hashable):
        self.key = key
        self.table: list[int] = []
        self.tokens: list[int] = []  # the token ids of positions 0..length-1 (rows written)
        self.n_hashed = 0  # leading full blocks already offered to the prefix cache


class BlockManager:
    """Free list, block tables, reference counts and the prefix cache of n_blocks blocks of block_size
    positions (module docstring). Sequence ids are any hashable values (the engine uses request ids)."""

    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = True):
        for name, v in (("n_blocks", n_blocks), ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        self.n_blocks = int(n_blocks)
        self.block_size = int(block_size)
        self.prefix_caching = bool(prefix_caching)
        self.free_list: collections.deque[int] = collections.deque(range(self.n_blocks))
        self.ref = [0] * self.n_blocks
        self.cache: dict[tuple, int] = {}  # (key, prefix token ids) -> full block
        self.block_key: dict[int, tuple] = {}  # the inverse of cache
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self.seqs: dict[Hashable, _Seq] = {}

    # ----------------------------------------------------------------------------- queries

    @property
    def n_free(self) -> int:
        """Blocks a reserve can take: the free list and the evictable cached blocks."""
        return len(self.free_list) + len(self.evictable)

    @property
    def n_used(self) -> int:
        """Blocks held by at least one block table."""
        return self.n_blocks - self.n_free

    @property
    def n_evictable(self) -> int:
        return len(self.evictable)

    def __contains__(self, seq: Hashable) -> bool:
        return seq in self.seqs

    def block_table(self, seq: Hashable) -> list[int]:
        """seq's blocks in position order (a copy): position p lives in block_table[p // block_size]."""
        return list(self._seq(seq).table)

    def length(self, seq: Hashable) -> int:
        """Positions of seq whose rows are written (committed)."""
        return len(self._seq(seq).tokens)

    def blocks_needed(self, n_tokens: int) -> int:
        """Blocks that hold n_tokens positions."""
        return -(-n_tokens // self.block_size)

    # ----------------------------------------------------------------------------- sequences

    def add(self, seq: Hashable, prompt: Sequence[int], key: Hashable = None) -> int:
        """Start seq with the prompt's token ids; take the longest run of its leading FULL blocks from the
        prefix cache (same key, same tokens). Returns n_cached, the prompt tokens those blocks hold: the
        caller computes prompt[n_cached:] (after reserve). At least the last prompt token is always left
        to compute (it yields the first logits), and n_cached is a multiple of block_size, so the first
        write starts a fresh block."""
        if seq in self.seqs:
            raise ValueError(f"sequence {seq!r} is already in the block manager")
        if len(prompt) < 1:
            raise ValueError("prompt must hold at least one token id")
        s = _Seq(key)
        self.seqs[seq] = s
        if not self.prefix_caching:
            return 0
        prompt = [int(t) for t in prompt]
        bs = self.block_size
        for i in range((len(prompt) - 1) // bs):
            b = self.cache.get((key, tuple(prompt[:(i + 1) * bs])))
            if b is None:
                break
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
            s.table.append(b)
        s.n_hashed = len(s.table)
        s.tokens = prompt[:len(s.table) * bs]
        return len(s.tokens)

    def reserve(self, seq: Hashable, n: int) -> list[tuple[int, int]] | None:
        """Room for n more tokens of seq (positions length..length+n-1): new blocks at the end of its table,
        and a private copy of every block in that range that is shared or cached (copy-on-write).
        Returns the copies (src, dst) the pool must apply before the write (often []), or None, changing
        nothing, when there are not enough free or evictable blocks."""
        s = self._seq(seq)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"n={n!r} must be an integer >= 0")
        bs, length = self.block_size, len(s.tokens)
        end = self.blocks_needed(length + n)
        written = range(length // bs, min(end, len(s.table))) if n else range(0)
        shared = [i for i in written if self.ref[s.table[i]] > 1 or s.table[i] in self.block_key]
        grow = max(0, end - len(s.table))
        if len(shared) + grow > self.n_free:
            return None
        copies = []
        for i in shared:
            src, dst = s.table[i], self._take()  # take dst first: src may become evictable below
            copies.append((src, dst))
            s.table[i] = dst
            self._drop(src)
        for _ in range(grow):
            s.table.append(self._take())
        return copies

    def commit(self, seq: Hashable, tokens: Sequence[int]) -> None:
        """The rows of seq's next len(tokens) positions are written: its blocks that are now full enter the
        prefix cache (unless one with the same key and prefix is already there)."""
        s = self._seq(seq)
        if len(s.tokens) + len(tokens) > len(s.table) * self.block_size:
            raise ValueError(f"commit of {len(tokens)} tokens past sequence {seq!r}'s reserved "
                             f"{len(s.table) * self.block_size} positions ({len(s.tokens)} written): reserve first")
        s.tokens.extend(int(t) for t in tokens)
        n_full = len(s.tokens) // self.block_size
        if self.prefix_caching:
            for i in range(s.n_hashed, n_full):
                k = (s.key, tuple(s.tokens[:(i + 1) * self.block_size]))
                b = s.table[i]
                if k not in self.cache and b not in self.block_key:
                    self.cache[k] = b
                    self.block_key[b] = k
        s.n_hashed = max(s.n_hashed, n_full)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """child starts as a copy of parent sharing all its blocks (ref counts rise); the first write to a
        shared partial block copies it (reserve)."""
        p = self._seq(parent)
        if child in self.seqs:
            raise ValueError(f"sequence {child!r} is already in the block manager")
        c = _Seq(p.key)
        c.table, c.tokens, c.n_hashed = list(p.table), list(p.tokens), p.n_hashed
        for b in c.table:
            self.ref[b] += 1
        self.seqs[child] = c

    def free(self, seq: Hashable) -> None:
        """Drop seq: its blocks' ref counts fall; a block no table holds goes back to the free list, or, if
        cached, becomes evictable (the sequence's tail blocks first in eviction order)."""
        s = self.seqs.pop(seq, None)
        if s is None:
            raise ValueError(f"unknown sequence {seq!r}")
        for b in reversed(s.table):
            self._drop(b)

    def check(self) -> None:
        """Assert the invariants: every block is free xor referenced xor evictable; ref counts equal the
        number of tables holding each block; no block twice on the free list; the prefix cache is a
        bijection of full blocks; every table covers its written positions."""
        count = [0] * self.n_blocks
        for seq, s in self.seqs.items():
            for b in s.table:
                count[b] += 1
            assert len(s.tokens) <= len(s.table) * self.block_size, f"{seq!r}: written past its table"
            assert s.n_hashed * self.block_size <= len(s.tokens), f"{seq!r}: n_hashed past its full blocks"
        assert count == self.ref, f"ref counts {self.ref} != table counts {count}"
        free = list(self.free_list)
        assert len(free) == len(set(free)), "a block is twice on the free list"
        free_set = set(free)
        for b in range(self.n_blocks):
            states = (b in free_set, self.ref[b] > 0, b in self.evictable)
            assert sum(states) == 1, f"block {b}: free/referenced/evictable = {states}"
        for b in self.evictable:
            assert b in self.block_key, f"evictable block {b} is not in the prefix cache"
        for b in free:
            assert b not in self.block_key, f"free block {b} is still in the prefix cache"
        assert len(self.cache) == len(self.block_key)
        for k, b in self.cache.items():
            assert self.block_key.get(b) == k, f"prefix cache entry of block {b} disagrees with its key"
            assert len(k[1]) % self.block_size == 0, f"block {b} cached with a partial prefix"

    # ----------------------------------------------------------------------------- internals

    def _seq(self, seq: Hashable) -> _Seq:
        s = self.seqs.get(seq)
        if s is None:
            raise ValueError(f"unknown sequence {seq!r} (add it first)")
        return s

    def _take(self) -> int:
        """A block for writing, ref 1: from the free list, else the least recently used evictable one."""
        if self.free_list:
            b = self.free_list.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.cache[self.block_key.pop(b)]
        self.ref[b] = 1
        return b

    def _drop(self, b: int) -> None:
        """One table fewer holds block b."""
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if b in self.block_key:
                self.evictable[b] = None
            else:
                self.free_list.append(b)


# --------------------------------------------------------------------------- checks of both twins' paged calls


def check_tables(pool: object, block_tables: np.ndarray, lengths: np.ndarray, B: int, T: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """block_tables (B, W) and lengths (B,) as int64 arrays for a paged_forward call on pool (either twin's
    PagedPool: its block_size, n_blocks and spec) after checking them against a call of T new
    tokens per row, or a clear ValueError naming the row. Table entries past a row's last needed block
    (any value) come back as 0."""
    bs, nb = pool.block_size, pool.n_blocks
    tables, lengths = np.asarray(block_tables), np.asarray(lengths)
    for name, a, nd in (("block_tables", tables, 2), ("lengths", lengths, 1)):
        if a.dtype == bool or not np.issubdtype(a.dtype, np.integer) or a.ndim != nd:
            raise ValueError(f"{name} must be a {nd}-d integer array, got dtype {a.dtype} and shape {a.shape}")
    if tables.shape[0] != B or lengths.shape != (B,):
        raise ValueError(f"block_tables {tables.shape} and lengths {lengths.shape} must have B={B} rows (ids' batch)")
    tables, lengths = tables.astype(np.int64), lengths.astype(np.int64)
    W = tables.shape[1]
    seen: dict[int, int] = {}
    for b in range(B):
        n, end = int(lengths[b]), int(lengths[b]) + T
        if n < 0:
            raise ValueError(f"lengths[{b}]={n} must be >= 0 (tokens already cached for row {b})")
        if end > pool.spec.max_seq_len:
            raise ValueError(f"row {b}: lengths[{b}]={n} + T={T} positions exceed max_seq_len={pool.spec.max_seq_len}")
        need = -(-end // bs)
        if need > W:
            raise ValueError(f"row {b}: lengths[{b}]={n} + T={T} positions need {need} blocks of block_size={bs}, "
                             f"block_tables has W={W} (W * block_size >= lengths + T)")
        bad = [int(x) for x in tables[b, :need] if not 0 <= x < nb]
        if bad:
            raise ValueError(f"block_tables row {b}: entries {bad} are not block ids in 0..n_blocks-1={nb - 1}")
        for blk in sorted({int(x) for x in tables[b, n // bs:need]}):  # the blocks this call writes
            if seen.setdefault(blk, b) != b:
                raise ValueError(f"block_tables rows {seen[blk]} and {b} both write block {blk} in this call: a block "
                                 "written belongs to one row (copy_blocks a shared one first)")
        tables[b, need:] = 0
    if pool.spec.recurrent.compressor.enabled and len(set(lengths.tolist())) > 1:
        raise ValueError(f"recurrent.compressor needs every row at the same length in one call, got lengths "
                         f"{lengths.tolist()} (its chunks start at absolute positions; run such rows in separate calls)")
    return tables, lengths


def build_block_tables(blocks: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
    """(B, W) int64 block tables from each row's block ids in position order, 0 past a row's last block
    (W = width, or the longest row's count when None)."""
    rows = [[int(x) for x in r] for r in blocks]
    W = max((len(r) for r in rows), default=0) if width is None else int(width)
    if any(len(r) > W for r in rows):
        raise ValueError(f"width={width} is less than a row's {max(len(r) for r in rows)} blocks")
    out = np.zeros((len(rows), W), dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


def check_pairs(pairs: Sequence[tuple[int, int]], n_blocks: int) -> tuple[list[int], list[int]]:
    """A PagedPool.copy_blocks call's (src, dst) pairs as two lists of block ids, or a clear ValueError."""
    src, dst = [], []
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in pair):
            raise ValueError(f"copy_blocks: pairs[{i}]={pair!r} must be (src, dst) block ids")
        for name, x in zip(("src", "dst"), pair):
            if not 0 <= x < n_blocks:
                raise ValueError(f"copy_blocks: pairs[{i}] {name}={x} is not a block id in 0..n_blocks-1={n_blocks - 1}")
        src.append(int(pair[0]))
        dst.append(int(pair[1]))
    if len(set(dst)) != len(dst):
        raise ValueError(f"copy_blocks: a dst block appears twice in {list(zip(src, dst))}")
    return src, dst
