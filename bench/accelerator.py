"""Forward, forward+backward and decode on an accelerator: open-mythos vs the torch twin vs the JAX twin, bfloat16.

    python bench/accelerator.py                          # CUDA for torch when present, JAX's default backend
    python bench/accelerator.py --device cpu --tiny      # the code paths on the CPU (bench/gpu.sh --dry-run)
    python bench/accelerator.py --out table.md --json raw.json

Run by bench/gpu.sh (which installs the packages first). One process per run, for each preset: open-mythos
0.5.0's model is built (seeded, on the CPU), its halting head set so that every position runs all 8 loop
steps, and its weights imported into both twins (weights_bridge.from_open_mythos), as in bench/forward.py.
Then, in bfloat16: open-mythos under torch.autocast(bfloat16) (float32 weights), the torch twin built in
bfloat16 (`mythos_torch.build(spec, 0, "bfloat16", weights)`), the JAX twin built in bfloat16, each moved to
its device. Attention: the torch twin calls F.scaled_dot_product_attention, which picks flash / memory-
efficient kernels on CUDA by itself (the backends enabled are reported); the JAX twin runs
jax.nn.dot_product_attention(implementation="xla") (the twin fixes "xla"; cuDNN flash would need a twin
option), open-mythos its own attention. Timed, medians of --repeats after one warm call (the JAX compile and
the first CUDA call excluded, reported apart): the forward, forward+backward (mean next-token cross-entropy,
gradients of every parameter, no optimizer step) and greedy decode at batch 1 (--new-tokens tokens after a
--prompt-tokens prompt, KV cache: all loop steps per token). The device is synchronised before each clock
read (torch.cuda.synchronize / block_until_ready). Torch on a TPU would need torch_xla: not supported here,
the torch rows then run on the CPU and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/accelerator.py` from anywhere

N_LOOPS = 8
PRESETS = ("bench-s-gqa", "bench-m-moe64")
TINY = ("bench-s-gqa", 1, 32)  # --tiny: one preset at 1 x 32 tokens (a smoke run of the code paths)
MODELS = ("open-mythos", "torch", "jax")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu"), default="auto",
                   help="auto: torch on CUDA when available, JAX on its default backend; cpu: both on the CPU")
    p.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated (default {','.join(PRESETS)})")
    p.add_argument("--tiny", action="store_true", help=f"only {TINY[0]} at {TINY[1]} x {TINY[2]} tokens (smoke run)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per decode run (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="decode prompt length (default 64)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: fwd, fwdbwd, decode")
    p.add_argument("--out", type=Path, help="write the markdown table here")
    p.add_argument("--json", type=Path, help="write the raw times here")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats must be >= 1, got {a.repeats}")
    if a.new_tokens < 2:
        p.error(f"--new-tokens must be >= 2 (the first token comes from the prefill), got {a.new_tokens}")
    bad = {x for x in a.skip.split(",") if x} - {"fwd", "fwdbwd", "decode"}
    if bad:
        p.error(f"--skip: unknown part(s) {', '.join(sorted(bad))}; allowed: fwd, fwdbwd, decode")
    return a


# --------------------------------------------------------------------------- devices


def torch_device(choice: str) -> str:
    import torch

    return "cuda" if choice == "auto" and torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, list[float]]:
    """(seconds of the first call, seconds of each of `repeats` later calls), the device synchronised."""
    def once() -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    first = once()
    return first, [once() for _ in range(repeats)]


def environment(device: str) -> str:
    import jax
    import torch

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__} on {device}"]
    if device == "cuda":
        b = torch.backends.cuda
        parts.append(f"{torch.cuda.get_device_name(0)}; SDPA backends enabled: flash {b.flash_sdp_enabled()}, "
                     f"memory-efficient {b.mem_efficient_sdp_enabled()}, cudnn {b.cudnn_sdp_enabled()}, "
                     f"math {b.math_sdp_enabled()}")
    d = jax.devices()[0]
    parts.append(f"jax {jax.__version__} on {d.platform} ({getattr(d, 'device_kind', d.platform)}, "
                 f"{jax.device_count()} device(s))")
    return "; ".join(parts)


# --------------------------------------------------------------------------- one preset


def run_preset(name: str, batch: int, tokens: int, a: argparse.Namespace, device: str) -> dict:
    """Every measurement of one preset: {model: {"fwd": [...], "fwdbwd": [...], "decode": [...], ...}}."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F
    from flax import nnx

    import mythos_jax as mj
    import mythos_torch as mt
    from bench import common as C

    skip = set(a.skip.split(","))
    om = C.build_open_mythos(name)
    C.set_halting(om, C.NEVER_HALT_BIAS)  # every position runs all N steps, in all three models
    spec = C.import_twin(om, "torch").spec
    arrays = mt.dump_arrays(C.import_twin(om, "torch"))
    pt = mt.build(spec, 0, "bfloat16", arrays).to(device).eval()
    jx = mj.build(spec, 0, "bfloat16", arrays)
    om = om.to(device)
    ids_np = C.make_ids(spec.vocab_size, batch, tokens)
    ids_pt = torch.from_numpy(ids_np).to(device)
    tgt_pt = torch.roll(ids_pt, -1, dims=1)
    ids_jx = jnp.asarray(ids_np, jnp.int32)
    tgt_jx = jnp.roll(ids_jx, -1, axis=1)
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16)  # noqa: E731

    def om_fwd() -> object:
        with torch.no_grad(), autocast():
            return om(ids_pt, n_loops=N_LOOPS)

    def pt_fwd() -> object:
        with torch.no_grad():
            return pt(ids_pt, N_LOOPS)

    def jx_fwd() -> object:
        out = mj.forward(jx, ids_jx, N_LOOPS)
        out.logits.block_until_ready()
        return out

    def torch_fwdbwd(model, logits_fn, cast: bool) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            if cast:
                with autocast():
                    logits = logits_fn()
            else:
                logits = logits_fn()
            F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt_pt.reshape(-1)).backward()
        return run

    graphdef, params, rest = nnx.split(jx, nnx.Param, ...)

    def loss_fn(params, rest, ids, targets):
        logits = nnx.merge(graphdef, params, rest)(ids, N_LOOPS, early_exit=False).logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))

    def jx_fwdbwd() -> None:
        jax.block_until_ready(step(params, rest, ids_jx, tgt_jx))

    # equal work: all N steps everywhere
    n_pt, n_jx = int(pt_fwd().n_steps), int(jx_fwd().n_steps)
    n_om = C.om_steps(om, om_fwd)
    if (n_om, n_pt, n_jx) != (N_LOOPS,) * 3:
        raise RuntimeError(f"{name}: loop steps open-mythos {n_om}, torch {n_pt}, jax {n_jx}; expected {N_LOOPS}")

    res: dict = {m: {} for m in MODELS}
    parts: list[tuple[str, str, Callable[[], object]]] = []
    if "fwd" not in skip:
        parts += [("fwd", "open-mythos", om_fwd), ("fwd", "torch", pt_fwd), ("fwd", "jax", jx_fwd)]
    if "fwdbwd" not in skip:
        parts += [("fwdbwd", "open-mythos", torch_fwdbwd(om, lambda: om(ids_pt, n_loops=N_LOOPS), True)),
                  ("fwdbwd", "torch", torch_fwdbwd(pt, lambda: pt(ids_pt, N_LOOPS).logits, False)),
                  ("fwdbwd", "jax", jx_fwdbwd)]
    for part, model, fn in parts:
        first, times = timed(fn, a.repeats, device)
        res[model][part], res[model][f"{part}_first"] = times, first
        print(f"{name}: {part} {model}: {1e3 * statistics.median(times):,.1f} ms", file=sys.stderr, flush=True)
    if "decode" not in skip:
        prompt = C.make_ids(spec.vocab_size, 1, a.prompt_tokens, seed=2)
        for model, fn in decoders(om, pt, jx, prompt, a.new_tokens, device).items():
            first, times = timed(fn, a.repeats, device)
            res[model]["decode"], res[model]["decode_first"] = times, first
            print(f"{name}: decode {model}: {(a.new_tokens - 1) / statistics.median(times):,.0f} tok/s",
                  file=sys.stderr, flush=True)
    res["_meta"] = {"batch": batch, "tokens": tokens, "new_tokens": a.new_tokens, "prompt": a.prompt_tokens}
    return res


