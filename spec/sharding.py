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
and None (a tensor too small to split).
"""

from __future__ import annotations

import math
import re

from .manifest import manifest
from .schema import Spec, SpecError

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
            axes = ("expert",)
        elif path.endswith("ffn.router.weight"):
            axes = ("expert", "embed")
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
