"""Moving a built model between the twins, files and open-mythos.

Both twins share one contract (docs/design.md): ``build(spec, seed, dtype, weights=...)``,
``load_arrays(model, arrays)``, ``dump_arrays(model)``, with arrays in torch layout keyed by manifest
path. So twin -> twin needs no renaming and no layout change; the twins themselves map torch
``[out, in]`` to NNX ``[in, out]`` inside ``load_arrays``/``dump_arrays``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

import spec as spec_lib

from . import distributed
from . import openmythos as om
from .backends import backend_of, check_backend, twin
from .fileformat import (BridgeError, Progress, check_arrays, check_dtype_name, check_metadata, dtype_name, raise_if,
                         read_file, read_header, write_file)

if TYPE_CHECKING:
    import torch


def model_state(model: object) -> tuple[spec_lib.Spec, dict[str, np.ndarray], str]:
    """``(spec, arrays, dtype)`` of a built model: its spec, ``dump_arrays`` and its dtype name.

    A torch model sharded over ranks (DTensors, expert parallel) gives its whole arrays on every rank:
    a collective, called by every rank (``distributed.full_arrays``).
    """
    backend = backend_of(model)
    if backend == "torch" and distributed.is_sharded(model):
        arrays = distributed.full_arrays(model)
    else:
        arrays = twin(backend).dump_arrays(model)
    return model.spec, arrays, dtype_name(np.asarray(arrays["embed.weight"]))


def build(backend: str, s: spec_lib.Spec, dtype: str, arrays: Mapping[str, np.ndarray]) -> object:
    """A ``backend`` model of spec ``s`` in ``dtype`` holding ``arrays`` (cast by the twin when needed)."""
    check_dtype_name(dtype)
    return twin(backend).build(s, dtype=dtype, weights=dict(arrays))


# --------------------------------------------------------------------------- files


def save(model: object, path: str | os.PathLike, *, progress: Progress | None = None) -> Path:
    """Write a torch or JAX Mythos model to one safetensors file (atomic; refuses before writing).

    A torch model sharded over ranks (FSDP2, tensor or expert parallel) is gathered on every rank and written
    by rank 0 alone: every rank calls ``save`` and gets the path back; the bytes equal the unsharded model's.

    Args:
        model: a model built by ``mythos_torch`` or ``mythos_jax`` (sharded or not).
        path: the target file.
    Returns:
        The path written.
    Raises:
        BridgeError: the model's tensors do not match its spec's manifest (every problem listed); for a
            sharded torch model on every rank, also when rank 0 could not write.
    """
    s, arrays, dtype = model_state(model)
    if backend_of(model) == "torch" and distributed.is_sharded(model):
        raise_if(check_arrays(s, arrays, dtype), f"refusing to write {path}")  # on every rank, before rank 0 writes
        distributed.on_rank0(lambda: write_file(path, s, arrays, dtype, progress=progress))
        return Path(path)
    return write_file(path, s, arrays, dtype, progress=progress)


def load(path: str | os.PathLike, backend: str = "torch", dtype: str | None = None, *,
         progress: Progress | None = None) -> object:
    """Rebuild a model from a Mythos weights file.

    Args:
        path: a file written by ``save`` (or ``cli.convert``), or a directory holding one (``weights_path``: the
            Hugging Face directory of ``mythos export hf`` holds ``model.safetensors``).
        backend: ``"torch"`` or ``"jax"``.
        dtype: the model dtype; None keeps the file's.
    Returns:
        The model, built by ``mythos_<backend>.build`` with the file's spec and weights.
    Raises:
        BridgeError: a truncated, corrupt or foreign file, or tensors that do not match the spec.
    """
    check_backend(backend)  # an unknown backend fails before the file is read
    s, arrays, file_dtype = read_file(weights_path(path), progress=progress)
    return build(backend, s, file_dtype if dtype is None else dtype, arrays)


def read_spec(path: str | os.PathLike) -> tuple[spec_lib.Spec, str]:
    """``(spec, dtype)`` of a Mythos weights file (or a directory holding one, ``weights_path``) from its header alone.

    Raises:
        BridgeError: a missing, truncated or foreign file (the tensors are checked by ``load``).
    """
    path = weights_path(path)
    meta, _, _ = read_header(path)
    return check_metadata(path, meta)


DIR_WEIGHTS = "model.safetensors"  # the weights file of a directory (the name transformers looks for)


def weights_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a directory the weights file inside it: ``model.safetensors``, else its only
    ``*.safetensors`` file.

    Raises:
        BridgeError: a directory with none, or with several and no ``model.safetensors``.
    """
    path = Path(path)
    try:
        if not path.is_dir():
            return path
        if (path / DIR_WEIGHTS).is_file():
            return path / DIR_WEIGHTS
        found = sorted(f for f in path.glob("*.safetensors") if f.is_file())
    except OSError as e:
        raise BridgeError(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(found) == 1:
        return found[0]
    what = "no .safetensors file" if not found else f"{len(found)} .safetensors files and no {DIR_WEIGHTS}"
    raise BridgeError(f"{path} is a directory holding {what}; give the weights file itself")


# --------------------------------------------------------------------------- twin to twin


def convert_model(model: object, backend: str, dtype: str | None = None) -> object:
    """``model`` rebuilt in the ``backend`` twin (same spec, same weights bit for bit; dtype kept by default)."""
    s, arrays, model_dtype = model_state(model)
    raise_if(check_arrays(s, arrays, model_dtype), f"the {backend_of(model)} model does not match its spec")
    return build(backend, s, model_dtype if dtype is None else dtype, arrays)


def torch_to_jax(model: object, dtype: str | None = None) -> object:
    """A ``mythos_jax`` model holding the weights of a ``mythos_torch`` model."""
    if backend_of(model) != "torch":
        raise BridgeError("torch_to_jax needs a mythos_torch model")
    return convert_model(model, "jax", dtype)


def jax_to_torch(model: object, dtype: str | None = None) -> object:
    """A ``mythos_torch`` model holding the weights of a ``mythos_jax`` model."""
    if backend_of(model) != "jax":
        raise BridgeError("jax_to_torch needs a mythos_jax model")
    return convert_model(model, "torch", dtype)


# --------------------------------------------------------------------------- open-mythos


def from_open_mythos(model_or_state_dict: object, config: object = None, backend: str = "torch",
                     dtype: str | None = None) -> tuple[spec_lib.Spec, object]:
    """Import open-mythos 0.5.0 weights into a Mythos twin.

    Args:
        model_or_state_dict: an ``open_mythos.main.OpenMythos`` or its ``state_dict()``.
        config: its ``MythosConfig`` (or a mapping, file or variant name, see
            ``openmythos.spec_from_config``); optional for a model, which carries its own ``cfg``.
        backend: ``"torch"`` or ``"jax"``.
        dtype: the model dtype; None keeps the dtype of the weights (float32, or float64 after
            ``.double()``, or bfloat16).
    Returns:
        ``(spec, model)``: the spec (``semantics: openmythos-0.5``) and the model.
    Raises:
        BridgeError: a config our spec cannot represent, or weights that do not match it.
    """
    import torch

    if isinstance(model_or_state_dict, torch.nn.Module):
        if config is None:
            config = model_or_state_dict.cfg
        state_dict = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state_dict = model_or_state_dict
    else:
        raise BridgeError(f"expected an OpenMythos model or its state dict, got {type(model_or_state_dict).__name__}")
    if config is None:
        raise BridgeError("a state dict does not carry its config: pass the MythosConfig it was built from")
    check_backend(backend)
    s = om.spec_from_config(config)
    arrays, weights_dtype = om.arrays_from_open_mythos(state_dict, s)
    return s, build(backend, s, weights_dtype if dtype is None else dtype, arrays)


def to_open_mythos(model: object) -> dict[str, "torch.Tensor"]:
    """An open-mythos 0.5.0 state dict (tied head, RoPE buffers included) for a Mythos model.

    ``OpenMythos(MythosConfig(**openmythos.config_from_spec(model.spec))).load_state_dict(sd)``
    rebuilds it; the spec must have ``semantics: openmythos-0.5``.
    """
    s, arrays, _ = model_state(model)
    om.config_from_spec(s)  # refuses a spec open-mythos cannot express
    sd = {n: _to_torch(a) for n, a in om.arrays_to_open_mythos(arrays, s).items()}
    for n, ours in om.TIED.items():
        sd[n] = sd[om.open_mythos_name(ours)]  # the same tensor, as in open-mythos
    sd[om.DERIVED[0]] = om.torch_rope_buffer(s.dim // s.attention.n_heads, s.max_seq_len, s.rope_theta)
    sd[om.DERIVED[1]] = om.torch_rope_buffer(s.attention.qk_rope_head_dim, s.max_seq_len, s.rope_theta)
    return sd


def _to_torch(a: np.ndarray) -> "torch.Tensor":
    """A NumPy array as a torch tensor of the same dtype; bfloat16 through its 16-bit pattern."""
    import torch

    a = np.ascontiguousarray(a)
    if dtype_name(a) == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())
