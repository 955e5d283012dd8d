"""Plain functions behind ``mythos convert`` and ``mythos check`` (the commands are in mythos/cli.py).

    convert("om.pt", "model.safetensors", config="mythos_1b")   # open-mythos -> our file
    convert("model.safetensors", "model-bf16.safetensors", dtype="bfloat16")  # re-cast our file
    check("model.safetensors", backend="torch")                 # torch vs jax forward on a few tokens

Nothing here prints: a caller that wants a progress bar passes ``progress`` (see ProgressBar).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import numpy as np

import spec as spec_lib

from . import backends
from . import openmythos as om
from .bridge import build
from .fileformat import BridgeError, Progress, cast, check_dtype_name, expected_dtype, read_file, write_file

# progress(label, total_bytes): a context manager around one stage ("reading", "writing") that yields
# the per-tensor callback (name, nbytes) of that stage, or None for no reports
ProgressBar = Callable[[str, int], ContextManager[Progress | None]]
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 1e-1}  # max |logit diff| between the twins


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    spec: spec_lib.Spec
    dtype: str
    n_tensors: int
    n_bytes: int
    removed: tuple[Path, ...] = ()  # temporary files of an interrupted earlier write, deleted first


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
def _no_progress(label: str, total_bytes: int) -> Iterator[None]:
    yield None


# weights_bridge.atomic writes `.NAME.<pid>.<8 hex>.tmp` beside NAME and renames it when complete
_TMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process (or a pid we cannot ask about): leave its file alone
    return True


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of interrupted atomic writes of ``path`` (``.NAME.<pid>.<hex>.tmp`` beside it whose
    writing process no longer runs); a write in progress in another process is never listed."""
    path = Path(path)
    try:
        siblings = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []
    except OSError:
        return []
    found = []
    for p in siblings:
        m = _TMP_NAME.fullmatch(p.name)
        if m and m["name"] == path.name and p.is_file() and not _alive(int(m["pid"])):
            found.append(p)
    return sorted(found)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete ``stale_temporaries(path)`` (a killed convert's hidden partial file); returns what was removed."""
    removed = []
    for p in stale_temporaries(path):
        try:
            p.unlink()
            removed.append(p)
        except OSError:  # removed meanwhile, or not ours to remove: the next write does not need it gone
            pass
    return removed


def convert(source: str | os.PathLike, out: str | os.PathLike, config: object = None, dtype: str | None = None,
            *, progress: ProgressBar | None = None) -> ConvertResult:
    """Convert a checkpoint into a Mythos weights file.

    Args:
        source: an open-mythos ``.pt`` state dict (needs ``config``), or a Mythos weights file
            (re-written in ``dtype``; no ``config``).
        out: the target ``.safetensors`` file (written atomically, nothing written on any error).
        config: the open-mythos config: a YAML/JSON file of MythosConfig fields, a variant name
            such as ``"mythos_1b"``, a MythosConfig or a mapping.
        dtype: ``"float32" | "float64" | "bfloat16"``; None keeps the source's.
        progress: wraps the reading of a Mythos file and the writing (see ProgressBar); None: silent.
    Returns:
        A ConvertResult (path, spec, dtype, tensor count, bytes).
    Raises:
        BridgeError: naming every tensor or config field that is wrong.
    """
    source, out = Path(source), Path(out)
    stage = progress or _no_progress
    if dtype is not None:
        check_dtype_name(dtype)
    if source.is_dir():
        raise BridgeError(f"{source} is a directory, not a weights file")
    if not source.is_file():
        raise BridgeError(f"{source}: no such file")
    if source.resolve() == out.resolve():
        raise BridgeError(f"refusing to convert {source} onto itself; choose another output path")
    check_writable(out)  # before reading a possibly large source
    removed = tuple(remove_stale_temporaries(out))
    if source.suffix == ".safetensors" or _is_safetensors(source):
        if config is not None:
            raise BridgeError(f"{source} is a Mythos weights file: it carries its own spec, so pass no config")
        with stage("reading", source.stat().st_size) as cb:
            s, arrays, src_dtype = read_file(source, progress=cb)
    else:
        if config is None:
            raise BridgeError(f"{source}: an open-mythos checkpoint does not carry its config; pass config= "
                              f"(a MythosConfig YAML/JSON file or a variant name: {', '.join(om.VARIANTS)})")
        s = om.spec_from_config(config)
        arrays, src_dtype = om.arrays_from_open_mythos(om.read_state_dict(source), s)
    dtype = src_dtype if dtype is None else dtype
    arrays = {p: cast(a, expected_dtype(p, dtype)) for p, a in arrays.items()}
    n_bytes = sum(a.nbytes for a in arrays.values())
    with stage("writing", n_bytes) as cb:
        write_file(out, s, arrays, dtype, progress=cb)
    return ConvertResult(out, s, dtype, len(arrays), n_bytes, removed)


def check_writable(path: str | os.PathLike) -> Path:
    """``path`` if a file can be written there atomically: not a directory, in an existing directory we may
    create files in; else a BridgeError saying which. Nothing is left behind."""
    path = Path(path)
    try:
        if path.is_dir():
            raise BridgeError(f"cannot write {path}: it is a directory; give a file name (e.g. {path / 'model.safetensors'})")
        if not path.parent.is_dir():
            what = "is not a directory" if path.parent.exists() else "does not exist"
            raise BridgeError(f"cannot write {path}: folder {path.parent} {what}")
        # the one reliable test (permissions, read-only mounts, root): create and remove a file there
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except BridgeError:
        raise
    except (OSError, ValueError) as e:  # no permission, a read-only file system, a NUL byte, a name too long
        raise BridgeError(f"cannot write {path}: {getattr(e, 'strerror', None) or e} (nothing was written)") from None
    return path


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
    Raises:
        BridgeError: a file that is not a valid Mythos weights file, or a bad batch, n_tokens or n_loops.
    Returns:
        A CheckResult; ``ok`` is False when the logits differ by more than ``tolerance`` or the
        twins halt at different steps.
    """
    other = backends.other(backend)  # refuses an unknown backend
    for name, v in (("batch", batch), ("n_tokens", n_tokens)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise BridgeError(f"{name}={v!r} must be an integer >= 1")
    s, arrays, dtype = read_file(path)
    if n_loops is not None:
        n_loops = _bridge_error(spec_lib.check_loops, s, n_loops, what="n_loops")
    if dtype == "float64":  # the file's data needs float64 in both twins (jax: x64), whoever calls this
        for b in (backend, other):
            backends.enable_float64(b)
    ids = np.random.default_rng(seed).integers(0, s.vocab_size, (batch, min(n_tokens, s.max_seq_len)))
    outs = {b: _forward(b, build(b, s, dtype, arrays), ids, n_loops) for b in (backend, other)}
    (la, ca, na), (lb, cb, nb) = outs[backend], outs[other]
    diff = np.abs(la - lb)
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    same_counts = bool(np.array_equal(ca, cb))
    return CheckResult(Path(path), backend, other, dtype, tuple(ids.shape), float(diff.max()), float(diff.mean()),
                       same_counts, (na, nb), tol, bool(diff.max() <= tol and same_counts and na == nb))


def _bridge_error(check: Callable, *args: object, **kwargs: object) -> int:
    """A spec check (check_loops, check_length) with its SpecError as a BridgeError."""
    try:
        return check(*args, **kwargs)
    except spec_lib.SpecError as e:
        raise BridgeError(str(e)) from None


def _forward(backend: str, model: object, ids: np.ndarray, n_loops: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(logits as float64, loop_counts, n_steps) of one forward in the given twin."""
    out = backends.forward(backend, model, ids, n_loops)
    logits = backends.widen(backends.to_numpy(out.logits)).astype(np.float64)
    return logits, backends.to_numpy(out.loop_counts), int(out.n_steps)
