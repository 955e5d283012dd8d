"""Helpers shared by the tests: NumPy conversion, error reports, and each twin behind one small interface.

`TorchTwin` and `JaxTwin` have the same methods, each written for its framework (a short function
repeated per twin, STYLE 18). They use only the twins' public API and the documented parameter layout
(docs/design.md "Parameters": nnx.Linear `kernel` = torch `weight.T`, nnx.Embed `embedding` = torch
`weight`). A twin is imported when a test first asks for it (`twin(name)`), and its parity precision
switch is turned on then, before the test creates any array (float64 JAX needs jax_enable_x64 first).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import ml_dtypes
import numpy as np

import spec as S

TWIN_NAMES = ("torch", "jax")


# --------------------------------------------------------------------------- NumPy views and reports


def to_numpy(x: Any) -> Any:
    """A torch tensor or JAX array as NumPy in its own dtype (bfloat16 as ml_dtypes.bfloat16, same bits);
    Python scalars and None pass through."""
    if x is None or isinstance(x, (bool, int, float)):
        return x
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(x)


def as_float64(x: Any) -> np.ndarray:
    """to_numpy, with floating values (bfloat16 too) widened to float64; other dtypes as they are."""
    a = np.asarray(to_numpy(x))
    return a.astype(np.float64) if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16 else a


def tree_to_numpy(x: Any) -> Any:
    """to_numpy over NamedTuples (ModelOutput, Traces, Route, ...), tuples, lists and dicts; other objects
    (a torch KVCache) pass through."""
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(tree_to_numpy(v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(tree_to_numpy(v) for v in x)
    if isinstance(x, dict):
        return {k: tree_to_numpy(v) for k, v in x.items()}
    if type(x).__module__.startswith(("torch", "jax", "jaxlib", "numpy")) or isinstance(x, (bool, int, float)):
        return to_numpy(x)
    return x


def report(name: str, a: Any, b: Any) -> float:
    """Print the max and mean absolute difference of a and b (as float64) and return the max."""
    d = np.abs(as_float64(a) - as_float64(b))
    if d.size == 0:
        print(f"{name}: empty")
        return 0.0
    print(f"{name}: max abs error {d.max():.3e}, mean {d.mean():.3e}")
    return float(d.max())


# --------------------------------------------------------------------------- specs and inputs


def tiny(**overrides: object) -> S.Spec:
    """The tiny preset with dotted-path overrides, e.g. tiny(**{"attention.type": "mla"})."""
    return S.load("tiny", overrides=overrides)


def ids_for(seed: int, B: int = 2, T: int = 12, V: int = 64) -> np.ndarray:
    """(B, T) int64 token ids below V, from numpy.random.default_rng(seed)."""
    return np.random.default_rng(seed).integers(0, V, (B, T))


# --------------------------------------------------------------------------- the twins


@functools.cache
def twin(name: str) -> TorchTwin | JaxTwin:
    """The twin called name ("torch" or "jax"), imported (and its precision switch set) on first use."""
    if name == "torch":
        return TorchTwin()
    if name == "jax":
        return JaxTwin()
    raise ValueError(f"twin must be one of {TWIN_NAMES}, got {name!r}")


def _tree_map(f: Callable[[Any], Any], x: Any) -> Any:
    """f over the array leaves of NamedTuples, tuples and lists (None and Python scalars pass)."""
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_tree_map(f, v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_tree_map(f, v) for v in x)
    return x if x is None or isinstance(x, (bool, int, float)) else f(x)


class TorchTwin:
    """mythos_torch behind the shared interface: NumPy in, NumPy out (under torch.no_grad)."""

    name = "torch"
    call_method = "forward"  # the method nn.Module.__call__ runs

    def __init__(self) -> None:
        import torch

        import mythos_torch

        mythos_torch.set_parity_precision()
        self.torch, self.pkg = torch, mythos_torch
        self.dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

    def __repr__(self) -> str:
        return "torch"

    def array(self, a: Any) -> Any:
        """A NumPy array (or nested tuple of them) as torch tensors; tensors, scalars and None pass."""
        if isinstance(a, np.ndarray):
            return self.torch.from_numpy(np.ascontiguousarray(a))
        if isinstance(a, tuple):
            return tuple(self.array(v) for v in a)
        return a

    def build(self, spec: S.Spec, seed: int = 0, dtype: str = "float64",
              weights: dict[str, np.ndarray] | None = None) -> Any:
        return self.pkg.build(spec, seed, dtype, weights=weights)

    def forward(self, m: Any, ids: np.ndarray, n_loops: int | None = None, **kw: Any) -> Any:
        """mythos_torch.forward on NumPy inputs; the ModelOutput as NumPy."""
        with self.torch.no_grad():
            out = self.pkg.forward(m, self.array(ids), n_loops, **{k: self.array(v) for k, v in kw.items()})
        return tree_to_numpy(out)

    def call(self, m: Any, ids: np.ndarray, n_loops: int | None = None, **kw: Any) -> Any:
        """The module call m(ids, ...) on NumPy inputs; the ModelOutput as NumPy."""
        with self.torch.no_grad():
            out = m(self.array(ids), n_loops, **{k: self.array(v) for k, v in kw.items()})
        return tree_to_numpy(out)

    def grads(self, m: Any, loss: Callable[[Any], Any], ids: np.ndarray, n_loops: int | None = None,
              **kw: Any) -> tuple[float, dict[str, np.ndarray | None]]:
        """loss(m(ids, ...)) and its gradient per parameter, keyed by manifest path (torch layout; None: no gradient)."""
        m.zero_grad(set_to_none=True)
        value = loss(m(self.array(ids), n_loops, **{k: self.array(v) for k, v in kw.items()}))
        value.backward()
        grads = {n: None if p.grad is None else to_numpy(p.grad) for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        return float(value.detach()), grads

    def stop_gradient_if(self, cond: bool, tree: Any) -> Any:
        """tree with every tensor detached when cond (a Python bool: the torch loop is a Python loop)."""
        return _tree_map(lambda x: x.detach() if isinstance(x, self.torch.Tensor) else x, tree) if cond else tree

    def module(self, cls: str, *args: Any, dtype: str = "float64") -> Any:
        """A twin module, e.g. module("LoRA", 6, 3, 4); its values are set by the test (set_values)."""
        return getattr(self.pkg, cls)(*args, dtype=self.dtypes[dtype])

    def set_values(self, module: Any, arrays: dict[str, np.ndarray]) -> None:
        """Copy arrays (torch layout, keyed by the module's state-dict names) into the module, cast to its dtypes."""
        named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        with self.torch.no_grad():
            for path, a in arrays.items():
                t = named[path]
                assert tuple(t.shape) == np.shape(a), f"{path}: {tuple(t.shape)} vs {np.shape(a)}"
                t.copy_(self.torch.as_tensor(np.asarray(a)))

    def get_value(self, module: Any, path: str) -> np.ndarray:
        """The value under a state-dict name of the module, torch layout, as NumPy."""
        return to_numpy({**dict(module.named_parameters()), **dict(module.named_buffers())}[path])

    def shape(self, module: Any, path: str) -> tuple[int, ...]:
        """The torch-layout shape of the value under a state-dict name of the module."""
        return tuple({**dict(module.named_parameters()), **dict(module.named_buffers())}[path].shape)

    def apply(self, module: Any, *args: Any) -> Any:
        """module(*args) on NumPy inputs (None and Python scalars pass), the outputs as NumPy."""
        with self.torch.no_grad():
            return tree_to_numpy(module(*(self.array(a) for a in args)))


class JaxTwin:
    """mythos_jax behind the shared interface: NumPy in, NumPy out; forwards through the compiled
    mythos_jax.forward, module calls through one nnx.jit (compiled once per module structure and shapes)."""

    name = "jax"
    call_method = "__call__"

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import mythos_jax

        mythos_jax.set_parity_precision()  # before any array: float64 needs jax_enable_x64
        self.jax, self.jnp, self.nnx, self.pkg = jax, jnp, nnx, mythos_jax
        self.dtypes = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}
        self._apply = nnx.jit(lambda module, *args: module(*args))

    def __repr__(self) -> str:
        return "jax"

    def array(self, a: Any) -> Any:
        """A NumPy array (or nested tuple of them) as JAX arrays; other values pass."""
        if isinstance(a, np.ndarray):
            return self.jnp.asarray(a)
        if isinstance(a, tuple):
            return tuple(self.array(v) for v in a)
        return a

    def build(self, spec: S.Spec, seed: int = 0, dtype: str = "float64",
              weights: dict[str, np.ndarray] | None = None) -> Any:
        return self.pkg.build(spec, seed, dtype, weights=weights)

    def forward(self, m: Any, ids: np.ndarray, n_loops: int | None = None, **kw: Any) -> Any:
        """The compiled mythos_jax.forward on NumPy inputs (passed as they are); the ModelOutput as NumPy."""
        return tree_to_numpy(self.pkg.forward(m, ids, n_loops, **kw))

    def call(self, m: Any, ids: np.ndarray, n_loops: int | None = None, **kw: Any) -> Any:
        """The eager module call m(ids, ...); the ModelOutput as NumPy."""
        return tree_to_numpy(m(self.jnp.asarray(ids), n_loops, **{k: self.array(v) for k, v in kw.items()}))

    def grads(self, m: Any, loss: Callable[[Any], Any], ids: np.ndarray, n_loops: int | None = None,
              **kw: Any) -> tuple[float, dict[str, np.ndarray | None]]:
        """loss(m(ids, ...)) and its gradient per nnx.Param, keyed by manifest path in torch layout (through
        dump_arrays of a model holding the gradients; router_bias, not a parameter, is left out)."""
        nnx = self.nnx
        kw = {k: self.array(v) for k, v in kw.items()}
        # ids an argument of the jit, not a constant of it: the model checks concrete ids outside any jit only
        value, g = nnx.jit(nnx.value_and_grad(lambda m, ids: loss(m(ids, n_loops, **kw))))(m, self.jnp.asarray(ids))
        graphdef, _, rest = nnx.split(m, nnx.Param, ...)
        grads = self.pkg.dump_arrays(nnx.merge(graphdef, g, rest))
        buffers = {p.path for p in S.manifest(m.spec) if p.kind == "buffer"}
        return float(value), {k: v for k, v in grads.items() if k not in buffers}

    def stop_gradient_if(self, cond: Any, tree: Any) -> Any:
        """tree with every floating array through stop_gradient where cond (traced: the loop is a scan)."""
        jnp, lax = self.jnp, self.jax.lax

        def f(x: Any) -> Any:
            return jnp.where(cond, lax.stop_gradient(x), x) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return _tree_map(f, tree)

    def module(self, cls: str, *args: Any, dtype: str = "float64") -> Any:
        """A twin module built without running its initialisers (each would compile): set every value (set_values)."""
        nnx = self.nnx
        return nnx.eval_shape(lambda: getattr(self.pkg, cls)(*args, dtype=self.dtypes[dtype], rngs=nnx.Rngs(0)))

    def set_values(self, module: Any, arrays: dict[str, np.ndarray]) -> None:
        """Set arrays given in torch layout under torch state-dict names (`router.weight`, `shared_experts.0.up.weight`)
        into the module, cast to its dtypes: an nnx.Linear's `weight` is its kernel transposed."""
        for path, a in arrays.items():
            var, transposed = self._variable(module, path)
            a = np.asarray(a).T if transposed else np.asarray(a)
            want = var.get_value()
            assert tuple(want.shape) == a.shape, f"{path}: {tuple(want.shape)} vs {a.shape}"
            var.set_value(self.jnp.asarray(a, dtype=want.dtype))

    def get_value(self, module: Any, path: str) -> np.ndarray:
        """The value under a torch state-dict name of the module, torch layout, as NumPy."""
        var, transposed = self._variable(module, path)
        a = to_numpy(var.get_value())
        return a.T if transposed else a

    def shape(self, module: Any, path: str) -> tuple[int, ...]:
        """The torch-layout shape of the value under a torch state-dict name (abstract modules too)."""
        var, transposed = self._variable(module, path)
        shape = tuple(var.get_value().shape)
        return shape[::-1] if transposed else shape

    def _variable(self, module: Any, path: str) -> tuple[Any, bool]:
        """The nnx.Variable under a torch state-dict name, and whether it holds the torch array transposed."""
        nnx = self.nnx
        *mods, leaf = path.split(".")
        obj = module
        for p in mods:
            obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
        if isinstance(obj, nnx.Linear) and leaf == "weight":
            return obj.kernel, True  # torch [out, in] vs nnx [in, out]
        if isinstance(obj, nnx.Embed) and leaf == "weight":
            return obj.embedding, False
        return getattr(obj, leaf), False

    def apply(self, module: Any, *args: Any) -> Any:
        """module(*args), compiled (NumPy inputs; None passes), the outputs as NumPy."""
        return tree_to_numpy(self._apply(module, *(self.array(a) for a in args)))


def spread_halting(s: S.Spec, ids: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """spec.init_arrays(s, seed) with the halting head x40 and its bias centred on ids (B, T) (the torch twin,
    float64, every step run), so ACT loop counts spread over positions instead of all halting at one step."""
    import torch

    import mythos_torch as mt

    w = S.init_arrays(s, seed)
    w["recurrent.act.halt.weight"] = w["recurrent.act.halt.weight"] * 40.0
    with torch.no_grad():
        out = mt.build(s, seed, "float64", weights=w)(torch.from_numpy(np.asarray(ids)), early_exit=False)
    w["recurrent.act.halt.bias"] = w["recurrent.act.halt.bias"] - float(torch.logit(out.traces.halt_p).mean()) - 0.5
    return w
