"""Forward and forward+backward speed: open-mythos 0.5.0 vs the torch twin vs the JAX twin (vs ONNX Runtime, forward only).

    .venv/bin/python bench/forward.py                       # all three presets, 9 timed rounds
    .venv/bin/python bench/forward.py --quick               # smoke run (< 1 min): bench-s-gqa, 1 x 64 tokens, 1 round
    .venv/bin/python bench/forward.py --presets bench-m-moe64 --repeats 7 --json out.json

One process, one set of weights per preset: open-mythos' own model is built (seeded), its halting
head is set so that every position runs all N = 8 loop steps (zero weight, bias -30: p ~ 1e-13),
and weights_bridge.from_open_mythos imports it into both twins. All three then execute the same 8
loop steps on the same token ids (checked: open-mythos through a hook on its halting head, the
twins through n_steps), so the ratios compare equal work. The ACT check uses a second copy whose
halting bias is 0 (p = 0.5: every position halts at step 2) and compares it with the 8-step one.

Timing: wall clock, float32, no_grad for the torch forwards; medians over `--repeats` rounds after
`--warmup` rounds; in each round every measurement runs once, in the same order (so machine noise
hits all of them alike). JAX compile time is excluded from the timings and reported on its own.
Torch runs with 2 intra-op threads (bench.common.TORCH_THREADS); XLA's CPU client uses one thread
per core (2 here). "onnx" (with the [onnx] extra; --no-onnx skips it) is the torch twin's exported
graph (weights_bridge.onnx_backend: ACT's early exit as one ONNX Loop) in onnxruntime with
bench.common.TORCH_THREADS intra-op threads, the same weights and ids: forward and halt@2 only (a
runtime has no backward); its export time is reported beside JAX's compile time. See
docs/benchmarks.md for what each column means.

Issue 18, in the same rounds: the bfloat16 forwards (open-mythos under torch.autocast, both twins built
in bfloat16), the forward with ACT as configured (open-mythos' own seeded halting head, a third copy),
the twins' forward with force_halt = k (k = 1..N: ACT linearity, fitted, with the halt@2 check), and
after the rounds the roofline of this forward (bench/roofline.py: every GEMM shape timed alone in each
framework and dtype, plus the non-GEMM memory traffic at a measured copy bandwidth), printed as
roofline / time beside the ratios to open-mythos. "torch compiled" is the torch twin through
mythos_torch.compiled_forward (torch.compile; float32 and bfloat16, all N steps, in the same rounds; its
first-call compile time and its logits against the eager twin's are reported; --no-compile skips it).
"jax autocast" is the float32 JAX twin through mythos_jax.forward(..., autocast=True): bfloat16 matmul
operands with float32 sums, float32 everywhere else (on the bf16 roofline, whose GEMMs it runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/forward.py` from anywhere

from bench import common as C  # noqa: E402

import numpy as np  # noqa: E402
import spec as spec_lib  # noqa: E402

N_LOOPS = 8
IMPLS = ("open-mythos", "torch", "jax", "onnx")  # onnx: forward only, when the [onnx] extra is installed
QUICK_SHAPE = (1, 64)


@dataclass
class PresetResult:
    """Everything measured for one preset (times in seconds, memory in bytes)."""
    preset: str
    batch: int
    tokens: int
    flops_per_token: float  # analytic forward FLOPs per token at N_LOOPS steps (spec.flops_per_token)
    steps: dict[str, int] = field(default_factory=dict)  # loop steps each implementation executed
    max_dlogit: dict[str, float] = field(default_factory=dict)  # twin vs open-mythos, float32
    fwd: dict[str, list[float]] = field(default_factory=dict)
    fwdbwd: dict[str, list[float]] = field(default_factory=dict)
    act2: dict[str, list[float]] = field(default_factory=dict)  # forward, every position halts at step 2
    act2_steps: dict[str, int] = field(default_factory=dict)
    mem_fwd: dict[str, int] = field(default_factory=dict)
    mem_fwdbwd: dict[str, int] = field(default_factory=dict)
    xla_temp: dict[str, int] = field(default_factory=dict)  # XLA's compiled temp buffer bytes (jax)
    compile_s: dict[str, float] = field(default_factory=dict)  # jax: fwd, fwd+bwd
    ceiling: dict[str, list[float]] = field(default_factory=dict)  # 2048^3 float32 matmul seconds
    # CPU cores used by other processes during each timed call, keyed like the times ("fwd/torch")
    foreign: dict[str, list[float]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # 1-minute load average at the start and after each round
    # issue 18: bfloat16 forwards (open-mythos under torch.autocast, the twins built in bfloat16), all N steps
    fwd16: dict[str, list[float]] = field(default_factory=dict)
    max_dlogit16: dict[str, float] = field(default_factory=dict)  # bf16 logits vs open-mythos fp32, / max |logit|
    # ACT as configured: open-mythos' own seeded halting head (no override), forward; steps each ran
    act: dict[str, list[float]] = field(default_factory=dict)
    act_steps: dict[str, int] = field(default_factory=dict)
    # ACT linearity: the twins' forward with force_halt = k everywhere (early exit after step k), "torch/3"
    lin: dict[str, list[float]] = field(default_factory=dict)
    # roofline (bench/roofline.py) per "framework/dtype": fixed, step, total seconds and their parts
    roof: dict[str, dict[str, float]] = field(default_factory=dict)
    bandwidth: dict[str, float] = field(default_factory=dict)  # bytes/s of a large copy, per framework
    roof_foreign: float = 0.0  # CPU cores other processes used while the roofline was measured
    gemm_times: dict[str, dict[str, float]] = field(default_factory=dict)  # "torch/float32" -> {"b,m,k,n": s}
    # the torch twin through mythos_torch.compiled_forward (torch.compile), float32 and bfloat16, all N steps;
    # its first-call compile seconds and its logits against the eager twin's (max |dlogit|) per dtype
    fwdc: dict[str, list[float]] = field(default_factory=dict)  # "float32" | "bfloat16" -> seconds per round
    compile_torch_s: dict[str, float] = field(default_factory=dict)
    max_dlogit_c: dict[str, float] = field(default_factory=dict)
    # the float32 JAX twin under forward(..., autocast=True): bf16 matmul operands, float32 elsewhere
    fwdac: dict[str, list[float]] = field(default_factory=dict)  # "jax" -> seconds per round


# --------------------------------------------------------------------------- the three models


class Case:
    """One preset, loaded three ways, with the calls to time."""

    def __init__(self, name: str, batch: int, tokens: int, onnx: bool = True, compiled: bool = True):
        import jax
        import torch

        import mythos_jax as mj

        self.name, self.batch, self.tokens = name, batch, tokens
        om = C.build_open_mythos(name)
        om_nat = copy.deepcopy(om)  # ACT as configured: open-mythos' own seeded halting head
        C.set_halting(om, C.NEVER_HALT_BIAS)
        om2 = copy.deepcopy(om)
        C.set_halting(om2, C.HALT_AT_2_BIAS)
        self.om, self.om2 = om, om2
        self.pt, self.pt2 = C.import_twin(om, "torch"), C.import_twin(om2, "torch")
        self.jx, self.jx2 = C.import_twin(om, "jax"), C.import_twin(om2, "jax")
        self.spec = self.pt.spec
        # issue 18: ACT as configured, and the bfloat16 twins (the same weights, cast by build)
        import mythos_torch as mt

        self.om_nat, self.pt_nat, self.jx_nat = om_nat, C.import_twin(om_nat, "torch"), C.import_twin(om_nat, "jax")
        arrays = mt.dump_arrays(self.pt)
        self.pt16 = mt.build(self.spec, 0, "bfloat16", arrays)
        # the compiled torch forwards (the fast path users take for repeated calls); compiled on first use
        from mythos_torch.generate import compiled_forward

        self.ptc = {"float32": compiled_forward(self.pt), "bfloat16": compiled_forward(self.pt16)} if compiled else {}
        self.jx16 = mj.build(self.spec, 0, "bfloat16", arrays)
        ids = C.make_ids(self.spec.vocab_size, batch, tokens)
        self.ids_np = ids
        self.ids_pt = torch.from_numpy(ids)
        self.ids_jx = jax.numpy.asarray(ids, dtype=jax.numpy.int32)
        self.targets_pt = torch.roll(self.ids_pt, -1, dims=1)  # next-token targets (wrapped: the cost is the same)
        self.targets_jx = jax.numpy.roll(self.ids_jx, -1, axis=1)
        # force_halt = k at every position: the loop exits after step k (ACT linearity), k = 1..N_LOOPS
        self.halt_pt = {k: torch.full((batch, tokens), k, dtype=torch.int64) for k in range(1, N_LOOPS + 1)}
        self.halt_jx = {k: jax.numpy.full((batch, tokens), k, dtype=jax.numpy.int32) for k in range(1, N_LOOPS + 1)}
        self._mj = mj
        self._jax_step = None
        self.ox = self.ox2 = None
        if onnx:
            import mythos_torch as mt
            from weights_bridge import onnx_backend as ox

            self._ox = ox
            self.ox, self.ox2 = (ox.build(self.spec, 0, "float32", mt.dump_arrays(m), threads=C.TORCH_THREADS)
                                 for m in (self.pt, self.pt2))

    # forwards ---------------------------------------------------------------

    def om_fwd(self, model=None) -> object:
        import torch

        with torch.no_grad():
            return (model or self.om)(self.ids_pt, n_loops=N_LOOPS)

    def pt_fwd(self, model=None) -> object:
        import torch

        with torch.no_grad():
            return (model or self.pt)(self.ids_pt, N_LOOPS)

    def jx_fwd(self, model=None, autocast: bool = False) -> object:
        out = self._mj.forward(model or self.jx, self.ids_jx, N_LOOPS, autocast=autocast)
        out.logits.block_until_ready()
        return out

    def pt_compiled(self, dtype: str) -> object:
        """The compiled torch twin, all N steps (early_exit=False: the same work as the halting-free eager call)."""
        import torch

        with torch.no_grad():
            return self.ptc[dtype](self.ids_pt, N_LOOPS, early_exit=False)

    def om_fwd16(self) -> object:
        """open-mythos under torch.autocast(bfloat16): its matmuls in bf16, the rest as autocast decides."""
        import torch

        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return self.om(self.ids_pt, n_loops=N_LOOPS)

    def pt_forced(self, k: int) -> object:
        import torch

        with torch.no_grad():
            return self.pt(self.ids_pt, N_LOOPS, force_halt=self.halt_pt[k])

    def jx_forced(self, k: int) -> object:
        out = self._mj.forward(self.jx, self.ids_jx, N_LOOPS, force_halt=self.halt_jx[k])
        out.logits.block_until_ready()
        return out

    def ox_fwd(self, model=None) -> object:
        return self._ox.forward(model or self.ox, self.ids_np, N_LOOPS)

    def export_onnx(self) -> float:
        """Export both ONNX graphs (8 steps, halt at 2) and open their sessions; seconds."""
        t = time.perf_counter()
        for m in (self.ox, self.ox2):
            m.session(N_LOOPS)
        return time.perf_counter() - t

    # forward + backward -----------------------------------------------------

    def om_fwdbwd(self) -> None:
        self._torch_fwdbwd(self.om, lambda: self.om(self.ids_pt, n_loops=N_LOOPS))

    def pt_fwdbwd(self) -> None:
        self._torch_fwdbwd(self.pt, lambda: self.pt(self.ids_pt, N_LOOPS).logits)

    def _torch_fwdbwd(self, model, logits_fn: Callable[[], object]) -> None:
        import torch.nn.functional as F

        model.zero_grad(set_to_none=True)
        logits = logits_fn()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets_pt.reshape(-1))
        loss.backward()

    def jx_fwdbwd(self) -> None:
        import jax

        loss, grads = self._jax_step(*self._jx_state, self.ids_jx, self.targets_jx)
        jax.block_until_ready((loss, grads))

    def compile_jax(self, memory: bool) -> tuple[float, float, int | None, int | None]:
        """Compile the JAX forward (through mythos_jax.forward) and the fwd+bwd step (AOT).

        Returns compile seconds of each (forward: first call minus a warm call) and, when `memory`,
        XLA's temp buffer bytes of each compiled program (forward: an AOT copy of the same program).
        """
        import jax
        from flax import nnx

        graphdef, params, rest = nnx.split(self.jx, nnx.Param, ...)  # gradients of the Params only
        self._jx_state = (params, rest)

        def loss_fn(params, rest, ids, targets):
            model = nnx.merge(graphdef, params, rest)
            # lax.scan over all N steps: the differentiable loop (early_exit=False)
            logits = model(ids, N_LOOPS, early_exit=False).logits
            # the twin's own training loss (mythos_jax.cross_entropy: a hand-written softmax - onehot VJP)
            return self._mj.cross_entropy(logits, targets, jax.numpy.ones(targets.shape, bool))

        t0 = time.perf_counter()
        self.jx_fwd()
        first = time.perf_counter() - t0
        warm = statistics.median(C.time_once(self.jx_fwd) for _ in range(2))
        fwd_compile = max(0.0, first - warm)

        step = jax.jit(jax.value_and_grad(loss_fn))  # loss and d loss / d params
        t0 = time.perf_counter()
        compiled = step.lower(params, rest, self.ids_jx, self.targets_jx).compile()
        bwd_compile = time.perf_counter() - t0
        self._jax_step = compiled
        self.jx_fwdbwd()  # first run of the compiled program, not timed

        fwd_temp = bwd_temp = None
        if memory:
            bwd_temp = _temp_bytes(compiled)
            fwd = jax.jit(lambda params, rest, ids: nnx.merge(graphdef, params, rest)(ids, N_LOOPS).logits)
            fwd_temp = _temp_bytes(fwd.lower(params, rest, self.ids_jx).compile())
        return fwd_compile, bwd_compile, fwd_temp, bwd_temp


def _temp_bytes(compiled: object) -> int | None:
    """XLA's temp (scratch) buffer bytes of a compiled program, when the backend reports it."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend/version implements memory_analysis
        return None


