"""Facility location and its two relatives that differ only in the cover (methods.md B3).

``f(A) = Σ_i max(0, max_{j∈A} K_ij)`` — the running cover ``c_i`` starts at 0, so negative
similarities never count; the gain of j is ``Σ_i max(0, K_ij − c_i)``.

- FLMI (submodlib variant 1, query set Q, η): ``Σ_i min(max_{j∈A} K_ij, η·max_q K^Q_iq)`` — the same
  engine with a per-row cap: gain ``Σ_i max(0, min(K_ij, cap_i) − c_i)``.
- FLCG (private set P, ν): ``Σ_i max(max_{j∈A} K_ij − ν·max_p K^P_ip, 0)`` — the same engine with the
  cover starting at the penalty ``ν·max_p K^P_ip`` (minus that constant).

Over a sparse kNN kernel (``kernel.incremental``) a block of gains gathers only the stored entries of
its columns, and ``add(j)`` records in ``changed`` the candidates whose gain it altered — those stored
in a row whose cover rose — so an optimizer can recompute just those.
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
        self.incremental = bool(getattr(kernel, "incremental", False))
        self.changed = np.empty(0, dtype=np.int64)  # after add(j) on an incremental kernel: candidates whose gain changed

    def _capped(self, values: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        if self.cap is None:
            return values
        cap = self.cap if rows is None else self.cap[rows]
        return np.minimum(values, cap if values.ndim == 1 else cap[:, None])

    def gain(self, j: int) -> float:
        if self.incremental:
            return float(self._sparse_gains(np.array([j]))[0])
        rows, col = self.kernel.column(j)
        cover = self.cover if rows is None else self.cover[rows]
        return float(np.maximum(self._capped(col, rows) - cover, 0).sum(dtype=np.float64))

    def gains(self, cols: np.ndarray, block: int = 1024) -> np.ndarray:
        if self.incremental:
            return self._sparse_gains(np.asarray(cols))
        out = np.empty(len(cols), dtype=np.float64)
        for s in range(0, len(cols), block):
            B = self._capped(self.kernel.block(cols[s : s + block]), None)
            out[s : s + block] = np.maximum(B - self.cover[:, None], 0).sum(axis=0, dtype=np.float64)
        return out

    def _sparse_gains(self, cols: np.ndarray, entries: int = 1 << 22) -> np.ndarray:
        """Gains from the stored entries of each column, in chunks of about ``entries`` entries."""
        out = np.empty(len(cols), dtype=np.float64)
        per = max(1, entries // max(1, self.kernel.csc.nnz // max(1, self.n)))
        for s in range(0, len(cols), per):
            seg, rows, vals = self.kernel.gather(cols[s : s + per])
            contrib = np.maximum(self._capped(vals, rows) - self.cover[rows], 0)
            out[s : s + per] = np.bincount(seg, weights=contrib, minlength=len(cols[s : s + per]))
        return out

    def add(self, j: int) -> None:
        rows, col = self.kernel.column(j)
        col = self._capped(col, rows)
        if self.incremental:
            rose = col > self.cover[rows]
            self.cover[rows[rose]] = col[rose]
            self.changed = self.kernel.neighbours_of_rows(rows[rose])
            return
        if rows is None:
            np.maximum(self.cover, col, out=self.cover)
        else:
            self.cover[rows] = np.maximum(self.cover[rows], col)

    def value(self) -> float:
        return float(self.cover.sum(dtype=np.float64) - self.base)
