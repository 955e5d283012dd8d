"""`mythos train`: train either twin on a synthetic task, with checkpoints, resume and an evaluation table.

A run directory holds
    step-000200/weights.safetensors     the model, through weights_bridge.save (atomic)
    step-000200/optimizer.safetensors   optimizer state + step + run metadata (spec, config, task, backend)
    log.jsonl                           one JSON line per step (loss, parts, lr, tokens/s, loops)
A checkpoint directory is written under a temporary name and renamed when complete, so a crash
never leaves a partial one. Resuming loads the newest checkpoint and continues; data and loop counts
depend only on (seed, step), so the final weights equal those of an uninterrupted run (bitwise in
float64, tests/test_train.py). A checkpoint of another spec, backend, task or config is refused.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import spec as S
from spec.tasks import Task, exact_match, get_task, make_batch, parse_difficulty
from spec.training import TrainConfig, loop_plan, read_state, write_state

FORMAT = "mythos-train"
FORMAT_VERSION = 1


class TrainError(ValueError):
    """A run that cannot start or resume; the message says why and what to do."""


@dataclass(frozen=True)
class Run:
    """Everything that defines a run: a checkpoint may be resumed only by an equal Run."""
    spec: S.Spec
    cfg: TrainConfig
    task: str
    difficulty: tuple[int, int]
    backend: str

    def meta(self, step: int) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": self.backend, "spec": S.dump(self.spec),
                "config": self.cfg.to_dict(), "task": self.task, "difficulty": list(self.difficulty), "step": step}


def check_run(run: Run, task: Task) -> None:
    """The spec can hold the task (vocabulary, sequence length), or a TrainError naming the field."""
    s = run.spec
    if run.backend not in ("torch", "jax"):
        raise TrainError(f"--backend {run.backend!r} is not allowed; allowed: torch, jax")
    if s.vocab_size < task.vocab_size:
        raise TrainError(f"task {task.name} needs vocab_size >= {task.vocab_size}, the spec has vocab_size="
                         f"{s.vocab_size} (--set vocab_size={task.vocab_size})")
    T = task.seq_len(run.difficulty[1])
    if s.max_seq_len < T:
        raise TrainError(f"task {task.name} at difficulty {run.difficulty[1]} needs max_seq_len >= {T}, the spec has "
                         f"max_seq_len={s.max_seq_len} (--set max_seq_len={T})")


# --------------------------------------------------------------------------- checkpoints


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories of a run, oldest first."""
    found = []
    for p in out.glob("step-*"):
        if p.is_dir() and p.name[5:].isdigit() and (p / "optimizer.safetensors").is_file():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def save_checkpoint(out: Path, run: Run, tr, keep: int = 2) -> Path:
    """Write step-<step>/ (weights + optimizer state) atomically; keep the newest `keep` checkpoints."""
    import weights_bridge as wb

    train = _train_module(run.backend)
    final = out / f"step-{tr.step:06d}"
    tmp = out / f".step-{tr.step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wb.save(tr.model, tmp / "weights.safetensors")
    write_state(tmp / "optimizer.safetensors", train.optimizer_arrays(tr), run.meta(tr.step))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the checkpoint appears complete or not at all
    for _, old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, run: Run):
    """A Trainer restored from a checkpoint directory, after checking that it belongs to `run`."""
    import weights_bridge as wb

    arrays, meta = read_state(path / "optimizer.safetensors")
    want = run.meta(int(meta.get("step", -1)))
    if meta.get("format") != FORMAT:
        raise TrainError(f"{path} is not a mythos train checkpoint")
    diffs = []
    for key in ("backend", "task", "difficulty", "spec"):
        if meta.get(key) != want[key]:
            shown = "(the spec differs)" if key == "spec" else f"{meta.get(key)!r}, this run {want[key]!r}"
            diffs.append(f"{key}: checkpoint {shown}" if key != "spec" else "spec: the checkpoint's spec differs")
    cfg_diff = sorted(k for k in want["config"] if meta.get("config", {}).get(k) != want["config"][k])
    if cfg_diff:
        diffs.append("config: " + ", ".join(f"{k} checkpoint {meta['config'].get(k)!r} vs {want['config'][k]!r}"
                                            for k in cfg_diff))
    if diffs:
        raise TrainError(f"refusing to resume from {path}: it belongs to another run ({'; '.join(diffs)}); "
                         "use another --out directory, or --no-resume to start over there")
    model = wb.load(path / "weights.safetensors", backend=run.backend)
    train = _train_module(run.backend)
    tr = train.Trainer(model, run.cfg)
    train.load_optimizer_arrays(tr, arrays)
    return tr


