"""The whole model: prelude, recurrent loop with ACT, coda, tied head (ARCHITECTURE.md section 1)."""

from __future__ import annotations

import functools
import numbers
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spec import Spec, cache_shapes, init_arrays, loop_table, rope_table

from .attention import ATTENTION_OUT
from .block import make_block
from .cache import KVCache, init_cache
from .experts import EXPERT_OUT
from .generate import TRACE_COUNTS, _cached_forward, _split, generate
from .layers import RMSNorm, acc_dtype
from .moe import MoE
from .precision import autocast_trace, mm_einsum, native_bf16_dots, x64_enabled
from .recurrent import LoopState, RecurrentBlock, _run_steps, loop_step, write_frozen
from .sharding import _constrain, _place_cache
from .weights import load_arrays

DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}

# what a loop step's backward keeps from its forward (the rest is recomputed): the weight matmuls' outputs,
# the routed experts' output and the attention core's output (custom VJPs are not dots to
# the policy: without the names the backward ran the experts' and the attention's forward again)
_STEP_POLICY = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(EXPERT_OUT, ATTENTION_OUT))


class Traces(NamedTuple):
    """Per loop step, leading dim N; rows of steps not run hold the fill value in brackets."""
    state_norm: jax.Array  # (N, B, T) act dtype, ||h_t|| of the new state [0]
    halt_p: jax.Array  # (N, B, T) acc dtype, p_t [0]
    cum_p: jax.Array  # (N, B, T) acc dtype, c after the step [0]
    running: jax.Array  # (N, B, T) bool, running before the step (takes weight at it) [False]
    expert_idx: jax.Array  # (N, B, T, k) int32, slot order = descending biased logit [-1]
    router_margin: jax.Array  # (N, B, T) acc dtype, k-th minus (k+1)-th biased logit [+inf]
    value: jax.Array | None = None  # (N, B, T) model dtype, value head of RMSNorm_f(h_t) [0]; None: no value head
    attn_probs: jax.Array | None = None  # (N, B, H, T, S) acc dtype, looped block's attention [0]; on request


class ModelOutput(NamedTuple):
    logits: jax.Array  # (B, T, V) model dtype
    loop_counts: jax.Array  # (B, T) int32, step at which the position halted (1-based), or N
    halted: jax.Array  # (B, T) bool, halted by its decision
    n_steps: jax.Array  # () int32, loop steps executed
    traces: Traces
    cache: KVCache | None = None  # the updated cache (a new pytree; forward() consumes the one passed in), or None
    values: jax.Array | None = None  # (B, T) model dtype, value head RMSNorm_f(y) w_v + b_v; None when off
    # (N, B, T, V) model dtype, step t's logits head(norm(coda(h_t))) of the state after step t (0 at steps not
    # run); None unless step_logits=True
    step_logits: jax.Array | None = None


