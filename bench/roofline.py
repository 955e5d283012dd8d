"""The roofline of one Mythos forward: every GEMM it runs, timed alone, plus the memory traffic of the rest.

    from bench import roofline as R
    gemms, traffic = R.gemms(spec, B, T), R.traffic(spec, B, T)
    bw = R.torch_bandwidth()                       # bytes/s of a large copy
    times = R.time_gemms_torch(gemms, "float32")   # best seconds per distinct shape
    R.roofline(gemms, traffic, times, bw, "float32", n_steps=8)   # {"fixed": s, "step": s, "total": s, ...}

What is counted (from the spec, the shapes of the forward: the twins' code, which open-mythos shares):
- GEMMs: prelude/coda attention projections (GQA: wq wk wv wo; MLA: q_down q_up_nope q_up_rope kv_down
  kv_up wo), the attention score and value products per (batch, kv-head group) (GQA: the G query heads
  of a group share one key matrix, so one (G*T, K) x (K, S) product; MLA: per head), the dense SwiGLU
  (gate, up, down), in the loop: the same attention, the router, the routed experts at the BALANCED
  expectation (every expert gets ceil(B*T*top_k / E) rows: the best case of a grouped GEMM; the
  random-init routing is skewed, which costs more), the shared experts, LoRA (down, up) and the halting
  head (a (B*T, D) x (D, 1) product); the tied head (B*T, D) x (D, V).
- Causal attention: the score and value products are timed as full (T, S) products and counted at the
  causal fraction (T + 1) / (2 T) of their FLOPs (a blocked kernel skips the masked blocks).
- Memory traffic of everything else, bytes read + written per op from the shapes, in the model's dtype:
  RMSNorms, RoPE of q and k, residual adds, the SwiGLU activation product, the MoE dispatch gather and
  combine, the loop step's extras (loop embedding, e-injection, LoRA add, LTI injection, ACT
  accumulation, the state-norm trace), the embedding gather; the attention core as a fused kernel
  (q, k, v read once, the output written once: the score matrix stays in cache, so this part is a
  best case), softmax's exponentials not counted as compute. Divided by the bandwidth of a large
  copy measured in the same run.
Each distinct shape is timed warm, best of `repeats` samples. Torch: a sample is one call (eager
torch pays its per-op dispatch in the model too; single calls keep a descheduled OpenMP thread from
spoiling whole samples on a shared machine). JAX: a sample is `inner` jitted calls dispatched back to
back, blocked on the last one, over their count (~2 ms per sample: dispatch overlaps compute, as it
does inside one compiled program). The roofline is a best case: what the machine allows for this forward's shapes
with no fusion across ops, not a bound every kernel must respect.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

import spec as spec_lib

ELEM_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Gemm:
    """`count` products of (batch, m, k) x (k, n) per forward (part "fixed") or per loop step (part "step")."""
    name: str
    part: str
    batch: int
    m: int
    k: int
    n: int
    count: int = 1
    scale: float = 1.0  # fraction of the product the forward needs (causal attention: (T + 1) / 2T)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.m, self.k, self.n

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n * self.count * self.scale


@dataclass(frozen=True)
class Traffic:
    """Elements read + written by one non-GEMM op, per forward ("fixed") or per loop step ("step")."""
    name: str
    part: str
    elements: float


# --------------------------------------------------------------------------- the forward's work


def _attention(s: spec_lib.Spec, B: int, T: int, part: str, pre: str) -> tuple[list[Gemm], list[Traffic]]:
    a, D, BT = s.attention, s.dim, B * T
    causal = (T + 1) / (2 * T)
    if a.type == "gqa":
        H, Hkv, K = a.n_heads, a.n_kv_heads, s.head_dim
        G = H // Hkv
        g = [Gemm(f"{pre}.attn.wq", part, 1, BT, D, H * K), Gemm(f"{pre}.attn.wk", part, 1, BT, D, Hkv * K),
             Gemm(f"{pre}.attn.wv", part, 1, BT, D, Hkv * K), Gemm(f"{pre}.attn.wo", part, 1, BT, H * K, D),
             Gemm(f"{pre}.attn.scores", part, B * Hkv, G * T, K, T, 1, causal),
             Gemm(f"{pre}.attn.values", part, B * Hkv, G * T, T, K, 1, causal)]
        q, kv = BT * H * K, BT * Hkv * K
        t = [Traffic(f"{pre}.attn.rope", part, 2 * (q + kv)),
             Traffic(f"{pre}.attn.core (fused)", part, q + 2 * kv + q)]
        return g, t
    H, nope, rope, vd = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    g = [Gemm(f"{pre}.attn.q_down", part, 1, BT, D, a.q_lora_rank),
         Gemm(f"{pre}.attn.q_up_nope", part, 1, BT, a.q_lora_rank, H * nope),
         Gemm(f"{pre}.attn.q_up_rope", part, 1, BT, a.q_lora_rank, H * rope),
         Gemm(f"{pre}.attn.kv_down", part, 1, BT, D, a.kv_lora_rank + rope),
         Gemm(f"{pre}.attn.kv_up", part, 1, BT, a.kv_lora_rank, H * (nope + vd)),
         Gemm(f"{pre}.attn.wo", part, 1, BT, H * vd, D),
         Gemm(f"{pre}.attn.scores", part, B * H, T, nope + rope, T, 1, causal),
         Gemm(f"{pre}.attn.values", part, B * H, T, T, vd, 1, causal)]
    qk = BT * H * (nope + rope)
    t = [Traffic(f"{pre}.attn.q_norm, kv_norm", part, 2 * BT * (a.q_lora_rank + a.kv_lora_rank)),
         Traffic(f"{pre}.attn.rope", part, 2 * (BT * H * rope + BT * rope)),
         Traffic(f"{pre}.attn.cat q, k (expand k_r)", part, 2 * 2 * qk),
         Traffic(f"{pre}.attn.core (fused)", part, 2 * qk + 2 * BT * H * vd)]
    return g, t


def _swiglu(name: str, part: str, rows: int, D: int, hidden: int, count: int = 1) -> tuple[list[Gemm], list[Traffic]]:
    g = [Gemm(f"{name}.gate", part, 1, rows, D, hidden, count), Gemm(f"{name}.up", part, 1, rows, D, hidden, count),
         Gemm(f"{name}.down", part, 1, rows, hidden, D, count)]
    return g, [Traffic(f"{name}.silu(gate) * up", part, 3 * rows * hidden * count)]


def _block(s: spec_lib.Spec, B: int, T: int, part: str, pre: str, moe: bool) -> tuple[list[Gemm], list[Traffic]]:
    D, BT = s.dim, B * T
    E = BT * D
    g, t = _attention(s, B, T, part, pre)
    t += [Traffic(f"{pre}.norms (attn, ffn)", part, 2 * 2 * E), Traffic(f"{pre}.residual adds", part, 2 * 3 * E)]
    if not moe:
        g2, t2 = _swiglu(f"{pre}.ffn", part, BT, D, s.ffn_hidden)
        return g + g2, t + t2
    m = s.moe
    rows = math.ceil(BT * m.top_k / m.n_experts)  # balanced expectation
    g.append(Gemm(f"{pre}.moe.router", part, 1, BT, D, m.n_experts))
    g2, t2 = _swiglu(f"{pre}.moe.experts (balanced: {rows} rows each)", part, rows, D, m.expert_dim, m.n_experts)
    g3, t3 = _swiglu(f"{pre}.moe.shared", part, BT, D, s.shared_expert_dim, m.n_shared_experts)
    t += [Traffic(f"{pre}.moe.route (softmax, top-k)", part, 2 * BT * m.n_experts),
          Traffic(f"{pre}.moe.dispatch gather + combine", part, 2 * BT * m.top_k * D + BT * m.top_k * D + E),
          Traffic(f"{pre}.moe.shared adds", part, 3 * E * m.n_shared_experts)]
    return g + g2 + g3, t + t2 + t3


def gemms_and_traffic(s: spec_lib.Spec, B: int, T: int) -> tuple[list[Gemm], list[Traffic]]:
    """Every GEMM and non-GEMM op of a forward of (B, T) tokens: fixed ones (per forward) and per loop step."""
    if s.recurrent.cross_loop_attention.enabled or s.recurrent.compressor.enabled or s.recurrent.memory_gate.enabled:
        raise ValueError("roofline: the hypothesised components (cross_loop_attention, compressor, memory_gate) "
                         "are not modelled; allowed: a spec with all three disabled (the bench presets)")
    D, BT = s.dim, B * T
    E = BT * D
    gs: list[Gemm] = []
    ts: list[Traffic] = [Traffic("embedding gather", "fixed", 2 * E), Traffic("final norm", "fixed", 2 * E)]
    for i in range(s.prelude_layers):
        g, t = _block(s, B, T, "fixed", f"prelude.{i}", False)
        gs, ts = gs + g, ts + t
    for j in range(s.coda_layers):
        g, t = _block(s, B, T, "fixed", f"coda.{j}", False)
        gs, ts = gs + g, ts + t
    gs.append(Gemm("head", "fixed", 1, BT, D, s.vocab_size))
    g, t = _block(s, B, T, "step", "loop", s.recurrent.ffn == "moe")
    gs, ts = gs + g, ts + t
    r = s.recurrent.lora_rank
    if r > 0:
        gs += [Gemm("loop.lora.down", "step", 1, BT, D, r), Gemm("loop.lora.up", "step", 1, BT, r, D)]
        ts.append(Traffic("loop.lora add", "step", 3 * E))
    if s.halting.head == "linear":
        gs.append(Gemm("loop.halt", "step", 1, BT, D, 1))
    else:
        gs += [Gemm("loop.halt.hidden", "step", 1, BT, D, s.halting.mlp_hidden),
               Gemm("loop.halt.out", "step", 1, BT, s.halting.mlp_hidden, 1)]
    ts += [Traffic("loop.loop embedding add", "step", 2 * E), Traffic("loop.h + e, norm", "step", 3 * E + 2 * E),
           Traffic("loop.LTI injection (A h + B e + o)", "step", 4 * E),
           Traffic("loop.ACT accumulate (y += w h)", "step", 3 * E), Traffic("loop.state-norm trace", "step", E)]
    return gs, ts


# --------------------------------------------------------------------------- timing


def _sample(run, inner: int) -> float:
    t0 = time.perf_counter()
    run(inner)
    return (time.perf_counter() - t0) / inner


def _inner(run, target_s: float = 2e-3, cap: int = 64) -> int:
    """Calls per sample so that one sample lasts about target_s (one call is timed to estimate it)."""
    one = _sample(run, 1)
    return max(1, min(cap, int(target_s / max(one, 1e-7))))


def _distinct(gemms: list[Gemm]) -> list[tuple[int, int, int, int]]:
    return sorted({g.shape for g in gemms})


def time_gemms_torch(gemms: list[Gemm], dtype: str, repeats: int = 20) -> dict[tuple[int, int, int, int], float]:
    """Best seconds of one (batch, m, k) x (k, n) torch.matmul per distinct shape (warm, single calls)."""
    import torch

    td = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = {}
    gen = torch.Generator().manual_seed(0)
    for shape in _distinct(gemms):
        b, m, k, n = shape
        a = torch.randn((b, m, k) if b > 1 else (m, k), generator=gen).to(td)
        w = torch.randn((b, k, n) if b > 1 else (k, n), generator=gen).to(td)

        def run(r: int, a=a, w=w) -> None:
            for _ in range(r):
                torch.matmul(a, w)

        run(2)
        out[shape] = min(_sample(run, 1) for _ in range(repeats))
    return out


def time_gemms_jax(gemms: list[Gemm], dtype: str, repeats: int = 20) -> dict[tuple[int, int, int, int], float]:
    """Best seconds of one jitted matmul per distinct shape (compiled, warm, calls back to back, blocked on).

    The matmul is the JAX twin's own (mythos_jax.precision.mm): in bfloat16 float32 sums and a bf16 result,
    the form that reaches the CPU's bfloat16 units (a plain bf16 x bf16 -> bf16 dot runs in float32 on XLA:CPU).
    """
    import jax
    import jax.numpy as jnp

    from mythos_jax.precision import mm as twin_mm

    jd = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    rng = np.random.default_rng(0)
    out = {}
    for shape in _distinct(gemms):
        b, m, k, n = shape
        a = jnp.asarray(rng.standard_normal((b, m, k) if b > 1 else (m, k), dtype=np.float32), jd)
        w = jnp.asarray(rng.standard_normal((b, k, n) if b > 1 else (k, n), dtype=np.float32), jd)
        mm = jax.jit(twin_mm)

        def run(r: int, a=a, w=w, mm=mm) -> None:
            y = None
            for _ in range(r):
                y = mm(a, w)
            y.block_until_ready()

        run(2)  # compile, warm
        inner = _inner(run)
        out[shape] = min(_sample(run, inner) for _ in range(repeats))
    return out


def torch_bandwidth(mib: int = 256, repeats: int = 5, dtype: str = "float32") -> float:
    """Bytes/s (read + write) of the best of `repeats` warm copies of a `mib` MiB tensor (torch.Tensor.copy_)."""
    import torch

    n = mib * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best = min(_sample(lambda r: [dst.copy_(src) for _ in range(r)], 1) for _ in range(repeats))
    return 2 * n * 4 / best


def jax_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s (read + write) of the best of `repeats` jitted, donated x + 1 over a `mib` MiB float32 array."""
    import jax
    import jax.numpy as jnp

    n = mib * 2**20 // 4
    f = jax.jit(lambda x: x + 1.0, donate_argnums=0)  # donated: the output reuses the input's pages
    box = [f(jnp.ones(n, jnp.float32))]
    box[0].block_until_ready()

    def run(r: int) -> None:
        for _ in range(r):
            box[0] = f(box[0])
        box[0].block_until_ready()

    run(1)
    best = min(_sample(run, 1) for _ in range(repeats))
    return 2 * n * 4 / best


