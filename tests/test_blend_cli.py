"""`ek blend` refuses bad options in one line, before reading anything."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from ensemble_kit.cli import main


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_below_one_is_a_one_line_error(tmp_path, steps):
    result = CliRunner().invoke(
        main, ["blend", "--oof", "--workdir", str(tmp_path), "--steps", steps]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [f"ek: error: --steps {steps}: the greedy selection needs at least 1 round"]
