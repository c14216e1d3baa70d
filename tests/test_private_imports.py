"""A leading underscore means private: no module of ours uses another module's ``_name``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ensemble_kit"
# blend/run.py is being rewritten around the typed blend rule (issue 17), which drops this
KNOWN: set[tuple[str, str]] = set()  # no exceptions


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_of(module: str, node: ast.ImportFrom) -> str:
    """The dotted name ``node`` imports from, as seen from the module named ``module``."""
    if not node.level:
        return node.module or ""
    package = module.split(".")[: -node.level]
    return ".".join([*package, *([node.module] if node.module else [])])


def private_uses(source: str, module: str) -> set[str]:
    """``module._name`` for every private name of another of our modules that ``source`` (the
    text of the module named ``module``) uses."""
    tree, found, aliases = ast.parse(source), set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and module_of(module, node).startswith("ensemble_kit"):
            origin = module_of(module, node).rpartition(".")[2]
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.add(f"{origin}.{alias.name}")
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ensemble_kit"):
                    aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.add(f"{aliases[node.value.id].rpartition('.')[2]}.{node.attr}")
    return found


def test_the_check_sees_private_names_however_imported():
    source = (
        "from .kernels import _scan, weighted_sum\n"
        "from ..postprocess import find_root\n"
        "from ensemble_kit.metrics import __all__, _as_3d\n"
        "from ensemble_kit import files\n"
        "import ensemble_kit.layout as layout\n"
        "files._tmp_name(layout._root, find_root, weighted_sum._private, self._own)\n"
    )
    assert private_uses(source, "ensemble_kit.blend.candidates") == {
        "kernels._scan",
        "metrics._as_3d",
        "files._tmp_name",
        "layout._root",
        "weighted_sum._private",
    }


def test_no_module_uses_another_modules_private_names():
    found = {
        (str(path.relative_to(PACKAGE)), name)
        for path in PACKAGE.rglob("*.py")
        for name in private_uses(path.read_text(), module_name(path))
    }
    assert found <= KNOWN, sorted(found - KNOWN)