# --------------------------------------------------------------------------- training and evaluation


def _train_module(backend: str):
    return importlib.import_module(f"mythos_{backend}.train")


def _twin(backend: str):
    twin = importlib.import_module(f"mythos_{backend}")
    return twin


def new_trainer(run: Run):
    """A fresh model (spec.init_arrays(spec, cfg.seed)) and its Trainer."""
    if run.backend == "jax" and run.cfg.dtype == "float64":
        _twin("jax").set_parity_precision()  # float64 needs jax_enable_x64
    model = _twin(run.backend).build(run.spec, seed=run.cfg.seed, dtype=run.cfg.dtype)
    return _train_module(run.backend).Trainer(model, run.cfg)


def train(run: Run, out: Path | None, *, checkpoint_every: int = 0, resume: bool = True, stop_at: int | None = None,
          on_step: Callable[[int, object, float], None] | None = None, log: bool = True):
    """Train `run` from scratch or from the newest checkpoint in `out`; returns the Trainer.

    Args:
        run: spec, config, task, difficulty, backend.
        out: run directory for checkpoints and log.jsonl (None: neither).
        checkpoint_every: write a checkpoint every K steps and at the end (0: only at the end).
        resume: continue from the newest checkpoint in `out` when there is one.
        stop_at: stop after this step (a deliberate interruption; the run resumes later), default cfg.steps.
        on_step: called with (step, StepResult, tokens per second) after each step.
    """
    task = get_task(run.task)
    check_run(run, task)
    tr = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        found = checkpoints(out)
        if found and resume:
            tr = load_checkpoint(found[-1][1], run)
        elif found:
            for _, p in found:
                shutil.rmtree(p)
            (out / "log.jsonl").unlink(missing_ok=True)
    if tr is None:
        tr = new_trainer(run)
    train_mod = _train_module(run.backend)
    cfg, end = run.cfg, min(run.cfg.steps, stop_at if stop_at is not None else run.cfg.steps)
    logf = open(out / "log.jsonl", "a") if (out is not None and log) else None
    try:
        while tr.step < end:
            step = tr.step
            b = make_batch(task, cfg.seed, step, cfg.batch_size, run.difficulty)
            n, k = loop_plan(cfg, run.spec, step)
            t0 = time.perf_counter()
            r = train_mod.train_step(tr, b.ids, b.targets, b.mask, n, k)
            dt = time.perf_counter() - t0
            tps = b.ids.size / dt
            if logf is not None:
                logf.write(json.dumps({"step": step, "loss": r.loss, **r.parts, "lr": r.lr, "grad_norm": r.grad_norm,
                                       "n_loops": n, "no_grad_steps": k, "seconds": dt, "tokens": int(b.ids.size)}) + "\n")
                logf.flush()
            if on_step is not None:
                on_step(step, r, tps)
            if out is not None and ((checkpoint_every and tr.step % checkpoint_every == 0) or tr.step == end):
                save_checkpoint(out, run, tr)
    finally:
        if logf is not None:
            logf.close()
    return tr


