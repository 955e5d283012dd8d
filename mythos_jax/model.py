"""The whole model: prelude, recurrent loop with ACT, coda, tied head (ARCHITECTURE.md section 1)."""

from __future__ import annotations

import collections
import functools
import numbers
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spec import Param, Spec, init_arrays, loop_table, manifest, rope_table
from spec.sampling import check_generate, sample_next

from .attention import GQAttention, KVCache, MLAttention
from .layers import RMSNorm, SwiGLU, acc_dtype
from .moe import MoE
from .precision import x64_enabled
from .recurrent import RecurrentBlock, act_step

DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, dim: int, attn: GQAttention | MLAttention, ffn: SwiGLU | MoE, eps: float, *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(dim, eps, dtype=dtype, rngs=rngs)
        self.attn = attn
        self.ffn_norm = RMSNorm(dim, eps, dtype=dtype, rngs=rngs)
        self.ffn = ffn

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, force_idx: jax.Array | None = None,
                 *, cache: KVCache | None = None, layer: int | jax.Array = 0, start_pos: int | jax.Array = 0,
                 return_probs: bool = False) -> tuple[jax.Array, ...]:
        """x (B, T, D) -> x, expert idx (B, T, k) int32, router margin (B, T); k = 0, +inf when dense.

        return_probs: also return the attention probabilities (B, H, T, S) in acc dtype, as a fourth item.
        """
        if return_probs:
            a, probs = self.attn(self.attn_norm(x), cos, sin, cache=cache, layer=layer, start_pos=start_pos,
                                 return_probs=True)
        else:
            a = self.attn(self.attn_norm(x), cos, sin, cache=cache, layer=layer, start_pos=start_pos)
        x = x + a
        f = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            f, idx, margin = self.ffn(f, force_idx)
        else:
            B, T, _ = x.shape
            f = self.ffn(f)
            idx = jnp.zeros((B, T, 0), dtype=jnp.int32)
            margin = jnp.full((B, T), jnp.inf, dtype=acc_dtype(x.dtype))
        if return_probs:
            return x + f, idx, margin, probs
        return x + f, idx, margin


