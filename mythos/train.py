"""`mythos train`: train either twin on a synthetic task, with checkpoints, resume and an evaluation table.

A run directory holds
    step-000200/weights.safetensors     the model, through weights_bridge.save (atomic)
    step-000200/optimizer.safetensors   optimizer state + step + run metadata (spec, config, task, backend)
    log.jsonl                           one JSON line per step (loss, parts, lr, tokens/s, loops)
A checkpoint directory is written under a temporary name and renamed when complete, so a crash
never leaves a partial one. Resuming loads the newest checkpoint and continues; data and loop counts
depend only on (seed, step), so the final weights equal those of an uninterrupted run (bitwise in
float64, tests/test_train.py). A checkpoint of another spec, backend, task or config is refused.

Failure handling (issue 17):
- the optimizer-state file is checksummed (mythos/checkpoints.py); a corrupt, truncated or missing
  checkpoint file is refused on resume (TrainError naming the file and what to do);
- resuming truncates log.jsonl to the resumed step (no duplicate steps after a crash);
- `resume=False` (--no-resume) moves the old run's checkpoints and log into RUN/replaced-<time>/
  and deletes that folder only once the new run's first checkpoint is written;
- leftovers of an interrupted write (.step-*.tmp folders, .NAME.*.tmp files) are removed at start;
- training stops at the first non-finite loss, gradient norm or weight (TrainDiverged, exit 1), naming
  the step and the parameter with the largest gradient norm; no checkpoint is written after it.
"""

from __future__ import annotations

import functools
import json
import math
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
import weights_bridge as wb
from spec.training import TrainConfig, loop_plan
from weights_bridge import backends

from weights_bridge.atomic import atomic_write
from weights_bridge.convert import remove_stale_temporaries

from .checkpoints import read_state, write_state
from .load import LoadError, check_output_dir
from . import scale
from .scale import Layout, barrier, is_main, local_rows, place
from .tasks import Task, exact_match, get_task, make_batch, parse_difficulty

FORMAT = "mythos-train"
FORMAT_VERSION = 1


LOG_NAME = "log.jsonl"
REPLAY_LIMIT = 2000  # steps replayed (from the last checkpoint) to name the parameter of a diverged step


class TrainError(ValueError):
    """A run that cannot start or resume; the message says why and what to do (the CLI: exit 2)."""


