"""mythos.serve.Engine, continuous batching on the paged KV cache: each request's tokens equal its solo
model.generate (same seed) whatever joins, leaves, is preempted or shares a prefix beside it; no block
leaks after any sequence of arrivals, cancellations and steps (a hypothesis state machine); EngineLoop
streams and fails cleanly. Tiny float64 models whose halting head spreads the loop counts by position.
"""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import mythos_jax as mj
import mythos_torch as mt
import spec as S
from helpers import spread_halting
from mythos.serve import Engine, EngineLoop, Event, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny tensors run fastest on one thread

CONFIGS = {
    "gqa": {},
    "mla": {"attention.type": "mla"},
    "compressor": {"recurrent.compressor.enabled": True, "recurrent.compressor.chunk": 4},
    "freeze": {"decode.halted_kv": "freeze"},
}


@functools.lru_cache(maxsize=None)
def model(twin: str, config: str):
    """A cached tiny float64 model with the halting head x40 and its bias centred: loop counts spread by
    position (tests/test_decode.py spread_weights). Do not mutate it."""
    s = S.load("tiny", overrides=CONFIGS[config])
    w = spread_halting(s, np.random.default_rng(99).integers(0, 64, (2, 16)))
    return (mt if twin == "torch" else mj).build(s, 0, "float64", weights=w)


_SOLO: dict[tuple, list[int]] = {}


def solo(m, prompt: list[int], p: SamplingParams) -> list[int]:
    """The request alone through model.generate, cut after its last real token (eos / stop kept); memoized."""
    key = (id(m), tuple(prompt), repr(p))
    if key not in _SOLO:
        _SOLO[key] = _solo(m, prompt, p)
    return list(_SOLO[key])


def _solo(m, prompt: list[int], p: SamplingParams) -> list[int]:
    ids = np.array([prompt])
    kw = dict(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed, eos_id=p.eos_id,
              stop=[list(q) for q in p.stop] or None)
    if isinstance(m, mt.Mythos):
        out = m.generate(torch.from_numpy(ids), p.max_tokens, p.n_loops, **kw).numpy()[0, len(prompt):]
    else:
        out = np.asarray(m.generate(ids, p.max_tokens, p.n_loops, **kw))[0, len(prompt):]
    new: list[int] = []
    for t in out.tolist():
        new.append(t)
        if t == p.eos_id or any(new[len(new) - len(q):] == list(q) for q in p.stop if len(q) <= len(new)):
            break
    return new


def mixed_requests(m, n: int, seed: int, lengths=(3, 9, 5, 12, 1, 7, 4, 10), n_loops=(None, 2, 1, 3)):
    """n prompts of mixed lengths with mixed sampling params, stop sequences and eos ids that do fire
    (taken from each request's own solo tokens without them)."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        prompt = rng.integers(0, 64, lengths[i % len(lengths)]).tolist()
        p = SamplingParams(max_tokens=int(rng.integers(3, 11)), temperature=[0.0, 0.8, 1.3][i % 3],
                           top_k=[None, 20][i % 2], top_p=[None, 0.9][(i // 2) % 2], seed=100 + i,
                           n_loops=n_loops[i % len(n_loops)])
        base = solo(m, prompt, p)
        if i % 4 == 1 and len(base) >= 3:  # a stop sequence that fires at the third token
            p = SamplingParams(**{**p.__dict__, "stop": ((63, 62, 61), tuple(base[1:3]))})
        elif i % 4 == 2 and len(base) >= 2:  # an eos that fires
            p = SamplingParams(**{**p.__dict__, "eos_id": base[1]})
        reqs.append((prompt, p))
    return reqs


def check_run(m, reqs, **engine_kw) -> Engine:
    """Run reqs through one Engine; each request's tokens must equal its solo generate; no block leaks."""
    eng = Engine(m, **engine_kw)
    out = eng.run([r[0] for r in reqs], [r[1] for r in reqs])
    for i, ((prompt, p), got) in enumerate(zip(reqs, out)):
        assert got == solo(m, prompt, p), f"request {i} ({len(prompt)} prompt tokens, {p})"
    eng.blocks.check()
    assert eng.blocks.n_used == 0 and eng.blocks.n_free == eng.n_blocks, "blocks leaked"
    return eng


