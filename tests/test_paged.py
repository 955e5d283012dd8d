"""The paged KV cache (mythos_torch/paged.py, mythos_jax/paged.py; docs/serving.md "The paged KV cache").

Reference: each sequence alone through its twin's full forward (no cache; every loop step, so the
per-step expert choices exist for every position), rows of one batch being independent. The paged
runs hand blocks out in a random order, prefill in chunks, decode rows of different lengths in one
call, and share prefixes (a fork copies the partial block, a prefix-cache hit reuses full blocks);
every row's logits, loop counts, halted flags and expert choices must equal its solo reference, and the
twins must agree on the paged path (logits and the pool's arrays). Hypothesis drives the torch twin
(milliseconds per call); the JAX twin runs fixed schedules whose shapes repeat (a compile is seconds).
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import mythos_jax as mj
import mythos_torch as mt
import spec as S
from helpers import spread_halting
from mythos_jax.generate import TRACE_COUNTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-10  # float64
CONFIGS = {
    "gqa-moe": {},
    "dense": {"recurrent.ffn": "dense"},
    "mla": {"attention.type": "mla"},
    # open-mythos' layout: the rope key cached once per head
    "om-mla": {"attention.type": "mla", "semantics": "openmythos-0.5", "halting.remainder": "openmythos"},
    "compressor": {"recurrent.compressor.enabled": True, "recurrent.compressor.chunk": 2,
                   "recurrent.compressor.n_summaries": 2, "recurrent.compressor.n_heads": 2},
    "cross-loop": {"recurrent.cross_loop_attention.enabled": True, "recurrent.cross_loop_attention.n_heads": 2},
    # the JAX schedule's second model: MLA, a dense FFN and the compressor at once (cross-loop attention
    # reads no cache: the torch hypothesis covers it, a JAX compile of it costs seconds)
    "gqa-freeze": {"decode.halted_kv": "freeze"},  # halted positions serve their last rows (docs/semantics.md)
    "mla-comp": {"attention.type": "mla", "recurrent.ffn": "dense",
                 "recurrent.compressor.enabled": True, "recurrent.compressor.chunk": 2,
                 "recurrent.compressor.n_summaries": 2, "recurrent.compressor.n_heads": 2},
}
MAX_LOOPS = 4  # tiny's recurrent.max_loop_iters
L_MAX = 16  # positions per sequence in every test


def tiny(config: str) -> S.Spec:
    return S.load("tiny", overrides=CONFIGS[config])


@functools.lru_cache(maxsize=None)
def spread_weights(config: str) -> dict[str, np.ndarray]:
    """init_arrays with the halting head x40 and its bias centred, so loop counts vary by position."""
    return spread_halting(tiny(config), seq_ids(99, 2))


@functools.lru_cache(maxsize=None)
def model(twin: str, config: str):
    """A cached float64 tiny model (do not mutate it)."""
    return (mt if twin == "torch" else mj).build(tiny(config), 0, "float64", weights=spread_weights(config))


def seq_ids(seed: int, n: int) -> np.ndarray:
    """(n, L_MAX) token ids: sequence i's positions 0..L_MAX-1 (a sequence uses a prefix of its row)."""
    return np.random.default_rng(seed).integers(0, 64, (n, L_MAX))


def pool_of(twin: str, m, n_blocks: int, block_size: int):
    return (mt if twin == "torch" else mj).PagedPool(m, n_blocks, block_size, MAX_LOOPS)


def reference(twin: str, m, ids: np.ndarray, n_loops: int) -> dict[str, np.ndarray]:
    """Each row alone (rows of a batch are independent): the full forward, all N loop steps."""
    if twin == "torch":
        with torch.no_grad():
            out = m(torch.from_numpy(ids), n_loops, early_exit=False)
    else:
        out = mj.forward(m, ids, n_loops, early_exit=False)
    return outputs(out)


def outputs(out) -> dict[str, np.ndarray]:
    """logits (B, T, V) float64, loop counts, halted (B, T), expert choices (B, T, N, k)."""
    return {"logits": np.asarray(out.logits, np.float64), "counts": np.asarray(out.loop_counts),
            "halted": np.asarray(out.halted), "experts": np.moveaxis(np.asarray(out.traces.expert_idx), 0, 2),
            "n_steps": int(out.n_steps)}