class TrainDiverged(TrainError):
    """Training reached a non-finite loss, gradient or weight; names the step and the parameter (the CLI: exit 1)."""


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
    """The spec can hold the task (vocabulary, sequence length) and the loop counts; the config's numbers are
    finite; or a TrainError naming the field."""
    s, cfg = run.spec, run.cfg
    if run.backend not in backends.BACKENDS:
        raise TrainError(f"--backend {run.backend!r} is not allowed; allowed: {', '.join(backends.BACKENDS)}")
    for name, value in cfg.to_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainError(f"{name}={value} must be a finite number")
    if cfg.seed < 0:
        raise TrainError(f"seed={cfg.seed} must be >= 0")
    try:
        for name in ("loops_min", "loops_max", "bptt", "progressive_k"):
            value = getattr(cfg, name)
            if value is not None:
                S.check_loops(s, value, what=name)
        if cfg.loop_plan == "difficulty":  # the longest batch: d = high, plus every extra step
            S.check_loops(s, run.difficulty[1] + cfg.loops_extra, what="difficulty high + loops_extra")
    except S.SpecError as e:
        raise TrainError(str(e)) from None
    most = {"random": cfg.loops_max, "difficulty": run.difficulty[1] + cfg.loops_extra}.get(cfg.loop_plan,
                                                                                            s.recurrent.max_loop_iters)
    if cfg.progressive_k is not None and cfg.progressive_k > most:
        raise TrainError(f"progressive_k={cfg.progressive_k} must be <= the most loop steps loop_plan "
                         f"{cfg.loop_plan!r} runs ({most}); a batch of N steps takes the gradient of min(k, N)")
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
    """Write step-<step>/ (weights + optimizer state) atomically; keep the newest `keep` checkpoints.

    Raises:
        TrainDiverged: the weights hold a non-finite value (nothing is written then).
        BridgeError: a file that cannot be written (the partial checkpoint is removed).
    """
    bad = nonfinite_params(run.backend, tr.model)
    if bad:
        raise TrainDiverged(f"refusing to checkpoint step {tr.step}: non-finite weights in {_names(bad)}")
    train = _train_module(run.backend)
    final = out / f"step-{tr.step:06d}"
    tmp = out / f".step-{tr.step:06d}.tmp"
    main = is_main()  # a sharded torch run: every rank gathers its shards, rank 0 alone writes
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        wb.save(tr.model, tmp / "weights.safetensors")
        state = train.optimizer_arrays(tr)
        if main:
            write_state(tmp / "optimizer.safetensors", state, run.meta(tr.step))
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # the checkpoint appears complete or not at all
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(run.backend)
    return final


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _spec_diff(theirs: S.Spec, ours: S.Spec) -> str:
    a, b = _flat(S.to_dict(theirs)), _flat(S.to_dict(ours))
    diff = [f"{k} checkpoint {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(diff[:6]) + (f" (and {len(diff) - 6} more)" if len(diff) > 6 else "")


def load_checkpoint(path: Path, run: Run, lay: Layout = Layout()):
    """A Trainer restored from a checkpoint directory, after checking that it belongs to `run`; the model is
    placed on the layout's mesh (a checkpoint holds whole tensors: any mesh may resume it).

    Raises:
        TrainError: a checkpoint of another run, or a missing, truncated or corrupt file in it (named).
    """
    state = path / "optimizer.safetensors"
    advice = (f"delete {path} to resume from the checkpoint before it, or start over with --no-resume "
              "(or another --out)")
    try:
        arrays, meta = read_state(state)
    except wb.BridgeError as e:
        raise TrainError(f"cannot resume from {path}: {e}; {advice}") from None
    if meta.get("format") != FORMAT:
        raise TrainError(f"{path} is not a mythos train checkpoint (format {meta.get('format')!r:.40}); {advice}")
    want = run.meta(int(meta.get("step", -1)) if isinstance(meta.get("step"), int) else -1)
    if path.name.startswith("step-") and path.name[5:].isdigit() and int(path.name[5:]) != want["step"]:
        raise TrainError(f"cannot resume from {path}: its optimizer state is of step {meta.get('step')!r:.20}, not "
                         f"{int(path.name[5:])} (files of different checkpoints mixed?); {advice}")
    diffs = []
    for key in ("backend", "task", "difficulty"):
        if meta.get(key) != want[key]:
            diffs.append(f"{key}: checkpoint {meta.get(key)!r}, this run {want[key]!r}")
    try:  # the spec text inside the file: YAML only, never a preset name or a path to follow
        theirs = S.loads(meta.get("spec"), where=f"{state}: spec")
    except S.SpecError as e:
        raise TrainError(f"cannot resume from {path}: its spec is not valid ({e}); {advice}") from None
    if theirs != run.spec:
        diffs.append(f"spec: the checkpoint's spec differs ({_spec_diff(theirs, run.spec)})")
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    try:  # a checkpoint written before a field existed (loop_plan, loops_extra, progressive_k): its defaults
        config = TrainConfig.from_dict(config).to_dict()
    except (TypeError, ValueError):
        pass  # not a config we can read: the comparison below names what differs
    cfg_diff = sorted(k for k in want["config"] if config.get(k) != want["config"][k])
    if cfg_diff:
        diffs.append("config: " + ", ".join(f"{k} checkpoint {config.get(k)!r} vs {want['config'][k]!r}"
                                            for k in cfg_diff))
    if diffs:
        raise TrainError(f"refusing to resume from {path}: it belongs to another run ({'; '.join(diffs)}); "
                         "use another --out directory, or --no-resume to start over there")
    train = _train_module(run.backend)
    try:
        model = wb.load(path / "weights.safetensors", backend=run.backend)
        tr = train.Trainer(place(run.backend, model, lay), run.cfg)
        train.load_optimizer_arrays(tr, arrays)
    except ValueError as e:  # BridgeError (a missing or corrupt weights file), or state that does not fit
        raise TrainError(f"cannot resume from {path}: {e}; {advice}") from None
    if tr.step != want["step"]:
        raise TrainError(f"cannot resume from {path}: its state is at step {tr.step}, its metadata says "
                         f"{want['step']}; {advice}")
    return tr


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what an interrupted write left in a run directory: .step-*.tmp folders, .NAME.*.tmp files."""
    removed = []
    for p in out.glob(".step-*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for _, ckpt in checkpoints(out):
        for name in ("weights.safetensors", "optimizer.safetensors"):
            removed += remove_stale_temporaries(ckpt / name)
    removed += remove_stale_temporaries(out / LOG_NAME)
    return removed


def truncate_log(out: Path, step: int) -> int:
    """Keep the lines of log.jsonl of steps < `step` (a resume replays the later ones); returns lines dropped."""
    path = out / LOG_NAME
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            ok = int(json.loads(line)["step"]) < step
        except (ValueError, KeyError, TypeError):  # a line cut by a kill, or not ours
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, "".join(f"{line}\n" for line in kept).encode("utf-8"))
    return dropped


def set_aside(out: Path) -> Path | None:
    """Move the run in `out` (checkpoints, log) into out/replaced-<time>/; None when there is none."""
    items = [p for _, p in checkpoints(out)] + ([out / LOG_NAME] if (out / LOG_NAME).exists() else [])
    if not items:
        return None
    aside = out / time.strftime("replaced-%Y%m%d-%H%M%S")
    while aside.exists():
        aside = aside.with_name(aside.name + "x")
    aside.mkdir()
    for p in items:
        p.rename(aside / p.name)  # same folder: a rename, never a copy
    return aside


# --------------------------------------------------------------------------- training and evaluation


def _train_module(backend: str):
    return backends.twin(backend).train


def new_trainer(run: Run, lay: Layout = Layout()):
    """A fresh model (spec.init_arrays(spec, cfg.seed)), placed on the layout's mesh, and its Trainer."""
    model = backends.twin(run.backend).build(run.spec, seed=run.cfg.seed, dtype=run.cfg.dtype)
    return _train_module(run.backend).Trainer(place(run.backend, model, lay), run.cfg)


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def nonfinite_params(backend: str, model) -> list[str]:
    """Manifest paths of the parameters holding a NaN or an infinity (empty: all finite); one device sync."""
    if backend == "torch":
        import torch

        from torch.distributed.tensor import DTensor

        named = list(model.named_parameters())
        with torch.no_grad():  # a sharded model: each rank its pieces, then one verdict for every rank
            ok = torch.stack([torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for _, p in named])
            if model.sharding is not None:
                import torch.distributed as dist

                ok = ok.to(torch.int32)
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return [n for (n, _), good in zip(named, ok.bool().cpu().numpy()) if not good]
    ok = _jax_all_finite(model)
    if ok:
        return []
    return sorted(k for k, a in backends.twin(backend).dump_arrays(model).items()
                  if np.issubdtype(backends.widen(a).dtype, np.floating) and not np.isfinite(backends.widen(a)).all())


def _jax_all_finite(model) -> bool:
    import jax
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return bool(_jax_finite_fn()(leaves))


@functools.lru_cache(maxsize=1)
def _jax_finite_fn():
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda leaves: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])))


