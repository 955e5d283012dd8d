"""The optimizer-state file of a training checkpoint: the arrays of either twin's optimizer plus run metadata.

    >>> write_state("run/step-000200/optimizer.safetensors", mythos_torch.optimizer_arrays(tr), meta)
    >>> arrays, meta = read_state("run/step-000200/optimizer.safetensors")

One checksummed safetensors file (weights_bridge.fileformat.write_arrays, format "mythos-train-state":
SHA-256 of every tensor and of the header, written atomically), the same layout from both twins (each
twin's `optimizer_arrays` names the arrays). A flipped bit, a truncation or an edited header is refused
on read, naming the file. The weights beside it go through weights_bridge.save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from weights_bridge.fileformat import BridgeError, read_arrays, write_arrays

STATE_FORMAT = "mythos-train-state"
META_KEY = "mythos_train"


def write_state(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, object]) -> Path:
    """Write optimizer-state arrays and JSON metadata as one checksummed safetensors file, atomically.

    Args:
        path: the target file; replaced only once the new file is complete (temp file + os.replace).
        arrays: name -> array (see each twin's `optimizer_arrays`).
        meta: JSON-serialisable values (step, backend, spec YAML, TrainConfig, ...).
    Returns:
        The path written.
    Raises:
        BridgeError: a target that cannot be written (nothing is written then).
    """
    return write_arrays(path, {k: np.asarray(v) for k, v in arrays.items()}, format=STATE_FORMAT,
                        metadata={META_KEY: json.dumps(dict(meta), sort_keys=True)})


def read_state(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, metadata) of a file written by write_state, every checksum verified.

    Raises:
        BridgeError: a missing, truncated, corrupt, edited or foreign file, naming it and the problem.
    """
    arrays, meta = read_arrays(path, format=STATE_FORMAT)
    if META_KEY not in meta:
        raise BridgeError(f"{path} holds no Mythos training metadata (not written by mythos train)")
    try:
        run = json.loads(meta[META_KEY])
    except ValueError as e:
        raise BridgeError(f"{path}: its training metadata is not valid JSON ({e})") from None
    if not isinstance(run, dict):
        raise BridgeError(f"{path}: its training metadata is not a JSON object")
    return arrays, run
