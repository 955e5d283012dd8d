"""One way to get a model from what a user types: a weights file, or a spec (preset / .yaml) with --set overrides.

    >>> import mythos
    >>> model = mythos.load_model("tiny", "jax", dtype="float64", seed=0, sets=["vocab_size=258"])
    >>> model = mythos.load_model("m.safetensors", "torch")          # the file's spec and dtype
    >>> src = mythos.resolve("m.safetensors")                        # its spec, without reading a tensor

Every CLI command that takes WEIGHTS_OR_SPEC goes through here, so all of them refuse the same input
with the same message (a LoadError, or the SpecError / BridgeError that names the field or tensor).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import spec as S
import weights_bridge as wb
from weights_bridge.backends import BACKENDS, DTYPES, enable_float64, twin

WEIGHTS_SUFFIX = ".safetensors"


class LoadError(ValueError):
    """A source, backend or dtype that cannot be loaded; the message names the flag or the file."""


class Source(NamedTuple):
    """What a WEIGHTS_OR_SPEC argument names."""
    spec: S.Spec
    weights: Path | None  # the weights file; None for a spec (random weights from a seed)
    dtype: str | None  # the weights file's dtype; None for a spec


def check_choice(flag: str, value: str, allowed: Sequence[str]) -> str:
    """``value`` if allowed, else a LoadError: ``--backend 'mxnet' is not allowed; allowed: torch, jax``."""
    if value not in allowed:
        raise LoadError(f"{flag} {value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


def _probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: the one test that sees permissions, read-only mounts and root alike."""
    fd, probe = tempfile.mkstemp(prefix=".mythos-", suffix=".probe", dir=folder)
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` if a file can be written there (an existing folder we may write in, not a directory), else a
    LoadError naming ``flag``; checked before any work, so a long run never fails at its last line."""
    path = Path(path)
    try:
        if path.is_dir():
            raise LoadError(f"{flag} {str(path)!r} is a directory; give a file name (e.g. {path / 'report.json'})")
        if not path.parent.is_dir():
            what = "is not a directory" if path.parent.exists() else "does not exist"
            raise LoadError(f"{flag} {str(path)!r}: folder {str(path.parent)!r} {what}; create it first or choose another path")
        _probe(path.parent)
    except LoadError:
        raise
    except (OSError, ValueError) as e:  # no permission, a read-only file system, a NUL byte, a name too long
        raise LoadError(f"{flag} {str(path)!r} cannot be written: {getattr(e, 'strerror', None) or e}") from None
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` if it is a folder we may write in, or can be created as one (its nearest existing parent is a
    writable folder); else a LoadError naming ``flag``. Nothing is created."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise LoadError(f"{flag} {str(path)!r} is a file, not a folder; give a folder (it is created if missing)")
        existing = path
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise LoadError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, so the folder cannot be created")
        _probe(existing)
    except LoadError:
        raise
    except (OSError, ValueError) as e:
        raise LoadError(f"{flag} {str(path)!r} cannot be written: {getattr(e, 'strerror', None) or e}") from None
    return path


def is_weights_file(source: str | Path) -> bool:
    """Whether SOURCE names a weights file (by its suffix) rather than a preset or a spec .yaml."""
    return str(source).endswith(WEIGHTS_SUFFIX)


def is_weights_dir(source: str | Path) -> bool:
    """Whether SOURCE is a directory holding weights files (`mythos export hf` writes one): read through
    weights_bridge.bridge.weights_path, which picks model.safetensors or the only *.safetensors."""
    path = Path(source)
    try:
        return path.is_dir() and any(path.glob("*" + WEIGHTS_SUFFIX))
    except OSError:
        return False


def resolve(source: str | Path, sets: Sequence[str] = ()) -> Source:
    """The spec a SOURCE names: a preset or .yaml with ``sets`` overrides, or a weights file's (header only);
    a directory holding weights (an HF export) names its weights file.

    Raises:
        LoadError: --set given with a weights file, or a weights file that does not exist.
        SpecError: a spec that cannot be built (the message names the field).
        BridgeError: a weights file that is truncated, corrupt or not ours.
    """
    if is_weights_dir(source):
        source = wb.bridge.weights_path(source)  # an exported directory: its weights file
    if is_weights_file(source):
        if sets:
            raise LoadError("--set applies to a spec, not to a weights file (its spec is stored in it)")
        path = Path(source)
        if path.is_dir():
            raise LoadError(f"weights file {str(source)!r} is a directory; give the .safetensors file")
        if not path.is_file():
            raise LoadError(f"weights file {str(source)!r} does not exist" if not path.exists()
                            else f"weights file {str(source)!r} is not a regular file")
        s, dtype = wb.read_spec(path)
        return Source(s, path, dtype)
    overrides = dict(S.parse_override(x) for x in sets)
    return Source(S.load(str(source), overrides=overrides), None, None)


def load_model(source: str | Path, backend: str = "torch", dtype: str | None = None, seed: int = 0,
               sets: Sequence[str] = ()) -> object:
    """A model of either twin from a weights file or a spec.

    Args:
        source: a ``.safetensors`` file written by ``weights_bridge.save``, a preset name or a spec .yaml.
        backend: ``"torch"`` or ``"jax"``.
        dtype: float32 | float64 | bfloat16; None: the file's, float32 for a spec. float64 switches the
            twin's float64 support on (``weights_bridge.backends.enable_float64``).
        seed: the seed of the random weights (``spec.init_arrays``) when ``source`` is a spec.
        sets: spec overrides ``"field=value"`` (a spec only).
    Returns:
        The model, built by ``mythos_<backend>``.
    Raises:
        LoadError, SpecError, BridgeError: bad input, with a message that names it (see ``resolve``).
    """
    check_choice("--backend", backend, BACKENDS)
    if dtype is not None:
        check_choice("--dtype", dtype, DTYPES)
    src = resolve(source, sets)
    dtype = dtype or src.dtype or "float32"
    if dtype == "float64":
        enable_float64(backend)
    if src.weights is not None:
        return wb.load(src.weights, backend=backend, dtype=dtype)
    return twin(backend).build(src.spec, seed=seed, dtype=dtype)
