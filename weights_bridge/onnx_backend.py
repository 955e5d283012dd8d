"""ONNX Runtime as a backend: the torch twin exported to ONNX graphs (weights_bridge.onnx_export), run by onnxruntime.

    >>> from weights_bridge import backends
    >>> ox = backends.twin("onnx")                      # this module, imported on first use
    >>> model = ox.build(spec, seed=0, dtype="float64")  # an OnnxModel; graphs exported on first use per N
    >>> out = ox.forward(model, ids, 4)                  # ModelOutput of NumPy arrays, the twins' fields
    >>> tokens = ox.generate(model, ids, 16, 4)          # the decode-step graph with its KV cache, host sampling
    >>> model = ox.OnnxModel.from_file("tiny.onnx", spec)  # a graph written by `mythos export onnx [--cache]`

Two graphs per loop count N (onnx_export has their inputs and outputs): the full-sequence graph
(`forward`: ACT's early exit as one ONNX Loop, forced decisions for replay) and the decode-step graph
(`decode`, `generate`: past_*/present_* cache arrays). generate samples on the host with
spec.sampling.sample_next, the twins' code, so the same seed gives the twins' tokens when the logits agree.

onnx, onnxruntime and onnxscript are imported only when a graph is exported or run
(`pip install 'mythos[onnx]'`); torch only to export.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path
import os
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

import spec as S
from spec.sampling import check_generate, sample_next

from .fileformat import BridgeError
from .onnx_export import (DTYPES, DYNAMIC_AXES, INPUTS, OUTPUTS, PAST, PRESENT, TRACE_FIELDS, VALUE_OUTPUTS,
                          ExportInfo, cache_names, check_cache_spec, check_dynamic, check_loops, decode_inputs,
                          export_model, require)

__all__ = ["DTYPES", "DYNAMIC_AXES", "INPUTS", "OUTPUTS", "TRACE_FIELDS", "VALUE_OUTPUTS", "ExportInfo", "require",
           "check_dynamic", "check_loops", "export_model", "Traces", "ModelOutput", "OnnxModel", "build", "forward",
           "init_cache", "decode", "generate", "dump_arrays", "set_parity_precision"]


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
    """The twins' ModelOutput as NumPy arrays; n_steps an int; cache: the present arrays of a decode call, or None."""
    logits: np.ndarray
    loop_counts: np.ndarray
    halted: np.ndarray
    n_steps: int
    traces: Traces
    cache: dict[str, np.ndarray] | None = None
    values: np.ndarray | None = None


