"""Sharding rules, framework-free (docs/scaling.md): a logical axis for every manifest tensor, and the rule
table of each strategy that maps logical axes to mesh axes. The mesh is not part of the model spec: its
shape comes from the command line (`--mesh data=2,expert=4`) or the training config.

    >>> mesh = parse_mesh("data=2,expert=4")
    >>> strategy = parse_strategy("dp+ep", mesh)
    >>> partition(spec, mesh, strategy)["recurrent.block.ffn.experts.gate"]
    ('expert', None, None)

Strategies (each uses one mesh axis; combine with "+", e.g. "fsdp+tp", "dp+ep"):

| strategy | mesh axis | parameters | batch |
|---|---|---|---|
| dp   | data   | replicated | split over `data` |
| fsdp | data   | every tensor with an `embed` axis split on it over `data` (ZeRO-3) | split over `data` |
| tp   | model  | attention heads and SwiGLU hidden split over `model` (Megatron column/row) | replicated over `model` |
| ep   | expert | routed expert stacks split on the expert axis; tokens travel to their experts | split over `expert` too |

Logical axes (the torch layout of the manifest: a Linear weight is [out, in]):
`vocab`, `embed` (model width), `heads` (query heads x head width, fused), `kv_heads`, `mlp` (a SwiGLU's
hidden width: prelude, coda, the dense loop FFN, shared experts), `expert` (routed experts), `expert_mlp`
(a routed expert's hidden width: tp leaves it whole, as torch's DTensor plans cannot split stacked experts),
`latent` (MLA's low-rank widths), `rank` (LoRA), `loop` (per-step tables), `summaries` (compressor queries),
and None (a tensor too small to split, and the MoE router: each shard routes its own tokens over every expert).

What a mesh costs, from the same tables: per_device_bytes (parameters, AdamW state, KV cache per device)
and collectives_per_step (the collectives each strategy issues per loop step and per training step, with
the textbook bytes per device); `mythos info SPEC --mesh ...` prints both.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from .costs import DTYPE_BYTES, cache_shapes
from .manifest import manifest
from .schema import Spec, SpecError, check_length, check_loops

MESH_AXES = ("data", "model", "expert")
STRATEGIES = ("dp", "fsdp", "tp", "ep")
STRATEGY_AXIS = {"dp": "data", "fsdp": "data", "tp": "model", "ep": "expert"}

# strategy -> {logical axis: mesh axis}; a combination is the union of its strategies' tables
RULES: dict[str, dict[str, str]] = {
    "dp": {},
    "fsdp": {"embed": "data"},
    "tp": {"heads": "model", "kv_heads": "model", "mlp": "model"},
    "ep": {"expert": "expert"},
}

Mesh = dict[str, int]  # mesh axis -> size, in mesh order
Strategy = tuple[str, ...]  # e.g. ("fsdp", "tp"), in STRATEGIES order


def parse_mesh(text: str) -> Mesh:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4} (order kept); SpecError naming what is wrong."""
    mesh: Mesh = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*([a-z]+)\s*=\s*(\d+)\s*", part)
        if m is None:
            raise SpecError(f"--mesh {text!r}: expected axis=size pairs separated by commas, e.g. data=2,expert=4; "
                            f"got {part!r}")
        axis, size = m.group(1), int(m.group(2))
        if axis not in MESH_AXES:
            raise SpecError(f"--mesh: unknown axis {axis!r}; allowed: {', '.join(MESH_AXES)}")
        if axis in mesh:
            raise SpecError(f"--mesh: axis {axis!r} given twice")
        if size < 1:
            raise SpecError(f"--mesh: {axis}={size} must be at least 1")
        mesh[axis] = size
    return mesh


def mesh_size(mesh: Mesh) -> int:
    """Devices (or ranks) the mesh holds."""
    return math.prod(mesh.values())


def default_strategy(mesh: Mesh) -> Strategy:
    """The strategy a mesh implies when none is named: data -> dp, model -> tp, expert -> ep."""
    implied = {"data": "dp", "model": "tp", "expert": "ep"}
    return tuple(st for st in STRATEGIES if any(implied[a] == st for a in mesh))