def paged(twin: str, m, pool, ids: np.ndarray, tables: np.ndarray, lengths: np.ndarray, n_loops: int):
    if twin == "torch":
        return outputs(mt.paged_forward(m, pool, torch.from_numpy(ids), tables, lengths, n_loops))
    return outputs(mj.paged_forward(m, pool, ids, tables, lengths, n_loops))


def pool_arrays(pool) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in pool.arrays.items()}


class Seqs:
    """The test's own block bookkeeping: blocks handed out in `order` (a permutation of the pool's blocks);
    each call's rows are checked against their solo reference."""

    def __init__(self, twin: str, m, pool, ids: np.ndarray, ref: dict[str, np.ndarray], n_loops: int,
                 order: list[int], junk: int = 0):
        self.twin, self.m, self.pool, self.ids, self.ref, self.N = twin, m, pool, ids, ref, n_loops
        self.free = list(order)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.junk = junk  # table entries past a row's last block: this value (any value is allowed)
        self.errs: list[float] = []
        self.compare = ("counts", "halted", "experts")
        self.n_steps: list[int] = []  # loop steps each call ran

    def call(self, rows: list[int], T: int, width: int | None = None) -> None:
        bs = self.pool.block_size
        for r in rows:
            table = self.tables.setdefault(r, [])
            while len(table) * bs < self.lengths.get(r, 0) + T:
                table.append(self.free.pop(0))
        lengths = np.array([self.lengths.get(r, 0) for r in rows])
        W = max(len(self.tables[r]) for r in rows) if width is None else width
        tables = np.full((len(rows), W), self.junk, dtype=np.int64)
        for i, r in enumerate(rows):
            tables[i, :len(self.tables[r])] = self.tables[r]
        ids = np.stack([self.ids[r, n:n + T] for r, n in zip(rows, lengths)])
        out = paged(self.twin, self.m, self.pool, ids, tables, lengths, self.N)
        self.n_steps.append(out["n_steps"])
        for i, (r, n) in enumerate(zip(rows, lengths)):
            at = f"row {r} positions {n}..{n + T - 1} (call rows {rows}, lengths {lengths.tolist()})"
            err = float(np.abs(out["logits"][i] - self.ref["logits"][r, n:n + T]).max())
            self.errs.append(err)
            assert err <= TOL, f"{at}: max |dlogit| {err:.3e} > {TOL}"
            for k in self.compare:
                np.testing.assert_array_equal(out[k][i], self.ref[k][r, n:n + T], err_msg=f"{k} at {at}")
            self.lengths[r] = int(n) + T


# ----------------------------------------------------------------------------- paged == dense (hypothesis)


