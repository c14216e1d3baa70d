"""matplotlib, imported on first use (Agg backend), and atomic PNG writes.

Importing this module is cheap: ``ek --help`` and ``ek submit`` never load matplotlib.
"""

from __future__ import annotations

from pathlib import Path

from .files import atomic_path


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG atomically and close it; returns ``path``."""
    plt = pyplot()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
