"""The torch twin to ONNX: the full-sequence graph and the decode-step graph (onnx_backend runs them).

    >>> from weights_bridge.onnx_export import export_model
    >>> info = export_model(torch_model, "m.onnx", n_loops=4)               # ids -> logits, decisions, traces
    >>> info = export_model(torch_model, "m-step.onnx", n_loops=4, cache=True)  # + the KV cache in and out

The full graph (opset 18) takes
    ids            (B, T) int64
    force_halt     (B, T) int64       s in 1..N halts at step s, 0 never by threshold, -1 not forced
    force_experts  (N, B, T, k) int64 routed experts of step t (-1: not forced); k = 0 for a dense FFN
and returns logits (B, T, V), loop_counts (B, T) int32, halted (B, T) bool, n_steps () int32 and the
Traces fields state_norm, halt_p, cum_p, running, expert_idx, router_margin, each (N, B, T[, k]), then
values (B, T) and value (N, B, T) when the spec has a value head. N is fixed at export; B and T are
dynamic by default. The loop is the twin's torch.while_loop form (`model.loop_form = "while"`, equal to
the eager loop bit for bit), so ACT's early exit is one ONNX Loop; the routed experts run sparse (only
the chosen experts' products, gathered weights), so a dynamic graph has no dense fallback.

The decode-step graph (cache=True) takes ids (B, T) and, for every array of the twin's KVCache
(spec.cache_shapes: `k`, `v` for GQA; `c_kv`, `k_r` for MLA), `past_<name>` holding positions 0..P-1
on its axis 2, and returns the full graph's outputs followed by `present_<name>` holding 0..P+T-1:
the cache layout of ONNX decoders (past in, present out). P = 0 is the prefill, T = 1 a decode step,
anything between a chunked prefill; B, T and P are dynamic. As in the twins' cached forward, every
loop step runs (later tokens find keys at every depth), so the N steps are unrolled, not a Loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

import spec as S

from .atomic import atomic_write
from .fileformat import BridgeError

OPSET = 18
DTYPES = ("float32", "float64")  # bfloat16: onnxruntime's CPU provider has no bfloat16 matmul
DYNAMIC_AXES = ("batch", "seq")
INPUTS = ("ids", "force_halt", "force_experts")
TRACE_FIELDS = ("state_norm", "halt_p", "cum_p", "running", "expert_idx", "router_margin")
OUTPUTS = ("logits", "loop_counts", "halted", "n_steps", *TRACE_FIELDS)
VALUE_OUTPUTS = ("values", "value")  # only with a value head
PAST, PRESENT = "past_", "present_"  # decode-step graph: past_<name> in, present_<name> out


class ExportInfo(NamedTuple):
    """What export_model wrote."""
    path: Path
    n_loops: int
    dtype: str
    dynamic: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    n_nodes: int  # nodes of the main graph
    loop_nodes: int  # ONNX Loop nodes in it (1: the recurrent loop; 0 in a decode-step graph)
    digest: str  # sha256 of the written file


def require(*names: str) -> None:
    """Import each module or raise a BridgeError saying how to install the ONNX extra."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            raise BridgeError(f"the ONNX backend needs {name}, which is not installed: pip install 'mythos[onnx]'") \
                from None


def check_dynamic(dynamic: Sequence[str] | str) -> tuple[str, ...]:
    """A subset of ("batch", "seq") in that order (a comma list is split), or a BridgeError naming --dynamic."""
    if isinstance(dynamic, str):
        dynamic = [d for d in dynamic.split(",") if d.strip()]
    got = tuple(d.strip() for d in dynamic)
    bad = [d for d in got if d not in DYNAMIC_AXES]
    if bad:
        raise BridgeError(f"--dynamic {','.join(bad)!r} is not allowed; allowed: {', '.join(DYNAMIC_AXES)} "
                          "(comma-separated)")
    return tuple(d for d in DYNAMIC_AXES if d in got)


def check_loops(n_loops: object) -> int:
    """n_loops >= 1, or a BridgeError naming --loops."""
    if isinstance(n_loops, bool) or not isinstance(n_loops, (int, np.integer)) or n_loops < 1:
        raise BridgeError(f"--loops {n_loops!r} must be an integer >= 1")
    return int(n_loops)


