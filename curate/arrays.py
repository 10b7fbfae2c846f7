"""Small numpy helpers shared by vectorised code (scorers, kernels, kNN graphs)."""

from __future__ import annotations

import numpy as np


def concat_ranges(starts: np.ndarray | int, lens: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + l) for s, l in zip(starts, lens)])`` without a Python loop (int64).
    With ``starts=0``: each element's offset inside its own range."""
    lens = np.asarray(lens, dtype=np.int64)
    ends = np.cumsum(lens)
    return np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(ends - lens - np.asarray(starts, dtype=np.int64), lens)
