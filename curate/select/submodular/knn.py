"""A sparse k-nearest-neighbour similarity graph over unit vectors, for the submodular objectives on
pools too large for a dense kernel (methods.md B3, "sparse kNN kernels").

``build_knn_graph(E, k, index=…)`` searches each row's ``k`` most similar other rows by inner product
(= cosine on unit vectors) with FAISS and returns a :class:`KnnGraph`: CSR arrays (``indptr``,
``indices`` int32, ``data`` float32) where row i holds its own entry ``K_ii = e_i·e_i`` plus up to
``k`` neighbours, sorted by column. Indexes:

- ``exact`` — ``IndexFlatIP``: every pair scored; the graph is the true top-k.
- ``ivf`` — ``IndexIVFFlat``: a k-means coarse quantizer (``nlist`` lists, trained on a seeded sample
  of ``train_per_list`` rows per list, FAISS k-means seeded too), ``nprobe`` lists scanned per query.
  The similarities it returns are exact inner products; only the neighbour *set* is approximate.
- ``hnsw`` — ``IndexHNSWFlat`` (``M`` 32, ``efConstruction`` 64, ``efSearch`` ``max(2·(k+1), 64)``),
  built on one thread: a parallel HNSW insertion is not reproducible.
- ``auto`` — ``exact`` up to ``threshold`` rows, ``ivf`` above.

Rows are added and searched in blocks of ``block`` rows, each converted to float32 on its own, so a
float16 or memory-mapped matrix is never copied whole; the index itself holds one float32 copy
(``exact`` / ``ivf`` / ``hnsw``: n·d·4 bytes). FAISS runs on ``threads`` OpenMP threads (set, then
restored). Equal input, equal ``seed`` and equal ``threads`` give the same graph.

Recall is measured on a seeded sample of ``recall_sample`` query rows against exact search over all
rows (blocked matrix products, no second index): for each query, the neighbours the graph holds whose
similarity is at least the exact k-th similarity (less 1e-5: ties and float rounding count as hits),
at most k, over k — mean over the sample. ``recall`` is None when no sample was asked for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

INDEXES = ("auto", "exact", "ivf", "hnsw")


@dataclass
class KnnGraph:
    n: int
    k: int
    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (nnz,) int32 — columns of each row, sorted, the row itself included
    data: np.ndarray  # (nnz,) float32 — K_ij = e_i·e_j
    index: str  # exact | ivf | hnsw — what was searched
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def csr(self):
        import scipy.sparse as sp

        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=(self.n, self.n))


def _blocks(n: int, block: int):
    for s in range(0, n, block):
        yield s, min(s + block, n)


def _f32(E, s: int, e: int) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(E[s:e], dtype=np.float32))


def resolve_index(index: str, n: int, threshold: int) -> str:
    if index not in INDEXES:
        raise ValueError(f"unknown knn_index '{index}' ({', '.join(INDEXES)})")
    if index == "auto":
        return "exact" if n <= threshold else "ivf"
    return index


def build_knn_graph(E, k: int = 64, index: str = "auto", threshold: int = 20_000, seed: int = 0, threads: int = 2,
                    nlist: int | None = None, nprobe: int = 16, train_per_list: int = 40, hnsw_m: int = 32,
                    recall_sample: int = 1000, block: int = 65_536) -> KnnGraph:
    """The kNN graph of the rows of E (n × d unit vectors, any float dtype, a memmap included)."""
    import faiss

    n, d = E.shape
    if n == 0:
        raise ValueError("a kNN graph needs at least one row")
    k = int(min(k, n - 1))
    kind = resolve_index(index, n, threshold)
    old_threads = faiss.omp_get_max_threads()
    stats: dict[str, Any] = {"index": kind, "k": k, "rows": n, "threads": threads}
    try:
        faiss.omp_set_num_threads(threads)
        t0 = time.perf_counter()
        if kind == "exact":
            idx = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = int(nlist or max(1, min(round(4 * math.sqrt(n)), n // 39 or 1)))
            quantizer = faiss.IndexFlatIP(d)
            idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            idx.cp.seed = int(seed % (2 ** 31))
            idx.cp.niter = 10
            idx.cp.max_points_per_centroid = train_per_list
            m = min(n, nlist * train_per_list)
            sample = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
            idx.train(np.ascontiguousarray(np.asarray(E[sample], dtype=np.float32)))
            idx.nprobe = int(min(nprobe, nlist))
            stats.update(nlist=nlist, nprobe=int(idx.nprobe), train_rows=m)
        elif kind == "hnsw":
            idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = 64
            stats.update(hnsw_m=hnsw_m, ef_construction=64)
        if kind == "hnsw":
            faiss.omp_set_num_threads(1)  # HNSW's parallel insertion depends on thread timing
        for s, e in _blocks(n, block):
            idx.add(_f32(E, s, e))
        faiss.omp_set_num_threads(threads)
        if kind == "hnsw":
            idx.hnsw.efSearch = max(2 * (k + 1), 64)
            stats["ef_search"] = int(idx.hnsw.efSearch)
        stats["build_s"] = round(time.perf_counter() - t0, 3)
        t1 = time.perf_counter()
        indptr = np.zeros(n + 1, dtype=np.int64)
        cols, vals = [], []
        for s, e in _blocks(n, block):
            X = _f32(E, s, e)
            sims, labels = idx.search(X, k + 1)
            c, v, counts = _rows_without_self(np.arange(s, e), labels, sims, k)
            diag = np.einsum("ij,ij->i", X, X).astype(np.float32)
            c, v, counts = _with_diagonal(np.arange(s, e), c, v, counts, diag)
            indptr[s + 1 : e + 1] = counts
            cols.append(c)
            vals.append(v)
        del idx
        np.cumsum(indptr, out=indptr)
        stats["search_s"] = round(time.perf_counter() - t1, 3)
    finally:
        faiss.omp_set_num_threads(old_threads)
    graph = KnnGraph(n, k, indptr, np.concatenate(cols), np.concatenate(vals), kind, stats)
    stats["nnz"] = graph.nnz
    if recall_sample:
        t2 = time.perf_counter()
        stats["recall_at_k"], stats["recall_sample"] = measure_recall(E, graph, recall_sample, seed, block=block)
        stats["recall_s"] = round(time.perf_counter() - t2, 3)
    else:
        stats["recall_at_k"], stats["recall_sample"] = None, 0
    return graph


def _rows_without_self(rows: np.ndarray, labels: np.ndarray, sims: np.ndarray, k: int):
    """Each row's first k results other than itself (FAISS's −1 padding dropped), sorted by column."""
    keep = (labels >= 0) & (labels != rows[:, None])
    keep &= np.cumsum(keep, axis=1) <= k
    counts = keep.sum(axis=1)
    r = np.repeat(np.arange(len(rows)), counts)
    c = labels[keep].astype(np.int32)
    v = sims[keep].astype(np.float32)
    order = np.lexsort((c, r))
    return c[order], v[order], counts


def _with_diagonal(rows: np.ndarray, c: np.ndarray, v: np.ndarray, counts: np.ndarray, diag: np.ndarray):
    """Insert ``K_ii`` into each row (kept sorted by column)."""
    r = np.repeat(np.arange(len(rows)), counts)
    r = np.concatenate([r, np.arange(len(rows))])
    c = np.concatenate([c, rows.astype(np.int32)])
    v = np.concatenate([v, diag])
    order = np.lexsort((c, r))
    return c[order], v[order], counts + 1


def measure_recall(E, graph: KnnGraph, sample: int, seed: int = 0, block: int = 65_536) -> tuple[float, int]:
    """(recall@k of the graph on ``sample`` seeded query rows against exact search, rows sampled)."""
    n, k = graph.n, graph.k
    if k == 0:
        return 1.0, 0
    m = min(sample, n)
    q = np.sort(np.random.default_rng([seed, 1]).choice(n, size=m, replace=False))
    Q = np.ascontiguousarray(np.asarray(E[q], dtype=np.float32))
    best = np.full((m, k), -np.inf, dtype=np.float32)  # the k largest similarities to other rows so far
    for s, e in _blocks(n, block):
        S = Q @ _f32(E, s, e).T
        own = (q >= s) & (q < e)
        S[np.flatnonzero(own), q[own] - s] = -np.inf
        top = -np.partition(-S, min(k, S.shape[1]) - 1, axis=1)[:, :k] if S.shape[1] > k else S
        both = np.concatenate([best, top], axis=1)
        best = -np.partition(-both, k - 1, axis=1)[:, :k]
    kth = best.min(axis=1)
    hits = 0
    for i, row in enumerate(q):
        a, b = graph.indptr[row], graph.indptr[row + 1]
        cols, vals = graph.indices[a:b], graph.data[a:b]
        hits += min(k, int(((cols != row) & (vals >= kth[i] - 1e-5)).sum()))
    return float(hits / (m * k)), int(m)



class KnnParams(BaseModel):
    """The kNN-graph settings of a step that can run its objective over a sparse graph."""

    model_config = ConfigDict(extra="forbid")
    kernel: Literal["auto", "embedding", "sparse"] = Field(
        "auto", description="auto: exact kernel columns from the embeddings up to knn_threshold rows, the kNN graph above; "
                            "embedding / sparse: always that one.")
    knn: int = Field(64, gt=0, description="Neighbours per row of the kNN graph (the row itself is kept besides).")
    knn_index: Literal["auto", "exact", "ivf", "hnsw"] = Field(
        "auto", description="FAISS search building the graph: exact (IndexFlatIP), ivf (IndexIVFFlat), hnsw (IndexHNSWFlat); "
                            "auto: exact up to knn_threshold rows, ivf above.")
    knn_threshold: int = Field(20_000, gt=0, description="Rows above which kernel: auto uses the kNN graph (and knn_index: auto uses IVF).")
    knn_nlist: int | None = Field(None, gt=0, description="IVF lists; default 4·√n (at least 39 rows per list).")
    knn_nprobe: int = Field(16, gt=0, description="IVF lists scanned per query.")
    knn_threads: int = Field(2, gt=0, description="FAISS OpenMP threads (the graph is reproducible for a given count).")
    knn_recall_sample: int = Field(1000, ge=0, description="Query rows on which recall@k against exact search is measured (0: not measured).")

    def use_graph(self, n: int) -> bool:
        return self.kernel == "sparse" or (self.kernel == "auto" and n > self.knn_threshold)

    def graph(self, E, seed: int) -> KnnGraph:
        return build_knn_graph(E, self.knn, self.knn_index, self.knn_threshold, seed=seed, threads=self.knn_threads,
                               nlist=self.knn_nlist, nprobe=self.knn_nprobe, recall_sample=self.knn_recall_sample)


def describe(graph: KnnGraph) -> str:
    """One line for a step's ``kernel`` stat."""
    s = graph.stats
    recall = "" if s.get("recall_at_k") is None else f", recall@{graph.k} {s['recall_at_k']:.3f} on {s['recall_sample']} rows"
    return f"sparse kNN graph (k={graph.k}, {graph.index}{recall})"
