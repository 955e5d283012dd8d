"""The `mythos` command line: info, parity, generate, trace, convert."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

import spec as S

from .train import train_command  # parity/train.py imports torch/jax only when it runs

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mythos: one looped transformer, two frameworks, proven equal.")
# a pipe gets a wide table rather than rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 120)

SPEC_HELP = "preset name (see `mythos presets`), or a path to a spec .yaml"
SET_HELP = "override a spec field, e.g. --set attention.type=mla (repeatable)"


def _load_spec(source: str, sets: list[str] | None) -> S.Spec:
    try:
        overrides = dict(S.parse_override(s) for s in (sets or []))
        return S.load(source, overrides=overrides)
    except S.SpecError as e:
        console.print(f"[red]spec error:[/red] {e}")
        raise typer.Exit(2) from None


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f}{unit}"
    return f"{x:,.0f}"


@app.command()
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
def info(
    spec_source: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP),
    seq: int = typer.Option(256, help="sequence length for the FLOP count"),
    loops: Optional[int] = typer.Option(None, help="loop steps for FLOPs and cache (default: max_loop_iters)"),
    dtype: str = typer.Option("float32", help="dtype for cache bytes: float32 | bfloat16 | float64"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    show_spec: bool = typer.Option(False, "--yaml", help="also print the full spec as YAML"),
) -> None:
    """Parameters per component, active parameters, FLOPs and KV-cache bytes per token."""
    s = _load_spec(spec_source, set_)
    n = loops or s.recurrent.max_loop_iters
    counts = S.count_params(s)
    total = counts.pop("total")
    active = counts.pop("active")

    t = Table(title=f"{spec_source}: parameters ({s.semantics} semantics)")
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
    if show_spec:
        console.print(S.dump(s))


@app.command("parity")
def parity_command(
    spec_source: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP),
    dtype: str = typer.Option("float64", help="float64 | float32 | bfloat16"),
    seed: int = typer.Option(0, help="seed of the weights (spec.init_arrays) and of the token ids"),
    batch: int = typer.Option(2, min=1, help="sequences in the input"),
    seq: int = typer.Option(16, min=1, help="tokens per sequence (<= max_seq_len)"),
    loops: Optional[int] = typer.Option(None, min=1, help="loop steps (default: max_loop_iters)"),
    reference: str = typer.Option("torch", help="the twin whose decisions are replayed into the other: torch | jax"),
    replay: bool = typer.Option(False, "--replay", help="also replay the reference's decisions when all of them agree"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON to this file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Run both twins on the same weights and tokens; compare logits, traces, loop counts and experts.

    Exit status: 0 when the twins agree, 1 when parity fails, 2 on bad input.
    """
    import time

    # the twins (torch, jax) are imported by compare only when this command runs
    from .compare import DTYPES, TWINS, ParityInputError, compare

    s = _load_spec(spec_source, set_)
    bad = None
    if dtype not in DTYPES:
        bad = f"--dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}"
    elif reference not in TWINS:
        bad = f"--reference {reference!r} is not allowed; allowed: {', '.join(TWINS)}"
    elif seq > s.max_seq_len:
        bad = f"--seq {seq} exceeds the spec's max_seq_len={s.max_seq_len}"
    if bad:
        console.print(f"[red]error:[/red] {bad}")
        raise typer.Exit(2)

    started = time.perf_counter()
    last = [None, started]  # stage in progress, its start

    with console.status("loading torch and jax") as status:
        def progress(msg: str) -> None:
            now = time.perf_counter()
            if last[0] is not None:
                console.print(f"[dim]  {last[0]} ({now - last[1]:.1f} s)[/dim]")
            last[0], last[1] = msg, now
            status.update(msg)

        try:
            report = compare(s, seed=seed, dtype=dtype, batch=batch, seq=seq, n_loops=loops, reference=reference,
                               replay=True if replay else None, progress=progress)
        except ParityInputError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        progress("comparing")
    report.spec = spec_source if not set_ else f"{spec_source} ({', '.join(set_)})"
    console.print()
    report.render(console)
    if json_path is not None:
        report.save_json(json_path)
        console.print(f"report written to {json_path}")
    if not report.passed:
        raise typer.Exit(1)