def parse_strategy(text: str | None, mesh: Mesh) -> Strategy:
    """'fsdp+tp' -> ('fsdp', 'tp'), checked against the mesh: every strategy's axis is in it, and every mesh
    axis of size > 1 is used by one strategy. None or '' -> default_strategy(mesh)."""
    if not text:
        strategy = default_strategy(mesh)
    else:
        names = [p.strip() for p in text.split("+")]
        for n in names:
            if n not in STRATEGIES:
                raise SpecError(f"--strategy: unknown strategy {n!r}; allowed: {', '.join(STRATEGIES)}, "
                                "combined with '+' (e.g. fsdp+tp)")
        if len(set(names)) != len(names):
            raise SpecError(f"--strategy {text!r}: a strategy is named twice")
        if "dp" in names and "fsdp" in names:
            raise SpecError("--strategy: dp and fsdp both use the data axis; name one of them")
        strategy = tuple(st for st in STRATEGIES if st in names)
    for st in strategy:
        axis = STRATEGY_AXIS[st]
        if axis not in mesh:
            raise SpecError(f"strategy {st} needs mesh axis {axis!r}; the mesh has {format_mesh(mesh)}")
    used = {STRATEGY_AXIS[st] for st in strategy}
    for axis, size in mesh.items():
        if size > 1 and axis not in used:
            raise SpecError(f"mesh axis {axis}={size} is used by no strategy in {'+'.join(strategy) or 'none'}; "
                            f"the {axis} axis is used by {' or '.join(k for k, v in STRATEGY_AXIS.items() if v == axis)}")
    return strategy


def format_mesh(mesh: Mesh) -> str:
    return ",".join(f"{a}={n}" for a, n in mesh.items())


def strategies_for(mesh: Mesh) -> list[Strategy]:
    """Every strategy the mesh supports (each mesh axis of size > 1 used once): data -> dp or fsdp."""
    data = [("dp",), ("fsdp",)] if "data" in mesh else [()]
    model = [("tp",)] if "model" in mesh else [()]
    expert = [("ep",)] if "expert" in mesh else [()]
    return [d + m + e for d in data for m in model for e in expert]


def logical_axes(s: Spec) -> dict[str, tuple[str | None, ...]]:
    """The logical axis of every dimension of every manifest tensor (torch layout), by path."""
    a, r = s.attention, s.recurrent
    out: dict[str, tuple[str | None, ...]] = {}
    for p in manifest(s):
        leaf = p.path.rsplit(".", 1)
        name = leaf[0].rsplit(".", 1)[-1] if len(leaf) == 2 else leaf[0]
        path = p.path
        axes: tuple[str | None, ...]
        if path == "embed.weight":
            axes = ("vocab", "embed")
        elif path == "head.weight":
            axes = ("vocab", "embed")
        elif ".experts." in path:  # routed experts [E, in, out]
            axes = ("expert", "embed", "expert_mlp") if path.endswith(("gate", "up")) else ("expert", "expert_mlp", "embed")
        elif path.endswith("router_bias"):
            # the router stays whole on every device: each shard routes its own tokens over all experts
            # (a router split over `expert` would gather its logits every loop step), and the bias moves by
            # the all-reduced load on every rank
            axes = (None,)
        elif path.endswith("ffn.router.weight"):
            axes = (None, "embed")
        elif ".attn." in path and not path.endswith(("norm.weight",)):
            axes = _attention_axes(name, a.type)
        elif name in ("gate", "up") and path.endswith(".weight"):  # SwiGLU [hidden, D]
            axes = ("mlp", "embed")
        elif name == "down" and path.endswith(".weight") and "lora" not in path:  # SwiGLU [D, hidden]
            axes = ("embed", "mlp")
        elif path == "recurrent.lora.B":
            axes = ("rank", "embed")
        elif path == "recurrent.lora.scale":
            axes = ("loop", "rank")
        elif path == "recurrent.lora.down.weight":
            axes = ("rank", "embed")
        elif path == "recurrent.compressor.queries":
            axes = ("summaries", "embed")
        elif len(p.shape) == 2 and p.shape[1] == s.dim and p.shape[0] == s.dim:  # D x D projections
            axes = ("embed", None)  # in = embed is the one fsdp splits; out stays whole (the residual stream)
        elif len(p.shape) == 2 and p.shape[1] == s.dim:  # [out, D] heads: halting, value head
            axes = (None, "embed")
        elif len(p.shape) == 2 and p.shape[0] == s.dim:
            axes = ("embed", None)
        elif len(p.shape) == 1 and p.shape[0] == s.dim:  # norms, injection, null_k/v, gate biases
            axes = ("embed",)
        else:
            axes = (None,) * len(p.shape)
        if len(axes) != len(p.shape):  # pragma: no cover - a manifest tensor this table does not know
            raise SpecError(f"sharding: no logical axes for {path} of shape {p.shape}")
        out[path] = axes
    return out


