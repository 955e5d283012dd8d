"""Shared benchmark helpers: the open-mythos reference model, weight import, timing, memory, ceilings.

Everything here is framework glue for `bench/*.py`; nothing in the model packages depends on it.
Torch runs with TORCH_THREADS intra-op threads (the machine has 2 cores); JAX/XLA's CPU client uses
one thread per core by default, which is also 2 here.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

import spec as spec_lib

TORCH_THREADS = 2
# (batch, tokens) of each benchmark preset, as stated in the presets' own comments
SHAPES: dict[str, tuple[int, int]] = {
    "bench-s-gqa": (4, 256),
    "bench-s-mla": (4, 256),
    "bench-m-moe64": (2, 512),
}
# halting biases written into the imported weights (the halting weight is zeroed, so p = sigmoid(bias)
# exactly, at every position): p ~ 1e-13 never reaches the threshold, so every forward runs all N
# steps; p = 0.5 gives c = 0.5 after step 1 and c = 1.0 >= 0.99 after step 2, so all halt at step 2
NEVER_HALT_BIAS = -30.0
HALT_AT_2_BIAS = 0.0


def setup_torch(threads: int = TORCH_THREADS) -> None:
    """Fix torch's intra-op thread count (and one inter-op thread) for the whole run."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass


# --------------------------------------------------------------------------- models


def om_spec(name: str) -> spec_lib.Spec:
    """The preset under `semantics: openmythos-0.5`: the same shapes, expressible as a MythosConfig."""
    return spec_lib.preset(name, {"semantics": "openmythos-0.5"})


def build_open_mythos(name: str, seed: int = 0):
    """open-mythos 0.5.0's own model for preset `name` (seeded torch init, eval mode)."""
    import torch
    import weights_bridge as wb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # open-mythos imports transformers (tokenizer module)
        from open_mythos.main import MythosConfig, OpenMythos

    cfg = MythosConfig(**wb.config_from_spec(om_spec(name)))
    torch.manual_seed(seed)
    return OpenMythos(cfg).eval()


def set_halting(om_model, bias: float) -> None:
    """Zero open-mythos' halting weight and set its bias: p = sigmoid(bias) at every position and step."""
    import torch

    with torch.no_grad():
        om_model.recurrent.act.halt.weight.zero_()
        om_model.recurrent.act.halt.bias.fill_(bias)


def import_twin(om_model, backend: str):
    """The `backend` twin holding open-mythos' weights, through weights_bridge.from_open_mythos."""
    import weights_bridge as wb

    _, model = wb.from_open_mythos(om_model, om_model.cfg, backend=backend)
    return model


def make_ids(vocab: int, batch: int, tokens: int, seed: int = 1) -> np.ndarray:
    """(batch, tokens) int64 token ids, the same array for all three models."""
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, tokens), dtype=np.int64)


def om_steps(om_model, run: Callable[[], object]) -> int:
    """Loop steps open-mythos executed during run() (counted with a hook on its halting head)."""
    calls = []
    hook = om_model.recurrent.act.register_forward_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        hook.remove()
    return len(calls)


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Seconds of each timed repeat (warmup excluded)."""
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median, a noise indicator."""
        return (max(self.times) - min(self.times)) / self.median if self.times else float("nan")


def time_once(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (fn must block until its result is ready)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process) so far; Linux /proc, else (0, 0).

    Machine busy time includes steal (time the hypervisor gave to other guests).
    """
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # fields from 3 (state) on
        utime, stime = int(fields[11]), int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, (utime + stime) / tick


def time_with_load(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds of one call and the CPU cores other processes used meanwhile (0 on a quiet machine).

    Other processes' share = (machine busy time - this process' busy time) / wall time, with the
    kernel's tick resolution (10 ms): a coarse but direct measure of contention during this call.
    """
    busy0, own0 = cpu_seconds()
    t = time_once(fn)
    busy1, own1 = cpu_seconds()
    return t, max(0.0, ((busy1 - busy0) - (own1 - own0)) / t)


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size of this process (VmRSS)."""
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_delta(fn: Callable[[], object]) -> tuple[int, str]:
    """Peak resident memory above the pre-call RSS while fn() runs, in bytes, and how it was measured.

    Linux: VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before (exact peak of
    this process, every allocator included). Elsewhere: the growth of ru_maxrss, which only sees
    peaks above the process' earlier maximum (a lower bound).
    """
    gc.collect()
    if _reset_peak():
        before = rss_bytes()
        fn()
        return max(0, _status_kb("VmHWM") * 1024 - before), "VmHWM"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before), "ru_maxrss"


# --------------------------------------------------------------------------- matmul ceilings


# Both ceilings: the same (n, n) float32 operands, the same count of warm calls, the best one timed
# to completion (torch returns when done; JAX blocks on the result). A best of 3 moved by 30-50% under
# load here; a best of 10 is far steadier. For scale: 2 AVX-512 cores (2 FMA ports x 16 lanes x 2
# flop per cycle each) peak at 270 GFLOP/s at 2.1 GHz, ~380 at 3 GHz, so float32 ceilings of
# 290-320 GFLOP/s are near that peak.
MATMUL_N = 2048
MATMUL_REPEATS = 10


def _matmul_operands(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)


def torch_matmul_seconds(n: int = MATMUL_N, repeats: int = MATMUL_REPEATS) -> float:
    """Best seconds of `repeats` warm (n, n) @ (n, n) float32 torch matmuls: the ceiling is a best case."""
    import torch

    a, b = (torch.from_numpy(x) for x in _matmul_operands(n))
    for _ in range(2):  # warm: thread pool up, pages touched
        a @ b
    return min(time_once(lambda: a @ b) for _ in range(repeats))


def jax_matmul_seconds(n: int = MATMUL_N, repeats: int = MATMUL_REPEATS) -> float:
    """Best seconds of `repeats` jitted (n, n) @ (n, n) float32 JAX matmuls (compiled, warm, blocked on)."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.device_put(x) for x in _matmul_operands(n))
    mm = jax.jit(jnp.matmul)
    for _ in range(2):  # compile, then warm
        mm(a, b).block_until_ready()
    return min(time_once(lambda: mm(a, b).block_until_ready()) for _ in range(repeats))


def matmul_flops(n: int = MATMUL_N) -> float:
    return 2.0 * n**3


# --------------------------------------------------------------------------- formatting


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f}"
