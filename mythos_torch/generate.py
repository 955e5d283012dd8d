"""Decoding with a KV cache (ARCHITECTURE.md section 6; docs/design.md "Decoding with a cache"): a prefill,
then one token per step, sampled on the host by spec.sampling.sample_next (the same NumPy code in both twins)."""

from __future__ import annotations

import functools
import os
import weakref
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from spec.sampling import check_generate, check_stop, finish_step, sample_next

from .cache import KVCache
from .experts import COMPILED_ROWS, Experts, _grouped_mm_takes
from .moe import MoE
from .sharding import any_running

# generate(compile=None) compiles its decode steps unless MYTHOS_COMPILE=0 (tests/conftest.py sets it: no test
# compiles unless it asks); the compiled graphs are kept in inductor's cache (compile_cache_dir) across processes
COMPILE_ENV = "MYTHOS_COMPILE"
# generate(compile=None) compiles for at least this many new tokens (or once the model holds a compiled step):
# a handful of tokens cannot repay even a cached compilation (seconds)
COMPILE_MIN_TOKENS = 32
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _no_autograd(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn under torch.inference_mode, or torch.no_grad for a sharded model (FSDP2 cannot gather its
    parameters into inference tensors)."""
    @functools.wraps(fn)
    def run(model: nn.Module, *args, **kwargs) -> torch.Tensor:
        with torch.inference_mode() if model.sharding is None else torch.no_grad():
            return fn(model, *args, **kwargs)
    return run


@_no_autograd
def generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, n_loops: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, *, on_token: Callable[[np.ndarray], None] | None = None,
             compile: bool | None = None, attention_mask: torch.Tensor | None = None,
             stop: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Decode with a KV cache from a Mythos model (model.generate calls this; model.py imports this file).

    Args:
        model: a Mythos model.
        ids: (B, T) prompt token ids.
        max_new_tokens: tokens to add; T + max_new_tokens must not exceed spec.max_seq_len.
        n_loops: loop steps N of every call; None -> recurrent.max_loop_iters. Under decode.halted_kv=compute
            every call runs all N; under freeze a call stops once none of its tokens is running.
        temperature: 0 is greedy (argmax, ties to the lower id); else sampling (sample_next).
        top_k, top_p: sampling filters (None: off).
        seed: seed of numpy.random.default_rng, one uniform per row per step.
        eos_id: a row that emits it is padded with it; decoding stops once every row is done.
        on_token: called with each step's new tokens (B,) int64, as they come (streaming).
        compile: run the one-token decode steps through torch.compile (torch only: the JAX twin always
            compiles its step). None (the default): compiled where that is correct and can pay off
            (compile_by_default: an unsharded model on the CPU or CUDA, MYTHOS_COMPILE not 0, at least
            COMPILE_MIN_TOKENS new tokens or a step compiled before), eager otherwise; True / False force
            it. One graph serves every position; the first call in a process pays the compilation (~30-40 s
            on 2 busy CPU cores with an empty cache, ~10 s once compile_cache_dir holds the graphs).
            Greedy tokens equal the eager ones in our tests; logits agree to float tolerance (inductor
            may reorder float sums), not bitwise.
        attention_mask: (B, T) 0/1 for a left-padded prompt (forward's; docs/semantics.md "Padding"): each
            row decodes as it would alone. None: no padding.
        stop: token-id sequences, e.g. [[10], [46, 46]]: a row whose new tokens end with one is done (the
            sequence is kept). A done row's later tokens are eos_id, or -1 without one.
    Returns:
        (B, T + max_new_tokens) int64: the prompt followed by the new tokens.
    """
    ids = model._check_ids(ids)
    N = model._check_loops(n_loops)
    B, T = ids.shape
    check_generate(model.spec, T, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
    stop = check_stop(stop, model.spec.vocab_size)
    pad = model._check_mask(attention_mask, None, 0, B, T)
    if max_new_tokens == 0:
        return ids
    compile = compile_by_default(model, max_new_tokens) if compile is None else bool(compile)
    cache: KVCache = model.init_cache(B, T + max_new_tokens, N)
    rng = np.random.default_rng(seed)
    done = np.zeros(B, dtype=bool)
    new: list[np.ndarray] = []
    out = model(ids, N, cache=cache, attention_mask=attention_mask)  # prefill: the cache remembers the padding
    for i in range(max_new_tokens):
        logits = out.logits[:, -1].double().cpu().numpy()  # (B, V)
        tok = sample_next(logits, rng, temperature, top_k, top_p)  # (B,)
        tok, done = finish_step(tok, new, done, eos_id, stop)  # done rows: eos_id or -1 (spec.sampling)
        new.append(tok)
        if on_token is not None:
            on_token(tok)
        # sharded: stop once every row of every batch shard is done (the ranks issue the same collectives)
        if len(new) == max_new_tokens or not any_running(model.sharding, torch.from_numpy(~done)):
            break
        # forward without its checks: the ids are sampled ids (a done row's -1 fill runs as id 0), the
        # positions fit the cache
        step = torch.from_numpy(np.maximum(tok, 0)[:, None]).to(ids.device)
        # early_exit=True: honoured under decode.halted_kv=freeze (the step stops once its token halted)
        out = (compiled_step(model) if compile else model._forward)(step, N, True, None, None, out.cache, T + i,
                                                                    pad=pad)
    tail = np.full((B, max_new_tokens), -1 if eos_id is None else eos_id, dtype=np.int64)
    if new:
        tail[:, :len(new)] = np.stack(new, axis=1)
    return torch.cat([ids, torch.from_numpy(tail).to(ids.device)], dim=1)


def compile_by_default(model: nn.Module, max_new_tokens: int) -> bool:
    """generate(compile=None): True for an unsharded model on the CPU or CUDA unless MYTHOS_COMPILE=0, when the
    call adds at least COMPILE_MIN_TOKENS tokens or the model holds a compiled step already; a sharded model
    (FSDP hooks, DTensors, collectives) and other devices decode eagerly."""
    env = os.environ.get(COMPILE_ENV, "1")
    if env not in ("0", "1"):
        raise ValueError(f"{COMPILE_ENV}={env!r} must be 0 (eager decode steps) or 1 (torch.compile, the default)")
    where = model.sharding is None and model.embed.weight.device.type in ("cpu", "cuda")
    return env == "1" and where and (max_new_tokens >= COMPILE_MIN_TOKENS or model._compiled is not None)


def compile_cache_dir() -> str:
    """The directory of inductor's FX-graph and AOTAutograd caches, which a later process reuses instead of
    compiling again: $TORCHINDUCTOR_CACHE_DIR when set, else $XDG_CACHE_HOME/mythos/inductor (~/.cache/...)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # importing torch._dynamo writes inductor's default (a temp dir, lost on reboot) into the variable: an
    # unset or default value becomes ours; inductor reads it whenever it compiles
    if os.path.abspath(os.environ.get(CACHE_ENV, default_cache_dir())) == os.path.abspath(default_cache_dir()):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ[CACHE_ENV] = os.path.join(base, "mythos", "inductor")
    return os.environ[CACHE_ENV]


def compiled_step(model: nn.Module) -> Callable[..., tuple]:
    """model._forward through torch.compile (dynamic shapes: start_pos and the cache length change per token),
    built once per model and kept on it."""
    if model._compiled is None:
        compile_cache_dir()
        _eager_large_experts(model)
        model._compiled = torch.compile(model._forward, dynamic=True)
    return model._compiled


_FORWARDS: weakref.WeakKeyDictionary[nn.Module, Callable[..., tuple]] = weakref.WeakKeyDictionary()


def compiled_forward(model: nn.Module) -> Callable[..., tuple]:
    """model.forward (the same arguments and ModelOutput) through torch.compile, built once per model.

    The argument checks run eagerly (model._checked, outside the graph), model._forward as compiled graphs;
    a new input shape compiles again once, then runs with dynamic shapes. Logits agree with model.forward to float
    tolerance (inductor fuses and may reorder float sums). For repeated calls (benchmarks, evaluation,
    serving): the first call compiles (~20-30 s on 2 busy cores, less from compile_cache_dir).
    """
    if model.sharding is not None:
        raise ValueError("compiled_forward: a sharded model (sharding.shard) runs eagerly (FSDP hooks, DTensors "
                         "and collectives do not compile); call the model itself")
    if model not in _FORWARDS:
        compile_cache_dir()
        _eager_large_experts(model)
        inner = torch.compile(type(model)._forward)  # the model passed in: the cache holds no strong reference
        ref = weakref.ref(model)

        def call(*args: object, **kwargs: object) -> tuple:
            m = ref()
            return inner(m, *m._checked(*args, **kwargs))

        _FORWARDS[model] = call
    return _FORWARDS[model]


@torch.compiler.disable
def _experts_eager(experts: Experts, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """experts(x, idx) outside the compiled graph: the grouped-matmul path (experts.py) for many rows."""
    return experts(x, idx)


def _grouped_static(experts: Experts, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Experts' grouped path (experts.py) with static shapes, traceable by torch.compile: x (N, D), idx (N, k)
    -> (N, k, D). The group ends come from a scatter-add (bincount's length depends on the data) and the
    inverse order from a scatter; the same rows, groups and grouped matmuls, so the same products."""
    N, k = idx.shape
    flat = idx.reshape(-1).long()  # (M,), row m = (token m // k, slot m % k)
    order = torch.argsort(flat, stable=True)  # (M,) rows sorted by expert
    counts = torch.zeros(experts.gate.shape[0], dtype=torch.long, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat))  # (E,)
    offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) end of each group
    xs = x.index_select(0, order // k)  # (M, D)
    hs = F.silu(F.grouped_mm(xs, experts.gate, offs=offs)) * F.grouped_mm(xs, experts.up, offs=offs)  # (M, hidden)
    ys = F.grouped_mm(hs, experts.down, offs=offs)  # (M, D)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    return ys.index_select(0, inverse).view(N, k, -1)  # back to (token, slot) order


def _dispatch(experts: Experts, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """MoE.dispatch of a compiled model. Under torch.compile, rows (N, D) with N * k > COMPILED_ROWS would pad
    every expert group to the largest (a host read, a graph break and a recompile per group size): bfloat16
    on the CPU traces the grouped path with static shapes (_grouped_static; grouped_mm's CPU meta kernel is
    bfloat16 only), other dtypes and devices run Experts' own grouped path outside the graph. Fewer rows
    (decoding) stay as Experts traces them; eager calls are Experts' own."""
    if torch.compiler.is_compiling() and x.shape[0] * idx.shape[1] > COMPILED_ROWS:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _grouped_mm_takes(x, experts.gate.shape[-1]):
            return _grouped_static(experts, x, idx)
        return _experts_eager(experts, x, idx)
    return experts(x, idx)


def _eager_large_experts(model: nn.Module) -> None:
    """Give every local MoE of model the compile dispatch (_dispatch); eager calls are unchanged by it, an
    expert-parallel MoE keeps its all-to-all."""
    for m in model.modules():
        if isinstance(m, MoE) and m.dispatch is None:
            m.dispatch = _dispatch