# --------------------------------------------------------------------------- the roofline


def roofline(gemms: list[Gemm], traffic: list[Traffic], times: dict[tuple[int, int, int, int], float],
             bandwidth: float, dtype: str, n_steps: int) -> dict[str, float]:
    """Roofline seconds: sum of count x scale x best time over the GEMMs plus traffic bytes / bandwidth.

    Returns fixed (per forward), step (per loop step), total (fixed + n_steps x step) seconds, their GEMM
    and memory parts, and the GEMMs' FLOPs (total at n_steps).
    """
    eb = ELEM_BYTES[dtype]
    out: dict[str, float] = {}
    for part in ("fixed", "step"):
        out[f"{part}_gemm"] = sum(g.count * g.scale * times[g.shape] for g in gemms if g.part == part)
        out[f"{part}_mem"] = sum(t.elements for t in traffic if t.part == part) * eb / bandwidth
        out[part] = out[f"{part}_gemm"] + out[f"{part}_mem"]
    out["total"] = out["fixed"] + n_steps * out["step"]
    out["flops"] = sum(g.flops * (n_steps if g.part == "step" else 1) for g in gemms)
    return out


def breakdown(gemms: list[Gemm], times: dict[tuple[int, int, int, int], float]) -> list[tuple[str, str, str, float, float]]:
    """(name, part, shape text, seconds per forward or step, GFLOP/s) of each GEMM, for a report."""
    rows = []
    for g in gemms:
        t = g.count * g.scale * times[g.shape]
        shape = (f"{g.batch} x " if g.batch > 1 else "") + f"({g.m}, {g.k}) x ({g.k}, {g.n})" + \
                (f" x {g.count}" if g.count > 1 else "")
        rows.append((g.name, g.part, shape, t, g.flops / t / 1e9 if t else float("nan")))
    return rows
