"""Continuous batching on the paged KV cache (docs/serving.md "Continuous batching"), for either twin.

Each step: admit waiting requests first come first served while their blocks fit (a prefill through
paged_forward, B=1, of the part of the prompt the prefix cache does not already hold), then one decode
call per group of running requests with the same loop count N (B rows, T=1), sample each row with its
own numpy default_rng(seed) through spec.sampling, retire the finished requests and free their blocks.
When blocks run out the newest running request is preempted: its blocks are freed and it waits again
with its tokens so far and its rng, recomputed on readmission. So each request's tokens equal its solo
model.generate tokens with the same arguments.

The block bookkeeping is spec/paging.py's BlockManager; the tensors are the twin's PagedPool.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import numbers
import queue
import threading
import time
from typing import Hashable, Iterator, Literal, Sequence

import numpy as np

from spec.paging import BlockManager
from weights_bridge import backends
from spec.sampling import check_generate, check_stop, finish_step, sample_next

FinishReason = Literal["length", "stop", "eos", "cancelled"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding arguments, model.generate's: max_tokens new tokens at most; temperature 0 is
    greedy; top_k / top_p filters (None: off); seed of the request's numpy default_rng; stop: token-id
    sequences that end it (kept in its tokens); eos_id ends it too (kept); n_loops: its loop steps N
    (None: the spec's recurrent.max_loop_iters). Checked by Engine.submit against the model."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: Sequence[Sequence[int]] = ()
    eos_id: int | None = None
    n_loops: int | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """One request's news from a step: a new token (token), or its end (finished, finish_reason; a
    cancelled request's last event has token None)."""
    request_id: str
    token: int | None
    finished: bool = False
    finish_reason: FinishReason | None = None


class _Request:
    """A request's state: the prompt, the tokens generated so far, its rng and sampling state."""

    def __init__(self, rid: str, arrival: int, prompt: list[int], params: SamplingParams,
                 stop: tuple[tuple[int, ...], ...], N: int):
        self.id, self.arrival, self.prompt, self.params, self.stop, self.N = rid, arrival, prompt, params, stop, N
        self.rng = np.random.default_rng(params.seed)  # one per request: solo generate's stream of uniforms
        self.generated: list[int] = []
        self.new: list[np.ndarray] = []  # the generated tokens as finish_step wants them, (1,) each
        self.done = np.zeros(1, dtype=bool)
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def __lt__(self, other: "_Request") -> bool:  # the waiting queue's order: first come, first served
        return self.arrival < other.arrival


