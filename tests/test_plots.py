"""What the report's pictures show: the gallery's predicted outline."""

from __future__ import annotations

import numpy as np

from ensemble_kit.blend.gallery import Panel, draw_panel


def _panel(predicted: np.ndarray) -> Panel:
    side = predicted.shape[0]
    grid = np.linspace(0, 1, side * side, dtype=np.float32).reshape(side, side)
    image = np.zeros((side, side, 3), np.float32)
    label = np.zeros((side, side), np.uint8)
    return Panel("1", "oof", 0, image, label, grid, predicted, denominator=1, kind="worst 1")


def _cyan(pixels: np.ndarray) -> int:
    r, g, b = (pixels[..., k].astype(int) for k in range(3))
    return int(np.count_nonzero((r < 90) & (g > 190) & (b > 190)))


def test_probability_panel_outlines_the_predicted_mask():
    predicted = np.zeros((32, 32), bool)
    predicted[8:24, 8:24] = True
    outlined, _ = draw_panel(_panel(predicted))
    plain, _ = draw_panel(_panel(np.zeros((32, 32), bool)))
    assert _cyan(outlined) > 20 and _cyan(plain) == 0