def _digest(spec: S.Spec, dtype: str, weights: Mapping[str, np.ndarray]) -> str:
    """sha256 of the spec, the dtype and every weight (name, shape, dtype, bytes): the export cache key."""
    h = hashlib.sha256(S.dump(spec).encode())
    h.update(dtype.encode())
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name])
        h.update(f"{name}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# exported graphs of this process: (weights digest, N, cache) -> .onnx path in a temporary folder
_EXPORTED: dict[tuple[str, int, bool], Path] = {}


class OnnxModel:
    """A Mythos model for onnxruntime: a spec, its weights (torch layout, NumPy) and two graphs per loop count N,
    the full-sequence graph (cache=False) and the decode-step graph (cache=True).

    Built from a spec and weights (`build`: each graph is exported on first use, into a temporary folder,
    and shared by models with the same spec, dtype and weights), or from a written .onnx file
    (`from_file`: that graph only, full or decode step; no weights to dump).
    """

    def __init__(self, spec: S.Spec, dtype: str, weights: Mapping[str, np.ndarray] | None, *, threads: int = 0,
                 dynamic: Sequence[str] = DYNAMIC_AXES):
        self.spec = spec
        self.dtype = dtype
        self.weights = None if weights is None else dict(weights)
        self.threads = threads  # onnxruntime intra-op threads; 0: its default (all cores)
        self.dynamic = check_dynamic(dynamic)
        self.digest = None if weights is None else _digest(spec, dtype, self.weights)
        self.files: dict[tuple[int, bool], Path] = {}  # (N, cache) -> .onnx
        self._sessions: dict[tuple[int, bool], object] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike, spec: S.Spec, *, threads: int = 0) -> "OnnxModel":
        """A graph written by export_model / `mythos export onnx [--cache]`, with the spec it was exported from."""
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
        cache = tuple(inputs) == decode_inputs(spec)
        if (tuple(inputs) != INPUTS and not cache) or tuple(outputs[:len(OUTPUTS)]) != OUTPUTS:
            raise BridgeError(f"{str(path)!r} is not a Mythos graph of this spec: inputs {list(inputs)}, outputs "
                              f"{outputs} (expected inputs {list(INPUTS)} or, a decode step, "
                              f"{list(decode_inputs(spec))}, and outputs starting {list(OUTPUTS)})")
        # N: the leading axis of force_experts (N, B, T, k), or of the state norms (N, B, T) of a decode step
        dims = inputs["force_experts"].type if not cache else proto.graph.output[OUTPUTS.index("state_norm")].type
        N = dims.tensor_type.shape.dim[0].dim_value
        elem = proto.graph.output[0].type.tensor_type.elem_type
        dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}.get(elem)
        if dtype is None or N < 1:
            raise BridgeError(f"{str(path)!r}: logits of ONNX type {elem}, N={N}: not a Mythos graph")
        if (VALUE_OUTPUTS[0] in outputs) != spec.value_head.enabled:
            raise BridgeError(f"{str(path)!r} and the spec disagree about the value head "
                              f"(spec value_head.enabled={spec.value_head.enabled})")
        model = cls(spec, dtype, None, threads=threads)
        model.files[N, cache] = path
        return model

    def file(self, N: int, cache: bool = False) -> Path:
        """The .onnx graph for N loop steps, full or decode step (exported now if this model has weights)."""
        if (N, cache) in self.files:
            return self.files[N, cache]
        if self.weights is None:
            kind = "decode-step graph" if cache else "full-sequence graph"
            held = ", ".join(f"n_loops={n}{' (decode step)' if c else ''}" for n, c in self.files)
            raise BridgeError(f"this ONNX model was loaded from {', '.join(map(str, self.files.values()))} ({held}); "
                              f"it has no {kind} for n_loops={N} (export one with `mythos export onnx --loops {N}"
                              f"{' --cache' if cache else ''}`)")
        if cache:
            check_cache_spec(self.spec)
        key = (self.digest, N, cache)
        if key not in _EXPORTED or not _EXPORTED[key].is_file():
            import mythos_torch as mt

            torch_model = mt.build(self.spec, dtype=self.dtype, weights=self.weights)
            folder = Path(tempfile.mkdtemp(prefix="mythos-onnx-"))
            atexit.register(shutil.rmtree, folder, True)  # the process's exports go when it ends
            name = f"mythos-N{N}{'-step' if cache else ''}.onnx"
            _EXPORTED[key] = export_model(torch_model, folder / name, n_loops=N, dynamic=self.dynamic,
                                          cache=cache).path
        self.files[N, cache] = _EXPORTED[key]
        return self.files[N, cache]

    def session(self, N: int, cache: bool = False) -> object:
        """The onnxruntime InferenceSession of a graph (CPU provider; threads as set), made once."""
        if (N, cache) not in self._sessions:
            require("onnxruntime")
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # errors only
            self._sessions[N, cache] = ort.InferenceSession(str(self.file(N, cache)), opts,
                                                            providers=["CPUExecutionProvider"])
        return self._sessions[N, cache]


def build(spec: S.Spec, seed: int = 0, dtype: str = "float32",
          weights: Mapping[str, np.ndarray] | None = None, *, threads: int = 0) -> OnnxModel:
    """An OnnxModel holding spec.init_arrays(spec, seed) or weights (torch layout, as the twins' build);
    threads: onnxruntime's intra-op threads (0: its default, every core)."""
    if dtype not in DTYPES:
        raise BridgeError(f"dtype={dtype!r} is not supported by the ONNX backend; choose one of {', '.join(DTYPES)}")
    arrays = S.init_arrays(spec, seed) if weights is None else weights
    # in the model dtype, as the twins hold them (router_bias too: its acc dtype is the model dtype here)
    return OnnxModel(spec, dtype, {k: np.asarray(v).astype(dtype) for k, v in arrays.items()}, threads=threads)


def forward(model: OnnxModel, ids: np.ndarray, n_loops: int | None = None, *, early_exit: bool = True,
            force_halt: np.ndarray | None = None, force_experts: np.ndarray | None = None) -> ModelOutput:
    """The twins' forward on onnxruntime: ids (B, T) -> ModelOutput of NumPy arrays (no cache, no attn_probs).

    early_exit is accepted for the twins' signature: the graph always exits early, which gives the same
    results (rows of steps not run hold the fill values either way). force_halt (B, T) and
    force_experts (N, B, T, k) as in the twins (-1: not forced).
    """
    s = model.spec
    N = s.recurrent.max_loop_iters if n_loops is None else check_loops(n_loops)
    ids = _check_ids(s, ids)
    B, T = ids.shape
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
    got = _run(model, N, False, {"ids": ids, "force_halt": fh, "force_experts": fe})
    return _output(s, got, None)


def init_cache(model: OnnxModel, batch: int, n_loops: int | None = None) -> dict[str, np.ndarray]:
    """The empty cache of the decode-step graph: past_<name> arrays holding no position (axis 2 of length 0)."""
    N = model.spec.recurrent.max_loop_iters if n_loops is None else check_loops(n_loops)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"init_cache: batch={batch!r} must be an integer >= 1")
    return {n: np.zeros(shape, model.dtype) for n, shape in S.cache_shapes(model.spec, int(batch), 0, N).items()}


