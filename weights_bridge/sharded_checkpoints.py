"""Sharded checkpoints <-> the Mythos weights file, bitwise: orbax for the jax twin, torch DCP for the torch twin.

    >>> wb.save_orbax(jax_model, "ckpt/orbax")                    # sharded or not: each device writes its shards
    >>> model = wb.load_orbax("ckpt/orbax", mesh, "fsdp")           # restored straight onto a mesh
    >>> wb.orbax_to_safetensors("ckpt/orbax", "m.safetensors")      # == wb.save(jax_model, ...) byte for byte
    >>> wb.save_dcp(torch_model, "ckpt/dcp")                        # FSDP2 / DTensor / ep: every rank calls it
    >>> wb.dcp_to_safetensors("ckpt/dcp", "m.safetensors")          # no process group needed
    >>> wb.safetensors_to_orbax("m.safetensors", "o"); wb.safetensors_to_dcp("m.safetensors", "d")

A checkpoint is a directory; the spec travels inside it, so converting needs only the directory:

    orbax  <dir>/state   a PyTree item: the nnx state, names are nnx paths (recurrent.block.attn.wq.kernel),
                         nnx layout (a linear kernel is the torch weight transposed), sharded as saved
           <dir>/mythos  a JSON item: METADATA below
    DCP    <dir>/.metadata, <dir>/__<rank>_0.distcp   torch.distributed.checkpoint: the model's state dict,
                         names are manifest paths, torch layout
           <dir>/mythos.json                          METADATA below

METADATA: {"format": "mythos-orbax" | "mythos-dcp", "format_version": "1", "spec": the spec as YAML
(spec.dump), "spec_sha256": its SHA-256, "dtype": the model dtype}. Every array is checked against the
spec's manifest (names, shapes, dtypes) before anything is converted or built; problems are listed
together in one BridgeError naming the directory. Writes go to a hidden sibling directory that is
renamed into place once complete (on failure it is removed); an existing target is replaced only with
overwrite=True and only when it is a checkpoint of the same kind.

DCP's `.metadata` is a pickle: it is read here with an unpickler that admits only DCP's own metadata
classes, torch dtypes and sizes (so a hostile checkpoint cannot run code); its data files are read by
torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

import spec as spec_lib
from spec import sharding as sharding_lib
from . import distributed
from .atomic import atomic_write
from .backends import backend_of, to_numpy
from .bridge import weights_path
from .fileformat import (NP_DTYPES, BridgeError, check_dtype_name, dtype_name, expected_dtype,
                         manifest_errors, raise_if, read_file, write_file)

if TYPE_CHECKING:
    import jax
    import torch

ORBAX_FORMAT = "mythos-orbax"
DCP_FORMAT = "mythos-dcp"
CHECKPOINT_VERSION = "1"
ORBAX_STATE, ORBAX_META = "state", "mythos"  # the two items of an orbax checkpoint
DCP_META = "mythos.json"  # the spec file inside a DCP directory
DCP_DATA = ".metadata"  # DCP's own index (the file that makes a directory a DCP checkpoint)


# --------------------------------------------------------------------------- metadata and directories


def _metadata(fmt: str, s: spec_lib.Spec, dtype: str) -> dict[str, str]:
    text = spec_lib.dump(s)
    return {"format": fmt, "format_version": CHECKPOINT_VERSION, "spec": text,
            "spec_sha256": hashlib.sha256(text.encode()).hexdigest(), "dtype": dtype}


def _read_metadata(where: Path, meta: object, fmt: str) -> tuple[spec_lib.Spec, str]:
    """(spec, dtype) from a checkpoint's METADATA, every field checked."""
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BridgeError(f"{where}: the Mythos metadata must be a JSON object of strings")
    if meta.get("format") != fmt:
        raise BridgeError(f"{where} is not a {fmt} checkpoint: metadata format={meta.get('format')!r:.80}")
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise BridgeError(f"{where}: format_version={meta.get('format_version')!r:.40} is not supported "
                          f"(this reader knows {CHECKPOINT_VERSION!r})")
    for key in ("spec", "spec_sha256", "dtype"):
        if key not in meta:
            raise BridgeError(f"{where}: the Mythos metadata has no {key!r}")
    if hashlib.sha256(meta["spec"].encode("utf-8", "surrogatepass")).hexdigest() != meta["spec_sha256"]:
        raise BridgeError(f"{where}: the spec in the metadata was changed after the checkpoint was written (or is "
                          f"corrupt): its SHA-256 does not match spec_sha256; refusing it")
    dtype = meta["dtype"]
    if dtype not in NP_DTYPES:
        raise BridgeError(f"{where}: metadata dtype={dtype!r:.40} is not one of {', '.join(NP_DTYPES)}")
    try:
        s = spec_lib.loads(meta["spec"], where=f"{where}: metadata spec")
    except spec_lib.SpecError as e:
        raise BridgeError(f"{where}: the spec in the metadata is not valid: {e}") from None
    return s, dtype


