"""Weights in and out of a model: NumPy arrays in torch layout keyed by manifest path (docs/design.md
"Parameters"), and the one rule between that layout and the NNX one, used by every conversion in this twin:

    manifest kind  torch                      nnx
    "linear"       <module>.weight [out, in]  <module>.kernel [in, out]  (transposed)
    "embedding"    <module>.weight [V, D]     <module>.embedding [V, D]
    other          <module>.<name>            <module>.<name>, the same layout
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from spec import Param, manifest

# manifest kind -> the nnx leaf that holds the torch `weight` (other kinds keep the torch name)
NNX_LEAF = {"linear": "kernel", "embedding": "embedding"}
KIND_OF_LEAF = {leaf: kind for kind, leaf in NNX_LEAF.items()}  # the reverse direction, from the same table


def to_nnx(kind: str, a: np.ndarray) -> np.ndarray:
    """A torch-layout array of manifest kind `kind` in the nnx layout: torch [out, in] vs nnx kernel [in, out]."""
    return a.T if kind == "linear" else a


def to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    """An nnx-layout array of manifest kind `kind` as a contiguous torch-layout NumPy copy (to_nnx inverted)."""
    return np.ascontiguousarray(a.T) if kind == "linear" else a.copy()


def torch_path(nnx_path: tuple[str, ...]) -> tuple[str, str]:
    """(manifest path, manifest kind) of an nnx state path: `.kernel`/`.embedding` become `.weight`.

    The kind is "linear", "embedding" or "param" (a buffer is a "param" here: it has no layout change).
    """
    *module, leaf = nnx_path
    kind = KIND_OF_LEAF.get(leaf, "param")
    return ".".join([*module, "weight" if leaf in KIND_OF_LEAF else leaf]), kind


def _variable(model: nnx.Module, p: Param) -> nnx.Variable:
    """The variable behind a manifest entry of a Mythos model: the module path, then the nnx leaf."""
    *path, leaf = p.path.split(".")
    obj = model
    for name in path:
        obj = obj[int(name)] if name.isdigit() else getattr(obj, name)
    return getattr(obj, NNX_LEAF.get(p.kind, leaf))


def load_arrays(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy NumPy arrays (torch layout, keyed by manifest path) into a Mythos model, cast to its dtype.

    Every missing key, unexpected key and shape mismatch is collected first, then one ValueError.
    """
    params = manifest(model.spec)
    known = {p.path for p in params}
    errors = [f"unexpected key {k!r}" for k in arrays if k not in known]
    for p in params:
        if p.path not in arrays:
            errors.append(f"missing key {p.path!r} {p.shape}")
        elif tuple(np.shape(arrays[p.path])) != p.shape:
            errors.append(f"{p.path}: shape {tuple(np.shape(arrays[p.path]))}, expected {p.shape}")
    if errors:
        raise ValueError(f"load_arrays: {len(errors)} problem(s), nothing loaded:\n  " + "\n  ".join(errors))
    for p in params:
        var = _variable(model, p)
        # the cast is done by NumPy (ml_dtypes for bfloat16), as in the torch twin
        var.set_value(jnp.asarray(to_nnx(p.kind, np.asarray(arrays[p.path]).astype(var.dtype))))


def dump_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every manifest tensor of a Mythos model as a NumPy array in torch layout (bfloat16 as ml_dtypes.bfloat16)."""
    return {p.path: to_torch(p.kind, np.asarray(_variable(model, p).get_value())) for p in manifest(model.spec)}
