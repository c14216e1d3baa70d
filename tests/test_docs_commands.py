"""The docs' command blocks run as written, on synthetic data, in a temporary folder.

A block is tested when the line before its opening fence is ``<!-- docs-test -->``, or
``<!-- docs-test: after `CMD` -->`` to run ``CMD`` first (the data the block's prose says to
make). Every ``ek ...`` line of the block runs in order, trailing ``# comments`` removed;
``configs/`` is the repository's. One thing is not as written: ``ek cv`` gets
``--epochs 1`` appended (:func:`cheaper`), so a block trains one epoch per fold instead of
the configs' 15; everything else (folds, configs, data, every later command) is the docs'.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CV_EPOCHS = ["--epochs", "1"]  # what `ek cv` lines get appended (--epochs overrides the config)
MARKER = re.compile(r"<!-- docs-test(?:: after `([^`]+)`)? -->\n```[a-z]*\n(.*?)```", re.S)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def command_blocks() -> list[tuple[str, list[str]]]:
    """``(where, commands)`` of every marked block: setup first, then the ``ek`` lines."""
    blocks = []
    for path in DOCS:
        for number, match in enumerate(MARKER.finditer(path.read_text())):
            lines = [line.split("#")[0].strip() for line in match.group(2).splitlines()]
            commands = [line for line in lines if line.startswith("ek ")]
            setup = [match.group(1)] if match.group(1) else []
            blocks.append((f"{path.relative_to(REPO)}#{number}", setup + commands))
    return blocks


def cheaper(words: list[str]) -> list[str]:
    """The words of a docs command as the test runs it: ``ek cv`` trains one epoch a fold."""
    return [*words, *CV_EPOCHS] if words[:2] == ["ek", "cv"] else words


def test_only_ek_cv_is_made_cheaper():
    cv = shlex.split("ek cv --data data --folds 5 configs/tiny.yaml")
    assert cheaper(cv) == [*cv, "--epochs", "1"]
    for command in ("ek blend --oof", "ek submit --data data", "ek synth --out data --size 64"):
        assert cheaper(shlex.split(command)) == shlex.split(command)


def test_marked_blocks_are_found():
    where = [w for w, _ in command_blocks()]
    assert "README.md#0" in where and "docs/getting-started.md#0" in where


@pytest.mark.slow
@pytest.mark.parametrize(("where", "commands"), command_blocks())
def test_docs_block_runs_as_written(tmp_path, where, commands):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    ek = Path(sys.executable).with_name("ek")
    for command in commands:
        words = cheaper(shlex.split(command))
        done = subprocess.run(
            [str(ek), *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=1500
        )
        assert done.returncode == 0, f"{where}: `{command}` failed:\n{done.stderr[-2000:]}"
