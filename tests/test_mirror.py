"""The twins mirror each other (STYLE 1, 7, 17): same exports in the same order, same files, same
public classes per file in the same order, so `diff mythos_torch/x.py mythos_jax/x.py` shows only
framework differences. Read with `ast`: nothing here runs model code."""

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
    "rms_norm", "RMSNorm", "apply_rope", "SwiGLU",
    "causal_attention", "KVCache", "GQAttention", "MLAttention",
    "route", "Experts", "MoE", "expert_load", "update_router_bias",
    "add_loop_embedding", "LoRA", "LTIInjection", "HaltMLP", "ACT", "act_step", "RecurrentBlock",
    "CrossLoopAttention", "ContextCompressor", "MemoryGate",
    "Block", "Traces", "ModelOutput", "Mythos", "load_arrays", "dump_arrays", "build", "forward",
    "sample_next", "set_parity_precision",
    "cross_entropy", "ponder_cost", "halting_entropy", "consistency", "total_loss",
    "StepResult", "Trainer", "train_step", "optimizer_arrays", "load_optimizer_arrays",
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
