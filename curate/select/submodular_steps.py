"""Submodular selection steps: facility location, graph cut, log-determinant, FLMI and FLCG over the
pool's embeddings (methods.md B3). The objective and the optimizer are separate choices::

    - method: facility_location
      budget: 0.1
      optimizer: lazy          # naive | lazy | stochastic
      metric: cosine           # cosine | dot | euclidean (submodlib's exp(−‖x−y‖/d))

Kernels: columns computed from the embeddings on the fly (nothing n² is held); above ``knn_threshold``
rows (20,000), a sparse kNN graph of ``knn`` neighbours per row from FAISS (``knn_index``: exact, IVF or
HNSW) — an approximation: the stats record the graph (``knn_graph``: index, build and search times,
recall@k against exact search on a sample). Log-determinant always uses the embedding kernel (its
greedy needs a positive semi-definite kernel, which a truncated graph is not).
FLMI needs a query set and FLCG a private set: rows of the pool from a source (``query_source`` /
``private_source``) — they are not candidates and end ``not_selected`` with that reason.
``optimizer: lazy`` runs submodlib's LazyGreedy heap step for step on objectives that are not
submodular (graph cut on a signed kernel) and under ``ties: larger``, its batched exact form
otherwise; the stats record which (``optimizer_variant``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from curate.progress import stage_progress
from curate.select.base import BudgetParams, Pool, Selector, StepResult, fmt
from curate.select.submodular import EmbeddingKernel, FacilityLocation, GraphCut, LogDeterminant, SparseKernel, maximize
from curate.select.submodular.knn import KnnParams, describe


class SubmodularParams(BudgetParams, KnnParams):
    optimizer: Literal["naive", "lazy", "stochastic"] = "lazy"
    metric: Literal["cosine", "dot", "euclidean"] = "cosine"
    epsilon: float = Field(0.1, gt=0, lt=1, description="Stochastic greedy: ⌈(n/k)·ln(1/ε)⌉ candidates per step.")
    ties: Literal["lowest", "larger"] = Field("lowest", description="Equal gains: lowest input row (E2), or larger index with submodlib's "
                                                                     "LazyGreedy heap step for step (parity).")


class SubmodularSelector(Selector):
    needs_embeddings = True
    objective_name = ""

    class Params(SubmodularParams):
        pass

    knn_graph: dict | None = None  # the last graph's stats, for the step's stats

    def kernel(self, X: np.ndarray, rows: np.ndarray | None = None, pool: Pool | None = None):
        p = self.params
        if p.use_graph(len(X)):
            if p.metric != "cosine" or rows is not None:
                raise ValueError("the sparse kNN kernel supports the cosine metric on a square kernel")
            graph = p.graph(X, self.seed(pool, "knn") if pool is not None else 0)
            self.knn_graph = dict(graph.stats)
            return SparseKernel.from_graph(graph), describe(graph)
        return EmbeddingKernel(X, p.metric, rows), f"exact {p.metric}, columns on the fly"

    def objective(self, pool: Pool, cand: np.ndarray, others: np.ndarray):
        raise NotImplementedError

    def set_rows(self, pool: Pool, source: str | None) -> np.ndarray:
        if source is None:
            return np.zeros(len(pool), dtype=bool)
        if pool.sources is None:
            raise ValueError("the pool has no source names")
        return np.array([s == source for s in pool.sources])

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        n = len(pool)
        self.knn_graph = None
        special = self.special_rows(pool)
        cand = np.flatnonzero(~special)
        obj, kernel_desc = self.objective(pool, cand, np.flatnonzero(special))
        k = min(p.resolve_budget(pool), len(cand))
        with stage_progress(f"select {self.method}", k) as bar:
            res = maximize(obj, k, p.optimizer, seed=self.seed(pool, "stochastic"), ties=p.ties, epsilon=p.epsilon, progress=bar)
        keep = np.zeros(n, dtype=bool)
        rank = np.full(n, -1, dtype=np.int64)
        picked = cand[res.ranking]
        keep[picked] = True
        rank[picked] = np.arange(len(picked))
        last = res.gains[-1] if len(res.gains) else float("nan")
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        for i in np.flatnonzero(~keep):
            if special[i]:
                reason[i], detail[i] = self.special_reason, f"in the {self.special_reason.replace('_', ' ')} (source {self.special_source})"
            else:
                reason[i], detail[i] = "low_gain", (f"not among the {len(picked)} greedy picks of {self.method} "
                                                    f"(gain of the last pick {fmt(last)})")
        curve = res.gains[:: max(1, len(res.gains) // 20)].round(6).tolist() if len(res.gains) else []
        stats = {"budget": k, "objective": self.objective_name, "optimizer": p.optimizer, "optimizer_variant": res.variant,
                 "kernel": kernel_desc, "value": float(obj.value()), "gain_first": float(res.gains[0]) if len(res.gains) else None,
                 "gain_last": float(last) if len(res.gains) else None, "gain_curve": curve, "evaluations": res.evaluations}
        if self.knn_graph is not None:
            stats["knn_graph"] = self.knn_graph
        return StepResult(keep, rank, "not_selected", reason, detail, stats, columns={"gain": self._gain_column(n, picked, res.gains)})

    special_reason = ""
    special_source: str | None = None

    def special_rows(self, pool: Pool) -> np.ndarray:
        return np.zeros(len(pool), dtype=bool)

    @staticmethod
    def _gain_column(n: int, picked: np.ndarray, gains: np.ndarray) -> np.ndarray:
        col = np.full(n, np.nan)
        col[picked] = gains
        return col


class FacilityLocationSelect(SubmodularSelector):
    method = "facility_location"
    objective_name = "facility location: Σ_i max(0, max_{j∈A} K_ij)"

    def objective(self, pool, cand, others):
        kernel, desc = self.kernel(pool.embedding_rows(cand), pool=pool)
        return FacilityLocation(kernel), desc


class GraphCutSelect(SubmodularSelector):
    method = "graph_cut"
    objective_name = "graph cut: Σ_{j∈A} Σ_i K_ij − λ Σ_{i,j∈A} K_ij"

    class Params(SubmodularParams):
        lambda_: float = Field(0.4, ge=0, alias="lambda")

    def objective(self, pool, cand, others):
        kernel, desc = self.kernel(pool.embedding_rows(cand), pool=pool)
        return GraphCut(kernel, self.params.lambda_), desc


class LogDeterminantSelect(SubmodularSelector):
    method = "log_determinant"
    objective_name = "log-determinant: log det(K_A + λI)"

    class Params(SubmodularParams):
        lambda_: float = Field(1.0, gt=0, alias="lambda")

    def objective(self, pool, cand, others):
        if self.params.kernel == "sparse":
            raise ValueError("log_determinant: the kNN graph is not positive semi-definite; use kernel: embedding or auto")
        X = pool.embedding_rows(cand)
        return (LogDeterminant(EmbeddingKernel(X, self.params.metric), self.params.lambda_),
                f"exact {self.params.metric}, columns on the fly")


class _ReferenceSetSelector(SubmodularSelector):
    """FLMI and FLCG: rows of one source form a reference set that is not a candidate."""

    source_param = ""

    def special_rows(self, pool):
        source = getattr(self.params, self.source_param)
        self.special_source = source
        rows = self.set_rows(pool, source)
        if not rows.any():
            raise ValueError(f"{self.method}: no row of the pool comes from source '{source}'")
        return rows

    def reference_max(self, pool, cand, others):
        """(kernel over the candidates, its description, each candidate's max similarity to the reference set)."""
        X = pool.embedding_rows(cand)
        kernel, desc = self.kernel(X, pool=pool)
        ref = EmbeddingKernel(pool.embeddings[others], self.params.metric, rows=X)  # rows: ground set, columns: reference
        return kernel, desc, np.max(ref.block(np.arange(len(others))), axis=1)


class FLMISelect(_ReferenceSetSelector):
    method = "flmi"
    objective_name = "FLMI: Σ_i min(max_{j∈A} K_ij, η·max_q K^Q_iq)"
    special_reason = "query_set"
    source_param = "query_source"

    class Params(SubmodularParams):
        query_source: str = Field(description="Rows from this source are the query set Q (targets to represent).")
        eta: float = Field(1.0, gt=0)

    def objective(self, pool, cand, others):
        kernel, desc, best = self.reference_max(pool, cand, others)
        return FacilityLocation(kernel, cap=self.params.eta * best), desc


class FLCGSelect(_ReferenceSetSelector):
    method = "flcg"
    objective_name = "FLCG: Σ_i max(max_{j∈A} K_ij − ν·max_p K^P_ip, 0)"
    special_reason = "private_set"
    source_param = "private_source"

    class Params(SubmodularParams):
        private_source: str = Field(description="Rows from this source are the private set P (data you already have).")
        nu: float = Field(1.0, ge=0)

    def objective(self, pool, cand, others):
        kernel, desc, best = self.reference_max(pool, cand, others)
        return FacilityLocation(kernel, initial=np.maximum(self.params.nu * best, 0)), desc
