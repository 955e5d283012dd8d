"""The twins mirror each other (STYLE 1, 7, 17): same exports in the same order, same files, same
public classes per file in the same order, and the same members (fields, methods, signatures) in each
shared class, so `diff mythos_torch/x.py mythos_jax/x.py` shows only framework differences. Read with
`ast`: nothing here runs model code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mythos_jax
import mythos_torch

ROOT = Path(__file__).resolve().parents[1]
TWINS = {"torch": ROOT / "mythos_torch", "jax": ROOT / "mythos_jax"}

# Classes that exist only because of one framework, each with the reason. Keep this list short: an
# entry must name a class that exists (checked below), and the twin must have no counterpart.
FRAMEWORK_ONLY: dict[tuple[str, str, str], str] = {
    # nnx has no buffers: a non-trainable Variable subclass keeps the router bias out of nnx.Param
    # (torch: register_buffer, no class needed)
    ("jax", "moe.py", "RouterBias"): "nnx.Variable type of the router-bias buffer",
}


def py_files(pkg: Path) -> list[str]:
    return sorted(p.name for p in pkg.glob("*.py"))


def public_classes(path: Path) -> list[str]:
    """Module-level classes not starting with '_', in file order."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n.name for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")]


def top_level_names(path: Path) -> list[str]:
    """Module-level class and function names, in file order."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]


# The public API of both twins, in order (docs/design.md's file table)
PUBLIC = [
    "rms_norm", "RMSNorm", "apply_rope", "SwiGLU",  # layers.py
    "causal_attention", "GQAttention", "MLAttention",  # attention.py
    "KVCache",  # cache.py
    "Experts",  # experts.py
    "route", "MoE", "expert_load", "update_router_bias",  # moe.py
    "CrossLoopAttention", "ContextCompressor", "MemoryGate",  # components.py
    "Block",  # block.py
    "add_loop_embedding", "LoRA", "LTIInjection", "HaltMLP", "ACT", "act_step", "RecurrentBlock",  # recurrent.py
    "Traces", "ModelOutput", "Mythos", "build", "forward",  # model.py
    "sample_next",  # generate.py
    "load_arrays", "dump_arrays",  # weights.py
    "cross_entropy", "ponder_cost", "halting_entropy", "consistency", "total_loss",  # losses.py
    "StepResult", "Trainer", "train_step", "optimizer_arrays", "load_optimizer_arrays",  # train.py
    "set_parity_precision",  # precision.py
    "make_mesh", "shard", "shard_batch", "Sharding",  # sharding.py (expert_parallel.py: behind shard)
    "PagedPool", "PagedView", "paged_forward", "check_tables", "build_block_tables",  # paged.py
]


def test_same_exports_in_the_same_order():
    assert mythos_torch.__all__ == mythos_jax.__all__ == PUBLIC
    assert len(set(mythos_torch.__all__)) == len(mythos_torch.__all__), "duplicate names in __all__"
    for pkg in (mythos_torch, mythos_jax):
        missing = [n for n in pkg.__all__ if not hasattr(pkg, n)]
        assert not missing, f"{pkg.__name__}.__all__ names what it does not define: {missing}"


def test_same_file_names():
    assert py_files(TWINS["torch"]) == py_files(TWINS["jax"])


@pytest.mark.parametrize("name", py_files(TWINS["torch"]))
def test_same_public_classes_per_file_in_the_same_order(name):
    got = {}
    for twin, pkg in TWINS.items():
        path = pkg / name
        classes = public_classes(path) if path.exists() else []
        got[twin] = [c for c in classes if (twin, name, c) not in FRAMEWORK_ONLY]
    assert got["torch"] == got["jax"], f"{name}: torch {got['torch']} vs jax {got['jax']}"


def test_framework_only_entries_exist():
    for (twin, name, cls), why in FRAMEWORK_ONLY.items():
        assert cls in public_classes(TWINS[twin] / name), f"stale FRAMEWORK_ONLY entry {twin}/{name}:{cls} ({why})"


def test_every_export_lives_in_the_same_file_in_both_twins():
    """route is in moe.py in both, build in model.py in both, ...; and in the same relative order."""
    where: dict[str, dict[str, str]] = {}
    order: dict[str, dict[str, list[str]]] = {}
    for twin, pkg in TWINS.items():
        where[twin], order[twin] = {}, {}
        for path in sorted(pkg.glob("*.py")):
            names = top_level_names(path)
            order[twin][path.name] = [n for n in names if n in mythos_torch.__all__]
            for n in names:
                where[twin].setdefault(n, path.name)
    for n in mythos_torch.__all__:
        assert where["torch"].get(n) == where["jax"].get(n), (
            f"{n}: defined in mythos_torch/{where['torch'].get(n)} but mythos_jax/{where['jax'].get(n)}")
    assert order["torch"] == order["jax"]


# --------------------------------------------------------------------------- methods of the shared classes

# Per class both twins define: its fields (NamedTuple / dataclass annotations), its public methods, `__init__`,
# and the call (torch `forward` = jax `__call__`), each with its parameters in order (`*` marks the start of the
# keyword-only ones). The JAX twin's constructors may end with a keyword-only `rngs` (STYLE 6); nothing else may
# differ except what is listed here, each entry with its reason: (twin, file, class, member) -> why. An entry
# must name a member that exists in that twin (checked below).
MEMBER_DIFFERENCES: dict[tuple[str, str, str, str], str] = {
    # the JAX cache is a registered pytree (it rides in jit arguments and scan carries, and is donated);
    # the torch cache is a plain object whose tensors are updated in place
    ("jax", "cache.py", "KVCache", "tree_flatten"): "pytree registration",
    ("jax", "cache.py", "KVCache", "tree_unflatten"): "pytree registration",
    ("jax", "cache.py", "KVCache", "copy"): "a second pytree over the same (immutable) arrays, for reuse after donation",
    # torch.compile of the decode step is a choice in torch; the JAX twin always decodes through jax.jit
    ("torch", "model.py", "Mythos", "generate"): "keyword-only `compile` (torch.compile of the decode step)",
}


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    if a.kwonlyargs:
        names += ([] if a.vararg else ["*"]) + [p.arg for p in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return names


def class_members(path: Path, twin: str) -> dict[str, dict[str, list[str]]]:
    """Public classes of a twin file -> {member: parameters (methods) or ["field"] (annotated fields)}; the
    torch `forward` is named `__call__`, and a JAX constructor's last keyword-only `rngs` is dropped."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: dict[str, dict[str, list[str]]] = {}
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef) or cls.name.startswith("_"):
            continue
        members: dict[str, list[str]] = {}
        for n in cls.body:
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.startswith("_"):
                members[n.target.id] = ["field"]
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not n.name.startswith("_") or n.name in ("__init__", "__call__")):
                params = _parameters(n)
                if twin == "jax" and n.name == "__init__" and params[-1:] == ["rngs"] and "*" in params:
                    params = params[:-1]
                    if params[-1] == "*":
                        params = params[:-1]
                members["__call__" if twin == "torch" and n.name == "forward" else n.name] = params
        out[cls.name] = members
    return out


