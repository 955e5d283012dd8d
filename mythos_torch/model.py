"""The whole model: prelude, recurrent loop with ACT, coda, tied head (ARCHITECTURE.md section 1)."""

from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Mapping, NamedTuple

import ml_dtypes
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from spec import Spec, init_arrays, loop_table, manifest, rope_table
from spec.sampling import check_generate, sample_next

from .attention import GQAttention, KVCache, MLAttention
from .layers import RMSNorm, SwiGLU, acc_dtype
from .moe import MoE
from .recurrent import RecurrentBlock, act_step

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, dim: int, attn: GQAttention | MLAttention, ffn: SwiGLU | MoE, eps: float, *,
                 dtype: torch.dtype):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps, dtype=dtype)
        self.attn = attn
        self.ffn_norm = RMSNorm(dim, eps, dtype=dtype)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, force_idx: torch.Tensor | None = None,
                *, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0, return_probs: bool = False
                ) -> tuple[torch.Tensor, ...]:
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
            idx = torch.empty(B, T, 0, dtype=torch.int32, device=x.device)
            margin = torch.full((B, T), float("inf"), dtype=acc_dtype(x.dtype), device=x.device)
        if return_probs:
            return x + f, idx, margin, probs
        return x + f, idx, margin


def make_block(spec: Spec, moe: bool, *, dtype: torch.dtype) -> Block:
    """A prelude/coda block (dense SwiGLU) or the looped block (MoE or dense, by spec)."""
    a, d = spec.attention, spec.dim
    if a.type == "gqa":
        attn = GQAttention(d, a.n_heads, a.n_kv_heads, dtype=dtype)
    else:
        attn = MLAttention(d, a.n_heads, a.q_lora_rank, a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim,
                           a.v_head_dim, spec.norm_eps, dtype=dtype)
    ffn = MoE(d, spec.moe, dtype=dtype) if moe else SwiGLU(d, spec.ffn_hidden, dtype=dtype)
    return Block(d, attn, ffn, spec.norm_eps, dtype=dtype)


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
        self._compiled: Callable[..., ModelOutput] | None = None  # see _compiled_step

    def forward(self, ids: torch.Tensor, n_loops: int | None = None, *, early_exit: bool = True,
                force_halt: torch.Tensor | None = None, force_experts: torch.Tensor | None = None,
                cache: KVCache | None = None, start_pos: int = 0, return_attention: bool = False,
                no_grad_steps: int = 0) -> ModelOutput:
        """Logits, loop counts and traces for token ids.

        Args:
            ids: (B, T) integer token ids, T <= spec.max_seq_len.
            n_loops: loop steps N (>= 1); None -> spec.recurrent.max_loop_iters.
            early_exit: stop once no position is running (the result equals running all N steps).
            force_halt: (B, T) int; s in 1..N halts the position at step s, 0 never by threshold.
            force_experts: (N, B, T, k) int; routed experts of step t are force_experts[t] (-1: not forced).
            cache: a KVCache from init_cache(B, ..., N): ids sit at absolute positions start_pos..start_pos+T-1
                and see the cached positions before them; every loop step runs (early_exit is ignored).
            start_pos: absolute position of ids[:, 0] (only with a cache).
            return_attention: also return the looped block's attention probabilities per step (traces.attn_probs).
            no_grad_steps: the first no_grad_steps loop steps (0..N) run without gradient (truncated backprop).
        Returns:
            ModelOutput(logits (B, T, V), loop_counts (B, T) int32, halted (B, T) bool, n_steps, traces, cache,
            values (B, T) or None).
        """
        ids = self._check_ids(ids)
        N = self._check_loops(n_loops)
        B, T = ids.shape
        force_halt, force_experts = self._check_force(force_halt, force_experts, N, B, T)
        start_pos = self._check_cache(cache, start_pos, N, B, T)
        no_grad_steps = _check_no_grad_steps(no_grad_steps, N)
        return self._forward(ids, N, early_exit and cache is None, force_halt, force_experts, cache, start_pos,
                             bool(return_attention), no_grad_steps)

    def _forward(self, ids: torch.Tensor, N: int, early_exit: bool, force_halt: torch.Tensor | None,
                 force_experts: torch.Tensor | None, cache: KVCache | None, start_pos: int,
                 return_attention: bool = False, no_grad_steps: int = 0) -> ModelOutput:
        """forward after its checks (generate's decode steps call it directly)."""
        T = ids.shape[1]
        # absolute positions start_pos..start_pos+T-1
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        P = len(self.prelude)
        x = self.embed(ids)  # (B, T, D)
        for i, block in enumerate(self.prelude):
            x, _, _ = block(x, cos, sin, cache=cache, layer=i, start_pos=start_pos)
        y, counts, halted, n_steps, traces, cache = self.loop(x, cos, sin, N, early_exit, force_halt, force_experts,
                                                              cache, start_pos, return_attention, no_grad_steps)
        for j, block in enumerate(self.coda):
            y, _, _ = block(y, cos, sin, cache=cache, layer=P + N + j, start_pos=start_pos)
        y = self.norm(y)
        logits = F.linear(y, self.embed.weight) if self.head is None else self.head(y)  # (B, T, V)
        values = None if self.value_head is None else self.value_head(y).squeeze(-1)  # (B, T)
        return ModelOutput(logits, counts, halted, n_steps, traces, cache, values)

    def loop(self, e: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, N: int, early_exit: bool,
             force_halt: torch.Tensor | None, force_experts: torch.Tensor | None, cache: KVCache | None = None,
             start_pos: int = 0, return_attention: bool = False, no_grad_steps: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, Traces, KVCache | None]:
        """The recurrent loop with ACT (sections 3-4): e (B, T, D) -> y, loop counts, halted, n_steps, traces, cache."""
        s = self.spec
        B, T, _ = e.shape
        act, dev = acc_dtype(e.dtype), e.device
        # loop-embedding rows from spec.loop_table (float64 angles; activation dtype under openmythos-0.5)
        rows = self._loop_rows(N, e.dtype)  # (N, D): zero past the first L channels
        graves = s.halting.remainder == "graves"
        straight = s.halting.straight_through
        rec = self.recurrent
        P = len(self.prelude)
        h, y = e, torch.zeros_like(e)
        c = torch.zeros(B, T, dtype=act, device=dev)
        running = torch.ones(B, T, dtype=torch.bool, device=dev)
        halted = torch.zeros(B, T, dtype=torch.bool, device=dev)
        counts = torch.full((B, T), N, dtype=torch.int32, device=dev)
        keys, vals = [], []  # cross-loop depth memory: entries of e, h_1, ..., h_t
        summaries = None  # compressor summaries of the previous step (without a cache)
        steps: list[tuple[torch.Tensor, ...]] = []
        for t in range(N):
            # truncated backprop: the first no_grad_steps steps (and all they produce) carry no gradient
            with torch.no_grad() if t < no_grad_steps else contextlib.nullcontext():
                if rec.cross_loop is not None and t == 0:
                    k0, v0 = rec.cross_loop.entry(e)
                    keys, vals = [k0], [v0]
                fx = None if force_experts is None else force_experts[t]
                memory = None if rec.cross_loop is None else (torch.stack(keys), torch.stack(vals))
                kw = dict(cache=cache, layer=P + t, start_pos=start_pos, memory=memory, summaries=summaries,
                          return_probs=return_attention)
                if s.recurrent.checkpoint and cache is None and torch.is_grad_enabled():
                    # recompute the step in the backward pass (ARCHITECTURE.md 5f); same gradients
                    out = torch.utils.checkpoint.checkpoint(rec, h, e, t, rows[t], cos, sin, fx, use_reentrant=False,
                                                            **kw)
                else:
                    out = rec(h, e, t, rows[t], cos, sin, fx, **kw)
                h, p, idx, margin = out.h, out.p, out.idx, out.margin
                if out.entry is not None:
                    keys.append(out.entry[0])
                    vals.append(out.entry[1])
                summaries = out.summaries
                forced = None if force_halt is None else force_halt == t + 1
                w, c_new, still, halts = act_step(p, c, running, s.halting.threshold, graves and t == N - 1, forced)
                if straight:
                    # forward: weight 1 at the step where the position halts (its loop count), 0 elsewhere;
                    # backward: the soft ACT weights (w_soft + sg(w_hard - w_soft))
                    hard = halts | (still if t == N - 1 else torch.zeros_like(still))
                    w = w + (hard.to(w.dtype) - w).detach()
                y = y + w.to(h.dtype)[..., None] * h
                counts = torch.where(halts, t + 1, counts)
                halted = halted | halts
                norm = torch.linalg.vector_norm(h.to(act), dim=-1).to(h.dtype)
                value = None if self.value_head is None else self.value_head(self.norm(h)).squeeze(-1)
                probs = out.probs
                if probs is not None and cache is not None:  # keys past start_pos + T: zeros, as in the jax twin
                    probs = F.pad(probs, (0, cache.capacity - probs.shape[-1]))
                steps.append((norm, p, c_new, running, idx, margin, value, probs))
                c, running = c_new, still
            # with a cache every step runs, so later tokens find cache entries at every depth
            if early_exit and not bool(running.any()):
                break
        fills = (0, 0, 0, False, -1, float("inf"), 0, 0)
        traces = Traces(*(None if col[0] is None else _stack_steps(list(col), N, fill)
                          for col, fill in zip(zip(*steps), fills)))
        return y, counts, halted, len(steps), traces, cache

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
        w = self.embed.weight
        return KVCache({n: torch.zeros(shape, dtype=w.dtype, device=w.device) for n, shape in shapes.items()}, N)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, n_loops: int | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None, *,
                 on_token: Callable[[np.ndarray], None] | None = None, compile: bool = False) -> torch.Tensor:
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
            compile: run the one-token decode steps through torch.compile (opt-in, torch only: the JAX
                twin always compiles its step). One graph serves every position; the first call pays
                the compilation (tens of seconds, more on a cold inductor cache). Results agree with
                the eager steps to float tolerance (inductor may reorder float sums), not bitwise.
        Returns:
            (B, T + max_new_tokens) int64: the prompt followed by the new tokens.
        """
        ids = self._check_ids(ids)
        N = self._check_loops(n_loops)
        B, T = ids.shape
        check_generate(self.spec, T, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
        if max_new_tokens == 0:
            return ids
        cache = self.init_cache(B, T + max_new_tokens, N)
        rng = np.random.default_rng(seed)
        done = np.zeros(B, dtype=bool)
        new: list[np.ndarray] = []
        out = self(ids, N, cache=cache)  # prefill
        for i in range(max_new_tokens):
            logits = out.logits[:, -1].double().cpu().numpy()  # (B, V)
            tok = sample_next(logits, rng, temperature, top_k, top_p)  # (B,)
            if eos_id is not None:
                tok = np.where(done, eos_id, tok)
                done |= tok == eos_id
            new.append(tok)
            if on_token is not None:
                on_token(tok)
            if len(new) == max_new_tokens or done.all():
                break
            # forward without its checks: the ids are sampled ids, the positions fit the cache
            step = torch.from_numpy(tok[:, None]).to(ids.device)
            out = (self._compiled_step() if compile else self._forward)(step, N, False, None, None, out.cache, T + i)
        tail = np.full((B, max_new_tokens), -1 if eos_id is None else eos_id, dtype=np.int64)
        if new:
            tail[:, :len(new)] = np.stack(new, axis=1)
        return torch.cat([ids, torch.from_numpy(tail).to(ids.device)], dim=1)

    def _compiled_step(self) -> Callable[..., ModelOutput]:
        """_forward through torch.compile (dynamic shapes: start_pos and the cache length change per token), built once."""
        if self._compiled is None:
            self._compiled = torch.compile(self._forward, dynamic=True)
        return self._compiled

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
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
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
            if force_experts.numel() and (int(force_experts.min()) < -1 or int(force_experts.max()) >= E):
                raise ValueError(f"force_experts must name experts in 0..{E - 1} (or -1: not forced), got values "
                                 f"in [{int(force_experts.min())}, {int(force_experts.max())}]")
        if force_halt is None:
            return None, force_experts
        force_halt = torch.as_tensor(force_halt, device=dev)
        if tuple(force_halt.shape) != (B, T):
            raise ValueError(f"force_halt must have shape (B, T) = {(B, T)}, got {tuple(force_halt.shape)}")
        force_halt = force_halt.long()
        if int(force_halt.min()) < 0 or int(force_halt.max()) > N:
            raise ValueError(f"force_halt values must lie in 0..N={N} (0: never halt by threshold), got "
                             f"[{int(force_halt.min())}, {int(force_halt.max())}]")
        return force_halt, force_experts


def _check_no_grad_steps(k: int, N: int) -> int:
    """no_grad_steps as an int in 0..N, or a clear ValueError."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= N:
        raise ValueError(f"no_grad_steps={k!r} must be an integer in 0..n_loops={N}")
    return int(k)


