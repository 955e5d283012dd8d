"""`mythos eval`: lm-evaluation-harness on either twin, offline, with three tiny tasks shipped in mythos/eval_tasks.

    >>> from mythos.evaluate import run_eval, table_rows
    >>> results = run_eval("tiny", ["mythos_mc"], backend="jax", sets=["vocab_size=258"], output_path="r.json")
    >>> table_rows(results)            # [("mythos_mc", "acc", 0.25, 0.0993...), ...]

The model is mythos.lm_eval_model.MythosLM (lm-eval's "mythos"); docs/evaluation.md has the model_args,
the shipped tasks and lm-eval's own command line. lm-eval is imported only when an evaluation runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from weights_bridge.atomic import atomic_write
from weights_bridge.backends import BACKENDS, DTYPES

from .load import LoadError, check_choice, check_output_file

TASKS_DIR = Path(__file__).parent / "eval_tasks"
SHIPPED_TASKS = ("mythos_mc", "mythos_ppl", "mythos_gen")  # multiple choice, rolling perplexity, generation
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def go_offline() -> None:
    """No downloads from here on: the environment switches of datasets and huggingface_hub, and their copies."""
    os.environ.update(OFFLINE_ENV)
    # both libraries read the variables once, at import: a copy imported earlier is switched by hand
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def task_dir(dest: str | os.PathLike) -> Path:
    """Write the shipped task yamls into ``dest`` with absolute data_files; returns ``dest`` (for --include_path).

    lm-eval 0.4.13 hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which resolves a
    relative path against the working directory, not against the yaml; the data stays in mythos/eval_tasks.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        files = cfg["dataset_kwargs"]["data_files"]
        cfg["dataset_kwargs"]["data_files"] = {split: str((TASKS_DIR / f).resolve()) for split, f in files.items()}
        (dest / path.name).write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return dest


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from ``"a,b"`` or a list, in order, without repeats; a ValueError when there are none."""
    names = tasks.split(",") if isinstance(tasks, str) else [n for t in tasks for n in str(t).split(",")]
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise LoadError(f"--tasks {tasks!r} names no task; shipped: {', '.join(SHIPPED_TASKS)}")
    return names


def check_limit(limit: float | None) -> int | float | None:
    """lm-eval's limit: None, a count >= 1 (as an int) or a fraction in (0, 1)."""
    if limit is None:
        return None
    if not (limit > 0 and (limit < 1 or float(limit).is_integer())):
        raise LoadError(f"--limit {limit} must be a whole number of documents >= 1 or a fraction in (0, 1)")
    return int(limit) if limit >= 1 else float(limit)


def run_eval(source: str, tasks: str | Sequence[str], *, backend: str = "torch", dtype: str | None = None,
             n_loops: int | None = None, batch_size: int = 1, limit: float | None = None, seed: int = 0,
             sets: Sequence[str] = (), output_path: str | os.PathLike | None = None) -> dict:
    """Run lm-eval's simple_evaluate on a Mythos model, offline, with the shipped tasks included.

    Args:
        source: a preset, a spec .yaml, a .safetensors weights file, or a directory from `mythos export hf`.
        tasks: lm-eval task names (``"a,b"`` or a list): the shipped mythos_mc, mythos_ppl, mythos_gen, or any
            task lm-eval knows whose data is already on this machine (nothing is downloaded).
        backend, dtype, n_loops, batch_size, seed, sets: the model's (mythos.lm_eval_model.MythosLM).
        limit: documents per task (>= 1), or a fraction of them (< 1); None: all.
        output_path: where to write lm-eval's results JSON (atomically); checked before anything runs.
    Returns:
        lm-eval's results dict ("results", "configs", "versions", "n-samples", "config", ...); table_rows
        turns it into (task, metric, value, stderr) rows.
    Raises:
        LoadError, SpecError, BridgeError (ValueErrors): bad input, before any model runs or file is written.
    """
    names = parse_tasks(tasks)
    check_choice("--backend", backend, BACKENDS)
    if dtype is not None:
        check_choice("--dtype", dtype, DTYPES)
    limit = check_limit(limit)
    if output_path is not None:
        check_output_file(output_path, "--output")
    go_offline()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as e:
        raise LoadError(f"mythos eval needs lm-evaluation-harness (pip install 'mythos[eval]'): {e}") from None
    from .lm_eval_model import MythosLM

    with tempfile.TemporaryDirectory(prefix="mythos-eval-tasks-") as tmp:
        # lm-eval's own ~15k task index takes seconds to build: only when a task is not one of ours
        manager = TaskManager(include_path=str(task_dir(tmp)), include_defaults=not set(names) <= set(SHIPPED_TASKS))
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise LoadError(f"--tasks: unknown task {', '.join(map(repr, unknown))}; shipped: {', '.join(SHIPPED_TASKS)} "
                            "(or a task of lm-eval's own, see `lm-eval ls tasks`, whose data is on this machine)")
        model_args = {"source": str(source), "backend": backend, "dtype": dtype, "n_loops": n_loops,
                      "batch_size": batch_size, "seed": seed, "sets": list(sets)}
        lm = MythosLM(**model_args)
        results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=False)
    results["config"]["model"] = "mythos"
    results["config"].update(model_args=model_args, batch_size=batch_size)
    if output_path is not None:
        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        atomic_write(output_path, text.encode("utf-8"))
    return results


def table_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr or None) for every metric of lm-eval's results dict; a metric under a filter
    other than "none" reads ``metric (filter)``."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # "acc,none": metric, filter; "alias", "sample_len": not metrics
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric if filt == "none" else f"{metric} ({filt})", float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows
