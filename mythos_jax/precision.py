"""Precision switches, in one place (docs/design.md "Precision switches")."""

from __future__ import annotations

import jax

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