def _members_of_all_files() -> dict[str, dict[str, dict[str, dict[str, list[str]]]]]:
    return {twin: {p.name: class_members(p, twin) for p in sorted(pkg.glob("*.py"))} for twin, pkg in TWINS.items()}


@pytest.mark.parametrize("name", py_files(TWINS["torch"]))
def test_shared_classes_have_the_same_members_and_signatures(name):
    got = {twin: class_members(TWINS[twin] / name, twin) if (TWINS[twin] / name).exists() else {}
           for twin in TWINS}
    problems = []
    for cls in [c for c in got["torch"] if c in got["jax"]]:
        t, j = got["torch"][cls], got["jax"][cls]
        for twin, mine, other in (("torch", t, j), ("jax", j, t)):
            for member in mine:
                if member not in other and (twin, name, cls, member) not in MEMBER_DIFFERENCES:
                    problems.append(f"{cls}.{member} only in the {twin} twin")
        for member in [m for m in t if m in j]:
            allowed = any((tw, name, cls, member) in MEMBER_DIFFERENCES for tw in TWINS)
            if t[member] != j[member] and not allowed:
                problems.append(f"{cls}.{member}: torch ({', '.join(t[member])}) vs jax ({', '.join(j[member])})")
        order_t = [m for m in t if m in j]
        order_j = [m for m in j if m in t]
        if order_t != order_j:
            problems.append(f"{cls}: members in another order: torch {order_t} vs jax {order_j}")
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_member_differences_entries_exist():
    members = _members_of_all_files()
    for (twin, name, cls, member), why in MEMBER_DIFFERENCES.items():
        assert member in members[twin].get(name, {}).get(cls, {}), (
            f"stale MEMBER_DIFFERENCES entry {twin}/{name}:{cls}.{member} ({why})")
