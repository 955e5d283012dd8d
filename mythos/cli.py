"""The `mythos` command line: presets, info, parity, generate, trace, convert, check, train, eval, serve, export (onnx, hf)."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import spec as S
import spec.sharding as SH
from weights_bridge import backends

from .load import LoadError, check_choice, check_output_dir, check_output_file, is_weights_file, load_model, resolve
from .train import TrainDiverged, train_command  # mythos/train.py imports torch/jax only when it runs
from .eval_task import eval_task_command  # likewise: torch/jax only when it runs

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mythos: one looped transformer, two frameworks, proven equal.")
# a pipe gets a wide table rather than rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 120)

SPEC_HELP = "preset name (see `mythos presets`), or a path to a spec .yaml"
# generate and trace: what mythos.load.resolve reads
WEIGHTS_OR_SPEC_HELP = ("a .safetensors file written by weights_bridge.save, a directory written by `mythos export hf`, "
                        "or a spec: " + SPEC_HELP + " (random weights from --seed)")
SET_HELP = "override a spec field, e.g. --set attention.type=mla (repeatable)"
EXIT_FAIL, EXIT_BAD_INPUT = 1, 2
INFO_DTYPES = ("float32", "bfloat16", "float64", "float16")  # spec.costs.DTYPE_BYTES


def _label(e: BaseException) -> str:
    """What kind of refusal: 'spec error', 'refused' (a file), 'error'."""
    from weights_bridge import BridgeError

    return "spec error" if isinstance(e, S.SpecError) else "refused" if isinstance(e, BridgeError) else "error"


def fail(msg: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print one clear message (markup-escaped: the message may hold brackets) and exit."""
    console.print(f"[red]error:[/red] {escape(msg)}")
    raise typer.Exit(code)


def clear_errors(command: Callable) -> Callable:
    """A command whose bad input ends in one message and exit 2, never a traceback.

    Caught: the project's errors (SpecError, BridgeError, LoadError, ParityInputError, TrainError: all
    ValueErrors, as are the twins' argument checks) -> exit 2; TrainDiverged (a run that diverged is not
    bad input) -> exit 1; an OSError the command did not foresee (a disk that fills up) -> exit 1.
    """
    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> None:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except TrainDiverged as e:
            console.print(f"[red]training stopped:[/red] {escape(str(e))}")
            raise typer.Exit(EXIT_FAIL) from None
        except UnicodeError as e:  # a prompt or path with bytes that are not UTF-8 (a ValueError too)
            console.print(f"[red]error:[/red] {escape(f'not valid UTF-8 text: {e}')}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except ValueError as e:
            console.print(f"[red]{_label(e)}:[/red] {escape(str(e))}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as e:
            where = f" {e.filename}" if getattr(e, "filename", None) else ""
            console.print(f"[red]error:[/red] {escape(f'cannot read or write{where}: {e.strerror or e}')}")
            raise typer.Exit(EXIT_FAIL) from None

    return run


def _load_spec(source: str, sets: list[str] | None) -> S.Spec:
    """A spec from SPEC and --set (a SpecError is printed by clear_errors, exit 2)."""
    overrides = dict(S.parse_override(s) for s in (sets or []))
    return S.load(source, overrides=overrides)


def _check(fn: Callable, *args: object, **kwargs: object) -> int:
    """A spec bound check (S.check_loops, S.check_length) whose SpecError reads as a plain error."""
    try:
        return fn(*args, **kwargs)
    except S.SpecError as e:
        raise LoadError(str(e)) from None


def shown(text: str) -> str:
    """Text safe to echo to a terminal: control characters (escape sequences) written as \\xNN."""
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in text)


PROGRESS_MIN_BYTES = 64 * 1024 * 1024  # smaller files convert too fast for a progress bar to help


def progress_bar(console: Console | None = None):
    """A weights_bridge.convert.ProgressBar drawn with rich (on stderr by default), only for large files."""
    @contextlib.contextmanager
    def stage(label: str, total_bytes: int) -> Iterator:
        if total_bytes < PROGRESS_MIN_BYTES:
            yield None
            return
        columns = (TextColumn(f"{label} [bold]{{task.fields[tensor]}}"), BarColumn(), DownloadColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console or Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=total_bytes, tensor="")
            yield lambda name, nbytes: bar.update(task, advance=nbytes, tensor=name)

    return stage


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f}{unit}"
    return f"{x:,.0f}"


@app.command()
@clear_errors
def presets() -> None:
    """List the shipped spec presets."""
    table = Table(title="shipped presets")
    for col in ("preset", "semantics", "attention", "dim", "loops", "parameters", "active"):
        table.add_column(col, justify="right" if col in ("dim", "loops", "parameters", "active") else "left")
    specs = sorted(((S.preset(n), n) for n in S.preset_names()), key=lambda sn: S.count_params(sn[0])["total"])
    for s, name in specs:
        c = S.count_params(s)
        table.add_row(name, s.semantics, s.attention.type, str(s.dim), str(s.recurrent.max_loop_iters), f"{c['total']:,}", f"{c['active']:,}")
    console.print(table)


