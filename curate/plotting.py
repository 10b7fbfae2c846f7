"""Matplotlib for every plot curate draws (the report's, training's loss curves, compare's table plot):
the Agg backend (no display needed) and byte-stable PNG files."""

from __future__ import annotations

from pathlib import Path

from curate.io import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (110 dpi; no software version in the metadata, so the bytes do not
    change with matplotlib's version) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    return path
