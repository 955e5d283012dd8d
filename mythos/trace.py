"""`mythos trace`: one forward pass of either twin, its traces as JSON and as pictures.

    >>> from mythos import trace
    >>> r = trace.run_trace("tiny", "jax", "hello", dtype="float64", sets=["vocab_size=258"])
    >>> trace.write_json(r, "out/trace.json")          # every ModelOutput / Traces field, nested lists
    >>> trace.draw(r, "out")                           # halting.png, state_norms.png, experts.png
    >>> trace.draw(trace.read_json("out/trace.json"), "again")   # the same pictures from the file

Framework-neutral: the twin is imported only inside `run_trace`, its outputs become NumPy at once,
and everything after (JSON, pictures) reads only NumPy. Fields are found by iterating the twin's
`ModelOutput._fields` and `Traces._fields`, so fields added to either appear in the JSON without a
change here (None fields are skipped).

JSON (format "mythos-trace/1"): arrays are nested lists in the model's layout, batch axis kept
(one prompt: B = 1), so `loop_counts` is [[...]] of shape (1, T) and each trace is (N, 1, T, ...).
`shapes` and `dtypes` give every array's shape and NumPy dtype. Non-finite floats are the strings
"inf", "-inf" and "nan" (JSON has no infinities; e.g. `router_margin` is +inf for steps not run and
for a dense FFN); `read_json` turns them back. A bfloat16 model's arrays are written as float32.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

import spec as S
from weights_bridge import backends
from weights_bridge.atomic import atomic_write as _atomic_write

from .load import check_choice, load_model, resolve
from .tokenizer import N_BYTES, ByteTokenizer

FORMAT = "mythos-trace/1"
BACKENDS = backends.BACKENDS
DTYPES = backends.DTYPES
NOT_DUMPED = ("logits", "traces", "cache")  # ModelOutput fields left out: (B, T, V) logits, nested, the KV cache
JSON_NAME = "trace.json"
METADATA_KEYS = ("format", "spec", "backend", "dtype", "seed", "prompt", "ids", "tokens", "n_loops",
                 "halting_threshold", "n_experts", "traces", "shapes", "dtypes", "encoding", "spec_config")
PNG_NAMES = {"halting": "halting.png", "state_norms": "state_norms.png", "experts": "experts.png"}

Progress = Callable[[str], None]


class TraceInputError(ValueError):
    """Input that cannot be traced (unknown backend, spec, dtype, a prompt too long, ...); nothing was written."""


def is_attention_field(name: str) -> bool:
    """Attention probabilities are large: such fields are dumped only when asked (--attention)."""
    return "attn" in name or "attention" in name


@dataclass
class TraceResult:
    """One forward pass as NumPy: what the JSON holds and what the pictures are drawn from."""

    spec_name: str  # the source as given (preset, YAML path or weights file), with --set overrides
    backend: str
    dtype: str  # the model dtype
    seed: int | None  # seed of the random weights; None for a weights file
    prompt: str
    ids: np.ndarray  # (1, T) int64, BOS first
    tokens: list[str]  # T labels: the character each byte starts, "<bos>", "…" for a continuation byte
    n_loops: int  # N, the loop steps allowed (the traces' leading dim)
    halting_threshold: float
    n_experts: int  # routed experts; 0 for a dense FFN
    outputs: dict[str, np.ndarray]  # ModelOutput fields but logits/traces/cache: loop_counts (1, T), halted, n_steps ...
    traces: dict[str, np.ndarray]  # every non-None Traces field, (N, 1, T, ...)
    spec_config: dict = field(default_factory=dict)  # spec.to_dict of the model's spec

    @property
    def n_steps(self) -> int:
        return int(self.outputs["n_steps"])

    @property
    def loop_counts(self) -> np.ndarray:
        return np.asarray(self.outputs["loop_counts"]).reshape(-1)  # (T,)

    @property
    def halted(self) -> np.ndarray:
        return np.asarray(self.outputs["halted"]).reshape(-1)  # (T,)


# --------------------------------------------------------------------------- running a twin


def token_labels(prompt: str, ids: list[int]) -> list[str]:
    """A label per id: "<bos>"/"<eos>", the character a byte starts ("␣" for a space), "…" for continuation bytes."""
    # per byte: (the character it belongs to, whether it is the character's first byte)
    chars = [(c, j == 0) for c in prompt for j in range(len(c.encode("utf-8")))]
    labels, b = [], 0
    for i in ids:
        if i == ByteTokenizer.bos_id:
            labels.append("<bos>")
        elif i == ByteTokenizer.eos_id:
            labels.append("<eos>")
        elif 0 <= i < N_BYTES and b < len(chars):
            c, first = chars[b]
            labels.append(("␣" if c == " " else c if c.isprintable() else repr(c)[1:-1]) if first else "…")
            b += 1
        else:
            labels.append(str(i))
    return labels


def _to_numpy(x: object) -> np.ndarray:
    """A twin's array (or int) as NumPy; bfloat16 becomes float32 (JSON and matplotlib know no bfloat16)."""
    if isinstance(x, int) and not isinstance(x, bool):
        return np.asarray(x, dtype=np.int32)  # torch's n_steps is a Python int, jax's an int32 scalar
    return backends.widen(backends.to_numpy(x))