@st.composite
def schedules(draw, compressor: bool):
    """block_size, N, prompt lengths, each prompt's chunk sizes, decode steps, block order, table junk."""
    bs = draw(st.sampled_from([2, 4]))
    N = draw(st.integers(1, MAX_LOOPS))
    n = draw(st.integers(1, 3))
    if compressor:  # one call takes rows at one length: equal prompts, decoded together
        prompts = [draw(st.integers(1, 9))] * n
    else:
        prompts = draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
    chunks = []
    for p in prompts:
        cuts = sorted(draw(st.sets(st.integers(1, p - 1), max_size=2))) if p > 1 else []
        chunks.append(np.diff([0, *cuts, p]).tolist())
    steps = draw(st.integers(1, L_MAX - max(prompts)))
    n_blocks = n * (-(-L_MAX // bs)) + 2
    order = draw(st.permutations(range(n_blocks)))
    junk = draw(st.sampled_from([0, -5, n_blocks + 3]))
    return bs, N, chunks, steps, n_blocks, list(order), junk


@pytest.mark.parametrize("config", ["gqa-moe", "dense", "mla", "om-mla", "compressor", "cross-loop"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_paged_equals_dense_torch(config, data):
    """Random block orders, chunked prefill (random chunk sizes), then every sequence decoded together at
    its own length (one call): each row equals its solo run (logits, loop counts, halted, experts)."""
    m = model("torch", config)
    bs, N, chunks, steps, n_blocks, order, junk = data.draw(schedules(m.spec.recurrent.compressor.enabled))
    ids = seq_ids(len(order), len(chunks))
    seqs = Seqs("torch", m, pool_of("torch", m, n_blocks, bs), ids, reference("torch", m, ids, N), N, order, junk)
    if m.spec.recurrent.compressor.enabled:  # equal chunk sizes keep the rows at one length
        for T in chunks[0]:
            seqs.call(list(range(len(chunks))), T)
    else:
        for r, sizes in enumerate(chunks):
            for T in sizes:
                seqs.call([r], T)
    for _ in range(steps):
        seqs.call(list(range(len(chunks))), 1)
    # the layout: loop step t at pool layer P + t, the coda at P + max_loops + j (unused steps stay zero)
    P, used = m.spec.prelude_layers, [b for t in seqs.tables.values() for b in t]
    for k, a in pool_arrays(seqs.pool).items():
        if k in ("k", "v", "c_kv", "k_r"):
            assert not a[P + N:P + MAX_LOOPS].any(), f"{k}: rows at loop steps past N={N}"
            assert a[P + MAX_LOOPS:, used].any(axis=tuple(range(1, a.ndim - 1))).all(), f"{k}: coda rows missing"
    print(f"{config}: bs {bs} N {N} chunks {chunks} steps {steps}: max |dlogit| {max(seqs.errs):.1e}")


def dense_reference(m, ids: np.ndarray, calls: list[list[int]], N: int) -> dict[str, np.ndarray]:
    """Each row alone through the dense cache (init_cache + forward(cache=, start_pos=)), in the call sizes
    calls[r] (its prefill chunks, then single tokens): logits, loop counts, halted at every position run."""
    n = len(calls)
    ref = {"logits": np.zeros((n, L_MAX, 64)), "counts": np.zeros((n, L_MAX), np.int32),
           "halted": np.zeros((n, L_MAX), bool)}
    for r, sizes in enumerate(calls):
        cache, at = m.init_cache(1, L_MAX, N), 0
        for T in sizes:
            with torch.no_grad():
                out = m(torch.from_numpy(ids[r:r + 1, at:at + T]), N, cache=cache, start_pos=at)
            ref["logits"][r, at:at + T] = out.logits[0].numpy()
            ref["counts"][r, at:at + T] = out.loop_counts[0].numpy()
            ref["halted"][r, at:at + T] = out.halted[0].numpy()
            at += T
    return ref


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_paged_equals_dense_torch_under_freeze(data):
    """decode.halted_kv=freeze: a call stops once none of its rows' positions runs, and the skipped steps'
    layers get the frozen rows; each row still equals its solo dense-cache run (which stops on its own)."""
    m = model("torch", "gqa-freeze")
    bs, N, chunks, steps, n_blocks, order, junk = data.draw(schedules(False))
    ids = seq_ids(len(order), len(chunks))
    ref = dense_reference(m, ids, [c + [1] * steps for c in chunks], N)
    seqs = Seqs("torch", m, pool_of("torch", m, n_blocks, bs), ids, ref, N, order, junk)
    seqs.compare = ("counts", "halted")  # expert choices exist only for the steps a call ran
    for r, sizes in enumerate(chunks):
        for T in sizes:
            seqs.call([r], T)
    for _ in range(steps):
        seqs.call(list(range(len(chunks))), 1)
    print(f"freeze: bs {bs} N {N} chunks {chunks} steps {steps}: max |dlogit| {max(seqs.errs):.1e}, "
          f"steps run {seqs.n_steps}")


# ----------------------------------------------------------------------------- prefix sharing, copy-on-write


def cow_schedule(twin: str, config: str) -> tuple[dict[str, np.ndarray], list[float], list[int]]:
    """A (prompt 4, then 2 decode steps beside D at 4 and E at 8) is forked at length 6 into B: B's table
    reuses A's full block 0 and a copy of A's partial block 1 (copy_blocks before B writes). C is a
    prefix-cache hit: A's full block 0, then its own tokens from position 4. A, B and C then decode
    together (lengths 6, 6, 8). The shapes repeat (B=1 T=4, and B=3 T=1 at different lengths, W=4): the
    JAX twin compiles two programs; its reference is the torch twin's solo run (milliseconds, where a JAX
    full forward compiles for seconds; the twins' full forwards agree, tests/test_parity.py).
    -> the pool's arrays, the errors, the traces of each decode call."""
    m = model(twin, config)
    N, bs, n_blocks = MAX_LOOPS - 1, 4, 24  # N < max_loops: the coda lives at pool layer P + max_loops
    A, B, C, D, E = range(5)
    ids = seq_ids(5, 5)
    ids[B, :6] = ids[A, :6]  # B = A's first 6 tokens, then its own
    ids[C, :4] = ids[A, :4]  # C = A's first 4 tokens (one full block), then its own
    pool = pool_of(twin, m, n_blocks, bs)
    order = list(np.random.default_rng(1).permutation(n_blocks))
    seqs = Seqs(twin, m, pool, ids, reference("torch", model("torch", config), ids, N), N, order)
    for r in (A, D, E, E):
        seqs.call([r], 4, width=4)
    traces = []

    def decode(rows: list[int]) -> None:
        before = TRACE_COUNTS["paged_forward"]
        seqs.call(rows, 1, width=4)
        traces.append(TRACE_COUNTS["paged_forward"] - before)

    for _ in range(2):
        decode([A, D, E])
    # fork: B shares A's full block, and gets a private copy of the partial one it will write into
    copy = seqs.free.pop(0)
    pool.copy_blocks([(seqs.tables[A][1], copy)])
    seqs.tables[B], seqs.lengths[B] = [seqs.tables[A][0], copy], 6
    # prefix-cache hit: C reuses A's full block 0 and writes its own from position 4 on
    seqs.tables[C], seqs.lengths[C] = [seqs.tables[A][0]], 4
    shared = pool_arrays(pool)
    seqs.call([C], 4, width=4)
    for _ in range(3):
        decode([A, B, C])
    after = pool_arrays(pool)
    a0, a1 = seqs.tables[A][:2]
    for k in shared:  # A's block 0 is read by B and C, never written; A's block 1 only by A's own tokens
        np.testing.assert_array_equal(after[k][:, a0], shared[k][:, a0], err_msg=f"{k}: the shared block changed")
        np.testing.assert_array_equal(after[k][:, a1, :2], shared[k][:, a1, :2], err_msg=f"{k}: A's rows changed")
    return after, seqs.errs, traces


@pytest.mark.parametrize("config", ["gqa-moe", "om-mla", "compressor", "mla-comp"])
def test_prefix_sharing_copy_on_write(config):
    """B (a fork of A) and C (a prefix hit) equal their solo runs, and A's later tokens are unaffected by
    them (its logits equal its solo run, its shared blocks keep their bits). The compressor's rows of A's
    open chunk travel with the copied block."""
    if tiny(config).recurrent.compressor.enabled:  # one length per call: the same sharing, rows one by one
        _, errs = cow_schedule_equal_lengths(config)
    else:
        _, errs, _ = cow_schedule("torch", config)
    print(f"torch {config}: max |dlogit| {max(errs):.1e}")


def cow_schedule_equal_lengths(config: str) -> tuple[dict[str, np.ndarray], list[float]]:
    """cow_schedule for the compressor (one length per call): A prefill 3 + 2 + 1, fork B at 6 (copy of the
    partial block 1, A's open chunk rows included), C a prefix hit on block 0; each row decoded alone."""
    m = model("torch", config)
    N, bs, n_blocks = MAX_LOOPS, 4, 16
    A, B, C = range(3)
    ids = seq_ids(7, 3)
    ids[B, :5] = ids[A, :5]  # B forks A at length 5: position 4 opens chunk 2 (chunk 2: positions 4, 5)
    ids[C, :4] = ids[A, :4]
    pool = pool_of("torch", m, n_blocks, bs)
    seqs = Seqs("torch", m, pool, ids, reference("torch", m, ids, N), N, list(np.random.default_rng(2).permutation(16)))
    for T in (3, 2):
        seqs.call([A], T)
    copy = seqs.free.pop(0)
    pool.copy_blocks([(seqs.tables[A][1], copy)])
    seqs.tables[B], seqs.lengths[B] = [seqs.tables[A][0], copy], 5
    seqs.tables[C], seqs.lengths[C] = [seqs.tables[A][0]], 4
    shared = pool_arrays(pool)
    for _ in range(4):
        for r in (A, B, C):
            seqs.call([r], 1)
    after = pool_arrays(pool)
    a0 = seqs.tables[A][0]
    for k in shared:
        np.testing.assert_array_equal(after[k][:, a0], shared[k][:, a0], err_msg=f"{k}: the shared block changed")
    return after, seqs.errs


# ----------------------------------------------------------------------------- the JAX twin, twin parity


def equal_lengths_schedule(twin: str, config: str) -> tuple[dict[str, np.ndarray], list[float], list[int]]:
    """Three sequences (the compressor: one length per call) in a fixed random block order: prefill in two
    chunks of 4 (one row per call), then 5 steps decoding all three together. B=1 T=4 and B=3 T=1, W=4:
    two JAX programs; the reference is the torch twin's (cow_schedule). -> pool arrays, errors, traces."""
    m = model(twin, config)
    N, bs = MAX_LOOPS - 1, 4
    ids = seq_ids(3, 3)
    pool = pool_of(twin, m, 14, bs)
    seqs = Seqs(twin, m, pool, ids, reference("torch", model("torch", config), ids, N), N,
                list(np.random.default_rng(3).permutation(14)))
    for r in range(3):
        for _ in range(2):
            seqs.call([r], 4, width=4)
    traces = []
    for _ in range(5):
        before = TRACE_COUNTS["paged_forward"]
        seqs.call([0, 1, 2], 1, width=4)
        traces.append(TRACE_COUNTS["paged_forward"] - before)
    return pool_arrays(pool), seqs.errs, traces


@pytest.mark.parametrize("config,schedule", [("gqa-moe", cow_schedule), ("mla-comp", equal_lengths_schedule)])
def test_jax_paged_equals_dense_and_the_twins_agree(config, schedule):
    """The JAX twin's paged path equals the solo runs (random block order, chunked prefill, rows of
    different lengths in one call, a fork and a prefix hit with copy-on-write for gqa-moe; MLA, a dense
    FFN and the compressor at equal lengths for mla-comp); both twins, on the same schedule
    and block order, leave the same pool (every array, every block); decode steps compile once."""
    jax_pool, jax_errs, traces = schedule("jax", config)
    torch_pool, torch_errs, _ = schedule("torch", config)
    assert traces[0] <= 1 and traces[1:] == [0] * (len(traces) - 1), f"paged_forward traced per token: {traces}"
    for k in torch_pool:
        d = float(np.abs(jax_pool[k] - torch_pool[k]).max())
        print(f"{config} pool {k}: max |torch - jax| {d:.1e}")
        assert d <= TOL, k
    print(f"{config}: max |dlogit| jax {max(jax_errs):.1e}, torch {max(torch_errs):.1e}")


# ----------------------------------------------------------------------------- sizes, bad input


@pytest.mark.parametrize("twin", ["torch", "jax"])
@pytest.mark.parametrize("config", ["gqa-moe", "mla", "om-mla", "compressor"])
def test_bytes_per_block(twin, config):
    """bytes_per_block = block_size x the per-token figure of spec.kv_cache_bytes_per_token (with the
    compressor: its figure over a capacity of one chunk, the c rows and the chunk's m summaries per step,
    which is what a block stores per c positions), and a hand count for the default GQA tiny."""
    s = tiny(config)
    pool = pool_of(twin, model(twin, config), 3, 4)
    cp = s.recurrent.compressor
    per_token = S.kv_cache_bytes_per_token(s, "float64", MAX_LOOPS, max_len=cp.chunk if cp.enabled else None)
    assert pool.bytes_per_block == 4 * per_token["total"]
    if config == "gqa-moe":  # 6 layers (1 + 4 + 1) x (k, v) x 2 kv heads x 8 wide x 8 bytes
        assert pool.bytes_per_block == 4 * 6 * 2 * 2 * 8 * 8


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_bad_tables_and_lengths_are_refused_before_any_work(twin):
    m = model(twin, "gqa-moe")
    pool = pool_of(twin, m, 6, 4)
    before = pool_arrays(pool)
    ids = np.zeros((2, 3), dtype=np.int64)
    ok_tables, ok_lengths = np.array([[0, 1], [2, 3]]), np.array([2, 5])
    cases = [
        (np.array([[0], [2]]), np.array([0, 5]), r"row 1: lengths\[1\]=5 \+ T=3 positions need 2 blocks"),
        (np.array([[0, 1], [2, 6]]), ok_lengths, r"block_tables row 1: entries \[6\] are not block ids"),
        (np.array([[0, -1], [2, 3]]), np.array([2, 1]), r"block_tables row 0: entries \[-1\]"),
        (ok_tables, np.array([2, -1]), r"lengths\[1\]=-1 must be >= 0"),
        (ok_tables, np.array([2, 5, 0]), r"must have B=2 rows"),
        (ok_tables, np.array([2.0, 5.0]), r"lengths must be a 1-d integer array"),
        (np.array([0, 1]), ok_lengths, r"block_tables must be a 2-d integer array"),
        (np.array([[0, 1], [1, 3]]), np.array([2, 1]), r"rows 0 and 1 both write block 1"),
        (ok_tables, np.array([2, 62]), r"row 1: lengths\[1\]=62 \+ T=3 positions exceed max_seq_len=64"),
    ]
    fwd = mt.paged_forward if twin == "torch" else mj.paged_forward
    arr = torch.from_numpy if twin == "torch" else np.asarray
    for tables, lengths, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fwd(m, pool, arr(ids), tables, lengths, 2)
    with pytest.raises(ValueError, match=r"n_loops=5 must be an integer in 1..max_loops=4"):
        fwd(m, pool, arr(ids), ok_tables, ok_lengths, 5)
    with pytest.raises(ValueError, match=r"pool was built for another spec"):
        fwd(model(twin, "mla"), pool, arr(ids), ok_tables, ok_lengths, 2)
    for pairs, msg in [([(0, 6)], r"pairs\[0\] dst=6 is not a block id"), ([(0, 1), (2, 1)], "a dst block appears twice"),
                       ([(0,)], r"pairs\[0\]=\(0,\) must be \(src, dst\)")]:
        with pytest.raises(ValueError, match=msg):
            pool.copy_blocks(pairs)
    after = pool_arrays(pool)
    assert all(np.array_equal(before[k], after[k]) for k in before), "a refused call changed the pool"
    cm = model(twin, "compressor")
    with pytest.raises(ValueError, match=r"block_size=3 must be a multiple of recurrent.compressor.chunk=2"):
        pool_of(twin, cm, 4, 3)
    with pytest.raises(ValueError, match=r"recurrent.compressor needs every row at the same length"):
        fwd(cm, pool_of(twin, cm, 6, 4), arr(ids), ok_tables, ok_lengths, 2)
    with pytest.raises(ValueError, match=r"n_blocks=0 must be an integer >= 1"):
        pool_of(twin, m, 0, 4)


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_copy_blocks_copies_every_array_at_once(twin):
    """copy_blocks([(a, b), (b, c)]) gives b a's old rows and c b's old rows, in every array and layer."""
    m = model(twin, "compressor")
    pool = pool_of(twin, m, 4, 2)
    rng = np.random.default_rng(0)
    fill = {k: rng.standard_normal(a.shape) for k, a in pool.arrays.items()}
    pool.arrays = {k: (torch.tensor(v) if twin == "torch" else jax.numpy.asarray(v)) for k, v in fill.items()}
    pool.copy_blocks([(0, 1), (1, 2)])
    for k, v in pool_arrays(pool).items():
        np.testing.assert_array_equal(v[:, 1], fill[k][:, 0], err_msg=k)
        np.testing.assert_array_equal(v[:, 2], fill[k][:, 1], err_msg=k)
        np.testing.assert_array_equal(v[:, [0, 3]], fill[k][:, [0, 3]], err_msg=k)


def test_build_block_tables():
    for pkg in (mt, mj):
        np.testing.assert_array_equal(pkg.build_block_tables([[3, 1], [2]]), [[3, 1], [2, 0]])
        np.testing.assert_array_equal(pkg.build_block_tables([[3]], width=3), [[3, 0, 0]])
        with pytest.raises(ValueError, match="width=1 is less than a row's 2 blocks"):
            pkg.build_block_tables([[3, 1]], width=1)
