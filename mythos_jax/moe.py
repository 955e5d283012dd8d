"""DeepSeek-style MoE FFN with aux-loss-free balancing (ARCHITECTURE.md section 2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spec import MoESpec

from .layers import SwiGLU, acc_dtype

if TYPE_CHECKING:
    from .model import Mythos


class RouterBias(nnx.Variable):
    """The per-expert routing bias b: moved by update_router_bias, never by gradients (torch: a buffer)."""


def route(logits: jax.Array, bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k of logits + bias (ties to the lower index) -> idx (..., k) int32, weights (..., k), margin (...).

    Weights are the softmax scores of the chosen experts renormalised to sum to one; the margin is
    the k-th minus the (k+1)-th biased logit (+inf when k = E).
    """
    scores = jax.nn.softmax(logits, axis=-1)
    biased = logits + bias
    # lax.top_k puts the lower index first on ties (torch: a stable descending sort)
    vals, order = jax.lax.top_k(biased, min(top_k + 1, logits.shape[-1]))  # (..., k+1)
    idx = order[..., :top_k]
    w = jnp.take_along_axis(scores, idx, axis=-1)
    w = w / w.sum(-1, keepdims=True)
    if top_k < logits.shape[-1]:
        margin = vals[..., top_k - 1] - vals[..., top_k]
    else:
        margin = jnp.full(logits.shape[:-1], jnp.inf, dtype=logits.dtype)
    return idx.astype(jnp.int32), w, margin


class Experts(nnx.Module):
    """E routed SwiGLU experts, weights stacked [E, in, out] (`gate`, `up`, `down`)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # values come from load_arrays
        self.gate = nnx.Param(jnp.zeros((n_experts, dim, hidden), dtype=dtype))
        self.up = nnx.Param(jnp.zeros((n_experts, dim, hidden), dtype=dtype))
        self.down = nnx.Param(jnp.zeros((n_experts, hidden, dim), dtype=dtype))

    def __call__(self, x: jax.Array, expert: jax.Array) -> jax.Array:
        """Row m of x (M, D) through expert[m] (M,): grouped by expert into tiles, batched matmuls."""
        M, D = x.shape
        E = self.gate.shape[0]
        # static shapes: each expert's rows fill whole tiles of b rows (zero-padded), so at most
        # ceil(M / b) + E tiles; every tile is multiplied by its own expert's weights in one batched
        # matmul. (lax.ragged_dot lowers on the CPU to a masked matmul over all E experts.)
        b = _tile_rows(M, E)
        n_tiles = -(-M // b) + E
        order = jnp.argsort(expert, stable=True).astype(jnp.int32)  # rows sorted by expert
        counts = jnp.bincount(expert, length=E).astype(jnp.int32)  # (E,)
        starts = jnp.cumsum(counts) - counts  # first sorted row of each expert
        padded = (counts + b - 1) // b * b
        tile_starts = jnp.cumsum(padded) - padded  # first padded row of each expert
        es = expert[order]
        slot = tile_starts[es] + jnp.arange(M, dtype=jnp.int32) - starts[es]  # (M,) padded row of each sorted row
        xt = jnp.zeros((n_tiles * b, D), dtype=x.dtype).at[slot].set(x[order]).reshape(n_tiles, b, D)
        first = jnp.arange(n_tiles, dtype=jnp.int32) * b
        te = jnp.minimum(jnp.searchsorted(tile_starts + padded, first, side="right"), E - 1)  # expert of each tile
        ht = jax.nn.silu(xt @ self.gate[...][te]) * (xt @ self.up[...][te])  # (tiles, b, hidden)
        yt = (ht @ self.down[...][te]).reshape(n_tiles * b, D)
        return jnp.zeros_like(x).at[order].set(yt[slot])  # (M, D), back in row order


def _tile_rows(M: int, E: int) -> int:
    """Rows per expert tile: about M / E (a power of two, 8..128), so padding stays below M + E * b."""
    return min(128, max(8, 1 << max(0, -(-M // E) - 1).bit_length()))


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

    def __call__(self, x: jax.Array, force_idx: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, T, D) -> out (B, T, D), expert idx (B, T, k) int32, router margin (B, T).

        force_idx (B, T, k) replaces the top-k choice (replay); weights then come from the same scores.
        A position whose force_idx holds -1 (the trace fill of a step not run) keeps the top-k choice.
        """
        B, T, D = x.shape
        k = self.top_k
        acc = acc_dtype(x.dtype)
        z = jnp.einsum("btd,de->bte", x.astype(acc), self.router.kernel[...].astype(acc))  # router logits in acc dtype
        idx, w, margin = route(z, self.router_bias[...], k)
        if force_idx is not None:
            # jax only: -1 rows cannot raise inside the compiled loop, so they mean "not forced"
            free = jnp.any(force_idx < 0, axis=-1, keepdims=True)
            idx = jnp.where(free, idx, force_idx.astype(jnp.int32))
            s = jnp.take_along_axis(jax.nn.softmax(z, axis=-1), idx, axis=-1)
            w = s / s.sum(-1, keepdims=True)
        flat = x.reshape(B * T, D)
        y = self.experts(jnp.repeat(flat, k, axis=0), idx.reshape(-1)).reshape(B * T, k, D)
        w = w.reshape(B * T, k).astype(x.dtype)
        out = jnp.zeros_like(flat)
        for j in range(k):  # slot by slot, the summation order of open-mythos
            out = out + w[:, j, None] * y[:, j]
        for shared in self.shared_experts:
            out = out + shared(flat)
        return out.reshape(B, T, D), idx, margin


def expert_load(expert_idx: jax.Array, running: jax.Array, n_experts: int) -> jax.Array:
    """Tokens routed to each expert (E,) int32, counting (step, position, slot) entries of running positions.

    expert_idx (N, B, T, k) and running (N, B, T) as in `Traces`.
    """
    # (N, B, T, k, E): entry (t, b, i, j) names expert e and position (b, i) was running at step t
    hits = (expert_idx[..., None] == jnp.arange(n_experts, dtype=jnp.int32)) & running[..., None, None]
    return hits.sum(axis=(0, 1, 2, 3), dtype=jnp.int32)


def update_router_bias(model: Mythos, load: jax.Array) -> None:
    """Aux-loss-free balancing, after an optimizer step: b += gamma * sign(mean(load) - load)."""
    moe = model.recurrent.block.ffn
    if not isinstance(moe, MoE):
        raise ValueError("update_router_bias: the recurrent FFN is dense (recurrent.ffn=dense); it has no router")
    load = np.asarray(load, dtype=np.float64)
    if load.shape != moe.router_bias.shape:
        raise ValueError(f"update_router_bias: load has shape {tuple(load.shape)}, expected ({moe.n_experts},)")
    # the step in float64 NumPy, as the torch twin computes it, then cast to the bias dtype
    step = model.spec.moe.bias_update_rate * np.sign(load.mean() - load)
    moe.router_bias[...] = moe.router_bias[...] + jnp.asarray(step.astype(moe.router_bias.dtype))
