"""Submodular selection over a FAISS kNN graph (issue 13): the graph, recall, the sparse objectives
and the incremental greedy, and the steps with the threshold forced low."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from curate.select import Pool, selector_class
from curate.select.submodular import (FacilityLocation, GraphCut, SparseKernel, build_knn_graph, lazy_greedy,
                                      naive_greedy)

pytest.importorskip("faiss")


def unit(X):
    X = np.asarray(X, dtype=np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def clustered(n, d=32, seed=0, clusters=12, spread=0.4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    return unit(centres[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, d)))


def pool(emb, tasks=None, seed=0):
    n = len(emb)
    return Pool(rows=np.arange(n, dtype=np.int64), ids=[f"id{i}" for i in range(n)], scores={}, orientation={}, embeddings=emb,
                n_input=n, seed=seed, tasks=tasks)


def graph_digest(g) -> str:
    h = hashlib.sha256()
    for a in (g.indptr, g.indices, g.data):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_exact_graph_is_each_rows_top_k_plus_itself():
    X = clustered(400, seed=1)
    k = 7
    g = build_knn_graph(X, k, index="exact")
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    kth = -np.sort(-S, axis=1)[:, k - 1]
    assert g.index == "exact" and g.nnz == 400 * (k + 1) and g.indices.dtype == np.int32 and g.data.dtype == np.float32
    for i in range(400):
        cols = g.indices[g.indptr[i]:g.indptr[i + 1]]
        vals = g.data[g.indptr[i]:g.indptr[i + 1]]
        assert np.all(np.diff(cols) > 0) and i in cols  # sorted, the row itself kept
        others = cols != i
        assert others.sum() == k and np.all(vals[others] >= kth[i] - 1e-5)
        assert np.allclose(vals[others], S[i, cols[others]], atol=1e-5)
    assert g.stats["recall_at_k"] == 1.0 and g.stats["recall_sample"] == 400


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_graph_recall_is_measured_and_reproducible(index):
    X = clustered(6000, seed=2)
    a = build_knn_graph(X, 10, index=index, seed=5, recall_sample=500)
    b = build_knn_graph(X, 10, index=index, seed=5, recall_sample=500)
    s = a.stats
    assert a.index == index and 0.0 <= s["recall_at_k"] <= 1.0 and s["recall_sample"] == 500
    assert s["recall_at_k"] > 0.5  # clustered data: most true neighbours are found
    assert graph_digest(a) == graph_digest(b) and a.stats["recall_at_k"] == b.stats["recall_at_k"]
    if index == "ivf":
        assert s["nlist"] == round(np.sqrt(6000)) and s["nprobe"] == 8  # defaults: √n lists, 8 probed
    # a low-recall setting measures lower: one probed list of many
    low = build_knn_graph(X, 10, index="ivf", nlist=150, nprobe=1, seed=5, recall_sample=500)
    assert low.stats["recall_at_k"] < s["recall_at_k"]


def test_ivf_graph_is_identical_in_a_fresh_process():
    X = clustered(3000, seed=3)
    here = graph_digest(build_knn_graph(X, 8, index="ivf", seed=11, recall_sample=0))
    code = ("import hashlib, numpy as np, sys\n"
            "sys.path.insert(0, 'tests')\n"
            "from test_knn_graph import clustered, graph_digest\n"
            "from curate.select.submodular import build_knn_graph\n"
            "print(graph_digest(build_knn_graph(clustered(3000, seed=3), 8, index='ivf', seed=11, recall_sample=0)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_float16_memmap_input_gives_the_graph_of_its_float32_values(tmp_path):
    X = clustered(1500, seed=4).astype(np.float16)
    path = tmp_path / "e.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=X.shape)
    a = build_knn_graph(ro, 6, index="exact", block=256)
    b = build_knn_graph(X.astype(np.float32), 6, index="exact")
    assert graph_digest(a) == graph_digest(b)


def test_incremental_greedy_is_naive_greedy_on_an_approximate_graph():
    X = clustered(2500, seed=6)
    g = build_knn_graph(X, 12, index="ivf", nlist=40, nprobe=2, seed=1, recall_sample=0)  # approximate on purpose
    for make in (lambda K: FacilityLocation(K), lambda K: GraphCut(K, 0.4)):
        inc = lazy_greedy(make(SparseKernel.from_graph(g)), 60)
        ref = naive_greedy(make(SparseKernel.from_graph(g)), 60)
        assert inc.variant == "lazy-incremental"
        assert inc.ranking.tolist() == ref.ranking.tolist()
        assert np.allclose(inc.gains, ref.gains, rtol=1e-9, atol=1e-9)
        assert inc.evaluations < ref.evaluations / 5


def test_sparse_facility_location_and_graph_cut_values_match_their_definitions():
    X = clustered(300, seed=7)
    K = SparseKernel.from_graph(build_knn_graph(X, 5, index="exact"))
    D = K.block(np.arange(300)).astype(np.float64)  # row i: represented, column j: candidate
    fl = FacilityLocation(K)
    gc = GraphCut(K, 0.4)
    A = []
    for j in (3, 150, 77, 201):
        fl.add(j)
        gc.add(j)
        A.append(j)
    assert np.isclose(fl.value(), np.maximum(D[:, A].max(axis=1), 0).sum())
    assert np.isclose(gc.value(), D[:, A].sum() - 0.4 * D[np.ix_(A, A)].sum())


@pytest.mark.parametrize("method,positive", [("facility_location", False), ("graph_cut", False), ("graph_cut", True)])
def test_step_over_the_full_exact_graph_selects_as_the_dense_path(method, positive):
    """kNN with k = n − 1 and exact search holds every pair: the same kernel as the dense path, so the
    same greedy (signed graph cut: the heap on both sides; otherwise naive greedy's ranking)."""
    X = clustered(240, seed=8)
    if positive:
        X = unit(np.abs(X))
    p = pool(X, seed=2)
    params = {"budget": 25, "lambda": 0.4} if method == "graph_cut" else {"budget": 25}
    dense = selector_class(method)(method, {**params, "kernel": "embedding"}).select(p)
    sparse = selector_class(method)(method, {**params, "knn": 239, "knn_threshold": 100, "knn_index": "exact"}).select(p)
    assert "knn_graph" not in dense.stats and sparse.stats["knn_graph"]["index"] == "exact"
    assert sparse.stats["knn_graph"]["k"] == 239 and sparse.stats["knn_graph"]["recall_at_k"] == 1.0
    assert sparse.stats["kernel"].startswith("sparse kNN graph (k=239, exact")
    assert sparse.keep.tolist() == dense.keep.tolist() and sparse.rank.tolist() == dense.rank.tolist()
    picked = dense.keep
    assert np.allclose(sparse.columns["gain"][picked], dense.columns["gain"][picked], rtol=1e-4, atol=1e-4)
    expect = {("facility_location", False): ("lazy-batched", "lazy-incremental"), ("graph_cut", False): ("lazy-heap", "lazy-heap"),
              ("graph_cut", True): ("lazy-batched", "lazy-incremental")}[(method, positive)]
    assert (dense.stats["optimizer_variant"], sparse.stats["optimizer_variant"]) == expect


def test_step_above_the_threshold_records_the_graph_and_is_deterministic():
    X = clustered(3000, seed=9)
    params = {"budget": 100, "knn": 10, "knn_threshold": 1000, "knn_recall_sample": 300}
    a = selector_class("facility_location")("facility_location", params).select(pool(X, seed=4))
    b = selector_class("facility_location")("facility_location", params).select(pool(X, seed=4))
    g = a.stats["knn_graph"]
    assert g["index"] == "ivf" and g["recall_sample"] == 300 and 0.0 <= g["recall_at_k"] <= 1.0
    assert a.keep.sum() == 100 and a.rank.tolist() == b.rank.tolist() and a.stats == b.stats | {"knn_graph": a.stats["knn_graph"]}
    assert np.array_equal(a.columns["gain"], b.columns["gain"], equal_nan=True)
    assert {k: v for k, v in g.items() if not k.endswith("_s")} == {k: v for k, v in b.stats["knn_graph"].items() if not k.endswith("_s")}
    below = selector_class("facility_location")("facility_location", {**params, "knn_threshold": 5000}).select(pool(X, seed=4))
    assert "knn_graph" not in below.stats and below.stats["kernel"].startswith("exact cosine")


def test_log_determinant_refuses_the_graph():
    with pytest.raises(ValueError, match="positive semi-definite"):
        selector_class("log_determinant")("log_determinant", {"budget": 3, "kernel": "sparse"}).select(pool(clustered(50)))


def test_smart_stage_two_over_the_full_exact_graph_selects_as_dense():
    X = clustered(360, seed=10)
    tasks = [f"t{i % 3}" for i in range(360)]
    params = {"budget": 30, "num_tasks": 3}
    dense = selector_class("smart")("smart", {**params, "kernel": "embedding"}).select(pool(X, tasks))
    sparse = selector_class("smart")("smart", {**params, "knn": 119, "knn_threshold": 50, "knn_index": "exact"}).select(pool(X, tasks))
    assert "instance_knn" not in dense.stats
    graphs = sparse.stats["instance_knn"]
    assert [g["group"] for g in graphs] == [f"task:{t}" for t in sparse.stats["tasks"]]
    assert all(g["k"] == 119 and g["recall_at_k"] == 1.0 for g in graphs)
    assert sparse.rank.tolist() == dense.rank.tolist()
    assert sparse.stats["instance_optimizer"] == ["lazy-incremental"] and dense.stats["instance_optimizer"] == ["lazy-batched"]
    ivf = {**params, "knn": 8, "knn_threshold": 50, "knn_index": "ivf", "knn_recall_sample": 60}
    approx = selector_class("smart")("smart", ivf).select(pool(X, tasks))
    assert approx.keep.sum() == 30 and all(0 <= g["recall_at_k"] <= 1 and g["index"] == "ivf" for g in approx.stats["instance_knn"])
