"""Similarity kernels for the submodular objectives, without materialising n² when they need not.

Orientation (submodlib): ``K[i, j]`` — row i is a represented item, column j a candidate.

- :class:`DenseKernel` — an explicit (n_rows × n_cols) matrix (small pools, DELIFT utilities).
- :class:`EmbeddingKernel` — computes columns on demand from embeddings: ``cosine`` (raw cosine in
  [−1, 1] on unit vectors), ``dot``, or ``euclidean`` = ``exp(−‖x − y‖ / d)`` (submodlib's γ = 1/dim).
  One column is one GEMV, O(n·d); nothing n² is held.
- :class:`SparseKernel` — each row keeps its top ``k`` neighbours (exact inner-product search with
  FAISS), stored by column; for pools above ``dense_limit`` rows. An approximation, recorded.
"""

from __future__ import annotations

import numpy as np


class DenseKernel:
    def __init__(self, K: np.ndarray):
        self.K = np.asarray(K, dtype=np.float32)
        self.n_rows, self.n = self.K.shape

    def column(self, j: int) -> tuple[np.ndarray | None, np.ndarray]:
        """(row indices or None = all rows, values) of column j."""
        return None, self.K[:, j]

    def block(self, cols: np.ndarray) -> np.ndarray:
        return self.K[:, cols]

    def diag(self) -> np.ndarray:
        return np.diagonal(self.K).astype(np.float64)

    def col_sums(self) -> np.ndarray:
        return self.K.sum(axis=0, dtype=np.float64)

    @property
    def nonnegative(self) -> bool:
        """Every entry ≥ 0 (checked)."""
        return bool((self.K >= 0).all())


class EmbeddingKernel:
    """Square kernel over unit-vector embeddings E (n × d), columns computed on the fly."""

    def __init__(self, E: np.ndarray, metric: str = "cosine", rows: np.ndarray | None = None):
        self.E = np.ascontiguousarray(E, dtype=np.float32)
        self.R = self.E if rows is None else np.ascontiguousarray(rows, dtype=np.float32)  # represented rows
        self.metric = metric
        self.n_rows, self.n = len(self.R), len(self.E)
        if metric == "euclidean":
            self._rsq = np.einsum("ij,ij->i", self.R, self.R)
            self._esq = np.einsum("ij,ij->i", self.E, self.E)

    def _transform(self, dots: np.ndarray, cols: np.ndarray) -> np.ndarray:
        if self.metric in ("cosine", "dot"):
            return dots
        d2 = np.maximum(self._rsq[:, None] + self._esq[cols][None, :] - 2 * dots, 0.0)
        return np.exp(-np.sqrt(d2) / self.E.shape[1])

    def block(self, cols: np.ndarray) -> np.ndarray:
        cols = np.asarray(cols)
        return self._transform(self.R @ self.E[cols].T, cols).astype(np.float32, copy=False)

    def column(self, j: int):
        return None, self.block(np.array([j]))[:, 0]

    def diag(self) -> np.ndarray:
        if self.R is not self.E:
            raise ValueError("the diagonal needs a square kernel")
        if self.metric in ("euclidean", "cosine"):  # exp(−0) and cos(x, x): exactly 1, not 1 ± float32 rounding
            return np.ones(self.n)
        return np.einsum("ij,ij->i", self.E, self.E).astype(np.float64)

    def col_sums(self) -> np.ndarray:
        if self.metric in ("cosine", "dot"):
            return (self.E @ self.R.sum(axis=0, dtype=np.float64).astype(np.float32)).astype(np.float64)
        return np.concatenate([self.block(np.arange(s, min(s + 1024, self.n))).sum(0, dtype=np.float64)
                               for s in range(0, self.n, 1024)])

    @property
    def nonnegative(self) -> bool:
        """Every entry ≥ 0, known without the n² matrix: ``euclidean`` always; ``cosine`` / ``dot`` when
        no embedding has a negative coordinate (sufficient, not necessary — False may be pessimistic)."""
        return self.metric == "euclidean" or bool((self.E >= 0).all() and (self.R >= 0).all())


class SparseKernel:
    """Top-k neighbours per row (cosine on unit vectors), kept by column; missing entries are 0."""

    def __init__(self, E: np.ndarray, k: int = 64):
        import faiss
        import scipy.sparse as sp

        E = np.ascontiguousarray(E, dtype=np.float32)
        self.n_rows = self.n = len(E)
        index = faiss.IndexFlatIP(E.shape[1])
        index.add(E)
        sims, idx = index.search(E, min(k, len(E)))
        rows = np.repeat(np.arange(len(E)), idx.shape[1])
        self.csc = sp.csc_matrix((sims.reshape(-1), (rows, idx.reshape(-1))), shape=(len(E), len(E)), dtype=np.float32)
        self.k = k

    def column(self, j: int):
        a, b = self.csc.indptr[j], self.csc.indptr[j + 1]
        return self.csc.indices[a:b], self.csc.data[a:b]

    def block(self, cols: np.ndarray) -> np.ndarray:
        return self.csc[:, cols].toarray()

    def diag(self) -> np.ndarray:
        return np.asarray(self.csc.diagonal(), dtype=np.float64)

    def col_sums(self) -> np.ndarray:
        return np.asarray(self.csc.sum(axis=0), dtype=np.float64).ravel()

    @property
    def nonnegative(self) -> bool:
        """Every kept entry ≥ 0 (missing entries are 0)."""
        return bool((self.csc.data >= 0).all())
