"""Graph cut (λ): ``f(A) = Σ_{j∈A} Σ_{i∈V} K_ij − λ Σ_{i,j∈A} K_ij``; gain
``g(k|A) = Σ_i K_ik − 2λ Σ_{j∈A} K_jk − λ K_kk`` (methods.md B3).

On unit-vector embeddings with the cosine kernel this has a closed form with no n² matrix:
``g(k|A) = e_k·(μ − 2λ σ_A) − λ`` with ``μ = Σ_V e_i`` and ``σ_A = Σ_A e_j`` — O(n·d) per step.

Adding j lowers every other gain by ``2λ K_jk``: graph cut is submodular only when no entry is
negative. ``submodular`` says so from the kernel (``kernel.nonnegative``); on a signed kernel (raw
cosine) a stale gain is no upper bound, lazy greedy differs from naive greedy, and the optimizer runs
submodlib's LazyGreedy heap step for step (``lazy-heap``) — the procedure SMART's reference uses.

Over a sparse kNN kernel (``kernel.incremental``: row i holds its k nearest rows, so K is not
symmetric) the pair term is kept in its general form, ``g(k|A) = Σ_i K_ik − λ Σ_{j∈A} (K_jk + K_kj)
− λ K_kk``: adding j adds row j and column j of the graph to the penalty — the symmetrised graph
without building it. On a symmetric kernel this is the formula above. ``changed`` lists the
candidates whose gain the last ``add`` altered.
"""

from __future__ import annotations

import numpy as np

from curate.select.submodular.kernels import EmbeddingKernel


class GraphCut:
    name = "graph_cut"

    def __init__(self, kernel, lam: float = 0.4):
        self.kernel = kernel
        self.n = kernel.n
        self.lam = lam
        self.submodular = kernel.nonnegative
        self.closed = isinstance(kernel, EmbeddingKernel) and kernel.metric in ("cosine", "dot") and kernel.R is kernel.E
        self.diag = kernel.diag()
        self.incremental = bool(getattr(kernel, "incremental", False))
        self.changed = np.empty(0, dtype=np.int64)
        if self.closed:
            self.mu = kernel.E.sum(axis=0, dtype=np.float64)
            self.sigma = np.zeros_like(self.mu)
        else:
            self.col_sums = kernel.col_sums()
            self.penalty = np.zeros(self.n)  # Σ_{j∈A} K_jk
        self._value = 0.0

    def gains(self, cols: np.ndarray) -> np.ndarray:
        if self.closed:
            E = self.kernel.E[cols].astype(np.float64)
            return E @ (self.mu - 2 * self.lam * self.sigma) - self.lam * self.diag[cols]
        if self.incremental:  # penalty holds Σ_{j∈A} (K_jk + K_kj)
            return self.col_sums[cols] - self.lam * self.penalty[cols] - self.lam * self.diag[cols]
        return self.col_sums[cols] - 2 * self.lam * self.penalty[cols] - self.lam * self.diag[cols]

    def gain(self, j: int) -> float:
        return float(self.gains(np.array([j]))[0])

    def add(self, j: int) -> None:
        self._value += self.gain(j)
        if self.closed:
            self.sigma += self.kernel.E[j]
        elif self.incremental:
            rows, col = self.kernel.column(j)
            cols, row = self.kernel.row(j)
            np.add.at(self.penalty, rows, col.astype(np.float64))
            np.add.at(self.penalty, cols, row.astype(np.float64))
            self.changed = np.union1d(rows, cols)
        else:  # row j of K = column j for the symmetric kernels graph cut is used with
            rows, col = self.kernel.column(j)
            if rows is None:
                self.penalty += col
            else:
                self.penalty[rows] += col

    def value(self) -> float:
        return self._value