# ----------------------------------------------------------------------------- tokens == solo generate


def test_loop_counts_spread():
    """The batches below mix tokens that halt at different steps (else they would test little)."""
    with torch.no_grad():
        out = model("torch", "gqa")(torch.from_numpy(np.random.default_rng(3).integers(0, 64, (1, 16))))
    assert len(set(out.loop_counts.flatten().tolist())) >= 2


@pytest.mark.parametrize("config", ["gqa", "mla", "freeze", "compressor"])
def test_tokens_equal_solo_generate(config):
    m = model("torch", config)
    reqs = mixed_requests(m, 8, seed=1)
    bs = 4
    eng = check_run(m, reqs, max_num_seqs=3, block_size=bs)  # 8 requests through 3 slots: join and leave
    st = eng.stats()
    assert st["finished"] == 8 and st["tokens_generated"] == sum(len(solo(m, *r)) for r in reqs)
    if config == "freeze":
        assert st["mean_loop_steps"] < 4  # halted rows need no deeper steps: the call stops early


def test_tokens_equal_solo_generate_jax():
    """The JAX twin (few shapes: XLA compiles each): prompts of 4 tokens, one loop count, 3 requests in 2 slots."""
    m = model("jax", "gqa")
    rng = np.random.default_rng(5)
    reqs = [(rng.integers(0, 64, 4).tolist(), SamplingParams(max_tokens=k, temperature=t, seed=i, top_p=tp))
            for i, (k, t, tp) in enumerate([(6, 0.0, None), (3, 1.0, 0.9), (5, 0.7, None)])]
    base = solo(m, *reqs[2])
    reqs[2] = (reqs[2][0], SamplingParams(**{**reqs[2][1].__dict__, "stop": (tuple(base[1:3]),)}))
    check_run(m, reqs, max_num_seqs=2, block_size=4)


def test_prefix_caching_shares_and_changes_nothing():
    m = model("torch", "gqa")
    rng = np.random.default_rng(7)
    prefix = rng.integers(0, 64, 8).tolist()
    reqs = [(prefix + rng.integers(0, 64, k).tolist(), SamplingParams(max_tokens=5, temperature=0.9, seed=k))
            for k in (1, 3, 4)]
    reqs.append((prefix + rng.integers(0, 64, 2).tolist(), SamplingParams(max_tokens=5, n_loops=2)))  # another N
    on = check_run(m, reqs, max_num_seqs=4, block_size=4, prefix_caching=True)
    off = check_run(m, reqs, max_num_seqs=4, block_size=4, prefix_caching=False)
    total = sum(len(r[0]) for r in reqs)
    assert off.stats()["prefill_tokens"] == total and off.stats()["cached_tokens"] == 0
    # requests 2 and 3 find the 8-token prefix (two full blocks) of request 1; the one with n_loops=2 does not
    assert on.stats()["cached_tokens"] == 16 and on.stats()["prefill_tokens"] == total - 16


def test_preemption_under_a_tiny_pool():
    m = model("torch", "gqa")
    reqs = mixed_requests(m, 6, seed=2, lengths=(6, 9, 4, 8), n_loops=(None, 2))
    eng = check_run(m, reqs, max_num_seqs=4, block_size=2, n_blocks=10)
    assert eng.stats()["preemptions"] > 0


def test_cancel_waiting_and_running():
    m = model("torch", "gqa")
    reqs = mixed_requests(m, 4, seed=3)
    eng = Engine(m, max_num_seqs=2, block_size=4)
    ids = [eng.submit(p, q) for p, q in reqs]
    got: dict[str, list[int]] = {i: [] for i in ids}
    events = eng.step()
    assert eng.cancel(ids[0]) and eng.cancel(ids[3])  # one running, one waiting
    assert not eng.cancel("no-such-request")
    ends = {}
    while eng.has_work():
        events += eng.step()
    for ev in events:
        if ev.token is not None:
            got[ev.request_id].append(ev.token)
        if ev.finished:
            ends[ev.request_id] = ev.finish_reason
    assert ends[ids[0]] == ends[ids[3]] == "cancelled" and got[ids[3]] == []
    for i in (1, 2):
        assert got[ids[i]] == solo(m, *reqs[i])
    eng.blocks.check()
    assert eng.blocks.n_used == 0


