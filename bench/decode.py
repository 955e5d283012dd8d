"""Incremental decoding speed: the torch twin, the jax twin, ONNX Runtime's decode-step graph and open-mythos' own KV-cache decode.

    python bench/decode.py                      # bench-s-gqa dims, 64-token prompt, batch 1 and 8
    python bench/decode.py --new-tokens 16 --repeats 3 --batch 1
    python bench/decode.py --torch-compile      # also the torch twin with torch.compile'd decode steps
    python bench/decode.py --halted-kv-sweep    # decode.halted_kv: tokens/s against the loop steps run
    python bench/decode.py --dtype bfloat16     # the twins built in bfloat16, open-mythos under bf16 autocast

One process, one set of weights: open-mythos 0.5.0's model is built with the bench-s-gqa dims
(seeded torch init) and imported into both twins with weights_bridge.from_open_mythos. Every model
decodes greedily from the same prompt, the same number of tokens, every token with all loop steps
(a KV cache makes all three run every step). Timed: the prefill (prompt -> first token) and the
decode steps after it; decode tokens/s = batch * (new tokens - 1) / decode seconds. Repeats are
interleaved (om, torch, jax, om, ...) so that background load hits all three alike; medians.

open-mythos decodes through its own forward(ids, n_loops, kv_cache=dict, start_pos=p) with greedy
argmax (its generate() samples); the twins through model.generate(..., on_token=...), their public
API. Torch runs under torch.inference_mode for both torch models, with ONE intra-op thread by
default (--threads to change it): a decode step is thousands of ops on (B, 1, 256) tensors, too small
to split, and a second OpenMP thread only adds wake-ups (on a shared 2-core machine, spin-waits
that made both torch models 10-20x slower in our runs). JAX keeps its own CPU thread pool.
--torch-compile adds "mythos_torch (compiled)": a second torch twin whose decode steps run through
torch.compile (model.generate(..., compile=True); opt-in, its compilation is in the warmup, reported apart).
"mythos_jax (on device)" is the JAX twin's generate without on_token: greedy decoding runs every step in one
on-device loop (no host round trip per token); timed as a 1-token generate (prefill and first token) and the
whole generate, the decode span their difference.
--dtype bfloat16: both twins are built in bfloat16 from the imported weights (mythos_*.build(spec, 0,
"bfloat16", arrays): bf16 weights and activations, float32 router/norm/softmax/ACT sums as ARCHITECTURE.md
requires) and open-mythos decodes under torch.autocast("cpu", bfloat16), its own way to run in bf16; ONNX is
float32 only and is left out. bf16 rounding can flip a near-tied argmax, so the token agreement lines count.
"onnxruntime" (when the [onnx] extra is installed; --no-onnx skips it) is the torch twin's decode-step
graph (`mythos export onnx --cache`: past_*/present_* cache arrays) run by weights_bridge.onnx_backend's
generate with --threads intra-op threads; its export is in the warmup, reported apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (bench/common.py: open-mythos model, weight import, thread setup)

PRESET = "bench-s-gqa"
N_LOOPS = 8
PROMPT = 64
OM32 = "open-mythos (float32)"  # the extra reference row of a --dtype bfloat16 run
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    """Timings of one implementation at one batch size, over the repeats."""
    name: str
    batch: int
    prefill: list[float] = field(default_factory=list)  # seconds, prompt -> first token
    decode: list[float] = field(default_factory=list)  # seconds, first token -> last token
    tokens: np.ndarray | None = None  # (B, new) of the last repeat

    def rate(self, new: int) -> float:
        """Decode tokens/s (median)."""
        return self.batch * (new - 1) / statistics.median(self.decode)

    def best(self, new: int) -> float:
        """Decode tokens/s of the fastest repeat (least disturbed by other processes)."""
        return self.batch * (new - 1) / min(self.decode)

    def step_ms(self, new: int) -> float:
        return 1e3 * statistics.median(self.decode) / (new - 1)


def om_decoder(om, ids: np.ndarray, new: int, autocast: bool = False
               ) -> Callable[[], tuple[float, float, np.ndarray]]:
    """open-mythos' own incremental decode: its forward with a dict kv_cache, greedy (autocast: under
    torch.autocast("cpu", bfloat16))."""
    import contextlib

    import torch

    def run() -> tuple[float, float, np.ndarray]:
        x = torch.from_numpy(ids)
        T = ids.shape[1]
        out = []
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), bf16:
            t0 = time.perf_counter()
            cache: dict = {}
            tok = om(x, n_loops=N_LOOPS, kv_cache=cache, start_pos=0)[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            t1 = time.perf_counter()
            for i in range(new - 1):
                tok = om(tok, n_loops=N_LOOPS, kv_cache=cache, start_pos=T + i)[:, -1].argmax(-1, keepdim=True)
                out.append(tok)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, torch.cat(out, 1).numpy()

    return run


def twin_decoder(model, ids: np.ndarray, new: int, backend: str, **extra: object
                 ) -> Callable[[], tuple[float, float, np.ndarray]]:
    """A twin's model.generate (greedy; extra: e.g. compile=True), timed by its on_token callback."""
    def run() -> tuple[float, float, np.ndarray]:
        stamps: list[float] = []
        prompt = ids
        if backend == "torch":
            import torch
            prompt = torch.from_numpy(ids)
        t0 = time.perf_counter()
        out = model.generate(prompt, new, n_loops=N_LOOPS, on_token=lambda tok: stamps.append(time.perf_counter()),
                             **extra)
        return stamps[0] - t0, stamps[-1] - stamps[0], np.asarray(out)[:, ids.shape[1]:]

    return run


