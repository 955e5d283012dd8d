"""ONNX Runtime as a backend: the torch twin exported to one ONNX graph, run by onnxruntime.

    >>> from weights_bridge import backends
    >>> ox = backends.twin("onnx")                      # this module, imported on first use
    >>> model = ox.build(spec, seed=0, dtype="float64")  # an OnnxModel; graphs exported on first use per N
    >>> out = ox.forward(model, ids, 4)                  # ModelOutput of NumPy arrays, the twins' fields
    >>> model = ox.OnnxModel.from_file("tiny.onnx", spec)  # a graph written by `mythos export onnx`

The graph (`export_model`; opset 18) takes
    ids            (B, T) int64
    force_halt     (B, T) int64       s in 1..N halts at step s, 0 never by threshold, -1 not forced
    force_experts  (N, B, T, k) int64 routed experts of step t (-1: not forced); k = 0 for a dense FFN
and returns logits (B, T, V), loop_counts (B, T) int32, halted (B, T) bool, n_steps () int32 and the
Traces fields state_norm, halt_p, cum_p, running, expert_idx, router_margin, each (N, B, T[, k]), then
values (B, T) and value (N, B, T) when the spec has a value head. N is fixed at export; B and T are
dynamic by default. The loop is the twin's torch.while_loop form (`model.loop_form = "while"`, equal to
the eager loop bit for bit), so ACT's early exit is one ONNX Loop; the routed experts run sparse (only
the chosen experts' products, gathered weights), so a dynamic graph has no dense fallback.

onnx, onnxruntime and onnxscript are imported only when a graph is exported or run
(`pip install 'mythos[onnx]'`); torch only to export.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

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


class Traces(NamedTuple):
    """The twins' Traces as NumPy arrays (N, B, T, ...); value None without a value head; attn_probs never."""
    state_norm: np.ndarray
    halt_p: np.ndarray
    cum_p: np.ndarray
    running: np.ndarray
    expert_idx: np.ndarray
    router_margin: np.ndarray
    value: np.ndarray | None = None
    attn_probs: np.ndarray | None = None


class ModelOutput(NamedTuple):
    """The twins' ModelOutput as NumPy arrays; n_steps an int; no cache."""
    logits: np.ndarray
    loop_counts: np.ndarray
    halted: np.ndarray
    n_steps: int
    traces: Traces
    cache: None = None
    values: np.ndarray | None = None


class ExportInfo(NamedTuple):
    """What export_model wrote."""
    path: Path
    n_loops: int
    dtype: str
    dynamic: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    n_nodes: int  # nodes of the main graph
    loop_nodes: int  # ONNX Loop nodes in it (1: the recurrent loop)
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


def _sort_stable():
    """aten.sort.stable as ONNX TopK over the whole axis: TopK puts the lower index first on ties, as the
    twins' stable sort does (torch.onnx has no translation of the stable sort)."""
    from onnxscript import opset18 as op

    def sort_stable(self, stable: bool | None = None, dim: int = -1, descending: bool = False):
        n = op.Shape(self, start=dim, end=dim + 1 if dim != -1 else None)  # (1,) the axis length
        values, indices = op.TopK(self, n, axis=dim, largest=1 if descending else 0, sorted=1)
        return values, indices

    return sort_stable


def _wrapper(model: object, N: int):
    """An nn.Module (ids, force_halt, force_experts) -> the flat outputs, through the twin's public forward."""
    import torch

    import mythos_torch as mt

    value_head = model.spec.value_head.enabled

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, force_halt: torch.Tensor,
                    force_experts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = mt.forward(self.model, ids, N, early_exit=True, force_halt=force_halt, force_experts=force_experts)
            tr = out.traces
            flat = (out.logits, out.loop_counts, out.halted, out.n_steps, *(getattr(tr, f) for f in TRACE_FIELDS))
            return flat + ((out.values, tr.value) if value_head else ())

    return Exported()


