"""Similarity kernels for the submodular objectives, without materialising n² when they need not.

Orientation (submodlib): ``K[i, j]`` — row i is a represented item, column j a candidate.

- :class:`DenseKernel` — an explicit (n_rows × n_cols) matrix (small pools, DELIFT utilities).
- :class:`EmbeddingKernel` — computes columns on demand from embeddings: ``cosine`` (raw cosine in
  [−1, 1] on unit vectors), ``dot``, or ``euclidean`` = ``exp(−‖x − y‖ / d)`` (submodlib's γ = 1/dim).
  One column is one GEMV, O(n·d); nothing n² is held.
- :class:`SparseKernel` — a kNN similarity graph (:mod:`curate.select.submodular.knn`: each row keeps
  itself and its top ``k`` neighbours by inner product, exact or approximate FAISS search), held by
  row and by column; for pools above ``knn_threshold`` rows. An approximation, recorded.
"""

from __future__ import annotations

import numpy as np

from curate.arrays import concat_ranges


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
    """A kNN graph as a kernel: ``K_ij`` = e_i·e_j where row i lists j among its neighbours (or j = i),
    0 elsewhere. Held twice — by row (``K_i·``: whose candidates does row i's cover touch) and by
    column (``K_·j``: which rows candidate j covers) — as scipy CSR/CSC (int32 indices, float32 values).

    ``SparseKernel(E, k)`` builds an exact graph (FAISS ``IndexFlatIP``); ``SparseKernel.from_graph``
    takes a :class:`~curate.select.submodular.knn.KnnGraph` built with any index."""

    incremental = True  # objectives over it may update only the gains of touched candidates

    def __init__(self, E: np.ndarray | None = None, k: int = 64, graph=None):
        if graph is None:
            from curate.select.submodular.knn import build_knn_graph

            graph = build_knn_graph(E, k, index="exact", recall_sample=0)
        self.graph = graph
        self.k = graph.k
        self.n_rows = self.n = graph.n
        self.csr = graph.csr()
        self.csc = self.csr.tocsc()
        self.csc.sort_indices()

    @classmethod
    def from_graph(cls, graph) -> SparseKernel:
        return cls(graph=graph)

    def column(self, j: int):
        a, b = self.csc.indptr[j], self.csc.indptr[j + 1]
        return self.csc.indices[a:b], self.csc.data[a:b]

    def row(self, i: int):
        a, b = self.csr.indptr[i], self.csr.indptr[i + 1]
        return self.csr.indices[a:b], self.csr.data[a:b]

    def gather(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored entries of columns ``cols``, concatenated: (segment = position in cols, row, value)."""
        cols = np.asarray(cols, dtype=np.int64)
        starts = self.csc.indptr[cols]
        lens = self.csc.indptr[cols + 1] - starts
        seg = np.repeat(np.arange(len(cols)), lens)
        pos = concat_ranges(starts, lens)
        return seg, self.csc.indices[pos], self.csc.data[pos]

    def neighbours_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Sorted unique columns stored in any of ``rows`` (the candidates whose gain those rows feed)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.csr.indptr[rows]
        lens = self.csr.indptr[rows + 1] - starts
        pos = concat_ranges(starts, lens)
        return np.unique(self.csr.indices[pos])

    def block(self, cols: np.ndarray) -> np.ndarray:
        """Dense (n × len(cols)) columns — for small pools and tests; the objectives gather instead."""
        return self.csc[:, cols].toarray()

    def diag(self) -> np.ndarray:
        return np.asarray(self.csc.diagonal(), dtype=np.float64)

    def col_sums(self) -> np.ndarray:
        return np.asarray(self.csc.sum(axis=0, dtype=np.float64)).ravel()

    @property
    def nonnegative(self) -> bool:
        """Every kept entry ≥ 0 (missing entries are 0)."""
        return bool((self.csc.data >= 0).all())