@app.command("generate")
def generate_command(
    source: str = typer.Argument(..., metavar="WEIGHTS_OR_SPEC",
                                 help="a .safetensors file written by weights_bridge.save, or a spec: " + SPEC_HELP
                                 + " (random weights from --seed)"),
    backend: str = typer.Option("torch", help="torch | jax"),
    prompt: str = typer.Option("", help="prompt text (byte tokenizer; BOS is prepended)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=0, help="tokens to generate"),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy; else sampling at this temperature"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="sample among the k most likely tokens"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="sample among the smallest set of probability >= p"),
    seed: int = typer.Option(0, min=0, help="seed of the sampler, and of the weights when SOURCE is a spec"),
    loops: Optional[int] = typer.Option(None, min=1, help="loop steps per token (default: max_loop_iters)"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 | bfloat16 (default: the file's, float32 for a spec)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " (SPEC only)"),
    compile_: bool = typer.Option(False, "--compile", help="torch: decode steps through torch.compile "
                                  "(the first call compiles for tens of seconds; jax always compiles)"),
) -> None:
    """Generate text with a KV cache, streaming tokens as they come; ends with tokens/s.

    Exit status: 0 on success, 2 on bad input (a spec whose vocabulary cannot hold the byte tokenizer,
    a prompt plus --max-new-tokens beyond max_seq_len, ...).
    """
    import time

    from spec.tokenizer import ByteTokenizer

    def fail(msg: str) -> None:
        console.print(f"[red]error:[/red] {msg}")
        raise typer.Exit(2)

    if backend not in ("torch", "jax"):
        fail(f"--backend {backend!r} is not allowed; allowed: torch, jax")
    if dtype is not None and dtype not in ("float32", "float64", "bfloat16"):
        fail(f"--dtype {dtype!r} is not allowed; allowed: float32, float64, bfloat16")
    if top_p is not None and not 0 < top_p <= 1:
        fail(f"--top-p {top_p} must lie in (0, 1]")
    weights = source.endswith(".safetensors")
    if weights and set_:
        fail("--set applies to a spec, not to a weights file (its spec is stored in it)")
    if weights and not Path(source).is_file():
        fail(f"weights file {source!r} does not exist")
    s = None if weights else _load_spec(source, set_)

    started = time.perf_counter()
    with console.status(f"loading {backend}"):
        if backend == "jax" and dtype == "float64":
            import mythos_jax
            mythos_jax.set_parity_precision()  # float64 needs jax_enable_x64
        if weights:
            import weights_bridge as wb
            try:
                model = wb.load(source, backend=backend, dtype=dtype)
            except ValueError as e:
                fail(str(e))
        else:
            import importlib
            twin = importlib.import_module(f"mythos_{backend}")
            model = twin.build(s, seed=seed, dtype=dtype or "float32")
    try:
        tok = ByteTokenizer.for_spec(model.spec)
    except ValueError as e:
        fail(str(e))
    ids = np.asarray([tok.encode(prompt)], dtype=np.int64)  # (1, T)
    if backend == "torch":
        import torch
        ids = torch.from_numpy(ids)
    text = tok.stream_decoder()
    stamps: list[float] = []

    def show(new: np.ndarray) -> None:
        stamps.append(time.perf_counter())
        piece = text(int(new[0]))
        # random weights emit arbitrary bytes: control characters are shown escaped, not sent to the terminal
        sys.stdout.write("".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in piece))
        sys.stdout.flush()

    console.print(f"[dim]{len(ids[0])} prompt tokens, {backend} {model.spec.semantics} model[/dim]")
    sys.stdout.write(prompt)
    sys.stdout.flush()
    t0 = time.perf_counter()
    try:
        extra = {"compile": True} if compile_ and backend == "torch" else {}
        out = model.generate(ids, max_new_tokens, loops, temperature, top_k, top_p, seed, tok.eos_id, on_token=show,
                             **extra)
    except ValueError as e:
        sys.stdout.write("\n")
        fail(str(e))
    sys.stdout.write("\n")
    n_new = len(stamps)
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
def trace_command(
    source: str = typer.Argument(..., metavar="SPEC_OR_WEIGHTS",
                                 help="a .safetensors file written by weights_bridge.save, or a spec: " + SPEC_HELP
                                 + " (random weights from --seed)"),
    backend: str = typer.Option("torch", help="torch | jax"),
    prompt: str = typer.Option("", help="prompt text (byte tokenizer; BOS is prepended)"),
    out: Optional[Path] = typer.Option(None, help="folder for trace.json and the PNGs (default: trace-<spec>-<backend>)"),
    n_loops: Optional[int] = typer.Option(None, "--n-loops", min=1, help="loop steps (default: max_loop_iters)"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 | bfloat16 (default: the file's, float32 for a spec)"),
    seed: int = typer.Option(0, min=0, help="seed of the weights when SOURCE is a spec"),
    attention: bool = typer.Option(False, "--attention", help="also dump attention probabilities (large)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " (SPEC only)"),
) -> None:
    """One forward pass of the prompt: halting, state-norm and expert-usage PNGs plus a JSON of every trace.

    Exit status: 0 on success, 2 on bad input (nothing is written then). See docs/trace.md.
    """
    from . import trace as tr

    label = Path(source).stem if source.endswith((".safetensors", ".yaml", ".yml")) else source
    out_dir = out if out is not None else Path(f"trace-{label}-{backend}")
    with console.status(f"loading {backend}") as status:
        try:
            r = tr.run_trace(source, backend, prompt, n_loops=n_loops, dtype=dtype, seed=seed, sets=set_,
                             attention=attention, progress=status.update)
        except tr.TraceInputError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        status.update(f"writing {out_dir}")
        try:
            written, notes = tr.write_all(r, out_dir)
        except OSError as e:
            console.print(f"[red]error:[/red] cannot write to {out_dir}: {e}")
            raise typer.Exit(1) from None
    for table in tr.summary(r, written, notes, out_dir):
        console.print(table)


@app.command("convert")
def convert_command(
    source: Path = typer.Argument(..., help="an open-mythos .pt state dict, or a Mythos .safetensors file"),
    out: Path = typer.Argument(..., help="the Mythos .safetensors file to write (atomically)"),
    config: Optional[str] = typer.Option(None, help="open-mythos config: a MythosConfig YAML/JSON file or a variant name (mythos_1b, ...)"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 | bfloat16 (default: the source's)"),
    check: bool = typer.Option(True, help="afterwards, load the file into both twins and compare a forward"),
) -> None:
    """Convert open-mythos weights (or re-cast ours) into a Mythos weights file, then check both twins on it."""
    from weights_bridge import BridgeError
    from weights_bridge import cli as wb

    try:
        r = wb.convert(source, out, config=config, dtype=dtype, console=console)
    except BridgeError as e:
        console.print(f"[red]convert refused:[/red] {e}")
        raise typer.Exit(2) from None
    t = Table(title=f"wrote {r.path}")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("tensors", f"{r.n_tensors:,}")
    t.add_row("bytes", f"{r.n_bytes:,}")
    t.add_row("dtype", r.dtype)
    t.add_row("parameters", f"{S.count_params(r.spec)['total']:,}")
    t.add_row("semantics", r.spec.semantics)
    console.print(t)
    if check:
        _print_check(wb.check(out, "torch"))


@app.command("check")
def check_command(
    weights: Path = typer.Argument(..., help="a Mythos .safetensors file"),
    backend: str = typer.Option("torch", help="the reference twin: torch | jax"),
    tokens: int = typer.Option(8, help="tokens per row of the random ids"),
    loops: Optional[int] = typer.Option(None, help="loop steps (default: max_loop_iters)"),
) -> None:
    """Load a weights file into both twins and compare one forward (logits and loop counts)."""
    from weights_bridge import BridgeError
    from weights_bridge import cli as wb

    try:
        r = wb.check(weights, backend, n_tokens=tokens, n_loops=loops)
    except BridgeError as e:
        console.print(f"[red]check refused:[/red] {e}")
        raise typer.Exit(2) from None
    _print_check(r)


def _print_check(r) -> None:
    """The table of a weights_bridge CheckResult; exit 1 when the twins disagree."""
    t = Table(title=f"{r.path}: {r.backend} (reference) vs {r.other}, {r.dtype}, ids {r.ids_shape}")
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


app.command("train")(train_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