def step_batch(run: Run, task: Task, step: int):
    """(Batch, n_loops, no_grad_steps) of training step `step`: the loop plan first (loop_plan 'difficulty'
    draws the batch's one difficulty), then the data; the same in both twins and on resume."""
    plan = loop_plan(run.cfg, run.spec, step, run.difficulty)
    d = run.difficulty if plan.difficulty is None else (plan.difficulty, plan.difficulty)
    return make_batch(task, run.cfg.seed, step, run.cfg.batch_size, d), plan.n_loops, plan.no_grad_steps


def gradient_norms(backend: str, model, ids: np.ndarray, targets: np.ndarray, mask: np.ndarray, n_loops: int,
                   no_grad_steps: int = 0) -> dict[str, float]:
    """L2 norm of each parameter's gradient of the total loss on one batch (the optimizer is not touched).

    From the twins' public API (model call, total_loss); torch names are manifest paths, jax names the
    nnx paths (``...wq.kernel``). The twins' StepResult carries only the global norm.
    """
    twin = backends.twin(backend)
    extra = {"no_grad_steps": no_grad_steps} if no_grad_steps else {}
    if backend == "torch":
        import torch

        dev = next(model.parameters()).device
        model.zero_grad(set_to_none=True)
        out = model(torch.as_tensor(ids, device=dev), n_loops, early_exit=False, **extra)
        loss, _ = twin.total_loss(model.spec, out, torch.as_tensor(targets, device=dev), torch.as_tensor(mask, device=dev))
        loss.backward()
        norms = {n: float(torch.linalg.vector_norm(p.grad.double())) for n, p in model.named_parameters()
                 if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return norms
    import jax.numpy as jnp
    from flax import nnx

    def loss_fn(m):
        out = m(jnp.asarray(ids), n_loops, early_exit=False, **extra)
        return twin.total_loss(m.spec, out, jnp.asarray(targets), jnp.asarray(mask))[0]

    grads = nnx.grad(loss_fn)(model)
    return {".".join(str(k) for k in path): float(np.linalg.norm(np.asarray(getattr(v, "value", v), dtype=np.float64)))
            for path, v in nnx.to_flat_state(grads)}


def _worst_gradients(run: Run, out: Path | None, task: Task, step: int) -> str:
    """'X (norm 3.1e+04); then Y (...)' for the gradient of `step`, from the weights before it: replayed from the
    last checkpoint (or the initial weights), bitwise as an uninterrupted run; '' when too far to replay."""
    found = [(k, p) for k, p in (checkpoints(out) if out is not None else []) if k <= step]
    start = found[-1][0] if found else 0
    if step - start > REPLAY_LIMIT:
        return ""
    try:
        tr = load_checkpoint(found[-1][1], run) if found else new_trainer(run)
        train_mod = _train_module(run.backend)
        while tr.step < step:
            b, n, k = step_batch(run, task, tr.step)
            train_mod.train_step(tr, b.ids, b.targets, b.mask, n, k)
        b, n, k = step_batch(run, task, step)
        norms = gradient_norms(run.backend, tr.model, b.ids, b.targets, b.mask, n, k)
        weights = {p: float(np.abs(backends.widen(a)).max(initial=0.0))
                   for p, a in backends.twin(run.backend).dump_arrays(tr.model).items()}
    except Exception as e:  # the diagnosis must never hide the divergence it explains
        return f"(could not compute per-parameter gradients: {type(e).__name__}: {e})"
    big = max(weights, key=weights.get) if weights else None
    largest = f"; the largest weight before the step: {big} (max |w| {weights[big]:.3g})" if big else ""

    def rank(v: float) -> float:
        return math.inf if not math.isfinite(v) else v

    top = sorted(norms, key=lambda k: rank(norms[k]), reverse=True)[:3]
    bad = [k for k, v in norms.items() if not math.isfinite(v)]
    if not bad and all(v == 0 for v in norms.values()):
        return "every gradient is zero (the non-finite loss carried no gradient)" + largest
    text = "; then ".join(f"{k} (norm {norms[k]:.3g})" for k in top)
    return text + (f"; {len(bad)} of {len(norms)} parameters have a non-finite gradient" if bad else "") + largest


def _diverged(run: Run, out: Path | None, task: Task, step: int, what: str, r) -> TrainDiverged:
    worst = _worst_gradients(run, out, task, step)
    last = checkpoints(out)[-1] if out is not None and checkpoints(out) else None
    kept = (f"the last good checkpoint, {last[1]} (step {last[0]}), is intact" if last
            else "no checkpoint was written")
    return TrainDiverged(
        f"training diverged at step {step}: {what} (loss {r.loss:.4g}, gradient norm {r.grad_norm:.4g}, "
        f"lr {r.lr:.3g}). Largest gradient norm: {worst or f'not computed ({step} steps to replay)'}. "
        f"Nothing after step {step} was saved; {kept}. Lower --lr or --grad-clip and start over (--no-resume)")


def train(run: Run, out: Path | None, *, checkpoint_every: int = 0, resume: bool = True, stop_at: int | None = None,
          on_step: Callable[[int, object, float], None] | None = None, log: bool = True,
          on_event: Callable[[str], None] | None = None, layout: Layout = Layout()):
    """Train `run` from scratch or from the newest checkpoint in `out`; returns the Trainer.

    Args:
        run: spec, config, task, difficulty, backend.
        out: run directory for checkpoints and log.jsonl (None: neither).
        checkpoint_every: write a checkpoint every K steps and at the end (0: only at the end).
        resume: continue from the newest checkpoint in `out` when there is one; False: start over (the old
            run is moved to out/replaced-<time>/ and deleted once the first new checkpoint is written).
        stop_at: stop after this step (a deliberate interruption; the run resumes later), default cfg.steps.
        on_step: called with (step, StepResult, tokens per second) after each step.
        on_event: called with a one-line note (a resume, leftovers removed, an old run set aside).
        layout: a mesh and strategy (mythos/scale.py: the model is sharded over it, each batch split), or one
            device. Under torch.distributed every rank calls train(); rank 0 alone writes the log and files.
    Raises:
        TrainError: bad arguments or a checkpoint that cannot be resumed (before any step).
        TrainDiverged: a non-finite loss, gradient norm or weight (no checkpoint is written after it).
    """
    say = on_event or (lambda msg: None)
    task = get_task(run.task)
    check_run(run, task)
    if stop_at is not None and (not isinstance(stop_at, int) or stop_at < 1):
        raise TrainError(f"stop_at={stop_at!r} must be an integer >= 1 (the step to stop after)")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise TrainError(f"checkpoint_every={checkpoint_every!r} must be an integer >= 0 (0: only at the end)")
    if out is not None:
        try:
            check_output_dir(out, "--out")
        except LoadError as e:
            raise TrainError(str(e)) from None
    if run.cfg.dtype == "float64":
        backends.enable_float64(run.backend)  # before a float64 model is built or loaded from a checkpoint
    tr, aside = None, None
    main = is_main()  # torch ranks: rank 0 alone changes files; the others read what it leaves
    if out is not None:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            removed = clean_leftovers(out)
            if removed:
                say(f"removed {len(removed)} leftover(s) of an interrupted write: {_names([p.name for p in removed])}")
        barrier(run.backend)
        found = checkpoints(out)
        if found and resume:
            tr = load_checkpoint(found[-1][1], run, layout)
            say(f"resumed from {found[-1][1]} (step {tr.step})")
        elif not resume and (found or (out / LOG_NAME).exists()) and main:
            aside = set_aside(out)
            say(f"the old run is kept in {aside} until the first new checkpoint is written")
    if tr is None:
        tr = new_trainer(run, layout)
    if out is not None and main:
        dropped = truncate_log(out, tr.step)
        if dropped:
            say(f"{LOG_NAME}: dropped {dropped} line(s) after step {tr.step} (they are run again)")
    train_mod = _train_module(run.backend)
    cfg, end = run.cfg, min(run.cfg.steps, stop_at if stop_at is not None else run.cfg.steps)
    logf = open(out / LOG_NAME, "a", encoding="utf-8") if (out is not None and log and is_main()) else None
    try:
        while tr.step < end:
            step = tr.step
            b, n, k = step_batch(run, task, step)
            t0 = time.perf_counter()
            r = train_mod.train_step(tr, *local_rows(run.backend, tr.model, b.ids, b.targets, b.mask), n, k)
            dt = time.perf_counter() - t0
            tps = b.ids.size / dt
            if not (math.isfinite(r.loss) and math.isfinite(r.grad_norm)):
                raise _diverged(run, out, task, step, "the loss or the gradient norm is not finite", r)
            bad = nonfinite_params(run.backend, tr.model)
            if bad:
                raise _diverged(run, out, task, step, f"its update made {len(bad)} weight tensor(s) non-finite "
                                f"({_names(bad)})", r)
            if logf is not None:
                logf.write(json.dumps({"step": step, "loss": r.loss, **r.parts, "lr": r.lr, "grad_norm": r.grad_norm,
                                       "n_loops": n, "no_grad_steps": k, "seconds": dt, "tokens": int(b.ids.size)}) + "\n")
                logf.flush()
            if on_step is not None:
                on_step(step, r, tps)
            if out is not None and ((checkpoint_every and tr.step % checkpoint_every == 0) or tr.step == end):
                save_checkpoint(out, run, tr)
                if aside is not None:  # the new run has a checkpoint: the old one can go
                    shutil.rmtree(aside, ignore_errors=True)
                    aside = None
    finally:
        if logf is not None:
            logf.close()
    return tr


def predict(backend: str, model, ids: np.ndarray, n_loops: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy predictions (B, T) and loop counts (B, T) of an inference forward (early exit)."""
    out = backends.forward(backend, model, ids, n_loops)
    return backends.widen(backends.to_numpy(out.logits)).argmax(-1), backends.to_numpy(out.loop_counts)


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


FLAGS = {"loop_plan": "--loop-plan", "loops_extra": "--loops-extra", "progressive_k": "--progressive-k",
         "loops_min": "--loops-min", "loops_max": "--loops-max", "batch_size": "--batch-size", "warmup_steps": "--warmup",
         "min_lr_ratio": "--min-lr-ratio", "weight_decay": "--weight-decay", "grad_clip": "--grad-clip",
         "bptt": "--bptt", "difficulty high": "--difficulty high"}


def _as_flags(message: str) -> str:
    """A TrainConfig / check_run message in the command line's words: loops_extra=-1 -> --loops-extra=-1."""
    import re

    message = message.removeprefix("TrainConfig: ")
    for field, flag in FLAGS.items():
        message = re.sub(rf"(?<![\w-]){re.escape(field)}\b", flag, message)
    return message


def train_command(
    spec_source: str = typer.Argument(..., metavar="SPEC", help="preset name or spec .yaml"),
    task: str = typer.Option("modadd", help="modadd | pointer | parity | pparity (mythos/tasks.py; modadd is "
                             "the validated one, docs/results.md; pparity the depth task of issue #14)"),
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
    loop_plan_: Optional[str] = typer.Option(None, "--loop-plan", help="fixed | random | difficulty | progressive "
                                             "(spec/training.py; default: fixed, or random with --loops-min)"),
    loops_extra: int = typer.Option(0, "--loops-extra", help="--loop-plan difficulty: n_loops = d + U{0..K}"),
    progressive_k: Optional[int] = typer.Option(None, "--progressive-k", help="DeepThinking: U{0..N-K} loop steps "
                                                "without gradient, then K with (any plan; replaces --bptt)"),
    seed: int = typer.Option(0, min=0, help="seed of the weights, data and loop draws"),
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
    mesh: Optional[str] = typer.Option(None, help="shard over a device mesh, e.g. data=2,expert=4 (axes data, model, "
                                       "expert; JAX: the devices of this host; torch: run under torchrun, one rank "
                                       "per device; docs/scaling.md)"),
    strategy: Optional[str] = typer.Option(None, help="dp | fsdp | tp | ep, combined with + (e.g. fsdp+tp); "
                                           "default: data -> dp, model -> tp, expert -> ep"),
) -> None:
    """Train a twin on a synthetic task: progress (loss, tokens/s, loops), checkpoints, resume, exact-match table.

    Every argument is checked before any work. Exit status: 0 on success; 2 on bad input, a checkpoint of
    another run or a corrupt checkpoint (TrainError); 1 when training diverges (a non-finite loss, gradient
    or weight: TrainDiverged, the last good checkpoint is kept).
    """
    from rich.markup import escape

    console = Console(width=None if sys.stdout.isatty() else 120)
    # every check first: a bad --eval-loops must not cost a whole training run (raised errors: mythos/cli.py)
    overrides = dict(S.parse_override(x) for x in set_)
    s = S.load(spec_source, overrides=overrides)
    try:
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup,
                          weight_decay=weight_decay, grad_clip=grad_clip, loops_min=loops_min, loops_max=loops_max,
                          bptt=bptt, seed=seed, dtype=dtype, loop_plan=loop_plan_, loops_extra=loops_extra,
                          progressive_k=progressive_k)
    except ValueError as e:
        raise TrainError(_as_flags(str(e))) from None
    try:
        for flag, value in (("--loops-min", loops_min), ("--loops-max", loops_max), ("--bptt", bptt),
                            ("--eval-loops", eval_loops)):
            if value is not None:
                S.check_loops(s, value, what=flag)
    except S.SpecError as e:
        raise TrainError(str(e)) from None
    run = Run(s, cfg, task, parse_difficulty(difficulty), backend)
    the_task = get_task(task)
    try:
        check_run(run, the_task)
    except TrainError as e:
        raise TrainError(_as_flags(str(e))) from None
    try:
        lay = scale.layout(backend, s, mesh, strategy, batch_size)
    except scale.LayoutError as e:
        raise TrainError(str(e)) from None
    eval_range = parse_difficulty(eval_difficulty or difficulty)
    if stop_at is not None and not 1 <= stop_at <= steps:
        raise TrainError(f"--stop-at {stop_at} must lie in [1, --steps={steps}] (the step to stop after)")
    if out is not None:
        check_output_dir(out, "--out")
    n = eval_loops or s.recurrent.max_loop_iters
    eval_ds = [d for d in range(eval_range[0], eval_range[1] + 1) if the_task.seq_len(d) <= s.max_seq_len]
    scale.start(backend, lay)  # a torch mesh: join the process group (torchrun's environment)
    if not is_main():  # the other ranks compute and stay quiet
        console = Console(quiet=True)
    if lay.mesh is not None:
        console.print(f"[dim]{backend} on {escape(lay.describe())}[/dim]")

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s  loops {task.fields[loops]:.2f}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    started = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"{backend} {task}", total=cfg.steps, loss=float("nan"), tps=0.0, loops=0.0)

        def on_step(step: int, r, tps: float) -> None:
            progress.update(bar, completed=step + 1, loss=r.loss, tps=tps, loops=r.parts["loops"])

        def on_event(msg: str) -> None:
            progress.console.print(f"[dim]{escape(msg)}[/dim]")

        tr = train(run, out, checkpoint_every=checkpoint_every, resume=resume, stop_at=stop_at, on_step=on_step,
                   on_event=on_event, layout=lay)
        progress.update(bar, completed=tr.step)
    console.print(f"[dim]{tr.step} steps done, {time.perf_counter() - started:.1f} s"
                  + escape(f", checkpoint in {checkpoints(out)[-1][1]}" if out is not None and checkpoints(out) else "")
                  + "[/dim]")
    if tr.step < cfg.steps:
        console.print(f"[dim]stopped at step {tr.step} of {cfg.steps}: rerun the same command to resume[/dim]")
        return
    t = Table(title=f"exact match on held-out examples ({eval_examples} per difficulty, {n} loop steps)")
    for col in ("difficulty", "exact match", "mean loops (answers)"):
        t.add_column(col, justify="right")
    with console.status("evaluating") as status:
        for d in eval_ds:
            status.update(f"evaluating difficulty {d} ({eval_examples} examples, {n} loop steps)")
            r = evaluate(backend, tr.model, the_task, d, n, n_examples=eval_examples)
            t.add_row(str(d), f"{100 * r['exact_match']:.1f}%", f"{r['mean_loops']:.2f}")
    console.print(t)
    skipped = eval_range[1] - eval_range[0] + 1 - len(eval_ds)
    if skipped:
        console.print(f"[yellow]note:[/yellow] {skipped} difficulty level(s) of --eval-difficulty skipped: their "
                      f"sequences are longer than max_seq_len={s.max_seq_len}")
