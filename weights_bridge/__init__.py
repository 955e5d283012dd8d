"""Weights in and out of the Mythos twins: one safetensors file format, twin <-> twin, open-mythos import.

    >>> import weights_bridge as wb
    >>> wb.save(torch_model, "m.safetensors"); jax_model = wb.load("m.safetensors", backend="jax")
    >>> spec, model = wb.from_open_mythos(open_mythos_model, cfg, backend="jax")

Every refusal is a ``BridgeError`` (a ValueError) raised before anything is written, naming every
offending tensor. See docs in each module: fileformat (the file), openmythos (the name map),
bridge (models), cli (convert/check).
"""

from .bridge import (backend_of, from_open_mythos, jax_to_torch, load, save, to_open_mythos,
                     torch_to_jax)
from .fileformat import FORMAT, FORMAT_VERSION, BridgeError, read_file, write_file
from .openmythos import config_from_spec, spec_from_config

__all__ = [
    "save", "load", "torch_to_jax", "jax_to_torch", "backend_of",
    "from_open_mythos", "to_open_mythos", "spec_from_config", "config_from_spec",
    "read_file", "write_file", "BridgeError", "FORMAT", "FORMAT_VERSION",
]