def om_steps(case: Case, model) -> int:
    return C.om_steps(model, lambda: case.om_fwd(model))


# --------------------------------------------------------------------------- measurement


def measure(name: str, batch: int, tokens: int, repeats: int, warmup: int, memory: bool, progress,
            task, onnx: bool = True, quick: bool = False, compiled: bool = True) -> PresetResult:
    """Build, check and time one preset (progress: a rich Progress advanced once per timed call)."""
    r = PresetResult(name, batch, tokens, spec_lib.flops_per_token(spec_lib.preset(name), tokens, N_LOOPS)["total"])
    r.load.append(os.getloadavg()[0])
    progress.update(task, description=f"{name}: building")
    case = Case(name, batch, tokens, onnx, compiled)

    # equal work: every implementation runs all N_LOOPS steps (and the halting copy stops at 2)
    progress.update(task, description=f"{name}: checking steps and logits")
    r.steps["open-mythos"] = om_steps(case, case.om)
    ref = case.om_fwd().double().numpy()
    out_pt = case.pt_fwd()
    r.steps["torch"] = int(out_pt.n_steps)
    r.max_dlogit["torch"] = float(np.abs(out_pt.logits.double().numpy() - ref).max())
    progress.update(task, description=f"{name}: compiling jax")
    fwd_c, bwd_c, fwd_t, bwd_t = case.compile_jax(memory)
    r.compile_s = {"fwd": fwd_c, "fwd+bwd": bwd_c}
    if fwd_t is not None:
        r.xla_temp = {"fwd": fwd_t, "fwd+bwd": bwd_t}
    out_jx = case.jx_fwd()
    r.steps["jax"] = int(out_jx.n_steps)
    r.max_dlogit["jax"] = float(np.abs(np.asarray(out_jx.logits, np.float64) - ref).max())
    r.act2_steps = {"open-mythos": om_steps(case, case.om2), "torch": int(case.pt_fwd(case.pt2).n_steps),
                    "jax": int(case.jx_fwd(case.jx2).n_steps)}
    if case.ox is not None:
        progress.update(task, description=f"{name}: exporting to onnx")
        r.compile_s["onnx export"] = case.export_onnx()
        out_ox = case.ox_fwd()
        r.steps["onnx"] = out_ox.n_steps
        r.max_dlogit["onnx"] = float(np.abs(out_ox.logits.astype(np.float64) - ref).max())
        r.act2_steps["onnx"] = case.ox_fwd(case.ox2).n_steps
    progress.update(task, description=f"{name}: checking bfloat16, ACT as configured, forced halting")
    check_extra(case, r, ref)
    for dtype in case.ptc:
        progress.update(task, description=f"{name}: compiling the torch twin ({dtype}, torch.compile)")
        eager = (case.pt if dtype == "float32" else case.pt16)
        t0 = time.perf_counter()
        out_c = case.pt_compiled(dtype)
        r.compile_torch_s[dtype] = time.perf_counter() - t0
        if int(out_c.n_steps) != N_LOOPS:
            raise RuntimeError(f"{name}: compiled torch ({dtype}) ran {int(out_c.n_steps)} loop steps, expected {N_LOOPS}")
        want = case.pt_fwd(eager).logits.double()
        r.max_dlogit_c[dtype] = float((out_c.logits.double() - want).abs().max() / want.abs().max())
    for impl, n in r.steps.items():
        if n != N_LOOPS:
            raise RuntimeError(f"{name}: {impl} ran {n} loop steps, expected {N_LOOPS} (the halting override failed)")
    for impl, n in r.act2_steps.items():
        if n != 2:
            raise RuntimeError(f"{name}: {impl} with halting bias {C.HALT_AT_2_BIAS} ran {n} steps, expected 2")

    calls: list[tuple[dict, str, Callable[[], object]]] = [
        (r.fwd, "open-mythos", case.om_fwd), (r.fwd, "torch", case.pt_fwd), (r.fwd, "jax", case.jx_fwd),
        (r.act2, "open-mythos", lambda: case.om_fwd(case.om2)), (r.act2, "torch", lambda: case.pt_fwd(case.pt2)),
        (r.act2, "jax", lambda: case.jx_fwd(case.jx2)),
        (r.fwdbwd, "open-mythos", case.om_fwdbwd), (r.fwdbwd, "torch", case.pt_fwdbwd),
        (r.fwdbwd, "jax", case.jx_fwdbwd),
        (r.ceiling, "torch", C.torch_matmul_seconds), (r.ceiling, "jax", C.jax_matmul_seconds),
    ]
    if case.ox is not None:
        calls[3:3] = [(r.fwd, "onnx", case.ox_fwd)]
        calls[7:7] = [(r.act2, "onnx", lambda: case.ox_fwd(case.ox2))]
    calls += extra_calls(case, r)
    for rnd in range(warmup + repeats):
        timed = rnd >= warmup
        label = f"round {rnd - warmup + 1}/{repeats}" if timed else f"warmup {rnd + 1}/{warmup}"
        for store, impl, fn in calls:
            progress.update(task, description=f"{name}: {label}: {_label(store, r)} {impl}")
            result: list = []
            t, other = C.time_with_load(lambda: result.append(fn()))
            if store is r.ceiling:
                t = result[0]  # the matmul helpers time their own best call (set-up and warmup excluded)
            if timed:
                store.setdefault(impl, []).append(t)
                r.foreign.setdefault(f"{_label(store, r)}/{impl}", []).append(other)
            progress.advance(task)
        r.load.append(os.getloadavg()[0])

    if memory:
        progress.update(task, description=f"{name}: peak memory")
        for impl, fwd, fb in (("open-mythos", case.om_fwd, case.om_fwdbwd), ("torch", case.pt_fwd, case.pt_fwdbwd),
                              ("jax", case.jx_fwd, case.jx_fwdbwd)):
            r.mem_fwd[impl], _ = C.peak_rss_delta(fwd)
            r.mem_fwdbwd[impl], _ = C.peak_rss_delta(fb)
        if case.ox is not None:
            r.mem_fwd["onnx"], _ = C.peak_rss_delta(case.ox_fwd)
    progress.update(task, description=f"{name}: roofline (GEMM shapes, bandwidth)")
    measure_roofline(case, r, 5 if quick else 20, 64 if quick else 256)
    r.load.append(os.getloadavg()[0])
    return r