def _stack_steps(rows: list[torch.Tensor], n: int, fill: float | bool | int) -> torch.Tensor:
    """Stack per-step rows to (n, ...), steps not run filled with `fill`."""
    x = torch.stack(rows)
    return x if len(rows) == n else torch.cat([x, x.new_full((n - len(rows), *x.shape[1:]), fill)])


def load_arrays(model: Mythos, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy NumPy arrays (torch layout, keyed by manifest path) into the model, cast to its dtype.

    Every missing key, unexpected key and shape mismatch is collected first, then one ValueError.
    """
    target = model.state_dict()  # manifest path -> tensor sharing storage with the model
    errors = [f"unexpected key {k!r}" for k in arrays if k not in target]
    for k, t in target.items():
        if k not in arrays:
            errors.append(f"missing key {k!r} {tuple(t.shape)}")
        elif tuple(np.shape(arrays[k])) != tuple(t.shape):
            errors.append(f"{k}: shape {tuple(np.shape(arrays[k]))}, expected {tuple(t.shape)}")
    if errors:
        raise ValueError(f"load_arrays: {len(errors)} problem(s), nothing loaded:\n  " + "\n  ".join(errors))
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(_to_torch(arrays[k], t.dtype))


def dump_arrays(model: Mythos) -> dict[str, np.ndarray]:
    """Every manifest tensor as a NumPy array in torch layout (bfloat16 as ml_dtypes.bfloat16)."""
    sd = model.state_dict()
    return {p.path: _to_numpy(sd[p.path]) for p in manifest(model.spec)}


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A NumPy array as a CPU tensor of dtype; the cast is done by NumPy (ml_dtypes for bfloat16)."""
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: ml_dtypes.bfloat16}[dtype]
    a = np.ascontiguousarray(np.asarray(a).astype(np_dtype))
    if dtype == torch.bfloat16:
        # NumPy has no bfloat16: move its uint16 bit pattern, exactly
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy copy; bfloat16 via its uint16 bit pattern as ml_dtypes.bfloat16."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


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
            cache: KVCache | None = None, start_pos: int = 0, return_attention: bool = False,
            no_grad_steps: int = 0) -> ModelOutput:
    """model(ids, ...): the same call as the JAX twin's compiled forward."""
    return model(ids, n_loops, early_exit=early_exit, force_halt=force_halt, force_experts=force_experts,
                 cache=cache, start_pos=start_pos, return_attention=return_attention, no_grad_steps=no_grad_steps)