def export_model(model: object, out_path: str | os.PathLike, *, n_loops: int | None = None,
                 dynamic: Sequence[str] = DYNAMIC_AXES, example_shape: tuple[int, int] = (2, 8)) -> ExportInfo:
    """Export a mythos_torch model (float32 or float64) to an ONNX graph at out_path, written atomically.

    Args:
        model: a mythos_torch Mythos (its loop_form is switched to "while" for the export, then restored).
        out_path: the .onnx file (weights inside it).
        n_loops: loop steps N baked into the graph (None: recurrent.max_loop_iters).
        dynamic: axes left dynamic, a subset of ("batch", "seq"); () exports example_shape only.
        example_shape: (B, T) of the example input the export traces with (T capped at max_seq_len).
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
    k = s.moe.top_k if s.recurrent.ffn == "moe" else 0
    args = (torch.zeros(B, T, dtype=torch.int64), torch.full((B, T), -1, dtype=torch.int64),
            torch.full((N, B, T, k), -1, dtype=torch.int64))
    shapes = None
    if dynamic:
        b = torch.export.Dim("batch", min=1) if "batch" in dynamic else None
        t = torch.export.Dim("seq", min=1, max=s.max_seq_len) if "seq" in dynamic else None
        axes = {i: d for i, d in enumerate((b, t)) if d is not None}
        shapes = (axes, axes, {i + 1: d for i, d in axes.items()})
    outputs = OUTPUTS + (VALUE_OUTPUTS if s.value_head.enabled else ())
    form = model.loop_form
    model.loop_form = "while"  # the torch.while_loop form: ACT's early exit as one ONNX Loop
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _wrapper(model, N).eval(), args, input_names=list(INPUTS), output_names=list(outputs),
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
    return ExportInfo(path, N, dtype, dynamic, INPUTS, tuple(outputs), len(nodes),
                      sum(n.op_type == "Loop" for n in nodes), hashlib.sha256(data).hexdigest())


def _digest(spec: S.Spec, dtype: str, weights: Mapping[str, np.ndarray]) -> str:
    """sha256 of the spec, the dtype and every weight (name, shape, dtype, bytes): the export cache key."""
    h = hashlib.sha256(S.dump(spec).encode())
    h.update(dtype.encode())
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name])
        h.update(f"{name}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# exported graphs of this process: (weights digest, N) -> .onnx path in a temporary folder
_EXPORTED: dict[tuple[str, int], Path] = {}


class OnnxModel:
    """A Mythos model for onnxruntime: a spec, its weights (torch layout, NumPy) and one graph per loop count N.

    Built from a spec and weights (`build`: each N's graph is exported on first use, into a temporary
    folder, and shared by models with the same spec, dtype and weights), or from a written .onnx file
    (`from_file`: that graph's N only; no weights to dump).
    """

    def __init__(self, spec: S.Spec, dtype: str, weights: Mapping[str, np.ndarray] | None, *, threads: int = 0,
                 dynamic: Sequence[str] = DYNAMIC_AXES):
        self.spec = spec
        self.dtype = dtype
        self.weights = None if weights is None else dict(weights)
        self.threads = threads  # onnxruntime intra-op threads; 0: its default (all cores)
        self.dynamic = check_dynamic(dynamic)
        self.digest = None if weights is None else _digest(spec, dtype, self.weights)
        self.files: dict[int, Path] = {}  # N -> .onnx
        self._sessions: dict[int, object] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike, spec: S.Spec, *, threads: int = 0) -> "OnnxModel":
        """A graph written by export_model / `mythos export onnx`, with the spec it was exported from."""
        require("onnx", "onnxruntime")
        import onnx

        path = Path(path)
        if not path.is_file():
            raise BridgeError(f"ONNX file {str(path)!r} does not exist" if not path.exists()
                              else f"ONNX file {str(path)!r} is not a regular file")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # a truncated or foreign file: protobuf's DecodeError and others
            raise BridgeError(f"{str(path)!r} is not an ONNX model: {e}") from None
        inputs = {i.name: i for i in proto.graph.input}
        outputs = [o.name for o in proto.graph.output]
        if tuple(inputs) != INPUTS or tuple(outputs[:len(OUTPUTS)]) != OUTPUTS:
            raise BridgeError(f"{str(path)!r} is not a Mythos graph: inputs {list(inputs)}, outputs {outputs} "
                              f"(expected inputs {list(INPUTS)} and outputs starting {list(OUTPUTS)})")
        N = inputs["force_experts"].type.tensor_type.shape.dim[0].dim_value
        elem = proto.graph.output[0].type.tensor_type.elem_type
        dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}.get(elem)
        if dtype is None or N < 1:
            raise BridgeError(f"{str(path)!r}: logits of ONNX type {elem}, N={N}: not a Mythos graph")
        if (len(outputs) > len(OUTPUTS)) != spec.value_head.enabled:
            raise BridgeError(f"{str(path)!r} and the spec disagree about the value head "
                              f"(spec value_head.enabled={spec.value_head.enabled})")
        model = cls(spec, dtype, None, threads=threads)
        model.files[N] = path
        return model

    def file(self, N: int) -> Path:
        """The .onnx graph for N loop steps (exported now if this model has weights and none exists yet)."""
        if N in self.files:
            return self.files[N]
        if self.weights is None:
            raise BridgeError(f"this ONNX model was loaded from {', '.join(map(str, self.files.values()))}, "
                              f"exported for n_loops={', '.join(map(str, self.files))}; it cannot run n_loops={N} "
                              "(export another graph with `mythos export onnx --loops`)")
        key = (self.digest, N)
        if key not in _EXPORTED or not _EXPORTED[key].is_file():
            import mythos_torch as mt

            torch_model = mt.build(self.spec, dtype=self.dtype, weights=self.weights)
            folder = Path(tempfile.mkdtemp(prefix="mythos-onnx-"))
            atexit.register(shutil.rmtree, folder, True)  # the process's exports go when it ends
            _EXPORTED[key] = export_model(torch_model, folder / f"mythos-N{N}.onnx", n_loops=N,
                                          dynamic=self.dynamic).path
        self.files[N] = _EXPORTED[key]
        return self.files[N]

    def session(self, N: int) -> object:
        """The onnxruntime InferenceSession of N's graph (CPU provider; threads as set), made once."""
        if N not in self._sessions:
            require("onnxruntime")
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # errors only
            self._sessions[N] = ort.InferenceSession(str(self.file(N)), opts, providers=["CPUExecutionProvider"])
        return self._sessions[N]


def build(spec: S.Spec, seed: int = 0, dtype: str = "float32",
          weights: Mapping[str, np.ndarray] | None = None) -> OnnxModel:
    """An OnnxModel holding spec.init_arrays(spec, seed) or weights (torch layout, as the twins' build)."""
    if dtype not in DTYPES:
        raise BridgeError(f"dtype={dtype!r} is not supported by the ONNX backend; choose one of {', '.join(DTYPES)}")
    arrays = S.init_arrays(spec, seed) if weights is None else weights
    # in the model dtype, as the twins hold them (router_bias too: its acc dtype is the model dtype here)
    return OnnxModel(spec, dtype, {k: np.asarray(v).astype(dtype) for k, v in arrays.items()})


def forward(model: OnnxModel, ids: np.ndarray, n_loops: int | None = None, *, early_exit: bool = True,
            force_halt: np.ndarray | None = None, force_experts: np.ndarray | None = None) -> ModelOutput:
    """The twins' forward on onnxruntime: ids (B, T) -> ModelOutput of NumPy arrays (no cache, no attn_probs).

    early_exit is accepted for the twins' signature: the graph always exits early, which gives the same
    results (rows of steps not run hold the fill values either way). force_halt (B, T) and
    force_experts (N, B, T, k) as in the twins (-1: not forced).
    """
    s = model.spec
    N = s.recurrent.max_loop_iters if n_loops is None else check_loops(n_loops)
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be an integer array of shape (B, T) with T >= 1, got {ids.dtype} {ids.shape}")
    B, T = ids.shape
    if T > s.max_seq_len:
        raise ValueError(f"ids has T={T} tokens, more than max_seq_len={s.max_seq_len}")
    if ids.size and (ids.min() < 0 or ids.max() >= s.vocab_size):
        raise ValueError(f"ids must lie in [0, vocab_size={s.vocab_size}), got values in [{ids.min()}, {ids.max()}]")
    k = s.moe.top_k if s.recurrent.ffn == "moe" else 0
    fh = np.full((B, T), -1, np.int64) if force_halt is None else np.asarray(force_halt).astype(np.int64)
    fe = np.full((N, B, T, k), -1, np.int64) if force_experts is None else np.asarray(force_experts).astype(np.int64)
    if fh.shape != (B, T):
        raise ValueError(f"force_halt must have shape (B, T) = {(B, T)}, got {fh.shape}")
    if fh.size and (fh.min() < -1 or fh.max() > N):
        raise ValueError(f"force_halt values must lie in -1..N={N}, got [{fh.min()}, {fh.max()}]")
    if fe.shape != (N, B, T, k):
        raise ValueError(f"force_experts must have shape (N, B, T, k) = {(N, B, T, k)}, got {fe.shape}")
    if fe.size and (fe.min() < -1 or fe.max() >= s.moe.n_experts):
        raise ValueError(f"force_experts must name experts in 0..{s.moe.n_experts - 1} (or -1), got "
                         f"[{fe.min()}, {fe.max()}]")
    sess = model.session(N)
    dyn = model.dynamic if model.weights is not None else None
    try:
        got = sess.run(None, {"ids": ids.astype(np.int64), "force_halt": fh, "force_experts": fe})
    except Exception as e:  # onnxruntime's errors name the input shape the graph refused
        raise ValueError(f"onnxruntime refused the call (a graph exported with dynamic axes {dyn}; "
                         f"B={B}, T={T}): {e}") from None
    logits, counts, halted, n_steps, *rest = got
    traces = Traces(*rest[:len(TRACE_FIELDS)], value=rest[len(TRACE_FIELDS) + 1] if s.value_head.enabled else None)
    values = rest[len(TRACE_FIELDS)] if s.value_head.enabled else None
    return ModelOutput(logits, counts, halted, int(n_steps), traces, None, values)


def dump_arrays(model: OnnxModel) -> dict[str, np.ndarray]:
    """The weights the model was built from (torch layout, NumPy, in the model dtype), as the twins' dump_arrays."""
    if model.weights is None:
        raise BridgeError("this ONNX model was loaded from a graph file; it holds no weights to dump")
    return dict(model.weights)


def set_parity_precision() -> None:
    """Nothing to switch: onnxruntime runs float64 graphs in float64 and float32 without TF32 on the CPU."""