def check_extra(case: Case, r: PresetResult, ref: np.ndarray) -> None:
    """Steps and logits of the issue-18 variants: bf16 (all N steps), ACT as configured, force_halt = k."""
    out = {"open-mythos": case.om_fwd16().float().double().numpy()}
    o_pt, o_jx = case.pt_fwd(case.pt16), case.jx_fwd(case.jx16)
    o_ac = case.jx_fwd(autocast=True)
    out["torch"], out["jax"] = o_pt.logits.float().double().numpy(), np.asarray(o_jx.logits, np.float64)
    out["jax autocast"] = np.asarray(o_ac.logits, np.float64)
    scale = float(np.abs(ref).max())  # relative: the logits of a random-init model are tiny
    r.max_dlogit16 = {k: float(np.abs(v - ref).max()) / scale for k, v in out.items()}
    for impl, n in (("open-mythos autocast", C.om_steps(case.om, case.om_fwd16)), ("torch bfloat16", o_pt.n_steps),
                    ("jax bfloat16", o_jx.n_steps), ("jax autocast", o_ac.n_steps)):
        if int(n) != N_LOOPS:
            raise RuntimeError(f"{case.name}: {impl} ran {int(n)} loop steps, expected {N_LOOPS}")
    r.act_steps = {"open-mythos": om_steps(case, case.om_nat), "torch": int(case.pt_fwd(case.pt_nat).n_steps),
                   "jax": int(case.jx_fwd(case.jx_nat).n_steps)}
    for k in (1, 2, N_LOOPS):
        for impl, fn in (("torch", case.pt_forced), ("jax", case.jx_forced)):
            n = int(fn(k).n_steps)
            if n != k:
                raise RuntimeError(f"{case.name}: {impl} with force_halt={k} ran {n} steps, expected {k}")


