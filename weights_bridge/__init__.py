"""Weights in and out of the Mythos twins: one safetensors file format, twin <-> twin, open-mythos import.

    >>> import weights_bridge as wb
    >>> wb.save(torch_model, "m.safetensors"); jax_model = wb.load("m.safetensors", backend="jax")
    >>> spec, model = wb.from_open_mythos(open_mythos_model, cfg, backend="jax")
    >>> wb.twin("jax"), wb.BACKENDS, wb.enable_float64("jax")    # the one backend registry

Every refusal is a ``BridgeError`` (a ValueError) raised before anything is written, naming every
offending tensor. See docs in each module: backends (the registry: twins, NumPy, float64),
fileformat (the file), atomic (atomic writes), openmythos (the name map), bridge (models),
convert (convert/check, no printing), sharded_checkpoints (orbax and torch DCP checkpoint directories
<-> the file, bitwise), distributed (a torch model over ranks: gathered, written by rank 0).
"""

from . import backends
from .backends import BACKENDS, DTYPES, backend_of, enable_float64, twin
from .bridge import from_open_mythos, jax_to_torch, load, read_spec, save, to_open_mythos, torch_to_jax
from .fileformat import FORMAT, FORMAT_VERSION, BridgeError, read_file, write_file
from .openmythos import config_from_spec, spec_from_config
from .sharded_checkpoints import (dcp_to_safetensors, load_dcp, load_orbax, orbax_to_safetensors, restore_dcp,
                                  safetensors_to_dcp, safetensors_to_orbax, save_dcp, save_orbax)

__all__ = [
    "save", "load", "read_spec", "torch_to_jax", "jax_to_torch", "backend_of",
    "from_open_mythos", "to_open_mythos", "spec_from_config", "config_from_spec",
    "read_file", "write_file", "BridgeError", "FORMAT", "FORMAT_VERSION",
    "backends", "BACKENDS", "DTYPES", "twin", "enable_float64",
    "save_orbax", "load_orbax", "orbax_to_safetensors", "safetensors_to_orbax",
    "save_dcp", "load_dcp", "restore_dcp", "dcp_to_safetensors", "safetensors_to_dcp",
]