def test_finish_reasons():
    m = model("torch", "gqa")
    prompt = [5, 6, 7]
    base = solo(m, prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=1))
    eng = Engine(m, max_num_seqs=4, block_size=4)
    cases = {"length": SamplingParams(max_tokens=6, temperature=1.0, seed=1),
             "eos": SamplingParams(max_tokens=6, temperature=1.0, seed=1, eos_id=base[2]),
             "stop": SamplingParams(max_tokens=6, temperature=1.0, seed=1, stop=[base[1:3]])}
    ids = {eng.submit(prompt, p): why for why, p in cases.items()}
    evs: list[Event] = []
    while eng.has_work():
        evs += eng.step()
    last = {ev.request_id: ev for ev in evs if ev.finished}
    assert {ids[r]: ev.finish_reason for r, ev in last.items()} == {w: w for w in cases}
    assert sum(1 for ev in evs if ev.finished) == 3


def test_bad_requests_name_the_field():
    m = model("torch", "gqa")
    eng = Engine(m, max_num_seqs=2, block_size=4, n_blocks=4)
    bad = [([], SamplingParams(), "prompt"), ([1, 64], SamplingParams(), r"prompt\[1\]=64"),
           ("abc", SamplingParams(), "prompt"), ([1, 2.5], SamplingParams(), r"prompt\[1\]"),
           ([1], SamplingParams(max_tokens=0), "max_tokens=0"), ([1] * 60, SamplingParams(max_tokens=8), "max_seq_len"),
           ([1], SamplingParams(temperature=-1.0), "temperature"), ([1], SamplingParams(top_k=0), "top_k"),
           ([1], SamplingParams(top_p=1.5), "top_p"), ([1], SamplingParams(seed=-1), "seed"),
           ([1], SamplingParams(eos_id=64), "eos_id"), ([1], SamplingParams(stop=[[]]), r"stop\[0\]"),
           ([1], SamplingParams(n_loops=5), "n_loops=5"), ([1], SamplingParams(n_loops=0), "n_loops"),
           ([1] * 10, SamplingParams(max_tokens=10), "n_blocks=4"), ([1], {"max_tokens": 3}, "SamplingParams")]
    for prompt, p, match in bad:
        with pytest.raises(ValueError, match=match):
            eng.submit(prompt, p)
    assert not eng.has_work()
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        Engine(m, max_num_seqs=0)
    with pytest.raises(ValueError, match="model must be"):
        Engine(object())


# ----------------------------------------------------------------------------- EngineLoop


def test_engine_loop_streams_cancels_and_stops():
    m = model("torch", "gqa")
    reqs = mixed_requests(m, 5, seed=4)
    eng = Engine(m, max_num_seqs=2, block_size=4)
    real = eng._forward

    def slow(*a, **k):  # 10 ms a call: the long request below is still running when it is cancelled
        time.sleep(0.01)
        return real(*a, **k)

    eng._forward = slow
    loop = EngineLoop(eng).start()
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        results[i] = [ev.token for ev in loop.submit(*reqs[i]) if ev.token is not None]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, r in enumerate(reqs):
        assert results[i] == solo(m, *r)
    long = loop.submit([1, 2, 3], SamplingParams(max_tokens=40, temperature=1.0))
    first = next(long)
    assert loop.cancel(long.request_id)
    rest = list(long)
    assert first.token is not None and rest[-1].finish_reason == "cancelled"
    pending = loop.submit([4, 5], SamplingParams(max_tokens=50))
    loop.stop(10)
    assert list(pending)[-1].finished  # stop ends what is pending, nothing hangs
    with pytest.raises(ValueError, match="max_tokens"):
        EngineLoop(Engine(m)).submit([1], SamplingParams(max_tokens=-2))


