"""Layers go one way (STYLE 4a): spec <- twins <- weights_bridge <- parity <- mythos.

Every import in every module of the six packages is read with `ast` (imports inside functions
included: a lazy import is still a dependency) and checked against that order. A twin never imports
the other twin, never hides an import behind `TYPE_CHECKING`, and spec imports no framework.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"spec": 0, "mythos_torch": 1, "mythos_jax": 1, "weights_bridge": 2, "parity": 3, "mythos": 4}
TWINS = ("mythos_torch", "mythos_jax")
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "optax")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file; relative imports stay in the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def type_checking_imports(path: Path) -> list[int]:
    """Lines of imports under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines += [n.lineno for body in node.body for n in ast.walk(body) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return lines


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_package_is_found():
    for package in LAYERS:
        assert (ROOT / package / "__init__.py").is_file(), package


@pytest.mark.parametrize("package", list(LAYERS))
def test_imports_go_down_the_layers(package):
    order = " <- ".join(dict.fromkeys(f"{p}({n})" for p, n in sorted(LAYERS.items(), key=lambda kv: kv[1])))
    bad = []
    for path in modules(package):
        for line, name in imports(path):
            if name not in LAYERS or name == package:
                continue
            if LAYERS[name] > LAYERS[package]:
                bad.append(f"{relative(path)}:{line} imports {name} (layer {LAYERS[name]}) from layer {LAYERS[package]}")
            elif package in TWINS and name in TWINS:
                bad.append(f"{relative(path)}:{line} imports the other twin {name}")
    assert not bad, f"imports against the layer order {order}:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", TWINS)
def test_twins_have_no_type_checking_imports(package):
    bad = [f"{relative(path)}:{line}" for path in modules(package) for line in type_checking_imports(path)]
    assert not bad, f"imports under TYPE_CHECKING in {package} (a twin names its own types):\n" + "\n".join(bad)


def test_spec_imports_no_framework():
    bad = [f"{relative(path)}:{line} imports {name}" for path in modules("spec") for line, name in imports(path)
           if name in FRAMEWORKS]
    assert not bad, "spec is framework-free:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_should(tmp_path):
    """The readers above see lazy imports, `from x.y import z`, and guarded imports."""
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mythos_jax\n"
                 "def g():\n    from parity.compare import compare\n    import torch.nn as nn\nfrom . import x\n")
    assert imports(f) == [(1, "typing"), (3, "mythos_jax"), (5, "parity"), (6, "torch")]
    assert type_checking_imports(f) == [3]
