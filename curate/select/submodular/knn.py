"""A sparse k-nearest-neighbour similarity graph over unit vectors, for the submodular objectives on
pools too large for a dense kernel (methods.md B3, "sparse kNN kernels").

``build_knn_graph(E, k, index=…)`` searches each row's ``k`` most similar other rows by inner product
(= cosine on unit vectors) with FAISS and returns a :class:`KnnGraph`: CSR arrays (``indptr``,
``indices`` int32, ``data`` float32) where row i holds its own entry ``K_ii = e_i·e_i`` plus up to
``k`` neighbours, sorted by column. Indexes:

- ``exact`` — ``IndexFlatIP``: every pair scored; the graph is the true top-k.
- ``ivf`` — inverted lists joined by matrix products: FAISS k-means (``nlist`` centroids, spherical,
  10 iterations, trained on a seeded sample of ``train_per_list`` rows per list, FAISS's seed fixed)
  and an ``IndexFlatIP`` over the centroids assign every row to its nearest list; then, list by list,
  the list's rows are compared with every row of the ``nprobe`` lists nearest to its centroid in one
  BLAS matrix product, and each keeps its top k. Probing per list rather than per query (what FAISS's
  ``IndexIVFFlat`` does) reads each probed list once per list instead of once per query, and turns
  the scan into matrix products; it misses a neighbour only when it sits in a list that is near the
  row but not among the nprobe nearest to its list's centroid — recall says how often.
  The similarities are exact inner products; only the neighbour *set* is approximate.
- ``hnsw`` — ``IndexHNSWFlat`` (``M`` 32, ``efConstruction`` 64, ``efSearch`` ``max(2·(k+1), 64)``),
  built on one thread: a parallel HNSW insertion is not reproducible.
- ``auto`` — ``exact`` up to ``threshold`` rows, ``ivf`` above.

Rows are added and searched in blocks of ``block`` rows, each converted to float32 on its own, so a
float16 or memory-mapped matrix is never copied whole; the index itself holds one float32 copy
(``exact`` / ``hnsw``: n·d·4 bytes; ``ivf`` keeps none — it gathers each probed list as it goes).
FAISS runs on ``threads`` OpenMP threads (set, then restored), and the ``ivf`` join's numpy matrix
products on as many BLAS threads. Equal input, equal ``seed`` and equal ``threads`` give the same graph.

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

from curate.arrays import concat_ranges

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
                    nlist: int | None = None, nprobe: int = 8, train_per_list: int = 40, hnsw_m: int = 32,
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
            from threadpoolctl import threadpool_limits

            with threadpool_limits(threads, user_api="blas"):  # the join's matrix products: numpy's BLAS, same thread count
                return _ivf_graph(E, k, seed, threads, nlist, nprobe, train_per_list, recall_sample, block, stats, t0)
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
            diag = np.einsum("ij,ij->i", X, X).astype(np.float32)
            c, v, counts = _pack(np.arange(s, e), labels, sims, diag, k)
            indptr[s + 1 : e + 1] = counts
            cols.append(c)
            vals.append(v)
        del idx
        np.cumsum(indptr, out=indptr)
        stats["search_s"] = round(time.perf_counter() - t1, 3)
    finally:
        faiss.omp_set_num_threads(old_threads)
    return _finish(E, KnnGraph(n, k, indptr, np.concatenate(cols), np.concatenate(vals), kind, stats), recall_sample, seed, block)


def _finish(E, graph: KnnGraph, recall_sample: int, seed: int, block: int) -> KnnGraph:
    stats = graph.stats
    stats["nnz"] = graph.nnz
    if recall_sample:
        t2 = time.perf_counter()
        stats["recall_at_k"], stats["recall_sample"] = measure_recall(E, graph, recall_sample, seed, block=block)
        stats["recall_s"] = round(time.perf_counter() - t2, 3)
    else:
        stats["recall_at_k"], stats["recall_sample"] = None, 0
    return graph


def _ivf_graph(E, k, seed, threads, nlist, nprobe, train_per_list, recall_sample, block, stats, t0) -> KnnGraph:
    """The ``ivf`` graph (see the module's docstring); FAISS's threads are already set by the caller."""
    import faiss

    n, d = E.shape
    nlist = int(nlist or max(1, min(round(math.sqrt(n)), n // 39 or 1)))
    nprobe = int(min(nprobe, nlist))
    m = min(n, nlist * train_per_list)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    km = faiss.Kmeans(d, nlist, niter=10, seed=int(seed % (2 ** 31)), spherical=True, max_points_per_centroid=train_per_list,
                      verbose=False)
    km.train(np.ascontiguousarray(np.asarray(E[sample], dtype=np.float32)))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    assign = np.empty(n, dtype=np.int64)
    for s, e in _blocks(n, block):
        assign[s:e] = quantizer.search(_f32(E, s, e), 1)[1][:, 0]
    _, probes = quantizer.search(centroids, nprobe)  # each list's nprobe nearest lists (itself first)
    order = np.argsort(assign, kind="stable")  # rows list by list, ascending inside a list
    bounds = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=nlist))])
    stats.update(nlist=nlist, nprobe=nprobe, train_rows=m, build_s=round(time.perf_counter() - t0, 3))
    t1 = time.perf_counter()
    counts = np.zeros(n, dtype=np.int64)
    row_cols = [None] * nlist
    for lst in range(nlist):
        members = order[bounds[lst] : bounds[lst + 1]]
        if not len(members):
            continue
        cand = np.sort(np.concatenate([order[bounds[p] : bounds[p + 1]] for p in probes[lst] if p >= 0]))
        C = np.ascontiguousarray(np.asarray(E[cand], dtype=np.float32))
        kk = min(k, len(cand) - 1)
        cs = []
        for s in range(0, len(members), 4096):
            rows = members[s : s + 4096]
            Q = np.ascontiguousarray(np.asarray(E[rows], dtype=np.float32))
            S = Q @ C.T
            diag = np.einsum("ij,ij->i", Q, Q).astype(np.float32)
            at = np.minimum(np.searchsorted(cand, rows), len(cand) - 1)
            own = cand[at] == rows
            S[np.flatnonzero(own), at[own]] = -np.inf  # the row itself: kept apart, as K_ii
            if kk > 0:
                top = np.argpartition(S, -kk, axis=1)[:, -kk:] if kk < S.shape[1] else np.broadcast_to(np.arange(S.shape[1]), S.shape)
                c = cand[top]
                v = np.take_along_axis(S, top, axis=1)
                ok = np.isfinite(v)
                c = np.where(ok, c, -1)
            else:
                c = np.full((len(rows), 0), -1, dtype=np.int64)
                v = np.zeros((len(rows), 0), dtype=np.float32)
            cc, vv, cnt = _pack(rows, c, v, diag, k)
            counts[rows] = cnt
            cs.append((rows, cnt, cc, vv))
        row_cols[lst] = cs
    # lay the rows out in row order
    indptr = np.zeros(n + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(counts)
    indices = np.empty(int(indptr[-1]), dtype=np.int32)
    data = np.empty(int(indptr[-1]), dtype=np.float32)
    for cs in row_cols:
        for rows, cnt, cc, vv in cs or ():
            dest = concat_ranges(indptr[rows], cnt)
            indices[dest] = cc
            data[dest] = vv
    stats["search_s"] = round(time.perf_counter() - t1, 3)
    return _finish(E, KnnGraph(n, k, indptr, indices, data, "ivf", stats), recall_sample, seed, block)


def _pack(rows: np.ndarray, labels: np.ndarray, sims: np.ndarray, diag: np.ndarray, k: int):
    """Rows of the graph from search results: each row's first k results other than itself (−1
    padding dropped) plus ``K_ii``, sorted by column — (columns int32, values float32, counts)."""
    keep = (labels >= 0) & (labels != rows[:, None])
    keep &= np.cumsum(keep, axis=1) <= k
    big = np.iinfo(np.int64).max
    cols = np.concatenate([np.where(keep, labels, big), rows[:, None]], axis=1)
    vals = np.concatenate([sims.astype(np.float32, copy=False), diag[:, None]], axis=1)
    order = np.argsort(cols, axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    valid = cols != big
    return cols[valid].astype(np.int32), vals[valid], valid.sum(axis=1)


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
        "auto", description="FAISS search building the graph: exact (IndexFlatIP), ivf (FAISS k-means lists, "
                            "each list joined with its nprobe nearest lists by BLAS), hnsw (IndexHNSWFlat); "
                            "auto: exact up to knn_threshold rows, ivf above.")
    knn_threshold: int = Field(20_000, gt=0, description="Rows above which kernel: auto uses the kNN graph (and knn_index: auto uses IVF).")
    knn_nlist: int | None = Field(None, gt=0, description="IVF lists; default √n (at least 39 rows per list).")
    knn_nprobe: int = Field(8, gt=0, description="IVF: lists each list's rows are compared with (the nearest to its centroid).")
    knn_threads: int = Field(2, gt=0, description="FAISS OpenMP threads (the graph is reproducible for a given count).")
    knn_recall_sample: int = Field(1000, ge=0,
                                   description="Query rows on which recall@k against exact search is measured (0: not measured).")

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