def _attention_axes(name: str, kind: str) -> tuple[str | None, ...]:
    """Logical axes of one attention projection [out, in]."""
    if kind == "gqa":
        return {"wq": ("heads", "embed"), "wk": ("kv_heads", "embed"), "wv": ("kv_heads", "embed"),
                "wo": ("embed", "heads")}[name]
    # MLA: the down projections and norms act on the latent (shared by every head), the ups are per head
    return {"q_down": ("latent", "embed"), "q_norm": ("latent",), "q_up_nope": ("heads", "latent"),
            "q_up_rope": ("heads", "latent"), "kv_down": ("latent", "embed"), "kv_norm": ("latent",),
            "kv_up": ("heads", "latent"), "wo": ("embed", "heads")}[name]


def _units(s: Spec) -> dict[str, tuple[int, str]]:
    """Logical axes that split only at whole units: axis -> (elements per unit, unit name)."""
    a = s.attention
    if a.type == "gqa":
        return {"heads": (s.head_dim, "heads"), "kv_heads": (s.head_dim, "kv heads")}
    return {"heads": (0, "heads")}  # 0: MLA's fused per-head widths differ per tensor: divide n_heads


def rules(strategy: Strategy) -> dict[str, str]:
    """The union of the strategies' rule tables: logical axis -> mesh axis."""
    out: dict[str, str] = {}
    for st in strategy:
        out.update(RULES[st])
    return out


def partition(s: Spec, mesh: Mesh, strategy: Strategy) -> dict[str, tuple[str | None, ...]]:
    """The mesh axis of every dimension of every manifest tensor (torch layout; None: not split).

    Raises SpecError naming the tensor, the mesh axis and both sizes when the axis does not divide it.
    """
    table = rules(strategy)
    units = _units(s)
    out: dict[str, tuple[str | None, ...]] = {}
    shapes = {p.path: p.shape for p in manifest(s)}
    for path, axes in logical_axes(s).items():
        placed: list[str | None] = []
        for dim, (logical, size) in enumerate(zip(axes, shapes[path])):
            axis = table.get(logical) if logical is not None else None
            if axis is not None and mesh.get(axis, 1) > 1:
                n = mesh[axis]
                count, what = size, "elements"
                if logical in units:
                    width, what = units[logical]
                    count = size // width if width else (
                        s.attention.n_heads if logical == "heads" else s.attention.n_kv_heads)
                if count % n:
                    raise SpecError(f"{path}: dimension {dim} ({logical}, {count} {what}) is not divisible by "
                                    f"mesh axis {axis}={n}")
            placed.append(axis if axis is not None and mesh.get(axis, 1) > 1 else None)
        out[path] = tuple(placed)
    if "ep" in strategy and s.recurrent.ffn != "moe":
        raise SpecError(f"strategy ep needs a MoE loop FFN (recurrent.ffn=moe); this spec has recurrent.ffn="
                        f"{s.recurrent.ffn}")
    return out


def batch_axes(mesh: Mesh, strategy: Strategy) -> tuple[str, ...]:
    """The mesh axes the batch is split over: data (dp, fsdp), then expert (ep)."""
    return tuple(a for a in ("data", "expert")
                 if a in mesh and any(STRATEGY_AXIS[st] == a for st in strategy if st != "tp"))


def check_batch(mesh: Mesh, strategy: Strategy, batch: int) -> None:
    """SpecError unless the batch splits evenly over the batch axes."""
    axes = batch_axes(mesh, strategy)
    n = math.prod(mesh[a] for a in axes)
    if batch % n:
        raise SpecError(f"batch {batch} is not divisible by the {n} batch shards of mesh "
                        f"{format_mesh(mesh)} ({'x'.join(axes)}) under {'+'.join(strategy)}")


# ---- what a mesh costs: per-device memory and collectives (docs/scaling.md) ----

OPTIMIZERS = ("adamw", "none")
PHASES = ("forward", "backward", "training step")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")  # the HLO op names
FLAG_BYTES = 4  # ACT's "any position still running", one int32
LOAD_BYTES = 4  # the expert load, (E,) int32 (expert_load in both twins)


