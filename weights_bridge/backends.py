"""The one backend registry: which twins there are, how to import one, its arrays as NumPy, float64.

    >>> from weights_bridge import backends
    >>> backends.BACKENDS                          # ("torch", "jax"): the twins
    >>> backends.ALL_BACKENDS                      # ("torch", "jax", "onnx"): the twins and the runtimes
    >>> mt = backends.twin("torch")                # mythos_torch, imported on first use
    >>> ox = backends.twin("onnx")                 # weights_bridge.onnx_backend: build, forward, dump_arrays
    >>> backends.enable_float64("jax")             # the one switch a float64 model needs
    >>> out = backends.forward("jax", model, ids)  # NumPy ids in, no gradients; the twin's ModelOutput
    >>> backends.to_numpy(out.logits)              # a torch tensor or a jax array as NumPy

Every layer above the twins (weights_bridge, parity, mythos) asks here instead of writing its own
`if backend == "torch":`. A twin is imported only when asked for, so the other framework stays
unloaded.

A runtime (RUNTIMES: "onnx", ONNX Runtime running the torch twin's exported graph) is a backend that
is not a twin: `twin("onnx")` returns a module with the twins' build(spec, seed, dtype, weights),
forward(model, ids, n_loops, *, early_exit, force_halt, force_experts) (a ModelOutput of NumPy arrays,
no cache, no attn_probs), dump_arrays and set_parity_precision (a no-op); float32 and float64 only.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from types import ModuleType

import ml_dtypes
import numpy as np

from .fileformat import BridgeError

BACKENDS = ("torch", "jax")  # the twins
RUNTIMES = ("onnx",)  # backends that run a twin's exported graph (onnx: the torch twin's, in ONNX Runtime)
ALL_BACKENDS = BACKENDS + RUNTIMES
DTYPES = ("float32", "float64", "bfloat16")  # model dtypes both twins build
RUNTIME_DTYPES = {"onnx": ("float32", "float64")}  # model dtypes each runtime runs
MODULES = {"torch": "mythos_torch", "jax": "mythos_jax", "onnx": "weights_bridge.onnx_backend"}


def check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> str:
    """``backend`` if it is one of ``allowed`` (the twins by default), else a BridgeError naming them."""
    if backend not in allowed:
        raise BridgeError(f"backend={backend!r} is not allowed; allowed: {', '.join(allowed)}")
    return backend


def twin(backend: str) -> ModuleType:
    """The module of ``backend``: ``mythos_torch``, ``mythos_jax`` or (a runtime) ``weights_bridge.onnx_backend``,
    imported on first use; each has build, forward, dump_arrays and set_parity_precision."""
    return importlib.import_module(MODULES[check_backend(backend, ALL_BACKENDS)])


def dtypes_of(backend: str) -> tuple[str, ...]:
    """The model dtypes ``backend`` builds: DTYPES for a twin, fewer for a runtime (onnx: float32, float64)."""
    return RUNTIME_DTYPES.get(check_backend(backend, ALL_BACKENDS), DTYPES)


def other(backend: str) -> str:
    """The other twin: ``"jax"`` for ``"torch"`` and the reverse."""
    return BACKENDS[1 - BACKENDS.index(check_backend(backend))]


def backend_of(model: object) -> str:
    """``"torch"``, ``"jax"`` or ``"onnx"``: which backend built ``model`` (from the module that defines its type)."""
    if type(model).__module__ == MODULES["onnx"]:
        return "onnx"
    for cls in type(model).__mro__:  # FSDP2's fully_shard swaps in a subclass of its own (FSDPMythos)
        package = cls.__module__.split(".")[0]
        if package in tuple(f"mythos_{b}" for b in BACKENDS):
            return package.removeprefix("mythos_")
    raise BridgeError(f"{type(model).__module__}.{type(model).__name__} is not a Mythos model from "
                      f"{' or '.join(f'mythos_{b}' for b in BACKENDS)}")


def enable_float64(backend: str) -> None:
    """What a float64 ``backend`` model needs: the twin's ``set_parity_precision`` (global, idempotent).

    jax: ``jax_enable_x64`` and float32 matmuls (``mythos_jax.build(dtype="float64")`` refuses without
    x64); torch: TF32 off. The parity switches of both twins are this call for each backend.
    """
    twin(backend).set_parity_precision()  # onnx: a no-op


def from_numpy(backend: str, a: np.ndarray | None) -> object:
    """NumPy input in the form the twin's forward takes: torch a tensor sharing memory; jax NumPy as is; None stays None."""
    if check_backend(backend, ALL_BACKENDS) == "torch" and a is not None:
        import torch

        return torch.from_numpy(np.ascontiguousarray(a))
    return a


def forward(backend: str, model: object, ids: np.ndarray, n_loops: int | None = None, **kwargs: object) -> object:
    """``twin.forward(model, ids, n_loops, **kwargs)`` on NumPy ids without gradients; the twin's ModelOutput
    (onnx: of NumPy arrays)."""
    no_grad = contextlib.nullcontext()
    if check_backend(backend, ALL_BACKENDS) == "torch":
        import torch

        no_grad = torch.no_grad()
    with no_grad:
        return twin(backend).forward(model, from_numpy(backend, ids), n_loops, **kwargs)


def to_numpy(x: object) -> np.ndarray:
    """A torch tensor, jax array or NumPy array as NumPy, exactly: bfloat16 as ``ml_dtypes.bfloat16`` from both."""
    torch = sys.modules.get("torch")  # a torch tensor exists only once torch is imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: move the 16-bit pattern
            return x.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return x.numpy().copy()  # owns its memory: a tensor updated in place later does not change it
    return np.asarray(x)


def widen(a: np.ndarray) -> np.ndarray:
    """bfloat16 as float32 (every value exact), anything else unchanged: for JSON, plots and float64 maths."""
    return a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a


def dtype_of(x: object) -> str:
    """The dtype name of a torch tensor, jax array or NumPy array: ``"float32"``, ``"bfloat16"``, ``"int32"`` ..."""
    return str(getattr(x, "dtype", type(x).__name__)).removeprefix("torch.")
