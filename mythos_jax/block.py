"""The pre-norm transformer block of the prelude, the loop and the coda (ARCHITECTURE.md section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spec import Spec

from .attention import FrozenRows, GQAttention, MLAttention
from .cache import KVCache
from .layers import RMSNorm, SwiGLU
from .moe import MoE, Route


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, dim: int, attn: GQAttention | MLAttention, ffn: SwiGLU | MoE, eps: float, *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(dim, eps, dtype=dtype, rngs=rngs)
        self.attn = attn
        self.ffn_norm = RMSNorm(dim, eps, dtype=dtype, rngs=rngs)
        self.ffn = ffn

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, force_idx: jax.Array | None = None,
                 *, cache: KVCache | None = None, layer: int | jax.Array = 0, start_pos: int | jax.Array = 0,
                 attn_probs: bool = False, pad: jax.Array | None = None, frozen: FrozenRows | None = None
                 ) -> tuple[jax.Array, Route | None, jax.Array | None]:
        """x (B, T, D) -> (x, route (None for a dense FFN), attention probabilities (B, H, T, S) or None).

        attn_probs: return the attention probabilities in acc dtype; force_idx (B, T, k) goes to the MoE;
        pad (B,): each row's left padding, for the attention (None: none); frozen: the looped block under
        decode.halted_kv=freeze, for the attention (attention.FrozenRows).
        """
        a, probs = self.attn(self.attn_norm(x), cos, sin, cache=cache, layer=layer, start_pos=start_pos,
                             attn_probs=attn_probs, pad=pad, frozen=frozen)
        x = x + a
        f, route = self.ffn(self.ffn_norm(x), force_idx)
        return x + f, route, probs


def make_block(spec: Spec, moe: bool, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> Block:
    """A prelude/coda block (dense SwiGLU) or the looped block (MoE or dense, by spec)."""
    a, d = spec.attention, spec.dim
    if a.type == "gqa":
        attn = GQAttention(d, a.n_heads, a.n_kv_heads, a.window, dtype=dtype, rngs=rngs)
    else:
        attn = MLAttention(d, a.n_heads, a.q_lora_rank, a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim,
                           a.v_head_dim, spec.norm_eps, a.window, dtype=dtype, rngs=rngs)
    ffn = MoE(d, spec.moe, dtype=dtype, rngs=rngs) if moe else SwiGLU(d, spec.ffn_hidden, dtype=dtype, rngs=rngs)
    return Block(d, attn, ffn, spec.norm_eps, dtype=dtype, rngs=rngs)
