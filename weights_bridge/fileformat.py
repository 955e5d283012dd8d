"""The Mythos weights file: one safetensors file, tensors named by manifest path in torch layout.

Framework-free (NumPy + ml_dtypes). The safetensors layout is written and read here directly so that
every check happens before anything is built or written:

    8 bytes   little-endian u64 N: length of the JSON header (at most MAX_HEADER_BYTES)
    N bytes   JSON: {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [b, e]}, ...}
    rest      raw little-endian tensor bytes; offsets are relative to the end of the header

Two layers. ``write_arrays``/``read_arrays`` store any named NumPy arrays with string metadata and
two checksums: ``sha256`` (a JSON object: tensor name -> SHA-256 of its bytes, so a flipped bit in
the data is caught and named) and ``header_sha256`` (a JSON object: metadata key -> SHA-256 of its
value, and ``__tensors__`` -> SHA-256 of the tensor table of names, dtypes, shapes and offsets), so an
edited header (a spec's ``threshold: 0.99`` made ``0.09``) is refused naming what changed. A
checksum catches corruption and edits, not a forger who recomputes it: it is not a signature.
``write_file``/``read_file`` are the weights file on top: ``format="mythos-weights"``, metadata
``spec`` (the spec as YAML, read back with ``spec.loads``: text only, never a path or preset) and
``dtype`` (the model dtype), tensors checked against the spec's manifest.

Every refusal is a BridgeError naming the file. Format version 1 (no header checksum) is refused:
accepting it would let anyone strip the checksum off an edited file.

bfloat16 moves as its uint16 bit pattern (NumPy has no native bfloat16): exact in both directions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

import spec as spec_lib
from .atomic import atomic_open

FORMAT = "mythos-weights"
FORMAT_VERSION = "2"  # 2: header_sha256 covers the metadata and the tensor table
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a 1T-parameter model's header is ~100 KB; more means corrupt or hostile
MAX_JSON_DEPTH = 8  # the header is 3 deep: {name: {"shape": [..]}}
RESERVED_METADATA = ("format", "format_version", "sha256", "header_sha256")  # written by write_arrays itself
TENSOR_TABLE = "__tensors__"  # the header_sha256 entry for the tensor table

# model dtype name -> NumPy dtype of its tensors, and the safetensors dtype tag of each
NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
ST_TAGS = {"float32": "F32", "float64": "F64", "bfloat16": "BF16"}
# every dtype write_arrays stores (optimizer state adds an int64 step): name -> (tag, little-endian NumPy)
ARRAY_DTYPES: dict[str, tuple[str, str]] = {
    "float32": ("F32", "<f4"), "float64": ("F64", "<f8"), "bfloat16": ("BF16", "<u2"), "float16": ("F16", "<f2"),
    "int64": ("I64", "<i8"), "int32": ("I32", "<i4"), "int16": ("I16", "<i2"), "int8": ("I8", "i1"),
    "uint8": ("U8", "u1"), "bool": ("BOOL", "?"),
}
TAG_NAMES = {tag: name for name, (tag, _) in ARRAY_DTYPES.items()}
ITEMSIZE = {tag: np.dtype(le).itemsize for tag, le in ARRAY_DTYPES.values()}

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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header_digests(meta: Mapping[str, str], entries: Mapping[str, Mapping]) -> dict[str, str]:
    """The ``header_sha256`` object: SHA-256 of each metadata value (all but header_sha256 itself) and
    of the tensor table (``__tensors__``: every name's dtype, shape and byte range, in name order)."""
    out = {k: _sha256(v.encode("utf-8", "surrogatepass")) for k, v in meta.items() if k != "header_sha256"}
    table = {name: [e["dtype"], list(e["shape"]), list(e["data_offsets"])] for name, e in entries.items()}
    out[TENSOR_TABLE] = _sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode())
    return out


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, format: str,
                 metadata: Mapping[str, str] | None = None, progress: Progress | None = None) -> Path:
    """Write named NumPy arrays and string metadata as one checksummed safetensors file, atomically.

    The primitive under the weights file, for any other file of arrays (optimizer state): ``sha256``
    covers each tensor's bytes, ``header_sha256`` the metadata and the tensor table; ``read_arrays``
    verifies both.

    Args:
        path: the target file; replaced only once the new file is complete (temp file + os.replace).
        arrays: name -> array, written in this order; dtypes of ARRAY_DTYPES (0-d arrays are fine).
        format: what the file is (``"mythos-weights"``, ``"mythos-train-state"``); read_arrays must
            be given the same.
        metadata: str -> str (JSON-encode anything else); the keys RESERVED_METADATA are ours.
        progress: called with (tensor name, bytes) after each tensor is written.
    Returns:
        The path written.
    Raises:
        BridgeError: before anything is written, for bad names, dtypes or metadata, a target that is a
            directory or in a missing directory; after, for an I/O error (the target is left as it was).
    """
    path = Path(path)
    metadata = dict(metadata or {})
    errors = [f"metadata {k!r}: reserved (written by write_arrays itself)" for k in metadata if k in RESERVED_METADATA]
    errors += [f"metadata {k!r}: keys and values must be strings, got {type(v).__name__}"
               for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if not isinstance(format, str) or not format:
        errors.append(f"format={format!r} must be a non-empty string")
    header: dict[str, object] = {}
    digests: dict[str, str] = {}
    offset = 0
    for name, a in arrays.items():
        a = np.asarray(a)
        kind = dtype_name(a)
        if not isinstance(name, str) or not name or name == "__metadata__":
            errors.append(f"{name!r}: a tensor name must be a non-empty string other than '__metadata__'")
        elif kind not in ARRAY_DTYPES:
            errors.append(f"{name}: dtype {kind} cannot be stored; allowed: {', '.join(ARRAY_DTYPES)}")
        else:
            nbytes = a.size * a.dtype.itemsize
            header[name] = {"dtype": ARRAY_DTYPES[kind][0], "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    raise_if(errors, f"refusing to write {path}")
    _check_target(path)
    for name in header:
        digests[name] = _sha256(_le_bytes(np.asarray(arrays[name])))
    meta = {"format": format, "format_version": FORMAT_VERSION, **metadata, "sha256": json.dumps(digests, sort_keys=True)}
    meta["header_sha256"] = json.dumps(header_digests(meta, header), sort_keys=True)
    head = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
    if len(head) > MAX_HEADER_BYTES:
        raise BridgeError(f"refusing to write {path}: the header would be {len(head)} bytes, more than the "
                          f"{MAX_HEADER_BYTES} any reader accepts (metadata too large?)")

    # a crash never leaves a partial target (atomic: temp file beside it, fsync, os.replace)
    try:
        with atomic_open(path) as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for name in header:
                data = _le_bytes(np.asarray(arrays[name]))
                f.write(data)
                if progress is not None:
                    progress(name, len(data))
    except OSError as e:
        raise BridgeError(f"cannot write {path}: {e.strerror or e} (nothing was written; the old file, if any, is "
                          f"unchanged)") from None
    return path


def _check_target(path: Path) -> None:
    """A path write_arrays can replace: not a directory, in an existing directory."""
    if "\0" in str(path):
        raise BridgeError(f"refusing to write {str(path)!r}: the path contains a NUL byte")
    try:
        if path.is_dir():
            raise BridgeError(f"refusing to write {path}: it is a directory; give a file name (e.g. {path / 'model.safetensors'})")
        if not path.parent.is_dir():
            what = "is not a directory" if path.parent.exists() else "does not exist"
            raise BridgeError(f"refusing to write {path}: directory {path.parent} {what}")
    except OSError as e:  # a name too long, a loop of symlinks: stat itself fails
        raise BridgeError(f"cannot write {path}: {e.strerror or e} (nothing was written)") from None


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
            mistyped tensor, or a bad target path; after, for an I/O error (nothing is left behind).
    """
    path = Path(path)
    check_dtype_name(dtype)
    raise_if(check_arrays(s, arrays, dtype), f"refusing to write {path}")
    order = [p.path for p in spec_lib.manifest(s)]  # manifest order in the file
    return write_arrays(path, {name: arrays[name] for name in order}, format=FORMAT,
                        metadata={"spec": spec_lib.dump(s), "dtype": dtype}, progress=progress)


# --------------------------------------------------------------------------- reading


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _json(text: str) -> object:
    """Strict JSON: duplicate keys and NaN/Infinity are errors (another reader might see other values)."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def _depth(x: object) -> int:
    if isinstance(x, dict):
        return 1 + max(map(_depth, x.values()), default=0)
    if isinstance(x, list):
        return 1 + max(map(_depth, x), default=0)
    return 0


def _file_size(path: Path) -> int:
    """The size of a regular file, or a BridgeError saying why ``path`` is not one."""
    try:
        if path.is_dir():
            raise BridgeError(f"{path} is a directory, not a weights file (give the .safetensors file inside it)")
        if not path.exists():
            raise BridgeError(f"{path}: no such file")
        if not path.is_file():
            raise BridgeError(f"{path} is not a regular file")
        return path.stat().st_size
    except OSError as e:  # a name too long, a loop of symlinks, no permission to look
        raise BridgeError(f"{path}: cannot read it: {e.strerror or e}") from None


def read_header(path: str | os.PathLike, *, format: str = FORMAT) -> tuple[dict[str, str], dict[str, dict], int]:
    """``(metadata, entries, data_start)`` of one of our files, every check that needs no spec done.

    Checks, in order: the structure (lengths, JSON, byte ranges that tile the data exactly, known
    dtypes), that the file is a ``format`` file of FORMAT_VERSION, and that ``header_sha256`` matches
    the metadata and the tensor table and ``sha256`` names every tensor. The data's own checksums
    are checked as it is read (``read_tensors``).

    Raises:
        BridgeError: naming the file and every problem.
    """
    path = Path(path)
    size = _file_size(path)
    where = f"{path} is truncated or corrupt"
    try:
        with open(path, "rb") as f:
            if size < 8:
                raise BridgeError(f"{where}: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise BridgeError(f"{where}: header length field says {n} bytes, the file has {size - 8} after it")
            if n > MAX_HEADER_BYTES:
                raise BridgeError(f"{where}: header length field says {n} bytes, more than the {MAX_HEADER_BYTES} "
                                  f"a Mythos file uses")
            raw = f.read(n)
    except OSError as e:
        raise BridgeError(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(raw) != n:
        raise BridgeError(f"{where}: the header is {len(raw)} of {n} bytes (the file changed while read?)")
    try:
        header = _json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BridgeError(f"{where}: the header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise BridgeError(f"{where}: the header is a JSON {type(header).__name__}, not an object")
    if _depth(header) > MAX_JSON_DEPTH:
        raise BridgeError(f"{where}: the header nests deeper than {MAX_JSON_DEPTH} levels")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BridgeError(f"{where}: __metadata__ must map strings to strings")

    errors: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, e in header.items():
        if not _entry_ok(e):
            errors.append(f"{name}: malformed header entry {str(e)[:200]}")
            continue
        b, end = e["data_offsets"]
        if e["dtype"] not in ITEMSIZE:
            errors.append(f"{name}: dtype {str(e['dtype'])[:40]} is not one of ours ({', '.join(ITEMSIZE)})")
        elif b < 0 or end - b != math.prod(e["shape"]) * ITEMSIZE[e["dtype"]]:
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
    _check_format(path, meta, format)
    _check_header_digests(path, meta, header)
    return meta, header, 8 + n


def _entry_ok(e: object) -> bool:
    def ints(x: object) -> bool:
        return isinstance(x, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in x)
    return (isinstance(e, dict) and set(e) == {"dtype", "shape", "data_offsets"} and isinstance(e["dtype"], str)
            and ints(e["shape"]) and all(d >= 0 for d in e["shape"]) and ints(e["data_offsets"])
            and len(e["data_offsets"]) == 2)


def _check_format(path: Path, meta: Mapping[str, str], format: str) -> None:
    got = meta.get("format")
    if got != format:
        what = "a Mythos weights file" if format == FORMAT else f"a {format} file"
        hint = ""
        if got is None and format == FORMAT:
            hint = " (another project's checkpoint? convert an open-mythos .pt state dict with `mythos convert`)"
        elif got is not None and got.startswith("mythos"):
            hint = f" (it is a {got} file)"
        raise BridgeError(f"{path} is not {what}: metadata format={got!r:.80}, expected {format!r}{hint}")
    version = meta.get("format_version")
    if version == "1":
        raise BridgeError(f"{path}: format_version '1' is no longer read: version 1 has no checksum over its header, so an "
                          f"edited spec would go unnoticed. Re-convert it from its source (`mythos convert`), or re-save "
                          f"the model with the release that wrote it, to get a version {FORMAT_VERSION} file")
    if version != FORMAT_VERSION:
        raise BridgeError(f"{path}: format_version={version!r:.40} is not supported (this reader knows {FORMAT_VERSION!r})")


def _check_header_digests(path: Path, meta: Mapping[str, str], entries: Mapping[str, dict]) -> None:
    """header_sha256 against the metadata and the tensor table; sha256 has every tensor's digest."""
    where = f"{path}: the header was changed after the file was written (or is corrupt); refusing it"
    try:
        recorded = _json(meta["header_sha256"])
        digests = _json(meta["sha256"])
    except KeyError as e:
        raise BridgeError(f"{path}: metadata has no {e.args[0]!r} checksum (not written by write_arrays?)") from None
    except (ValueError, RecursionError):
        raise BridgeError(f"{where}: its checksums (metadata header_sha256 / sha256) are not valid JSON") from None
    for key, value in (("header_sha256", recorded), ("sha256", digests)):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise BridgeError(f"{where}: metadata {key} must be a JSON object of hex digests")
    actual = header_digests(meta, entries)
    errors = []
    for key in sorted(set(actual) | set(recorded), key=lambda k: (k == TENSOR_TABLE, k)):
        part = "the tensor table (names, dtypes, shapes, byte ranges)" if key == TENSOR_TABLE else f"metadata {key!r}"
        if key not in recorded:
            errors.append(f"{part}: not covered by the checksum (added after writing)")
        elif key not in actual:
            errors.append(f"{part}: missing (removed after writing)")
        elif recorded[key] != actual[key]:
            errors.append(f"{part}: changed (checksum mismatch)")
    raise_if(errors, where)
    # (a digest without a tensor is left to the caller: read_file names the tensor missing from the manifest)
    raise_if([f"{name}: no checksum in the metadata" for name in entries if name not in digests], f"{path} is corrupt")


def read_tensors(path: str | os.PathLike, meta: Mapping[str, str], entries: Mapping[str, dict], start: int, *,
                 progress: Progress | None = None) -> dict[str, np.ndarray]:
    """The tensors of a file checked by ``read_header``, each verified against its SHA-256, in file order."""
    digests = json.loads(meta["sha256"])
    errors: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f:
            for name, e in entries.items():
                b, end = e["data_offsets"]
                f.seek(start + b)
                buf = bytearray(f.read(end - b))
                if len(buf) != end - b:
                    errors.append(f"{name}: truncated ({len(buf)} of {end - b} bytes)")
                    continue
                if _sha256(buf) != digests[name]:
                    errors.append(f"{name}: checksum mismatch (the data is corrupt)")
                    continue
                kind = TAG_NAMES[e["dtype"]]
                a = np.frombuffer(buf, dtype=ARRAY_DTYPES[kind][1])
                if kind == "bfloat16":
                    a = a.view(NP_DTYPES["bfloat16"])
                arrays[name] = a.astype(a.dtype.newbyteorder("="), copy=False).reshape(e["shape"])
                if progress is not None:
                    progress(name, end - b)
    except OSError as e:
        raise BridgeError(f"{path}: cannot read it: {e.strerror or e}") from None
    raise_if(errors, f"{path} is corrupt")
    return arrays


def read_arrays(path: str | os.PathLike, *, format: str, progress: Progress | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a file written by ``write_arrays(path, arrays, format=format, metadata=...)``.

    Returns:
        ``(arrays, metadata)``: the arrays in file order (0-d arrays stay 0-d), the caller's metadata
        (without RESERVED_METADATA). Every checksum is verified first.
    Raises:
        BridgeError: a missing, truncated, corrupt, edited or foreign file, naming it and every problem.
    """
    meta, entries, start = read_header(path, format=format)
    arrays = read_tensors(path, meta, entries, start, progress=progress)
    return arrays, {k: v for k, v in meta.items() if k not in RESERVED_METADATA}


def check_metadata(path: str | os.PathLike, meta: Mapping[str, str]) -> tuple[spec_lib.Spec, str]:
    """The spec and model dtype from a weights file's metadata (as ``read_header`` returns it, verified)."""
    _check_format(Path(path), meta, FORMAT)
    for key in ("spec", "dtype"):
        if key not in meta:
            raise BridgeError(f"{path}: metadata has no {key!r}")
    dtype = meta["dtype"]
    if dtype not in NP_DTYPES:
        raise BridgeError(f"{path}: metadata dtype={dtype!r:.40} is not one of {', '.join(NP_DTYPES)}")
    try:  # inline YAML only: a spec inside a file never names a preset or a path to follow
        s = spec_lib.loads(meta["spec"], where=f"{path}: metadata spec")
    except spec_lib.SpecError as e:
        raise BridgeError(f"{path}: the spec in the metadata is not valid: {e}") from None
    return s, dtype


def read_file(path: str | os.PathLike, *, progress: Progress | None = None) -> tuple[spec_lib.Spec, dict[str, np.ndarray], str]:
    """Read a Mythos weights file: ``(spec, arrays, dtype)``, arrays keyed by manifest path, torch layout.

    Every check (structure, header checksum, metadata, names, shapes and dtypes against the spec's
    manifest, SHA-256 of each tensor) happens before the arrays are returned; problems are collected
    and raised together.
    """
    meta, entries, start = read_header(path)
    s, dtype = check_metadata(path, meta)
    # names, shapes and dtypes against the spec, from the header alone
    errors = manifest_errors(s, {name: (tuple(e["shape"]), TAG_NAMES[e["dtype"]]) for name, e in entries.items()},
                             dtype, in_file=True)
    raise_if(errors, f"{path} does not match its spec")
    arrays = read_tensors(path, meta, entries, start, progress=progress)
    return s, {p.path: arrays[p.path] for p in spec_lib.manifest(s)}, dtype
