"""Leaf layers: RMSNorm, RoPE, SwiGLU (ARCHITECTURE.md section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The accumulation dtype: float64 for a float64 model, else float32."""
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * w over the last axis; float32 for bfloat16 inputs."""
    # bfloat16 is normalised in float32 and cast back (both twins)
    xf = x.astype(acc_dtype(x.dtype))
    rms = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (xf * rms * w.astype(xf.dtype)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned per-channel weight (`weight`, ones at init)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of x (B, T, H, K) by cos/sin (T, K/2) or (B, T, K/2), in their dtype."""
    # the rotation runs in the table's dtype: the activation dtype, float32 for bfloat16, and
    # float32 under openmythos-0.5 even in a float64 model (open-mythos' x.float())
    xr = x.astype(cos.dtype).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos[..., None, :], sin[..., None, :]  # (T, 1, K/2), or (B, T, 1, K/2) per row
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.gate = nnx.Linear(dim, hidden, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(dim, hidden, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, force_idx: jax.Array | None = None) -> tuple[jax.Array, None]:
        """x (B, T, D) -> (out (B, T, D), None): a dense FFN routes nothing (force_idx is ignored)."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x)), None
