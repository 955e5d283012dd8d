"""Weights in and out of a model: NumPy arrays in torch layout keyed by manifest path (docs/design.md
"Parameters"). The torch twin's parameters are in that layout already; only the dtype conversion lives here."""

from __future__ import annotations

from typing import Mapping

import ml_dtypes
import numpy as np
import torch
import torch.nn as nn

from spec import manifest


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy NumPy arrays (torch layout, keyed by manifest path) into a Mythos model, cast to its dtype.

    Every missing key, unexpected key and shape mismatch is collected first, then one ValueError.
    """
    target = model.state_dict()  # manifest path -> tensor sharing storage with the model
    errors = [f"unexpected key {k!r}" for k in arrays if k not in target]
    for k, t in target.items():
        if k not in arrays:
            errors.append(f"missing key {k!r} {tuple(t.shape)}")
        elif tuple(np.shape(arrays[k])) != tuple(t.shape):
            errors.append(f"{k}: shape {tuple(np.shape(arrays[k]))}, expected {tuple(t.shape)}")
    if errors:
        raise ValueError(f"load_arrays: {len(errors)} problem(s), nothing loaded:\n  " + "\n  ".join(errors))
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(_to_torch(arrays[k], t.dtype))


def dump_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Every manifest tensor of a Mythos model as a NumPy array in torch layout (bfloat16 as ml_dtypes.bfloat16)."""
    sd = model.state_dict()
    return {p.path: _to_numpy(sd[p.path]) for p in manifest(model.spec)}


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A NumPy array as a CPU tensor of dtype; the cast is done by NumPy (ml_dtypes for bfloat16)."""
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: ml_dtypes.bfloat16}[dtype]
    a = np.ascontiguousarray(np.asarray(a).astype(np_dtype))
    if dtype == torch.bfloat16:
        # NumPy has no bfloat16: move its uint16 bit pattern, exactly
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy copy; bfloat16 via its uint16 bit pattern as ml_dtypes.bfloat16."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()