class Engine:
    """Continuous batching of requests on one model (module docstring).

    Args:
        model: a mythos_torch.Mythos or a mythos_jax.Mythos (the backend is inferred).
        max_num_seqs: requests running at once, at most.
        block_size: positions per KV block.
        n_blocks: blocks in the pool; None: room for max_num_seqs sequences of max_seq_len positions.
        prefix_caching: reuse the full blocks of an earlier request with the same prompt prefix and the
            same loop count (not recomputed). Off for the context compressor (its open-chunk state is
            not per position, so a prefix's blocks do not hold all of it).
        max_loops: the largest n_loops a request may ask for (the pool holds that many loop steps' rows);
            None: recurrent.max_loop_iters.
    """

    def __init__(self, model: object, max_num_seqs: int = 8, block_size: int = 16, n_blocks: int | None = None,
                 prefix_caching: bool = True, *, max_loops: int | None = None):
        try:
            self.backend = backends.check_backend(backends.backend_of(model))  # onnx too is refused: no cache to page
        except ValueError:
            raise ValueError(f"model must be a mythos_torch.Mythos or a mythos_jax.Mythos, got "
                             f"{type(model).__name__}") from None
        self.model = model
        self.spec = s = model.spec
        for name, v in (("max_num_seqs", max_num_seqs), ("block_size", block_size), ("n_blocks", n_blocks),
                        ("max_loops", max_loops)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name}={v!r} must be an integer >= 1" + (" or None" if name in (
                    "n_blocks", "max_loops") else ""))
        self.max_num_seqs, self.block_size = int(max_num_seqs), int(block_size)
        self.max_loops = int(max_loops or s.recurrent.max_loop_iters)
        self.n_blocks = int(n_blocks or self.max_num_seqs * -(-s.max_seq_len // self.block_size))
        self.compressor = bool(s.recurrent.compressor.enabled)
        self.prefix_caching = bool(prefix_caching) and not self.compressor
        self.blocks = BlockManager(self.n_blocks, self.block_size, self.prefix_caching)
        # JAX: batches padded to a power of two rows (and prefills cut in power-of-two chunks), so XLA compiles
        # few shapes; each padding row writes its own scratch block past the manager's n_blocks
        self._pad_shapes = self.backend == "jax"
        self.scratch = list(range(self.n_blocks, self.n_blocks + (max(1, self.max_num_seqs - 1) if self._pad_shapes
                                                                     else 0)))
        twin = backends.twin(self.backend)
        self._paged_forward = twin.paged_forward
        self.pool = twin.PagedPool(model, self.n_blocks + len(self.scratch), self.block_size, self.max_loops)
        self.requests: dict[str, _Request] = {}  # every request not yet finished, waiting or running
        self.waiting: list[_Request] = []  # arrival order (preempted requests go back to their place)
        self.running: list[_Request] = []  # arrival order
        self._events: list[Event] = []  # cancellations, returned by the next step
        self._ids = itertools.count()
        self.counters = dict(steps=0, tokens_generated=0, prefill_tokens=0, cached_tokens=0, preemptions=0,
                             forward_calls=0, loop_steps=0, loop_count_sum=0.0, finished=0, cancelled=0)

    # ----------------------------------------------------------------------------- the public API

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
               request_id: str | None = None) -> str:
        """Queue a request; -> its id. A ValueError naming the field for a bad prompt or bad params."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt_ids)
        stop, N = self._check_params(len(prompt), params)
        n = next(self._ids)
        rid = f"req-{n}" if request_id is None else str(request_id)
        if rid in self.requests:
            raise ValueError(f"request_id={rid!r} is already in the engine")
        r = _Request(rid, n, prompt, params, stop, N)
        self.requests[rid] = r
        bisect.insort(self.waiting, r)
        return rid

    def cancel(self, request_id: str) -> bool:
        """End a request now (its blocks are freed); the next step returns its Event(finish_reason=
        "cancelled"). -> False when it is unknown or already finished (a no-op)."""
        r = self.requests.pop(request_id, None)
        if r is None:
            return False
        if r in self.running:
            self.running.remove(r)
            self.blocks.free(r.id)
        else:
            self.waiting.remove(r)
        self.counters["cancelled"] += 1
        self._events.append(Event(r.id, None, True, "cancelled"))
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._events)

    def step(self) -> list[Event]:
        """Admit, decode one token for every running request, retire; -> this step's Events in order."""
        events, self._events = self._events, []
        if not (self.waiting or self.running):
            return events
        self.counters["steps"] += 1
        fresh = self._admit(events)
        self._decode([r for r in self.running if r not in fresh], events)
        return events

    def run(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
            ) -> list[list[int]]:
        """Submit every prompt (one params for all, or one each), step to completion; -> each one's tokens."""
        many = isinstance(params, (list, tuple))
        if many and len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        ids = [self.submit(p, params[i] if many else params) for i, p in enumerate(prompts)]
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_work():
            for ev in self.step():
                if ev.token is not None and ev.request_id in out:
                    out[ev.request_id].append(ev.token)
        return [out[rid] for rid in ids]

    def abort_all(self) -> None:
        """Drop every request and every block (after an error inside step): a clean engine, prefix cache empty."""
        self.requests.clear()
        self.waiting.clear()
        self.running.clear()
        self._events.clear()
        self.blocks = BlockManager(self.n_blocks, self.block_size, self.prefix_caching)

    def stats(self) -> dict[str, float]:
        """Counters for the server and the benchmark: running, waiting, blocks used / free (free counts the
        evictable cached ones), tokens generated, steps, prefill / cached prompt tokens, preemptions, mean
        loop steps run per generated token (the forward's n_steps) and mean ACT loop count."""
        c = self.counters
        n = max(c["tokens_generated"], 1)
        return dict(running=len(self.running), waiting=len(self.waiting), blocks_used=self.blocks.n_used,
                    blocks_free=self.blocks.n_free, blocks_cached=self.blocks.n_evictable,
                    tokens_generated=c["tokens_generated"], steps=c["steps"], prefill_tokens=c["prefill_tokens"],
                    cached_tokens=c["cached_tokens"], preemptions=c["preemptions"],
                    forward_calls=c["forward_calls"], finished=c["finished"], cancelled=c["cancelled"],
                    mean_loop_steps=c["loop_steps"] / n, mean_loop_count=c["loop_count_sum"] / n)

    # ----------------------------------------------------------------------------- checks

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        V = self.spec.vocab_size
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, (list, tuple, np.ndarray, range)):
            raise ValueError(f"prompt must be a sequence of token ids, got {type(prompt_ids).__name__}")
        a = np.asarray(prompt_ids)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"prompt must be a non-empty 1-D sequence of token ids, got shape {a.shape}")
        for i, t in enumerate(prompt_ids):
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral) or not 0 <= t < V:
                raise ValueError(f"prompt[{i}]={t!r}: every entry must be a token id in [0, vocab_size={V})")
        return [int(t) for t in prompt_ids]

    def _check_params(self, T: int, p: SamplingParams) -> tuple[tuple[tuple[int, ...], ...], int]:
        s = self.spec
        mt = p.max_tokens
        if isinstance(mt, bool) or not isinstance(mt, numbers.Integral) or mt < 1:
            raise ValueError(f"max_tokens={mt!r} must be an integer >= 1")
        if T + mt > s.max_seq_len:
            raise ValueError(f"the prompt's {T} tokens + max_tokens={mt} = {T + mt} positions exceed "
                             f"max_seq_len={s.max_seq_len}")
        check_generate(s, T, mt, p.temperature, p.top_k, p.top_p, p.seed, p.eos_id)
        stop = check_stop(p.stop, s.vocab_size)
        N = p.n_loops
        if N is None:
            N = s.recurrent.max_loop_iters
        if isinstance(N, bool) or not isinstance(N, numbers.Integral) or not 1 <= N <= self.max_loops:
            raise ValueError(f"n_loops={p.n_loops!r} must be an integer in 1..{self.max_loops} (the engine's "
                             "max_loops) or None (recurrent.max_loop_iters)")
        need = self.blocks.blocks_needed(T + mt - 1)  # the last token is never fed back
        if need > self.n_blocks:
            raise ValueError(f"the prompt's {T} tokens + max_tokens={mt} need {need} blocks of {self.block_size} "
                             f"positions, more than the engine's n_blocks={self.n_blocks}")
        return stop, int(N)

    # ----------------------------------------------------------------------------- scheduling

    def _admit(self, events: list[Event]) -> list[_Request]:
        """Prefill waiting requests, first come first served, while a running slot and their blocks are free."""
        fresh = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            tokens = r.prompt + r.generated  # a preempted request recomputes what it had
            n_cached = self.blocks.add(r.id, tokens, r.N)
            copies = self.blocks.reserve(r.id, len(tokens) - n_cached)
            if copies is None:
                self.blocks.free(r.id)
                if not self.running:  # submit checked it fits an empty pool: only a leak gets here
                    raise RuntimeError(f"request {r.id!r} needs {self.blocks.blocks_needed(len(tokens))} blocks and "
                                       f"nothing runs, yet only {self.blocks.n_free} of {self.n_blocks} are free")
                break
            self.waiting.pop(0)
            if copies:
                self.pool.copy_blocks(copies)
            bisect.insort(self.running, r)
            fresh.append(r)
            self.counters["cached_tokens"] += n_cached
            self.counters["prefill_tokens"] += len(tokens) - n_cached
            logits, n_steps, counts = self._prefill(r, tokens, n_cached)
            self.blocks.commit(r.id, tokens[n_cached:])
            self._emit(r, logits, n_steps, counts[0], events)
        return fresh

    def _decode(self, rows: list[_Request], events: list[Event]) -> None:
        """One token for each of rows: reserve a position each (preempting the newest when blocks run out),
        then one paged_forward per loop count N (per length too, under the compressor)."""
        for r in list(rows):
            while r in self.running:
                copies = self.blocks.reserve(r.id, 1)
                if copies is not None:
                    if copies:
                        self.pool.copy_blocks(copies)
                    break
                self._preempt(self.running[-1])
        rows = [r for r in rows if r in self.running]
        groups: dict[tuple[int, int], list[_Request]] = {}
        for r in rows:
            length = self.blocks.length(r.id) if self.compressor else 0  # the compressor batches equal lengths only
            groups.setdefault((r.N, length), []).append(r)
        for (N, _), group in groups.items():
            ids = np.array([[r.generated[-1]] for r in group], dtype=np.int64)  # (B, 1) the last sampled tokens
            logits, n_steps, counts = self._forward([r.id for r in group], ids, N)
            for b, r in enumerate(group):
                self.blocks.commit(r.id, [r.generated[-1]])
                self._emit(r, logits[b:b + 1], n_steps, counts[b], events)

    def _preempt(self, r: _Request) -> None:
        """Free r's blocks and put it back in the waiting queue with its tokens and rng (recomputed later)."""
        self.running.remove(r)
        self.blocks.free(r.id)
        bisect.insort(self.waiting, r)
        self.counters["preemptions"] += 1

    def _emit(self, r: _Request, logits: np.ndarray, n_steps: int, count: float, events: list[Event]) -> None:
        """Sample r's next token from its last-position logits (1, V) and record it; retire r when done."""
        p = r.params
        tok = sample_next(logits, r.rng, p.temperature, p.top_k, p.top_p)  # (1,), r's own rng
        tok, done = finish_step(tok, r.new, r.done, p.eos_id, r.stop)  # spec.sampling: eos / stop
        r.new.append(tok)
        r.done = done
        t = int(tok[0])
        r.generated.append(t)
        if r.t_first is None:
            r.t_first = time.perf_counter()
        c = self.counters
        c["tokens_generated"] += 1
        c["loop_steps"] += n_steps
        c["loop_count_sum"] += float(count)
        reason: FinishReason | None = None
        if bool(done[0]):
            reason = "eos" if p.eos_id is not None and t == p.eos_id else "stop"
        elif len(r.generated) == p.max_tokens:
            reason = "length"
        events.append(Event(r.id, t, reason is not None, reason))
        if reason is not None:
            self.running.remove(r)
            self.blocks.free(r.id)
            del self.requests[r.id]
            c["finished"] += 1

    # ----------------------------------------------------------------------------- the model calls

    def _prefill(self, r: _Request, tokens: list[int], n_cached: int) -> tuple[np.ndarray, int, float]:
        """Compute tokens[n_cached:] of r into its blocks; -> the last position's logits (1, V), n_steps, and
        its ACT loop count. JAX: in power-of-two chunks (few compiled shapes; chunked prefill is exact)."""
        todo = np.array(tokens[n_cached:], dtype=np.int64)[None, :]  # (1, T)
        if not self._pad_shapes:
            return self._forward([r.id], todo, r.N, lengths=[n_cached])
        start, out = n_cached, None
        while start < len(tokens):
            T = 1 << (len(tokens) - start).bit_length() - 1  # the largest power of two that fits
            out = self._forward([r.id], todo[:, start - n_cached:start - n_cached + T], r.N, lengths=[start])
            start += T
        return out

    def _forward(self, seqs: list[Hashable], ids: np.ndarray, N: int, lengths: Sequence[int] | None = None
                 ) -> tuple[np.ndarray, int, np.ndarray]:
        """paged_forward of ids (B, T) for seqs at their lengths (default: the manager's) -> the last
        position's logits (B, V) float64, n_steps, and each row's last-position ACT loop count (B,)."""
        B, T = ids.shape
        lengths = np.array([self.blocks.length(q) for q in seqs] if lengths is None else lengths, dtype=np.int64)
        tables = [self.blocks.block_table(q) for q in seqs]
        W = max(len(t) for t in tables)
        Bp = B
        if self._pad_shapes:  # JAX: one table width, max_seq_len's blocks (a dense cache's capacity), so no recompiles
            W = max(W, self.blocks.blocks_needed(self.spec.max_seq_len))
        if self._pad_shapes and not self.compressor:  # padding rows sit at length 0: the compressor needs equal ones
            Bp = 1 << (B - 1).bit_length()
        table = np.zeros((Bp, W), dtype=np.int64)  # entries past a row's blocks: any value
        for b, t in enumerate(tables):
            table[b, :len(t)] = t
        for b in range(B, Bp):
            table[b, 0] = self.scratch[b - B]
        ids_p = np.zeros((Bp, T), dtype=np.int32)
        ids_p[:B] = ids
        lengths_p = np.zeros(Bp, dtype=np.int64)
        lengths_p[:B] = lengths
        self.counters["forward_calls"] += 1
        out = self._paged_forward(self.model, self.pool, backends.from_numpy(self.backend, ids_p), table, lengths_p, N)
        logits = backends.to_numpy(out.logits[:B, -1]).astype(np.float64)
        counts = backends.to_numpy(out.loop_counts[:B, -1]).astype(np.float64)
        return logits, int(out.n_steps), counts


