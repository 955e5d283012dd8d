"""Precision switches, in one place (docs/design.md "Precision switches")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# float32 matmuls everywhere: JAX's default is bf16 on TPU and TF32 on recent GPUs, which would
# break parity with the torch twin (set on import of mythos_jax; a no-op on the CPU).
jax.config.update("jax_default_matmul_precision", "float32")


def set_parity_precision() -> None:
    """Turn on float32 matmuls and float64 support (jax_enable_x64) for parity runs."""
    jax.config.update("jax_default_matmul_precision", "float32")
    jax.config.update("jax_enable_x64", True)


def x64_enabled() -> bool:
    """Whether float64 arrays are available (jax_enable_x64)."""
    return bool(jax.config.jax_enable_x64)


def bf16_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: tuple, precision: object = None,
                     preferred_element_type: jnp.dtype | None = None, **kw: object) -> jax.Array:
    """lax.dot_general; for two bfloat16 operands (and no preferred type) accumulated in float32 and rounded
    to bfloat16, as a plain bfloat16 dot computes, but on the CPU's bfloat16 matrix units.

    XLA:CPU (jaxlib 0.10) rewrites a bf16 x bf16 -> bf16 dot into converts to float32 and a float32 GEMM;
    bf16 x bf16 -> float32 (preferred_element_type) reaches YNNPACK's bfloat16 kernels natively: 3-4x
    the float32 GEMM's speed on AMX (docs/benchmarks.md). The arithmetic is the same (exact bf16 products,
    float32 sums, one rounding)."""
    if preferred_element_type is None and lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.bfloat16:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32,
                                   **kw).astype(jnp.bfloat16)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type,
                               **kw)


def mm_einsum(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum of two operands; two bfloat16 ones run as bf16_dot_general does (float32 sums, a bfloat16
    result, the CPU's bfloat16 matrix units), any other dtype unchanged."""
    if a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16:
        return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return jnp.einsum(subscripts, a, b)


def native_bf16_dots(module: nnx.Module) -> int:
    """Route every nnx.Linear of a bfloat16 module through bf16_dot_general (in place); -> how many."""
    n = 0
    for _, m in nnx.iter_modules(module):
        if isinstance(m, nnx.Linear):
            m.dot_general = bf16_dot_general
            n += 1
    return n
