"""DeepSeek-style MoE FFN with aux-loss-free balancing (ARCHITECTURE.md section 2)."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spec import MoESpec

from .experts import Experts
from .layers import SwiGLU, acc_dtype


def route(logits: jax.Array, bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k of logits + bias (ties to the lower index) -> idx (..., k) int32, weights (..., k), margin (...).

    Weights are the softmax scores of the chosen experts renormalised to sum to one; the margin is
    the k-th minus the (k+1)-th biased logit (+inf when k = E).
    """
    E = logits.shape[-1]
    scores = jax.nn.softmax(logits, axis=-1)
    biased = logits + bias
    # lax.top_k puts the lower index first on ties (torch: a stable descending sort). Only its k
    # indices are used, whole: XLA then runs its TopK kernel; reading its values, asking for k+1 or
    # slicing the indices turns it into a full sort of every row, ~10x slower on the CPU
    _, idx = jax.lax.top_k(biased, top_k)  # (..., k)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    w = w / w.sum(-1, keepdims=True)
    if top_k < E:
        # the k-th biased logit is the smallest chosen one, the (k+1)-th the largest one not chosen
        # (the values a sort gives; slicing idx itself would also break XLA's TopK pattern)
        chosen = jnp.any(idx[..., None] == jnp.arange(E, dtype=idx.dtype), axis=-2)  # (..., E)
        kth = jnp.min(jnp.where(chosen, biased, jnp.inf), axis=-1)
        margin = kth - jnp.max(jnp.where(chosen, -jnp.inf, biased), axis=-1)
    else:
        margin = jnp.full(logits.shape[:-1], jnp.inf, dtype=logits.dtype)
    return idx.astype(jnp.int32), w, margin


class RouterBias(nnx.Variable):
    """The per-expert routing bias b: moved by update_router_bias, never by gradients (torch: a buffer)."""


class Route(NamedTuple):
    """What the router chose for each position (MoE's second output)."""
    idx: jax.Array  # (B, T, k) int32 routed experts, slot order = descending biased logit
    margin: jax.Array  # (B, T) acc dtype, k-th minus (k+1)-th biased logit (+inf when k = E)


class MoE(nnx.Module):
    """Routed experts (top-k of biased router logits) plus always-on shared experts."""

    def __init__(self, dim: int, m: MoESpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.top_k = m.top_k
        self.n_experts = m.n_experts
        self.router = nnx.Linear(dim, m.n_experts, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        # not a gradient parameter: moved by update_router_bias; float32 in a bfloat16 model
        self.router_bias = RouterBias(jnp.zeros((m.n_experts,), dtype=acc_dtype(dtype)))
        self.experts = Experts(m.n_experts, dim, m.expert_dim, dtype=dtype, rngs=rngs)
        self.shared_experts = nnx.List(
            [SwiGLU(dim, m.expert_dim * m.top_k, dtype=dtype, rngs=rngs) for _ in range(m.n_shared_experts)])
        # expert parallelism (sharding.shard with strategy ep): dispatch(experts, x (N, D), idx (N, k)) -> (N, k, D)
        # sends each row to its experts' devices and back (expert_parallel.py); None: every expert is local
        self.dispatch: Callable[[Experts, jax.Array, jax.Array], jax.Array] | None = None

    def __call__(self, x: jax.Array, force_idx: jax.Array | None = None) -> tuple[jax.Array, Route]:
        """x (B, T, D) -> (out (B, T, D), Route(expert idx (B, T, k) int32, router margin (B, T))).

        force_idx (B, T, k) replaces the top-k choice (replay); weights then come from the same scores.
        A position whose force_idx holds -1 (the trace fill of a step not run) keeps the top-k choice.
        """
        B, T, D = x.shape
        k = self.top_k
        acc = acc_dtype(x.dtype)
        z = jnp.einsum("btd,de->bte", x.astype(acc), self.router.kernel[...].astype(acc))  # router logits in acc dtype
        # under ep, per row shard (expert_parallel: the partitioner would gather the logits for top_k)
        idx, w, margin = (route if self.dispatch is None else self.dispatch.route)(z, self.router_bias[...], k)
        if force_idx is not None:
            # jax only: -1 rows cannot raise inside the compiled loop, so they mean "not forced"
            free = jnp.any(force_idx < 0, axis=-1, keepdims=True)
            idx = jnp.where(free, idx, force_idx.astype(jnp.int32))
            s = jnp.take_along_axis(jax.nn.softmax(z, axis=-1), idx, axis=-1)
            w = s / s.sum(-1, keepdims=True)
        flat = x.reshape(B * T, D)
        experts = self.experts if self.dispatch is None else functools.partial(self.dispatch, self.experts)
        y = experts(flat, idx.reshape(B * T, k))  # (B*T, k, D)
        w = w.reshape(B * T, k).astype(x.dtype)
        out = jnp.zeros_like(flat)
        for j in range(k):  # slot by slot, the summation order of open-mythos
            out = out + w[:, j, None] * y[:, j]
        for shared in self.shared_experts:
            out = out + shared(flat)[0]
        return out.reshape(B, T, D), Route(idx, margin)


def expert_load(expert_idx: jax.Array, running: jax.Array, n_experts: int) -> jax.Array:
    """Tokens routed to each expert (E,) int32, counting (step, position, slot) entries of running positions.

    expert_idx (N, B, T, k) and running (N, B, T) as in `Traces`.
    """
    # (N, B, T, k, E): entry (t, b, i, j) names expert e and position (b, i) was running at step t
    hits = (expert_idx[..., None] == jnp.arange(n_experts, dtype=jnp.int32)) & running[..., None, None]
    return hits.sum(axis=(0, 1, 2, 3), dtype=jnp.int32)


def update_router_bias(moe: MoE, load: jax.Array, rate: float) -> None:
    """Aux-loss-free balancing after an optimizer step: b += rate * sign(mean(load) - load), rate = gamma."""
    if not isinstance(moe, MoE):
        raise ValueError(f"update_router_bias needs the MoE FFN (model.recurrent.block.ffn), got {type(moe).__name__}: "
                         "a dense FFN (recurrent.ffn=dense) has no router")
    load = np.asarray(load, dtype=np.float64)
    if load.shape != moe.router_bias.shape:
        raise ValueError(f"update_router_bias: load has shape {tuple(load.shape)}, expected ({moe.n_experts},)")
    # the step in float64 NumPy, as the torch twin computes it, then cast to the bias dtype
    step = rate * np.sign(load.mean() - load)
    moe.router_bias[...] = moe.router_bias[...] + jnp.asarray(step.astype(moe.router_bias.dtype))
