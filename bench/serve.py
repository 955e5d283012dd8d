"""Serving a stream of requests: continuous batching (mythos.serve.Engine) against static batching and one
request at a time, both twins, under decode.halted_kv compute and freeze.

    python bench/serve.py                          # both twins, both modes, 32 requests at 60/s
    python bench/serve.py --twins torch --requests 48 --rate 40

The workload (seeded): requests arrive as a Poisson stream (--rate per second) with prompt lengths
uniform in 4..48, max_tokens uniform in 4..32, loop budgets n_loops = max_loop_iters for 2/3 of them
and 2 for the rest, greedy and sampled alike. The model is the tiny preset widened (dim 128, 8 loop
steps) in float32, with its halting head x40 and its bias centred so ACT loop counts spread by position.

    engine      Engine(max_num_seqs) stepped as requests arrive: admits, decodes, retires mid-flight
    static      batches of max_num_seqs requests in arrival order through model.generate with left
                padding: a batch starts when its last request has arrived and the previous batch is done,
                runs the batch's largest max_tokens and n_loops, and every request waits for the slowest
    sequential  model.generate per request, in arrival order

Throughput = generated tokens (each request's own, max_tokens) / seconds from the first arrival to the last
finish; ttft = first token - arrival; e2e = finish - arrival (p50 / p90 / p99 over the requests). JAX
runs every mode once untimed first (XLA compiles each shape once), then the timed run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import spec as S  # noqa: E402
from mythos.serve import Engine, SamplingParams  # noqa: E402


@dataclass
class Req:
    arrival: float
    prompt: list[int]
    params: SamplingParams


def workload(n: int, rate: float, max_loops: int, seed: int = 0) -> list[Req]:
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    for i in range(n):
        t += float(rng.exponential(1.0 / rate))
        p = SamplingParams(max_tokens=int(rng.integers(4, 33)), temperature=[0.0, 0.8][i % 2], seed=i,
                           n_loops=max_loops if i % 3 else 2)
        out.append(Req(t, rng.integers(0, 256, int(rng.integers(4, 49))).tolist(), p))
    return out


def build(twin: str, halted_kv: str):
    import torch

    import mythos_jax as mj
    import mythos_torch as mt

    s = S.load("tiny", overrides={"dim": 128, "vocab_size": 256, "max_seq_len": 128, "recurrent.max_loop_iters": 8,
                                  "attention.n_heads": 4, "attention.n_kv_heads": 2, "moe.expert_dim": 64,
                                  "decode.halted_kv": halted_kv})
    w = S.init_arrays(s, 0)
    w["recurrent.act.halt.weight"] = w["recurrent.act.halt.weight"] * 40.0
    ids = np.random.default_rng(99).integers(0, s.vocab_size, (2, 32))
    with torch.no_grad():
        out = mt.build(s, 0, "float32", weights=w)(torch.from_numpy(ids), early_exit=False)
    w["recurrent.act.halt.bias"] = w["recurrent.act.halt.bias"] - float(torch.logit(out.traces.halt_p).mean()) - 0.5
    return (mt if twin == "torch" else mj).build(s, 0, "float32", weights=w)


def generate(m, ids: np.ndarray, n: int, p: SamplingParams, n_loops: int, on_token, mask=None):
    import torch

    kw = dict(temperature=p.temperature, seed=p.seed, on_token=on_token)
    if type(m).__module__.startswith("mythos_torch"):
        with torch.no_grad():
            m.generate(torch.from_numpy(ids), n, n_loops, attention_mask=None if mask is None else torch.from_numpy(mask),
                       **kw)
    else:
        m.generate(ids, n, n_loops, attention_mask=mask, **kw)


def run_engine(m, reqs: list[Req], max_num_seqs: int) -> tuple[dict, dict]:
    eng = Engine(m, max_num_seqs=max_num_seqs, block_size=16)
    t0 = time.perf_counter()
    first, end, ids, i = {}, {}, {}, 0
    while i < len(reqs) or eng.has_work():
        now = time.perf_counter() - t0
        while i < len(reqs) and reqs[i].arrival <= now:
            ids[eng.submit(reqs[i].prompt, reqs[i].params)] = i
            i += 1
        if not eng.has_work():
            time.sleep(max(0.0, reqs[i].arrival - now))
            continue
        for ev in eng.step():
            t = time.perf_counter() - t0
            k = ids[ev.request_id]
            first.setdefault(k, t)
            if ev.finished:
                end[k] = t
    return dict(first=first, end=end), eng.stats()


def run_static(m, reqs: list[Req], max_num_seqs: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    first, end = {}, {}
    for j in range(0, len(reqs), max_num_seqs):
        batch = list(range(j, min(j + max_num_seqs, len(reqs))))
        wait = reqs[batch[-1]].arrival - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)
        T = max(len(reqs[k].prompt) for k in batch)
        ids = np.zeros((len(batch), T), dtype=np.int64)
        mask = np.zeros((len(batch), T), dtype=np.int64)
        for b, k in enumerate(batch):  # left padding
            ids[b, T - len(reqs[k].prompt):] = reqs[k].prompt
            mask[b, T - len(reqs[k].prompt):] = 1
        n = max(reqs[k].params.max_tokens for k in batch)
        N = max(reqs[k].params.n_loops for k in batch)  # one loop count per batch: the largest budget
        seen = []

        def on_token(tok, batch=batch, seen=seen):
            t = time.perf_counter() - t0
            seen.append(t)
            for k in batch:
                first.setdefault(k, t)
                if len(seen) == reqs[k].params.max_tokens:
                    end.setdefault(k, t)

        generate(m, ids, n, reqs[batch[0]].params, N, on_token, mask if (mask == 0).any() else None)
        t = time.perf_counter() - t0
        for k in batch:
            end[k] = t  # a static batch returns once its slowest request is done
    return dict(first=first, end=end), {}


def run_sequential(m, reqs: list[Req], _: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    first, end = {}, {}
    for k, r in enumerate(reqs):
        wait = r.arrival - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)
        generate(m, np.array([r.prompt]), r.params.max_tokens, r.params, r.params.n_loops,
                 lambda tok, k=k: first.setdefault(k, time.perf_counter() - t0))
        end[k] = time.perf_counter() - t0
    return dict(first=first, end=end), {}


def summarize(reqs: list[Req], times: dict, wall: float) -> dict:
    ttft = np.array([times["first"][k] - r.arrival for k, r in enumerate(reqs)])
    e2e = np.array([times["end"][k] - r.arrival for k, r in enumerate(reqs)])
    tokens = sum(r.params.max_tokens for r in reqs)
    span = max(times["end"].values()) - reqs[0].arrival
    return dict(tok_s=tokens / span, ttft50=np.percentile(ttft, 50), ttft90=np.percentile(ttft, 90),
                e2e50=np.percentile(e2e, 50), e2e90=np.percentile(e2e, 90), e2e99=np.percentile(e2e, 99), wall=wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--twins", default="torch,jax")
    ap.add_argument("--modes", default="compute,freeze", help="decode.halted_kv values")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=60.0, help="arrivals per second")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    import torch
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    rows = []
    for twin in args.twins.split(","):
        for hk in args.modes.split(","):
            m = build(twin, hk)
            reqs = workload(args.requests, args.rate, m.spec.recurrent.max_loop_iters)
            for name, fn in (("engine", run_engine), ("static", run_static), ("sequential", run_sequential)):
                if twin == "jax":  # compile every shape first
                    fn(m, reqs, args.max_num_seqs)
                t = time.perf_counter()
                times, st = fn(m, reqs, args.max_num_seqs)
                r = summarize(reqs, times, time.perf_counter() - t)
                r.update(twin=twin, hk=hk, name=name, steps=st.get("mean_loop_steps"), pre=st.get("preemptions"))
                rows.append(r)
                print(f"{twin} {hk} {name}: {r['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    table = Table(title=f"bench/serve.py: {args.requests} requests at {args.rate}/s, max_num_seqs={args.max_num_seqs}")
    for col in ("twin", "halted_kv", "scheduler", "tokens/s", "ttft p50", "ttft p90", "e2e p50", "e2e p90", "e2e p99",
                "loop steps/token", "preemptions"):
        table.add_column(col, justify="left" if col in ("twin", "halted_kv", "scheduler") else "right")
    for r in rows:
        table.add_row(r["twin"], r["hk"], r["name"], f"{r['tok_s']:.1f}", *(f"{r[k] * 1e3:.0f} ms" for k in (
            "ttft50", "ttft90", "e2e50", "e2e90", "e2e99")), "" if r["steps"] is None else f"{r['steps']:.2f}",
            "" if r["pre"] is None else str(r["pre"]))
    Console(width=170).print(table)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
