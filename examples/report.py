"""Evaluate the validated run's checkpoints and draw docs/img/results-*.png (see examples/validated_run.sh).

    python examples/report.py out/validated        # reads out/validated/{torch,jax,baseline,random-depth}/

Every model is evaluated in the torch twin: the JAX run's final weights go through weights_bridge
(the twins compute the same forward). Exact match on held-out examples (seed 10^6, never trained on)
by difficulty, for inference loop counts 1, 2, 4, 8, 12 (and 16 for the random-depth run, trained on
up to 8); ACT stays on (early exit), so the loop count is a maximum. ACT loop counts at the answers.
Prints the markdown tables of docs/results.md and writes results.json beside the runs.
"""

from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import weights_bridge as wb  # noqa: E402
from mythos.train import checkpoints, evaluate  # noqa: E402
from mythos.tasks import get_task  # noqa: E402

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
RUNS = ("torch", "jax", "baseline", "random-depth")
LABEL = {"torch": "torch-trained, looped (4)", "jax": "jax-trained, looped (4)",
         "baseline": "baseline (1 loop)", "random-depth": "torch, random depth (1-8)"}
TRAINED = {"torch": "4", "jax": "4", "baseline": "1", "random-depth": "1-8"}
LOOPS = {"torch": [1, 2, 4, 8, 12], "jax": [1, 2, 4, 8, 12], "baseline": [1, 4],
         "random-depth": [1, 2, 4, 8, 12, 16]}
LOOPED = ("torch", "jax", "random-depth")


def final_checkpoint(run: Path) -> tuple[int, Path]:
    step, path = checkpoints(run)[-1]
    return step, path / "weights.safetensors"


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _eval_job(args) -> tuple[str, int, list[dict]]:
    """One (run, loop count): exact match and ACT loops at every difficulty (one worker process)."""
    name, weights, n, task_name, difficulties, n_examples = args
    import torch

    torch.set_num_threads(1)
    model = wb.load(Path(weights), backend="torch")
    task = get_task(task_name)
    rows = [evaluate("torch", model, task, d, n, n_examples=n_examples) for d in difficulties]
    print(name, f"loops={n}", " ".join(f"{r['exact_match']:.3f}" for r in rows), flush=True)
    return name, n, rows


def _wall_seconds(root: Path, name: str) -> float | None:
    """The 'N steps done, X s' line that `mythos train` printed (out/validated.<name>.txt)."""
    f = root.parent / f"{root.name}.{name}.txt"
    if not f.exists():
        return None
    m = re.findall(r"steps done, ([0-9.]+) s", f.read_text())
    return float(m[-1]) if m else None


def main(root: Path, task_name: str = "modadd", max_difficulty: int = 12, n_examples: int = 512,
         workers: int = int(os.environ.get("REPORT_WORKERS", "2"))) -> None:
    runs = {name: root / name for name in RUNS if (root / name).is_dir() and checkpoints(root / name)}
    ckpt = {name: final_checkpoint(run) for name, run in runs.items()}
    difficulties = list(range(1, max_difficulty + 1))
    jobs = [(name, str(ckpt[name][1]), n, task_name, difficulties, n_examples) for name in runs for n in LOOPS[name]]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(_eval_job, jobs))
    results: dict = {"difficulties": difficulties, "n_examples": n_examples, "runs": {}}
    for name, run in runs.items():
        lg = log(run)
        seconds = sum(r["seconds"] for r in lg)
        results["runs"][name] = {
            "steps": ckpt[name][0], "train_seconds": seconds, "wall_seconds": _wall_seconds(root, name),
            "tokens_per_second": sum(r["tokens"] for r in lg) / seconds,
            "mean_train_loops": float(np.mean([r["n_loops"] for r in lg])),
            "final_ce": float(np.mean([r["ce"] for r in lg[-50:]])),
            "eval": {str(n): rows for nm, n, rows in done if nm == name}}
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    plot(runs, results)


# --------------------------------------------------------------------------- tables (markdown)


def _em(rows: list[dict], d: int) -> float:
    return 100 * rows[d - 1]["exact_match"]


