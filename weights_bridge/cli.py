"""Plain functions behind ``mythos convert`` and ``mythos check`` (the typer app is parity/cli.py).

    convert("om.pt", "model.safetensors", config="mythos_1b")   # open-mythos -> our file
    convert("model.safetensors", "model-bf16.safetensors", dtype="bfloat16")  # re-cast our file
    check("model.safetensors", backend="torch")                 # torch vs jax forward on a few tokens
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

import spec as spec_lib

from . import openmythos as om
from .bridge import BACKENDS, build, twin
from .fileformat import BridgeError, cast, check_dtype_name, expected_dtype, read_file, write_file

PROGRESS_MIN_BYTES = 64 * 1024 * 1024  # smaller files convert too fast for a progress bar to help
CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")  # checkpoints that wrap the state dict
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 1e-1}  # max |logit diff| between the twins


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    spec: spec_lib.Spec
    dtype: str
    n_tensors: int
    n_bytes: int


@dataclass(frozen=True)
class CheckResult:
    """Forward of the same weights in both twins on ``ids``: how far apart their outputs are."""
    path: Path
    backend: str  # the twin checked against
    other: str
    dtype: str
    ids_shape: tuple[int, int]
    max_abs_diff: float  # over logits, in float64
    mean_abs_diff: float
    loop_counts_equal: bool
    n_steps: tuple[int, int]  # (backend, other)
    tolerance: float
    ok: bool


@contextlib.contextmanager
def _progress(total_bytes: int, label: str, console: Console | None = None) -> Iterator:
    """A per-tensor progress callback, drawn with rich only for large files."""
    if total_bytes < PROGRESS_MIN_BYTES:
        yield None
        return
    columns = (TextColumn(f"{label} [bold]{{task.fields[tensor]}}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total_bytes, tensor="")
        yield lambda name, nbytes: bar.update(task, advance=nbytes, tensor=name)


def load_open_mythos_checkpoint(path: str | os.PathLike) -> dict[str, object]:
    """An open-mythos state dict from a ``.pt`` file, read with ``torch.load(weights_only=True)``."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a foreign file, or globals weights_only refuses
        raise BridgeError(f"{path}: cannot read it as a torch state dict with weights_only=True ({type(e).__name__}: {e})") from None
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(inner) == 1:
            obj = obj[inner[0]]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BridgeError(f"{path}: expected a state dict (names -> tensors), or one under {', '.join(CONTAINER_KEYS)}")
    return dict(obj)


def convert(source: str | os.PathLike, out: str | os.PathLike, config: object = None, dtype: str | None = None,
            *, console: Console | None = None) -> ConvertResult:
    """Convert a checkpoint into a Mythos weights file.

    Args:
        source: an open-mythos ``.pt`` state dict (needs ``config``), or a Mythos weights file
            (re-written in ``dtype``; no ``config``).
        out: the target ``.safetensors`` file (written atomically, nothing written on any error).
        config: the open-mythos config: a YAML/JSON file of MythosConfig fields, a variant name
            such as ``"mythos_1b"``, a MythosConfig or a mapping.
        dtype: ``"float32" | "float64" | "bfloat16"``; None keeps the source's.
    Returns:
        A ConvertResult (path, spec, dtype, tensor count, bytes).
    Raises:
        BridgeError: naming every tensor or config field that is wrong.
    """
    source, out = Path(source), Path(out)
    if dtype is not None:
        check_dtype_name(dtype)
    if source.resolve() == out.resolve():
        raise BridgeError(f"refusing to convert {source} onto itself; choose another output path")
    if not source.is_file():
        raise BridgeError(f"{source}: no such file")
    if source.suffix == ".safetensors" or _is_safetensors(source):
        if config is not None:
            raise BridgeError(f"{source} is a Mythos weights file: it carries its own spec, so pass no config")
        with _progress(source.stat().st_size, "reading", console) as cb:
            s, arrays, src_dtype = read_file(source, progress=cb)
    else:
        if config is None:
            raise BridgeError(f"{source}: an open-mythos checkpoint does not carry its config; pass config= "
                              f"(a MythosConfig YAML/JSON file or a variant name: {', '.join(om.VARIANTS)})")
        s = om.spec_from_config(config)
        arrays, src_dtype = om.arrays_from_open_mythos(load_open_mythos_checkpoint(source), s)
    dtype = src_dtype if dtype is None else dtype
    arrays = {p: cast(a, expected_dtype(p, dtype)) for p, a in arrays.items()}
    n_bytes = sum(a.nbytes for a in arrays.values())
    with _progress(n_bytes, "writing", console) as cb:
        write_file(out, s, arrays, dtype, progress=cb)
    return ConvertResult(out, s, dtype, len(arrays), n_bytes)


def _is_safetensors(path: Path) -> bool:
    """True for a safetensors file (ours or not): a sane header length and a JSON object after it."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8 and head[8:9] == b"{"


def check(path: str | os.PathLike, backend: str = "torch", *, batch: int = 2, n_tokens: int = 8,
          n_loops: int | None = None, seed: int = 0, tolerance: float | None = None) -> CheckResult:
    """Load a weights file into ``backend`` and into the other twin; compare a forward on a few tokens.

    Args:
        path: a Mythos weights file.
        backend: the twin to check against (``"torch"`` or ``"jax"``); the other one is compared to it.
        batch, n_tokens: the shape of the random token ids (seeded by ``seed``).
        n_loops: loop steps (None: the spec's ``max_loop_iters``).
        tolerance: max |logit difference| allowed; None: TOLERANCE[dtype].
    Returns:
        A CheckResult; ``ok`` is False when the logits differ by more than ``tolerance`` or the
        twins halt at different steps.
    """
    if backend not in BACKENDS:
        raise BridgeError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    other = BACKENDS[1 - BACKENDS.index(backend)]
    s, arrays, dtype = read_file(path)
    ids = np.random.default_rng(seed).integers(0, s.vocab_size, (batch, min(n_tokens, s.max_seq_len)))
    outs = {b: _forward(b, build(b, s, dtype, arrays), ids, n_loops) for b in (backend, other)}
    (la, ca, na), (lb, cb, nb) = outs[backend], outs[other]
    diff = np.abs(la - lb)
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    same_counts = bool(np.array_equal(ca, cb))
    return CheckResult(Path(path), backend, other, dtype, tuple(ids.shape), float(diff.max()), float(diff.mean()),
                       same_counts, (na, nb), tol, bool(diff.max() <= tol and same_counts and na == nb))


def _forward(backend: str, model: object, ids: np.ndarray, n_loops: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(logits as float64, loop_counts, n_steps) of one forward in the given twin."""
    if backend == "torch":
        import torch

        with torch.no_grad():
            out = model(torch.from_numpy(ids), n_loops)
        return out.logits.double().numpy(), out.loop_counts.numpy(), int(out.n_steps)
    out = twin("jax").forward(model, ids, n_loops)
    return np.asarray(out.logits).astype(np.float64), np.asarray(out.loop_counts), int(out.n_steps)