def collect(out: NamedTuple, *, attention: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(outputs, traces) of a ModelOutput as NumPy, by field name; None fields skipped, attention only if asked."""
    def keep(name: str, value: object) -> bool:
        return value is not None and (attention or not is_attention_field(name))

    outputs = {k: _to_numpy(v) for k, v in zip(out._fields, out) if k not in NOT_DUMPED and keep(k, v)}
    traces = {k: _to_numpy(v) for k, v in zip(out.traces._fields, out.traces) if keep(k, v)}
    return outputs, traces


def supports_attention(twin: object) -> bool:
    """Whether the twin's forward takes attn_probs (attention probabilities in the traces)."""
    return "attn_probs" in inspect.signature(twin.forward).parameters


def run_trace(source: str, backend: str, prompt: str, *, n_loops: int | None = None, dtype: str | None = None,
              seed: int = 0, sets: list[str] | tuple[str, ...] = (), attention: bool = False,
              progress: Progress | None = None) -> TraceResult:
    """One forward pass of the prompt through a twin, every output as NumPy.

    Args:
        source: a preset name, a spec .yaml path (random weights from `seed`), or a .safetensors weights file.
        backend: "torch" or "jax".
        prompt: text, byte-tokenized with BOS first (the spec's vocab_size must be >= 258).
        n_loops: loop steps N (>= 1); None -> spec.recurrent.max_loop_iters.
        dtype: float32 | float64 | bfloat16; None -> the file's, float32 for a spec.
        sets: spec overrides "field=value" (a spec only).
        attention: also return the attention probabilities (needs the twins' `attn_probs` keyword).
        progress: called with a short message as each stage starts.
    Returns:
        A TraceResult. Every check runs before the forward (for a spec, before the model is built).
    Raises:
        TraceInputError: bad input, with a message that names it.
    """
    say = progress or (lambda msg: None)
    try:
        check_choice("--backend", backend, BACKENDS)
        if dtype is not None:
            check_choice("--dtype", dtype, DTYPES)
        src = resolve(source, sets)  # a weights file: its spec from the header, no tensor read yet
        if n_loops is not None:  # bounded: each loop step is a row of every picture and of the JSON
            n_loops = S.check_loops(src.spec, n_loops, what="--n-loops")
        _check_prompt(src.spec, prompt)

        say(f"loading {backend}")
        twin = backends.twin(backend)
        if attention and not supports_attention(twin):
            raise TraceInputError(f"--attention needs `mythos_{backend}.forward(..., attn_probs=True)`, which this "
                                  "version of the model does not have yet; run without --attention")
        # parity switches, as in the test suite: TF32 off (torch), x64 and float32 matmuls (jax, needed by
        # float64), so both twins trace the same numbers
        backends.enable_float64(backend)
        say(f"reading {source}" if src.weights is not None else f"building {backend} model (seed {seed})")
        model = load_model(source, backend, dtype, seed, sets)
    except TraceInputError:
        raise
    except ValueError as e:  # LoadError, SpecError, BridgeError, or a dtype the twin refuses
        raise TraceInputError(str(e)) from None
    s, weights = model.spec, src.weights is not None

    tok = ByteTokenizer.for_spec(s)
    ids = np.asarray([tok.encode(prompt)], dtype=np.int64)  # (1, T)
    kw = {"attn_probs": True} if attention else {}
    say(f"running the {backend} forward" + (" (compiling)" if backend == "jax" else ""))
    out = backends.forward(backend, model, ids, n_loops, **kw)
    outputs, traces = collect(out, attention=attention)
    spec_name = str(source) if weights or not sets else f"{source} ({', '.join(sets)})"
    return TraceResult(
        spec_name=spec_name, backend=backend, dtype=backends.dtype_of(out.logits), seed=None if weights else seed,
        prompt=prompt, ids=ids, tokens=token_labels(prompt, ids[0].tolist()),
        n_loops=int(traces["halt_p"].shape[0]), halting_threshold=float(s.halting.threshold),
        n_experts=s.moe.n_experts if s.recurrent.ffn == "moe" else 0,
        outputs=outputs, traces=traces, spec_config=S.to_dict(s))


def _check_prompt(s: S.Spec, prompt: str) -> None:
    """The prompt fits the byte tokenizer and max_seq_len."""
    try:
        tok = ByteTokenizer.for_spec(s)
    except ValueError as e:
        raise TraceInputError(str(e)) from None
    n = len(tok.encode(prompt))
    if n > s.max_seq_len:
        raise TraceInputError(f"the prompt is {n} tokens (BOS + {n - 1} UTF-8 bytes), more than the spec's "
                              f"max_seq_len={s.max_seq_len}")


# --------------------------------------------------------------------------- JSON


def _encode(x: object) -> object:
    """Nested lists with non-finite floats as "inf" / "-inf" / "nan" (valid JSON)."""
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _decode(x: object) -> object:
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return float(x) if isinstance(x, str) else x


def to_json(r: TraceResult) -> dict:
    """The JSON document of a trace (see the module docstring)."""
    arrays = {**r.outputs, **{f"traces.{k}": v for k, v in r.traces.items()}}
    clash = sorted(set(r.outputs) & set(METADATA_KEYS))
    if clash:
        raise ValueError(f"ModelOutput field(s) {clash} clash with trace JSON keys of the same name: "
                         "rename them in mythos/trace.py (METADATA_KEYS)")
    return {
        "format": FORMAT,
        "spec": r.spec_name,
        "backend": r.backend,
        "dtype": r.dtype,
        "seed": r.seed,
        "prompt": r.prompt,
        "ids": r.ids.tolist(),
        "tokens": r.tokens,
        "n_loops": r.n_loops,
        "halting_threshold": r.halting_threshold,
        "n_experts": r.n_experts,
        **{k: _encode(np.asarray(v).tolist()) for k, v in r.outputs.items()},  # loop_counts, halted, n_steps, ...
        "traces": {k: _encode(v.tolist()) for k, v in r.traces.items()},
        "shapes": {k: list(np.shape(v)) for k, v in arrays.items()},
        "dtypes": {k: np.asarray(v).dtype.name for k, v in arrays.items()},
        "encoding": 'arrays as nested lists; non-finite floats as the strings "inf", "-inf", "nan"',
        "spec_config": r.spec_config,
    }


def read_json(path: str | os.PathLike) -> TraceResult:
    """A TraceResult from a trace JSON file (the inverse of write_json: same arrays, shapes and dtypes)."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    if d.get("format") != FORMAT:
        raise TraceInputError(f"{path}: not a {FORMAT} file (format={d.get('format')!r})")

    def array(key: str, value: object) -> np.ndarray:
        return np.asarray(_decode(value), dtype=d["dtypes"][key]).reshape(d["shapes"][key])

    output_keys = [k for k in d["shapes"] if not k.startswith("traces.")]
    return TraceResult(
        spec_name=d["spec"], backend=d["backend"], dtype=d["dtype"], seed=d["seed"], prompt=d["prompt"],
        ids=np.asarray(d["ids"], dtype=np.int64), tokens=d["tokens"], n_loops=d["n_loops"],
        halting_threshold=d["halting_threshold"], n_experts=d["n_experts"],
        outputs={k: array(k, d[k]) for k in output_keys},
        traces={k: array(f"traces.{k}", v) for k, v in d["traces"].items()},
        spec_config=d.get("spec_config", {}))


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically (weights_bridge.atomic), creating the folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _atomic_write(path, data)


def write_json(r: TraceResult, path: str | os.PathLike) -> Path:
    """Write the trace as JSON (atomically); strict JSON: no NaN or Infinity literals."""
    return atomic_write(path, json.dumps(to_json(r), allow_nan=False, ensure_ascii=False).encode("utf-8"))


# --------------------------------------------------------------------------- pictures


def expert_counts(r: TraceResult) -> np.ndarray:
    """(E, n_steps) int: routed (position, slot) entries per expert and step, running positions only."""
    idx = r.traces["expert_idx"][: r.n_steps, 0]  # (n, T, k)
    running = r.traces["running"][: r.n_steps, 0]  # (n, T)
    counts = np.zeros((r.n_experts, r.n_steps), dtype=np.int64)
    for t in range(r.n_steps):
        sel = idx[t][running[t]].reshape(-1)  # the running positions' experts
        counts[:, t] = np.bincount(sel[sel >= 0], minlength=r.n_experts)[: r.n_experts]
    return counts


def _tick_step(n: int) -> int:
    """Label every k-th token so labels stay readable on long prompts."""
    return max(1, math.ceil(n / 60))


def _title(ax: object, what: str, r: TraceResult) -> None:
    """Two parts: what the picture shows, then the run (spec, backend, dtype), wrapped to the figure's width."""
    chars = int(ax.figure.get_figwidth() * 12)  # about 12 characters per inch at fontsize 9-10
    run = f"{r.spec_name}, {r.backend} {r.dtype}"
    ax.set_title(textwrap.fill(what, chars) + "\n" + textwrap.fill(run, int(chars * 1.1)), fontsize=9)


def _save(fig: object, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write(path, buf.getvalue())


def draw_halting(r: TraceResult, path: Path) -> Path:
    """Tokens (x) by loop steps (y): cumulative halting probability; each token's loop count marked."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    T, N = len(r.tokens), r.n_loops
    c = np.asarray(r.traces["cum_p"][:, 0], dtype=np.float64)  # (N, T)
    shown = np.ma.masked_where(np.broadcast_to(np.arange(N)[:, None] >= r.n_steps, c.shape), c)  # steps not run: masked (grey)
    counts = r.loop_counts
    fig, ax = plt.subplots(figsize=(min(max(2.0 + 0.45 * T, 6.0), 24.0), min(max(1.6 + 0.45 * N, 3.2), 14.0)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    im = ax.imshow(shown, origin="lower", aspect="auto", cmap=cmap, vmin=0.0, vmax=max(1.0, float(c.max())),
                   extent=(-0.5, T - 0.5, 0.5, N + 0.5), interpolation="nearest")
    # after its halting step a position's c is frozen: dim those cells
    after = (np.arange(1, N + 1)[:, None] > counts[None, :]) & (np.arange(N)[:, None] < r.n_steps)
    for t, i in zip(*np.nonzero(after)):
        ax.add_patch(Rectangle((i - 0.5, t + 0.5), 1, 1, facecolor="white", alpha=0.55, linewidth=0))
    for i, (n, h) in enumerate(zip(counts, r.halted)):
        ax.add_patch(Rectangle((i - 0.5, n - 0.5), 1, 1, fill=False, linewidth=2.2,
                               edgecolor="#d62728" if h else "#ff7f0e", linestyle="-" if h else "--"))
    if T <= 40 and T * N <= 400:
        for t in range(min(N, r.n_steps)):
            for i in range(T):
                ax.text(i, t + 1, f"{c[t, i]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if c[t, i] < 0.6 else "black")
    k = _tick_step(T)
    ax.set_xticks(range(0, T, k), r.tokens[::k], fontsize=9)
    ax.set_yticks(range(1, N + 1))
    ax.set_xlabel("token")
    ax.set_ylabel("loop step")
    _title(ax, f"cumulative halting probability (threshold {r.halting_threshold:g}, red on the scale), "
               f"{r.n_steps} of {N} loop steps run", r)
    bar = fig.colorbar(im, ax=ax, label="cumulative halting probability c", fraction=0.04, pad=0.02)
    bar.ax.axhline(r.halting_threshold, color="#d62728", linewidth=2)  # the threshold, on the colour scale
    handles = [Patch(fill=False, edgecolor="#d62728", linewidth=2, label="loop count (halted)"),
               Patch(fill=False, edgecolor="#ff7f0e", linewidth=2, linestyle="--", label="loop count (no halt: out of steps)"),
               Patch(facecolor="#d9d9d9", label="step not run")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.14 if T <= 40 else -0.2), ncol=3,
              fontsize=8, frameon=False)
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def draw_state_norms(r: TraceResult, path: Path) -> Path:
    """||h_t|| per loop step: min-max band and mean over tokens; one line per token for short prompts."""
    import matplotlib.pyplot as plt

    n = r.n_steps
    norms = np.asarray(r.traces["state_norm"][:n, 0], dtype=np.float64)  # (n, T)
    steps = np.arange(1, n + 1)
    T = norms.shape[1]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.fill_between(steps, norms.min(1), norms.max(1), color="#1f77b4", alpha=0.15, label="min-max over tokens")
    ax.plot(steps, norms.mean(1), color="#1f77b4", linewidth=2.5, label="mean over tokens")
    if T <= 16:
        colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(T, 2)))
        for i in range(T):
            m = int(min(r.loop_counts[i], n))
            ax.plot(steps[:m], norms[:m, i], color=colors[i], linewidth=1, marker="o", markersize=3,
                    label=f"{i}: {r.tokens[i]} ({r.loop_counts[i]})")
            ax.plot(steps[m - 1:], norms[m - 1:, i], color=colors[i], linewidth=0.8, linestyle=":")
    ax.set_xticks(steps)
    ax.set_xlabel("loop step")
    ax.set_ylabel("||h|| (L2 over channels)")
    _title(ax, "state norm per loop step" + (" (per token: solid while running, dotted after halting)"
                                              if T <= 16 else ""), r)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              title="token (loop count)" if T <= 16 else None, title_fontsize=7)
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def draw_experts(r: TraceResult, path: Path) -> Path:
    """Experts (y) by loop steps (x): routed (token, slot) pairs of running positions."""
    import matplotlib.pyplot as plt

    counts = expert_counts(r)
    E, n = counts.shape
    fig, ax = plt.subplots(figsize=(min(max(3.5 + 0.6 * n, 5.0), 20.0), min(max(1.8 + 0.3 * E, 3.2), 18.0)))
    im = ax.imshow(counts, origin="lower", aspect="auto", cmap="magma", vmin=0, interpolation="nearest",
                   extent=(0.5, n + 0.5, -0.5, E - 0.5))
    if E * n <= 600:
        top = max(int(counts.max()), 1)
        for e in range(E):
            for t in range(n):
                ax.text(t + 1, e, str(counts[e, t]), ha="center", va="center", fontsize=8,
                        color="white" if counts[e, t] < 0.6 * top else "black")
    ax.set_xticks(range(1, n + 1))
    ax.set_yticks(range(0, E, max(1, math.ceil(E / 40))))
    ax.set_xlabel("loop step")
    ax.set_ylabel("expert")
    k = r.traces["expert_idx"].shape[-1]
    _title(ax, f"routed tokens per expert and loop step (running positions only, top-{k} of {E})", r)
    fig.colorbar(im, ax=ax, label="routed (token, slot) pairs", fraction=0.05, pad=0.02)
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def draw(r: TraceResult, out_dir: str | os.PathLike, *, progress: Progress | None = None
         ) -> tuple[list[tuple[Path, str]], list[str]]:
    """Write the PNGs into out_dir (atomically): ([(path, what it shows)], [notes on pictures skipped])."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    out = Path(out_dir)
    say = progress or (lambda msg: None)
    written, notes = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # a prompt in a script the font lacks
        say(f"drawing {PNG_NAMES['halting']} ({len(r.tokens)} tokens x {r.n_loops} loop steps)")
        written.append((draw_halting(r, out / PNG_NAMES["halting"]),
                        "cumulative halting probability, tokens x loop steps; loop count of each token boxed"))
        say(f"drawing {PNG_NAMES['state_norms']}")
        written.append((draw_state_norms(r, out / PNG_NAMES["state_norms"]),
                        "||h|| per loop step: mean, min-max band" + (", one line per token" if len(r.tokens) <= 16 else "")))
        if r.n_experts == 0 or r.traces["expert_idx"].shape[-1] == 0:
            stale = out / PNG_NAMES["experts"]
            notes.append("expert usage: not drawn, the looped block's FFN is dense (no routed experts)"
                         + (f"; removed the stale {stale.name} of an earlier run" if stale.exists() else ""))
            stale.unlink(missing_ok=True)  # an earlier MoE run's picture would contradict this trace
        else:
            say(f"drawing {PNG_NAMES['experts']}")
            written.append((draw_experts(r, out / PNG_NAMES["experts"]),
                            "routed tokens per expert and loop step (running positions)"))
    return written, notes


def write_all(r: TraceResult, out_dir: str | os.PathLike, *, progress: Progress | None = None
              ) -> tuple[list[tuple[Path, str]], list[str]]:
    """trace.json and the PNGs in out_dir: ([(path, what it shows)], [notes]); `progress` hears each file."""
    out = Path(out_dir)
    say = progress or (lambda msg: None)
    say(f"writing {out / JSON_NAME}")
    path = write_json(r, out / JSON_NAME)
    written, notes = draw(r, out, progress=say)
    return [(path, "every output and Traces field as nested lists (see docs/trace.md)"), *written], notes


def summary(r: TraceResult, written: list[tuple[Path, str]], notes: list[str], out_dir: str | os.PathLike) -> list[object]:
    """What to print: a table of the files written (what each shows), the notes, a table of loop counts."""
    from rich.markup import escape
    from rich.table import Table

    files = Table(title=escape(f"{r.spec_name}, {r.backend} {r.dtype}: {r.n_steps} of {r.n_loops} loop steps run; "
                               f"written to {out_dir}"))
    files.add_column("file", no_wrap=True)
    files.add_column("what it shows")
    for path, what in written:
        files.add_row(path.name, what)
    T = len(r.tokens)
    c_last = r.traces["cum_p"][np.maximum(r.loop_counts - 1, 0), 0, np.arange(T)]  # c at each token's loop count
    if T <= 48:
        loops = Table(title="loop count per token")
        for col in ("#", "token", "id", "loops", "halted", "c at its last step"):
            loops.add_column(col, justify="left" if col == "token" else "right")
        for i, (tok, id_, n, h, c) in enumerate(zip(r.tokens, r.ids[0], r.loop_counts, r.halted, c_last)):
            loops.add_row(str(i), escape(tok), str(id_), str(n), "yes" if h else "[yellow]no (out of steps)[/yellow]",
                          f"{c:.3f}")
    else:  # a long prompt: how many tokens took each loop count
        loops = Table(title=f"loop counts of the {T} tokens")
        for col in ("loops", "tokens", "halted", "first tokens"):
            loops.add_column(col, justify="left" if col == "first tokens" else "right")
        for n in np.unique(r.loop_counts):
            at = np.nonzero(r.loop_counts == n)[0]
            loops.add_row(str(n), str(len(at)), str(int(r.halted[at].sum())), escape(" ".join(r.tokens[i] for i in at[:12])))
    return [files, *(f"[yellow]note:[/yellow] {escape(n)}" for n in notes), loops]
