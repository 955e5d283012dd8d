"""The looped block: loop-index embedding, depth-wise LoRA, LTI injection, ACT (ARCHITECTURE.md 2-4)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from spec import Spec

from .components import ContextCompressor, CrossLoopAttention, MemoryGate
from .layers import RMSNorm, acc_dtype

if TYPE_CHECKING:
    from .attention import KVCache
    from .model import Block


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
        return (self.down(o) * s) @ self.B[...]


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

    last: Graves' remainder, every running position halts now. forced (B, T) bool replaces the
    threshold decision (replay of force_halt).
    """
    decide = c + p >= threshold if forced is None else forced
    halts = running & (decide | last)
    w = jnp.where(running, jnp.where(halts, 1.0 - c, p), 0.0)
    c = c + jnp.where(running, p, 0.0)  # open-mythos: c + p * running
    return w, c, running & ~halts, halts


class StepOut(NamedTuple):
    """What one loop step returns (RecurrentBlock)."""
    h: jax.Array  # (B, T, D) the new state
    p: jax.Array  # (B, T) acc dtype, halting probability of the new state
    idx: jax.Array  # (B, T, k) int32 routed experts
    margin: jax.Array  # (B, T) acc dtype router margin
    entry: tuple[jax.Array, jax.Array] | None  # cross-loop memory key/value of the new state, (B, T, H, K)
    summaries: jax.Array | None  # compressor summaries of this step's complete chunks (B, J, m, D), no cache
    probs: jax.Array | None  # (B, H, T, S) self-attention probabilities when asked for


class RecurrentBlock(nnx.Module):
    """One loop step (ARCHITECTURE.md section 3): embed t, [cross-loop attention, compressor read], block,
    LoRA, LTI injection [memory gate], halting p [compressor write]."""

    def __init__(self, spec: Spec, block: Block, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        r, d, eps = spec.recurrent, spec.dim, spec.norm_eps
        self.norm = RMSNorm(d, eps, dtype=dtype, rngs=rngs)
        self.block = block
        self.lora = LoRA(d, r.lora_rank, r.max_loop_iters, dtype=dtype, rngs=rngs) if r.lora_rank > 0 else None
        self.injection = LTIInjection(d, dtype=dtype, rngs=rngs)
        self.act = ACT(d, spec.halting.head, spec.halting.mlp_hidden, dtype=dtype, rngs=rngs)
        cl, cp = r.cross_loop_attention, r.compressor
        self.cross_loop = CrossLoopAttention(d, cl.n_heads, eps, dtype=dtype, rngs=rngs) if cl.enabled else None
        self.compressor = ContextCompressor(d, cp.chunk, cp.n_summaries, cp.n_heads, eps, dtype=dtype, rngs=rngs) \
            if cp.enabled else None
        self.memory_gate = MemoryGate(d, eps, dtype=dtype, rngs=rngs) if r.memory_gate.enabled else None

    def __call__(self, h: jax.Array, e: jax.Array, t: jax.Array, row: jax.Array, cos: jax.Array,
                 sin: jax.Array, force_idx: jax.Array | None = None, *, cache: KVCache | None = None,
                 layer: int | jax.Array = 0, start_pos: int | jax.Array = 0,
                 memory: tuple[jax.Array, ...] | None = None, summaries: jax.Array | None = None,
                 return_probs: bool = False) -> StepOut:
        """Step t: h (B, T, D) -> StepOut(new h, halting p (B, T), expert idx (B, T, k), router margin (B, T), ...).

        memory: the cross-loop memory (keys, values, entries in use), (M, B, T, H, K) each; summaries:
        the compressor's summaries of step t-1 (B, J, m, D), all masked at step 0. With a cache, the
        block's attention writes and reads cache layer `layer` (P + t), and the compressor reads and
        writes its cache rows.
        """
        # the loop embedding feeds the block input only; the injection uses the un-embedded h
        x = add_loop_embedding(h, row)  # h~
        if self.cross_loop is not None:
            x = x + self.cross_loop(x, *memory)
        if self.compressor is not None:
            T = h.shape[1]
            if cache is not None:  # step t-1's summaries of every chunk so far (unwritten ones are masked)
                summaries = jnp.take(cache.arrays["summaries"], jnp.maximum(t - 1, 0), axis=0)
            # step 0 reads only the null slot (lax.scan: t is traced, so mask rather than skip)
            n_visible = jnp.where(t > 0, (start_pos + jnp.arange(T)) // self.compressor.chunk, 0)
            x = x + self.compressor.read(x, summaries, n_visible)
        n = self.norm(x + e)  # (h + emb) + e, open-mythos' association
        if return_probs:
            o, idx, margin, probs = self.block(n, cos, sin, force_idx, cache=cache, layer=layer, start_pos=start_pos,
                                               return_probs=True)
        else:
            o, idx, margin = self.block(n, cos, sin, force_idx, cache=cache, layer=layer, start_pos=start_pos)
            probs = None
        if self.lora is not None:
            o = o + self.lora(o, t)
        if self.memory_gate is None:
            h_new = self.injection(h, e, o)
        else:
            h_new = self.memory_gate(h, e, o, self.injection.decay(), self.injection.B[...])
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
        return StepOut(h_new, self.act(h_new), idx, margin, entry, new_summaries, probs)
