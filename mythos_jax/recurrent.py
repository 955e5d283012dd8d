"""The looped block: loop-index embedding, depth-wise LoRA, LTI injection, ACT (ARCHITECTURE.md 2-4)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from spec import HaltingSpec, Spec

from .attention import FrozenRows
from .block import Block
from .cache import KVCache
from .components import ContextCompressor, CrossLoopAttention, MemoryGate
from .layers import RMSNorm, acc_dtype
from .moe import Route
from .precision import mm


def add_loop_embedding(h: jax.Array, row: jax.Array) -> jax.Array:
    """h (B, T, D) plus one loop_table row (L,) on its first L channels (a row of D channels: as is)."""
    return h + (row if row.shape[-1] == h.shape[-1] else jnp.pad(row, (0, h.shape[-1] - row.shape[-1])))


class LoRA(nnx.Module):
    """Depth-wise LoRA: (down(o) * scale[min(t, N_train - 1)]) @ B."""

    def __init__(self, dim: int, rank: int, n_train: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.down = nnx.Linear(dim, rank, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.B = nnx.Param(jnp.zeros((rank, dim), dtype=dtype))  # values come from load_arrays
        self.scale = nnx.Param(jnp.zeros((n_train, rank), dtype=dtype))

    def __call__(self, o: jax.Array, t: jax.Array) -> jax.Array:
        # steps beyond training depth reuse the last trained scale row (depth extrapolation)
        s = self.scale[...][jnp.minimum(t, self.scale.shape[0] - 1)]  # (r,)
        return mm(self.down(o) * s, self.B[...])


class LTIInjection(nnx.Module):
    """Stable injection h' = A*h + B*e + o with a per-channel decay A in (0, 1)."""

    def __init__(self, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.log_A = nnx.Param(jnp.zeros((dim,), dtype=dtype))
        self.log_dt = nnx.Param(jnp.zeros((1,), dtype=dtype))
        self.B = nnx.Param(jnp.full((dim,), 0.1, dtype=dtype))

    def decay(self) -> jax.Array:
        """A = exp(-exp(clip(log_dt + log_A, -20, 20))), (D,), strictly inside (0, 1)."""
        A = jnp.exp(-jnp.exp(jnp.clip(self.log_dt[...] + self.log_A[...], -20, 20)))
        # at the ends of the clip exp(-exp(.)) rounds to 0 or 1; keep A strictly inside (0, 1)
        # (a no-op unless |log_dt + log_A| > ~4.4 in float32, so open-mythos parity is unaffected)
        fi = jnp.finfo(A.dtype)
        return jnp.clip(A, jnp.asarray(fi.tiny, dtype=A.dtype), jnp.asarray(1.0 - fi.eps / 2, dtype=A.dtype))

    def __call__(self, h: jax.Array, e: jax.Array, o: jax.Array) -> jax.Array:
        return self.decay() * h + self.B[...] * e + o


class HaltMLP(nnx.Module):
    """Halting head d -> hidden -> 1 with SiLU (`fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 1, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(h)))


class ACT(nnx.Module):
    """Halting probability p = sigmoid(halt(h)) of the new state, (B, T) in acc dtype."""

    def __init__(self, dim: int, head: str, mlp_hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.halt = nnx.Linear(dim, 1, dtype=dtype, param_dtype=dtype, rngs=rngs) if head == "linear" \
            else HaltMLP(dim, mlp_hidden, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.halt(h)[..., 0].astype(acc_dtype(h.dtype)))


def act_step(p: jax.Array, c: jax.Array, running: jax.Array, threshold: float, last: bool | jax.Array,
             forced: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One ACT step (ARCHITECTURE.md section 4) on (B, T) -> (weight, new c, still running, halts now).

    last: Graves' remainder, every running position halts now. forced (B, T) int (replay of force_halt):
    -1 the position's own threshold rule, 0 continue, 1 halt (a bool array: False continue, True halt).
    """
    decide = c + p >= threshold
    if forced is not None:
        decide = jnp.where(forced < 0, decide, forced > 0)
    halts = running & (decide | last)
    w = jnp.where(running, jnp.where(halts, 1.0 - c, p), 0.0)
    c = c + jnp.where(running, p, 0.0)  # open-mythos: c + p * running
    return w, c, running & ~halts, halts


def last_step(p: jax.Array, c: jax.Array, running: jax.Array, last: bool | jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One step of halting.mode=last on (B, T) -> (weight, new c, still running, halts now): nothing halts,
    the readout takes weight 1 at step N (y = h_N); c is ACT's running sum of p, traced but deciding nothing."""
    w = jnp.where(running & last, 1.0, 0.0).astype(p.dtype)
    c = c + jnp.where(running, p, 0.0)  # as act_step's c
    return w, c, running, jnp.zeros_like(running)


def ponder_step(p: jax.Array, c: jax.Array, running: jax.Array, threshold: float, last: bool | jax.Array,
                forced: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """One step of halting.mode=ponder (PonderNet) on (B, T) -> (weight, new c, still running, halts now,
    halts by its decision).

    lambda_t = p; c is the cumulative halting probability C_t = c + (1 - c) * p (kept once halted); a
    running position halts at the first C_t >= threshold, or at step N (last); weight 1 at that step (the
    readout y = h_t, no mixture). forced as act_step's (-1 own rule, 0 continue, 1 halt).
    """
    c_new = c + (1.0 - c) * p  # C_t = 1 - prod_{s<=t} (1 - lambda_s)
    decide = c_new >= threshold
    if forced is not None:
        decide = jnp.where(forced < 0, decide, forced > 0)
    halts = running & (decide | last)
    w = jnp.where(halts, 1.0, 0.0).astype(p.dtype)
    return w, jnp.where(running, c_new, c), running & ~halts, halts, halts & decide


class StepOut(NamedTuple):
    """What one loop step returns (RecurrentBlock)."""
    h: jax.Array  # (B, T, D) the new state
    p: jax.Array  # (B, T) acc dtype, halting probability of the new state
    route: Route | None  # routed experts (B, T, k) and router margin (B, T); None for a dense FFN
    entry: tuple[jax.Array, jax.Array] | None  # cross-loop memory key/value of the new state, (B, T, H, K)
    summaries: jax.Array | None  # compressor summaries of this step's complete chunks (B, J, m, D), no cache
    attn_probs: jax.Array | None  # (B, H, T, S) self-attention probabilities when asked for


class LoopState(NamedTuple):
    """What the loop carries from step t to step t + 1 (ARCHITECTURE.md 3-4)."""
    h: jax.Array  # (B, T, D) the state
    y: jax.Array  # (B, T, D) the ACT readout so far, model dtype
    c: jax.Array  # (B, T) acc dtype, cumulative halting probability
    running: jax.Array  # (B, T) bool
    halted: jax.Array  # (B, T) bool, halted by its decision
    counts: jax.Array  # (B, T) int32 loop counts
    cache: KVCache | None  # rides in the carry: step t writes its layer P + t
    memory: tuple[jax.Array, jax.Array] | None  # cross-loop keys, values (N + 1, B, T, H, K); entry 0 = e
    summaries: jax.Array | None  # compressor summaries of the previous step (B, J, m, D), no cache
    # decode.halted_kv=freeze: the current tokens' looped-attention rows of the last step each ran (GQA: k after
    # RoPE, v, (B, T, H_kv, K); MLA: c_kv (B, T, R), k_r (B, T, 1, rope)); None under compute, zeros before step 0
    rows: tuple[jax.Array, jax.Array] | None = None


class RecurrentBlock(nnx.Module):
    """One loop step (ARCHITECTURE.md section 3): embed t, [cross-loop attention, compressor read], block,
    LoRA, LTI injection [memory gate], halting p [compressor write]."""

    def __init__(self, spec: Spec, block: Block, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        r, d, eps = spec.recurrent, spec.dim, spec.norm_eps
        self.norm = RMSNorm(d, eps, dtype=dtype, rngs=rngs)
        self.block = block
        self.lora = LoRA(d, r.lora_rank, r.max_loop_iters, dtype=dtype, rngs=rngs) if r.lora_rank > 0 else None
        self.injection = LTIInjection(d, dtype=dtype, rngs=rngs)
        self.block_residual = r.block_residual
        self.act = ACT(d, spec.halting.head, spec.halting.mlp_hidden, dtype=dtype, rngs=rngs)
        cl, cp = r.cross_loop_attention, r.compressor
        self.cross_loop = CrossLoopAttention(d, cl.n_heads, eps, dtype=dtype, rngs=rngs) if cl.enabled else None
        self.compressor = ContextCompressor(d, cp.chunk, cp.n_summaries, cp.n_heads, eps, dtype=dtype, rngs=rngs) \
            if cp.enabled else None
        self.memory_gate = MemoryGate(d, eps, dtype=dtype, rngs=rngs) if r.memory_gate.enabled else None

    def __call__(self, h: jax.Array, e: jax.Array, t: jax.Array, row: jax.Array, cos: jax.Array,
                 sin: jax.Array, force_idx: jax.Array | None = None, *, cache: KVCache | None = None,
                 layer: int | jax.Array = 0, start_pos: int | jax.Array = 0,
                 memory: tuple[jax.Array, jax.Array, jax.Array] | None = None, summaries: jax.Array | None = None,
                 attn_probs: bool = False, pad: jax.Array | None = None, frozen: FrozenRows | None = None) -> StepOut:
        """Step t: h (B, T, D) -> StepOut(new h, halting p (B, T), route, memory entry, summaries, attn_probs).

        memory: the cross-loop memory (keys, values, entries in use), (M, B, T, H, K) each; summaries:
        the compressor's summaries of step t-1 (B, J, m, D), all masked at step 0. With a cache, the
        block's attention writes and reads cache layer `layer` (P + t), and the compressor reads and
        writes its cache rows. pad (B,): each row's left padding, for the block's attention (None: none;
        the compressor refuses it). frozen (decode.halted_kv=freeze): positions frozen.keep keep h and
        their carried attention rows.
        """
        # the loop embedding feeds the block input only; the injection uses the un-embedded h
        x = add_loop_embedding(h, row)  # h~
        if self.cross_loop is not None:
            x = x + self.cross_loop(x, *memory)
        if self.compressor is not None:
            T = h.shape[1]
            if cache is not None:  # step t-1's summaries of every chunk so far (unwritten ones are masked)
                summaries = cache.summaries(jnp.maximum(t - 1, 0))
            # step 0 reads only the null slot (lax.scan: t is traced, so mask rather than skip)
            n_visible = jnp.where(t > 0, (start_pos + jnp.arange(T)) // self.compressor.chunk, 0)
            x = x + self.compressor.read(x, summaries, n_visible)
        n = self.norm(x + e)  # (h + emb) + e, open-mythos' association
        o, route, probs = self.block(n, cos, sin, force_idx, cache=cache, layer=layer, start_pos=start_pos,
                                     attn_probs=attn_probs, pad=pad, frozen=frozen)
        if not self.block_residual:  # recurrent.block_residual=false: the block's updates without its input
            o = o - n
        if self.lora is not None:
            o = o + self.lora(o, t)
        if self.memory_gate is None:
            h_new = self.injection(h, e, o)
        else:
            h_new = self.memory_gate(h, e, o, self.injection.decay(), self.injection.B[...])
        if frozen is not None and frozen.keep is not None:  # a frozen position keeps its state
            h_new = jnp.where(frozen.keep[..., None], h, h_new)
        entry = None if self.cross_loop is None else self.cross_loop.entry(h_new)
        new_summaries = None
        if self.compressor is not None:
            c = self.compressor.chunk
            if cache is None:
                B, T, D = h_new.shape
                J = T // c  # complete chunks
                new_summaries = self.compressor.write(h_new[:, :J * c].reshape(B, J, c, D))
            else:
                self.compressor.write_cached(h_new, t, cache, start_pos)
        return StepOut(h_new, self.act(h_new), route, entry, new_summaries, probs)


def loop_step(rec: RecurrentBlock, state: LoopState, t: jax.Array, e: jax.Array, row: jax.Array, cos: jax.Array,
              sin: jax.Array, force_idx: jax.Array | None, force_halt: jax.Array | None, *,
              halting: HaltingSpec, last: bool | jax.Array, start_pos: int | jax.Array, layer: int | jax.Array,
              attn_probs: bool, value: Callable[[jax.Array], jax.Array] | None, pad: jax.Array | None = None,
              freeze: bool = False) -> tuple[LoopState, tuple[jax.Array | None, ...]]:
    """Loop step t (ARCHITECTURE.md 3-4): state -> (new state, the step's Traces row in Traces field order).

    freeze: decode.halted_kv=freeze; at t >= 1 a position not running keeps h and its attention rows
    (state.rows), and its Traces entries hold the fill values (docs/semantics.md).
    """
    h, y, c, running, halted, counts, cache, memory, summaries, rows = state
    frozen = None
    if freeze:  # step 0 computes every row (pads too); later steps keep the rows of positions not running
        frozen = FrozenRows(None if isinstance(t, int) and t == 0 else ~running & (t > 0), rows)
    mem = None if memory is None else (*memory, t + 1)  # entries 0..t: e, h_1, ..., h_t
    out = rec(h, e, t, row, cos, sin, force_idx, cache=cache, layer=layer, start_pos=start_pos, memory=mem,
              summaries=summaries, attn_probs=attn_probs, pad=pad, frozen=frozen)
    h, p = out.h, out.p
    if memory is not None:  # entry t + 1 (N + 1 slots: the last step's entry is written, never read)
        memory = tuple(jax.lax.dynamic_update_index_in_dim(m, x, t + 1, 0) for m, x in zip(memory, out.entry))
    summaries = out.summaries
    # force_halt: s in 1..N halts at step s, 0 never by threshold, -1 by the position's own rule (act_step's)
    forced = None if force_halt is None else jnp.where(force_halt < 0, -1, (force_halt == t + 1).astype(jnp.int32))
    if halting.mode == "last":  # every position runs all N steps, y = h_N (force_halt forces nothing: model.py)
        w, c_new, still, halts = last_step(p, c, running, last)
        decided = halts
    elif halting.mode == "ponder":  # y = h_t at the halting step; halted: by C_t >= threshold, not by N
        w, c_new, still, halts, decided = ponder_step(p, c, running, halting.threshold, last, forced)
    else:
        w, c_new, still, halts = act_step(p, c, running, halting.threshold, (halting.remainder == "graves") & last,
                                          forced)
        decided = halts
        if halting.straight_through:
            # forward: weight 1 at the step where the position halts (its loop count), 0 elsewhere;
            # backward: the soft ACT weights (w_soft + sg(w_hard - w_soft))
            hard = halts | (still & last)
            w = w + jax.lax.stop_gradient(hard.astype(w.dtype) - w)
    y = y + w.astype(h.dtype)[..., None] * h
    counts = jnp.where(halts, t + 1, counts)
    halted = halted | decided
    B, T, _ = h.shape
    acc = acc_dtype(h.dtype)
    if out.route is None:  # a dense FFN routes nothing: k = 0 experts, margin +inf
        idx = jnp.zeros((B, T, 0), dtype=jnp.int32)
        margin = jnp.full((B, T), jnp.inf, dtype=acc)
    else:
        idx, margin = out.route
    norm = jnp.sqrt(jnp.sum(jnp.square(h.astype(acc)), axis=-1)).astype(h.dtype)
    probs = out.attn_probs  # with a cache: all S keys, those past start_pos + T hold 0
    trace = (norm, p, c_new, running, idx, margin, None if value is None else value(h), probs)
    if frozen is not None and frozen.keep is not None:
        trace = frozen_trace(trace, frozen.keep)
    return LoopState(h, y, c_new, still, halted, counts, cache, memory, summaries,
                     None if frozen is None else frozen.rows), trace


def frozen_trace(trace: tuple[jax.Array | None, ...], keep: jax.Array) -> tuple[jax.Array | None, ...]:
    """A step's Traces row with the fill values at positions keep (B, T) (frozen: they ran nothing); cum_p
    keeps c and running is False there already."""
    norm, p, c, running, idx, margin, value, probs = trace
    return (jnp.where(keep, 0, norm), jnp.where(keep, 0, p), c, running, jnp.where(keep[..., None], -1, idx),
            jnp.where(keep, jnp.inf, margin), None if value is None else jnp.where(keep, 0, value),
            None if probs is None else jnp.where(keep[:, None, :, None], 0, probs))


def write_frozen(rec: RecurrentBlock, cache: KVCache, h: jax.Array, rows: tuple[jax.Array, ...],
                 names: tuple[str, ...], t: jax.Array, *, layer: jax.Array, start_pos: int | jax.Array) -> KVCache:
    """Loop step t that a cached call skipped (decode.halted_kv=freeze, no position running): cache layer
    `layer` (P + t) gets the carried rows (named `names`), the compressor the kept states h (B, T, D)."""
    cache.write(layer, start_pos, **dict(zip(names, rows)))
    if rec.compressor is not None:  # its chunks need every row of every step
        rec.compressor.write_cached(h, t, cache, start_pos)
    return cache


# a Traces row, or the stacked Traces: a NamedTuple of arrays (and Nones) in Traces field order
Rows = tuple[jax.Array | None, ...]


def _run_steps(step: Callable[[LoopState, jax.Array], tuple[LoopState, Rows]], state: LoopState, fills: Rows, N: int,
               early_exit: bool, first: bool = False) -> tuple[LoopState, Rows, jax.Array]:
    """Run step(state, t) for t = 0, 1, ... (the loop's control flow, STYLE 9; step calls loop_step) -> final
    state, the per-step Traces rows stacked to (N, ...) (steps not run hold `fills`), steps executed.
    first: step 0 runs even when no position is running (a cached call of pads only, as the torch for loop)."""
    if not early_exit:
        # lax.scan: all N steps, reverse-differentiable (training); the per-step rows stack to (N, ...)
        state, traces = jax.lax.scan(step, state, jnp.arange(N, dtype=jnp.int32))
        return state, traces, jnp.int32(N)

    # lax.while_loop: inference stops once no position is running, which a Python `break` cannot
    # test on traced values; rows go into fixed-size (N, ...) buffers, steps not run keep the fills
    def cond(carry: tuple[jax.Array, LoopState, Rows]) -> jax.Array:
        t, state, _ = carry
        return (t < N) & (jnp.any(state.running) | (t == 0)) if first else (t < N) & jnp.any(state.running)

    def body(carry: tuple[jax.Array, LoopState, Rows]) -> tuple[jax.Array, LoopState, Rows]:
        t, state, traces = carry
        state, trace = step(state, t)
        return t + 1, state, jax.tree.map(lambda buf, r: buf.at[t].set(r), traces, trace)

    buffers = jax.tree.map(lambda f: jnp.broadcast_to(f, (N, *f.shape)), fills)
    n_steps, state, traces = jax.lax.while_loop(cond, body, (jnp.int32(0), state, buffers))
    return state, traces, n_steps
