"""The Mythos weights file: one safetensors file, tensors named by manifest path in torch layout.

Framework-free (NumPy + ml_dtypes). The safetensors layout is written and read here directly so that
every check happens before anything is built or written:

    8 bytes   little-endian u64 N: length of the JSON header
    N bytes   JSON: {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [b, e]}, ...}
    rest      raw little-endian tensor bytes; offsets are relative to the end of the header

Our metadata (all strings): ``format="mythos-weights"``, ``format_version="1"``, ``spec`` (the spec
as YAML, ``spec.dump``), ``dtype`` (the model dtype) and ``sha256`` (a JSON object: tensor name ->
SHA-256 of its bytes, so a flipped bit in the data is caught, not only a broken header).

bfloat16 moves as its uint16 bit pattern (NumPy has no native bfloat16): exact in both directions.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

import spec as spec_lib
from spec.atomic import atomic_open

FORMAT = "mythos-weights"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a larger header means a corrupt length field

# model dtype name -> NumPy dtype of its tensors, and the safetensors dtype tag of each
NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
ST_TAGS = {"float32": "F32", "float64": "F64", "bfloat16": "BF16"}
TAG_NAMES = {v: k for k, v in ST_TAGS.items()}
ITEMSIZE = {"F32": 4, "F64": 8, "BF16": 2}

# Tensors stored in another dtype than the model's: model dtype -> {path suffix: dtype name}.
# router_bias stays float32 in a bfloat16 model (docs/design.md, "Parameters").
DTYPE_EXCEPTIONS = {"bfloat16": {".router_bias": "float32"}}

Progress = Callable[[str, int], None]  # called once per tensor with (name, nbytes)


class BridgeError(ValueError):
    """Weights that cannot be written, read or converted; the message names every offending tensor."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors or []  # every problem, one line each (the message shows the first MAX_SHOWN)


MAX_SHOWN = 40  # problems listed in a message; a wholly foreign state dict would list hundreds


def dtype_name(a: np.ndarray) -> str:
    """``"float32" | "float64" | "bfloat16"`` for an array, or its NumPy name for anything else."""
    for name, dt in NP_DTYPES.items():
        if a.dtype == dt:
            return name
    return str(a.dtype)


def expected_dtype(path: str, model_dtype: str) -> str:
    """The dtype a tensor has in a model of ``model_dtype`` (see DTYPE_EXCEPTIONS)."""
    for suffix, dt in DTYPE_EXCEPTIONS.get(model_dtype, {}).items():
        if path.endswith(suffix):
            return dt
    return model_dtype


def check_dtype_name(dtype: str) -> str:
    if dtype not in NP_DTYPES:
        raise BridgeError(f"dtype={dtype!r} is not supported; allowed: {', '.join(NP_DTYPES)}")
    return dtype


def cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` as ``dtype`` (round to nearest even; a no-op copy-free return when already there)."""
    target = NP_DTYPES[dtype]
    return a if a.dtype == target else np.asarray(a).astype(target)


def check_arrays(s: spec_lib.Spec, arrays: Mapping[str, np.ndarray], dtype: str) -> list[str]:
    """Every way ``arrays`` differs from the manifest of ``s`` in a ``dtype`` model, one line each."""
    found = {path: (tuple(np.shape(a)), dtype_name(np.asarray(a))) for path, a in arrays.items()}
    return manifest_errors(s, found, dtype, in_file=False)


def manifest_errors(s: spec_lib.Spec, found: Mapping[str, tuple[tuple[int, ...], str]], dtype: str, *,
                    in_file: bool) -> list[str]:
    """Missing, unexpected, misshapen and wrongly typed tensors of ``found`` {name: (shape, dtype name)}.

    The one check behind ``check_arrays`` (tensors in memory) and ``read_file`` (a file's header, before
    any data is read).
    """
    src, dst = (" from the file", " in the file") if in_file else ("", "")
    errors: list[str] = []
    want = {p.path: p for p in spec_lib.manifest(s)}
    for path in want:
        if path not in found:
            errors.append(f"{path}: missing{src} (the spec's manifest has it, shape {want[path].shape})")
    for path, (shape, got) in found.items():
        if path not in want:
            errors.append(f"{path}: unexpected tensor{dst} (not in the spec's manifest)")
            continue
        if tuple(shape) != want[path].shape:
            errors.append(f"{path}: shape {tuple(shape)} but the spec says {want[path].shape}")
        need = expected_dtype(path, dtype)
        if got != need:
            errors.append(f"{path}: dtype {got} but a {dtype} model stores it as {need}")
    return errors


def raise_if(errors: list[str], what: str) -> None:
    """Raise one BridgeError listing every problem (the first MAX_SHOWN in the message), or return."""
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors[:MAX_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_SHOWN} more (BridgeError.errors has them all)" if len(errors) > MAX_SHOWN else ""
        raise BridgeError(f"{what}: {len(errors)} problem{'s' if len(errors) > 1 else ''}\n{lines}{more}", errors)


# --------------------------------------------------------------------------- writing


def _le_bytes(a: np.ndarray) -> bytes:
    """Little-endian raw bytes; bfloat16 through its uint16 bit pattern."""
    a = np.ascontiguousarray(a)
    if a.dtype == NP_DTYPES["bfloat16"]:
        return a.view(np.uint16).astype("<u2", copy=False).tobytes()
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def write_file(path: str | os.PathLike, s: spec_lib.Spec, arrays: Mapping[str, np.ndarray], dtype: str,
               *, progress: Progress | None = None) -> Path:
    """Write ``arrays`` (manifest path -> NumPy, torch layout) as one Mythos weights file, atomically.

    Args:
        path: target file; replaced only once the new file is complete.
        s: the spec the arrays belong to; stored as YAML in the metadata.
        arrays: every manifest tensor, in the dtype of a ``dtype`` model.
        dtype: the model dtype (``"float32" | "float64" | "bfloat16"``).
        progress: called with (tensor name, bytes) after each tensor is written.
    Returns:
        The path written.
    Raises:
        BridgeError: before anything is written, listing every missing, extra, misshapen or
            mistyped tensor.
    """
    path = Path(path)
    check_dtype_name(dtype)
    raise_if(check_arrays(s, arrays, dtype), f"refusing to write {path}")
    if not path.parent.is_dir():
        raise BridgeError(f"refusing to write {path}: directory {path.parent} does not exist")

    order = [p.path for p in spec_lib.manifest(s)]  # manifest order in the file
    header: dict[str, object] = {}
    offset = 0
    for name in order:
        a = np.asarray(arrays[name])
        nbytes = a.size * a.dtype.itemsize
        header[name] = {"dtype": ST_TAGS[dtype_name(a)], "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    digests = {name: hashlib.sha256(_le_bytes(np.asarray(arrays[name]))).hexdigest() for name in order}
    header["__metadata__"] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec_lib.dump(s), "dtype": dtype,
        "sha256": json.dumps(digests, sort_keys=True),
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned, as safetensors does

    # a crash never leaves a partial target (spec.atomic: temp file beside it, fsync, os.replace)
    with atomic_open(path) as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in order:
            data = _le_bytes(np.asarray(arrays[name]))
            f.write(data)
            if progress is not None:
                progress(name, len(data))
    return path


# --------------------------------------------------------------------------- reading


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, dict], int]:
    """``(metadata, entries, data_start)`` of a safetensors file, with every structural check.

    Raises BridgeError for a truncated or corrupt file (wrong lengths, bad JSON, overlapping or
    missing byte ranges, trailing bytes, unknown dtypes).
    """
    path = Path(path)
    if not path.is_file():
        raise BridgeError(f"{path}: no such file")
    size = path.stat().st_size
    where = f"{path} is truncated or corrupt"
    with open(path, "rb") as f:
        if size < 8:
            raise BridgeError(f"{where}: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise BridgeError(f"{where}: header length field says {n} bytes, the file has {size - 8} after it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BridgeError(f"{where}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise BridgeError(f"{where}: the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BridgeError(f"{where}: __metadata__ must map strings to strings")

    errors: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, e in header.items():
        ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list)
              and len(e["data_offsets"]) == 2 and all(isinstance(o, int) for o in e["data_offsets"]))
        if not ok:
            errors.append(f"{name}: malformed header entry {e!r}")
            continue
        b, end = e["data_offsets"]
        if e["dtype"] not in ITEMSIZE:
            errors.append(f"{name}: dtype {e['dtype']} is not one of ours ({', '.join(ITEMSIZE)})")
        elif end - b != int(np.prod(e["shape"], dtype=np.int64)) * ITEMSIZE[e["dtype"]] or b < 0:
            errors.append(f"{name}: byte range {b}..{end} does not hold shape {tuple(e['shape'])} of {e['dtype']}")
        spans.append((b, end, name))
    cursor = 0
    for b, end, name in sorted(spans):
        if b != cursor:
            errors.append(f"{name}: data starts at byte {b}, expected {cursor} (overlap or gap)")
        cursor = max(cursor, end)
    data_len = size - 8 - n
    if cursor > data_len:
        errors.append(f"tensor data needs {cursor} bytes, the file holds {data_len}")
    elif cursor < data_len:
        errors.append(f"{data_len - cursor} trailing bytes after the last tensor")
    raise_if(errors, where)
    return meta, header, 8 + n


def check_metadata(path: str | os.PathLike, meta: Mapping[str, str]) -> tuple[spec_lib.Spec, str]:
    """The spec and model dtype from our metadata; BridgeError when the file is not a Mythos weights file."""
    if meta.get("format") != FORMAT:
        got = meta.get("format")
        raise BridgeError(
            f"{path} is not a Mythos weights file: metadata format={got!r}, expected {FORMAT!r}"
            + (" (another project's checkpoint? convert an open-mythos .pt state dict with weights_bridge.cli.convert)" if got is None else ""))
    if meta.get("format_version") != FORMAT_VERSION:
        raise BridgeError(f"{path}: format_version={meta.get('format_version')!r} is not supported (this reader knows {FORMAT_VERSION!r})")
    for key in ("spec", "dtype", "sha256"):
        if key not in meta:
            raise BridgeError(f"{path}: metadata has no {key!r}")
    dtype = meta["dtype"]
    if dtype not in NP_DTYPES:
        raise BridgeError(f"{path}: metadata dtype={dtype!r} is not one of {', '.join(NP_DTYPES)}")
    try:
        s = spec_lib.load(meta["spec"])
    except spec_lib.SpecError as e:
        raise BridgeError(f"{path}: the spec in the metadata is not valid: {e}") from None
    return s, dtype


def read_file(path: str | os.PathLike, *, progress: Progress | None = None) -> tuple[spec_lib.Spec, dict[str, np.ndarray], str]:
    """Read a Mythos weights file: ``(spec, arrays, dtype)``, arrays keyed by manifest path, torch layout.

    Every check (structure, metadata, names, shapes and dtypes against the spec's manifest, SHA-256 of
    each tensor) happens before the arrays are returned; problems are collected and raised together.
    """
    meta, entries, start = read_header(path)
    s, dtype = check_metadata(path, meta)
    try:
        digests = json.loads(meta["sha256"])
    except json.JSONDecodeError:
        raise BridgeError(f"{path}: metadata sha256 is not valid JSON") from None

    # names, shapes and dtypes against the spec, from the header alone
    errors = manifest_errors(s, {name: (tuple(e["shape"]), TAG_NAMES.get(e["dtype"], e["dtype"]))
                                 for name, e in entries.items()}, dtype, in_file=True)
    errors += [f"{name}: no checksum in the metadata" for name in entries if name not in digests]
    raise_if(errors, f"{path} does not match its spec")

    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, e in entries.items():
            b, end = e["data_offsets"]
            f.seek(start + b)
            buf = bytearray(f.read(end - b))
            if len(buf) != end - b:
                errors.append(f"{name}: truncated ({len(buf)} of {end - b} bytes)")
                continue
            if hashlib.sha256(buf).hexdigest() != digests[name]:
                errors.append(f"{name}: checksum mismatch (the data is corrupt)")
                continue
            tag = e["dtype"]
            a = np.frombuffer(buf, dtype={"F32": "<f4", "F64": "<f8", "BF16": "<u2"}[tag])
            if tag == "BF16":
                a = a.view(NP_DTYPES["bfloat16"])
            arrays[name] = a.astype(NP_DTYPES[TAG_NAMES[tag]], copy=False).reshape(e["shape"])
            if progress is not None:
                progress(name, end - b)
    raise_if(errors, f"{path} is corrupt")
    return s, {p.path: arrays[p.path] for p in spec_lib.manifest(s)}, dtype
