"""Evaluate the depth-extrapolation runs and draw docs/img/depth-*.png (see examples/depth_extrapolation.sh).

    python examples/depth_report.py out/depth          # reads out/depth/<arm>-s<seed>/, writes out/depth/report.{json,md}
    python examples/depth_report.py out/depth --ship   # also copies the headline arms' final weights to examples/depth/checkpoints/

Every arm is evaluated in the twin it was trained in, on held-out rows (mythos.eval_task: seed 10^6), at
15 difficulties in 4..30 and every inference step 1..40 from one pass of step-wise logits per difficulty. The
torch-trained headline checkpoint is evaluated by the JAX twin too (the same numbers are expected). The
issue-#14 bars are checked and printed as PASS/FAIL lines; report.md holds the tables of docs/results.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python examples/depth_report.py` from anywhere

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
SHIP = ROOT / "examples" / "depth" / "checkpoints"
DIFFICULTIES = [4, 6, 8, 10, 12, 14, 15, 16, 18, 20, 22, 24, 26, 28, 30]
N_LOOPS = 40
N_EXAMPLES = int(os.environ.get("REPORT_EXAMPLES", "512"))
STOP = ("max_confidence", "kl:1e-3", "cumulative:0.5")
ARMS = {  # arm -> (label, colour)
    "nope": ("NoPE, window 2, loops = d + U{0..2}", "tab:blue"),
    "rope": ("RoPE, window 2, loops = d + U{0..2}", "tab:orange"),
    "one-loop": ("1 loop (same parameters)", "tab:gray"),
    "fixed12": ("fixed 12 loops", "tab:brown"),
    "nope-full": ("NoPE, full causal attention", "tab:purple"),
    "ponder": ("PonderNet (13 loops, own halting)", "tab:green"),
    "jax-nope": ("JAX twin, NoPE window 2", "tab:cyan"),
    "progressive": ("progressive loss (12 loops, last 4 with gradient)", "tab:red"),
}
SHIPPED = ("nope-s0", "rope-s0", "one-loop-s0", "fixed12-s0", "ponder-s0", "jax-nope-s0")


def arm_of(run: str) -> str:
    return re.sub(r"-s\d+$", "", run)


def final_weights(run: Path) -> Path:
    from mythos.train import checkpoints

    return checkpoints(run)[-1][1] / "weights.safetensors"


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _eval_job(args: tuple[str, str, str, str]) -> tuple[str, str, list[dict], float]:
    """One run in one backend: eval_task at every difficulty (one worker process, one thread); the result is
    kept in `cache` (reused while it is newer than the weights and was made for the same difficulties)."""
    name, weights, backend, cache = args
    cached = Path(cache)
    if cached.exists() and cached.stat().st_mtime > Path(weights).stat().st_mtime:
        got = json.loads(cached.read_text())
        if got["difficulties"] == DIFFICULTIES and got["n_examples"] == N_EXAMPLES:
            return name, backend, got["rows"], got["seconds"]
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import torch

    torch.set_num_threads(1)
    from mythos.eval_task import eval_difficulties

    t0 = time.perf_counter()
    rows = eval_difficulties(weights, DIFFICULTIES, backend=backend, steps=(10, 22), n_examples=N_EXAMPLES,
                             stop=STOP, n_loops=N_LOOPS)
    for r in rows:  # the per-row arrays are not needed in the report
        r.pop("checkpoint", None)
    dt = time.perf_counter() - t0
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"difficulties": DIFFICULTIES, "n_examples": N_EXAMPLES, "rows": rows, "seconds": dt}))
    print(f"evaluated {name} ({backend}) in {dt:.0f} s: d=20 EM at 10/22 steps "
          f"{by_d(rows)[20]['exact_match'][9]:.3f}/{by_d(rows)[20]['exact_match'][21]:.3f}", flush=True)
    return name, backend, rows, dt


def _wall_seconds(root: Path, name: str) -> float | None:
    """The 'N steps done, X s' line `mythos train` printed (out/depth/<name>.txt)."""
    f = root / f"{name}.txt"
    m = re.findall(r"steps done, ([0-9.]+) s", f.read_text()) if f.exists() else []
    return float(m[-1]) if m else None


def by_d(rows: list[dict]) -> dict[int, dict]:
    return {r["difficulty"]: r for r in rows}


def em(rows: list[dict], d: int, step: int) -> float:
    return by_d(rows)[d]["exact_match"][step - 1]


def main(root: Path, ship: bool = False, workers: int = int(os.environ.get("REPORT_WORKERS", "2"))) -> int:
    from mythos.train import checkpoints

    runs = sorted(p.name for p in root.iterdir() if p.is_dir() and arm_of(p.name) in ARMS and checkpoints(p))
    if not runs:
        print(f"no runs under {root}", file=sys.stderr)
        return 2
    jobs = [(name, str(final_weights(root / name)), "jax" if name.startswith("jax-") else "torch") for name in runs]
    if "nope-s0" in runs:  # the torch-trained headline checkpoint in the JAX twin: the same numbers
        jobs.append(("nope-s0", str(final_weights(root / "nope-s0")), "jax"))
    jobs = [(*job, str(root / "eval" / f"{job[0]}.{job[2]}.json")) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(_eval_job, jobs))
    results = {"difficulties": DIFFICULTIES, "n_loops": N_LOOPS, "n_examples": N_EXAMPLES, "stop": list(STOP),
               "runs": {}, "cross": {}, "eval_seconds": {}}
    for name, backend, rows, dt in done:
        native = "jax" if name.startswith("jax-") else "torch"
        (results["runs"] if backend == native else results["cross"])[name] = rows
        results["eval_seconds"][f"{name}/{backend}"] = dt
    results["train_seconds"] = {name: _wall_seconds(root, name) for name in runs}
    results["params"] = _params(root / runs[0])
    (root / "report.json").write_text(json.dumps(results))
    md, ok = tables(results)
    (root / "report.md").write_text(md)
    print(md)
    IMG.mkdir(parents=True, exist_ok=True)
    plot(root, results)
    if ship:
        SHIP.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED:
            if name in runs:
                shutil.copyfile(final_weights(root / name), SHIP / f"{name}.safetensors")
        print(f"copied {', '.join(n for n in SHIPPED if n in runs)} to {SHIP}")
    return 0 if ok else 1


def _params(run: Path) -> int:
    """The model's parameter count, from the spec in its weights file (spec.count_params)."""
    import spec as S
    import weights_bridge as wb

    return S.count_params(wb.read_spec(final_weights(run))[0])["total"]


