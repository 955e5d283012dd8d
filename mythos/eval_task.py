"""`mythos eval-task`: a trained checkpoint on a synthetic task, every inference step from one forward.

One forward per batch with `step_logits=True, early_exit=False` gives the logits after every loop step
t = 1..N (ModelOutput.step_logits (N, B, T, V)), so exact match and per-position accuracy at every step,
the stopping rules (mythos/stopping.py) and, for halting.mode act/ponder, the model's own halting all come
from the same pass. Held-out data: the batches of mythos.train.evaluate (seed 10^6, batch index
difficulty * 1000 + i), never a training batch.

    >>> from mythos.eval_task import eval_task
    >>> r = eval_task("runs/nope", task="pparity", difficulty=20, steps=(10, 22), backend="torch")
    >>> r["exact_match"][21], r["steps"]["22"]["exact_match"], r["stopping"]["max_confidence"]["exact_match"]

CHECKPOINT: a `mythos train` run directory (its newest step-*/), a step directory (its weights.safetensors),
a .safetensors file written by weights_bridge.save, or a directory written by `mythos export hf`; the spec
is read from the file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import spec as S

from . import stopping as ST
from .load import LoadError, check_choice, check_output_file, is_weights_dir, is_weights_file
from .tasks import get_task, make_batch, parse_difficulty, position_accuracy

EVAL_SEED = 10 ** 6  # mythos.train.evaluate's held-out seed
DEFAULT_LOOPS = 40  # steps run when --steps asks for fewer: room for the stopping rules
DEFAULT_STOP = ("max_confidence", "kl:1e-3", "cumulative:0.9")
STEP_LOGITS_BUDGET = 2 ** 27  # values of one batch's step logits (N * B * T * V): ~0.5 GB of float32


def find_weights(checkpoint: str | Path) -> Path:
    """The weights file CHECKPOINT names (see the module docstring), or a LoadError saying what is there."""
    path = Path(checkpoint)
    if is_weights_file(path):
        if not path.is_file():
            raise LoadError(f"checkpoint {str(path)!r} does not exist" if not path.exists()
                            else f"checkpoint {str(path)!r} is not a regular file")
        return path
    if not path.exists():
        raise LoadError(f"checkpoint {str(path)!r} does not exist (give a run directory, a step-*/ directory or "
                        "a .safetensors file)")
    if not path.is_dir():
        raise LoadError(f"checkpoint {str(path)!r} is neither a .safetensors file nor a directory")
    if (path / "weights.safetensors").is_file():  # a step directory of `mythos train`
        return path / "weights.safetensors"
    from .train import checkpoints

    steps = [p for _, p in checkpoints(path) if (p / "weights.safetensors").is_file()]
    if steps:  # a run directory: its newest complete checkpoint
        return steps[-1] / "weights.safetensors"
    if is_weights_dir(path):  # `mythos export hf`
        import weights_bridge as wb

        return wb.bridge.weights_path(path)
    raise LoadError(f"checkpoint {str(path)!r} holds no step-*/weights.safetensors, weights.safetensors or "
                    "*.safetensors file")


def parse_steps(text: str | int | Sequence[int]) -> tuple[int, ...]:
    """'10,22' -> (10, 22); '1-40' -> (1, ..., 40); mixed '1-4,10'; sorted, unique, each >= 1."""
    if isinstance(text, int):
        text = str(text)
    if not isinstance(text, str):
        text = ",".join(str(x) for x in text)
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            lo_i = int(lo)
            hi_i = int(hi) if sep else lo_i
        except ValueError:
            raise ValueError(f"--steps {text!r}: {part!r} is not a step count (give e.g. 10,22 or 1-40)") from None
        if not 1 <= lo_i <= hi_i:
            raise ValueError(f"--steps {text!r}: {part!r} must be >= 1 (a range low-high with low <= high)")
        out.update(range(lo_i, hi_i + 1))
    return tuple(sorted(out))


def load(checkpoint: str | Path, backend: str = "torch", dtype: str | None = None):
    """(model, weights path) of a CHECKPOINT, through weights_bridge (the spec and dtype are the file's)."""
    from .load import load_model

    check_choice("--backend", backend, ("torch", "jax"))
    path = find_weights(checkpoint)
    return load_model(path, backend, dtype=dtype), path


def check_inputs(s: S.Spec, task_name: str, difficulty: int, n_loops: int, stop: Sequence[str]) -> None:
    """Refuse what the model cannot run, naming the flag (LoadError / ValueError)."""
    task = get_task(task_name)
    if s.vocab_size < task.vocab_size:
        raise LoadError(f"--task {task_name} needs vocab_size >= {task.vocab_size}; the checkpoint's spec has "
                        f"vocab_size={s.vocab_size}")
    T = task.seq_len(difficulty)
    if T > s.max_seq_len:
        most = max((d for d in range(1, difficulty) if task.seq_len(d) <= s.max_seq_len), default=None)
        raise LoadError(f"--difficulty {difficulty} needs {T} positions, the checkpoint's spec has max_seq_len="
                        f"{s.max_seq_len}" + (f" (the most it holds: --difficulty {most})" if most else ""))
    try:
        S.check_loops(s, n_loops, what="loop steps (the largest of --steps and --loops)")
    except S.SpecError as e:
        raise LoadError(str(e)) from None
    for rule in stop:
        name, value = ST.parse_rule(rule)
        if name == "fixed" and value > n_loops:
            raise LoadError(f"--stop {rule}: step {int(value)} exceeds the {n_loops} steps run (raise --loops)")


def eval_task(checkpoint: str | Path | None = None, *, model=None, task: str = "pparity", difficulty: int = 20,
              steps: Sequence[int] | str = (10, 22), backend: str = "torch", n_examples: int = 512,
              stop: Sequence[str] = DEFAULT_STOP, n_loops: int | None = None, dtype: str | None = None,
              batch_size: int = 256, seed: int = EVAL_SEED,
              on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Evaluate a checkpoint (or a loaded `model` of `backend`) at one difficulty, every step from one pass.

    Args:
        checkpoint: see find_weights (ignored when `model` is given).
        task, difficulty: the task and its one difficulty d.
        steps: the inference steps to report (1-based); n_loops defaults to max(max(steps), 40).
        n_examples: held-out rows (mythos.train.evaluate's batches); stop: rules as `mythos.stopping.choose`.
        on_progress: called with (rows done, n_examples) after each batch.
    Returns:
        A JSON-ready dict: "exact_match" (N,) and "position_accuracy" (N, d) at every step 1..N; "steps"
        {"s": {exact_match, position_accuracy}}; "best_step", "best_exact_match"; "stopping" {rule: mean_step,
        median_step, exact_match, best_fixed_exact_match, fraction_of_best}; "own_halting" (act/ponder:
        median_loops, mean_loops, exact_match, position_accuracy of the model's own readout) or None.
    Raises:
        LoadError / ValueError: bad input, naming the flag (the CLI: exit 2).
    """
    from weights_bridge import backends

    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, np.integer)):
        lo, hi = parse_difficulty(difficulty)
        if lo != hi:
            raise ValueError(f"--difficulty {difficulty!r}: eval_task takes one difficulty (eval_difficulties: a range)")
        difficulty = lo
    difficulty = int(difficulty)
    if difficulty < 1:
        raise ValueError(f"--difficulty {difficulty} must be >= 1")
    if not isinstance(n_examples, (int, np.integer)) or n_examples < 1:
        raise ValueError(f"--examples {n_examples!r} must be an integer >= 1")
    steps = parse_steps(steps)
    stop = tuple(stop)
    for rule in stop:
        ST.parse_rule(rule)
    path = None
    if model is None:
        if checkpoint is None:
            raise ValueError("eval_task needs a checkpoint or a model")
        model, path = load(checkpoint, backend, dtype)
    s = model.spec
    N = int(n_loops) if n_loops is not None else max(max(steps), DEFAULT_LOOPS)
    if max(steps) > N:
        raise LoadError(f"--steps {max(steps)} exceeds --loops {N}")
    check_inputs(s, task, difficulty, N, stop)
    the_task = get_task(task)
    mode = s.halting.mode  # act | last | ponder: act and ponder halt on their own
    T = the_task.seq_len(difficulty)
    rows = max(1, min(batch_size, STEP_LOGITS_BUDGET // (N * T * s.vocab_size)))

    preds, corrects, targets, masks, chosen = [], [], [], [], {r: [] for r in stop}
    own_pred, own_loops = [], []
    started = time.perf_counter()
    for i in range(0, n_examples, batch_size):  # mythos.train.evaluate's batches, each split to fit memory
        b = make_batch(the_task, seed, difficulty * 1000 + i // batch_size, min(batch_size, n_examples - i), difficulty)
        for j in range(0, len(b.ids), rows):
            ids, tgt, mask = b.ids[j:j + rows], b.targets[j:j + rows], b.mask[j:j + rows]
            out = backends.forward(backend, model, ids, N, early_exit=False, step_logits=True)
            z = backends.widen(backends.to_numpy(out.step_logits)).astype(np.float64)  # (N, B, T, V)
            cum_p = backends.to_numpy(out.traces.cum_p).astype(np.float64)  # (N, B, T)
            preds.append(z.argmax(-1).astype(np.int32))
            corrects.append(ST.sweep(z, tgt, mask))
            for rule in stop:
                chosen[rule].append(ST.choose(rule, z, mask, cum_p))
            own_pred.append(backends.widen(backends.to_numpy(out.logits)).argmax(-1))
            own_loops.append(backends.to_numpy(out.loop_counts))
            targets.append(tgt)
            masks.append(mask)
        if on_progress is not None:
            on_progress(min(i + batch_size, n_examples), n_examples)
    pred, correct = np.concatenate(preds, axis=1), np.concatenate(corrects, axis=1)  # (N, B, T), (N, B)
    tgt, mask = np.concatenate(targets), np.concatenate(masks)
    em = correct.mean(axis=1)  # (N,)
    pos = position_accuracy(pred, tgt, mask)  # (N, J)
    best = int(em.argmax()) + 1
    rows_idx = np.arange(correct.shape[1])
    stopping = {}
    for rule in stop:
        st = np.concatenate(chosen[rule])
        rule_em = float(correct[st - 1, rows_idx].mean())
        stopping[rule] = {"mean_step": float(st.mean()), "median_step": float(np.median(st)),
                          "min_step": int(st.min()), "max_step": int(st.max()), "exact_match": rule_em,
                          "best_fixed_step": best, "best_fixed_exact_match": float(em[best - 1]),
                          "fraction_of_best": rule_em / float(em[best - 1]) if em[best - 1] > 0 else None}
    own = None
    if mode in ("act", "ponder"):
        op, ol = np.concatenate(own_pred), np.concatenate(own_loops)
        own_right = ((op == tgt) | ~mask).all(-1)
        answer_loops = ol[mask]
        own = {"median_loops": float(np.median(answer_loops)), "mean_loops": float(answer_loops.mean()),
               "row_max_loops_median": float(np.median(np.where(mask, ol, 0).max(-1))),
               "exact_match": float(own_right.mean()),
               "position_accuracy": position_accuracy(op, tgt, mask).tolist(),
               "best_fixed_exact_match": float(em[best - 1])}
    return {
        "checkpoint": None if path is None else str(path), "backend": backend, "task": task,
        "difficulty": difficulty, "n_examples": int(n_examples), "n_loops": N, "halting_mode": mode,
        "exact_match": em.tolist(), "position_accuracy": pos.tolist(),
        "steps": {str(t): {"exact_match": float(em[t - 1]), "position_accuracy": pos[t - 1].tolist()} for t in steps},
        "best_step": best, "best_exact_match": float(em[best - 1]), "stopping": stopping, "own_halting": own,
        "seconds": time.perf_counter() - started,
    }


def eval_difficulties(checkpoint: str | Path | None = None, difficulties: Sequence[int] | str = "4-30", *,
                      model=None, backend: str = "torch", dtype: str | None = None,
                      on_difficulty: Callable[[int, dict], None] | None = None, **kwargs) -> list[dict]:
    """eval_task at each difficulty (the model loaded once): one pass of step logits per difficulty.

    difficulties: a list, or "lo-hi"; difficulties the spec's max_seq_len cannot hold are refused (LoadError).
    kwargs: eval_task's (steps, n_examples, stop, n_loops, ...); on_difficulty(d, result) after each.
    """
    if isinstance(difficulties, str):
        lo, hi = parse_difficulty(difficulties)
        difficulties = range(lo, hi + 1)
    path = None
    if model is None:
        model, path = load(checkpoint, backend, dtype)
    results = []
    for d in difficulties:
        r = eval_task(model=model, difficulty=int(d), backend=backend, **kwargs)
        r["checkpoint"] = None if path is None else str(path)
        results.append(r)
        if on_difficulty is not None:
            on_difficulty(int(d), r)
    return results


# --------------------------------------------------------------------------- the command

BARS = "▁▂▃▄▅▆▇█"  # 0 -> ▁, 1 -> █


def spark(values: Sequence[float]) -> str:
    """Accuracies in [0, 1] as one bar character each (position 1 first)."""
    return "".join(BARS[int(round(max(0.0, min(1.0, v)) * (len(BARS) - 1)))] for v in values)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_report(console: Console, r: dict) -> None:
    """The tables of one eval_task result."""
    where = r["checkpoint"] or "model"
    t = Table(title=escape(f"{r['task']} difficulty {r['difficulty']}: {r['n_examples']} held-out examples, "
                           f"{r['backend']}, halting.mode {r['halting_mode']}, {r['n_loops']} steps from one pass "
                           f"({where})"))
    for col in ("steps", "exact match", "position acc. (mean)", "last answer", "per position (1 .. d)"):
        t.add_column(col, justify="left" if col.startswith("per") else "right")
    shown = sorted({int(s) for s in r["steps"]} | {r["best_step"]})
    for s in shown:
        pos = r["position_accuracy"][s - 1]
        label = f"{s}" + (" (best)" if s == r["best_step"] else "")
        t.add_row(label, _pct(r["exact_match"][s - 1]), _pct(float(np.mean(pos))), _pct(pos[-1]), spark(pos))
    console.print(t)
    if r["stopping"]:
        t = Table(title="stopping rules (without knowing the difficulty)")
        for col in ("rule", "mean step", "median", "range", "exact match", "best fixed step", "of best"):
            t.add_column(col, justify="left" if col == "rule" else "right")
        for rule, x in r["stopping"].items():
            t.add_row(escape(rule), f"{x['mean_step']:.2f}", f"{x['median_step']:g}", f"{x['min_step']}-{x['max_step']}",
                      _pct(x["exact_match"]), f"{x['best_fixed_step']}: {_pct(x['best_fixed_exact_match'])}",
                      _pct(x["fraction_of_best"]))
        console.print(t)
    own = r["own_halting"]
    if own is not None:
        t = Table(title=f"the model's own halting (halting.mode {r['halting_mode']}, threshold readout)")
        for col in ("median loops (answers)", "mean loops", "median of row max", "exact match", "best fixed step",
                    "per position (1 .. d)"):
            t.add_column(col, justify="left" if col.startswith("per") else "right")
        t.add_row(f"{own['median_loops']:g}", f"{own['mean_loops']:.2f}", f"{own['row_max_loops_median']:g}",
                  _pct(own["exact_match"]), _pct(own["best_fixed_exact_match"]), spark(own["position_accuracy"]))
        console.print(t)


def eval_task_command(
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="a `mythos train` run directory (its newest "
                                     "checkpoint), a step-*/ directory, or a .safetensors weights file"),
    task: str = typer.Option("pparity", help="pparity | parity | modadd | pointer (mythos/tasks.py)"),
    difficulty: str = typer.Option("20", help="the difficulty d, or a range lo-hi (one pass per difficulty, a "
                                   "summary row each)"),
    steps: str = typer.Option("10,22", help="inference steps to report, e.g. 10,22 or 1-40"),
    backend: str = typer.Option("torch", help="torch | jax"),
    examples: int = typer.Option(512, "--examples", min=1, help="held-out examples (mythos.train.evaluate's batches)"),
    stop: str = typer.Option(",".join(DEFAULT_STOP), "--stop", help="stopping rules, comma-separated: "
                             "max_confidence, kl:EPS, cumulative:C, fixed:S (mythos/stopping.py); '' for none"),
    loops: Optional[int] = typer.Option(None, "--loops", help=f"loop steps of the pass (default: max(--steps, "
                                        f"{DEFAULT_LOOPS}))"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 | bfloat16 (default: the file's)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results (every step) as JSON here"),
) -> None:
    """Evaluate a checkpoint on a task at every inference step from one pass of step-wise logits: exact match,
    per-position accuracy, stopping rules, the model's own halting (issue #14, docs/results.md).

    Exit status: 0 on success, 2 on bad input (an unknown task, a difficulty beyond max_seq_len, bad --steps or
    --stop, a missing checkpoint; nothing is written then).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(width=None if sys.stdout.isatty() else 140)
    get_task(task)
    check_choice("--backend", backend, ("torch", "jax"))
    step_list = parse_steps(steps)
    rules = tuple(x.strip() for x in stop.split(",") if x.strip())
    for rule in rules:
        ST.parse_rule(rule)
    lo, hi = parse_difficulty(difficulty)
    if json_out is not None:
        check_output_file(json_out, "--json")
    path = find_weights(checkpoint)
    from .load import resolve

    s = resolve(path).spec  # the header only: refuse a bad difficulty before any tensor is read
    N = loops if loops is not None else max(max(step_list), DEFAULT_LOOPS)
    if max(step_list) > N:
        raise LoadError(f"--steps {max(step_list)} exceeds --loops {N}")
    for d in (lo, hi):
        check_inputs(s, task, d, N, rules)
    with console.status(f"loading {escape(str(path))} ({backend})"):
        model, _ = load(path, backend, dtype)
    results = []
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        for d in range(lo, hi + 1):
            bar = progress.add_task(f"difficulty {d}: {N} steps, one pass", total=examples)
            r = eval_task(model=model, task=task, difficulty=d, steps=step_list, backend=backend, n_examples=examples,
                          stop=rules, n_loops=N,
                          on_progress=lambda done, total, bar=bar: progress.update(bar, completed=done))
            r["checkpoint"] = str(path)
            progress.remove_task(bar)
            results.append(r)
    if len(results) == 1:
        print_report(console, results[0])
    else:
        t = Table(title=escape(f"{task}: exact match by difficulty ({examples} held-out examples each, {backend}, "
                               f"{N} steps, {path})"))
        t.add_column("difficulty", justify="right")
        for st in step_list:
            t.add_column(f"step {st}", justify="right")
        t.add_column("best step", justify="right")
        for rule in rules:
            t.add_column(escape(rule), justify="right")
        if results[0]["own_halting"] is not None:
            t.add_column("own halting (median loops)", justify="right")
        for r in results:
            row = [str(r["difficulty"])] + [_pct(r["exact_match"][st - 1]) for st in step_list]
            row.append(f"{r['best_step']}: {_pct(r['best_exact_match'])}")
            row += [f"{_pct(r['stopping'][rule]['exact_match'])} @ {r['stopping'][rule]['mean_step']:.1f}"
                    for rule in rules]
            if r["own_halting"] is not None:
                row.append(f"{_pct(r['own_halting']['exact_match'])} @ {r['own_halting']['median_loops']:g}")
            t.add_row(*row)
        console.print(t)
    console.print(f"[dim]{sum(r['seconds'] for r in results):.1f} s of forward passes[/dim]")
    if json_out is not None:
        from weights_bridge.atomic import atomic_write

        payload = results[0] if len(results) == 1 else {"results": results}
        atomic_write(json_out, (json.dumps(payload, indent=1) + "\n").encode("utf-8"))
        console.print(f"results written to {escape(str(json_out))}")
