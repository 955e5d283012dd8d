"""Precision switches, in one place (docs/design.md "Precision switches")."""

from __future__ import annotations

import torch


def set_parity_precision() -> None:
    """Full float32 matmuls for parity runs: TF32 off in CUDA matmuls and cuDNN (a no-op on the CPU)."""
    # TF32 would break parity with the JAX twin, which runs float32 matmuls
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