# --------------------------------------------------------------------------- tables and the bars


def tables(results: dict) -> tuple[str, bool]:
    runs, cross = results["runs"], results["cross"]
    out = [f"Held-out rows: {results['n_examples']} per difficulty; inference steps 1..{results['n_loops']} from one "
           f"pass of step-wise logits. Model: {results['params']:,} parameters.\n"]
    out.append("| run | trained (s) | EM d=10 @10 | EM d=20 @10 | EM d=20 @22 | gain | EM d=30 @32 | best step d=30 (EM) |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        r30 = by_d(rows)[30]
        ts = results["train_seconds"].get(name)
        out.append(f"| {name} | {'' if ts is None else f'{ts:.0f}'} | {em(rows, 10, 10):.3f} | {em(rows, 20, 10):.3f} | "
                   f"{em(rows, 20, 22):.3f} | {100 * (em(rows, 20, 22) - em(rows, 20, 10)):+.1f} pts | "
                   f"{em(rows, 30, 32):.3f} | {r30['best_step']} ({r30['best_exact_match']:.3f}) |")
    checks: list[tuple[str, bool]] = []  # the bars, on the headline run nope-s0
    seeds: list[tuple[str, bool]] = []  # the same bar on every other seed of the window arms, reported
    for name in [n for n in runs if arm_of(n) in ("nope", "rope", "jax-nope")]:
        gain = em(runs[name], 20, 22) - em(runs[name], 20, 10)
        line = (f"{name}: EM(d=20, 22 steps) - EM(d=20, 10 steps) = {100 * gain:+.1f} points >= 50", gain >= 0.5)
        (checks if name == "nope-s0" else seeds).append(line)
    if "one-loop-s0" in runs:
        worst = max(max(r["exact_match"]) for r in runs["one-loop-s0"] if r["difficulty"] == 20)
        checks.append((f"one-loop-s0: max EM at d=20 over steps 1..40 = {100 * worst:.1f}% <= 5%", worst <= 0.05))
    # stopping rules: the fraction of the best fixed step's EM kept at d = 15..30
    out.append("\nStopping rules (chosen without knowing the difficulty), difficulties 15-30: the worst fraction of "
               "the best fixed step's exact match, and the mean chosen step at d = 15 / 20 / 30.\n")
    out.append("| run | rule | worst fraction of best (d) | mean step d=15 | d=20 | d=30 |")
    out.append("|---|---|---|---|---|---|")
    for name in [n for n in runs if arm_of(n) in ("nope", "rope", "ponder", "jax-nope", "progressive")]:
        rows = by_d(runs[name])
        for rule in results["stop"]:
            fr = [(rows[d]["stopping"][rule]["fraction_of_best"], d) for d in DIFFICULTIES if 15 <= d <= 30]
            fr = [(f if f is not None else 0.0, d) for f, d in fr]
            worst, wd = min(fr)
            out.append(f"| {name} | {rule} | {worst:.3f} ({wd}) | {rows[15]['stopping'][rule]['mean_step']:.1f} | "
                       f"{rows[20]['stopping'][rule]['mean_step']:.1f} | {rows[30]['stopping'][rule]['mean_step']:.1f} |")
            if rule != "cumulative:0.5":  # mode last: the halting head is untrained, its cumulative p means nothing
                line = (f"{name} stopping rule {rule}: keeps >= 90% of the best step's EM at d = 15-30 "
                        f"(worst {worst:.3f} at d={wd})", worst >= 0.9)
                (checks if (name, rule) == ("nope-s0", "max_confidence") else seeds).append(line)
    if "ponder-s0" in runs:
        rows = by_d(runs["ponder-s0"])
        ds = np.array(DIFFICULTIES, dtype=float)
        med = np.array([rows[d]["own_halting"]["median_loops"] for d in DIFFICULTIES])
        last = np.array([rows[d]["own_halting"]["row_max_loops_median"] for d in DIFFICULTIES])
        slope, icpt = np.polyfit(ds, med, 1)
        out_range = ds > 10
        slope_out = np.polyfit(ds[out_range], med[out_range], 1)[0]
        out.append("\nPonderNet (ponder-s0), its own halting (threshold on the cumulative halting probability): median "
                   "halting step over the answer positions, median over rows of the row's largest halting step, and "
                   "exact match of its own readout against the best fixed step.\n")
        out.append("| bits d | median halting step | median row max | EM own halting | EM best fixed step |")
        out.append("|---|---|---|---|---|")
        for d in DIFFICULTIES:
            o = rows[d]["own_halting"]
            out.append(f"| {d} | {o['median_loops']:.1f} | {o['row_max_loops_median']:.1f} | {o['exact_match']:.3f} | "
                       f"{o['best_fixed_exact_match']:.3f} |")
        out.append(f"\nSlope of the median halting step against d: {slope:.3f} steps per bit over d = 4..30 "
                   f"({slope_out:.3f} over d = 11..30, past the trained range); row max: "
                   f"{np.polyfit(ds, last, 1)[0]:.3f} steps per bit.")
        o20 = rows[20]["own_halting"]
        checks.append((f"ponder-s0: median halting step grows past the trained range (slope {slope_out:.3f} > 0 "
                       f"over d = 11..30)", slope_out > 0))
        checks.append((f"ponder-s0: EM at d=20 with its own halting {o20['exact_match']:.3f} within 10 points of the "
                       f"best fixed step {o20['best_fixed_exact_match']:.3f}",
                       o20["exact_match"] >= o20["best_fixed_exact_match"] - 0.10))
    if "nope-s0" in cross and "nope-s0" in runs:
        a, b = by_d(runs["nope-s0"]), by_d(cross["nope-s0"])
        diff = max(abs(x - y) for d in DIFFICULTIES for x, y in zip(a[d]["exact_match"], b[d]["exact_match"]))
        out.append(f"\nThe torch-trained nope-s0 evaluated by the JAX twin: largest difference in exact match over "
                   f"d = 4..30 and steps 1..40: {diff:.4f} (d=20: {em(cross['nope-s0'], 20, 10):.3f} at 10 steps, "
                   f"{em(cross['nope-s0'], 20, 22):.3f} at 22).")
        checks.append((f"nope-s0 in the JAX twin gives the torch twin's exact match (max difference {diff:.4f} <= 0.002)",
                       diff <= 0.002))
    if "jax-nope-s0" in runs and "nope-s0" in runs:
        j, t = by_d(runs["jax-nope-s0"]), by_d(runs["nope-s0"])
        jin = min(j[d]["exact_match"][d + 1] for d in DIFFICULTIES if d <= 10)
        tin = min(t[d]["exact_match"][d + 1] for d in DIFFICULTIES if d <= 10)
        out.append(f"\nIn-range accuracy (worst EM over d = 4..10 at d + 2 steps): jax-nope-s0 {jin:.3f}, nope-s0 "
                   f"{tin:.3f}.")
        checks.append((f"jax-nope-s0 reaches the torch run's in-range accuracy ({jin:.3f} vs {tin:.3f}, within 0.02)",
                       jin >= tin - 0.02))
    out.append("\nThe bars of issue #14 (the headline run nope-s0, the baselines, PonderNet, the twins):\n")
    out += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    out.append("\nThe same criteria on the other seeds and rules (reported, not bars):\n")
    out += [f"- {'pass' if ok else 'fail'}: {text}" for text, ok in seeds]
    return "\n".join(out) + "\n", all(ok for _, ok in checks)


# --------------------------------------------------------------------------- plots


def plot(root: Path, results: dict) -> None:
    runs = results["runs"]
    steps = np.arange(1, results["n_loops"] + 1)
    panels = (8, 12, 15, 20, 24, 30)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True, sharey=True)
    for ax, d in zip(axes.flat, panels):
        for name, rows in runs.items():
            label, colour = ARMS[arm_of(name)]
            seed0 = name.endswith("-s0")
            ax.plot(steps, by_d(rows)[d]["exact_match"], color=colour, lw=1.8 if seed0 else 0.8,
                    alpha=1.0 if seed0 else 0.5, label=label if seed0 else None)
        ax.axvline(d, color="k", lw=0.5, ls=":")
        ax.set_title(f"{d} bits{' (trained: 1-10)' if d == 8 else ''}")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("inference loop steps")
    for ax in axes[:, 0]:
        ax.set_ylabel("exact match (all prefix parities right)")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Prefix parity: exact match against inference steps (thin lines: seeds 1, 2; dotted: steps = bits)")
    fig.tight_layout()
    fig.savefig(IMG / "depth-em-vs-steps.png", dpi=90)
    plt.close(fig)

    show = [n for n in ("nope-s0", "rope-s0", "nope-full-s0") if n in runs]
    fig, axes = plt.subplots(1, len(show), figsize=(5 * len(show), 4.5), squeeze=False)
    for ax, name in zip(axes[0], show):
        acc = np.array(by_d(runs[name])[30]["position_accuracy"])  # (N, d)
        im = ax.imshow(acc.T, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis",
                       extent=(0.5, acc.shape[0] + 0.5, 0.5, acc.shape[1] + 0.5))
        ax.plot([1, 30], [1, 30], color="w", lw=0.8, ls="--")
        ax.set_title(f"{name}, 30 bits")
        ax.set_xlabel("inference loop step")
        ax.set_ylabel("answer position (bit index)")
    fig.suptitle("Per-position accuracy over (answer position, inference step); dashed: step = position")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(IMG / "depth-heatmap.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    ds = results["difficulties"]
    for name in [n for n in ("nope-s0", "rope-s0") if n in runs]:
        rows = by_d(runs[name])
        for rule, ls in zip(results["stop"], ("-", "--", ":")):
            ax.plot(ds, [rows[d]["stopping"][rule]["mean_step"] for d in ds], ls=ls, color=ARMS[arm_of(name)][1],
                    label=f"{name} {rule}")
    ax.plot(ds, ds, color="k", lw=0.5, label="steps = bits")
    ax.axvspan(1, 10, color="0.9", label="trained")
    ax.set_xlabel("bits d")
    ax.set_ylabel("mean chosen step")
    ax.set_title("Stopping rules: the chosen step against difficulty")
    ax.legend(fontsize=7)
    ax = axes[1]
    if "ponder-s0" in runs:
        rows = by_d(runs["ponder-s0"])
        ax.plot(ds, [rows[d]["own_halting"]["median_loops"] for d in ds], "o-", color="tab:green",
                label="median halting step (answer positions)")
        ax.plot(ds, [rows[d]["own_halting"]["row_max_loops_median"] for d in ds], "s-", color="tab:olive",
                label="median of each row's last halting step")
        ax.plot(ds, ds, color="k", lw=0.5, label="steps = bits")
        ax.axvspan(1, 10, color="0.9", label="trained")
    ax.set_xlabel("bits d")
    ax.set_ylabel("loop steps")
    ax.set_title("PonderNet: its own halting step against difficulty")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(IMG / "depth-stopping.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in runs:
        lines = log(root / name)
        label, colour = ARMS[arm_of(name)]
        ax.plot([x["step"] for x in lines], _smooth([x["ce"] for x in lines]), color=colour,
                lw=1.5 if name.endswith("-s0") else 0.6, ls="--" if name.startswith("jax-") else "-",
                label=name)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy, mean of 25 steps")
    ax.set_title("Training loss (dashed: the JAX twin on the headline recipe)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(IMG / "depth-loss.png", dpi=90)
    plt.close(fig)


def _smooth(x: list[float], k: int = 25) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if len(x) < k:
        return x
    return [float("nan")] * (k - 1) + np.convolve(x, np.ones(k) / k, mode="valid").tolist()  # trailing mean


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(Path(args[0] if args else "out/depth"), ship="--ship" in sys.argv))