def _check_source(path: Path, what: str) -> None:
    """A checkpoint directory that exists (a file or nothing is a BridgeError saying which)."""
    try:
        if not path.exists():
            raise BridgeError(f"{path}: no such directory (expected {what})")
        if not path.is_dir():
            raise BridgeError(f"{path} is a file, not {what} (a Mythos weights file? use weights_bridge.load)")
    except OSError as e:
        raise BridgeError(f"{path}: cannot read it: {e.strerror or e}") from None


def _check_target(path: Path, overwrite: bool, is_ours: bool, what: str) -> None:
    """A directory a save may write: absent, or (overwrite=True) a checkpoint of the same kind; in an existing
    directory."""
    if "\0" in str(path):
        raise BridgeError(f"refusing to write {str(path)!r}: the path contains a NUL byte")
    try:
        if path.exists():
            if not path.is_dir():
                raise BridgeError(f"refusing to write {path}: it is a file; a checkpoint is a directory")
            if not overwrite:
                raise BridgeError(f"refusing to write {path}: it exists; pass overwrite=True to replace it")
            if not is_ours:
                raise BridgeError(f"refusing to replace {path}: it is not {what}, so overwrite=True does not apply")
        if not path.parent.is_dir():
            state = "is not a directory" if path.parent.exists() else "does not exist"
            raise BridgeError(f"refusing to write {path}: directory {path.parent} {state}")
    except OSError as e:
        raise BridgeError(f"cannot write {path}: {e.strerror or e} (nothing was written)") from None


def _partial(path: Path) -> Path:
    """The hidden sibling a checkpoint is written to before it is renamed into place (the same name on every
    rank or host)."""
    return path.with_name(f".{path.name}.partial")


def _commit(tmp: Path, path: Path) -> None:
    """Move a complete checkpoint ``tmp`` to ``path``, replacing an old one there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _dtype(dt: object) -> str:
    """The dtype name (fileformat.dtype_name) of a NumPy, jax or torch dtype."""
    if type(dt).__module__ == "torch":
        return str(dt).removeprefix("torch.")
    return dtype_name(np.zeros((), np.dtype(dt)))


# --------------------------------------------------------------------------- orbax (the jax twin)


def _nnx_names(s: spec_lib.Spec) -> dict[str, spec_lib.Param]:
    """nnx state path ("recurrent.block.attn.wq.kernel") -> manifest entry, by the jax twin's one leaf table."""
    from mythos_jax.weights import NNX_LEAF  # torch `weight` -> nnx `kernel` / `embedding`

    out = {}
    for p in spec_lib.manifest(s):
        *module, leaf = p.path.split(".")
        out[".".join([*module, NNX_LEAF.get(p.kind, leaf)])] = p
    return out