@app.command()
@clear_errors
def info(
    spec_source: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP),
    seq: Optional[int] = typer.Option(None, help="sequence length for the FLOP count (default: min(256, max_seq_len))"),
    loops: Optional[int] = typer.Option(None, help="loop steps for FLOPs and cache (default: max_loop_iters)"),
    dtype: str = typer.Option("float32", help="dtype for cache bytes: " + " | ".join(INFO_DTYPES)),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    show_spec: bool = typer.Option(False, "--yaml", help="also print the full spec as YAML"),
    mesh_text: Optional[str] = typer.Option(None, "--mesh", help="a device mesh, e.g. data=2,expert=4 (axes: "
                                            "data, model, expert): per-device memory and collectives per strategy"),
    strategy: Optional[str] = typer.Option(None, help="with --mesh: one strategy, e.g. dp+ep or fsdp+tp "
                                           "(default: every strategy the mesh supports)"),
    batch: Optional[int] = typer.Option(None, min=1, help="with --mesh: the global batch (default: one sequence "
                                        "per data x expert shard)"),
) -> None:
    """Parameters per component, active parameters, FLOPs and KV-cache bytes per token; with --mesh, the
    per-device memory and collectives of each sharding strategy (docs/scaling.md)."""
    s = _load_spec(spec_source, set_)
    check_choice("--dtype", dtype, INFO_DTYPES)
    n = _check(S.check_loops, s, loops, what="--loops") if loops is not None else s.recurrent.max_loop_iters
    seq = _check(S.check_length, s, seq, what="--seq") if seq is not None else min(256, s.max_seq_len)
    if mesh_text is None and (strategy is not None or batch is not None):
        fail("--strategy and --batch describe a mesh: give --mesh too, e.g. --mesh data=2,expert=4")
    mesh = strategies = None
    if mesh_text is not None:  # checked before any table is printed: a bad mesh is exit 2 and one message
        mesh = SH.parse_mesh(mesh_text)
        strategies = [SH.parse_strategy(strategy, mesh)] if strategy else SH.strategies_for(mesh)
        batch = batch if batch is not None else mesh.get("data", 1) * mesh.get("expert", 1)
    counts = S.count_params(s)
    total = counts.pop("total")
    active = counts.pop("active")

    t = Table(title=escape(f"{spec_source}: parameters ({s.semantics} semantics)"))
    t.add_column("component")
    t.add_column("parameters", justify="right")
    t.add_column("share", justify="right")
    for group, c in counts.items():
        t.add_row(group, f"{c:,}", f"{100 * c / total:.1f}%")
    t.add_section()
    t.add_row("total", f"{total:,}", "100%")
    t.add_row("active per token", f"{active:,}", f"{100 * active / total:.1f}%")
    console.print(t)

    f = S.flops_per_token(s, seq, n)
    t = Table(title=f"forward FLOPs per token (seq {seq}, {n} loop steps)")
    t.add_column("part")
    t.add_column("FLOPs", justify="right")
    for part, v in f.items():
        if part == "total":
            t.add_section()
        t.add_row(part, _si(v))
    console.print(t)

    kv = S.kv_cache_bytes_per_token(s, dtype, n)
    t = Table(title=f"KV cache per token ({dtype}, {s.attention.type})")
    t.add_column("what")
    t.add_column("bytes", justify="right")
    t.add_row("per attention layer", f"{kv['per_layer']:,}")
    t.add_row(f"layers ({s.prelude_layers} prelude + {n} loop steps + {s.coda_layers} coda)", str(kv["layers"]))
    if "compressor" in kv:
        t.add_row(f"compressor summaries and open chunk, amortised over max_seq_len={s.max_seq_len}",
                  f"{kv['compressor']:,}")
    t.add_section()
    t.add_row("total per token", f"{kv['total']:,}")
    console.print(t)
    if mesh is not None:
        _mesh_tables(s, mesh, strategies, batch=batch, seq=seq, n=n, dtype=dtype)
    if show_spec:
        console.print(escape(S.dump(s)))


