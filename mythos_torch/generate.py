"""Decoding with a KV cache (ARCHITECTURE.md section 6; docs/design.md "Decoding with a cache"): a prefill,
then one token per step, sampled on the host by spec.sampling.sample_next (the same NumPy code in both twins)."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from spec.sampling import check_generate, check_stop, finish_step, sample_next

from .cache import KVCache
from .sharding import any_running


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
             compile: bool = False, attention_mask: torch.Tensor | None = None,
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
        compile: run the one-token decode steps through torch.compile (opt-in, torch only: the JAX
            twin always compiles its step). One graph serves every position; the first call pays
            the compilation (tens of seconds, more on a cold inductor cache). Results agree with
            the eager steps to float tolerance (inductor may reorder float sums), not bitwise.
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


def compiled_step(model: nn.Module) -> Callable[..., tuple]:
    """model._forward through torch.compile (dynamic shapes: start_pos and the cache length change per token),
    built once per model and kept on it."""
    if model._compiled is None:
        model._compiled = torch.compile(model._forward, dynamic=True)
    return model._compiled
