"""The whole model: prelude, recurrent loop with ACT, coda, tied head (ARCHITECTURE.md section 1)."""

from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from spec import Spec, cache_shapes, init_arrays, loop_table, rope_table

from .block import make_block
from .cache import KVCache, init_cache
from .generate import generate
from .layers import RMSNorm, acc_dtype
from .recurrent import LoopState, RecurrentBlock, _run_steps, loop_step, write_frozen
from .sharding import Sharding, any_running
from .weights import load_arrays

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class Traces(NamedTuple):
    """Per loop step, leading dim N; rows of steps not run hold the fill value in brackets."""
    state_norm: torch.Tensor  # (N, B, T) act dtype, ||h_t|| of the new state [0]
    halt_p: torch.Tensor  # (N, B, T) acc dtype, p_t [0]
    cum_p: torch.Tensor  # (N, B, T) acc dtype, c after the step [0]
    running: torch.Tensor  # (N, B, T) bool, running before the step (takes weight at it) [False]
    expert_idx: torch.Tensor  # (N, B, T, k) int32, slot order = descending biased logit [-1]
    router_margin: torch.Tensor  # (N, B, T) acc dtype, k-th minus (k+1)-th biased logit [+inf]
    value: torch.Tensor | None = None  # (N, B, T) model dtype, value head of RMSNorm_f(h_t) [0]; None: no value head
    attn_probs: torch.Tensor | None = None  # (N, B, H, T, S) acc dtype, looped block's attention [0]; on request


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V) model dtype
    loop_counts: torch.Tensor  # (B, T) int32, step at which the position halted (1-based), or N
    halted: torch.Tensor  # (B, T) bool, halted by its decision
    n_steps: int  # loop steps executed
    traces: Traces
    cache: KVCache | None = None  # the cache after this call (the same object, updated in place), or None
    values: torch.Tensor | None = None  # (B, T) model dtype, value head RMSNorm_f(y) w_v + b_v; None when off
    # (N, B, T, V) model dtype, step t's logits head(norm(coda(h_t))) of the state after step t (0 at steps not
    # run); None unless step_logits=True
    step_logits: torch.Tensor | None = None