def decode(model: OnnxModel, ids: np.ndarray, n_loops: int | None, cache: Mapping[str, np.ndarray]) -> ModelOutput:
    """The decode-step graph: ids (B, T) at positions P..P+T-1 after the cache's P -> ModelOutput whose
    `cache` holds positions 0..P+T-1 (the twins' cached forward: every loop step runs)."""
    s = model.spec
    N = s.recurrent.max_loop_iters if n_loops is None else check_loops(n_loops)
    ids = _check_ids(s, ids)
    names = cache_names(s)
    if set(cache) != set(names):
        raise ValueError(f"cache must hold the arrays {', '.join(names)} (init_cache), got {', '.join(cache) or 'none'}")
    P = next(iter(cache.values())).shape[2]
    if P + ids.shape[1] > s.max_seq_len:
        raise ValueError(f"positions {P}..{P + ids.shape[1] - 1} exceed max_seq_len={s.max_seq_len}")
    got = _run(model, N, True, {"ids": ids, **{PAST + n: np.asarray(cache[n]) for n in names}})
    n_out = len(got) - len(names)
    return _output(s, got[:n_out], dict(zip(names, got[n_out:])))


def generate(model: OnnxModel, ids: np.ndarray, max_new_tokens: int, n_loops: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, *, on_token: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """The twins' generate on the decode-step graph: a prefill (P = 0), then one token per step, sampled
    on the host by spec.sampling.sample_next; the twins' arguments and result ((B, T + max_new_tokens) int64)."""
    s = model.spec
    N = s.recurrent.max_loop_iters if n_loops is None else check_loops(n_loops)
    ids = _check_ids(s, ids)
    B, T = ids.shape
    check_generate(s, T, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
    if max_new_tokens == 0:
        return ids
    rng = np.random.default_rng(seed)
    done = np.zeros(B, dtype=bool)
    new: list[np.ndarray] = []
    out = decode(model, ids, N, init_cache(model, B, N))  # prefill
    for _ in range(max_new_tokens):
        tok = sample_next(out.logits[:, -1].astype(np.float64), rng, temperature, top_k, top_p)  # (B,)
        if eos_id is not None:
            tok = np.where(done, eos_id, tok)
            done |= tok == eos_id
        new.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(new) == max_new_tokens or done.all():
            break
        out = decode(model, tok[:, None], N, out.cache)
    tail = np.full((B, max_new_tokens), -1 if eos_id is None else eos_id, dtype=np.int64)
    tail[:, :len(new)] = np.stack(new, axis=1)
    return np.concatenate([ids, tail], axis=1)


def _check_ids(s: S.Spec, ids: np.ndarray) -> np.ndarray:
    """ids as a (B, T) int64 array within the vocabulary and max_seq_len, or a clear ValueError."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be an integer array of shape (B, T) with T >= 1, got {ids.dtype} {ids.shape}")
    if ids.shape[1] > s.max_seq_len:
        raise ValueError(f"ids has T={ids.shape[1]} tokens, more than max_seq_len={s.max_seq_len}")
    if ids.size and (ids.min() < 0 or ids.max() >= s.vocab_size):
        raise ValueError(f"ids must lie in [0, vocab_size={s.vocab_size}), got values in [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64)


def _run(model: OnnxModel, N: int, cache: bool, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """sess.run of one graph; onnxruntime's refusal (a shape the graph does not take) as a ValueError."""
    sess = model.session(N, cache)
    try:
        return sess.run(None, feed)
    except Exception as e:  # onnxruntime's errors name the input shape the graph refused
        dyn = model.dynamic if model.weights is not None else None
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feed.items())
        raise ValueError(f"onnxruntime refused the call (a graph exported with dynamic axes {dyn}; {shapes}): "
                         f"{e}") from None


def _output(s: S.Spec, got: Sequence[np.ndarray], cache: dict[str, np.ndarray] | None) -> ModelOutput:
    """The graph's flat outputs (OUTPUTS, then VALUE_OUTPUTS with a value head) as a ModelOutput."""
    logits, counts, halted, n_steps, *rest = got
    traces = Traces(*rest[:len(TRACE_FIELDS)], value=rest[len(TRACE_FIELDS) + 1] if s.value_head.enabled else None)
    values = rest[len(TRACE_FIELDS)] if s.value_head.enabled else None
    return ModelOutput(logits, counts, halted, int(n_steps), traces, cache, values)


def dump_arrays(model: OnnxModel) -> dict[str, np.ndarray]:
    """The weights the model was built from (torch layout, NumPy, in the model dtype), as the twins' dump_arrays."""
    if model.weights is None:
        raise BridgeError("this ONNX model was loaded from a graph file; it holds no weights to dump")
    return dict(model.weights)


def set_parity_precision() -> None:
    """Nothing to switch: onnxruntime runs float64 graphs in float64 and float32 without TF32 on the CPU."""