class Mythos(nnx.Module):
    """Prelude blocks, one looped block with ACT, coda blocks, tied (or separate) head."""

    def __init__(self, spec: Spec, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.spec = spec
        d = spec.dim
        self.embed = nnx.Embed(spec.vocab_size, d, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.prelude = nnx.List([make_block(spec, False, dtype=dtype, rngs=rngs) for _ in range(spec.prelude_layers)])
        looped = make_block(spec, spec.recurrent.ffn == "moe", dtype=dtype, rngs=rngs)
        self.recurrent = RecurrentBlock(spec, looped, dtype=dtype, rngs=rngs)
        self.coda = nnx.List([make_block(spec, False, dtype=dtype, rngs=rngs) for _ in range(spec.coda_layers)])
        self.norm = RMSNorm(d, spec.norm_eps, dtype=dtype, rngs=rngs)
        self.head = None if spec.tie_embeddings else nnx.Linear(d, spec.vocab_size, use_bias=False, dtype=dtype,
                                                                param_dtype=dtype, rngs=rngs)
        self.value_head = nnx.Linear(d, 1, dtype=dtype, param_dtype=dtype, rngs=rngs) if spec.value_head.enabled \
            else None
        # RoPE tables from spec.rope_table, in the rotation dtype: float64 only for a float64 model
        # under mythos semantics (openmythos-0.5 rotates in float32, as open-mythos' x.float());
        # kept as NumPy, so they are compile-time constants rather than state
        self.rope_dtype = jnp.dtype(dtype) if dtype == jnp.float64 and spec.semantics == "mythos" \
            else jnp.dtype(jnp.float32)
        self.sharding = None  # sharding.Sharding(mesh, strategy) once sharding.shard placed it on a mesh
        # bf16 x bf16 dots with float32 sums, on the matrix units (precision.py: a plain bf16 dot is run in
        # float32 on XLA:CPU), and forward(..., autocast=True) of a float32 model; other dots unchanged
        native_bf16_dots(self)

    def __call__(self, ids: jax.Array, n_loops: int | None = None, *, early_exit: bool = True,
                 force_halt: jax.Array | None = None, force_experts: jax.Array | None = None,
                 cache: KVCache | None = None, start_pos: int | jax.Array = 0, attn_probs: bool = False,
                 no_grad_steps: int = 0, attention_mask: jax.Array | None = None,
                 step_logits: bool = False) -> ModelOutput:
        """Logits, loop counts and traces for token ids (uncompiled; `forward` is the compiled call).

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
            start_pos: absolute position of ids[:, 0] (only with a cache); may be traced.
            attn_probs: also return the looped block's attention probabilities per step (traces.attn_probs).
            no_grad_steps: the first no_grad_steps loop steps (0..N) run without gradient (truncated backprop);
                an int (static: 0 compiles no extra code) or, inside jit, a traced integer.
            attention_mask: (B, start_pos + T) 0/1 (bool or int), 1 = real token, 0 = left padding: each row
                zeros then ones, at least one 1 (docs/semantics.md "Padding"). None: no padding. With a cache
                the prefill (start_pos 0) sets the padding, which the cache remembers (cache.pad); later
                calls may omit the mask or pass one that agrees with it. Checked outside jit only.
            step_logits: also return every step's logits (ModelOutput.step_logits (N, B, T, V)): the N loop
                states stacked on the batch axis through the coda, norm and head in one pass. No cache.
        Returns:
            ModelOutput(logits (B, T, V), loop_counts (B, T) int32, halted (B, T) bool, n_steps () int32, traces,
            cache: the updated cache, values (B, T) or None, step_logits (N, B, T, V) or None). Pads: loop count
            0, never running; their logits (and step logits) are finite and meaningless.
        """
        ids = self._check_ids(jnp.asarray(ids))
        N = self._check_loops(n_loops)
        B, T = ids.shape
        force_halt, force_experts = self._check_force(force_halt, force_experts, N, B, T)
        start_pos = self._check_cache(cache, start_pos, N, B, T)
        no_grad_steps = _check_no_grad_steps(no_grad_steps, N)
        pad = self._check_mask(attention_mask, cache, start_pos, B, T)
        step_logits = _check_step_logits(step_logits, cache)
        return self._forward(ids, N, early_exit, force_halt, force_experts, cache, start_pos, bool(attn_probs),
                             no_grad_steps, pad, step_logits)

    def _forward(self, ids: jax.Array, N: int, early_exit: bool, force_halt: jax.Array | None,
                 force_experts: jax.Array | None, cache: KVCache | None, start_pos: int | jax.Array,
                 attn_probs: bool = False, no_grad_steps: int = 0, pad: jax.Array | None = None,
                 step_logits: bool = False) -> ModelOutput:
        """__call__ after its checks; pad (B,) or None: no padding. early_exit with a cache: honoured under
        decode.halted_kv=freeze, ignored under compute. step_logits: no cache (checked)."""
        T = ids.shape[1]
        # absolute positions start_pos..start_pos+T-1 (with a cache start_pos may be traced: a dynamic slice)
        cos, sin = _rope(self.spec, self.rope_dtype.name)
        S = T if cache is None else cache.capacity
        if cache is not None:
            cache = cache.copy()  # the caller's cache keeps its arrays; out.cache holds the updated ones
            # the prefill sets the padding the later calls use (pad None: no padding, as a start_pos 0 call says)
            cache.pad = jnp.zeros_like(cache.pad) if pad is None else pad.astype(jnp.int32)
        if pad is not None:  # left padding: slot s of row b sits at position s - pad[b] (pads at 0), (B, T, K/2)
            pos = jnp.maximum(start_pos + jnp.arange(T, dtype=jnp.int32)[None, :] - pad[:, None], 0)
            cos, sin = jnp.asarray(cos[:S])[pos], jnp.asarray(sin[:S])[pos]
        elif cache is None:
            cos, sin = jnp.asarray(cos[:T]), jnp.asarray(sin[:T])
        else:
            cos = jax.lax.dynamic_slice_in_dim(jnp.asarray(cos[:S]), start_pos, T)
            sin = jax.lax.dynamic_slice_in_dim(jnp.asarray(sin[:S]), start_pos, T)
        P = len(self.prelude)
        # on a mesh the activations stay split on their batch axis (sharding.py; a no-op on one device)
        x = _constrain(self.sharding, self.embed(ids))  # (B, T, D)
        for i, block in enumerate(self.prelude):
            x = _constrain(self.sharding, block(x, cos, sin, cache=cache, layer=i, start_pos=start_pos, pad=pad)[0])
        y, counts, halted, n_steps, traces, cache, states = self.loop(
            x, cos, sin, N, early_exit, force_halt, force_experts, cache, start_pos, attn_probs, no_grad_steps, pad,
            step_states=step_logits)
        logits, y = self.readout(y, cos, sin, cache=cache, layer=P + N, start_pos=start_pos, pad=pad)
        values = None if self.value_head is None else self.value_head(y)[..., 0]  # (B, T)
        if cache is not None and self.sharding is not None:  # the updated cache placed as init_cache placed it
            cache = _place_cache(self, cache, jax.lax.with_sharding_constraint)
        per_step = None
        if step_logits:  # the N states (N, B, T, D) as one batch of N * B rows through the coda, norm and head
            B = ids.shape[0]
            tile = lambda a: a if a.ndim < 3 else jnp.tile(a, (N, 1, 1))  # per-row RoPE tables (left padding)
            flat = self.readout(states.reshape(N * B, *states.shape[2:]), tile(cos), tile(sin),
                                pad=None if pad is None else jnp.tile(pad, N))[0]  # (N * B, T, V)
            run = (jnp.arange(N) < n_steps)[:, None, None, None]  # steps not run (early exit) hold 0
            per_step = jnp.where(run, flat.reshape(N, B, *flat.shape[1:]), jnp.zeros((), flat.dtype))
        return ModelOutput(logits, counts, halted, n_steps, traces, cache, values, per_step)

    def readout(self, y: jax.Array, cos: jax.Array, sin: jax.Array, *, cache: KVCache | None = None,
                layer: int = 0, start_pos: int | jax.Array = 0, pad: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
        """The coda (cache layers layer..), final norm and head: y (B, T, D) -> (logits (B, T, V), RMSNorm_f(coda(y)))."""
        for j, block in enumerate(self.coda):
            y = _constrain(self.sharding, block(y, cos, sin, cache=cache, layer=layer + j, start_pos=start_pos,
                                                pad=pad)[0])
        y = self.norm(y)
        if self.head is None:
            return mm_einsum("btd,vd->btv", y, self.embed.embedding[...]), y  # (B, T, V), tied head E^T
        return self.head(y), y

    def loop(self, e: jax.Array, cos: jax.Array, sin: jax.Array, N: int, early_exit: bool,
             force_halt: jax.Array | None, force_experts: jax.Array | None, cache: KVCache | None = None,
             start_pos: int | jax.Array = 0, attn_probs: bool = False, no_grad_steps: int | jax.Array = 0,
             pad: jax.Array | None = None, *, step_states: bool = False
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, Traces, KVCache | None, jax.Array | None]:
        """The recurrent loop with ACT (sections 3-4): e (B, T, D) -> y, loop counts, halted, n_steps, traces, cache,
        and with step_states every step's new state h_t stacked (N, B, T, D) (steps not run: 0), else None.

        pad (B,): left padding; pads start not running (weight 0, loop count 0), so they never keep the loop alive.
        decode.halted_kv=freeze: positions not running keep their state and attention rows (docs/semantics.md
        "Halted tokens at deeper loop steps"); with a cache the call may then stop early, the skipped steps'
        cache layers get the frozen rows. Under compute a call with a cache runs every step.
        """
        s, rec = self.spec, self.recurrent
        B, T, _ = e.shape
        act = acc_dtype(e.dtype)
        halted_frozen = s.decode.halted_kv == "freeze"
        early_exit = early_exit and (cache is None or halted_frozen)
        # loop-embedding rows from spec.loop_table (float64 angles; activation dtype under openmythos-0.5)
        table = loop_table(s, N, e.dtype.name)
        rows = jnp.asarray(np.pad(table, ((0, 0), (0, s.dim - table.shape[-1]))).astype(e.dtype))  # (N, D): zero past L
        P = len(self.prelude)
        value = None if self.value_head is None else lambda h: self.value_head(self.norm(h))[..., 0]

        def step(state: LoopState, t: jax.Array) -> tuple[LoopState, Traces]:
            fx = None if force_experts is None else force_experts[t]
            args = (rec, state, t, e, rows[t], cos, sin, fx, force_halt)
            kw = dict(halting=s.halting, last=t == N - 1, start_pos=start_pos, layer=P + t, attn_probs=attn_probs,
                      value=value, pad=pad, freeze=halted_frozen)
            state, trace = loop_step(*args, **kw)
            state = state._replace(h=_constrain(self.sharding, state.h), y=_constrain(self.sharding, state.y))
            trace = Traces(*trace)
            if not isinstance(no_grad_steps, int) or no_grad_steps > 0:
                # truncated backprop: what the first no_grad_steps steps produce carries no gradient
                def freeze(x: jax.Array) -> jax.Array:
                    if not jnp.issubdtype(x.dtype, jnp.floating):
                        return x
                    return jnp.where(t < no_grad_steps, jax.lax.stop_gradient(x), x)
                # the cache rides along unfrozen
                frozen, trace = jax.tree.map(freeze, (state._replace(cache=None), trace))
                state = frozen._replace(cache=state.cache)
            return state, (trace, state.h) if step_states else trace

        if s.recurrent.checkpoint and cache is None:
            step = jax.checkpoint(step)  # recompute each loop step in the backward pass (ARCHITECTURE.md 5f)
        elif cache is None and self.sharding is None and not _expert_parallel(rec):
            # a backward keeps each step's weight matmuls and recomputes the rest (elementwise work, attention):
            # less memory traffic, so faster here (bench-s-gqa forward+backward 1005 -> 915 ms CPU, XLA
            # temporaries 447 -> 198 MiB; issue 18); the same gradients, and no effect on a forward. Not on a
            # mesh: the recomputation would repeat the step's collectives (expert parallelism's all-to-alls)
            step = jax.checkpoint(step, policy=_STEP_POLICY)
        memory = None
        if rec.cross_loop is not None:  # cross-loop depth memory (N + 1 entries), entry 0 = e
            memory = tuple(jnp.zeros((N + 1, *x.shape), x.dtype).at[0].set(x) for x in rec.cross_loop.entry(e))
        summaries = None
        if rec.compressor is not None and cache is None:  # step t-1's summaries (masked at step 0)
            cp = s.recurrent.compressor
            summaries = jnp.zeros((B, T // cp.chunk, cp.n_summaries, s.dim), e.dtype)
        counts = jnp.full((B, T), N, dtype=jnp.int32)
        running = jnp.ones((B, T), dtype=jnp.bool_)
        if pad is not None:  # pads (slot < pad) never run: loop count 0
            running = (start_pos + jnp.arange(T, dtype=jnp.int32))[None, :] >= pad[:, None]
            counts = jnp.where(running, counts, 0)
        # freeze: the carried attention rows ride in the carry from step 0 (zeros, replaced at step 0)
        kv_rows = None
        if halted_frozen:
            kv_rows = tuple(jnp.zeros(cache_shapes(s, B, T, N)[n][1:], e.dtype) for n in _row_names(s))
        state = LoopState(e, jnp.zeros_like(e), jnp.zeros((B, T), dtype=act), running,
                          jnp.zeros((B, T), dtype=jnp.bool_), counts, cache, memory,
                          summaries, kv_rows)
        k = s.moe.top_k if s.recurrent.ffn == "moe" else 0
        S = T if cache is None else cache.capacity
        fills = Traces(jnp.zeros((B, T), dtype=e.dtype), jnp.zeros((B, T), dtype=act), jnp.zeros((B, T), dtype=act),
                       jnp.zeros((B, T), dtype=jnp.bool_), jnp.full((B, T, k), -1, dtype=jnp.int32),
                       jnp.full((B, T), jnp.inf, dtype=act),
                       None if self.value_head is None else jnp.zeros((B, T), dtype=e.dtype),
                       jnp.zeros((B, s.attention.n_heads, T, S), dtype=act) if attn_probs else None)
        if step_states:  # the states ride beside the traces rows (a scan output, fixed buffers under early exit)
            fills = (fills, jnp.zeros_like(e))
        # under compute with a cache every step runs (a scan), so later tokens find cache entries at every depth
        state, traces, n_steps = _run_steps(step, state, fills, N, early_exit, first=cache is not None)
        traces, states = traces if step_states else (traces, None)
        cache = state.cache
        if halted_frozen and cache is not None:  # the skipped steps' layers n_steps..N-1: the frozen rows
            def skipped(t: jax.Array, cache: KVCache) -> KVCache:
                return write_frozen(rec, cache, state.h, state.rows, _row_names(s), t, layer=P + t, start_pos=start_pos)
            cache = jax.lax.fori_loop(n_steps, N, skipped, cache)
        return state.y, state.counts, state.halted, n_steps, traces, cache, states

    def init_cache(self, batch: int, max_len: int | None = None, n_loops: int | None = None) -> KVCache:
        """An empty (zero) KVCache for `batch` sequences of up to max_len positions and n_loops loop steps.

        Args:
            batch: sequences B.
            max_len: capacity S in positions, 1..spec.max_seq_len (None: max_seq_len).
            n_loops: loop steps N of the calls that use it (None: recurrent.max_loop_iters).
        Returns:
            KVCache with one entry per attention layer (prelude, N loop steps, coda), in the model dtype; on a
            sharded model (sharding.shard) placed on its mesh, split on the batch axis.
        """
        s = self.spec
        S = s.max_seq_len if max_len is None else max_len
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise ValueError(f"init_cache: batch={batch!r} must be an integer >= 1")
        if isinstance(S, bool) or not isinstance(S, numbers.Integral) or not 1 <= S <= s.max_seq_len:
            raise ValueError(f"init_cache: max_len={max_len!r} must be an integer in 1..max_seq_len={s.max_seq_len}")
        cache = init_cache(s, int(batch), int(S), self._check_loops(n_loops), self.embed.embedding.dtype)  # cache.py
        # a sharded model's cache: split on its batch axis over the batch axes (and kv heads under tp)
        return cache if self.sharding is None else _place_cache(self, cache)

    def generate(self, ids: jax.Array, max_new_tokens: int, n_loops: int | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None, *,
                 on_token: Callable[[np.ndarray], None] | None = None, attention_mask: jax.Array | None = None,
                 stop: Sequence[Sequence[int]] | None = None) -> jax.Array:
        """Decode with a KV cache: the prompt, then one token per step; generate.generate(self, ...) has the Args."""
        return generate(self, ids, max_new_tokens, n_loops, temperature, top_k, top_p, seed, eos_id, on_token=on_token,
                        attention_mask=attention_mask, stop=stop)

    def _check_ids(self, ids: jax.Array) -> jax.Array:
        """ids as a (B, T) int32 array within the vocabulary and max_seq_len, or a clear ValueError."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ids must be an integer array, got dtype {ids.dtype}")
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids must have shape (B, T) with T >= 1, got {tuple(ids.shape)}")
        if ids.shape[1] > self.spec.max_seq_len:
            raise ValueError(f"ids has T={ids.shape[1]} tokens, more than max_seq_len={self.spec.max_seq_len}")
        if _concrete(ids) and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            raise ValueError(f"ids must lie in [0, vocab_size={self.spec.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids.astype(jnp.int32)

    def _check_loops(self, n_loops: int | None) -> int:
        """n_loops or the spec default, >= 1."""
        if n_loops is None:
            return self.spec.recurrent.max_loop_iters
        if isinstance(n_loops, bool) or not isinstance(n_loops, numbers.Integral) or n_loops < 1:
            raise ValueError(f"n_loops={n_loops!r} must be an integer >= 1 (None means "
                             f"recurrent.max_loop_iters={self.spec.recurrent.max_loop_iters})")
        return int(n_loops)  # a plain int: it is a static argument of the compiled forward

    def _check_cache(self, cache: KVCache | None, start_pos: int | jax.Array, N: int, B: int, T: int
                     ) -> int | jax.Array:
        """start_pos (an int, or traced inside jit), after checking it and the cache against the call."""
        if _concrete(start_pos) and (isinstance(start_pos, bool) or np.ndim(start_pos) != 0
                                     or not np.issubdtype(np.asarray(start_pos).dtype, np.integer) or start_pos < 0):
            raise ValueError(f"start_pos={start_pos!r} must be an integer >= 0")
        if cache is None:
            if not _concrete(start_pos) or start_pos != 0:
                raise ValueError(f"start_pos={start_pos} needs a cache holding the positions before it "
                                 "(model.init_cache)")
            return 0
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache from model.init_cache, got {type(cache).__name__}")
        if cache.n_loops != N:
            raise ValueError(f"the cache holds n_loops={cache.n_loops} loop steps but the call runs n_loops={N}")
        if cache.batch != B:
            raise ValueError(f"the cache holds batch={cache.batch} sequences but ids has B={B}")
        if T > cache.capacity or (_concrete(start_pos) and start_pos + T > cache.capacity):
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed the cache capacity of "
                             f"{cache.capacity} positions (init_cache(max_len=...), at most max_seq_len="
                             f"{self.spec.max_seq_len})")
        dtype = self.embed.embedding.dtype
        for name, a in cache.arrays.items():
            if a.dtype != dtype:
                raise ValueError(f"cache {name!r} is {a.dtype}, the model {dtype}")
        return start_pos if not _concrete(start_pos) else int(start_pos)

    def _check_force(self, force_halt: jax.Array | None, force_experts: jax.Array | None, N: int, B: int,
                     T: int) -> tuple[jax.Array | None, jax.Array | None]:
        """Shape and range checks of the replay inputs (ranges only outside jit); returns both as int32 arrays."""
        k = self.spec.moe.top_k if self.spec.recurrent.ffn == "moe" else 0
        if force_experts is not None:
            force_experts = jnp.asarray(force_experts).astype(jnp.int32)
            if tuple(force_experts.shape) != (N, B, T, k):
                raise ValueError(f"force_experts must have shape (N, B, T, k) = {(N, B, T, k)}, "
                                 f"got {tuple(force_experts.shape)}")
            # -1, the trace fill of steps not run, is allowed: such a position keeps its top-k choice
            E = self.spec.moe.n_experts
            if _concrete(force_experts) and force_experts.size and (int(force_experts.min()) < -1
                                                                    or int(force_experts.max()) >= E):
                raise ValueError(f"force_experts must name experts in 0..{E - 1} (or -1: not forced), got values "
                                 f"in [{int(force_experts.min())}, {int(force_experts.max())}]")
        if force_halt is None:
            return None, force_experts
        force_halt = jnp.asarray(force_halt)
        if tuple(force_halt.shape) != (B, T):
            raise ValueError(f"force_halt must have shape (B, T) = {(B, T)}, got {tuple(force_halt.shape)}")
        if _concrete(force_halt) and (int(force_halt.min()) < -1 or int(force_halt.max()) > N):
            raise ValueError(f"force_halt values must lie in -1..N={N} (0: never halt by threshold, -1: not forced), "
                             f"got [{int(force_halt.min())}, {int(force_halt.max())}]")
        if self.spec.halting.mode == "last" and _concrete(force_halt) and force_halt.size and int(force_halt.max()) > 0:
            # 0 and -1 (never halt, not forced) are what parity's replay passes: they agree with nothing halting
            raise ValueError(f"force_halt is refused under halting.mode='last': no position halts (every one runs all "
                             f"N={N} steps), so a forced loop count 1..N cannot be replayed; got values up to "
                             f"{int(force_halt.max())} (only 0 or -1 are accepted)")
        return force_halt.astype(jnp.int32), force_experts

    def _check_mask(self, attention_mask: jax.Array | None, cache: KVCache | None, start_pos: int | jax.Array,
                    B: int, T: int) -> jax.Array | None:
        """Each row's left padding pad (B,) int32 from attention_mask (B, start_pos + T), or None when no row is
        padded (the unpadded path); with a cache and no mask, the cache's. A clear ValueError otherwise.
        Inside jit (a traced mask or cache) the values are taken as checked: pad is always returned."""
        if attention_mask is None:
            if cache is None:
                return None
            if not (_concrete(cache.pad) and _concrete(start_pos)):
                return jnp.where(start_pos == 0, 0, cache.pad)  # start_pos 0: a new sequence, unpadded
            if start_pos == 0 or not np.asarray(cache.pad).any():
                return None
            return cache.pad
        m = jnp.asarray(attention_mask)
        # a traced start_pos (inside jit): only B and the rank are checked
        want = (B, start_pos + T) if _concrete(start_pos) else (B, m.shape[1] if m.ndim == 2 else -1)
        if tuple(m.shape) != want:
            raise ValueError(f"attention_mask must have shape (B, start_pos + T) = {want} (1 = real token, 0 = left "
                             f"padding), got {tuple(m.shape)}")
        if not (jnp.issubdtype(m.dtype, jnp.integer) or m.dtype == jnp.bool_):
            raise ValueError(f"attention_mask must be bool or integer 0/1, got dtype {m.dtype}")
        if self.recurrent.compressor is not None and not _concrete(m):
            raise ValueError("attention_mask inside jit is refused by recurrent.compressor (the context compressor): "
                             "its chunks start at absolute slots, so left padding would change the real tokens' "
                             "summaries; pass unpadded rows")
        if not _concrete(m):
            return (m == 0).sum(-1).astype(jnp.int32)
        pad = _mask_pad(np.asarray(m).astype(np.int64))
        if cache is not None and _concrete(start_pos) and start_pos > 0 and _concrete(cache.pad):
            stored = np.asarray(cache.pad)
            if not np.array_equal(pad, stored):
                b = int(np.nonzero(pad != stored)[0][0])
                raise ValueError(f"attention_mask disagrees with the cache: row {b} has {int(pad[b])} leading zeros, "
                                 f"its prefill had {int(stored[b])} (the prefix must be the prefill's mask, the new "
                                 "columns ones; or omit attention_mask: the cache remembers it)")
        if not pad.any():
            return None
        if self.recurrent.compressor is not None:
            raise ValueError("attention_mask with left padding is refused by recurrent.compressor (the context "
                             "compressor): its chunks start at absolute slots, so padding would change the real "
                             "tokens' summaries; pass unpadded rows (or turn recurrent.compressor.enabled off)")
        return jnp.asarray(pad, dtype=jnp.int32)


def _mask_pad(m: np.ndarray) -> np.ndarray:
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
    return (m == 0).sum(-1).astype(np.int64)


def _check_no_grad_steps(k: int | jax.Array, N: int) -> int | jax.Array:
    """no_grad_steps as an int in 0..N, or a clear ValueError; a traced integer (inside jit) passes as is."""
    if isinstance(k, jax.core.Tracer) and jnp.issubdtype(k.dtype, jnp.integer) and k.ndim == 0:
        return k
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


def _check_autocast(autocast: bool, model: Mythos, cache: KVCache | None) -> bool:
    """autocast as a bool, or a clear ValueError: a float32 model's forward without a cache only."""
    if not isinstance(autocast, bool):
        raise ValueError(f"autocast={autocast!r} must be True or False")
    if autocast and model.embed.embedding.dtype != jnp.float32:
        raise ValueError(f"autocast=True runs a float32 model's matmuls in bfloat16; this model is "
                         f"{model.embed.embedding.dtype} (build it with dtype='float32', or call without autocast)")
    if autocast and cache is not None:
        raise ValueError("autocast=True: the forward without a cache only (decoding runs in the model's dtype)")
    return autocast


def _expert_parallel(rec: RecurrentBlock) -> bool:
    """Whether the looped block's MoE sends its rows to other devices (MoE.dispatch, expert parallelism)."""
    return isinstance(rec.block.ffn, MoE) and rec.block.ffn.dispatch is not None


def _row_names(spec: Spec) -> tuple[str, str]:
    """The looped attention's per-token cache rows (decode.halted_kv=freeze carries them): GQA k, v; MLA c_kv, k_r."""
    return ("k", "v") if spec.attention.type == "gqa" else ("c_kv", "k_r")


@functools.lru_cache(maxsize=None)
def _rope(spec: Spec, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """spec.rope_table (max_seq_len, K/2) cast to the rotation dtype, computed once per spec."""
    cos, sin = rope_table(spec)
    return cos.astype(DTYPES[dtype]), sin.astype(DTYPES[dtype])


def _concrete(x: jax.Array) -> bool:
    """Whether x holds values (not a tracer inside jit), so range checks can run."""
    return not isinstance(x, jax.core.Tracer)


def build(spec: Spec, seed: int = 0, dtype: str = "float32",
          weights: Mapping[str, np.ndarray] | None = None) -> Mythos:
    """A Mythos model in dtype ("float32" | "float64" | "bfloat16") holding spec.init_arrays(spec, seed) or weights."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if dtype == "float64" and not x64_enabled():
        raise ValueError("dtype='float64' needs jax_enable_x64, which is off: call mythos_jax.set_parity_precision() "
                         "(or jax.config.update('jax_enable_x64', True)) before building")
    # constructed abstractly (no init compute or memory): load_arrays sets every value
    model = nnx.eval_shape(lambda: Mythos(spec, dtype=DTYPES[dtype], rngs=nnx.Rngs(seed)))
    load_arrays(model, init_arrays(spec, seed) if weights is None else weights)
    return model


@functools.partial(jax.jit, static_argnames=("n_loops", "early_exit", "attn_probs", "no_grad_steps", "step_logits",
                                             "autocast"))
def _forward(model: Mythos, ids: jax.Array, n_loops: int, early_exit: bool, force_halt: jax.Array | None,
             force_experts: jax.Array | None, attn_probs: bool = False, no_grad_steps: int = 0,
             attention_mask: jax.Array | None = None, step_logits: bool = False, autocast: bool = False) -> ModelOutput:
    """model(ids, ...) without a cache, compiled once per shapes, n_loops, early_exit and the three options
    (and once more with a padding mask: None, no padding, is the program without one).

    A plain jax.jit with the model as a pytree (an NNX module is one: its state arrays are the leaves, its
    structure the treedef, so a changed model compiles again): the forward writes no state, so nnx.jit's
    graph walks in and out (~5 ms a call, docs/benchmarks.md) buy nothing here."""
    TRACE_COUNTS["forward"] += 1
    with autocast_trace(autocast):
        return model(ids, n_loops, early_exit=early_exit, force_halt=force_halt, force_experts=force_experts,
                     attn_probs=attn_probs, no_grad_steps=no_grad_steps, attention_mask=attention_mask,
                     step_logits=step_logits)


def forward(model: Mythos, ids: jax.Array, n_loops: int | None = None, *, early_exit: bool = True,
            force_halt: jax.Array | None = None, force_experts: jax.Array | None = None,
            cache: KVCache | None = None, start_pos: int = 0, attn_probs: bool = False,
            no_grad_steps: int = 0, attention_mask: jax.Array | None = None, step_logits: bool = False,
            autocast: bool = False) -> ModelOutput:
    """model(ids, ...) compiled: the same call, Args and ModelOutput as Mythos.__call__ (and as the torch twin).

    autocast=True (a float32 model, no cache): the matmuls take bfloat16 operands (float32 sums and results,
    on the CPU's bfloat16 matrix units), everything else stays float32, as torch.autocast keeps norms and
    softmax in float32 (docs/design.md "Precision switches"). Faster than a bfloat16 model on XLA:CPU,
    whose bfloat16 elementwise code runs slower than float32 (docs/benchmarks.md); the bf16 parity rules apply.

    n_loops, early_exit, attn_probs, no_grad_steps and step_logits are static (jax.jit compiles one program
    per value).
    early_exit=True runs a lax.while_loop that stops once no position is running, False a lax.scan over
    all N steps (differentiable); the outputs are identical. With a cache it is honoured under
    decode.halted_kv=freeze (a while_loop, then the skipped layers get the frozen rows) and ignored under
    compute (a scan over every step). With a cache, start_pos is traced (one compiled
    program serves every position) and the cache passed in is consumed (its buffers are donated and
    updated in place): use out.cache. attention_mask (left padding) is checked here; an unpadded one
    (all ones) runs the program without a mask.
    """
    # checked here on concrete values (inside jit only shapes are known), then compiled
    ids = model._check_ids(jnp.asarray(ids))
    N = model._check_loops(n_loops)
    force_halt, force_experts = model._check_force(force_halt, force_experts, N, *ids.shape)
    start_pos = model._check_cache(cache, start_pos, N, *ids.shape)
    no_grad_steps = _check_no_grad_steps(no_grad_steps, N)
    pad = model._check_mask(attention_mask, cache, start_pos, *ids.shape)
    step_logits = _check_step_logits(step_logits, cache)
    autocast = _check_autocast(autocast, model, cache)
    if cache is None:
        mask = None if pad is None else jnp.asarray(attention_mask).astype(jnp.int32)
        # step_logits only when asked for: the default call keeps its compiled program
        extra = {"step_logits": True} if step_logits else {}
        if autocast:
            extra["autocast"] = True
        return _forward(model, ids, N, early_exit, force_halt, force_experts, bool(attn_probs), no_grad_steps, mask,
                        **extra)
    args = (*_split(model), cache, ids, jnp.int32(start_pos), N, force_halt, force_experts, pad)
    # attn_probs and early_exit only when not the defaults: generate omits them, and both calls must hit one
    # compiled program (early_exit matters only under decode.halted_kv=freeze)
    if not early_exit and model.spec.decode.halted_kv == "freeze":
        return _cached_forward(*args, bool(attn_probs), False)
    return _cached_forward(*args, True) if attn_probs else _cached_forward(*args)
