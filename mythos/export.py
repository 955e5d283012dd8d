"""`mythos export onnx`: a spec or weights file to one ONNX graph (weights_bridge.onnx_backend has the graph).

    >>> from mythos.export import export_onnx
    >>> info = export_onnx("tiny", "tiny.onnx", dtype="float64", n_loops=4, dynamic=("batch", "seq"))
    >>> info.n_nodes, info.loop_nodes                     # (~210, 1): the recurrent loop is one ONNX Loop
    >>> info = export_onnx("tiny", "tiny-step.onnx", cache=True)  # the decode step: past_*/present_* caches

The full graph takes ids (B, T), force_halt (B, T), force_experts (N, B, T, k) (-1: not forced) and
returns logits, loop_counts, halted, n_steps and the Traces fields; the decode-step graph takes ids and
past_<name> cache arrays and adds present_<name> (weights_bridge/onnx_export.py lists both).
"""

from __future__ import annotations

import os
from typing import Sequence

from weights_bridge import onnx_backend as ox

from .load import LoadError, check_choice, check_output_file, load_model, resolve

DTYPES = ox.DTYPES
DYNAMIC_AXES = ox.DYNAMIC_AXES


def export_onnx(source: str | os.PathLike, out_path: str | os.PathLike, *, dtype: str = "float32",
                n_loops: int | None = None, dynamic: Sequence[str] | str = DYNAMIC_AXES, cache: bool = False,
                seed: int = 0, sets: Sequence[str] = ()) -> ox.ExportInfo:
    """Export a spec (random weights from seed) or a weights file to an ONNX graph at out_path.

    Args:
        source: a preset, a spec .yaml or a .safetensors weights file (mythos.load_model).
        out_path: the .onnx file, written atomically (a temporary file in its folder, then renamed).
        dtype: float32 | float64.
        n_loops: loop steps N baked into the graph (None: recurrent.max_loop_iters).
        dynamic: axes left dynamic: "batch", "seq", both (the default) or () (the example shape (2, 8) only).
        cache: the decode-step graph, with the KV cache as inputs (past_*) and outputs (present_*); refused
            for the compressor, whose cache is per chunk, not per position.
        seed, sets: the random weights' seed and spec overrides (a spec only).
    Returns:
        ExportInfo(path, n_loops, dtype, dynamic, inputs, outputs, n_nodes, loop_nodes, digest).
    Raises:
        LoadError, SpecError, BridgeError: bad input, before anything is written.
    """
    check_choice("--dtype", dtype, DTYPES)
    dynamic = ox.check_dynamic(dynamic)
    s = resolve(source, sets).spec  # a bad source is refused before anything is built or written
    if cache:
        ox.check_cache_spec(s)
    if n_loops is not None:
        ox.check_loops(n_loops)
    check_output_file(out_path, "OUT")
    ox.require("torch", "onnx", "onnxscript")  # a missing package is named before the model is built
    model = load_model(source, "torch", dtype=dtype, seed=seed, sets=sets)
    return ox.export_model(model, out_path, n_loops=n_loops, dynamic=dynamic, cache=cache)