def jax_greedy_decoder(model, ids: np.ndarray, new: int) -> Callable[[], tuple[float, float, np.ndarray]]:
    """The JAX twin's model.generate without a callback (greedy: every decode step in one on-device loop),
    timed from outside: a 1-token generate (prefill and first token), then the whole one; the decode span
    is their difference (new - 1 tokens)."""
    def run() -> tuple[float, float, np.ndarray]:
        t0 = time.perf_counter()
        np.asarray(model.generate(ids, 1, n_loops=N_LOOPS))
        t1 = time.perf_counter()
        out = np.asarray(model.generate(ids, new, n_loops=N_LOOPS))
        return t1 - t0, (time.perf_counter() - t1) - (t1 - t0), out[:, ids.shape[1]:]

    return run


def onnx_twin(torch_model, threads: int):
    """The torch twin's weights on ONNX Runtime (its graphs exported on first use), or None without the extra."""
    try:
        from weights_bridge import onnx_backend as ox

        ox.require("onnx", "onnxruntime", "onnxscript")
    except Exception as e:  # the [onnx] extra is not installed
        print(f"onnxruntime skipped: {e}", file=sys.stderr)
        return None
    import mythos_torch as mt

    return ox.build(torch_model.spec, 0, "float32", mt.dump_arrays(torch_model), threads=threads)


def onnx_decoder(model, ids: np.ndarray, new: int) -> Callable[[], tuple[float, float, np.ndarray]]:
    """weights_bridge.onnx_backend.generate (greedy) on the decode-step graph, timed by its on_token callback."""
    from weights_bridge import onnx_backend as ox

    def run() -> tuple[float, float, np.ndarray]:
        stamps: list[float] = []
        t0 = time.perf_counter()
        out = ox.generate(model, ids, new, N_LOOPS, on_token=lambda tok: stamps.append(time.perf_counter()))
        return stamps[0] - t0, stamps[-1] - stamps[0], out[:, ids.shape[1]:]

    return run


