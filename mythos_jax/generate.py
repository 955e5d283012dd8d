"""Decoding with a KV cache (ARCHITECTURE.md section 6; docs/design.md "Decoding with a cache"): a prefill,
then one token per step, sampled on the host by spec.sampling.sample_next (the same NumPy code in both twins)."""

from __future__ import annotations

import collections
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spec.sampling import check_generate, check_stop, finish_step, sample_next

from .cache import KVCache


def generate(model: nnx.Module, ids: jax.Array, max_new_tokens: int, n_loops: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, *, on_token: Callable[[np.ndarray], None] | None = None,
             attention_mask: jax.Array | None = None, stop: Sequence[Sequence[int]] | None = None) -> jax.Array:
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
        attention_mask: (B, T) 0/1 for a left-padded prompt (forward's; docs/semantics.md "Padding"): each
            row decodes as it would alone. None: no padding.
        stop: token-id sequences, e.g. [[10], [46, 46]]: a row whose new tokens end with one is done (the
            sequence is kept). A done row's later tokens are eos_id, or -1 without one.
    Returns:
        (B, T + max_new_tokens) int32: the prompt followed by the new tokens.
    """
    ids = model._check_ids(jnp.asarray(ids))
    N = model._check_loops(n_loops)
    B, T = ids.shape
    check_generate(model.spec, T, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
    stop = check_stop(stop, model.spec.vocab_size)
    pad = model._check_mask(attention_mask, None, 0, B, T)
    if max_new_tokens == 0:
        return ids
    # the capacity is rounded up to a power of two, so prompts of similar length share compiled steps
    capacity = min(model.spec.max_seq_len, max(16, 1 << (T + max_new_tokens - 1).bit_length()))
    cache: KVCache = model.init_cache(B, capacity, N)
    static, leaves = _split(model)  # once: the compiled step is a pure function of (leaves, cache, ids, start_pos)
    rng = np.random.default_rng(seed)
    done = np.zeros(B, dtype=bool)
    new: list[np.ndarray] = []
    out = _cached_forward(static, leaves, cache, ids, jnp.int32(0), N, None, None, pad)  # prefill: the cache keeps pad
    if temperature == 0 and not stop and on_token is None and max_new_tokens > 1:
        # greedy with nothing to report per token: every step on the device in one program (no host round trip
        # per token); argmax ties to the lower id, as sample_next's, so the tokens are the host loop's (the loop is
        # another compiled program: in float32 its logits may round differently, which can matter only at a near tie)
        logits = np.asarray(out.logits)[:, -1].astype(np.float64)
        tok, done = finish_step(sample_next(logits, rng), new, done, eos_id, stop)
        tail, _ = _greedy_steps(static, leaves, out.cache, jnp.asarray(tok, jnp.int32), jnp.asarray(done), jnp.int32(T),
                                jnp.int32(max_new_tokens), N, pad, eos_id)
        return jnp.concatenate([ids, tail[:, :max_new_tokens]], axis=1)
    for i in range(max_new_tokens):
        logits = np.asarray(out.logits)[:, -1].astype(np.float64)  # (B, V)
        tok = sample_next(logits, rng, temperature, top_k, top_p)  # (B,)
        tok, done = finish_step(tok, new, done, eos_id, stop)  # done rows: eos_id or -1 (spec.sampling)
        new.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(new) == max_new_tokens or done.all():
            break
        step = jnp.asarray(np.maximum(tok, 0)[:, None], dtype=jnp.int32)  # a done row's -1 fill runs as id 0
        out = _cached_forward(static, leaves, out.cache, step, jnp.int32(T + i), N, None, None, pad)
    tail = np.full((B, max_new_tokens), -1 if eos_id is None else eos_id, dtype=np.int64)
    if new:
        tail[:, :len(new)] = np.stack(new, axis=1)
    return jnp.concatenate([ids, jnp.asarray(tail, dtype=jnp.int32)], axis=1)


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


@functools.partial(jax.jit, static_argnums=(0, 5, 9, 10), donate_argnums=(2,))
def _cached_forward(static: _Static, leaves: list[jax.Array], cache: KVCache, ids: jax.Array, start_pos: jax.Array,
                    n_loops: int, force_halt: jax.Array | None, force_experts: jax.Array | None,
                    pad: jax.Array | None, attn_probs: bool = False, early_exit: bool = True) -> tuple:
    """The forward with a cache, compiled once per shapes and n_loops: start_pos is traced, so one
    program serves every position (generate's hot path, and forward(..., cache=...)); -> a ModelOutput.
    pad (B,): left padding (None: none, a program without a padding mask). early_exit: under
    decode.halted_kv=freeze the call stops once no position runs (generate's steps); ignored under compute.

    A pure function of the model's state leaves (static: graphdef and state treedef), so no nnx.jit
    graph walk per token; the cache buffers are donated, so XLA updates them in place.
    """
    TRACE_COUNTS["cached_forward"] += 1
    graphdef, treedef = static.value
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return model._forward(ids, n_loops, early_exit, force_halt, force_experts, cache, start_pos, attn_probs, pad=pad)


@functools.partial(jax.jit, static_argnums=(0, 7, 9), donate_argnums=(2,))
def _greedy_steps(static: _Static, leaves: list[jax.Array], cache: KVCache, tok: jax.Array, done: jax.Array,
                  T: jax.Array, n_new: jax.Array, n_loops: int, pad: jax.Array | None, eos_id: int | None
                  ) -> tuple[jax.Array, KVCache]:
    """Greedy decoding after the prefill, on the device: tok (B,) is new token 0 (sampled on the host), done
    (B,) its rows already finished; -> ((B, capacity) int32 whose first n_new columns are new tokens
    0..n_new-1 (a finished row's later tokens: eos_id, or -1 without one), as generate's host loop makes
    them; the cache after the last step).

    One lax.while_loop over the steps (it stops once every row is done); each step is _cached_forward's
    forward at position T + i - 1, then argmax of its last logits. n_new and T are traced, so one program
    serves every prompt length and token count of a cache capacity."""
    TRACE_COUNTS["greedy_steps"] += 1
    graphdef, treedef = static.value
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    fill = jnp.int32(-1 if eos_id is None else eos_id)
    B, capacity = tok.shape[0], cache.capacity
    buf = jnp.full((B, capacity), fill, jnp.int32).at[:, 0].set(tok.astype(jnp.int32))

    def running(c: tuple) -> jax.Array:
        i, _, _, done, _ = c
        return (i < n_new) & ~jnp.all(done)

    def step(c: tuple) -> tuple:
        i, cache, tok, done, buf = c
        ids = jnp.maximum(tok, 0)[:, None]  # a done row's -1 fill runs as id 0
        out = model._forward(ids, n_loops, True, None, None, cache, T + i - 1, False, pad=pad)
        nxt = jnp.where(done, fill, jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32))
        if eos_id is not None:
            done = done | (nxt == eos_id)
        return i + 1, out.cache, nxt, done, jax.lax.dynamic_update_slice(buf, nxt[:, None], (jnp.int32(0), i))

    _, cache, _, _, buf = jax.lax.while_loop(running, step, (jnp.int32(1), cache, tok.astype(jnp.int32), done, buf))
    return buf, cache  # the cache too: its donated buffers are updated in place


def _split(model: nnx.Module) -> tuple[_Static, list[jax.Array]]:
    """The model as (static graphdef and treedef, state leaves) for _cached_forward."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return _Static((graphdef, treedef)), leaves