def predict(backend: str, model, ids: np.ndarray, n_loops: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy predictions (B, T) and loop counts (B, T) of an inference forward (early exit)."""
    if backend == "torch":
        import torch

        with torch.no_grad():
            out = model(torch.as_tensor(ids), n_loops)
        return out.logits.argmax(-1).numpy(), out.loop_counts.numpy()
    import mythos_jax

    out = mythos_jax.forward(model, ids, n_loops)
    return np.asarray(out.logits).argmax(-1), np.asarray(out.loop_counts)


def evaluate(backend: str, model, task: Task, difficulty: int, n_loops: int, *, n_examples: int = 512,
             seed: int = 10 ** 6, batch_size: int = 256) -> dict[str, float]:
    """Exact match and mean loop count (answer positions) at one difficulty, on held-out batches (seed 10^6)."""
    hits, loops, answers = 0, 0.0, 0
    for i in range(0, n_examples, batch_size):
        b = make_batch(task, seed, difficulty * 1000 + i // batch_size, min(batch_size, n_examples - i), difficulty)
        pred, counts = predict(backend, model, b.ids, n_loops)
        hits += int(exact_match(pred, b).sum())
        loops += float(counts[b.mask].sum())
        answers += int(b.mask.sum())
    return {"difficulty": difficulty, "n_loops": n_loops, "exact_match": hits / n_examples,
            "mean_loops": loops / max(answers, 1)}


# --------------------------------------------------------------------------- the command


def train_command(
    spec_source: str = typer.Argument(..., metavar="SPEC", help="preset name or spec .yaml"),
    task: str = typer.Option("modadd", help="modadd | pointer | parity (spec/tasks.py; modadd is the validated one, docs/results.md)"),
    difficulty: str = typer.Option("1-4", help="training difficulty: d, or a range lo-hi drawn per row"),
    backend: str = typer.Option("torch", help="torch | jax"),
    steps: int = typer.Option(1000, min=1, help="optimizer steps of the whole run"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    lr: float = typer.Option(3e-3, help="peak learning rate (AdamW)"),
    warmup: int = typer.Option(100, min=0, help="warmup steps"),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio"),
    weight_decay: float = typer.Option(0.1, "--weight-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="max global gradient norm (0: off)"),
    loops_min: Optional[int] = typer.Option(None, "--loops-min", help="draw the loop count per batch in [min, max]"),
    loops_max: Optional[int] = typer.Option(None, "--loops-max"),
    bptt: Optional[int] = typer.Option(None, help="backpropagate through the last BPTT loop steps only"),
    seed: int = typer.Option(0, help="seed of the weights, data and loop draws"),
    dtype: str = typer.Option("float32", help="float32 | float64 | bfloat16"),
    out: Optional[Path] = typer.Option(None, help="run directory: checkpoints and log.jsonl"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0, help="checkpoint every K steps (0: at the end)"),
    resume: bool = typer.Option(True, help="continue from the newest checkpoint in --out"),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", help="stop after this step (resume later)"),
    eval_difficulty: str = typer.Option("", "--eval-difficulty", help="difficulties of the final table, e.g. 1-8 "
                                        "(default: the training range)"),
    eval_loops: Optional[int] = typer.Option(None, "--eval-loops", help="loop steps at evaluation (default max_loop_iters)"),
    eval_examples: int = typer.Option(512, "--eval-examples", min=1),
    set_: list[str] = typer.Option([], "--set", help="override a spec field (repeatable)"),
) -> None:
    """Train a twin on a synthetic task: progress (loss, tokens/s, loops), checkpoints, resume, exact-match table.

    Exit status: 0 on success, 2 on bad input or a checkpoint of another run.
    """
    console = Console(width=None if sys.stdout.isatty() else 120)

    def fail(msg: str) -> None:
        console.print(f"[red]error:[/red] {msg}")
        raise typer.Exit(2)

    try:
        overrides = dict(S.parse_override(x) for x in set_)
        s = S.load(spec_source, overrides=overrides)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup,
                          weight_decay=weight_decay, grad_clip=grad_clip, loops_min=loops_min, loops_max=loops_max,
                          bptt=bptt, seed=seed, dtype=dtype)
        run = Run(s, cfg, task, parse_difficulty(difficulty), backend)
        check_run(run, get_task(task))
        eval_range = parse_difficulty(eval_difficulty or difficulty)
    except (S.SpecError, ValueError) as e:
        fail(str(e))

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s  loops {task.fields[loops]:.2f}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    started = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"{backend} {task}", total=cfg.steps, loss=float("nan"), tps=0.0, loops=0.0)

        def on_step(step: int, r, tps: float) -> None:
            progress.update(bar, completed=step + 1, loss=r.loss, tps=tps, loops=r.parts["loops"])

        try:
            tr = train(run, out, checkpoint_every=checkpoint_every, resume=resume, stop_at=stop_at, on_step=on_step)
        except TrainError as e:
            fail(str(e))
        progress.update(bar, completed=tr.step)
    console.print(f"[dim]{tr.step} steps done, {time.perf_counter() - started:.1f} s"
                  + (f", checkpoint in {checkpoints(out)[-1][1]}" if out is not None and checkpoints(out) else "") + "[/dim]")
    if tr.step < cfg.steps:
        return
    n = eval_loops or s.recurrent.max_loop_iters
    t = Table(title=f"exact match on held-out examples ({eval_examples} per difficulty, {n} loop steps)")
    for col in ("difficulty", "exact match", "mean loops (answers)"):
        t.add_column(col, justify="right")
    for d in range(eval_range[0], eval_range[1] + 1):
        if get_task(task).seq_len(d) > s.max_seq_len:
            break
        r = evaluate(backend, tr.model, get_task(task), d, n, n_examples=eval_examples)
        t.add_row(str(d), f"{100 * r['exact_match']:.1f}%", f"{r['mean_loops']:.2f}")
    console.print(t)
