"""The import graph: every module imports on its own, and dependencies run one way.

Stages, bottom to top: the core modules, ``data``, ``blend``, ``inference``, ``training``,
then ``cli.py`` and the public ``api.py``. A module may import its own stage or those
below it, never above, and the graph (imports inside functions included) has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ensemble_kit"
STAGES = ("data", "blend", "inference", "training")
TOP = ("cli", "api")
REMOVED_SHIMS = ("rle", "submission", "synth", "predict", "cv", "train")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself (__init__: the version)
    if parts[1] in STAGES:
        return 1 + STAGES.index(parts[1])
    if parts[1] in TOP:
        return len(STAGES) + 1
    return 0


def imports_of(module: str) -> set[str]:
    """Every ensemble_kit module that ``module`` imports, anywhere in its body."""
    path = PACKAGE.parent / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_the_graph_sees_the_stages():
    assert "ensemble_kit.blend.rule" in MODULES and "ensemble_kit.training.cv" in MODULES
    assert "ensemble_kit.inference.tta" in GRAPH["ensemble_kit.training.cv"]


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_a_stage_above_it(module):
    upward = sorted(t for t in GRAPH[module] if rank(t) > rank(module))
    assert not upward, f"{module} imports {upward} from a stage above it"


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [node, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    # As pip-tools' test_circular_imports: each module first, with no other of ours loaded
    # (third-party modules stay cached, so one interpreter serves them all).
    script = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    ours = [m for m in sys.modules if m.split('.')[0] == 'ensemble_kit']\n"
        "    for loaded in ours:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        print(f'{name}: {type(err).__name__}: {err}')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "", result.stdout


def test_ek_help_does_not_import_torch():
    script = "import sys; from ensemble_kit import cli; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", script], check=True)


def test_submit_imports_no_search_code():
    script = (
        "import sys, ensemble_kit.inference.submit\n"
        "bad = [m for m in sys.modules if m.startswith('ensemble_kit.blend.') and "
        "m.rsplit('.', 1)[1] in ('ensemble_search', 'selection', 'scorer', 'candidates', 'run')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.parametrize("old", REMOVED_SHIMS)
def test_the_shim_modules_are_gone(old):
    assert f"ensemble_kit.{old}" not in MODULES


def documented_api() -> list[str]:
    """The names the Python API section of docs/reference/formats.md lists (table rows)."""
    text = (PACKAGE.parent / "docs" / "reference" / "formats.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [name.split("(")[0] for cell in cells for name in cell.split("`")[1::2]]


def test_api_all_is_the_documented_list():
    from ensemble_kit import api

    assert sorted(api.__all__) == sorted(documented_api())
    for name in api.__all__:
        assert callable(getattr(api, name)), name
    required = {
        "rle_encode", "rle_decode", "global_dice", "write_submission", "check_submission",
        "predict_probs", "BlendRule", "run_blend", "verify_blend", "ash_false_color",
        "build_input", "load_codes",
    }  # fmt: skip
    assert required <= set(api.__all__)