def make_block(spec: Spec, moe: bool, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> Block:
    """A prelude/coda block (dense SwiGLU) or the looped block (MoE or dense, by spec)."""
    a, d = spec.attention, spec.dim
    if a.type == "gqa":
        attn = GQAttention(d, a.n_heads, a.n_kv_heads, dtype=dtype, rngs=rngs)
    else:
        attn = MLAttention(d, a.n_heads, a.q_lora_rank, a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim,
                           a.v_head_dim, spec.norm_eps, dtype=dtype, rngs=rngs)
    ffn = MoE(d, spec.moe, dtype=dtype, rngs=rngs) if moe else SwiGLU(d, spec.ffn_hidden, dtype=dtype, rngs=rngs)
    return Block(d, attn, ffn, spec.norm_eps, dtype=dtype, rngs=rngs)


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


# The loop carry: (h, y, c, running, halted, loop counts, KV cache or None, cross-loop memory (keys, values)
# or None, the compressor's summaries of the previous step or None).
Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, KVCache | None,
              tuple[jax.Array, jax.Array] | None, jax.Array | None]


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

    def __call__(self, ids: jax.Array, n_loops: int | None = None, *, early_exit: bool = True,
                 force_halt: jax.Array | None = None, force_experts: jax.Array | None = None,
                 cache: KVCache | None = None, start_pos: int | jax.Array = 0, return_attention: bool = False,
                 no_grad_steps: int = 0) -> ModelOutput:
        """Logits, loop counts and traces for token ids (uncompiled; `forward` is the compiled call).

        Args:
            ids: (B, T) integer token ids, T <= spec.max_seq_len.
            n_loops: loop steps N (>= 1); None -> spec.recurrent.max_loop_iters.
            early_exit: stop once no position is running (the result equals running all N steps).
            force_halt: (B, T) int; s in 1..N halts the position at step s, 0 never by threshold.
            force_experts: (N, B, T, k) int; routed experts of step t are force_experts[t] (-1: not forced).
            cache: a KVCache from init_cache(B, ..., N): ids sit at absolute positions start_pos..start_pos+T-1
                and see the cached positions before them; every loop step runs (early_exit is ignored).
            start_pos: absolute position of ids[:, 0] (only with a cache); may be traced.
            return_attention: also return the looped block's attention probabilities per step (traces.attn_probs).
            no_grad_steps: the first no_grad_steps loop steps (0..N) run without gradient (truncated backprop);
                an int (static: 0 compiles no extra code) or, inside jit, a traced integer.
        Returns:
            ModelOutput(logits (B, T, V), loop_counts (B, T) int32, halted (B, T) bool, n_steps () int32, traces,
            cache: the updated cache, values (B, T) or None).
        """
        ids = self._check_ids(jnp.asarray(ids))
        N = self._check_loops(n_loops)
        B, T = ids.shape
        force_halt, force_experts = self._check_force(force_halt, force_experts, N, B, T)
        start_pos = self._check_cache(cache, start_pos, N, B, T)
        no_grad_steps = _check_no_grad_steps(no_grad_steps, N)
        return self._forward(ids, N, early_exit and cache is None, force_halt, force_experts, cache, start_pos,
                             bool(return_attention), no_grad_steps)

    def _forward(self, ids: jax.Array, N: int, early_exit: bool, force_halt: jax.Array | None,
                 force_experts: jax.Array | None, cache: KVCache | None, start_pos: int | jax.Array,
                 return_attention: bool = False, no_grad_steps: int = 0) -> ModelOutput:
        """__call__ after its checks."""
        T = ids.shape[1]
        # absolute positions start_pos..start_pos+T-1 (with a cache start_pos may be traced: a dynamic slice)
        cos, sin = _rope(self.spec, self.rope_dtype.name)
        if cache is None:
            cos, sin = jnp.asarray(cos[:T]), jnp.asarray(sin[:T])
        else:
            cache = cache.copy()  # the caller's cache keeps its arrays; out.cache holds the updated ones
            S = cache.capacity
            cos = jax.lax.dynamic_slice_in_dim(jnp.asarray(cos[:S]), start_pos, T)
            sin = jax.lax.dynamic_slice_in_dim(jnp.asarray(sin[:S]), start_pos, T)
        P = len(self.prelude)
        x = self.embed(ids)  # (B, T, D)
        for i, block in enumerate(self.prelude):
            x, _, _ = block(x, cos, sin, cache=cache, layer=i, start_pos=start_pos)
        y, counts, halted, n_steps, traces, cache = self.loop(x, cos, sin, N, early_exit, force_halt, force_experts,
                                                              cache, start_pos, return_attention, no_grad_steps)
        for j, block in enumerate(self.coda):
            y, _, _ = block(y, cos, sin, cache=cache, layer=P + N + j, start_pos=start_pos)
        y = self.norm(y)
        if self.head is None:
            logits = jnp.einsum("btd,vd->btv", y, self.embed.embedding[...])  # (B, T, V), tied head E^T
        else:
            logits = self.head(y)
        values = None if self.value_head is None else self.value_head(y)[..., 0]  # (B, T)
        return ModelOutput(logits, counts, halted, n_steps, traces, cache, values)

    def loop(self, e: jax.Array, cos: jax.Array, sin: jax.Array, N: int, early_exit: bool,
             force_halt: jax.Array | None, force_experts: jax.Array | None, cache: KVCache | None = None,
             start_pos: int | jax.Array = 0, return_attention: bool = False, no_grad_steps: int = 0
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, Traces, KVCache | None]:
        """The recurrent loop with ACT (sections 3-4): e (B, T, D) -> y, loop counts, halted, n_steps, traces, cache."""
        s = self.spec
        B, T, _ = e.shape
        act = acc_dtype(e.dtype)
        # loop-embedding rows from spec.loop_table (float64 angles; activation dtype under openmythos-0.5)
        table = loop_table(s, N, e.dtype.name)
        rows = jnp.asarray(np.pad(table, ((0, 0), (0, s.dim - table.shape[-1]))).astype(e.dtype))  # (N, D): zero past L
        graves = s.halting.remainder == "graves"
        straight = s.halting.straight_through
        rec = self.recurrent
        P = len(self.prelude)

        def step(carry: Carry, t: jax.Array) -> tuple[Carry, Traces]:
            h, y, c, running, halted, counts, kv, mem, summaries = carry
            fx = None if force_experts is None else force_experts[t]
            # the cache rides in the carry: step t writes its layer P + t in place
            memory = None if mem is None else (*mem, t + 1)  # entries 0..t: e, h_1, ..., h_t
            out = rec(h, e, t, rows[t], cos, sin, fx, cache=kv, layer=P + t, start_pos=start_pos, memory=memory,
                      summaries=summaries, return_probs=return_attention)
            h, p, idx, margin = out.h, out.p, out.idx, out.margin
            if mem is not None:  # entry t + 1 (N + 1 slots: the last step's entry is written, never read)
                mem = tuple(jax.lax.dynamic_update_index_in_dim(m, x, t + 1, 0) for m, x in zip(mem, out.entry))
            if summaries is not None:
                summaries = out.summaries
            forced = None if force_halt is None else force_halt == t + 1
            w, c_new, still, halts = act_step(p, c, running, s.halting.threshold, graves & (t == N - 1), forced)
            if straight:
                # forward: weight 1 at the step where the position halts (its loop count), 0 elsewhere;
                # backward: the soft ACT weights (w_soft + sg(w_hard - w_soft))
                hard = halts | (still & (t == N - 1))
                w = w + jax.lax.stop_gradient(hard.astype(w.dtype) - w)
            y = y + w.astype(h.dtype)[..., None] * h
            counts = jnp.where(halts, t + 1, counts)
            halted = halted | halts
            norm = jnp.sqrt(jnp.sum(jnp.square(h.astype(act)), axis=-1)).astype(h.dtype)
            value = None if self.value_head is None else self.value_head(self.norm(h))[..., 0]
            row = Traces(norm, p, c_new, running, idx, margin, value, out.probs)
            new = (h, y, c_new, still, halted, counts, mem, summaries)
            if not isinstance(no_grad_steps, int) or no_grad_steps > 0:
                # truncated backprop: what the first no_grad_steps steps produce carries no gradient
                def freeze(x: jax.Array) -> jax.Array:
                    if not jnp.issubdtype(x.dtype, jnp.floating):
                        return x
                    return jnp.where(t < no_grad_steps, jax.lax.stop_gradient(x), x)
                new, row = jax.tree.map(freeze, (new, row))
            h, y, c_new, still, halted, counts, mem, summaries = new
            return (h, y, c_new, still, halted, counts, kv, mem, summaries), row

        if s.recurrent.checkpoint and cache is None:
            step = jax.checkpoint(step)  # recompute each loop step in the backward pass (ARCHITECTURE.md 5f)
        mem = None
        if rec.cross_loop is not None:  # cross-loop depth memory, entry 0 = e
            mem = tuple(jnp.zeros((N + 1, *x.shape), x.dtype).at[0].set(x) for x in rec.cross_loop.entry(e))
        summaries = None
        if rec.compressor is not None and cache is None:  # step t-1's summaries (masked at step 0)
            cp = s.recurrent.compressor
            summaries = jnp.zeros((B, T // cp.chunk, cp.n_summaries, s.dim), e.dtype)
        carry = (e, jnp.zeros_like(e), jnp.zeros((B, T), dtype=act), jnp.ones((B, T), dtype=jnp.bool_),
                 jnp.zeros((B, T), dtype=jnp.bool_), jnp.full((B, T), N, dtype=jnp.int32), cache, mem, summaries)
        k = s.moe.top_k if s.recurrent.ffn == "moe" else 0
        S = T if cache is None else cache.capacity
        fills = Traces(jnp.zeros((B, T), dtype=e.dtype), jnp.zeros((B, T), dtype=act), jnp.zeros((B, T), dtype=act),
                       jnp.zeros((B, T), dtype=jnp.bool_), jnp.full((B, T, k), -1, dtype=jnp.int32),
                       jnp.full((B, T), jnp.inf, dtype=act),
                       None if self.value_head is None else jnp.zeros((B, T), dtype=e.dtype),
                       jnp.zeros((B, s.attention.n_heads, T, S), dtype=act) if return_attention else None)
        # with a cache every step runs (a scan), so later tokens find cache entries at every depth
        (_, y, _, _, halted, counts, cache, _, _), traces, n_steps = _run_steps(step, carry, fills, N, early_exit)
        return y, counts, halted, n_steps, traces, cache

    def init_cache(self, batch: int, max_len: int | None = None, n_loops: int | None = None) -> KVCache:
        """An empty (zero) KVCache for `batch` sequences of up to max_len positions and n_loops loop steps.

        Args:
            batch: sequences B.
            max_len: capacity S in positions, 1..spec.max_seq_len (None: max_seq_len).
            n_loops: loop steps N of the calls that use it (None: recurrent.max_loop_iters).
        Returns:
            KVCache with one entry per attention layer (prelude, N loop steps, coda), in the model dtype.
        """
        s, a = self.spec, self.spec.attention
        S = s.max_seq_len if max_len is None else max_len
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise ValueError(f"init_cache: batch={batch!r} must be an integer >= 1")
        if isinstance(S, bool) or not isinstance(S, numbers.Integral) or not 1 <= S <= s.max_seq_len:
            raise ValueError(f"init_cache: max_len={max_len!r} must be an integer in 1..max_seq_len={s.max_seq_len}")
        N = self._check_loops(n_loops)
        L, B = s.prelude_layers + N + s.coda_layers, int(batch)
        if a.type == "gqa":
            shapes = {"k": (L, B, S, a.n_kv_heads, s.head_dim), "v": (L, B, S, a.n_kv_heads, s.head_dim)}
        else:
            # one rotated rope key per token; open-mythos caches it once per head
            heads = a.n_heads if s.semantics == "openmythos-0.5" else 1
            shapes = {"c_kv": (L, B, S, a.kv_lora_rank), "k_r": (L, B, S, heads, a.qk_rope_head_dim)}
        cp = s.recurrent.compressor
        if cp.enabled:
            # per loop step: the summaries of every chunk, and the rows of the chunk still open
            shapes["summaries"] = (N, B, -(-S // cp.chunk), cp.n_summaries, s.dim)
            shapes["chunk_states"] = (N, B, cp.chunk, s.dim)
        dtype = self.embed.embedding.dtype
        return KVCache({n: jnp.zeros(shape, dtype=dtype) for n, shape in shapes.items()}, N)

    def generate(self, ids: jax.Array, max_new_tokens: int, n_loops: int | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None, *,
                 on_token: Callable[[np.ndarray], None] | None = None) -> jax.Array:
        """Decode with a KV cache: the prompt, then one token per step (docs/design.md "Decoding with a cache").

        Args:
            ids: (B, T) prompt token ids.
            max_new_tokens: tokens to add; T + max_new_tokens must not exceed spec.max_seq_len.
            n_loops: loop steps N of every call (all of them run); None -> recurrent.max_loop_iters.
            temperature: 0 is greedy (argmax, ties to the lower id); else sampling (sample_next).
            top_k, top_p: sampling filters (None: off).
            seed: seed of numpy.random.default_rng, one uniform per row per step.
            eos_id: a row that emits it is padded with it; decoding stops once every row has.
            on_token: called with each step's new tokens (B,) int64, as they come (streaming).
        Returns:
            (B, T + max_new_tokens) int32: the prompt followed by the new tokens.
        """
        ids = self._check_ids(jnp.asarray(ids))
        N = self._check_loops(n_loops)
        B, T = ids.shape
        check_generate(self.spec, T, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
        if max_new_tokens == 0:
            return ids
        # the capacity is rounded up to a power of two, so prompts of similar length share compiled steps
        cache = self.init_cache(B, min(self.spec.max_seq_len, max(16, 1 << (T + max_new_tokens - 1).bit_length())), N)
        static, leaves = _split(self)  # once: the compiled step is a pure function of (leaves, cache, ids, start_pos)
        rng = np.random.default_rng(seed)
        done = np.zeros(B, dtype=bool)
        new: list[np.ndarray] = []
        out = _cached_forward(static, leaves, cache, ids, jnp.int32(0), N, None, None)  # prefill
        for i in range(max_new_tokens):
            logits = np.asarray(out.logits)[:, -1].astype(np.float64)  # (B, V)
            tok = sample_next(logits, rng, temperature, top_k, top_p)  # (B,)
            if eos_id is not None:
                tok = np.where(done, eos_id, tok)
                done |= tok == eos_id
            new.append(tok)
            if on_token is not None:
                on_token(tok)
            if len(new) == max_new_tokens or done.all():
                break
            step = jnp.asarray(tok[:, None], dtype=jnp.int32)
            out = _cached_forward(static, leaves, out.cache, step, jnp.int32(T + i), N, None, None)
        tail = np.full((B, max_new_tokens), -1 if eos_id is None else eos_id, dtype=np.int64)
        if new:
            tail[:, :len(new)] = np.stack(new, axis=1)
        return jnp.concatenate([ids, jnp.asarray(tail, dtype=jnp.int32)], axis=1)

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
        if _concrete(force_halt) and (int(force_halt.min()) < 0 or int(force_halt.max()) > N):
            raise ValueError(f"force_halt values must lie in 0..N={N} (0: never halt by threshold), got "
                             f"[{int(force_halt.min())}, {int(force_halt.max())}]")
        return force_halt.astype(jnp.int32), force_experts


def _check_no_grad_steps(k: int | jax.Array, N: int) -> int | jax.Array:
    """no_grad_steps as an int in 0..N, or a clear ValueError; a traced integer (inside jit) passes as is."""
    if isinstance(k, jax.core.Tracer) and jnp.issubdtype(k.dtype, jnp.integer) and k.ndim == 0:
        return k
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= N:
        raise ValueError(f"no_grad_steps={k!r} must be an integer in 0..n_loops={N}")
    return int(k)


def _run_steps(step: Callable[[Carry, jax.Array], tuple[Carry, Traces]], carry: Carry, fills: Traces, N: int,
               early_exit: bool) -> tuple[Carry, Traces, jax.Array]:
    """Run step(carry, t) for t = 0, 1, ... -> final carry, traces stacked to (N, ...), steps executed."""
    if not early_exit:
        # lax.scan: all N steps, reverse-differentiable (training); the per-step rows stack to (N, ...)
        carry, traces = jax.lax.scan(step, carry, jnp.arange(N, dtype=jnp.int32))
        return carry, traces, jnp.int32(N)

    # lax.while_loop: inference stops once no position is running, which a Python `break` cannot
    # test on traced values; rows go into fixed-size (N, ...) buffers, steps not run keep the fills
    def cond(state: tuple[jax.Array, Carry, Traces]) -> jax.Array:
        t, carry, _ = state
        return (t < N) & jnp.any(carry[3])

    def body(state: tuple[jax.Array, Carry, Traces]) -> tuple[jax.Array, Carry, Traces]:
        t, carry, traces = state
        carry, row = step(carry, t)
        return t + 1, carry, jax.tree.map(lambda buf, r: buf.at[t].set(r), traces, row)

    buffers = jax.tree.map(lambda f: jnp.broadcast_to(f, (N, *f.shape)), fills)
    n_steps, carry, traces = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, buffers))
    return carry, traces, n_steps


@functools.lru_cache(maxsize=None)
def _rope(spec: Spec, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """spec.rope_table (max_seq_len, K/2) cast to the rotation dtype, computed once per spec."""
    cos, sin = rope_table(spec)
    return cos.astype(DTYPES[dtype]), sin.astype(DTYPES[dtype])


def _concrete(x: jax.Array) -> bool:
    """Whether x holds values (not a tracer inside jit), so range checks can run."""
    return not isinstance(x, jax.core.Tracer)


def _variable(model: Mythos, p: Param) -> nnx.Variable:
    """The variable behind a manifest entry: the module path, then `kernel`/`embedding`/the torch name."""
    *path, leaf = p.path.split(".")
    obj = model
    for name in path:
        obj = obj[int(name)] if name.isdigit() else getattr(obj, name)
    return getattr(obj, {"linear": "kernel", "embedding": "embedding"}.get(p.kind, leaf))


def load_arrays(model: Mythos, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy NumPy arrays (torch layout, keyed by manifest path) into the model, cast to its dtype.

    Every missing key, unexpected key and shape mismatch is collected first, then one ValueError.
    """
    params = manifest(model.spec)
    known = {p.path for p in params}
    errors = [f"unexpected key {k!r}" for k in arrays if k not in known]
    for p in params:
        if p.path not in arrays:
            errors.append(f"missing key {p.path!r} {p.shape}")
        elif tuple(np.shape(arrays[p.path])) != p.shape:
            errors.append(f"{p.path}: shape {tuple(np.shape(arrays[p.path]))}, expected {p.shape}")
    if errors:
        raise ValueError(f"load_arrays: {len(errors)} problem(s), nothing loaded:\n  " + "\n  ".join(errors))
    for p in params:
        var = _variable(model, p)
        # the cast is done by NumPy (ml_dtypes for bfloat16), as in the torch twin
        a = np.asarray(arrays[p.path]).astype(var.dtype)
        var.set_value(jnp.asarray(a.T if p.kind == "linear" else a))  # torch [out, in] vs nnx kernel [in, out]


def dump_arrays(model: Mythos) -> dict[str, np.ndarray]:
    """Every manifest tensor as a NumPy array in torch layout (bfloat16 as ml_dtypes.bfloat16)."""
    out = {}
    for p in manifest(model.spec):
        a = np.asarray(_variable(model, p).get_value())
        out[p.path] = np.ascontiguousarray(a.T) if p.kind == "linear" else a.copy()
    return out


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


@functools.partial(nnx.jit, static_argnames=("n_loops", "early_exit", "return_attention", "no_grad_steps"))
def _forward(model: Mythos, ids: jax.Array, n_loops: int, early_exit: bool, force_halt: jax.Array | None,
             force_experts: jax.Array | None, return_attention: bool = False, no_grad_steps: int = 0) -> ModelOutput:
    """model(ids, ...) without a cache, compiled once per shapes, n_loops, early_exit and the two options."""
    TRACE_COUNTS["forward"] += 1
    return model(ids, n_loops, early_exit=early_exit, force_halt=force_halt, force_experts=force_experts,
                 return_attention=return_attention, no_grad_steps=no_grad_steps)


def forward(model: Mythos, ids: jax.Array, n_loops: int | None = None, *, early_exit: bool = True,
            force_halt: jax.Array | None = None, force_experts: jax.Array | None = None,
            cache: KVCache | None = None, start_pos: int = 0, return_attention: bool = False,
            no_grad_steps: int = 0) -> ModelOutput:
    """model(ids, ...), compiled with nnx.jit (n_loops and early_exit static); the same call as the torch twin.

    Args:
        ids: (B, T) integer token ids, T <= spec.max_seq_len.
        n_loops: loop steps N (>= 1); None -> spec.recurrent.max_loop_iters.
        early_exit: True runs a lax.while_loop that stops once no position is running; False a lax.scan
            over all N steps (differentiable). Outputs are identical.
        force_halt: (B, T) int; s in 1..N halts the position at step s, 0 never by threshold.
        force_experts: (N, B, T, k) int; routed experts of step t are force_experts[t] (-1: not forced).
        cache: a KVCache from model.init_cache (all N steps run); out.cache is the updated cache. The
            cache passed in is consumed (its buffers are donated and updated in place): use out.cache.
        start_pos: absolute position of ids[:, 0] (only with a cache); traced, so one compiled program
            serves every position.
        return_attention: also return the looped block's attention probabilities per step (traces.attn_probs).
        no_grad_steps: the first no_grad_steps loop steps (0..N, static) run without gradient.
    Returns:
        ModelOutput(logits (B, T, V), loop_counts (B, T) int32, halted (B, T) bool, n_steps () int32, traces,
        cache, values (B, T) or None).
    """
    # checked here on concrete values (inside jit only shapes are known), then compiled
    ids = model._check_ids(jnp.asarray(ids))
    N = model._check_loops(n_loops)
    force_halt, force_experts = model._check_force(force_halt, force_experts, N, *ids.shape)
    start_pos = model._check_cache(cache, start_pos, N, *ids.shape)
    no_grad_steps = _check_no_grad_steps(no_grad_steps, N)
    if cache is None:
        return _forward(model, ids, N, early_exit, force_halt, force_experts, bool(return_attention), no_grad_steps)
    args = (*_split(model), cache, ids, jnp.int32(start_pos), N, force_halt, force_experts)
    # return_attention only when asked: generate omits it, and both calls must hit one compiled program
    return _cached_forward(*args, True) if return_attention else _cached_forward(*args)


# How often each compiled function was traced (a trace precedes every compilation): decoding must
# not recompile per token, and tests/test_decode.py counts it.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


class _Static:
    """A static jit argument hashed once: hashing an nnx.GraphDef walks the whole model (~0.5 ms), and
    jax.jit hashes its static arguments on every call."""

    def __init__(self, value: object):
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and self._hash == other._hash and self.value == other.value


@functools.partial(jax.jit, static_argnums=(0, 5, 8), donate_argnums=(2,))
def _cached_forward(static: _Static, leaves: list[jax.Array], cache: KVCache, ids: jax.Array, start_pos: jax.Array,
                    n_loops: int, force_halt: jax.Array | None, force_experts: jax.Array | None,
                    return_attention: bool = False) -> ModelOutput:
    """The forward with a cache, compiled once per shapes and n_loops: start_pos is traced, so one
    program serves every position (generate's hot path, and forward(..., cache=...)).

    A pure function of the model's state leaves (static: graphdef and state treedef), so no nnx.jit
    graph walk per token; the cache buffers are donated, so XLA updates them in place.
    """
    TRACE_COUNTS["cached_forward"] += 1
    graphdef, treedef = static.value
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return model._forward(ids, n_loops, False, force_halt, force_experts, cache, start_pos, return_attention)


def _split(model: Mythos) -> tuple[_Static, list[jax.Array]]:
    """The model as (static graphdef and treedef, state leaves) for _cached_forward."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return _Static((graphdef, treedef)), leaves
