"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def spearman(a, b) -> float:
    """Rank correlation (no tie correction; the benchmarks compare continuous scores)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def write_result(name: str, text: str) -> Path:
    """Print a results table and keep it in bench/results/<name>.md (copied into docs/benchmarks.md)."""
    print(text)
    out = ROOT / "bench" / "results" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    return out
