"""The looped block: loop-index embedding, depth-wise LoRA, LTI injection, ACT (ARCHITECTURE.md 2-4)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from spec import HaltingSpec, Spec

from .attention import FrozenRows
from .block import Block
from .cache import KVCache
from .components import ContextCompressor, CrossLoopAttention, MemoryGate
from .layers import RMSNorm, acc_dtype
from .moe import Route


def add_loop_embedding(h: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """h (B, T, D) plus one loop_table row (L,) on its first L channels (a row of D channels: as is)."""
    return h + (row if row.shape[-1] == h.shape[-1] else F.pad(row, (0, h.shape[-1] - row.shape[-1])))


class LoRA(nn.Module):
    """Depth-wise LoRA: (down(o) * scale[min(t, N_train - 1)]) @ B."""

    def __init__(self, dim: int, rank: int, n_train: int, *, dtype: torch.dtype):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False, dtype=dtype)
        self.B = nn.Parameter(torch.empty(rank, dim, dtype=dtype))
        self.scale = nn.Parameter(torch.empty(n_train, rank, dtype=dtype))

    def forward(self, o: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        # steps beyond training depth reuse the last trained scale row (depth extrapolation)
        if isinstance(t, torch.Tensor):  # the while_loop form (_run_steps): t is the loop's 0-d counter
            s = self.scale.index_select(0, t.clamp(max=self.scale.shape[0] - 1).view(1))[0]  # (r,)
        else:
            s = self.scale[min(t, self.scale.shape[0] - 1)]  # (r,)
        return (self.down(o) * s) @ self.B


class LTIInjection(nn.Module):
    """Stable injection h' = A*h + B*e + o with a per-channel decay A in (0, 1)."""

    def __init__(self, dim: int, *, dtype: torch.dtype):
        super().__init__()
        self.log_A = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.log_dt = nn.Parameter(torch.zeros(1, dtype=dtype))
        self.B = nn.Parameter(torch.full((dim,), 0.1, dtype=dtype))

    def decay(self) -> torch.Tensor:
        """A = exp(-exp(clip(log_dt + log_A, -20, 20))), (D,), strictly inside (0, 1)."""
        A = torch.exp(-torch.exp((self.log_dt + self.log_A).clamp(-20, 20)))
        # at the ends of the clip exp(-exp(.)) rounds to 0 or 1; keep A strictly inside (0, 1)
        # (a no-op unless |log_dt + log_A| > ~4.4 in float32, so open-mythos parity is unaffected)
        fi = torch.finfo(A.dtype)
        return A.clamp(fi.tiny, 1.0 - fi.eps / 2)

    def forward(self, h: torch.Tensor, e: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return self.decay() * h + self.B * e + o


class HaltMLP(nn.Module):
    """Halting head d -> hidden -> 1 with SiLU (`fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int, *, dtype: torch.dtype):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, 1, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(h)))


class ACT(nn.Module):
    """Halting probability p = sigmoid(halt(h)) of the new state, (B, T) in acc dtype."""

    def __init__(self, dim: int, head: str, mlp_hidden: int, *, dtype: torch.dtype):
        super().__init__()
        self.halt = nn.Linear(dim, 1, dtype=dtype) if head == "linear" else HaltMLP(dim, mlp_hidden, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.halt(h).squeeze(-1).to(acc_dtype(h.dtype)))


def act_step(p: torch.Tensor, c: torch.Tensor, running: torch.Tensor, threshold: float, last: bool,
             forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ACT step (ARCHITECTURE.md section 4) on (B, T) -> (weight, new c, still running, halts now).

    last: Graves' remainder, every running position halts now. forced (B, T) bool replaces the
    threshold decision (replay of force_halt).
    """
    decide = c + p >= threshold if forced is None else forced
    halts = running & (decide | last)
    w = torch.where(running, torch.where(halts, 1.0 - c, p), 0.0)
    c = c + torch.where(running, p, 0.0)  # open-mythos: c + p * running
    return w, c, running & ~halts, halts


def last_step(p: torch.Tensor, c: torch.Tensor, running: torch.Tensor, last: bool | torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of halting.mode=last on (B, T) -> (weight, new c, still running, halts now): nothing halts,
    the readout takes weight 1 at step N (y = h_N); c is ACT's running sum of p, traced but deciding nothing."""
    w = torch.where(running & last, 1.0, 0.0).to(p.dtype)
    c = torch.where(running, c + p, c)  # act_step's c (the same sums)
    # a copy: torch.while_loop (the loop_form="while" carry) refuses an output aliasing its input
    return w, c, running.clone(), torch.zeros_like(running)


def ponder_step(p: torch.Tensor, c: torch.Tensor, running: torch.Tensor, threshold: float, last: bool | torch.Tensor,
                forced: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of halting.mode=ponder (PonderNet) on (B, T) -> (weight, new c, still running, halts now,
    halts by its decision).

    lambda_t = p; c is the cumulative halting probability C_t = c + (1 - c) * p (kept once halted); a
    running position halts at the first C_t >= threshold, or at step N (last); weight 1 at that step (the
    readout y = h_t, no mixture). forced (B, T) int (replay of force_halt): -1 own rule, 0 continue, 1 halt.
    """
    c_new = c + (1.0 - c) * p  # C_t = 1 - prod_{s<=t} (1 - lambda_s)
    decide = c_new >= threshold
    if forced is not None:
        decide = torch.where(forced < 0, decide, forced > 0)
    halts = running & (decide | last)
    w = torch.where(halts, 1.0, 0.0).to(p.dtype)
    return w, torch.where(running, c_new, c), running & ~halts, halts, halts & decide


class StepOut(NamedTuple):
    """What one loop step returns (RecurrentBlock)."""
    h: torch.Tensor  # (B, T, D) the new state
    p: torch.Tensor  # (B, T) acc dtype, halting probability of the new state
    route: Route | None  # routed experts (B, T, k) and router margin (B, T); None for a dense FFN
    entry: tuple[torch.Tensor, torch.Tensor] | None  # cross-loop memory key/value of the new state, (B, T, H, K)
    summaries: torch.Tensor | None  # compressor summaries of this step's complete chunks (B, J, m, D), no cache
    attn_probs: torch.Tensor | None  # (B, H, T, S) self-attention probabilities when asked for


class LoopState(NamedTuple):
    """What the loop carries from step t to step t + 1 (ARCHITECTURE.md 3-4)."""
    h: torch.Tensor  # (B, T, D) the state
    y: torch.Tensor  # (B, T, D) the ACT readout so far, model dtype
    c: torch.Tensor  # (B, T) acc dtype, cumulative halting probability
    running: torch.Tensor  # (B, T) bool
    halted: torch.Tensor  # (B, T) bool, halted by its decision
    counts: torch.Tensor  # (B, T) int32 loop counts
    cache: KVCache | None  # updated in place: step t writes its layer P + t
    memory: tuple[torch.Tensor, torch.Tensor] | None  # cross-loop keys, values (N + 1, B, T, H, K); entry 0 = e
    summaries: torch.Tensor | None  # compressor summaries of the previous step (B, J, m, D), no cache
    # decode.halted_kv=freeze: the current tokens' looped-attention rows of the last step each ran (GQA: k after
    # RoPE, v, (B, T, H_kv, K); MLA: c_kv (B, T, R), k_r (B, T, 1, rope)); None under compute and before step 0
    rows: tuple[torch.Tensor, torch.Tensor] | None = None


class RecurrentBlock(nn.Module):
    """One loop step (ARCHITECTURE.md section 3): embed t, [cross-loop attention, compressor read], block,
    LoRA, LTI injection [memory gate], halting p [compressor write]."""

    def __init__(self, spec: Spec, block: Block, *, dtype: torch.dtype):
        super().__init__()
        r, d, eps = spec.recurrent, spec.dim, spec.norm_eps
        self.norm = RMSNorm(d, eps, dtype=dtype)
        self.block = block
        self.lora = LoRA(d, r.lora_rank, r.max_loop_iters, dtype=dtype) if r.lora_rank > 0 else None
        self.injection = LTIInjection(d, dtype=dtype)
        self.block_residual = r.block_residual
        self.act = ACT(d, spec.halting.head, spec.halting.mlp_hidden, dtype=dtype)
        cl, cp = r.cross_loop_attention, r.compressor
        self.cross_loop = CrossLoopAttention(d, cl.n_heads, eps, dtype=dtype) if cl.enabled else None
        self.compressor = ContextCompressor(d, cp.chunk, cp.n_summaries, cp.n_heads, eps, dtype=dtype) \
            if cp.enabled else None
        self.memory_gate = MemoryGate(d, eps, dtype=dtype) if r.memory_gate.enabled else None

    def forward(self, h: torch.Tensor, e: torch.Tensor, t: int | torch.Tensor, row: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, force_idx: torch.Tensor | None = None, *, cache: KVCache | None = None,
                layer: int = 0, start_pos: int = 0, memory: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                summaries: torch.Tensor | None = None, attn_probs: bool = False,
                pad: torch.Tensor | None = None, frozen: FrozenRows | None = None) -> StepOut:
        """Step t: h (B, T, D) -> StepOut(new h, halting p (B, T), route, memory entry, summaries, attn_probs).

        memory: the cross-loop memory (keys, values, entries in use), (M, B, T, H, K) each; summaries: the
        compressor's summaries of step t-1 (B, J, m, D) (None at step 0). With a cache, the block's attention
        writes and reads cache layer `layer` (P + t), and the compressor reads and writes its cache rows.
        pad (B,): each row's left padding, for the block's attention (None: none; the compressor refuses it).
        frozen (decode.halted_kv=freeze): positions frozen.keep keep h and their carried attention rows.
        """
        # the loop embedding feeds the block input only; the injection uses the un-embedded h
        x = add_loop_embedding(h, row)  # h~
        if self.cross_loop is not None:
            x = x + self.cross_loop(x, *memory)
        if self.compressor is not None:
            T = h.shape[1]
            if cache is not None:  # step t-1's summaries of every chunk so far (unwritten ones are masked)
                summaries = cache.summaries(t - 1) if t > 0 else None
            n_visible = torch.arange(start_pos, start_pos + T, device=h.device) // self.compressor.chunk
            if isinstance(t, torch.Tensor):  # the while_loop form: step 0 reads only the null slot (mask, not skip)
                n_visible = torch.where(t > 0, n_visible, 0)
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
            h_new = self.memory_gate(h, e, o, self.injection.decay(), self.injection.B)
        if frozen is not None and frozen.keep is not None:  # a frozen position keeps its state
            h_new = torch.where(frozen.keep[..., None], h, h_new)
        entry = None if self.cross_loop is None else self.cross_loop.entry(h_new)
        new_summaries = None
        if self.compressor is not None:
            c = self.compressor.chunk
            if cache is None:
                J = h_new.shape[1] // c  # complete chunks
                new_summaries = self.compressor.write(h_new[:, :J * c].unflatten(1, (J, c)))
            else:
                self.compressor.write_cached(h_new, t, cache, start_pos)
        return StepOut(h_new, self.act(h_new), route, entry, new_summaries, probs)


def loop_step(rec: RecurrentBlock, state: LoopState, t: int | torch.Tensor, e: torch.Tensor, row: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, force_idx: torch.Tensor | None, force_halt: torch.Tensor | None, *,
              halting: HaltingSpec, last: bool, start_pos: int, layer: int, attn_probs: bool,
              value: Callable[[torch.Tensor], torch.Tensor] | None, pad: torch.Tensor | None = None,
              freeze: bool = False) -> tuple[LoopState, tuple[torch.Tensor | None, ...]]:
    """Loop step t (ARCHITECTURE.md 3-4): state -> (new state, the step's Traces row in Traces field order).

    t: a Python int (the eager loop), or a 0-d int32 tensor (the torch.while_loop form, `_run_steps`).
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
        # out of place: the earlier steps' attention saved the memory for the backward pass
        if isinstance(t, torch.Tensor):  # the while_loop form: a traced slot, no Python slicing
            memory = tuple(m.index_copy(0, (t + 1).view(1).long(), x[None]) for m, x in zip(memory, out.entry))
        else:
            memory = tuple(torch.cat([m[:t + 1], x[None], m[t + 2:]]) for m, x in zip(memory, out.entry))
    summaries = out.summaries
    # force_halt: s in 1..N halts at step s, 0 never by threshold, -1 by the position's own threshold decision
    if halting.mode == "last":  # every position runs all N steps, y = h_N (force_halt forces nothing: model.py)
        w, c_new, still, halts = last_step(p, c, running, last)
        decided = halts
    elif halting.mode == "ponder":  # y = h_t at the halting step; halted: by C_t >= threshold, not by N
        forced = None if force_halt is None else torch.where(force_halt < 0, -1, (force_halt == t + 1).long())
        w, c_new, still, halts, decided = ponder_step(p, c, running, halting.threshold, last, forced)
    else:
        forced = None if force_halt is None else (force_halt == t + 1) | ((force_halt < 0) & (c + p >= halting.threshold))
        graves = (halting.remainder == "graves") & last
        w, c_new, still, halts = act_step(p, c, running, halting.threshold, graves, forced)
        decided = halts
        if halting.straight_through:
            # forward: weight 1 at the step where the position halts (its loop count), 0 elsewhere;
            # backward: the soft ACT weights (w_soft + sg(w_hard - w_soft))
            hard = halts | (still & last)
            w = w + (hard.to(w.dtype) - w).detach()
    y = y + w.to(h.dtype)[..., None] * h
    counts = torch.where(halts, t + 1, counts)
    halted = halted | decided
    B, T, _ = h.shape
    acc = acc_dtype(h.dtype)
    if out.route is None:  # a dense FFN routes nothing: k = 0 experts, margin +inf
        idx = torch.empty(B, T, 0, dtype=torch.int32, device=h.device)
        margin = torch.full((B, T), float("inf"), dtype=acc, device=h.device)
    else:
        idx, margin = out.route
    norm = torch.linalg.vector_norm(h.to(acc), dim=-1).to(h.dtype)
    probs = out.attn_probs
    if probs is not None and cache is not None:  # keys past start_pos + T: zeros, as in the jax twin
        probs = F.pad(probs, (0, cache.capacity - probs.shape[-1]))
    trace = (norm, p, c_new, running, idx, margin, None if value is None else value(h), probs)
    if frozen is not None and frozen.keep is not None:
        trace = frozen_trace(trace, frozen.keep)
    return LoopState(h, y, c_new, still, halted, counts, cache, memory, summaries,
                     None if frozen is None else frozen.rows), trace


def frozen_trace(trace: tuple[torch.Tensor | None, ...], keep: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """A step's Traces row with the fill values at positions keep (B, T) (frozen: they ran nothing); cum_p
    keeps c and running is False there already."""
    norm, p, c, running, idx, margin, value, probs = trace
    return (torch.where(keep, 0.0, norm), torch.where(keep, 0.0, p), c, running, torch.where(keep[..., None], -1, idx),
            torch.where(keep, float("inf"), margin), None if value is None else torch.where(keep, 0.0, value),
            None if probs is None else torch.where(keep[:, None, :, None], 0.0, probs))


def write_frozen(rec: RecurrentBlock, cache: KVCache, h: torch.Tensor, rows: tuple[torch.Tensor, ...],
                 names: tuple[str, ...], t: int, *, layer: int, start_pos: int) -> KVCache:
    """Loop step t that a cached call skipped (decode.halted_kv=freeze, no position running): cache layer
    `layer` (P + t) gets the carried rows (named `names`), the compressor the kept states h (B, T, D)."""
    cache.write(layer, start_pos, **dict(zip(names, rows)))
    if rec.compressor is not None:  # its chunks need every row of every step
        rec.compressor.write_cached(h, t, cache, start_pos)
    return cache


# a Traces row, or the stacked Traces: a tuple of tensors (and Nones) in Traces field order
Rows = tuple[torch.Tensor | None, ...]


def _run_steps(step: Callable[[LoopState, torch.Tensor], tuple[LoopState, Rows]], state: LoopState, fills: Rows,
               N: int, early_exit: bool) -> tuple[LoopState, Rows, torch.Tensor]:
    """Run step(state, t) for t = 0, 1, ... as one torch.while_loop (the loop's control flow, STYLE 9; the
    jax twin's _run_steps) -> final state, the per-step Traces rows stacked to (N, ...) (steps not run hold
    `fills`), steps executed (0-d int32). The opt-in form of Mythos.loop (loop_form="while"), inference only.
    """
    # torch.while_loop: the early exit tests a traced value, which a Python `break` cannot do under
    # torch.export (ONNX: one Loop node) or torch.compile; the carry is flat tensors, so the state's
    # None fields (no cache, no memory, ...) stay outside it, and rows go into fixed-size (N, ...) buffers
    # state fields: a tensor, a tuple of tensors (the cross-loop memory) or None; flat in the carry
    sizes = [0 if x is None else len(x) if isinstance(x, tuple) else 1 for x in state]
    flat = [y for x in state if x is not None for y in (x if isinstance(x, tuple) else (x,))]
    # rows with no elements (a dense FFN's (B, T, 0) experts) stay out of the carry: nothing to write
    rows = [i for i, f in enumerate(fills) if f is not None and f.numel() > 0]

    def unpack(carry: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, LoopState, list[torch.Tensor]]:
        parts: list[torch.Tensor | tuple[torch.Tensor, ...] | None] = []
        at = 1
        for x, n in zip(state, sizes):
            parts.append(None if n == 0 else tuple(carry[at:at + n]) if isinstance(x, tuple) else carry[at])
            at += n
        return carry[0], LoopState(*parts), list(carry[at:])

    def cond(*carry: torch.Tensor) -> torch.Tensor:
        t, state, _ = unpack(carry)
        # logical ops, not Where, on booleans (onnxruntime has no bool Where)
        return (t < N) & state.running.any() if early_exit else t < N

    def body(*carry: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t, state, buffers = unpack(carry)
        state, trace = step(state, t)
        at = t.view(1).long()
        buffers = [b.index_copy(0, at, trace[i][None]) for b, i in zip(buffers, rows)]
        return (t + 1, *(y for x in state if x is not None for y in (x if isinstance(x, tuple) else (x,))), *buffers)

    buffers = [fills[i].expand(N, *fills[i].shape).clone() for i in rows]
    # clones: the carry may not alias the loop's other inputs (h starts as e, which every step reads)
    init = (torch.zeros((), dtype=torch.int32, device=state.h.device), *(x.clone() for x in flat), *buffers)
    out = torch.while_loop(cond, body, init)
    n_steps, state, stacked = unpack(tuple(out))
    traces = [None if f is None else f.expand(N, *f.shape).clone() for f in fills]
    for i, b in zip(rows, stacked):
        traces[i] = b
    return state, tuple(traces), n_steps