class Mythos(nn.Module):
    """Prelude blocks, one looped block with ACT, coda blocks, tied (or separate) head."""

    def __init__(self, spec: Spec, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        d = spec.dim
        self.embed = nn.Embedding(spec.vocab_size, d, dtype=dtype)
        self.prelude = nn.ModuleList([make_block(spec, False, dtype=dtype) for _ in range(spec.prelude_layers)])
        looped = make_block(spec, spec.recurrent.ffn == "moe", dtype=dtype)
        self.recurrent = RecurrentBlock(spec, looped, dtype=dtype)
        self.coda = nn.ModuleList([make_block(spec, False, dtype=dtype) for _ in range(spec.coda_layers)])
        self.norm = RMSNorm(d, spec.norm_eps, dtype=dtype)
        self.head = None if spec.tie_embeddings else nn.Linear(d, spec.vocab_size, bias=False, dtype=dtype)
        self.value_head = nn.Linear(d, 1, dtype=dtype) if spec.value_head.enabled else None
        # RoPE tables from spec.rope_table, in the rotation dtype: float64 only for a float64 model
        # under mythos semantics (openmythos-0.5 rotates in float32, as open-mythos' x.float())
        rot = dtype if dtype == torch.float64 and spec.semantics == "mythos" else torch.float32
        cos, sin = rope_table(spec)
        self.register_buffer("rope_cos", torch.from_numpy(cos).to(rot), persistent=False)  # (max_seq_len, K/2)
        self.register_buffer("rope_sin", torch.from_numpy(sin).to(rot), persistent=False)
        self._rows: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}  # see _loop_rows
        self._compiled: Callable[..., ModelOutput] | None = None  # see generate.compiled_step
        # "for": the loop is `for t in range(N)` with a Python break (the default); "while": one
        # torch.while_loop (recurrent._run_steps) with the same early exit, for torch.export / ONNX and
        # torch.compile (inference; a call with a cache still runs the for loop). Equal results.
        self.loop_form = "for"
        self.sharding: Sharding | None = None  # sharding.Sharding(mesh, strategy) once sharding.shard split it

    def forward(self, ids: torch.Tensor, n_loops: int | None = None, *, early_exit: bool = True,
                force_halt: torch.Tensor | None = None, force_experts: torch.Tensor | None = None,
                cache: KVCache | None = None, start_pos: int = 0, attn_probs: bool = False,
                no_grad_steps: int = 0, attention_mask: torch.Tensor | None = None,
                step_logits: bool = False) -> ModelOutput:
        """Logits, loop counts and traces for token ids.

        Args:
            ids: (B, T) integer token ids, T <= spec.max_seq_len.
            n_loops: loop steps N (>= 1); None -> spec.recurrent.max_loop_iters.
            early_exit: stop once no position is running (the result equals running all N steps). With a
                cache: honoured under decode.halted_kv=freeze (the deeper cache layers get the frozen rows),
                ignored under compute (every step runs).
            force_halt: (B, T) int; s in 1..N halts the position at step s, 0 never by threshold, -1: not forced.
            force_experts: (N, B, T, k) int; routed experts of step t are force_experts[t] (-1: not forced).
            cache: a KVCache from init_cache(B, ..., N): ids sit at absolute positions start_pos..start_pos+T-1
                and see the cached positions before them; under decode.halted_kv=compute every loop step runs.
            start_pos: absolute position of ids[:, 0] (only with a cache).
            attn_probs: also return the looped block's attention probabilities per step (traces.attn_probs).
            no_grad_steps: the first no_grad_steps loop steps (0..N) run without gradient (truncated backprop).
            attention_mask: (B, start_pos + T) 0/1 (bool or int), 1 = real token, 0 = left padding: each row
                zeros then ones, at least one 1 (docs/semantics.md "Padding"). None: no padding. With a cache
                the prefill (start_pos 0) sets the padding, which the cache remembers (cache.pad); later
                calls may omit the mask or pass one that agrees with it.
            step_logits: also return every step's logits (ModelOutput.step_logits (N, B, T, V)): the N loop
                states stacked on the batch axis through the coda, norm and head in one pass. No cache.
        Returns:
            ModelOutput(logits (B, T, V), loop_counts (B, T) int32, halted (B, T) bool, n_steps, traces, cache,
            values (B, T) or None, step_logits (N, B, T, V) or None). Pads: loop count 0, never running; their
            logits (and step logits) are finite and meaningless.
        """
        return self._forward(*self._checked(ids, n_loops, early_exit, force_halt, force_experts, cache, start_pos,
                                            attn_probs, no_grad_steps, attention_mask, step_logits))

    def _checked(self, ids: torch.Tensor, n_loops: int | None = None, early_exit: bool = True,
                 force_halt: torch.Tensor | None = None, force_experts: torch.Tensor | None = None,
                 cache: KVCache | None = None, start_pos: int = 0, attn_probs: bool = False,
                 no_grad_steps: int = 0, attention_mask: torch.Tensor | None = None,
                 step_logits: bool = False) -> tuple:
        """forward's arguments checked (a clear error for bad input) -> _forward's arguments, in its order."""
        ids = self._check_ids(ids)
        N = self._check_loops(n_loops)
        B, T = ids.shape
        force_halt, force_experts = self._check_force(force_halt, force_experts, N, B, T)
        start_pos = self._check_cache(cache, start_pos, N, B, T)
        no_grad_steps = _check_no_grad_steps(no_grad_steps, N)
        pad = self._check_mask(attention_mask, cache, start_pos, B, T)
        step_logits = _check_step_logits(step_logits, cache)
        return (ids, N, early_exit, force_halt, force_experts, cache, start_pos, bool(attn_probs), no_grad_steps, pad,
                step_logits)

    def _forward(self, ids: torch.Tensor, N: int, early_exit: bool, force_halt: torch.Tensor | None,
                 force_experts: torch.Tensor | None, cache: KVCache | None, start_pos: int,
                 attn_probs: bool = False, no_grad_steps: int = 0, pad: torch.Tensor | None = None,
                 step_logits: bool = False) -> ModelOutput:
        """forward after its checks (generate's decode steps call it directly); pad (B,) or None: no padding.
        early_exit with a cache: honoured under decode.halted_kv=freeze, ignored under compute. step_logits:
        no cache (checked)."""
        T = ids.shape[1]
        if pad is None:  # absolute positions start_pos..start_pos+T-1
            cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        else:  # left padding: slot s of row b sits at position s - pad[b] (pads at 0), (B, T, K/2) per row
            pos = (torch.arange(start_pos, start_pos + T, device=ids.device)[None, :] - pad[:, None]).clamp(min=0)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        if cache is not None:  # the prefill sets the padding the later calls use
            if pad is not None:
                cache.pad.copy_(pad)
            elif start_pos == 0:
                cache.pad.zero_()
        P = len(self.prelude)
        x = self.embed(ids)  # (B, T, D)
        for i, block in enumerate(self.prelude):
            x, _, _ = block(x, cos, sin, cache=cache, layer=i, start_pos=start_pos, pad=pad)
        y, counts, halted, n_steps, traces, cache, states = self.loop(
            x, cos, sin, N, early_exit, force_halt, force_experts, cache, start_pos, attn_probs, no_grad_steps, pad,
            step_states=step_logits)
        logits, y = self.readout(y, cos, sin, cache=cache, layer=P + N, start_pos=start_pos, pad=pad)
        values = None if self.value_head is None else self.value_head(y).squeeze(-1)  # (B, T)
        per_step = None
        if step_logits:  # the N states (N, B, T, D) as one batch of N * B rows through the coda, norm and head
            B = ids.shape[0]
            tile = (lambda a: a) if cos.dim() < 3 else (lambda a: a.repeat(N, 1, 1))  # per-row RoPE (left padding)
            flat = self.readout(states.reshape(N * B, *states.shape[2:]), tile(cos), tile(sin),
                                pad=None if pad is None else pad.repeat(N))[0]  # (N * B, T, V)
            run = (torch.arange(N, device=ids.device) < n_steps)[:, None, None, None]  # steps not run hold 0
            per_step = torch.where(run, flat.view(N, B, *flat.shape[1:]), torch.zeros((), dtype=flat.dtype,
                                                                                       device=flat.device))
        return ModelOutput(logits, counts, halted, n_steps, traces, cache, values, per_step)

    def readout(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cache: KVCache | None = None,
                layer: int = 0, start_pos: int = 0, pad: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The coda (cache layers layer..), final norm and head: y (B, T, D) -> (logits (B, T, V), RMSNorm_f(coda(y)))."""
        for j, block in enumerate(self.coda):
            y, _, _ = block(y, cos, sin, cache=cache, layer=layer + j, start_pos=start_pos, pad=pad)
        y = self.norm(y)
        return (F.linear(y, self.embed.weight) if self.head is None else self.head(y)), y  # (B, T, V)

    def loop(self, e: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, N: int, early_exit: bool,
             force_halt: torch.Tensor | None, force_experts: torch.Tensor | None, cache: KVCache | None = None,
             start_pos: int = 0, attn_probs: bool = False, no_grad_steps: int = 0, pad: torch.Tensor | None = None,
             *, step_states: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, Traces, KVCache | None, torch.Tensor | None]:
        """The recurrent loop with ACT (sections 3-4): e (B, T, D) -> y, loop counts, halted, n_steps, traces, cache,
        and with step_states every step's new state h_t stacked (N, B, T, D) (steps not run: 0), else None.

        pad (B,): left padding; pads start not running (weight 0, loop count 0), so they never keep the loop alive.
        decode.halted_kv=freeze: positions not running keep their state and attention rows (docs/semantics.md
        "Halted tokens at deeper loop steps"); with a cache the call may then stop early, the skipped steps'
        cache layers get the frozen rows. Under compute a call with a cache runs every step.
        """
        s, rec = self.spec, self.recurrent
        B, T, _ = e.shape
        act, dev = acc_dtype(e.dtype), e.device
        halted_frozen = s.decode.halted_kv == "freeze"
        # under torch.export (the ONNX decode-step graph) a cached freeze call runs every step, frozen where halted:
        # the same logits and cache, no data-dependent break
        early_exit = early_exit and (cache is None or (halted_frozen and not torch.compiler.is_exporting()))
        # loop-embedding rows from spec.loop_table (float64 angles; activation dtype under openmythos-0.5)
        rows = self._loop_rows(N, e.dtype)  # (N, D): zero past the first L channels
        P = len(self.prelude)
        value = None if self.value_head is None else lambda h: self.value_head(self.norm(h)).squeeze(-1)
        memory = None
        if rec.cross_loop is not None:  # cross-loop depth memory (N + 1 entries), entry 0 = e
            memory = tuple(torch.cat([x[None], x.new_zeros(N, *x.shape)]) for x in rec.cross_loop.entry(e))
        false = torch.zeros(B, T, dtype=torch.bool, device=dev)
        counts = torch.full((B, T), N, dtype=torch.int32, device=dev)
        running = ~false
        if pad is not None:  # pads (slot < pad) never run: loop count 0
            running = torch.arange(start_pos, start_pos + T, device=dev)[None, :] >= pad[:, None]
            counts = torch.where(running, counts, 0)
        state = LoopState(h=e, y=torch.zeros_like(e), c=torch.zeros(B, T, dtype=act, device=dev), running=running,
                          halted=false, counts=counts, cache=cache,
                          memory=memory, summaries=None)  # None: step 0 reads only the compressor's null slot
        if self.loop_form == "while" and cache is None:
            if self.sharding is not None:  # torch.while_loop compiles its body: no FSDP hooks, DTensors, collectives
                raise ValueError('loop_form="while" (one torch.while_loop, for torch.export / ONNX) does not run on a '
                                 'sharded model (sharding.shard); use loop_form="for" (the default)')
            if step_states:
                raise ValueError('step_logits=True runs with loop_form="for" (the default); loop_form="while" is '
                                 'for torch.export / ONNX')
            return (*self._loop_while(state, e, rows, cos, sin, N, early_exit, force_halt, force_experts, attn_probs,
                                      no_grad_steps, value, pad, halted_frozen), None)
        steps: list[tuple[torch.Tensor | None, ...]] = []
        states: list[torch.Tensor] = []  # step_states: h_t after each step
        for t in range(N):
            fx = None if force_experts is None else force_experts[t]
            args = (rec, state, t, e, rows[t], cos, sin, fx, force_halt)
            kw = dict(halting=s.halting, last=t == N - 1, start_pos=start_pos, layer=P + t, attn_probs=attn_probs,
                      value=value, pad=pad, freeze=halted_frozen)
            # truncated backprop: the first no_grad_steps steps (and all they produce) carry no gradient
            with torch.no_grad() if t < no_grad_steps else contextlib.nullcontext():
                if s.recurrent.checkpoint and cache is None and torch.is_grad_enabled():
                    # recompute the step in the backward pass (ARCHITECTURE.md 5f); same gradients
                    state, trace = torch.utils.checkpoint.checkpoint(loop_step, *args, use_reentrant=False, **kw)
                else:
                    state, trace = loop_step(*args, **kw)
            steps.append(trace)
            if step_states:
                states.append(state.h)
            # under compute with a cache every step runs, so later tokens find cache entries at every depth;
            # sharded, every rank runs until no position of any batch shard is running (the same collectives)
            if early_exit and not any_running(self.sharding, state.running):
                break
        if halted_frozen and cache is not None:  # the skipped steps' layers: every position's frozen rows
            for t in range(len(steps), N):
                write_frozen(rec, cache, state.h, state.rows, _row_names(s), t, layer=P + t, start_pos=start_pos)
        fills = (0, 0, 0, False, -1, float("inf"), 0, 0)
        traces = Traces(*(None if col[0] is None else _stack_steps(list(col), N, fill)
                          for col, fill in zip(zip(*steps), fills)))
        stacked = _stack_steps(states, N, 0) if step_states else None
        return state.y, state.counts, state.halted, len(steps), traces, state.cache, stacked

    def _loop_while(self, state: LoopState, e: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, N: int, early_exit: bool, force_halt: torch.Tensor | None,
                    force_experts: torch.Tensor | None, attn_probs: bool, no_grad_steps: int,
                    value: Callable[[torch.Tensor], torch.Tensor] | None, pad: torch.Tensor | None = None,
                    freeze: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Traces, None]:
        """loop() as one torch.while_loop (loop_form="while", no cache): the jax twin's loop; n_steps a 0-d tensor."""
        s, rec = self.spec, self.recurrent
        if no_grad_steps or (torch.is_grad_enabled() and self.embed.weight.requires_grad):
            raise ValueError('loop_form="while" is for inference and export: run it under torch.no_grad() '
                             '(truncated backprop and training use loop_form="for")')
        B, T, _ = e.shape
        act, dev = acc_dtype(e.dtype), e.device
        if rec.compressor is not None:  # step t-1's summaries, all zeros (and masked) at step 0, as in the jax twin
            cp = s.recurrent.compressor
            state = state._replace(summaries=e.new_zeros(B, T // cp.chunk, cp.n_summaries, s.dim))
        if freeze:  # the carried attention rows ride in the carry from step 0 (zeros, replaced at step 0)
            state = state._replace(rows=tuple(e.new_zeros(cache_shapes(s, B, T, N)[n][1:]) for n in _row_names(s)))
        P = len(self.prelude)

        def step(state: LoopState, t: torch.Tensor) -> tuple[LoopState, tuple[torch.Tensor | None, ...]]:
            at = t.view(1)
            fx = None if force_experts is None else force_experts.index_select(0, at)[0]
            return loop_step(rec, state, t, e, rows.index_select(0, at)[0], cos, sin, fx, force_halt,
                             halting=s.halting, last=t == N - 1, start_pos=0, layer=P, attn_probs=attn_probs,
                             value=value, pad=pad, freeze=freeze)

        k = s.moe.top_k if s.recurrent.ffn == "moe" else 0
        fills = Traces(e.new_zeros(B, T), e.new_zeros(B, T, dtype=act), e.new_zeros(B, T, dtype=act),
                       torch.zeros(B, T, dtype=torch.bool, device=dev),
                       torch.full((B, T, k), -1, dtype=torch.int32, device=dev),
                       torch.full((B, T), float("inf"), dtype=act, device=dev),
                       None if value is None else e.new_zeros(B, T),
                       e.new_zeros(B, s.attention.n_heads, T, T, dtype=act) if attn_probs else None)
        state, traces, n_steps = _run_steps(step, state, fills, N, early_exit)
        return state.y, state.counts, state.halted, n_steps, Traces(*traces), None

    def _loop_rows(self, N: int, dtype: torch.dtype) -> torch.Tensor:
        """spec.loop_table(spec, N) zero-padded to (N, D), in dtype on the model's device, made once per (N, dtype)."""
        key = (N, dtype, self.embed.weight.device)
        if key not in self._rows:
            table = torch.from_numpy(loop_table(self.spec, N, DTYPE_NAMES[dtype])).to(dtype)
            self._rows[key] = F.pad(table, (0, self.spec.dim - table.shape[-1])).to(self.embed.weight.device)
        return self._rows[key]

    def init_cache(self, batch: int, max_len: int | None = None, n_loops: int | None = None) -> KVCache:
        """An empty (zero) KVCache for `batch` sequences of up to max_len positions and n_loops loop steps.

        Args:
            batch: sequences B.
            max_len: capacity S in positions, 1..spec.max_seq_len (None: max_seq_len).
            n_loops: loop steps N of the calls that use it (None: recurrent.max_loop_iters).
        Returns:
            KVCache with one entry per attention layer (prelude, N loop steps, coda), in the model dtype.
        """
        s = self.spec
        S = s.max_seq_len if max_len is None else max_len
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise ValueError(f"init_cache: batch={batch!r} must be an integer >= 1")
        if isinstance(S, bool) or not isinstance(S, numbers.Integral) or not 1 <= S <= s.max_seq_len:
            raise ValueError(f"init_cache: max_len={max_len!r} must be an integer in 1..max_seq_len={s.max_seq_len}")
        w = self.embed.weight
        N = self._check_loops(n_loops)
        if self.sharding is not None and "tp" in self.sharding.strategy and s.attention.type == "gqa":
            # tensor parallel: this rank's kv heads only (sharding.py splits wk, wv on their heads), allocated
            # as such (a whole cache first would cost the memory tp saves)
            n = self.sharding.mesh["model"].size()
            shapes = {k: (*sh[:3], sh[3] // n, *sh[4:]) if k in ("k", "v") else sh
                      for k, sh in cache_shapes(s, int(batch), int(S), N).items()}
            return KVCache({k: torch.zeros(sh, dtype=w.dtype, device=w.device) for k, sh in shapes.items()}, N)
        return init_cache(s, int(batch), int(S), N, w.dtype, w.device)  # cache.init_cache

    def generate(self, ids: torch.Tensor, max_new_tokens: int, n_loops: int | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None, *,
                 on_token: Callable[[np.ndarray], None] | None = None, compile: bool | None = None,
                 attention_mask: torch.Tensor | None = None, stop: Sequence[Sequence[int]] | None = None
                 ) -> torch.Tensor:
        """Decode with a KV cache: the prompt, then one token per step; generate.generate(self, ...) has the Args
        (compile=None: compiled decode steps where that is correct, generate.compile_by_default)."""
        return generate(self, ids, max_new_tokens, n_loops, temperature, top_k, top_p, seed, eos_id, on_token=on_token,
                        compile=compile, attention_mask=attention_mask, stop=stop)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids as a (B, T) int64 tensor within the vocabulary and max_seq_len, or a clear ValueError."""
        ids = torch.as_tensor(ids, device=self.embed.weight.device)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids must have shape (B, T) with T >= 1, got {tuple(ids.shape)}")
        if ids.shape[1] > self.spec.max_seq_len:
            raise ValueError(f"ids has T={ids.shape[1]} tokens, more than max_seq_len={self.spec.max_seq_len}")
        ids = ids.long()
        if _concrete() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            raise ValueError(f"ids must lie in [0, vocab_size={self.spec.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids

    def _check_loops(self, n_loops: int | None) -> int:
        """n_loops or the spec default, >= 1."""
        if n_loops is None:
            return self.spec.recurrent.max_loop_iters
        if isinstance(n_loops, bool) or not isinstance(n_loops, numbers.Integral) or n_loops < 1:
            raise ValueError(f"n_loops={n_loops!r} must be an integer >= 1 (None means "
                             f"recurrent.max_loop_iters={self.spec.recurrent.max_loop_iters})")
        return int(n_loops)

    def _check_cache(self, cache: KVCache | None, start_pos: int, N: int, B: int, T: int) -> int:
        """start_pos as an int, after checking it and the cache against the call, or a clear ValueError."""
        if isinstance(start_pos, bool) or not isinstance(start_pos, numbers.Integral) or start_pos < 0:
            raise ValueError(f"start_pos={start_pos!r} must be an integer >= 0")
        if cache is None:
            if start_pos != 0:
                raise ValueError(f"start_pos={start_pos} needs a cache holding positions 0..{start_pos - 1} "
                                 "(model.init_cache)")
            return 0
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache from model.init_cache, got {type(cache).__name__}")
        if cache.n_loops != N:
            raise ValueError(f"the cache holds n_loops={cache.n_loops} loop steps but the call runs n_loops={N}")
        if cache.batch != B:
            raise ValueError(f"the cache holds batch={cache.batch} sequences but ids has B={B}")
        if start_pos + T > cache.capacity:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed the cache capacity of "
                             f"{cache.capacity} positions (init_cache(max_len=...), at most max_seq_len="
                             f"{self.spec.max_seq_len})")
        w = self.embed.weight
        for name, a in cache.arrays.items():
            if a.dtype != w.dtype or a.device != w.device:
                raise ValueError(f"cache {name!r} is {a.dtype} on {a.device}, the model {w.dtype} on {w.device}")
        return int(start_pos)

    def _check_force(self, force_halt: torch.Tensor | None, force_experts: torch.Tensor | None, N: int, B: int,
                     T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Shape and range checks of the replay inputs; returns both as int64 tensors on the model's device."""
        k = self.spec.moe.top_k if self.spec.recurrent.ffn == "moe" else 0
        dev = self.embed.weight.device
        if force_experts is not None:
            force_experts = torch.as_tensor(force_experts, device=dev).long()
            if tuple(force_experts.shape) != (N, B, T, k):
                raise ValueError(f"force_experts must have shape (N, B, T, k) = {(N, B, T, k)}, "
                                 f"got {tuple(force_experts.shape)}")
            # -1, the trace fill of steps not run, is allowed: such a position keeps its top-k choice
            E = self.spec.moe.n_experts
            if _concrete() and force_experts.numel() and (int(force_experts.min()) < -1 or int(force_experts.max()) >= E):
                raise ValueError(f"force_experts must name experts in 0..{E - 1} (or -1: not forced), got values "
                                 f"in [{int(force_experts.min())}, {int(force_experts.max())}]")
        if force_halt is None:
            return None, force_experts
        force_halt = torch.as_tensor(force_halt, device=dev)
        if tuple(force_halt.shape) != (B, T):
            raise ValueError(f"force_halt must have shape (B, T) = {(B, T)}, got {tuple(force_halt.shape)}")
        force_halt = force_halt.long()
        if _concrete() and (int(force_halt.min()) < -1 or int(force_halt.max()) > N):
            raise ValueError(f"force_halt values must lie in -1..N={N} (0: never halt by threshold, -1: not "
                             f"forced), got [{int(force_halt.min())}, {int(force_halt.max())}]")
        if self.spec.halting.mode == "last" and _concrete() and force_halt.numel() and int(force_halt.max()) > 0:
            # 0 and -1 (never halt, not forced) are what parity's replay passes: they agree with nothing halting
            raise ValueError(f"force_halt is refused under halting.mode='last': no position halts (every one runs all "
                             f"N={N} steps), so a forced loop count 1..N cannot be replayed; got values up to "
                             f"{int(force_halt.max())} (only 0 or -1 are accepted)")
        return force_halt, force_experts

    def _check_mask(self, attention_mask: torch.Tensor | None, cache: KVCache | None, start_pos: int, B: int,
                    T: int) -> torch.Tensor | None:
        """Each row's left padding pad (B,) int64 from attention_mask (B, start_pos + T), or None when no row is
        padded (the unpadded path); with a cache and no mask, the cache's. A clear ValueError otherwise."""
        if attention_mask is None:
            if cache is None or start_pos == 0 or not _concrete() or not bool(cache.pad.any()):
                return None
            return cache.pad
        m = torch.as_tensor(attention_mask, device=self.embed.weight.device)
        want = (B, start_pos + T)
        if tuple(m.shape) != want:
            raise ValueError(f"attention_mask must have shape (B, start_pos + T) = {want} (1 = real token, 0 = left "
                             f"padding), got {tuple(m.shape)}")
        if m.dtype.is_floating_point or m.dtype.is_complex:
            raise ValueError(f"attention_mask must be bool or integer 0/1, got dtype {m.dtype}")
        m = m.long()
        if not _concrete():  # torch.export: symbolic values, taken as checked
            pad = (m == 0).sum(-1)
        else:
            pad = _mask_pad(m.cpu().numpy()).to(m.device)
        if cache is not None and start_pos > 0 and _concrete() and not torch.equal(pad, cache.pad):
            b = int((pad != cache.pad).nonzero()[0, 0])
            raise ValueError(f"attention_mask disagrees with the cache: row {b} has {int(pad[b])} leading zeros, its "
                             f"prefill had {int(cache.pad[b])} (the prefix must be the prefill's mask, the new "
                             "columns ones; or omit attention_mask: the cache remembers it)")
        if _concrete() and not bool(pad.any()):
            return None
        if self.recurrent.compressor is not None:
            raise ValueError("attention_mask with left padding is refused by recurrent.compressor (the context "
                             "compressor): its chunks start at absolute slots, so padding would change the real "
                             "tokens' summaries; pass unpadded rows (or turn recurrent.compressor.enabled off)")
        return pad


def _mask_pad(m: np.ndarray) -> torch.Tensor:
    """The left padding (B,) int64 of a 0/1 mask (B, S) (zeros then ones, at least one 1), or a clear ValueError."""
    if m.size and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"attention_mask must hold 0/1 values (1 = real token, 0 = padding), got values in "
                         f"[{int(m.min())}, {int(m.max())}]")
    for b, row in enumerate(m):
        if not row.any():
            raise ValueError(f"attention_mask row {b} is all zeros: every row needs at least one real token (a 1)")
        if (np.diff(row) < 0).any():
            raise ValueError(f"attention_mask row {b} is not left-padded (zeros then ones): {row.tolist()}; only "
                             "left padding is supported (pad on the left, tokenizer padding_side='left')")
    return torch.from_numpy((m == 0).sum(-1).astype(np.int64))


def _concrete() -> bool:
    """Whether tensors hold values to check: not under torch.export, where ids are symbolic (jax: _concrete)."""
    return not torch.compiler.is_exporting()


def _check_no_grad_steps(k: int, N: int) -> int:
    """no_grad_steps as an int in 0..N, or a clear ValueError."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= N:
        raise ValueError(f"no_grad_steps={k!r} must be an integer in 0..n_loops={N}")
    return int(k)


def _check_step_logits(step_logits: bool, cache: KVCache | None) -> bool:
    """step_logits as a bool, refused with a cache (a ValueError naming step_logits)."""
    if not isinstance(step_logits, (bool, np.bool_)):
        raise ValueError(f"step_logits={step_logits!r} must be a bool")
    if step_logits and cache is not None:
        raise ValueError("step_logits=True is refused with a cache: the step-wise logits run every loop state "
                         "through the coda without one (call forward without cache=...)")
    return bool(step_logits)


def _row_names(spec: Spec) -> tuple[str, str]:
    """The looped attention's per-token cache rows (decode.halted_kv=freeze carries them): GQA k, v; MLA c_kv, k_r."""
    return ("k", "v") if spec.attention.type == "gqa" else ("c_kv", "k_r")


def _stack_steps(rows: list[torch.Tensor], n: int, fill: float | bool | int) -> torch.Tensor:
    """Stack per-step rows to (n, ...), steps not run filled with `fill`."""
    x = torch.stack(rows)
    return x if len(rows) == n else torch.cat([x, x.new_full((n - len(rows), *x.shape[1:]), fill)])


def build(spec: Spec, seed: int = 0, dtype: str = "float32",
          weights: Mapping[str, np.ndarray] | None = None) -> Mythos:
    """A Mythos model in dtype ("float32" | "float64" | "bfloat16") holding spec.init_arrays(spec, seed) or weights."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    model = Mythos(spec, dtype=DTYPES[dtype])
    load_arrays(model, init_arrays(spec, seed) if weights is None else weights)
    return model


def forward(model: Mythos, ids: torch.Tensor, n_loops: int | None = None, *, early_exit: bool = True,
            force_halt: torch.Tensor | None = None, force_experts: torch.Tensor | None = None,
            cache: KVCache | None = None, start_pos: int = 0, attn_probs: bool = False,
            no_grad_steps: int = 0, attention_mask: torch.Tensor | None = None,
            step_logits: bool = False) -> ModelOutput:
    """model(ids, ...): the same call as the JAX twin's compiled forward."""
    return model(ids, n_loops, early_exit=early_exit, force_halt=force_halt, force_experts=force_experts,
                 cache=cache, start_pos=start_pos, attn_probs=attn_probs, no_grad_steps=no_grad_steps,
                 attention_mask=attention_mask, step_logits=step_logits)
