"""Evaluate the validated run's checkpoints and draw docs/img/results-*.png (see examples/validated_run.sh).

    python examples/report.py runs/validated        # reads runs/validated/{torch,jax,baseline}/

Every model is evaluated in the torch twin: the JAX run's final weights go through weights_bridge
(the twins compute the same forward). Exact match on held-out examples (seed 10^6, never trained on)
by difficulty, for inference loop counts up to 3x the trained depth; ACT loop counts at the answers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import weights_bridge as wb  # noqa: E402
from parity.train import checkpoints, evaluate  # noqa: E402
from spec.tasks import get_task  # noqa: E402

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def final_model(run: Path):
    step, path = checkpoints(run)[-1]
    return step, wb.load(path / "weights.safetensors", backend="torch")


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def main(root: Path, task_name: str = "modadd", max_difficulty: int = 12, n_examples: int = 512) -> None:
    task = get_task(task_name)
    runs = {name: root / name for name in ("torch", "jax", "baseline") if (root / name).is_dir()}
    models = {name: final_model(run) for name, run in runs.items()}
    n_train = models["torch"][1].spec.recurrent.max_loop_iters
    loops = sorted({1, 2, n_train, 2 * n_train, 3 * n_train})
    difficulties = list(range(1, max_difficulty + 1))
    results: dict = {"loops": loops, "difficulties": difficulties, "runs": {}}
    for name, (step, model) in models.items():
        rows = {}
        for n in loops:
            rows[n] = [evaluate("torch", model, task, d, n, n_examples=n_examples) for d in difficulties]
            print(name, f"loops={n}", " ".join(f"{r['exact_match']:.2f}" for r in rows[n]), flush=True)
        lg = log(runs[name])
        seconds = sum(r["seconds"] for r in lg)
        results["runs"][name] = {
            "steps": step, "train_seconds": seconds, "tokens_per_second": sum(r["tokens"] for r in lg) / seconds,
            "final_ce": float(np.mean([r["ce"] for r in lg[-50:]])), "eval": {str(n): r for n, r in rows.items()}}
    (root / "results.json").write_text(json.dumps(results, indent=1))

    IMG.mkdir(parents=True, exist_ok=True)
    # 1. loss curves of the twins, same seed and data
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
    for name, style in (("torch", dict(color="C0", lw=1.6)), ("jax", dict(color="C1", lw=1.0, ls="--")),
                        ("baseline", dict(color="C2", lw=1.0, alpha=0.8))):
        if name in runs:
            lg = log(runs[name])
            ax.plot([r["step"] for r in lg], _smooth([r["ce"] for r in lg]), label=f"{name}", **style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (answers, smoothed)")
    ax.set_title("training loss: torch and jax twins, same seed and batches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "results-loss.png")
    plt.close(fig)

    # 2. depth extrapolation: exact match by difficulty, per inference loop count, beside the baseline
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    for i, n in enumerate(loops):
        r = results["runs"]["torch"]["eval"][str(n)]
        ax.plot(difficulties, [x["exact_match"] for x in r], marker="o", ms=3, color=plt.cm.viridis(i / len(loops)),
                label=f"looped, {n} loops")
    if "baseline" in results["runs"]:
        r = results["runs"]["baseline"]["eval"]["1"]
        ax.plot(difficulties, [x["exact_match"] for x in r], color="k", ls="--", marker="x", ms=4,
                label="baseline (1 loop, same parameters)")
    ax.axvspan(0.5, 4.5, color="0.9", zorder=0, label="trained difficulties")
    ax.set_xlabel("difficulty (operands)")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("depth extrapolation (torch-trained model)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(IMG / "results-depth.png")
    plt.close(fig)

    # 3. loop counts chosen by ACT at the answers, against difficulty
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
    for name, ls in (("torch", "-"), ("jax", "--")):
        if name in results["runs"]:
            for n in (n_train, loops[-1]):
                r = results["runs"][name]["eval"][str(n)]
                ax.plot(difficulties, [x["mean_loops"] for x in r], ls=ls, marker="o", ms=3,
                        label=f"{name}-trained, at most {n} loops")
    ax.set_xlabel("difficulty (operands)")
    ax.set_ylabel("mean ACT loop count")
    ax.set_title("loop counts chosen by ACT")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(IMG / "results-act.png")
    plt.close(fig)
    print(f"wrote {root / 'results.json'} and {IMG}/results-{{loss,depth,act}}.png")


def _smooth(x: list[float], k: int = 25) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(len(x)):
        lo = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/validated"))
