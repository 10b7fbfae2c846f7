"""Facility location and its two relatives that differ only in the cover (methods.md B3).

``f(A) = Σ_i max(0, max_{j∈A} K_ij)`` — the running cover ``c_i`` starts at 0, so negative
similarities never count; the gain of j is ``Σ_i max(0, K_ij − c_i)``.

- FLMI (submodlib variant 1, query set Q, η): ``Σ_i min(max_{j∈A} K_ij, η·max_q K^Q_iq)`` — the same
  engine with a per-row cap: gain ``Σ_i max(0, min(K_ij, cap_i) − c_i)``.
- FLCG (private set P, ν): ``Σ_i max(max_{j∈A} K_ij − ν·max_p K^P_ip, 0)`` — the same engine with the
  cover starting at the penalty ``ν·max_p K^P_ip`` (minus that constant).
"""

from __future__ import annotations

import numpy as np


class FacilityLocation:
    name = "facility_location"
    submodular = True

    def __init__(self, kernel, cap: np.ndarray | None = None, initial: np.ndarray | None = None):
        self.kernel = kernel
        self.n = kernel.n
        self.cap = None if cap is None else np.asarray(cap, dtype=np.float32)
        start = np.zeros(kernel.n_rows, dtype=np.float32) if initial is None else np.asarray(initial, dtype=np.float32)
        self.base = start.astype(np.float64).sum()
        self.cover = start.copy()

    def _capped(self, values: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        if self.cap is None:
            return values
        cap = self.cap if rows is None else self.cap[rows]
        return np.minimum(values, cap if values.ndim == 1 else cap[:, None])

    def gain(self, j: int) -> float:
        rows, col = self.kernel.column(j)
        cover = self.cover if rows is None else self.cover[rows]
        return float(np.maximum(self._capped(col, rows) - cover, 0).sum(dtype=np.float64))

    def gains(self, cols: np.ndarray, block: int = 1024) -> np.ndarray:
        out = np.empty(len(cols), dtype=np.float64)
        for s in range(0, len(cols), block):
            B = self._capped(self.kernel.block(cols[s : s + block]), None)
            out[s : s + block] = np.maximum(B - self.cover[:, None], 0).sum(axis=0, dtype=np.float64)
        return out

    def add(self, j: int) -> None:
        rows, col = self.kernel.column(j)
        col = self._capped(col, rows)
        if rows is None:
            np.maximum(self.cover, col, out=self.cover)
        else:
            self.cover[rows] = np.maximum(self.cover[rows], col)

    def value(self) -> float:
        return float(self.cover.sum(dtype=np.float64) - self.base)