def _nnx_shape(p: spec_lib.Param) -> tuple[int, ...]:
    return p.shape[::-1] if p.kind == "linear" else p.shape  # torch [out, in] vs nnx kernel [in, out]


def _nest(flat: Mapping[str, object]) -> dict:
    """{"a.0.b": x} -> {"a": {"0": {"b": x}}}: orbax names each leaf by its path joined with dots."""
    tree: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _orbax_checkpointer():
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{ORBAX_STATE: ocp.PyTreeCheckpointHandler(),
                                                              ORBAX_META: ocp.JsonCheckpointHandler()}))


def _write_orbax(path: Path, state: dict[str, object], s: spec_lib.Spec, dtype: str, overwrite: bool) -> Path:
    """Write the nnx-layout ``state`` {nnx path: array} and the metadata as an orbax checkpoint at ``path``."""
    import jax
    import orbax.checkpoint as ocp

    _check_target(path, overwrite, _is_orbax(path), "a Mythos orbax checkpoint")
    tmp = _partial(path)
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
    _sync("mythos_orbax_prepare")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Metadata file does not exist.*")
            _orbax_checkpointer().save(tmp, ocp.args.Composite(**{
                ORBAX_STATE: ocp.args.PyTreeSave(_nest(state)),
                ORBAX_META: ocp.args.JsonSave(_metadata(ORBAX_FORMAT, s, dtype))}))
        if primary:
            _commit(tmp, path)
    except OSError as e:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise BridgeError(f"cannot write {path}: {e.strerror or e} (nothing was written)") from None
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync("mythos_orbax_commit")
    return path