def decoders(om, pt, jx, prompt, new: int, device: str) -> dict[str, Callable[[], object]]:
    """Greedy decode of `new` tokens at batch 1 (the whole generate call is timed: prefill + decode steps)."""
    import numpy as np
    import torch

    ids_pt = torch.from_numpy(prompt).to(device)
    T = prompt.shape[1]

    def om_run() -> np.ndarray:  # open-mythos' own KV-cache decode (its forward with a dict cache), greedy
        out = []
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
            cache: dict = {}
            tok = om(ids_pt, n_loops=N_LOOPS, kv_cache=cache, start_pos=0)[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            for i in range(new - 1):
                tok = om(tok, n_loops=N_LOOPS, kv_cache=cache, start_pos=T + i)[:, -1].argmax(-1, keepdim=True)
                out.append(tok)
        return torch.cat(out, 1).cpu().numpy()

    def pt_run() -> np.ndarray:
        with torch.inference_mode():
            return pt.generate(ids_pt, new, n_loops=N_LOOPS).cpu().numpy()

    def jx_run() -> np.ndarray:
        return np.asarray(jx.generate(prompt, new, n_loops=N_LOOPS))

    return {"open-mythos": om_run, "torch": pt_run, "jax": jx_run}


# --------------------------------------------------------------------------- report


def markdown(results: dict[str, dict], env: str, cmd: str) -> str:
    med = statistics.median
    lines = [f"Command: `{cmd}`", "", f"Environment: {env}.", "",
             "bfloat16 (open-mythos: torch.autocast), all 8 loop steps; medians; `x om` = open-mythos' median / "
             "the model's. Decode: batch 1, greedy, the whole generate call (prefill + steps).", "",
             "| preset | model | fwd ms | fwd x om | fwd+bwd ms | fwd+bwd x om | decode tok/s | decode x om | "
             "first call (compile) fwd / fwd+bwd / decode s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        meta, om = res["_meta"], res["open-mythos"]
        for model in MODELS:
            r = res[model]
            cells = [f"{name} {meta['batch']}x{meta['tokens']}", model]
            for part in ("fwd", "fwdbwd"):
                if part in r:
                    cells += [f"{1e3 * med(r[part]):,.1f}", f"{med(om[part]) / med(r[part]):.2f}"]
                else:
                    cells += ["-", "-"]
            if "decode" in r:
                cells += [f"{(meta['new_tokens'] - 1) / med(r['decode']):,.0f}",
                          f"{med(om['decode']) / med(r['decode']):.2f}"]
            else:
                cells += ["-", "-"]
            cells.append(" / ".join(f"{r[p + '_first']:.1f}" if p + "_first" in r else "-"
                                    for p in ("fwd", "fwdbwd", "decode")))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported
    from bench import common as C

    device = torch_device(a.device)
    if device == "cpu":
        C.setup_torch()
    import warnings

    warnings.filterwarnings("ignore")
    env = environment(device)
    print(env, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    names = [n.strip() for n in a.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in C.SHAPES]
    if unknown:
        print(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(C.SHAPES)}", file=sys.stderr)
        return 2
    presets = [TINY] if a.tiny else [(n, *C.SHAPES[n]) for n in names]
    results = {name: run_preset(name, b, t, a, device) for name, b, t in presets}
    cmd = "python bench/accelerator.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(results, env, cmd) + f"\nWall time {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    if a.out:
        a.out.write_text(text)
    if a.json:
        a.json.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
