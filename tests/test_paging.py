"""spec/paging.py, the paged cache's block bookkeeping: unit cases and a hypothesis state machine that
simulates the pool's contents (each slot holds the (key, token) written there), so a write into a block
another sequence still reads, an eviction of a block in use, or a lost copy-on-write shows up as a
sequence reading back tokens it never wrote."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from spec.paging import BlockManager


def fill(bm: BlockManager, seq: str, prompt: list[int], key: object = 4) -> int:
    """The engine's admission: add, reserve the uncached rest, commit it; -> n_cached."""
    n = bm.add(seq, prompt, key)
    assert bm.reserve(seq, len(prompt) - n) is not None
    bm.commit(seq, prompt[n:])
    return n


def test_prefix_hits_full_blocks_and_leaves_the_last_token():
    bm = BlockManager(12, 4)
    assert fill(bm, "a", list(range(10))) == 0
    assert bm.length("a") == 10 and len(bm.block_table("a")) == 3
    assert fill(bm, "b", list(range(10)) + [7]) == 8  # two full blocks shared
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    assert fill(bm, "c", list(range(8))) == 4  # a fully cached 8-token prompt still computes its last block
    assert fill(bm, "d", list(range(10)), key=5) == 0  # another loop count: nothing shared
    assert fill(bm, "e", [1] + list(range(1, 10))) == 0  # the first block differs: nothing after it is shared
    bm.check()