def halt_bias(k: int, N: int) -> float:
    """The halting bias at which every token halts after exactly k steps (the halting weight zeroed, so
    p = sigmoid(bias) everywhere, threshold 0.99): p between 0.99 / k and 0.99 / (k - 1); k = N never halts."""
    if k >= N:
        return C.NEVER_HALT_BIAS
    p = 0.995 if k == 1 else (0.99 / k * 0.99 / (k - 1)) ** 0.5  # the geometric middle of that interval
    return float(np.log(p / (1 - p)))


def halted_kv_sweep(args: argparse.Namespace) -> None:
    """decode.halted_kv=compute against freeze: decode tokens/s against the mean loop count run, both twins.

    One model (--sweep-preset, seed 0, float32, mythos semantics) per twin and mode, its halting weight zeroed
    and its bias set before each run so every token halts after k = 1..N steps (halt_bias). Batch 1,
    --prompt-tokens prompt, --new-tokens per run, --repeats rounds interleaved over (k, twin, mode); medians.
    Then a least-squares line per twin and mode: ms per token = a + b * mean loop steps.
    """
    import jax
    import jax.numpy as jnp
    import torch

    import mythos_jax as mj
    import mythos_torch as mt
    import spec as spec_lib

    C.setup_torch(args.threads)
    N, new = N_LOOPS, args.new_tokens
    ids = C.make_ids(spec_lib.preset(args.sweep_preset).vocab_size, 1, args.prompt_tokens)
    ks = list(range(1, N + 1))
    models: dict[tuple[str, str], object] = {}
    for mode in ("compute", "freeze"):
        s = spec_lib.preset(args.sweep_preset, {"decode.halted_kv": mode})
        w = spec_lib.init_arrays(s, 0)
        w["recurrent.act.halt.weight"] = np.zeros_like(w["recurrent.act.halt.weight"])
        for twin, lib in (("torch", mt), ("jax", mj)):
            models[twin, mode] = lib.build(s, 0, "float32", weights=w)

    def set_bias(twin: str, mode: str, k: int) -> None:
        """p = sigmoid(bias) at every position: every token halts after k steps."""
        halt = models[twin, mode].recurrent.act.halt
        if twin == "torch":
            with torch.no_grad():
                halt.bias.fill_(halt_bias(k, N))
        else:
            halt.bias[...] = jnp.full_like(halt.bias[...], halt_bias(k, N))

    runs = {(twin, mode, k): twin_decoder(models[twin, mode], ids, new, twin)
            for k in ks for twin in ("torch", "jax") for mode in ("compute", "freeze")}
    steps: dict[tuple[str, str, int], float] = {}
    times: dict[tuple[str, str, int], list[float]] = {key: [] for key in runs}
    for key, run in runs.items():  # warmup (jax compiles once per mode), and the loop counts actually run
        set_bias(*key)
        run()
        twin, mode, k = key
        m = models[key[:2]]
        with torch.inference_mode():
            if twin == "torch":
                seq = m.generate(torch.from_numpy(ids), new, n_loops=N)
                counts = m(seq, N).loop_counts.numpy()
            else:
                counts = np.asarray(mj.forward(m, m.generate(ids, new, n_loops=N), N).loop_counts)
        steps[key] = float(counts[:, ids.shape[1]:].mean())  # the decoded tokens' loop counts
    print(f"warmed up {len(runs)} decoders", file=sys.stderr, flush=True)
    for r in range(args.repeats):
        for key, run in runs.items():
            set_bias(*key)
            times[key].append(run()[1] / (new - 1))
        print(f"round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
    rows = ["| twin | halted_kv | mean loop steps | decode tokens/s | ms per token |", "|---|---|---:|---:|---:|"]
    fits = ["| twin | halted_kv | a (ms) | b (ms per step) | time at 1 step / at N steps |", "|---|---|---:|---:|---:|"]
    for twin in ("torch", "jax"):
        for mode in ("compute", "freeze"):
            x = np.array([steps[twin, mode, k] for k in ks])
            y = np.array([1e3 * statistics.median(times[twin, mode, k]) for k in ks])
            for xi, yi in zip(x, y):
                rows.append(f"| {twin} | {mode} | {xi:.2f} | {1e3 / yi:,.0f} | {yi:.2f} |")
            b, a = np.polyfit(x, y, 1)
            fits.append(f"| {twin} | {mode} | {a:.2f} | {b:.3f} | {(a + b) / (a + b * N):.2f} |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.sweep_preset}, batch 1, prompt {args.prompt_tokens}, {new} new tokens, N = {N}, medians of "
          f"{args.repeats} interleaved rounds; torch {torch.__version__} ({torch.get_num_threads()} thread), "
          f"jax {jax.__version__}; load average {load}")
    print("\n".join(rows + [""] + ["Fit: ms per token = a + b * mean loop steps", ""] + fits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run (default 32)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    ap.add_argument("--torch-compile", action="store_true",
                    help="also time the torch twin with torch.compile'd decode steps (compiles for minutes)")
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime's decode-step graph")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the twins' dtype (bfloat16: open-mythos under bf16 autocast, no ONNX); default float32")
    ap.add_argument("--halted-kv-sweep", action="store_true",
                    help="only the decode.halted_kv sweep: tokens/s against the mean loop steps, compute vs freeze")
    ap.add_argument("--sweep-preset", default="bench-s-gqa", help="the sweep's preset (default bench-s-gqa)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="the sweep's prompt length (default 16)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the results as markdown here (e.g. docs/decode-benchmarks.md)")
    args = ap.parse_args()
    new = args.new_tokens
    if new < 2:
        ap.error("--new-tokens must be >= 2 (the first token comes from the prefill)")
    if args.halted_kv_sweep:
        return halted_kv_sweep(args)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    C.setup_torch(args.threads)
    import jax
    import torch

    say(f"building open-mythos ({PRESET} dims) and importing its weights into both twins ...")
    om = C.build_open_mythos(PRESET)
    twins = {b: C.import_twin(om, b) for b in ("torch", "jax")}
    if args.torch_compile:
        twins["torch (compiled)"] = C.import_twin(om, "torch")
    bf16 = args.dtype == "bfloat16"
    if bf16:  # the same weights, built in bfloat16 (the twins' own cast)
        import mythos_jax as mj
        import mythos_torch as mt

        arrays = mt.dump_arrays(twins["torch"])
        libs = {"torch": mt, "jax": mj, "torch (compiled)": mt}
        twins = {k: libs[k].build(m.spec, 0, "bfloat16", arrays) for k, m in twins.items()}
    onnx_model = None if args.no_onnx or bf16 else onnx_twin(twins["torch"], args.threads)
    warm: dict[tuple[int, str], float] = {}
    s = C.om_spec(PRESET)
    results: list[Result] = []
    for B in args.batch:
        ids = C.make_ids(s.vocab_size, B, PROMPT)
        runners = {"open-mythos": om_decoder(om, ids, new, autocast=bf16),
                   "mythos_torch": twin_decoder(twins["torch"], ids, new, "torch", compile=False),  # eager
                   "mythos_jax": twin_decoder(twins["jax"], ids, new, "jax"),
                   "mythos_jax (on device)": jax_greedy_decoder(twins["jax"], ids, new)}
        if bf16:  # the float32 reference too: the ratio users quote against upstream as it ships
            runners[OM32] = om_decoder(om, ids, new)
        if args.torch_compile:
            runners["mythos_torch (compiled)"] = twin_decoder(twins["torch (compiled)"], ids, new, "torch", compile=True)
        if onnx_model is not None:
            runners["onnxruntime"] = onnx_decoder(onnx_model, ids, new)
        res = {name: Result(name, B) for name in runners}
        for name, run in runners.items():
            t = time.perf_counter()
            run()  # warmup (jax: compiles the prefill and the decode step; torch.compile: the decode step)
            warm[B, name] = time.perf_counter() - t
            say(f"batch {B}: {name} warmed up ({warm[B, name]:.1f} s)")
        for r in range(args.repeats):
            for name, run in runners.items():
                p, d, toks = run()
                res[name].prefill.append(p)
                res[name].decode.append(d)
                res[name].tokens = toks
            say(f"batch {B}: repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{n} {B * (new - 1) / res[n].decode[-1]:,.0f} tok/s" for n in runners))
        results += res.values()

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average {load} at the end: "
           f"other processes share them), torch {torch.__version__} ({torch.get_num_threads()} intra-op thread(s)), "
           f"jax {jax.__version__}, python {platform.python_version()}"
           + ("" if onnx_model is None else f", onnxruntime {__import__('onnxruntime').__version__} "
              f"({args.threads} intra-op thread(s))"))
    lines = table(results, new)
    ref_tokens = {r.batch: r.tokens for r in results if r.name == "open-mythos"}
    agree = [f"- batch {r.batch}, {r.name}: {int((r.tokens == ref_tokens[r.batch]).sum())}/{r.tokens.size} greedy "
             "tokens equal open-mythos'" for r in results if not r.name.startswith("open-mythos")]
    agree += [f"- batch {B}, {name}: first (warmup) run {s:.1f} s, compilation included"
              for (B, name), s in warm.items() if not name.startswith("open-mythos")]
    kind = ("bfloat16 twins; \"open-mythos\" under bf16 autocast, \"open-mythos (float32)\" as it ships"
            if bf16 else "float32")
    print("\n".join([f"dtype: {kind}", ""] + lines + [""] + agree))
    if args.out is not None:
        cmd = "python bench/decode.py " + " ".join(sys.argv[1:])
        body = [f"# Decode benchmark ({PRESET} dims, open-mythos weights)", "",
                f"Command: `{cmd}`", "", f"Machine: {env}.", "",
                f"Dtype: {kind}. Prompt {PROMPT} tokens, {new} new tokens per run (greedy), {N_LOOPS} loop steps per token "
                f"(all run: KV cache), medians of {args.repeats} interleaved repeats (and the fastest repeat "
                "of each).", "",
                *lines, "", *agree, ""]
        # keep the hand-written sections (from the first "## " heading on) of an existing file
        old = args.out.read_text() if args.out.exists() else ""
        kept = old[old.find("\n## ") + 1:] if "\n## " in old else ""
        args.out.write_text("\n".join(body) + ("\n" + kept if kept else ""))
        say(f"written to {args.out}" + (" (hand-written sections kept)" if kept else ""))


def table(results: list[Result], new: int) -> list[str]:
    """A markdown table: decode tokens/s (median, best), ms per step, prefill ms, ratios to open-mythos."""
    ref = {r.batch: r for r in results if r.name == "open-mythos"}
    ref32 = {r.batch: r for r in results if r.name == OM32}  # a bfloat16 run: the float32 reference as well
    out = ["| batch | implementation | decode tokens/s | ms per step | prefill ms | vs open-mythos | "
           + ("vs open-mythos float32 | " if ref32 else "") + "best repeat: tokens/s | best vs best |",
           "|---:|---|---:|---:|---:|---:|" + ("---:|" if ref32 else "") + "---:|---:|"]
    for r in results:
        o = ref[r.batch]
        vs32 = f"{r.rate(new) / ref32[r.batch].rate(new):.2f}x | " if ref32 else ""
        out.append(f"| {r.batch} | {r.name} | {r.rate(new):,.0f} | {r.step_ms(new):.2f} | "
                   f"{1e3 * statistics.median(r.prefill):.1f} | {r.rate(new) / o.rate(new):.2f}x | {vs32}"
                   f"{r.best(new):,.0f} | {r.best(new) / o.best(new):.2f}x |")
    return out


if __name__ == "__main__":
    main()