def _sync(name: str) -> None:
    """Every JAX process reaches this point (nothing with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _is_orbax(path: Path) -> bool:
    return (path / ORBAX_META).is_dir() and (path / ORBAX_STATE).is_dir()


def _open_orbax(path: str | os.PathLike) -> tuple[Path, spec_lib.Spec, str, dict[str, spec_lib.Param]]:
    """``(path, spec, dtype, {nnx name: manifest entry})`` of an orbax checkpoint, its arrays checked against the
    spec from their metadata alone (no data read)."""
    import orbax.checkpoint as ocp

    path = Path(path)
    _check_source(path, "an orbax checkpoint directory")
    if not (path / ORBAX_STATE).is_dir():
        hint = " (a DCP checkpoint: use dcp_to_safetensors)" if (path / DCP_DATA).is_file() else ""
        raise BridgeError(f"{path} is not a Mythos orbax checkpoint: it has no {ORBAX_STATE!r} item{hint}")
    if not (path / ORBAX_META).is_dir():
        raise BridgeError(f"{path}: an orbax checkpoint without the {ORBAX_META!r} item (the spec): it was not "
                          f"written by weights_bridge.save_orbax")
    ck = _orbax_checkpointer()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = ck.restore(path, ocp.args.Composite(**{ORBAX_META: ocp.args.JsonRestore()}))[ORBAX_META]
            tree = ck.metadata(path).item_metadata[ORBAX_STATE].tree
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for an unreadable directory
        raise BridgeError(f"{path}: cannot read the orbax checkpoint: {type(e).__name__}: {str(e)[:300]}") from None
    s, dtype = _read_metadata(path, meta, ORBAX_FORMAT)
    names = _nnx_names(s)
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, m in _flatten(tree).items():
        p = names.get(name)
        shape = tuple(getattr(m, "shape", None) or ())  # a leaf that is not an array has no shape or dtype
        kind = _dtype(m.dtype) if getattr(m, "dtype", None) is not None else type(m).__name__
        found[p.path if p is not None else name] = (shape[::-1] if p is not None and p.kind == "linear" else shape,
                                                    kind)
    raise_if(manifest_errors(s, found, dtype, in_file=False), f"{path} does not match its spec")
    return path, s, dtype, names


def _restore_orbax(path: Path, names: dict[str, spec_lib.Param], targets: dict[str, object] | None) -> dict:
    """{nnx name: array}: NumPy without ``targets``, else jax arrays placed as each target's sharding."""
    import orbax.checkpoint as ocp

    if targets is None:
        args = {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names}
    else:
        args = {n: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
                for n, t in targets.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _orbax_checkpointer().restore(path, ocp.args.Composite(**{
                ORBAX_STATE: ocp.args.PyTreeRestore(restore_args=_nest(args))}))[ORBAX_STATE]
    except Exception as e:  # noqa: BLE001
        raise BridgeError(f"{path}: cannot read the orbax checkpoint's arrays: {type(e).__name__}: "
                          f"{str(e)[:300]}") from None
    return _flatten(out)


def save_orbax(model: object, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a mythos_jax model (params and router bias) as an orbax checkpoint, sharded as the model is.

    Args:
        model: a mythos_jax model, on one device or placed on a mesh (mythos_jax.sharding.shard): each
            device writes its own shards, nothing is gathered.
        directory: the checkpoint directory (written beside, then renamed into place).
        overwrite: replace an existing Mythos orbax checkpoint there.
    Returns:
        The directory.
    Raises:
        BridgeError: not a jax model, variables that do not match the spec's manifest, or a bad target.
    """
    if backend_of(model) != "jax":
        raise BridgeError(f"save_orbax needs a mythos_jax model, got a {backend_of(model)} one "
                          f"(a torch model: weights_bridge.save_dcp)")
    from flax import nnx

    s = model.spec
    names = _nnx_names(s)
    state = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model))}
    state = {n: state[n] for n in names if n in state}  # manifest order; a missing one is reported below
    found = {names[n].path: (tuple(a.shape)[::-1] if names[n].kind == "linear" else tuple(a.shape), _dtype(a.dtype))
             for n, a in state.items()}
    dtype = found.get("embed.weight", ((), "float32"))[1]
    check_dtype_name(dtype)
    raise_if(manifest_errors(s, found, dtype, in_file=False), f"refusing to write {directory}")
    return _write_orbax(Path(directory), state, s, dtype, overwrite)


def load_orbax(directory: str | os.PathLike, mesh: "jax.sharding.Mesh | dict[str, int] | None" = None,
               strategy: str | Sequence[str] | None = None) -> object:
    """Rebuild a mythos_jax model from an orbax checkpoint, on one device or straight onto a mesh.

    Args:
        directory: a checkpoint written by ``save_orbax`` / ``safetensors_to_orbax`` (any mesh).
        mesh: None (the default device), or a jax.sharding.Mesh (mythos_jax.sharding.make_mesh; a dict is made
            into one): every array is read shard by shard onto its devices, placed by spec.sharding.partition,
            then mythos_jax.sharding.shard completes the model (model.sharding; the ep dispatch).
        strategy: with a mesh, "fsdp", "dp+ep", ... (None: the mesh's default, spec.sharding.parse_strategy).
    Returns:
        The model.
    Raises:
        BridgeError: a missing, foreign or mismatched checkpoint; a float64 one with jax_enable_x64 off.
        SpecError: a strategy the mesh or the spec does not allow.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    import mythos_jax as mj

    path, s, dtype, names = _open_orbax(directory)
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise BridgeError(f"{path} holds a float64 model, which needs jax_enable_x64: call "
                          f"weights_bridge.enable_float64('jax') (mythos_jax.set_parity_precision()) first")
    if mesh is None:
        placement = {n: SingleDeviceSharding(jax.devices()[0]) for n in names}
    else:
        from mythos_jax.sharding import make_mesh

        mesh = make_mesh(mesh) if isinstance(mesh, dict) else mesh
        if not isinstance(mesh, jax.sharding.Mesh):
            raise BridgeError(f"load_orbax: mesh must be a jax.sharding.Mesh (mythos_jax.sharding.make_mesh) or a "
                              f"dict like {{'data': 2}}, got {type(mesh).__name__}")
        sizes = {str(a): int(n) for a, n in mesh.shape.items()}
        text = strategy if isinstance(strategy, str) or strategy is None else "+".join(strategy)
        strategy = sharding_lib.parse_strategy(text, sizes)  # SpecError naming what the mesh does not allow
        table = sharding_lib.partition(s, sizes, strategy)
        placement = {n: NamedSharding(mesh, PartitionSpec(*(table[p.path][::-1] if p.kind == "linear"
                                                             else table[p.path]))) for n, p in names.items()}
    targets = {n: jax.ShapeDtypeStruct(_nnx_shape(p), NP_DTYPES[expected_dtype(p.path, dtype)], sharding=placement[n])
               for n, p in names.items()}
    arrays = _restore_orbax(path, names, targets)
    # built abstractly (no init compute or memory), then every variable takes its restored array
    model = nnx.eval_shape(lambda: mj.Mythos(s, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    for key, var in nnx.to_flat_state(state):
        var.set_value(arrays[".".join(map(str, key))])
    nnx.update(model, state)
    if mesh is not None:
        from mythos_jax.sharding import shard

        shard(model, mesh, strategy)  # the arrays are in place already; sets model.sharding and the ep dispatch
    return model


def orbax_to_safetensors(orbax_dir: str | os.PathLike, file: str | os.PathLike) -> Path:
    """The Mythos weights file of an orbax checkpoint, byte for byte what ``weights_bridge.save`` writes for the
    model it holds (no model is built, no device memory used).

    Raises:
        BridgeError: a missing, foreign or mismatched checkpoint, or a bad target (nothing written).
    """
    path, s, dtype, names = _open_orbax(orbax_dir)
    arrays = _restore_orbax(path, names, None)
    torch_layout = {p.path: np.ascontiguousarray(arrays[n].T) if p.kind == "linear" else arrays[n]
                    for n, p in names.items()}
    return write_file(file, s, torch_layout, dtype)


def safetensors_to_orbax(file: str | os.PathLike, orbax_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """An orbax checkpoint (one host, unsharded arrays) of a Mythos weights file; load_orbax restores it onto any
    mesh, orbax_to_safetensors gives the same file back byte for byte.

    Raises:
        BridgeError: a missing, corrupt or foreign file, or a bad target (nothing written).
    """
    s, arrays, dtype = read_file(weights_path(file))
    names = _nnx_names(s)
    state = {n: np.ascontiguousarray(arrays[p.path].T) if p.kind == "linear" else arrays[p.path]
             for n, p in names.items()}
    return _write_orbax(Path(orbax_dir), state, s, dtype, overwrite)


# --------------------------------------------------------------------------- DCP (the torch twin)


def _dcp_allowed() -> set[tuple[str, str]]:
    import torch

    meta = ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    allowed = {("torch.distributed.checkpoint.metadata", n) for n in meta}
    allowed |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    allowed |= {("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}
    allowed |= {("torch", n) for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata without arbitrary code: only the classes a DCP index is made of (_dcp_allowed)."""

    def __init__(self, f: object, allowed: set[tuple[str, str]]):
        super().__init__(f)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")
        return super().find_class(module, name)


def _dcp_reader(path: Path):
    """A torch FileSystemReader of ``path`` whose metadata is read by _MetadataUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: object, **kwargs: object):
            return _read_dcp_index(Path(self.path), self.load_id, StorageMeta)

    return Reader(path)


def _read_dcp_index(path: Path, load_id: str | None = None, storage_meta: type | None = None):
    """DCP's Metadata of ``path``, read safely, every storage file a plain name inside the directory."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path / DCP_DATA, "rb") as f:
            meta = _MetadataUnpickler(f, _dcp_allowed()).load()
    except FileNotFoundError:
        hint = " (an orbax checkpoint: use orbax_to_safetensors)" if (path / ORBAX_STATE).is_dir() else ""
        raise BridgeError(f"{path} is not a DCP checkpoint: it has no {DCP_DATA} file{hint}") from None
    except OSError as e:
        raise BridgeError(f"{path}: cannot read it: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, ... from a corrupt or hostile index
        raise BridgeError(f"{path / DCP_DATA}: not a DCP index this reader accepts ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
    if not isinstance(meta, Metadata):
        raise BridgeError(f"{path / DCP_DATA}: holds a {type(meta).__name__}, not DCP Metadata")
    for info in (meta.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or rel != os.path.basename(rel) or rel in ("", ".", ".."):
            raise BridgeError(f"{path / DCP_DATA}: a data file {str(rel)[:80]!r} outside the checkpoint directory")
    if storage_meta is not None:
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = storage_meta()
        meta.storage_meta.load_id = load_id
    return meta


def _open_dcp(path: str | os.PathLike, s: spec_lib.Spec | None = None
              ) -> tuple[Path, spec_lib.Spec, str]:
    """``(path, spec, dtype)`` of a DCP checkpoint, its tensors checked against the spec from the index alone."""
    path = Path(path)
    _check_source(path, "a DCP checkpoint directory")
    index = _read_dcp_index(path)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    errors: list[str] = []
    for name, md in index.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            found[name] = (tuple(md.size), _dtype(md.properties.dtype))
        else:
            errors.append(f"{name}: not a tensor ({type(md).__name__})")
    if (path / DCP_META).is_file():
        try:
            meta = json.loads((path / DCP_META).read_text("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BridgeError(f"{path / DCP_META}: not valid JSON ({str(e)[:200]})") from None
        file_spec, dtype = _read_metadata(path, meta, DCP_FORMAT)
        if s is not None and spec_lib.dump(s) != spec_lib.dump(file_spec):
            raise BridgeError(f"{path}: spec= differs from the spec stored in {DCP_META}; leave spec=None to use it")
        s = file_spec
    elif s is None:
        raise BridgeError(f"{path}: a DCP checkpoint without {DCP_META} (not written by weights_bridge.save_dcp): "
                          f"pass spec= (the model's spec) to convert it")
    else:
        dtype = found.get("embed.weight", (None, "float32"))[1]
        check_dtype_name(dtype)
    raise_if(errors + manifest_errors(s, found, dtype, in_file=False), f"{path} does not match its spec")
    return path, s, dtype


def _dcp_arrays(path: Path, s: spec_lib.Spec, dtype: str) -> dict[str, np.ndarray]:
    """Every manifest tensor of a checked DCP checkpoint, whole, as NumPy (torch layout); no process group."""
    import torch

    sd = {p.path: torch.empty(p.shape, dtype=getattr(torch, expected_dtype(p.path, dtype)))
          for p in spec_lib.manifest(s)}
    _dcp_load(sd, path, no_dist=True)
    return {name: to_numpy(t) for name, t in sd.items()}


def _dcp_load(sd: dict, path: Path, *, no_dist: bool) -> None:
    """dcp.load of a checked DCP directory into sd (in place), or BridgeError naming it (a truncated or missing
    data file)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(sd, storage_reader=_dcp_reader(path), no_dist=no_dist)
        except Exception as e:  # noqa: BLE001 - a truncated or missing data file
            raise BridgeError(f"{path}: cannot read the DCP checkpoint's tensors: {type(e).__name__}: "
                              f"{str(e)[:300]}") from None


def _is_dcp(path: Path) -> bool:
    return (path / DCP_DATA).is_file() and (path / DCP_META).is_file()


def _write_dcp(path: Path, state: dict[str, "torch.Tensor"], s: spec_lib.Spec, dtype: str, no_dist: bool) -> Path:
    """dcp.save ``state`` to a sibling directory, add mythos.json, rename it to ``path`` (rank 0 moves files)."""
    import torch.distributed.checkpoint as dcp

    rank = 0 if no_dist else distributed.world()[0]
    tmp = _partial(path)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
    if not no_dist:
        distributed.barrier()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=no_dist)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def commit() -> Path:
        try:
            atomic_write(tmp / DCP_META, json.dumps(_metadata(DCP_FORMAT, s, dtype), indent=1).encode())
            _commit(tmp, path)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BridgeError(f"cannot write {path}: {e.strerror or e} (nothing was written)") from None
        return path

    if no_dist:
        return commit()
    distributed.on_rank0(commit)
    return path


EXPERTS = tuple(f"recurrent.block.ffn.experts.{name}" for name in ("gate", "up", "down"))  # routed expert stacks


def _expert_view(model: object, path: str, t: "torch.Tensor") -> "torch.Tensor":
    """An expert-parallel model's piece ``t`` of a routed expert stack (this rank's E / n experts: a plain tensor,
    or a DTensor over the data ranks under dp/fsdp) as a DTensor of the whole (E, ...) stack: split on the expert
    axis over the mesh's "expert" dimension (rank r holds experts r * E / n .., as shard_experts keeps them) and
    as before over the others. DCP then writes each piece once and reads back into any layout."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    mesh = model.sharding.mesh
    own = dict(zip(t.device_mesh.mesh_dim_names, t.placements)) if isinstance(t, DTensor) else {}
    if any(p == Shard(0) for p in own.values()):
        raise BridgeError(f"{path}: split on its expert axis over {', '.join(own)} as well as over expert; save_dcp "
                          f"cannot describe that layout (gather with weights_bridge.save instead)")
    names = tuple(n for n in mesh.mesh_dim_names if n in own or n == "expert")
    placements = [Shard(0) if n == "expert" else own[n] for n in names]
    whole = torch.empty(next(p.shape for p in spec_lib.manifest(model.spec) if p.path == path), device="meta")
    local = t.to_local() if isinstance(t, DTensor) else t
    return DTensor.from_local(local, mesh[names] if len(names) > 1 else mesh[names[0]], placements, run_check=False,
                              shape=whole.shape, stride=whole.stride())


def _ep(model: object) -> bool:
    return model.sharding is not None and "ep" in model.sharding.strategy


def _model_state_dict(model: object) -> dict[str, object]:
    """The torch model's state dict as DCP saves it: DTensors stay sharded (get_model_state_dict); an
    expert-parallel model's expert stacks become whole-stack DTensors (_expert_view)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model)
    if _ep(model):
        for key in EXPERTS:
            sd[key] = _expert_view(model, key, sd[key])
    return sd


def _torch_dtype(model: object) -> str:
    return str(model.embed.weight.dtype).removeprefix("torch.")


def save_dcp(model: object, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a mythos_torch model's state dict with torch.distributed.checkpoint, sharded as the model is.

    Collective when a process group is up: every rank calls it and writes its own shards (FSDP2 and
    tensor-parallel DTensors; an expert-parallel model's local experts), rank 0 the index and mythos.json.
    Without a process group it writes the whole model from this process.

    Args:
        model: a mythos_torch model, plain, FSDP2 ``fully_shard``-ed or placed by mythos_torch.shard.
        directory: the checkpoint directory (every rank must see the same filesystem).
        overwrite: replace an existing Mythos DCP checkpoint there.
    Returns:
        The directory, on every rank.
    Raises:
        BridgeError: not a torch model, a state dict that does not match the spec's manifest, a bad target.
    """
    if backend_of(model) != "torch":
        raise BridgeError(f"save_dcp needs a mythos_torch model, got a {backend_of(model)} one "
                          f"(a jax model: weights_bridge.save_orbax)")
    path = Path(directory)
    s, dtype = model.spec, _torch_dtype(model)
    sd = _model_state_dict(model)
    found = {k: (tuple(t.shape), _dtype(t.dtype)) for k, t in sd.items()}
    raise_if(manifest_errors(s, found, dtype, in_file=False), f"refusing to write {path}")
    _check_target(path, overwrite, _is_dcp(path), "a Mythos DCP checkpoint")  # the same answer on every rank
    no_dist = distributed.world()[1] == 1
    return _write_dcp(path, sd, s, dtype, no_dist)


def load_dcp(directory: str | os.PathLike, *, spec: spec_lib.Spec | None = None) -> object:
    """A plain (unsharded) mythos_torch model from a DCP checkpoint written on any number of ranks.

    Args:
        directory: a checkpoint of ``save_dcp`` / ``safetensors_to_dcp``.
        spec: for a DCP directory without mythos.json (another trainer's), the model's spec.
    Raises:
        BridgeError: a missing, foreign or mismatched checkpoint.
    """
    from .bridge import build

    path, s, dtype = _open_dcp(directory, spec)
    return build("torch", s, dtype, _dcp_arrays(path, s, dtype))


def restore_dcp(model: object, directory: str | os.PathLike) -> object:
    """Read a DCP checkpoint into ``model`` in place, in its own layout (FSDP2, tensor or expert parallel, or
    plain): collective when a process group is up. Returns the model.

    Raises:
        BridgeError: the checkpoint's spec or dtype is not the model's, or it does not match its spec.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if backend_of(model) != "torch":
        raise BridgeError(f"restore_dcp needs a mythos_torch model, got a {backend_of(model)} one")
    path, s, dtype = _open_dcp(directory)
    if spec_lib.dump(s) != spec_lib.dump(model.spec) or dtype != _torch_dtype(model):
        raise BridgeError(f"{path} holds a {dtype} model of another spec than this {_torch_dtype(model)} model's; "
                          f"build the model from it (load_dcp) instead")
    from torch.distributed.tensor import DTensor

    own = get_model_state_dict(model)
    sd = _model_state_dict(model)
    _dcp_load(sd, path, no_dist=distributed.world()[1] == 1)
    for key in EXPERTS if _ep(model) else ():  # the whole-stack view back to this rank's piece, as it was
        local, t = sd[key].to_local(), own[key]
        sd[key] = DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                     stride=t.stride()) if isinstance(t, DTensor) else local
    set_model_state_dict(model, sd)
    return model


def dcp_to_safetensors(dcp_dir: str | os.PathLike, file: str | os.PathLike, *,
                       spec: spec_lib.Spec | None = None) -> Path:
    """The Mythos weights file of a DCP checkpoint, byte for byte what ``weights_bridge.save`` writes for the
    model it holds; no process group needed (the shards of every rank are read and joined here).

    Args:
        dcp_dir: a checkpoint of ``save_dcp`` / ``safetensors_to_dcp``, or another trainer's DCP directory of a
            Mythos state dict (then ``spec`` is needed; the dtype is the tensors').
        file: the weights file to write.
    Raises:
        BridgeError: a missing, foreign or mismatched checkpoint, or a bad target (nothing written).
    """
    path, s, dtype = _open_dcp(dcp_dir, spec)
    return write_file(file, s, _dcp_arrays(path, s, dtype), dtype)


def safetensors_to_dcp(file: str | os.PathLike, dcp_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """A DCP checkpoint (one process, whole tensors) of a Mythos weights file: restore_dcp reads it into any
    sharded model, dcp_to_safetensors gives the same file back byte for byte. No process group is used.

    Raises:
        BridgeError: a missing, corrupt or foreign file, or a bad target (nothing written).
    """
    from .bridge import _to_torch

    s, arrays, dtype = read_file(weights_path(file))
    path = Path(dcp_dir)
    _check_target(path, overwrite, _is_dcp(path), "a Mythos DCP checkpoint")
    return _write_dcp(path, {k: _to_torch(a) for k, a in arrays.items()}, s, dtype, no_dist=True)
