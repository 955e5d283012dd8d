"""The `mythos` command line: info, parity, convert."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

import spec as S

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