def test_engine_loop_fails_pending_requests_on_an_error():
    m = model("torch", "gqa")
    eng = Engine(m, max_num_seqs=2, block_size=4)
    real, calls = eng._forward, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(*a, **k)

    eng._forward = flaky
    loop = EngineLoop(eng).start()
    streams = [loop.submit([1, 2, 3], SamplingParams(max_tokens=10)), loop.submit([4, 5], SamplingParams(max_tokens=10))]
    for s in streams:
        with pytest.raises(RuntimeError, match="device lost"):
            list(s)
    p = SamplingParams(max_tokens=4, temperature=0.5, seed=3)  # the loop serves on
    assert [ev.token for ev in loop.submit([7, 8], p) if ev.token is not None] == solo(m, [7, 8], p)
    loop.stop(10)


# ----------------------------------------------------------------------------- no leaks, any schedule


class EngineMachine(RuleBasedStateMachine):
    """Random submissions (prompt lengths, budgets, loop counts, prefixes), cancellations and steps on a
    small pool: after every rule the block manager's invariants hold, every token so far is the solo
    generate's, and once everything ends every block is free or evictable."""

    @initialize(block_size=st.sampled_from([2, 4]), n_blocks=st.integers(8, 16), max_num_seqs=st.integers(1, 3),
                caching=st.booleans())
    def setup(self, block_size, n_blocks, max_num_seqs, caching):
        self.m = model("torch", "gqa")
        self.eng = Engine(self.m, max_num_seqs=max_num_seqs, block_size=block_size, n_blocks=n_blocks,
                          prefix_caching=caching)
        self.reqs: dict[str, tuple[list[int], SamplingParams]] = {}
        self.got: dict[str, list[int]] = {}
        self.ended: set[str] = set()

    @rule(prefix=st.sampled_from([[], [3, 1, 4, 1], [3, 1, 4, 1, 5, 9, 2, 6]]),
          tail=st.lists(st.integers(0, 63), min_size=1, max_size=5), max_tokens=st.integers(1, 8),
          temperature=st.sampled_from([0.0, 1.0]), n_loops=st.sampled_from([None, 2]), seed=st.integers(0, 3))
    def submit(self, prefix, tail, max_tokens, temperature, n_loops, seed):
        p = SamplingParams(max_tokens=max_tokens, temperature=temperature, n_loops=n_loops, seed=seed)
        rid = self.eng.submit(prefix + tail, p)
        self.reqs[rid], self.got[rid] = (prefix + tail, p), []

    @precondition(lambda self: hasattr(self, "eng") and self.reqs)
    @rule(data=st.data())
    def cancel(self, data):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        assert self.eng.cancel(rid) == (rid not in self.ended)
        self.ended.add(rid)

    @rule(n=st.integers(1, 3))
    def step(self, n):
        for _ in range(n):
            self.record(self.eng.step())

    def record(self, events):
        for ev in events:
            assert ev.request_id not in self.ended or ev.finish_reason == "cancelled"
            if ev.token is not None:
                self.got[ev.request_id].append(ev.token)
            if ev.finished:
                self.ended.add(ev.request_id)

    @invariant()
    def sound(self):
        if not hasattr(self, "eng"):
            return
        self.eng.blocks.check()
        st_ = self.eng.stats()
        assert st_["running"] <= self.eng.max_num_seqs
        for rid, toks in self.got.items():
            want = solo(self.m, *self.reqs[rid])
            assert toks == want[:len(toks)], f"{rid}: {toks} vs solo {want}"

    def teardown(self):
        if not hasattr(self, "eng"):
            return
        while self.eng.has_work():
            self.record(self.eng.step())
        for rid, toks in self.got.items():
            assert rid in self.ended
        self.eng.blocks.check()
        assert self.eng.blocks.n_used == 0 and self.eng.blocks.n_free == self.eng.n_blocks, "blocks leaked"


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(max_examples=6, stateful_step_count=12)


@pytest.mark.slow
def test_engine_machine_thorough():
    from hypothesis.stateful import run_state_machine_as_test
    run_state_machine_as_test(EngineMachine, settings=settings(max_examples=100, stateful_step_count=40,
                                                               deadline=None))