def print_tables(results: dict) -> None:
    R, ds = results["runs"], [d for d in results["difficulties"] if d <= 8]
    print("\n| run | steps | step time (s, sum) | wall (s) | tokens/s | mean train loops | CE, mean of last 50 steps |")
    print("|---|---|---|---|---|---|---|")
    for name, r in R.items():
        wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] else "-"
        print(f"| {LABEL[name]} | {r['steps']} | {r['train_seconds']:.0f} | {wall} | {r['tokens_per_second']:,.0f} "
              f"| {r['mean_train_loops']:.2f} | {r['final_ce']:.3f} |")

    print("\nexact match (%) by difficulty\n")
    print("| model | loops at inference | " + " | ".join(f"d={d}" if d == 1 else str(d) for d in ds) + " |")
    print("|---|---|" + "---|" * len(ds))
    for name, r in R.items():
        for n, rows in r["eval"].items():
            tag = f"{n} (trained)" if n == TRAINED[name] else n
            print(f"| {LABEL[name]} | {tag} | " + " | ".join(f"{_em(rows, d):.1f}" for d in ds) + " |")

    print("\nexact match (%) at d = 4..8 against the inference loop count (ACT on: early exit)\n")
    ns = sorted({int(n) for name in LOOPED if name in R for n in R[name]["eval"]})
    print("| model | d | " + " | ".join(f"{n} loops" for n in ns) + " |")
    print("|---|---|" + "---|" * len(ns))
    for name in LOOPED:
        if name not in R:
            continue
        for d in range(4, 9):
            cells = [f"{_em(R[name]['eval'][str(n)], d):.1f}" if str(n) in R[name]["eval"] else "-" for n in ns]
            print(f"| {LABEL[name]} | {d} | " + " | ".join(cells) + " |")

    print("\nmean ACT loop count at the answer positions\n")
    print("| model, max loops | " + " | ".join(f"d={d}" if d == 1 else str(d) for d in ds) + " |")
    print("|---|" + "---|" * len(ds))
    for name in LOOPED:
        if name not in R:
            continue
        for n, rows in R[name]["eval"].items():
            if n in ("1", "2"):
                continue
            print(f"| {LABEL[name]}, {n} | " + " | ".join(f"{rows[d - 1]['mean_loops']:.2f}" for d in ds) + " |")


# --------------------------------------------------------------------------- plots


def plot(runs: dict, results: dict) -> None:
    R, difficulties = results["runs"], results["difficulties"]
    IMG.mkdir(parents=True, exist_ok=True)
    # 1. loss curves: the twins (same seed and data), the baseline, the random-depth run
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
    for name, style in (("torch", dict(color="C0", lw=1.6)), ("jax", dict(color="C1", lw=1.0, ls="--")),
                        ("baseline", dict(color="C2", lw=1.0, alpha=0.8)),
                        ("random-depth", dict(color="C3", lw=1.0, alpha=0.8))):
        if name in runs:
            lg = log(runs[name])
            ax.plot([r["step"] for r in lg], _smooth([r["ce"] for r in lg]), label=LABEL[name], **style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (answers, smoothed)")
    ax.set_title("training loss (same seed and batches)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(IMG / "results-loss.png")
    plt.close(fig)

    # 2. depth extrapolation: exact match by difficulty, per inference loop count, beside the baseline
    panels = [name for name in LOOPED if name in R]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.5), dpi=80, sharey=True, squeeze=False)
    all_n = sorted({int(n) for name in panels for n in R[name]["eval"]})
    for ax, name in zip(axes[0], panels):
        for n in sorted(int(k) for k in R[name]["eval"]):
            rows = R[name]["eval"][str(n)]
            ax.plot(difficulties, [x["exact_match"] for x in rows], marker="o", ms=2.5, lw=1.2,
                    color=plt.cm.viridis(all_n.index(n) / max(len(all_n) - 1, 1)), label=f"{n} loops")
        if "baseline" in R:
            rows = R["baseline"]["eval"]["1"]
            ax.plot(difficulties, [x["exact_match"] for x in rows], color="k", ls="--", marker="x", ms=3, lw=1,
                    label="baseline, 1 loop")
        ax.axvspan(0.5, 4.5, color="0.9", zorder=0)
        ax.set_xlabel("difficulty (operands)")
        ax.set_title(LABEL[name], fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("exact match (grey: trained d)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("depth extrapolation: max inference loops (ACT on)", fontsize=10)
    fig.tight_layout()
    fig.savefig(IMG / "results-depth.png")
    plt.close(fig)

    # 3. loop counts chosen by ACT at the answers, against difficulty
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
    for name, color in (("torch", "C0"), ("jax", "C1"), ("random-depth", "C3")):
        if name in R:
            ns = [k for k in R[name]["eval"] if k in ("4", "8", "12", "16")]
            for n, ls in zip((ns[0], ns[-1]), ("-", ":")):
                rows = R[name]["eval"][n]
                ax.plot(difficulties, [x["mean_loops"] for x in rows], ls=ls, color=color, marker="o", ms=2.5,
                        label=f"{LABEL[name]}, at most {n}")
    ax.set_xlabel("difficulty (operands)")
    ax.set_ylabel("mean ACT loop count")
    ax.set_title("loop counts chosen by ACT (answer positions)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(IMG / "results-act.png")
    plt.close(fig)
    print(f"wrote {IMG}/results-{{loss,depth,act}}.png")


def _smooth(x: list[float], k: int = 25) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(len(x)):
        lo = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/validated"))
