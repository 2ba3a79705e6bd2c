"""The layers import in one direction (docs/architecture.md):

    flows  ->  training  ->  generation.dataset
    flows  ->  generation.config  ->  generation.render  ->  generation.dataset

Read from the source with ``ast`` (function-level imports included; imports under
``if TYPE_CHECKING:`` are annotations only and left out), so a new import that
breaks the direction fails here, whatever the import order at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RENDERER_LIBS = ("bpy", "kubric", "pybullet", "pybullet_data")


def _modules(package: str, root: Path) -> list[Path]:
    return sorted((root / package.replace(".", "/")).rglob("*.py"))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, root: Path) -> set[str]:
    """Every module ``path`` imports at run time (absolute names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and _is_type_checking(node) for n in ast.walk(node)}
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            # ``from generation import render`` imports the subpackage
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _offences(package: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    bad = []
    for path in _modules(package, root):
        for name in sorted(_imports(path, root)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(root).as_posix()} imports {name}")
    return bad


@pytest.mark.parametrize("package, forbidden", [
    # the store is what training reads: no renderer, no stage config, nothing above it
    ("generation.dataset", ("generation.render", "generation.config", "training", "flows")
     + RENDERER_LIBS),
    ("generation.render", ("training", "flows")),
    ("generation", ("training", "flows")),
    # training reads datasets only through the store
    ("training", ("flows", "generation.render", "generation.config") + RENDERER_LIBS),
    # the top layer starts render processes; it never imports the renderer's libraries
    ("flows", RENDERER_LIBS),
])
def test_imports_go_one_way(package, forbidden):
    assert _offences(package, forbidden) == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    # guards the guard: a function-level import is still an import
    (tmp_path / "generation" / "dataset").mkdir(parents=True)
    (tmp_path / "generation" / "dataset" / "probe.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from generation.config import GenerationConfig\n"
        "def f():\n    from ..render import scene\n")
    assert _offences("generation.dataset", ("generation.render", "generation.config"),
                     root=tmp_path) == [
        "generation/dataset/probe.py imports generation.render",
        "generation/dataset/probe.py imports generation.render.scene"]