def extra_calls(case: Case, r: PresetResult) -> list[tuple[dict, str, Callable[[], object]]]:
    """The issue-18 measurements, timed in the same rounds as the others (so ratios stay paired)."""
    calls = [(r.fwdc, dtype, lambda dtype=dtype: case.pt_compiled(dtype)) for dtype in case.ptc]
    calls += [(r.fwd16, "open-mythos", case.om_fwd16), (r.fwd16, "torch", lambda: case.pt_fwd(case.pt16)),
             (r.fwd16, "jax", lambda: case.jx_fwd(case.jx16)), (r.fwdac, "jax", lambda: case.jx_fwd(autocast=True)),
             (r.act, "open-mythos", lambda: case.om_fwd(case.om_nat)), (r.act, "torch", lambda: case.pt_fwd(case.pt_nat)),
             (r.act, "jax", lambda: case.jx_fwd(case.jx_nat))]
    for k in range(1, N_LOOPS + 1):
        calls += [(r.lin, f"torch/{k}", lambda k=k: case.pt_forced(k)), (r.lin, f"jax/{k}", lambda k=k: case.jx_forced(k))]
    return calls


def measure_roofline(case: Case, r: PresetResult, repeats: int, mib: int) -> None:
    """The roofline of this forward (bench/roofline.py) per framework and dtype, measured now."""
    from bench import roofline as R

    gemms, traffic = R.gemms_and_traffic(case.spec, case.batch, case.tokens)
    # the enumeration against spec.flops_per_token (an independent count): the same FLOPs, or it is wrong
    want = spec_lib.flops_per_token(case.spec, case.tokens, N_LOOPS)["total"] * case.batch * case.tokens
    got = sum(g.flops * (N_LOOPS if g.part == "step" else 1) for g in gemms)
    if abs(got - want) > 0.02 * want:
        raise RuntimeError(f"{case.name}: roofline GEMMs hold {got:.3e} FLOPs, spec.flops_per_token {want:.3e}")
    busy0, own0 = C.cpu_seconds()
    t0 = time.perf_counter()
    r.bandwidth = {"torch": R.torch_bandwidth(mib), "jax": R.jax_bandwidth(mib)}
    for fw, timer in (("torch", R.time_gemms_torch), ("jax", R.time_gemms_jax)):
        for dtype in ("float32", "bfloat16"):
            times = timer(gemms, dtype, repeats)
            r.gemm_times[f"{fw}/{dtype}"] = {",".join(map(str, k)): v for k, v in times.items()}
            r.roof[f"{fw}/{dtype}"] = R.roofline(gemms, traffic, times, r.bandwidth[fw], dtype, N_LOOPS)
    busy1, own1 = C.cpu_seconds()
    r.roof_foreign = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (time.perf_counter() - t0))


