"""Leaf layers: RMSNorm, RoPE, SwiGLU (ARCHITECTURE.md section 2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for a float64 model, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim; float32 for bfloat16 inputs."""
    # torch's rms_norm computes the jax twin's formula, bfloat16 in float32 and cast back once (bitwise
    # equal to the three-line form in our tests), in one call instead of eight: decoding is op-bound
    return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel weight (`weight`, ones at init)."""

    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of x (B, T, H, K) by cos/sin (T, K/2) or (B, T, K/2), in their dtype."""
    # the rotation runs in the table's dtype: the activation dtype, float32 for bfloat16, and
    # float32 under openmythos-0.5 even in a float64 model (open-mythos' x.float())
    if x.dtype != torch.float64 and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        return _rope_complex(x, cos, sin)  # eager float32 / bfloat16: the speed path
    # float64 (parity runs), torch.compile (inductor fuses these lines) and torch.export (ONNX has no complex)
    x0, x1 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, K/2) each
    c, s = cos[..., None, :], sin[..., None, :]  # (T, 1, K/2), or (B, T, 1, K/2) per row
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope as one complex multiply (x0 + i x1)(c + i s): the same products and sums as the real form
    (bitwise equal in our CPU runs; tests/test_torch_speed.py), one pass over x instead of ~8 (stack, strided halves)."""
    z = torch.view_as_complex(x.to(cos.dtype).unflatten(-1, (-1, 2)).contiguous())  # (B, T, H, K/2) complex
    return torch.view_as_real(z * torch.complex(cos, sin)[..., None, :]).flatten(-2).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int, *, dtype: torch.dtype):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False, dtype=dtype)
        self.up = nn.Linear(dim, hidden, bias=False, dtype=dtype)
        self.down = nn.Linear(hidden, dim, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, force_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """x (B, T, D) -> (out (B, T, D), None): a dense FFN routes nothing (force_idx is ignored)."""
        return self.down(F.silu(self.gate(x)) * self.up(x)), None