# --------------------------------------------------------------------------------- a background thread


class RequestStream:
    """One request's Events from an EngineLoop, thread-safe: iterate until its finished Event (an error
    inside the engine loop is raised here)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._q: queue.Queue = queue.Queue()
        self._ended = False

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return self.get()

    def get(self, timeout: float | None = None) -> Event:
        """The next Event (blocking up to timeout seconds: queue.Empty after); StopIteration after the last."""
        if self._ended:
            raise StopIteration
        item = self._q.get(timeout=timeout)
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item.finished:
            self._ended = True
        return item


class EngineLoop:
    """Steps an Engine in a background thread while it has work; submit / cancel from any thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # the last exception raised inside the loop

    def start(self) -> "EngineLoop":
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._thread = threading.Thread(target=self._run, name="mythos-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> RequestStream:
        """Queue a request (a ValueError naming the field when it is bad); -> the stream of its Events."""
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine loop is stopped")
            rid = self.engine.submit(prompt_ids, params)
            stream = self._streams[rid] = RequestStream(rid)
            self._cv.notify_all()
            return stream

    def cancel(self, request_id: str) -> bool:
        """Cancel a request; its stream ends with a "cancelled" Event. False when it already finished."""
        with self._cv:
            ok = self.engine.cancel(request_id)
            self._cv.notify_all()
            return ok

    def stats(self) -> dict[str, float]:
        with self._cv:
            return self.engine.stats()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what is pending, end the thread and join it."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            for rid in list(self.engine.requests):
                self.engine.cancel(rid)
            self._deliver(self.engine.step() if self.engine.has_work() else [])
            for stream in self._streams.values():  # nothing can come any more
                stream._q.put(Event(stream.request_id, None, True, "cancelled"))
            self._streams.clear()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.engine.has_work():
                    self._cv.wait()
                if self._stopping:
                    return
                try:
                    events = self.engine.step()
                except BaseException as e:  # fail the pending requests with it, then serve on from a clean engine
                    self.error = e
                    for stream in self._streams.values():
                        stream._q.put(e)
                    self._streams.clear()
                    self.engine.abort_all()
                    continue
                self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        for ev in events:
            stream = self._streams.get(ev.request_id)
            if stream is not None:
                stream._q.put(ev)
                if ev.finished:
                    del self._streams[ev.request_id]