def _label(store: dict, r: PresetResult) -> str:
    names = {id(r.fwd): "fwd", id(r.act2): "fwd (halt at 2)", id(r.fwdbwd): "fwd+bwd", id(r.ceiling): "matmul",
             id(r.fwd16): "fwd bf16", id(r.act): "fwd (ACT as configured)", id(r.lin): "fwd (force_halt)",
             id(r.fwdc): "fwd compiled", id(r.fwdac): "fwd autocast"}
    return names[id(store)]


# --------------------------------------------------------------------------- reporting


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]: both timed in the same round, so a noisy round moves both."""
    return statistics.median(x / y for x, y in zip(a, b))


QUIET = 0.25  # a call is "quiet" when other processes used less than this many cores meanwhile


def quiet_median(times: list[float], foreign: list[float]) -> float | None:
    """Median of the calls during which other processes stayed below QUIET cores (None if fewer than 2)."""
    q = [t for t, f in zip(times, foreign) if f < QUIET]
    return statistics.median(q) if len(q) >= 2 else None


def summary(r: PresetResult) -> dict:
    """Medians, rates and ratios of one preset, as plain numbers.

    Ratios are medians of per-round ratios (paired); `*_best_x` compare the best (fastest) rounds;
    `*_quiet_x` compare medians of the quiet calls only (other processes below QUIET cores). The
    matmul ceiling is the best of all its samples: the most the machine gave in this run.
    """
    n_tok = r.batch * r.tokens
    out: dict = {"preset": r.preset, "shape": f"{r.batch}x{r.tokens}", "rows": {}}
    om_f, om_fb = r.fwd["open-mythos"], r.fwdbwd["open-mythos"]
    for impl in (i for i in IMPLS if i in r.fwd):
        ceiling_s = min(r.ceiling["jax" if impl == "jax" else "torch"])  # onnx: the torch matmul's (same MLAS-class GEMMs)
        f, a2 = med(r.fwd[impl]), med(r.act2[impl])
        bwd = impl in r.fwdbwd  # a runtime (onnx) has no backward
        fb = med(r.fwdbwd[impl]) if bwd else None
        row = {
            "fwd_ms": 1e3 * f, "fwd_tok_s": n_tok / f, "fwd_x": paired(om_f, r.fwd[impl]),
            "fwd_best_ms": 1e3 * min(r.fwd[impl]), "fwd_best_x": min(om_f) / min(r.fwd[impl]),
            "fwdbwd_ms": bwd and 1e3 * fb, "fwdbwd_tok_s": bwd and n_tok / fb,
            "fwdbwd_x": bwd and paired(om_fb, r.fwdbwd[impl]),
            "fwdbwd_best_ms": bwd and 1e3 * min(r.fwdbwd[impl]),
            "fwdbwd_best_x": bwd and min(om_fb) / min(r.fwdbwd[impl]),
            "fwd_gflops": r.flops_per_token * n_tok / f / 1e9,
            "fwd_best_gflops": r.flops_per_token * n_tok / min(r.fwd[impl]) / 1e9,
            "ceiling_gflops": C.matmul_flops() / ceiling_s / 1e9,
            "act2_ms": 1e3 * a2, "act2_ratio": paired(r.act2[impl], r.fwd[impl]),
            "fwd_spread": (max(r.fwd[impl]) - min(r.fwd[impl])) / f,
            "mem_fwd": r.mem_fwd.get(impl), "mem_fwdbwd": r.mem_fwdbwd.get(impl),
        }
        for k in [k for k, v in row.items() if v is False]:
            row[k] = None
        for mode, times in (("fwd", r.fwd), ("fwdbwd", r.fwdbwd)):
            key = "fwd" if mode == "fwd" else "fwd+bwd"
            if impl not in times:
                row[f"{mode}_quiet_x"], row[f"{mode}_quiet_n"], row[f"{mode}_foreign"] = None, 0, None
                continue
            q_om = quiet_median(times["open-mythos"], r.foreign[f"{key}/open-mythos"])
            q_me = quiet_median(times[impl], r.foreign[f"{key}/{impl}"])
            row[f"{mode}_quiet_x"] = q_om / q_me if q_om and q_me else None
            row[f"{mode}_quiet_n"] = sum(f < QUIET for f in r.foreign[f"{key}/{impl}"])
            row[f"{mode}_foreign"] = statistics.median(r.foreign[f"{key}/{impl}"])
        row["fwd_ceiling_frac"] = row["fwd_gflops"] / row["ceiling_gflops"]
        row["fwd_best_ceiling_frac"] = row["fwd_best_gflops"] / row["ceiling_gflops"]
        out["rows"][impl] = row
    if r.roof:
        out["roofline"], out["linearity"] = roofline_rows(r), linearity_rows(r)
        for x in out["roofline"]:  # the target metrics, beside the older ones
            row = out["rows"].setdefault(x["impl"], {}) if x["impl"] in EXTRA_ROWS else out["rows"][x["impl"]]
            tag = "32" if x["dtype"] == "float32" else "16"
            row[f"roof_frac{tag}"] = x["roof_frac"]
            if tag == "16":
                row["bf16_x_om32"], row["bf16_x_om16"] = x["x_om32"], x["x_om16"]
        for impl, lin in out["linearity"].items():
            out["rows"][impl]["lin_err2"] = lin["err2_forced"]
            out["rows"][impl]["lin_r2"] = lin["r2"]
    return out


def fit_line(ks: list[int], ts: list[float]) -> tuple[float, float, float]:
    """Least-squares t = a + b k: (a, b, R^2)."""
    k, t = np.asarray(ks, float), np.asarray(ts, float)
    b, a = np.polyfit(k, t, 1)
    res = t - (a + b * k)
    ss = float(((t - t.mean()) ** 2).sum())
    return float(a), float(b), 1.0 - float((res ** 2).sum()) / ss if ss > 0 else float("nan")


# rows of the roofline table only (no fwd+bwd, ACT or memory columns)
EXTRA_ROWS = ("torch compiled", "jax autocast")

# framework of each implementation's roofline: open-mythos and onnx run torch-class CPU GEMMs
ROOF_FW = {"open-mythos": "torch", "torch": "torch", "jax": "jax", "onnx": "torch"}


def roofline_rows(r: PresetResult) -> list[dict]:
    """Per implementation and dtype: median forward (all N steps), ratios to open-mythos, roofline fraction, ACT."""
    rows = []
    om32, om16 = r.fwd["open-mythos"], r.fwd16["open-mythos"]
    for dtype, store in (("float32", r.fwd), ("bfloat16", r.fwd16)):
        for impl in (i for i in IMPLS if i in store):
            roof = r.roof[f"{ROOF_FW[impl]}/{dtype}"]
            f = med(store[impl])
            row = {"impl": impl, "dtype": dtype, "fwd_ms": 1e3 * f, "x_om32": paired(om32, store[impl]),
                   "x_om16": paired(om16, store[impl]) if dtype == "bfloat16" else None,
                   "roof_ms": 1e3 * roof["total"], "roof_frac": roof["total"] / f,
                   "roof_best_frac": roof["total"] / min(store[impl]),
                   "act_ms": None, "act_steps": None, "act_x": None}
            if dtype == "float32" and impl in r.act:
                row.update(act_ms=1e3 * med(r.act[impl]), act_steps=r.act_steps[impl],
                           act_x=paired(r.act["open-mythos"], r.act[impl]))
            rows.append(row)
        if dtype == "bfloat16" and r.fwdac:  # the float32 JAX twin, autocast: bf16 GEMMs (the bf16 roofline)
            roof, c = r.roof["jax/bfloat16"], r.fwdac["jax"]
            rows.append({"impl": "jax autocast", "dtype": dtype, "fwd_ms": 1e3 * med(c), "x_om32": paired(om32, c),
                         "x_om16": paired(om16, c), "roof_ms": 1e3 * roof["total"],
                         "roof_frac": roof["total"] / med(c), "roof_best_frac": roof["total"] / min(c),
                         "act_ms": None, "act_steps": None, "act_x": None})
        if dtype in r.fwdc:  # the compiled torch twin, on torch's roofline
            roof, c = r.roof[f"torch/{dtype}"], r.fwdc[dtype]
            rows.append({"impl": "torch compiled", "dtype": dtype, "fwd_ms": 1e3 * med(c), "x_om32": paired(om32, c),
                         "x_om16": paired(om16, c) if dtype == "bfloat16" else None, "roof_ms": 1e3 * roof["total"],
                         "roof_frac": roof["total"] / med(c), "roof_best_frac": roof["total"] / min(c),
                         "act_ms": None, "act_steps": None, "act_x": None})
    return rows


def linearity_rows(r: PresetResult) -> dict[str, dict]:
    """Per twin (float32): forward time against the steps run (force_halt = k), the fit and the halt@2 check.

    The check uses the fixed part and the per-step part from the 1-step and N-step runs (endpoints, so the
    2-step time is not used to predict itself): fixed + 2/N x (N x per-step) against the measured 2-step
    forward (force_halt = 2), and against the ACT run that halts by threshold at step 2 (halting bias 0).
    """
    out = {}
    for impl in ("torch", "jax"):
        ks = list(range(1, N_LOOPS + 1))
        ts = [med(r.lin[f"{impl}/{k}"]) for k in ks]
        a, b, r2 = fit_line(ks, ts)
        b_end = (ts[-1] - ts[0]) / (N_LOOPS - 1)
        a_end = ts[0] - b_end
        pred = a_end + 2 * b_end
        roof = r.roof[f"{impl}/float32"]
        out[impl] = {"a_ms": 1e3 * a, "b_ms": 1e3 * b, "r2": r2, "fixed_ms": 1e3 * a_end, "step_ms": 1e3 * b_end,
                     "t_ms": [1e3 * t for t in ts], "pred2_ms": 1e3 * pred, "t2_ms": 1e3 * ts[1],
                     "err2_forced": abs(ts[1] - pred) / pred,
                     "act2_ms": 1e3 * med(r.act2[impl]), "err2_act": abs(med(r.act2[impl]) - pred) / pred,
                     "roof_fixed_ms": 1e3 * roof["fixed"], "roof_step_ms": 1e3 * roof["step"]}
    return out


TARGETS = [  # (preset, impl, metric, threshold, text): issue 18 (the earlier issue's targets are in git history)
    ("bench-s-gqa", "torch", "bf16_x_om32", 3.0, ">="), ("bench-m-moe64", "torch", "bf16_x_om32", 3.0, ">="),
    ("bench-s-gqa", "torch", "bf16_x_om16", 2.5, ">="), ("bench-m-moe64", "torch", "bf16_x_om16", 2.5, ">="),
    ("bench-s-gqa", "torch compiled", "bf16_x_om32", 3.0, ">="), ("bench-m-moe64", "torch compiled", "bf16_x_om32", 3.0, ">="),
    ("bench-s-gqa", "torch compiled", "bf16_x_om16", 2.5, ">="),
    ("bench-m-moe64", "torch compiled", "bf16_x_om16", 2.5, ">="),
    ("*", "torch", "roof_frac32", 0.80, ">="), ("*", "torch compiled", "roof_frac32", 0.80, ">="),
    ("*", "jax", "roof_frac32", 0.85, ">="),
    ("*", "jax", "bf16_x_om32", 2.0, ">="), ("*", "jax autocast", "bf16_x_om32", 2.0, ">="),
    ("bench-s-gqa", "jax", "fwdbwd_x", 1.3, ">="), ("bench-m-moe64", "jax", "fwdbwd_x", 1.3, ">="),
    ("*", "torch", "lin_err2", 0.10, "<="), ("*", "jax", "lin_err2", 0.10, "<="),
]


def target_rows(sums: list[dict]) -> list[tuple[str, str, float, str, bool]]:
    rows = []
    for preset, impl, metric, thr, op in TARGETS:
        for s in sums:
            if preset in ("*", s["preset"]) and s["rows"].get(impl, {}).get(metric) is not None:
                v = s["rows"][impl][metric]
                ok = v >= thr if op == ">=" else v <= thr
                rows.append((f"{s['preset']} {impl} {metric}", f"{op} {thr:g}", v, "met" if ok else "MISSED", ok))
    return rows


COLUMNS = ("model", "fwd ms", "fwd tok/s", "fwd x om", "quiet x om", "fwd+bwd ms", "fwd+bwd tok/s", "fwd+bwd x om",
           "quiet x om", "fwd GFLOP/s", "% of matmul ceiling", "halt@2 / 8 steps", "peak RSS fwd", "peak RSS fwd+bwd",
           "other procs (cores)")


def cells(impl: str, row: dict) -> list[str]:
    """One table row: medians, paired ratios, quiet-call ratios, efficiency, ACT ratio, memory, contention."""
    def quiet(mode: str) -> str:
        x = row[f"{mode}_quiet_x"]
        return "-" if x is None else f"{x:.2f} ({row[f'{mode}_quiet_n']})"

    def num(key: str, fmt: str) -> str:
        return "-" if row[key] is None else format(row[key], fmt)

    foreign = " / ".join("-" if row[k] is None else f"{row[k]:.2f}" for k in ("fwd_foreign", "fwdbwd_foreign"))
    return [impl, f"{row['fwd_ms']:,.1f}", f"{row['fwd_tok_s']:,.0f}", f"{row['fwd_x']:.2f}", quiet("fwd"),
            num("fwdbwd_ms", ",.1f"), num("fwdbwd_tok_s", ",.0f"), num("fwdbwd_x", ".2f"), quiet("fwdbwd"),
            f"{row['fwd_gflops']:.0f}",
            f"{100 * row['fwd_ceiling_frac']:.0f}% (best {100 * row['fwd_best_ceiling_frac']:.0f}%)"
            f" of {row['ceiling_gflops']:.0f}",
            f"{100 * row['act2_ratio']:.0f}%", _mib(row["mem_fwd"]), _mib(row["mem_fwdbwd"]), foreign]


def notes(r: PresetResult) -> str:
    extra = [f"analytic forward FLOPs/token {r.flops_per_token / 1e6:.1f} M",
             f"jax compile: fwd {r.compile_s['fwd']:.1f} s, fwd+bwd {r.compile_s['fwd+bwd']:.1f} s"]
    if "onnx export" in r.compile_s:
        extra.append(f"onnx export of both graphs: {r.compile_s['onnx export']:.1f} s, onnxruntime with "
                     f"{C.TORCH_THREADS} intra-op threads")
    if r.xla_temp:
        extra.append(f"XLA temp buffers: fwd {_mib(r.xla_temp['fwd'])}, fwd+bwd {_mib(r.xla_temp['fwd+bwd'])}")
    extra.append("max |dlogit| vs open-mythos: " + ", ".join(f"{k} {v:.1e}" for k, v in r.max_dlogit.items()))
    extra.append(f"load average (1 min) over the rounds: {min(r.load):.1f}..{max(r.load):.1f}")
    return "; ".join(extra)


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def extra_tables(s: dict, r: PresetResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """Issue 18's tables of one preset: (title, columns, rows) for the roofline, its parts and ACT linearity."""
    if "roofline" not in s:
        return []
    t1 = [[x["impl"] + (" (autocast)" if x["impl"] == "open-mythos" and x["dtype"] == "bfloat16" else ""),
           x["dtype"], f"{x['fwd_ms']:,.1f}", f"{x['x_om32']:.2f}", _f(x["x_om16"], ".2f"), f"{x['roof_ms']:,.1f}",
           f"{100 * x['roof_frac']:.0f}% (best {100 * x['roof_best_frac']:.0f}%)",
           "-" if x["act_ms"] is None else f"{x['act_ms']:,.1f} ({x['act_steps']} steps)", _f(x["act_x"], ".2f")]
          for x in s["roofline"]]
    c1 = ["model", "dtype", f"fwd ms ({N_LOOPS} steps)", "x om fp32", "x om bf16 autocast", "roofline ms",
          "roofline / time", "ACT as configured ms", "ACT x om"]
    t2 = []
    for key, x in r.roof.items():
        t2.append([key, f"{1e3 * x['fixed_gemm']:.2f}", f"{1e3 * x['fixed_mem']:.2f}", f"{1e3 * x['step_gemm']:.2f}",
                   f"{1e3 * x['step_mem']:.2f}", f"{1e3 * x['total']:,.1f}",
                   f"{x['flops'] / (x['fixed_gemm'] + N_LOOPS * x['step_gemm']) / 1e9:.0f}",
                   f"{r.bandwidth[key.split('/')[0]] / 1e9:.1f}"])
    c2 = ["framework/dtype", "fixed GEMM ms", "fixed memory ms", "per-step GEMM ms", "per-step memory ms",
          f"total ms ({N_LOOPS} steps)", "GEMM GFLOP/s", "copy GB/s"]
    t3 = []
    for impl, x in s["linearity"].items():
        t3.append([impl, f"{x['a_ms']:.1f} + {x['b_ms']:.1f} k", f"{x['r2']:.4f}",
                   f"{x['fixed_ms']:.1f} (roofline {x['roof_fixed_ms']:.1f})",
                   f"{x['step_ms']:.1f} (roofline {x['roof_step_ms']:.1f})",
                   f"{x['pred2_ms']:.1f}", f"{x['t2_ms']:.1f} ({100 * x['err2_forced']:.1f}%)",
                   f"{x['act2_ms']:.1f} ({100 * x['err2_act']:.1f}%)",
                   " ".join(f"{t:.0f}" for t in x["t_ms"])])
    c3 = ["twin (float32)", "fit ms (k steps)", "R^2", "fixed ms (1-step, N-step)", "per-step ms",
          "predicted halt@2 ms", "forced halt@2 ms (error)", "ACT halt@2 ms (error)", f"ms at k = 1..{N_LOOPS}"]
    n = len(r.fwd["torch"])
    return [(f"{s['preset']}: roofline and bfloat16, {s['shape']} tokens, {n} rounds", c1, t1),
            (f"{s['preset']}: the roofline's parts (fixed: embedding, prelude, coda, head; per loop step)", c2, t2),
            (f"{s['preset']}: ACT linearity (force_halt = k at every position, early exit), {n} rounds", c3, t3)]