def check_cache_spec(spec: S.Spec) -> None:
    """A BridgeError when the spec's cache is not positions along one axis (the decode-step graph's layout)."""
    if spec.recurrent.compressor.enabled:
        raise BridgeError("--cache: the decode-step graph holds per-position caches (past_*/present_* along the "
                          "positions); the compressor's per-chunk summaries (recurrent.compressor.enabled) are not "
                          "positions; export without --cache, or with recurrent.compressor.enabled=false")


def cache_names(spec: S.Spec) -> tuple[str, ...]:
    """The KVCache arrays of the spec, in spec.cache_shapes order: the decode-step graph's past_/present_ names."""
    return tuple(S.cache_shapes(spec, 1, 1, 1))


def decode_inputs(spec: S.Spec) -> tuple[str, ...]:
    """Input names of the decode-step graph."""
    return ("ids", *(PAST + n for n in cache_names(spec)))


def decode_outputs(spec: S.Spec) -> tuple[str, ...]:
    """Output names of the decode-step graph."""
    return (*OUTPUTS, *(VALUE_OUTPUTS if spec.value_head.enabled else ()), *(PRESENT + n for n in cache_names(spec)))


@contextlib.contextmanager
def _quiet(*loggers: str):
    """The exporter's informational warnings (skipped optimisations, torchvision absent) off for one export."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _sort_stable():
    """aten.sort.stable as ONNX TopK over the whole axis: TopK puts the lower index first on ties, as the
    twins' stable sort does (torch.onnx has no translation of the stable sort)."""
    from onnxscript import opset18 as op

    def sort_stable(self, stable: bool | None = None, dim: int = -1, descending: bool = False):
        n = op.Shape(self, start=dim, end=dim + 1 if dim != -1 else None)  # (1,) the axis length
        values, indices = op.TopK(self, n, axis=dim, largest=1 if descending else 0, sorted=1)
        return values, indices

    return sort_stable


def _flat(out: object, value_head: bool) -> tuple:
    """A ModelOutput as the graph's flat outputs (OUTPUTS, then VALUE_OUTPUTS with a value head)."""
    import torch

    tr = out.traces
    n_steps = torch.as_tensor(out.n_steps, dtype=torch.int32)  # a Python int in the cached forward (every step runs)
    flat = (out.logits, out.loop_counts, out.halted, n_steps, *(getattr(tr, f) for f in TRACE_FIELDS))
    return flat + ((out.values, tr.value) if value_head else ())


def _wrapper(model: object, N: int):
    """An nn.Module (ids, force_halt, force_experts) -> the flat outputs, through the twin's public forward."""
    import torch

    import mythos_torch as mt

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, force_halt: torch.Tensor,
                    force_experts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = mt.forward(self.model, ids, N, early_exit=True, force_halt=force_halt, force_experts=force_experts)
            return _flat(out, self.model.spec.value_head.enabled)

    return Exported()


def _decode_wrapper(model: object, N: int):
    """An nn.Module (ids, past arrays...) -> the flat outputs and the present arrays, through the twin's cached
    forward: the past rows are copied into a KVCache of capacity P + T, the call writes rows P..P+T-1."""
    import torch

    import mythos_torch as mt

    names = cache_names(model.spec)

    class ExportedStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            T, P = ids.shape[1], past[0].shape[2]
            # (L, B, P + T, ...): the past, then room for this call's rows
            arrays = {n: torch.cat([a, a.new_zeros(*a.shape[:2], T, *a.shape[3:])], dim=2) for n, a in zip(names, past)}
            cache = mt.cache.KVCache(arrays, N)
            out = mt.forward(self.model, ids, N, cache=cache, start_pos=P)
            return _flat(out, self.model.spec.value_head.enabled) + tuple(cache.arrays[n] for n in names)

    return ExportedStep()