def test_free_keeps_cached_blocks_and_evicts_lru_tail_first():
    bm = BlockManager(4, 2)
    fill(bm, "a", [1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] full and cached, [5] partial
    bm.free("a")
    assert bm.n_free == 4 and bm.n_evictable == 2
    bm.check()
    fill(bm, "b", [9, 9, 9, 9, 9])  # 3 blocks: the 2 free ones, then evicts the tail cached block [3,4] first
    assert bm.n_evictable == 1
    bm.free("b")
    assert fill(bm, "c", [1, 2, 3, 4, 6]) == 2  # [1,2] survived, [3,4] was evicted
    bm.check()


def test_fork_copies_a_shared_partial_block_on_write():
    bm = BlockManager(6, 4)
    fill(bm, "p", [1, 2, 3, 4, 5, 6])
    bm.fork("p", "c")
    assert bm.ref[bm.block_table("p")[1]] == 2
    copies = bm.reserve("c", 1)
    assert len(copies) == 1 and copies[0][0] == bm.block_table("p")[1] and copies[0][1] == bm.block_table("c")[1]
    assert bm.block_table("c")[0] == bm.block_table("p")[0]  # the full block stays shared
    assert bm.reserve("p", 1) == []  # the parent now holds its partial block alone
    bm.check()
    bm.free("p"), bm.free("c")
    assert bm.n_free == 6
    bm.check()


def test_out_of_blocks_changes_nothing():
    bm = BlockManager(3, 2)
    fill(bm, "a", [1, 2, 3])
    table, n_free = bm.block_table("a"), bm.n_free
    assert bm.reserve("a", 10) is None
    assert bm.block_table("a") == table and bm.n_free == n_free
    bm.check()


def test_bad_calls_are_clear_errors():
    with pytest.raises(ValueError, match="block_size=0"):
        BlockManager(4, 0)
    bm = BlockManager(4, 2)
    with pytest.raises(ValueError, match="unknown sequence"):
        bm.reserve("x", 1)
    bm.add("a", [1])
    with pytest.raises(ValueError, match="already"):
        bm.add("a", [1])
    with pytest.raises(ValueError, match="reserve first"):
        bm.commit("a", [1])
    with pytest.raises(ValueError, match="n=-1"):
        bm.reserve("a", -1)


class PagingMachine(RuleBasedStateMachine):
    """Random add / reserve / commit / fork / free against a simulated pool."""

    @initialize(n_blocks=st.integers(3, 12), block_size=st.sampled_from([1, 2, 4]), caching=st.booleans())
    def setup(self, n_blocks: int, block_size: int, caching: bool):
        self.bm = BlockManager(n_blocks, block_size, caching)
        self.slots: dict[int, list] = {b: [None] * block_size for b in range(n_blocks)}  # the simulated pool
        self.want: dict[str, tuple[object, list[int]]] = {}  # seq -> (key, the tokens it wrote)
        self.n = 0

    def write(self, seq: str, copies: list[tuple[int, int]], tokens: list[int]) -> None:
        """Apply the copies, then write tokens at the sequence's next positions (the pool's job)."""
        for src, dst in copies:
            self.slots[dst] = list(self.slots[src])
        bs, table, start = self.bm.block_size, self.bm.block_table(seq), self.bm.length(seq)
        key = self.want[seq][0]
        for p in range(start, start + len(tokens)):
            b = table[p // bs]
            assert self.bm.ref[b] == 1 and b not in self.bm.block_key, f"write into shared/cached block {b}"
            self.slots[b][p % bs] = (key, tokens[p - start])
        self.bm.commit(seq, tokens)
        self.want[seq][1].extend(tokens)

    @rule(base=st.sampled_from([(0, 1, 2, 0, 1, 2, 0, 1), (2, 2, 1, 1, 0, 0, 2, 2)]), cut=st.integers(0, 8),
          tail=st.lists(st.integers(0, 2), max_size=5), key=st.sampled_from([1, 2]))
    def add(self, base, cut, tail, key):
        prompt = list(base[:cut]) + tail or [0]
        seq = f"s{self.n}"
        self.n += 1
        n_cached = self.bm.add(seq, prompt, key)
        assert n_cached % self.bm.block_size == 0 and n_cached < len(prompt)
        self.want[seq] = (key, list(prompt[:n_cached]))  # the invariant below checks the shared blocks hold them
        copies = self.bm.reserve(seq, len(prompt) - n_cached)
        if copies is None:
            self.bm.free(seq)
            del self.want[seq]
            return
        self.write(seq, copies, prompt[n_cached:])

    @precondition(lambda self: self.want)
    @rule(data=st.data(), n=st.integers(0, 5), written=st.integers(0, 5))
    def extend(self, data, n, written):
        seq = data.draw(st.sampled_from(sorted(self.want)))
        table, n_free = self.bm.block_table(seq), self.bm.n_free
        copies = self.bm.reserve(seq, n)
        if copies is None:
            assert self.bm.block_table(seq) == table and self.bm.n_free == n_free
            return
        self.write(seq, copies, data.draw(st.lists(st.integers(0, 2), min_size=min(n, written),
                                                   max_size=min(n, written))))

    @precondition(lambda self: self.want)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.want)))
        child = f"s{self.n}"
        self.n += 1
        self.bm.fork(parent, child)
        self.want[child] = (self.want[parent][0], list(self.want[parent][1]))

    @precondition(lambda self: self.want)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.want)))
        self.bm.free(seq)
        del self.want[seq]

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check()
        bs = self.bm.block_size
        for seq, (key, tokens) in self.want.items():
            assert self.bm.length(seq) == len(tokens)
            table = self.bm.block_table(seq)
            got = [self.slots[table[p // bs]][p % bs] for p in range(len(tokens))]
            assert got == [(key, t) for t in tokens], f"{seq} reads back {got}, wrote {tokens}"
        for k, b in self.bm.cache.items():  # a cached block holds exactly the prefix it is keyed by
            key, prefix = k
            assert self.slots[b] == [(key, t) for t in prefix[-bs:]]

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in list(self.want):
            self.bm.free(seq)
        self.bm.check()
        assert self.bm.n_free == self.bm.n_blocks, "blocks leaked"


TestPaging = PagingMachine.TestCase
TestPaging.settings = settings(max_examples=25, stateful_step_count=30)


@pytest.mark.slow
def test_paging_thorough():
    from hypothesis.stateful import run_state_machine_as_test
    run_state_machine_as_test(PagingMachine, settings=settings(max_examples=400, stateful_step_count=60,
                                                               deadline=None))
