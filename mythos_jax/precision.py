"""Precision switches, in one place (docs/design.md "Precision switches")."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

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


# forward(..., autocast=True) traces the model with this set (a static argument of the compiled forward, so
# the autocast program and the plain one are cached apart): the float32 model's matmuls take bfloat16
# operands and return float32 sums; everything else stays float32 (docs/design.md "Precision switches")
_AUTOCAST: contextvars.ContextVar[bool] = contextvars.ContextVar("mythos_jax_autocast", default=False)


@contextlib.contextmanager
def autocast_trace(on: bool) -> Iterator[None]:
    """Within: the matmuls traced take bfloat16 operands of float32 ones (float32 sums and results)."""
    token = _AUTOCAST.set(bool(on))
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


def _autocast(*xs: jax.Array) -> bool:
    return _AUTOCAST.get() and all(x.dtype == jnp.float32 for x in xs)


def _plan(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jnp.dtype | None, jnp.dtype | None]:
    """The one rule of every matmul here -> (a, b, preferred_element_type, result dtype or None: as is).
    Two bfloat16 operands: float32 sums rounded once to bfloat16 (the CPU's bf16 units); two float32 ones under
    autocast_trace: rounded to bfloat16, float32 sums kept; any other pair unchanged."""
    if a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16:
        return a, b, jnp.float32, jnp.bfloat16
    if _autocast(a, b):
        return a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), jnp.float32, None
    return a, b, None, None


def _finish(y: jax.Array, out: jnp.dtype | None) -> jax.Array:
    return y if out is None else y.astype(out)


def bf16_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: tuple, precision: object = None,
                     preferred_element_type: jnp.dtype | None = None, **kw: object) -> jax.Array:
    """lax.dot_general; for two bfloat16 operands (and no preferred type) accumulated in float32 and rounded
    to bfloat16, as a plain bfloat16 dot computes, but on the CPU's bfloat16 matrix units. Under
    autocast_trace two float32 operands are rounded to bfloat16 and the float32 sums returned.

    XLA:CPU (jaxlib 0.10) rewrites a bf16 x bf16 -> bf16 dot into converts to float32 and a float32 GEMM;
    bf16 x bf16 -> float32 (preferred_element_type) reaches YNNPACK's bfloat16 kernels natively: 3-4x
    the float32 GEMM's speed on AMX (docs/benchmarks.md). The arithmetic is the same (exact bf16 products,
    float32 sums, one rounding)."""
    if preferred_element_type is not None:  # the caller chose
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type, **kw)
    lhs, rhs, pref, out = _plan(lhs, rhs)
    return _finish(jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=pref, **kw), out)


def mm_einsum(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum of two operands; two bfloat16 ones run as bf16_dot_general does (float32 sums, a bfloat16
    result, the CPU's bfloat16 matrix units), two float32 ones under autocast_trace as bfloat16 operands with
    float32 sums, any other dtype unchanged."""
    a, b, pref, out = _plan(a, b)
    return _finish(jnp.einsum(subscripts, a, b, preferred_element_type=pref), out)


def acc_einsum(subscripts: str, a: jax.Array, b: jax.Array, acc: jnp.dtype) -> jax.Array:
    """jnp.einsum of two operands with sums and result in acc (attention logits: float32 also for bfloat16);
    two float32 ones under autocast_trace as bfloat16 operands."""
    if _autocast(a, b):
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    if a.dtype == acc and b.dtype == acc:  # no preferred type: its backward adds converts (slower on XLA:CPU)
        return jnp.einsum(subscripts, a, b)
    return jnp.einsum(subscripts, a, b, preferred_element_type=acc)


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b; two bfloat16 operands run as bf16_dot_general does (float32 sums, a bfloat16 result, the CPU's
    bfloat16 matrix units), two float32 ones under autocast_trace as bfloat16 operands with float32 sums, any
    other dtype unchanged."""
    a, b, pref, out = _plan(a, b)
    return _finish(jnp.matmul(a, b, preferred_element_type=pref), out)


def native_bf16_dots(module: nnx.Module) -> int:
    """Route every nnx.Linear of a module through bf16_dot_general (in place; float32 and float64 dots outside
    autocast_trace run unchanged); -> how many."""
    n = 0
    for _, m in nnx.iter_modules(module):
        if isinstance(m, nnx.Linear):
            m.dot_general = bf16_dot_general
            n += 1
    return n