class Collective(NamedTuple):
    """One row of collectives_per_step.

    strategy: the strategy part that issues it ("tp", "ep", "dp+ep" for a group over both axes); kind:
    one of COLLECTIVES; what: "<phase>: <what travels>", phase one of PHASES; count: collectives per
    loop step (per training step in a "training step" row); bytes: bytes sent per device by those
    `count` collectives together, rounded down.
    """
    strategy: str
    kind: str
    what: str
    count: int
    bytes: int

    @property
    def phase(self) -> str:
        """forward | backward (per loop step) | training step (once per training step)."""
        return self.what.split(":", 1)[0]


def _resolve(mesh: Mesh | str, strategy: str | Strategy | None) -> tuple[Mesh, Strategy]:
    """A mesh (dict or 'data=2,...' text) and a strategy (tuple, 'fsdp+tp' or None), checked together."""
    mesh = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    text = strategy if strategy is None or isinstance(strategy, str) else "+".join(strategy)
    return mesh, parse_strategy(text, mesh)


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise SpecError(f"dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _shards(axes: tuple[str | None, ...], mesh: Mesh) -> int:
    """How many pieces a tensor placed on these mesh axes is cut into (one device holds one)."""
    return math.prod(mesh[a] for a in axes if a is not None)


def _batch_shards(mesh: Mesh, strategy: Strategy) -> int:
    return math.prod(mesh[a] for a in batch_axes(mesh, strategy))


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{what}={value!r} must be a whole number >= 1")
    return value


def per_device_bytes(s: Spec, mesh: Mesh | str, strategy: str | Strategy | None, *, batch: int, seq_len: int,
                     n_loops: int | None = None, dtype: str = "float32", optimizer: str = "adamw") -> dict[str, int]:
    """Bytes one device holds when the model runs on ``mesh`` under ``strategy`` (from the spec alone).

    Every tensor's bytes divided by the product of the mesh sizes of its split dimensions (partition()):

    - ``params``: every manifest tensor in ``dtype``; buffers (the router bias) in the accumulation dtype
      (float64 for float64, else float32), as both twins keep them;
    - ``optimizer``: AdamW's two moments per parameter (not buffers), sharded like the parameter, in
      float32 (float64 for a float64 model), plus a float32 master copy of the weights when ``dtype`` is
      bfloat16 or float16; ``optimizer="none"`` (inference): 0;
    - ``kv_cache``: spec.cache_shapes(s, batch, seq_len, n_loops) in ``dtype``, the batch axis split over
      batch_axes(mesh, strategy), and GQA's kv-head axis over ``model`` under tp (MLA's latent cache and
      rope key are shared by every head: tp leaves them whole);
    - ``total``: their sum (gradients, as many bytes as ``params`` under training, and activations are not
      counted).

    Raises SpecError when the strategy cannot split the spec on this mesh (partition()), when ``batch`` does
    not split over the batch shards, or for a bad ``seq_len``, ``n_loops``, ``dtype`` or ``optimizer``.
    """
    mesh, strategy = _resolve(mesh, strategy)
    b = _dtype_bytes(dtype)
    if optimizer not in OPTIMIZERS:
        raise SpecError(f"optimizer {optimizer!r} is not allowed; allowed: {', '.join(OPTIMIZERS)}")
    place = partition(s, mesh, strategy)
    check_batch(mesh, strategy, _positive(batch, "batch"))
    seq_len = check_length(s, seq_len, what="seq_len")
    n = s.recurrent.max_loop_iters if n_loops is None else check_loops(s, n_loops, what="n_loops")
    acc = 8 if b == 8 else 4  # buffers, moments, master weights: the accumulation dtype

    params = optim = 0
    for p in manifest(s):
        local = p.numel // _shards(place[p.path], mesh)
        if p.kind == "buffer":
            params += local * acc
            continue
        params += local * b
        if optimizer == "adamw":
            optim += 2 * local * acc + (4 * local if b < 4 else 0)

    split_batch = _batch_shards(mesh, strategy)
    heads = mesh.get("model", 1) if "tp" in strategy and s.attention.type == "gqa" else 1
    cache = 0
    for name, shape in cache_shapes(s, batch, seq_len, n).items():
        pieces = split_batch * (heads if name in ("k", "v") else 1)  # (L, B, S, H_kv, K): B and H_kv split
        cache += math.prod(shape) // pieces * b
    return {"params": params, "optimizer": optim, "kv_cache": cache, "total": params + optim + cache}


def _all_reduce(x: int, n: int) -> int:
    """Ring all-reduce of x bytes over n devices: 2 (n - 1) / n x sent per device."""
    return 2 * (n - 1) * x // n


def _all_gather(full: int, n: int) -> int:
    """All-gather (or reduce-scatter) of a tensor of `full` bytes over n devices: (n - 1) / n x full."""
    return (n - 1) * full // n


def _all_to_all(local: int, n: int) -> int:
    """All-to-all of a local buffer of `local` bytes over n devices: (n - 1) / n of it leaves the device."""
    return (n - 1) * local // n


def _label(strategy: Strategy, axes: tuple[str, ...]) -> str:
    """The strategy parts whose mesh axes these are: ('data', 'expert') under dp+ep -> 'dp+ep'."""
    return "+".join(st for st in strategy if STRATEGY_AXIS[st] in axes)


def collectives_per_step(s: Spec, mesh: Mesh | str, strategy: str | Strategy | None, *, batch: int, seq_len: int,
                         dtype: str = "float32", capacity_factor: float = 1.0) -> list[Collective]:
    """The collectives a strategy implies per loop step (the forward and backward of one call of the
    looped block), plus those issued once per training step, with the textbook bytes per device.

    B_l = batch / (batch shards), T = seq_len, D = dim, b = bytes of ``dtype``, n = the size of the mesh
    axis (or axes) the collective runs over; A = B_l T D b, one activation of the residual stream.
    Ring all-reduce sends 2 (n - 1) / n x size per device; all-gather and reduce-scatter (n - 1) / n x
    the full (gathered) size; all-to-all (n - 1) / n x the local buffer. The loop block is every
    ``recurrent.*`` tensor (one FSDP unit, called once per loop step); the rest (embedding, prelude,
    coda, final norm, head) runs once per forward.

    - dp: nothing in the forward. Per training step: one all-reduce of the gradients over the batch axes
      a tensor is not split on (data, plus expert under ep for every tensor but the expert stacks).
    - fsdp: per loop step, the forward all-gathers the loop block's data-split parameters (FSDP re-gathers
      the shared block at every call: (n - 1) x its local bytes); the backward gathers them again
      (reshard after forward, FSDP2's default) and reduce-scatters their gradients. Per training step:
      the same for the tensors outside the loop (all-gather twice, reduce-scatter once), and an all-reduce
      of the gradients of tensors fsdp leaves whole (no embed axis).
    - tp: two all-reduces of A per block call (the attention output after wo, the FFN output after down;
      the routed experts are not tp-split, the shared experts' output joins the FFN all-reduce), two more
      in the backward (the input gradients of the column-parallel projections); 4 (P + C) per training
      step for the prelude and coda blocks.
    - ep: two all-to-alls per loop step (dispatch, combine) of a fixed-capacity buffer of
      E_l x ceil(c B_l T k / E_l) rows of D (E_l = the expert axis size, c = ``capacity_factor``; c = 1
      drops no token when routing is even, c = E_l never drops one), two more in the backward.
    - ACT's early exit: one all-reduce of one int32 flag ("any position still running") per loop step over
      the batch axes, so every shard runs the same steps (torch: explicit; JAX: the while_loop predicate
      over a sharded array; the scan loop and tp alone need none).
    - MoE with a split batch: one all-reduce of the expert load ((E,) int32) per training step, so the
      router bias moves by the same load on every device.

    Rows for a mesh axis of size 1 are left out. Raises SpecError as per_device_bytes does.
    """
    mesh, strategy = _resolve(mesh, strategy)
    b = _dtype_bytes(dtype)
    place = partition(s, mesh, strategy)
    check_batch(mesh, strategy, _positive(batch, "batch"))
    T = check_length(s, seq_len, what="seq_len")
    if not (isinstance(capacity_factor, (int, float)) and 0 < capacity_factor <= 1024):
        raise SpecError(f"capacity_factor={capacity_factor!r} must be a number in (0, 1024]")
    bx = batch_axes(mesh, strategy)
    g = math.prod(mesh[a] for a in bx)
    B = batch // g
    A = B * T * s.dim * b
    rows: list[Collective] = []

    def add(st: str, kind: str, what: str, count: int, nbytes: int) -> None:
        rows.append(Collective(st, kind, what, count, nbytes))

    params = [p for p in manifest(s) if p.kind != "buffer"]
    local = {p.path: p.numel // _shards(place[p.path], mesh) * b for p in params}
    in_loop = {p.path: p.path.startswith("recurrent.") for p in params}
    nd = mesh.get("data", 1)
    fsdp = "fsdp" in strategy and nd > 1
    split = [p.path for p in params if fsdp and "data" in place[p.path]]
    loop_split = [x for x in split if in_loop[x]]
    rest_split = [x for x in split if not in_loop[x]]

    # forward, per loop step
    if loop_split:
        add("fsdp", "all-gather", f"forward: the loop block's {len(loop_split)} data-split parameters", 1,
            sum((nd - 1) * local[x] for x in loop_split))
    nm = mesh.get("model", 1)
    if "tp" in strategy and nm > 1:
        add("tp", "all-reduce", f"forward: attention and FFN outputs, 2 x (B_l={B}, T={T}, D={s.dim})", 2,
            2 * _all_reduce(A, nm))
    ne = mesh.get("expert", 1)
    moe = s.recurrent.ffn == "moe"
    if "ep" in strategy and ne > 1:
        k = s.moe.top_k
        cap = math.ceil(capacity_factor * B * T * k / ne)  # rows each device sends to each expert shard
        buf = ne * cap * s.dim * b
        for step in ("dispatch", "combine"):
            add("ep", "all-to-all", f"forward: {step}, {ne} x {cap} rows of D={s.dim} (capacity factor "
                f"{capacity_factor:g})", 1, _all_to_all(buf, ne))
    if g > 1:
        add(_label(strategy, bx), "all-reduce", "forward: ACT early exit, one flag: any position still running",
            1, _all_reduce(FLAG_BYTES, g))

    # backward, per loop step
    if loop_split:
        add("fsdp", "all-gather", f"backward: the loop block's {len(loop_split)} data-split parameters again", 1,
            sum((nd - 1) * local[x] for x in loop_split))
        add("fsdp", "reduce-scatter", f"backward: gradients of the loop block's {len(loop_split)} data-split "
            "parameters", 1, sum((nd - 1) * local[x] for x in loop_split))
    if "tp" in strategy and nm > 1:
        add("tp", "all-reduce", "backward: input gradients of the column-parallel projections, 2 x (B_l, T, D)",
            2, 2 * _all_reduce(A, nm))
    if "ep" in strategy and ne > 1:
        for step in ("dispatch", "combine"):
            add("ep", "all-to-all", f"backward: the gradient of the {step}", 1, _all_to_all(buf, ne))

    # once per training step
    if rest_split:
        add("fsdp", "all-gather", f"training step: the {len(rest_split)} data-split parameters outside the loop, "
            "forward and backward", 2, 2 * sum((nd - 1) * local[x] for x in rest_split))
        add("fsdp", "reduce-scatter", f"training step: gradients of the {len(rest_split)} data-split parameters "
            "outside the loop", 1, sum((nd - 1) * local[x] for x in rest_split))
    if "tp" in strategy and nm > 1 and s.prelude_layers + s.coda_layers:
        blocks = s.prelude_layers + s.coda_layers
        add("tp", "all-reduce", f"training step: {blocks} prelude and coda blocks, 2 forward + 2 backward each",
            4 * blocks, 4 * blocks * _all_reduce(A, nm))
    groups: dict[tuple[str, ...], list[str]] = {}
    for p in params:  # gradient sync: over the batch axes the tensor is not split on (data: fsdp scattered it)
        axes = tuple(a for a in bx if a not in place[p.path])
        if axes:
            groups.setdefault(axes, []).append(p.path)
    for axes, paths in groups.items():
        n = math.prod(mesh[a] for a in axes)
        add(_label(strategy, axes), "all-reduce", f"training step: gradients of {len(paths)} tensors over "
            f"{' x '.join(axes)} ({n} devices)", 1, _all_reduce(sum(local[x] for x in paths), n))
    if moe and g > 1:
        add(_label(strategy, bx), "all-reduce", f"training step: expert load ({s.moe.n_experts},) int32 for the "
            "router bias", 1, _all_reduce(s.moe.n_experts * LOAD_BYTES, g))
    return rows
