"""The looped block: loop-index embedding, depth-wise LoRA, LTI injection, ACT (ARCHITECTURE.md 2-4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from spec import Spec

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


class RecurrentBlock(nnx.Module):
    """One loop step (ARCHITECTURE.md section 3): embed t, block, LoRA, LTI injection, halting p."""

    def __init__(self, spec: Spec, block: Block, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        r, d = spec.recurrent, spec.dim
        self.norm = RMSNorm(d, spec.norm_eps, dtype=dtype, rngs=rngs)
        self.block = block
        self.lora = LoRA(d, r.lora_rank, r.max_loop_iters, dtype=dtype, rngs=rngs) if r.lora_rank > 0 else None
        self.injection = LTIInjection(d, dtype=dtype, rngs=rngs)
        self.act = ACT(d, spec.halting.head, spec.halting.mlp_hidden, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array, e: jax.Array, t: jax.Array, row: jax.Array, cos: jax.Array,
                 sin: jax.Array, force_idx: jax.Array | None = None, *, cache: KVCache | None = None,
                 layer: int | jax.Array = 0, start_pos: int | jax.Array = 0
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Step t: h (B, T, D) -> new h, halting p (B, T), expert idx (B, T, k), router margin (B, T).

        With a cache, the block's attention writes and reads cache layer `layer` (P + t).
        """
        # the loop embedding feeds the block input only; the injection uses the un-embedded h
        n = self.norm(add_loop_embedding(h, row) + e)  # (h + emb) + e, open-mythos' association
        o, idx, margin = self.block(n, cos, sin, force_idx, cache=cache, layer=layer, start_pos=start_pos)
        if self.lora is not None:
            o = o + self.lora(o, t)
        h = self.injection(h, e, o)
        return h, self.act(h), idx, margin