def export_model(model: object, out_path: str | os.PathLike, *, n_loops: int | None = None,
                 dynamic: Sequence[str] = DYNAMIC_AXES, example_shape: tuple[int, int] = (2, 8),
                 cache: bool = False) -> ExportInfo:
    """Export a mythos_torch model (float32 or float64) to an ONNX graph at out_path, written atomically.

    Args:
        model: a mythos_torch Mythos (its loop_form is switched to "while" for the export, then restored).
        out_path: the .onnx file (weights inside it).
        n_loops: loop steps N baked into the graph (None: recurrent.max_loop_iters).
        dynamic: axes left dynamic, a subset of ("batch", "seq"); () exports example_shape only. The
            decode-step graph's past length is always dynamic.
        example_shape: (B, T) of the example input the export traces with (T capped at max_seq_len).
        cache: the decode-step graph (past_*/present_* cache arrays) instead of the full-sequence graph.
    Returns:
        ExportInfo(path, n_loops, dtype, dynamic, inputs, outputs, n_nodes, loop_nodes, digest).
    """
    require("torch", "onnx", "onnxscript")
    import onnx
    import torch

    import mythos_torch as mt

    if type(model).__module__.split(".")[0] != "mythos_torch":
        raise BridgeError(f"ONNX export takes a mythos_torch model, got {type(model).__module__}.{type(model).__name__}")
    s = model.spec
    dtype = mt.model.DTYPE_NAMES[model.embed.weight.dtype]
    if dtype not in DTYPES:
        raise BridgeError(f"ONNX export supports dtype {' or '.join(DTYPES)}, not {dtype} (onnxruntime's CPU "
                          "provider has no bfloat16 matmul)")
    dynamic = check_dynamic(dynamic)
    N = s.recurrent.max_loop_iters if n_loops is None else check_loops(n_loops)
    B, T = example_shape[0], min(example_shape[1], s.max_seq_len)
    b = torch.export.Dim("batch", min=1) if "batch" in dynamic else None
    t = torch.export.Dim("seq", min=1, max=s.max_seq_len) if "seq" in dynamic else None
    axes = {i: d for i, d in enumerate((b, t)) if d is not None}
    if cache:
        check_cache_spec(s)
        T = max(2, min(T, s.max_seq_len // 2))  # an example of 1 token would fix T = 1 (torch.export's 0/1 rule)
        P = min(5, s.max_seq_len - T)
        past = tuple(torch.zeros(shape, dtype=model.embed.weight.dtype)
                     for shape in S.cache_shapes(s, B, P, N).values())
        args = (torch.zeros(B, T, dtype=torch.int64), *past)
        p = torch.export.Dim("past", min=0, max=s.max_seq_len - 1)
        shapes = (axes or None, tuple({**({1: b} if b is not None else {}), 2: p} for _ in past))
        wrapper, inputs, outputs = _decode_wrapper(model, N), decode_inputs(s), decode_outputs(s)
    else:
        k = s.moe.top_k if s.recurrent.ffn == "moe" else 0
        args = (torch.zeros(B, T, dtype=torch.int64), torch.full((B, T), -1, dtype=torch.int64),
                torch.full((N, B, T, k), -1, dtype=torch.int64))
        shapes = (axes, axes, {i + 1: d for i, d in axes.items()}) if dynamic else None
        wrapper, inputs = _wrapper(model, N), INPUTS
        outputs = OUTPUTS + (VALUE_OUTPUTS if s.value_head.enabled else ())
    form = model.loop_form
    model.loop_form = "while"  # the torch.while_loop form: ACT's early exit as one ONNX Loop (a cache: the for loop)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript", "torch.onnx"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper.eval(), args, input_names=list(inputs), output_names=list(outputs),
                opset_version=OPSET, dynamo=True, dynamic_shapes=shapes, optimize=True, verbose=False,
                custom_translation_table={torch.ops.aten.sort.stable: _sort_stable()})
    finally:
        model.loop_form = form
    proto = program.model_proto
    buf = io.BytesIO()
    onnx.save_model(proto, buf)  # one file, weights inside (protobuf's 2 GB limit: models below ~500M float32)
    data = buf.getvalue()
    path = atomic_write(out_path, data)
    nodes = proto.graph.node
    return ExportInfo(path, N, dtype, dynamic, tuple(inputs), tuple(outputs), len(nodes),
                      sum(n.op_type == "Loop" for n in nodes), hashlib.sha256(data).hexdigest())