def extra_notes(r: PresetResult) -> str:
    if not r.roof:
        return ""
    return ("bfloat16 max |dlogit| / max |logit| vs open-mythos float32: "
            + ", ".join(f"{k} {v:.1e}" for k, v in r.max_dlogit16.items())
            + "; ACT as configured: open-mythos' seeded halting head, steps run "
            + ", ".join(f"{k} {v}" for k, v in r.act_steps.items())
            + "; roofline: GEMMs best of the warm samples (bench/roofline.py), routed experts at the balanced "
            f"expectation, other processes used {r.roof_foreign:.2f} cores meanwhile"
            + "".join(f"; torch compiled {d}: first call (compile) {r.compile_torch_s[d]:.0f} s, max |dlogit| / max "
                      f"|logit| vs the eager twin {r.max_dlogit_c[d]:.1e}" for d in r.fwdc))


def markdown(sums: list[dict], results: list[PresetResult]) -> str:
    """The tables of docs/benchmarks.md."""
    lines = []
    for s, r in zip(sums, results):
        title = f"{s['preset']}: {s['shape']} tokens, {N_LOOPS} loop steps in all three, {len(r.fwd['torch'])} rounds"
        lines += [f"### {title}",
                  "", "| " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
        lines += ["| " + " | ".join(cells(impl, row)) + " |" for impl, row in s["rows"].items()
                   if "fwd_tok_s" in row]
        lines += ["", notes(r) + ".", ""]
        for title, cols, rows in extra_tables(s, r):
            lines += [f"#### {title}", "", "| " + " | ".join(cols) + " |", "|---" + "|---:" * (len(cols) - 1) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        if r.roof:
            lines += [extra_notes(r) + ".", ""]
    lines += ["### Targets", "", "| target | wanted | measured (median of paired ratios) | |", "|---|---|---:|---|"]
    for what, want, v, verdict, _ in target_rows(sums):
        lines.append(f"| {what} | {want} | {v:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def print_tables(console, sums: list[dict], results: list[PresetResult]) -> None:
    from rich.table import Table

    for s, r in zip(sums, results):
        t = Table(title=f"{s['preset']}  {s['shape']} tokens, {N_LOOPS} steps, medians of {len(r.fwd['torch'])} rounds")
        for col in COLUMNS:
            t.add_column(col, justify="left" if col == "model" else "right")
        for impl, row in s["rows"].items():
            if "fwd_tok_s" in row:  # "torch compiled" has only the roofline table's metrics
                t.add_row(*cells(impl, row))
        console.print(t)
        console.print("  " + notes(r))
        for title, cols, rows in extra_tables(s, r):
            t = Table(title=title)
            for col in cols:
                t.add_column(col, justify="left" if col == cols[0] else "right")
            for row in rows:
                t.add_row(*row)
            console.print(t)
        if r.roof:
            console.print("  " + extra_notes(r))
    t = Table(title="targets (ratios to open-mythos at equal loop steps: medians of per-round ratios)")
    for col in ("target", "wanted", "measured", ""):
        t.add_column(col)
    for what, want, v, verdict, ok in target_rows(sums):
        t.add_row(what, want, f"{v:.2f}", f"[green]{verdict}[/]" if ok else f"[red]{verdict}[/]")
    console.print(t)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=None,
                   help="comma-separated presets (default: all three; --quick: bench-s-gqa)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per preset (default 9; --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; --quick 0)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: bench-s-gqa at batch x tokens = {QUICK_SHAPE}, 1 round, no memory, a short "
                        "roofline, no onnx column")
    p.add_argument("--json", type=Path, help="write raw times and the summary here")
    p.add_argument("--markdown", type=Path, help="write the docs/benchmarks.md tables here")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime column")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the compiled torch rows (mythos_torch.compiled_forward; their first calls compile, "
                        "~20-40 s each; --quick skips them too)")
    p.add_argument("--torch-threads", type=int, default=C.TORCH_THREADS,
                   help=f"torch intra-op threads (default {C.TORCH_THREADS}; 1 is far less hurt by other processes "
                        "on a shared machine); the roofline's torch GEMMs use the same")
    a = p.parse_args(argv)
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 9)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.quick else 1)
    presets = a.presets if a.presets is not None else ("bench-s-gqa" if a.quick else ",".join(C.SHAPES))
    names = [n.strip() for n in presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in C.SHAPES]
    if unknown:
        p.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(C.SHAPES)}")
    if repeats < 1 or a.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if a.torch_threads < 1:
        p.error(f"--torch-threads must be >= 1, got {a.torch_threads}")
    C.TORCH_THREADS = a.torch_threads

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    C.setup_torch(a.torch_threads)
    import jax  # noqa: F401  (imported before the first timing, so its start-up is not timed)

    onnx = not a.no_onnx and not a.quick  # the export alone takes ~25 s: not in a smoke run
    if onnx:
        try:
            from weights_bridge.onnx_backend import require

            require("onnx", "onnxruntime", "onnxscript")
        except Exception as e:  # the [onnx] extra is not installed: the column is left out, and said so
            print(f"onnx column skipped: {e}", file=sys.stderr)
            onnx = False

    console = Console(width=max(Console().width, 200))  # the tables are wide; piped output keeps them whole
    console.print(f"torch threads {C.TORCH_THREADS}; cpus {os.cpu_count()}; n_loops {N_LOOPS}; "
                  f"repeats {repeats} (+{a.warmup} warmup); load average {os.getloadavg()[0]:.1f}")
    results: list[PresetResult] = []
    compiled = not a.no_compile and not a.quick
    per_round = 11 + 2 * onnx + 7 + 2 * N_LOOPS + 2 * compiled
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        for name in names:
            batch, tokens = QUICK_SHAPE if a.quick else C.SHAPES[name]
            task = progress.add_task(name, total=per_round * (repeats + a.warmup))
            results.append(measure(name, batch, tokens, repeats, a.warmup, not a.quick, progress, task, onnx, a.quick,
                                   compiled))
            progress.update(task, description=f"{name}: done")
    sums = [summary(r) for r in results]
    print_tables(console, sums, results)
    if a.markdown:
        a.markdown.write_text(markdown(sums, results))
    if a.json:
        a.json.write_text(json.dumps({"results": [asdict(r) for r in results], "summary": sums}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