def _ib(x: int) -> str:
    """Bytes in binary units: 512 B, 114.46 KiB, 1.86 GiB."""
    for unit, scale in (("PiB", 2 ** 50), ("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,} B"


def _mesh_tables(s: S.Spec, mesh: SH.Mesh, strategies: list[SH.Strategy], *, batch: int, seq: int, n: int,
                 dtype: str) -> None:
    """`mythos info --mesh`: one row of per-device bytes per strategy (the SpecError where the spec cannot use
    it), then each usable strategy's collectives (spec.sharding.per_device_bytes, collectives_per_step)."""
    where = f"{SH.format_mesh(mesh)} ({SH.mesh_size(mesh)} devices)"
    results: list[tuple[str, dict | None, list, str]] = []  # strategy, per-device bytes, collectives, refusal
    for st in strategies:
        try:
            mem = SH.per_device_bytes(s, mesh, st, batch=batch, seq_len=seq, n_loops=n, dtype=dtype)
            rows = SH.collectives_per_step(s, mesh, st, batch=batch, seq_len=seq, dtype=dtype)
            results.append(("+".join(st), mem, rows, ""))
        except S.SpecError as e:
            results.append(("+".join(st), None, [], str(e)))
    t = Table(title=f"per device on mesh {where}: batch {batch}, seq {seq}, {n} loop steps, {dtype}, AdamW")
    for col in ("strategy", "params", "optimizer", "KV cache", "total", "coll./loop step", "coll./train step"):
        t.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    if any(why for *_, why in results):
        t.add_column("cannot use")
    usable = []
    for name, mem, rows, why in results:
        if mem is None:
            t.add_row(name, "-", "-", "-", "-", "-", "-", f"[red]{escape(why)}[/red]")
            continue
        fwd = sum(r.bytes for r in rows if r.phase == "forward")
        per_step = sum(r.bytes for r in rows if r.phase != "training step")
        train = n * per_step + sum(r.bytes for r in rows if r.phase == "training step")
        cells = [_ib(mem["params"]), _ib(mem["optimizer"]), _ib(mem["kv_cache"]), _ib(mem["total"]), _ib(fwd),
                 _ib(train)]
        t.add_row(name, *cells, *([""] if len(t.columns) == 8 else []))
        usable.append((name, rows))
    console.print(t)
    for name, rows in usable:
        t = Table(title=f"collectives of {name} on {where}: bytes sent per device (loop step rows: per loop step)")
        for col in ("phase", "part", "collective", "what", "count", "bytes"):
            t.add_column(col, justify="right" if col in ("count", "bytes") else "left")
        for r in rows:
            t.add_row(r.phase, r.strategy, r.kind, escape(r.what.split(": ", 1)[1]), str(r.count), _ib(r.bytes))
        if not rows:
            t.add_row("-", name, "none", "no collective: every device holds the whole model and batch", "0", "0 B")
        console.print(t)


@app.command("parity")
@clear_errors
def parity_command(
    spec_source: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP),
    dtype: str = typer.Option("float64", help="float64 | float32 | bfloat16"),
    seed: int = typer.Option(0, min=0, help="seed of the weights and of the token ids"),
    batch: int = typer.Option(2, min=1, help="sequences in the input"),
    seq: int = typer.Option(16, min=1, help="tokens per sequence (<= max_seq_len)"),
    loops: Optional[int] = typer.Option(None, help="loop steps (default: max_loop_iters + 2 with probe weights, "
                                        "max_loop_iters with init weights)"),
    weights: str = typer.Option("probe", help="probe: every parameter moved off its structured init, so a bug in a "
                                "norm scale, bias or late loop step shows (parity/probe.py); init: spec.init_arrays"),
    reference: str = typer.Option("torch", help="the backend whose decisions are replayed into the others: torch | jax | onnx"),
    backends_: str = typer.Option("torch,jax", "--backends", help="the backends to compare, comma-separated, at least "
                                  "two of torch, jax, onnx (onnx: the torch twin's exported graph in ONNX Runtime)"),
    one_direction: bool = typer.Option(False, "--one-direction", help="check with --reference as the reference only "
                                       "(default: both twins take a turn as the reference, both must pass)"),
    allow_near_ties: bool = typer.Option(False, "--allow-near-ties", help="let near ties excuse decisions in float64 "
                                         "under mythos semantics too (always allowed below float64)"),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="compare NaN/inf patterns instead of "
                                         "failing on them"),
    replay: bool = typer.Option(False, "--replay", help="also replay the reference's decisions when all of them agree"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON to this file (atomically)"),
    record: Optional[Path] = typer.Option(None, "--record", help="after a passing check, store the reference twin's "
                                          "outputs, the versions, the spec and the weights' digests in this golden "
                                          "file (.npz) for --against"),
    against: Optional[Path] = typer.Option(None, "--against", help="instead, compare each twin with a golden file "
                                           "written by --record (its dtype, seed, input and loops); exit 1 when an "
                                           "output moved"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Run both twins on the same weights and tokens; compare logits, traces, loop counts and experts.

    With --against GOLDEN, compare each twin with a recorded golden instead (docs/regression.md).

    Exit status: 0 when the twins agree (or reproduce the golden), 1 when parity fails (both directions'
    failures are printed) or an output moved from the golden, 2 on bad input (a missing, corrupt or
    foreign golden, or one recorded for another spec).
    """
    import time

    # the twins (torch, jax) are imported by compare only when this command runs
    from parity.compare import DTYPES, WEIGHTS, compare

    s = _load_spec(spec_source, set_)
    check_choice("--dtype", dtype, DTYPES)
    names = tuple(b.strip() for b in backends_.split(",") if b.strip())
    for name in names:
        check_choice("--backends", name, backends.ALL_BACKENDS)
    if len(names) < 2 or len(set(names)) != len(names):
        fail(f"--backends {backends_!r} must name at least two different backends of {', '.join(backends.ALL_BACKENDS)}")
    check_choice("--reference", reference, names)
    check_choice("--weights", weights, WEIGHTS)
    _check(S.check_length, s, seq, what="--seq")
    if loops is not None:
        _check(S.check_loops, s, loops, what="--loops")
    if record is not None and against is not None:
        fail("--record and --against exclude each other: record a golden once, check against it later")
    if json_path is not None:
        check_output_file(json_path, "--json")  # before the run, not after it
    if record is not None:
        check_output_file(record, "--record")
    if against is not None:
        given = {"--dtype": dtype, "--seed": seed, "--batch": batch, "--seq": seq, "--loops": loops,
                 "--weights": weights, "--reference": reference}
        _against(s, spec_source, against, given, json_path, names)
        return

    started = time.perf_counter()
    last = [None, started]  # stage in progress, its start

    with console.status("loading torch and jax") as status:
        def progress(msg: str) -> None:
            now = time.perf_counter()
            if last[0] is not None:
                console.print(f"[dim]  {escape(last[0])} ({now - last[1]:.1f} s)[/dim]")
            last[0], last[1] = msg, now
            status.update(escape(msg))

        report = compare(s, seed=seed, dtype=dtype, batch=batch, seq=seq, n_loops=loops, weights=weights,
                         reference=reference, backends=names, both_directions=not one_direction,
                         allow_near_ties=True if allow_near_ties else None, allow_nonfinite=allow_nonfinite,
                         replay=True if replay else None, progress=progress)
        progress("comparing")
    report.spec = spec_source if not set_ else f"{spec_source} ({', '.join(set_)})"
    console.print()
    report.render(console)
    if json_path is not None:
        report.save_json(json_path)  # atomic: a reader never sees half a report
        console.print(f"report written to {escape(str(json_path))}")
    if not report.passed:
        if record is not None:
            console.print(f"[red]not recorded:[/red] {escape(str(record))} (a golden of twins that disagree)")
        raise typer.Exit(EXIT_FAIL)
    if record is not None:
        from parity import golden

        with console.status(f"recording {escape(str(record))}"):
            path = golden.record(s, record, dtype=dtype, seed=seed, batch=batch, seq=seq, n_loops=loops,
                                 weights=weights, reference=reference, label=report.spec)
        console.print(f"golden written to {escape(str(path))} ({path.stat().st_size:,} bytes; check with "
                      f"`mythos parity {escape(spec_source)} --against {escape(str(path))}`)")


# what --against takes from the golden: a value given on the command line must agree with it
AGAINST_DEFAULTS = {"--dtype": "float64", "--seed": 0, "--batch": 2, "--seq": 16, "--loops": None, "--weights": "probe",
                    "--reference": "torch"}
GOLDEN_KEYS = {"--dtype": "dtype", "--seed": "seed", "--batch": "batch", "--seq": "seq", "--loops": "n_loops",
               "--weights": "weights", "--reference": "reference"}


def _against(s: S.Spec, spec_source: str, path: Path, given: dict, json_path: Optional[Path],
             names: tuple[str, ...] = backends.BACKENDS) -> None:
    """mythos parity SPEC --against GOLDEN: each twin against the golden; exit 1 when an output moved."""
    import time

    from parity import golden

    g = golden.read(path)  # a GoldenError (missing, corrupt, foreign) is bad input: exit 2
    for flag, value in given.items():
        want = g.meta[GOLDEN_KEYS[flag]]
        if value != AGAINST_DEFAULTS[flag] and value != want:
            fail(f"{flag} {value} differs from the golden's {want}: --against runs the golden's own settings "
                 f"(drop {flag})")
    last = [None, time.perf_counter()]
    with console.status("loading torch and jax") as status:
        def progress(msg: str) -> None:
            now = time.perf_counter()
            if last[0] is not None:
                console.print(f"[dim]  {escape(last[0])} ({now - last[1]:.1f} s)[/dim]")
            last[0], last[1] = msg, now
            status.update(escape(msg))

        report = golden.against(path, backends=names, spec=s, progress=progress)
        progress("comparing")
    console.print()
    report.render(console)
    if json_path is not None:
        report.save_json(json_path)
        console.print(f"report written to {escape(str(json_path))}")
    if not report.passed:
        raise typer.Exit(EXIT_FAIL)


@app.command("generate")
@clear_errors
def generate_command(
    source: str = typer.Argument(..., metavar="WEIGHTS_OR_SPEC",
                                 help=WEIGHTS_OR_SPEC_HELP),
    backend: str = typer.Option("torch", help="torch | jax"),
    prompt: str = typer.Option("", help="prompt text (byte tokenizer; BOS is prepended)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=0, help="tokens to generate"),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy; else sampling at this temperature"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="sample among the k most likely tokens"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="sample among the smallest set of probability >= p"),
    seed: int = typer.Option(0, min=0, help="seed of the sampler, and of the weights when SOURCE is a spec"),
    loops: Optional[int] = typer.Option(None, help="loop steps per token (default: max_loop_iters; at most "
                                        "max(256, 4 x max_loop_iters))"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 | bfloat16 (default: the file's, float32 for a spec)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " (SPEC only)"),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch: decode steps through "
                                            "torch.compile (default: on unless MYTHOS_COMPILE=0; the first call "
                                            "compiles for tens of seconds, seconds once cached in "
                                            "~/.cache/mythos/inductor; jax always compiles)"),
) -> None:
    """Generate text with a KV cache, streaming tokens as they come; ends with tokens/s.

    Exit status: 0 on success, 2 on bad input (a spec whose vocabulary cannot hold the byte tokenizer,
    a prompt plus --max-new-tokens beyond max_seq_len, --loops beyond the spec's bound, ...). Every
    check runs before the model is built or read. Control characters are echoed escaped (\\x1b), and
    ids that are not bytes (BOS, or ids >= 258 of a larger vocabulary) are listed after the text.
    """
    import time

    from .tokenizer import N_BYTES, ByteTokenizer

    check_choice("--backend", backend, backends.BACKENDS)
    if dtype is not None:
        check_choice("--dtype", dtype, backends.DTYPES)
    if top_p is not None and not 0 < top_p <= 1:
        fail(f"--top-p {top_p} must lie in (0, 1]")
    if not np.isfinite(temperature):
        fail(f"--temperature {temperature} must be a finite number >= 0")
    src = resolve(source, set_)  # the spec alone (a weights file: its header), so every check comes first
    tok = ByteTokenizer.for_spec(src.spec)
    try:
        prompt_ids = tok.encode(prompt)
    except UnicodeEncodeError:
        fail("--prompt holds characters that are not valid Unicode text (bytes that are not UTF-8?)")
    if loops is not None:
        _check(S.check_loops, src.spec, loops, what="--loops")
    L, n_prompt = src.spec.max_seq_len, len(prompt_ids)
    if n_prompt + max_new_tokens > L:
        fail(f"the prompt ({n_prompt} tokens, BOS included) plus --max-new-tokens {max_new_tokens} is "
             f"{n_prompt + max_new_tokens} tokens, more than the spec's max_seq_len={L}"
             + (f"; ask for at most {L - n_prompt} new tokens" if n_prompt <= L else "; shorten the prompt"))
    if top_k is not None and top_k > src.spec.vocab_size:
        fail(f"--top-k {top_k} must be at most vocab_size={src.spec.vocab_size}")
    weights = src.weights is not None
    dtype = dtype or src.dtype or "float32"
    if dtype == "float64":
        backends.enable_float64(backend)  # x64 in jax (TF32 off in torch), before the model is built or read
    started = time.perf_counter()
    with console.status(f"loading {backend}"):
        model = load_model(source, backend, dtype, seed, set_)
    ids = np.asarray([prompt_ids], dtype=np.int64)  # (1, T)
    ids = backends.from_numpy(backend, ids)
    text = tok.stream_decoder()
    stamps: list[float] = []
    not_bytes: list[int] = []

    def show(new: np.ndarray) -> None:
        stamps.append(time.perf_counter())
        i = int(new[0])
        if not 0 <= i < N_BYTES and i != tok.eos_id:
            not_bytes.append(i)
        # random weights emit arbitrary bytes: control characters are shown escaped, not sent to the terminal
        sys.stdout.write(shown(text(i)))
        sys.stdout.flush()

    console.print(f"[dim]{len(ids[0])} prompt tokens, {backend} {model.spec.semantics} model[/dim]")
    sys.stdout.write(shown(prompt))
    sys.stdout.flush()
    t0 = time.perf_counter()
    try:
        extra = {"compile": compile_} if backend == "torch" else {}  # None: generate's default (compiled)
        out = model.generate(ids, max_new_tokens, loops, temperature, top_k, top_p, seed, tok.eos_id, on_token=show,
                             **extra)
    finally:
        sys.stdout.write("\n")
    n_new = len(stamps)
    if not_bytes:
        first = ", ".join(map(str, not_bytes[:16])) + (", ..." if len(not_bytes) > 16 else "")
        console.print(f"[yellow]note:[/yellow] {len(not_bytes)} of the {n_new} new tokens are not bytes and show as "
                      f"no text (ids >= {N_BYTES}: BOS={tok.bos_id}, or beyond the byte tokenizer's {tok.vocab_size} "
                      f"ids{', as random weights emit' if not weights else ''}): {first}")
    t = Table(title="generate")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("backend", f"{backend} ({'weights file' if weights else 'random weights, seed ' + str(seed)})")
    t.add_row("prompt tokens", str(len(ids[0])))
    t.add_row("new tokens", f"{n_new}" + (" (stopped at EOS)" if n_new and int(np.asarray(out)[0, -1]) == tok.eos_id
                                            and n_new < max_new_tokens else ""))
    t.add_row("loop steps per token", str(loops or model.spec.recurrent.max_loop_iters))
    if n_new:
        compiling = " (includes compiling)" if backend == "jax" else ""
        t.add_row("time to first token", f"{stamps[0] - t0:.3f} s{compiling}")
    if n_new > 2:
        # from the second new token on: in jax the first decode step compiles the one step all others reuse
        t.add_row("decode tokens/s", f"{(n_new - 2) / (stamps[-1] - stamps[1]):,.1f}")
    t.add_row("total", f"{time.perf_counter() - started:.2f} s")
    console.print(t)


@app.command("trace")
@clear_errors
def trace_command(
    source: str = typer.Argument(..., metavar="SPEC_OR_WEIGHTS",
                                 help=WEIGHTS_OR_SPEC_HELP),
    backend: str = typer.Option("torch", help="torch | jax"),
    prompt: str = typer.Option("", help="prompt text (byte tokenizer; BOS is prepended)"),
    out: Optional[Path] = typer.Option(None, help="folder for trace.json and the PNGs (default: trace-<spec>-<backend>)"),
    n_loops: Optional[int] = typer.Option(None, "--n-loops", help="loop steps (default: max_loop_iters; at most "
                                          "max(256, 4 x max_loop_iters))"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 | bfloat16 (default: the file's, float32 for a spec)"),
    seed: int = typer.Option(0, min=0, help="seed of the weights when SOURCE is a spec"),
    attention: bool = typer.Option(False, "--attention", help="also dump attention probabilities (large)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " (SPEC only)"),
) -> None:
    """One forward pass of the prompt: halting, state-norm and expert-usage PNGs plus a JSON of every trace.

    Exit status: 0 on success, 2 on bad input (nothing is written then). See docs/trace.md.
    """
    from . import trace as tr

    label = Path(source).stem if is_weights_file(source) or source.endswith((".yaml", ".yml")) else source
    out_dir = out if out is not None else Path(f"trace-{label}-{backend}")
    check_output_dir(out_dir, "--out")  # before the forward, not after it
    with console.status(f"loading {backend}") as status:
        r = tr.run_trace(source, backend, prompt, n_loops=n_loops, dtype=dtype, seed=seed, sets=set_,
                         attention=attention, progress=lambda msg: status.update(escape(msg)))
        status.update(escape(f"writing {out_dir}"))
        written, notes = tr.write_all(r, out_dir, progress=lambda msg: status.update(escape(msg)))
    for table in tr.summary(r, written, notes, out_dir):
        console.print(table)


@app.command("convert")
@clear_errors
def convert_command(
    source: Path = typer.Argument(..., help="an open-mythos .pt state dict, or a Mythos .safetensors file"),
    out: Path = typer.Argument(..., help="the Mythos .safetensors file to write (atomically)"),
    config: Optional[str] = typer.Option(None, help="open-mythos config: a MythosConfig YAML/JSON file or a variant name (mythos_1b, ...)"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 | bfloat16 (default: the source's)"),
    check: bool = typer.Option(True, help="afterwards, load the file into both twins and compare a forward"),
) -> None:
    """Convert open-mythos weights (or re-cast ours) into a Mythos weights file, then check both twins on it.

    Exit status: 0 on success, 1 when the twins disagree on the written file, 2 on bad input (nothing is
    written then). A hidden temporary file left beside OUT by a killed convert is removed first.
    """
    from weights_bridge import convert as wb

    r = wb.convert(source, out, config=config, dtype=dtype, progress=progress_bar(console))
    for p in r.removed:
        console.print(f"[dim]removed {escape(str(p))}, left by an interrupted earlier write[/dim]")
    t = Table(title=escape(f"wrote {r.path}"))
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("tensors", f"{r.n_tensors:,}")
    t.add_row("bytes", f"{r.n_bytes:,}")
    t.add_row("dtype", r.dtype)
    t.add_row("parameters", f"{S.count_params(r.spec)['total']:,}")
    t.add_row("semantics", r.spec.semantics)
    console.print(t)
    if check:
        with console.status("checking: torch and jax on the written file"):
            result = wb.check(out, "torch")  # float64 files switch both twins to float64 (jax: x64) themselves
        _print_check(result)


@app.command("check")
@clear_errors
def check_command(
    weights: Path = typer.Argument(..., help="a Mythos .safetensors file"),
    backend: str = typer.Option("torch", help="the reference twin: torch | jax"),
    tokens: Optional[int] = typer.Option(None, help="tokens per row of the random ids (default: min(8, max_seq_len))"),
    loops: Optional[int] = typer.Option(None, help="loop steps (default: max_loop_iters; at most "
                                        "max(256, 4 x max_loop_iters))"),
) -> None:
    """Load a weights file into both twins and compare one forward (logits and loop counts).

    Exit status: 0 when the twins agree, 1 when they disagree, 2 on bad input (a file that is not a valid
    Mythos weights file, --tokens or --loops out of range).
    """
    from weights_bridge import convert as wb

    check_choice("--backend", backend, backends.BACKENDS)
    src = resolve(str(weights)) if is_weights_file(weights) else None
    if src is None:
        import weights_bridge

        s, _ = weights_bridge.read_spec(weights)  # a BridgeError names what is wrong with the file
    else:
        s = src.spec
    tokens = _check(S.check_length, s, tokens, what="--tokens") if tokens is not None else min(8, s.max_seq_len)
    if loops is not None:
        _check(S.check_loops, s, loops, what="--loops")
    with console.status(f"checking {escape(str(weights))}: torch and jax"):
        r = wb.check(weights, backend, n_tokens=tokens, n_loops=loops)
    _print_check(r)


def _print_check(r) -> None:
    """The table of a weights_bridge CheckResult; exit 1 when the twins disagree."""
    t = Table(title=escape(f"{r.path}: {r.backend} (reference) vs {r.other}, {r.dtype}, ids {r.ids_shape}"))
    t.add_column("check")
    t.add_column("value", justify="right")
    t.add_column("status")
    t.add_row("max |logit diff|", f"{r.max_abs_diff:.2e}", "ok" if r.max_abs_diff <= r.tolerance else f"FAIL (> {r.tolerance:.0e})")
    t.add_row("mean |logit diff|", f"{r.mean_abs_diff:.2e}", "")
    t.add_row("loop counts equal", str(r.loop_counts_equal), "ok" if r.loop_counts_equal else "FAIL")
    t.add_row("loop steps run", f"{r.n_steps[0]} / {r.n_steps[1]}", "ok" if r.n_steps[0] == r.n_steps[1] else "FAIL")
    console.print(t)
    console.print("[green]PASS[/green]" if r.ok else "[red]FAIL[/red]")
    if not r.ok:
        raise typer.Exit(1)


app.command("train")(clear_errors(train_command))
app.command("eval-task")(clear_errors(eval_task_command))  # mythos/eval_task.py (issue #14)


@app.command("eval")
@clear_errors
def eval_command(
    source: str = typer.Argument(..., metavar="SPEC_OR_WEIGHTS_OR_DIR",
                                 help="a .safetensors file, a directory written by `mythos export hf`, or a spec: "
                                 + SPEC_HELP + " (random weights from --seed)"),
    tasks: str = typer.Option(..., "--tasks", help="lm-eval tasks, comma-separated: the shipped mythos_mc (multiple "
                              "choice), mythos_ppl (rolling perplexity), mythos_gen (generation until a stop "
                              "string), or lm-eval's own whose data is on this machine"),
    backend: str = typer.Option("torch", help="torch | jax"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 | bfloat16 (default: the file's, float32 for a spec)"),
    loops: Optional[int] = typer.Option(None, help="loop steps per token (default: max_loop_iters)"),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="rows per forward and per generate call"),
    limit: Optional[float] = typer.Option(None, help="documents per task (>= 1) or a fraction of them (< 1)"),
    seed: int = typer.Option(0, min=0, help="seed of the weights when SOURCE is a spec, and of sampling"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " (SPEC only)"),
    output: Optional[Path] = typer.Option(None, "--output", help="write lm-eval's results JSON here (atomically)"),
) -> None:
    """Evaluate with lm-evaluation-harness, offline: the `mythos` lm-eval model on either twin (docs/evaluation.md).

    Exit status: 0 on success, 2 on bad input (an unknown task, backend or dtype, a missing file, a spec whose
    vocabulary cannot hold the byte tokenizer, ...; nothing is written then).
    """
    from .evaluate import run_eval, table_rows

    results = run_eval(source, tasks, backend=backend, dtype=dtype, n_loops=loops, batch_size=batch_size, limit=limit,
                       seed=seed, sets=set_, output_path=output)
    t = Table(title=escape(f"lm-eval: {source} ({backend})"))
    for col in ("task", "metric", "value", "stderr"):
        t.add_column(col, justify="right" if col in ("value", "stderr") else "left")
    for task, metric, value, stderr in table_rows(results):
        shown_value = f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4e}"  # word perplexity of random weights
        t.add_row(escape(task), escape(metric), shown_value, "" if stderr is None else f"{stderr:.4f}")
    console.print(t)
    if output is not None:
        console.print(f"results written to {escape(str(output))}")


# `mythos serve` with no WEIGHTS_OR_SPEC: the tiny preset, its vocabulary grown to hold the byte tokenizer
SERVE_DEFAULT, SERVE_DEFAULT_SETS = "tiny", ("vocab_size=258",)


@app.command("serve")
@clear_errors
def serve_command(
    source: Optional[str] = typer.Argument(None, metavar="WEIGHTS_OR_SPEC", help=WEIGHTS_OR_SPEC_HELP + "; default: "
                                           "the tiny preset with vocab_size=258, random weights from --seed"),
    backend: str = typer.Option("torch", help="torch | jax"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 | bfloat16 (default: the file's, float32 for a spec)"),
    host: str = typer.Option("127.0.0.1", help="the address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, min=0, max=65535, help="the port to listen on (0: a free one, printed)"),
    max_num_seqs: int = typer.Option(8, "--max-num-seqs", min=1, help="sequences the engine decodes at once"),
    block_size: int = typer.Option(16, "--block-size", min=1, help="positions per KV-cache block"),
    seed: int = typer.Option(0, min=0, help="seed of the weights when SOURCE is a spec, and of the seeds of "
                             "requests that give none"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " (SPEC only)"),
    max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit", help="the largest max_tokens a "
                                                   "request may ask for (default: max_seq_len - 1)"),
    max_waiting: int = typer.Option(64, "--max-waiting", min=1, help="requests in flight at once (one per prompt); "
                                    "more are refused with 429"),
    max_loops: Optional[int] = typer.Option(None, "--max-loops", min=1, help="the largest n_loops a request may ask "
                                            "for (the KV pool holds that many loop steps; default: max_loop_iters)"),
) -> None:
    """Serve OpenAI-compatible completions over HTTP (POST /v1/completions, streaming; GET /v1/models, /health)
    from the continuous-batching engine; Ctrl-C stops it (docs/serving.md).

    Exit status: 0 when stopped by Ctrl-C (or SIGTERM), 2 on bad input (a port in use, a spec whose vocabulary
    cannot hold the byte tokenizer, ...; checked before the model is built or read).
    """
    import json
    import shlex
    import signal

    from .serve.http import bind
    from .tokenizer import ByteTokenizer

    check_choice("--backend", backend, backends.BACKENDS)
    if dtype is not None:
        check_choice("--dtype", dtype, backends.DTYPES)
    sets = [*SERVE_DEFAULT_SETS, *set_] if source is None else set_  # a later --set vocab_size=... wins
    source = SERVE_DEFAULT if source is None else source
    src = resolve(source, sets)  # the spec alone (a weights file: its header), so every check comes first
    ByteTokenizer.for_spec(src.spec)
    if max_tokens_limit is not None:
        _check(S.check_length, src.spec, max_tokens_limit, what="--max-tokens-limit")
    if max_loops is not None:
        _check(S.check_loops, src.spec, max_loops, what="--max-loops")
    name = Path(source).stem if is_weights_file(source) or source.endswith((".yaml", ".yml")) else Path(source).name
    server = bind(src.spec, host, port, model_name=name, max_tokens_limit=max_tokens_limit, max_waiting=max_waiting,
                  seed=seed, log=lambda line: print(line, file=sys.stderr, flush=True))

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)  # SIGTERM stops the server as Ctrl-C does
    # and Ctrl-C always does: a process started in the background of a non-interactive shell inherits SIGINT
    # ignored, so Python installs no KeyboardInterrupt handler of its own
    before_int = signal.signal(signal.SIGINT, interrupt)
    try:
        from .serve.engine import Engine, EngineLoop

        dtype = dtype or src.dtype or "float32"
        weights = f"weights {src.weights}" if src.weights is not None else f"random weights, seed {seed}"
        console.print(f"[dim]loading {escape(name)}: {backend} {dtype}, {escape(weights)}[/dim]")
        model = load_model(source, backend, dtype, seed, sets)
        loop = EngineLoop(Engine(model, max_num_seqs=max_num_seqs, block_size=block_size, max_loops=max_loops))
        server.attach(loop)
        loop.start()
        body = json.dumps({"model": name, "prompt": "hello", "max_tokens": 16, "temperature": 0})
        # plain prints: a URL and a command to paste, never wrapped or styled
        print(f"serving {name} at {server.url}/v1 (max_seq_len {src.spec.max_seq_len}, up to {max_num_seqs} "
              f"sequences at once); Ctrl-C stops", flush=True)
        print(f"curl {server.url}/v1/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}",
              flush=True)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        console.print("[dim]stopping[/dim]")
    finally:
        server.close()  # the socket, then the engine loop
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, before_int)


export_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Export a model to another runtime's format.")
app.add_typer(export_app, name="export")


@export_app.command("onnx")
@clear_errors
def export_onnx_command(
    source: str = typer.Argument(..., help=f"a Mythos .safetensors weights file, or a {SPEC_HELP}"),
    out: Path = typer.Argument(..., help="the .onnx file to write (atomically; weights inside)"),
    dynamic: str = typer.Option("batch,seq", help="axes left dynamic: batch,seq | batch | seq | none"),
    dtype: str = typer.Option("float32", help="float32 | float64"),
    loops: Optional[int] = typer.Option(None, help="loop steps N baked into the graph (default: recurrent.max_loop_iters)"),
    cache: bool = typer.Option(False, help="the decode-step graph: ids and past_* cache arrays in, logits and present_* out (P = 0 is the prefill)"),
    seed: int = typer.Option(0, help="seed of the random weights when SOURCE is a spec"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " (SPEC only)"),
) -> None:
    """Write the torch twin as one ONNX graph: the loop (ACT's early exit) as an ONNX Loop, sparse experts,
    replay inputs force_halt and force_experts. Exit status 0 on success, 2 on bad input (nothing written)."""
    from .export import export_onnx

    axes = () if dynamic.strip() in ("", "none") else dynamic
    with console.status(f"exporting {escape(source)} to ONNX"):
        info = export_onnx(source, out, dtype=dtype, n_loops=loops, dynamic=axes, cache=cache, seed=seed,
                           sets=set_)
    t = Table(title=escape(f"wrote {info.path}"))
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("dtype", info.dtype)
    t.add_row("loop steps N", str(info.n_loops))
    t.add_row("dynamic axes", ",".join(info.dynamic) or "none")
    t.add_row("nodes", f"{info.n_nodes:,}")
    t.add_row("Loop nodes", str(info.loop_nodes))
    t.add_row("bytes", f"{info.path.stat().st_size:,}")
    t.add_row("inputs", ", ".join(info.inputs))
    t.add_row("outputs", ", ".join(info.outputs))
    console.print(t)


@export_app.command("hf")
@clear_errors
def export_hf_command(
    source: str = typer.Argument(..., help=f"a Mythos .safetensors weights file, or a {SPEC_HELP}"),
    out: Path = typer.Argument(..., metavar="DIR", help="the directory to write (atomically): config.json, "
                               "model.safetensors, tokenizer, generation config, model card, code"),
    dtype: str = typer.Option("float32", help="float32 | float64 | bfloat16"),
    loops: Optional[int] = typer.Option(None, help="default loop steps N in config.json (default: recurrent.max_loop_iters)"),
    seed: int = typer.Option(0, help="seed of the random weights when SOURCE is a spec"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " (SPEC only)"),
    eval_results: Optional[Path] = typer.Option(None, "--eval-results", help="lm-eval's results JSON: the model "
                                                "card's evaluation results (model-index)"),
    license: str = typer.Option("mit", help="the model card's license (a Hub license id)"),
    overwrite: bool = typer.Option(False, help="replace DIR when it exists and is not empty"),
) -> None:
    """Write one Hugging Face directory that transformers (AutoModelForCausalLM), the torch twin and
    weights_bridge.load(DIR, backend="jax") all read (docs/huggingface.md). Exit status 0 on success, 2 on bad
    input (nothing written)."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise LoadError(f"mythos export hf needs {' and '.join(missing)}: pip install 'mythos[hf]'")
    from .hf.export import export_hf

    with console.status(f"exporting {escape(source)} to a Hugging Face directory"):
        info = export_hf(source, out, dtype=dtype, seed=seed, sets=set_, n_loops=loops, eval_results=eval_results,
                         overwrite=overwrite, license=license)
    t = Table(title=escape(f"wrote {info.path}"))
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("dtype", info.dtype)
    t.add_row("parameters", f"{info.parameters:,}")
    t.add_row("loop steps N", "recurrent.max_loop_iters" if info.n_loops is None else str(info.n_loops))
    t.add_row("tokenizer", "bytes (tokenizer.json)" if info.tokenizer else "none (vocab_size < 258)")
    t.add_row("evaluation results", str(info.eval_metrics))
    t.add_row("files", ", ".join(info.files))
    console.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
