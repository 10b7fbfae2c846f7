"""Selection steps: budgets, tie-breaks (methods.md E2), NaN handling, k-center (B2)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from curate.select import Pool, selector_class
from curate.select.kcenter import kcenter_greedy


def pool(values=None, emb=None, n=None, seed=0):
    n = n if n is not None else (len(values) if values is not None else len(emb))
    scores = {"s.v": np.asarray(values, float)} if values is not None else {}
    return Pool(rows=np.arange(n, dtype=np.int64) * 10, ids=[f"id{i}" for i in range(n)], scores=scores,
                orientation={"s.v": "higher_is_better"}, embeddings=emb, n_input=n, seed=seed)


def run(method, p, **params):
    return selector_class(method)(params).select(p)


def test_threshold_bounds_and_reasons():
    r = run("threshold", pool([0.5, 1.0, 1.5, np.nan]), score="s.v", max=1.0, max_inclusive=False)
    assert r.keep.tolist() == [True, False, False, False]
    assert r.outcome == "filtered" and r.reason[1:] == ["above_max", "above_max", "unscored"]
    assert r.detail[1] == "s.v = 1 >= max 1"
    r = run("threshold", pool([0.5, 1.0, np.nan]), score="s.v", min=1.0, include_unscored=True)
    assert r.keep.tolist() == [False, True, True]


def test_top_k_ties_by_row_and_nan_never_selected():
    r = run("top_k", pool([3, 5, 5, np.nan, 1]), score="s.v", budget=2)
    assert np.flatnonzero(r.keep).tolist() == [1, 2] and r.rank[[1, 2]].tolist() == [0, 1]
    assert r.reason[3] == "unscored" and r.reason[0] == "beyond_budget"
    assert "rank 3 by highest s.v (= 3); budget 2, cutoff 5" == r.detail[0]
    r = run("top_k", pool([3, 5, 5, np.nan, 1]), score="s.v", budget=0.4)  # floor(0.4 * 5) = 2
    assert r.keep.sum() == 2
    r = run("top_k", pool([3, 5, 5, np.nan, 1]), score="s.v", budget=0.5, rate_base="valid")  # floor(0.5 * 4)
    assert r.keep.sum() == 2
    r = run("top_k", pool([3, 5, 5, np.nan, 1]), score="s.v", budget=2, descending=False)
    assert np.flatnonzero(r.keep).tolist() == [0, 4]
    r = run("top_k", pool([np.nan, np.nan]), score="s.v", budget=1, include_unscored=True)
    assert r.keep.tolist() == [True, False]
    with pytest.raises(ValueError):
        run("top_k", pool([1.0]), score="s.v", budget=1.5)


def test_random_is_seeded_and_order_free():
    p = pool(n=50, seed=3)
    a = run("random", p, budget=10)
    b = run("random", p, budget=10)
    assert a.keep.tolist() == b.keep.tolist() and a.keep.sum() == 10
    c = run("random", pool(n=50, seed=4), budget=10)
    assert a.keep.tolist() != c.keep.tolist()


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_radius(X, centres):
    d = 2 - 2 * X @ X[list(centres)].T
    return np.maximum(d, 0).min(axis=1).max()


def test_kcenter_two_approximation_and_monotone_radius():
    rng = np.random.default_rng(0)
    for trial in range(5):
        X = unit(rng, 11, 3)
        k = 3
        res = kcenter_greedy(X, k, first=0)
        greedy = np.sqrt(brute_radius(X, res.order))
        best = min(np.sqrt(brute_radius(X, c)) for c in itertools.combinations(range(len(X)), k))
        assert greedy <= 2 * best + 1e-6
        radii = res.radii[1:]
        assert np.all(np.diff(radii) <= 1e-7)
        # state is the true min distance to the chosen centres
        d = np.maximum(2 - 2 * X @ X[res.order].T, 0)
        assert np.allclose(res.min_dist, d.min(1), atol=1e-5)
        assert np.array_equal(res.nearest, res.order[d.argmin(1)])


def test_kcenter_ties_pick_lowest_index_and_exact_duplicates():
    X = np.array([[1, 0], [0, 1], [0, 1], [-1, 0]], dtype=np.float32)
    res = kcenter_greedy(X, 3, first=0)
    assert res.order.tolist() == [0, 3, 1]  # row 3 is farthest; then rows 1 and 2 tie: the lower index wins
    assert res.min_dist[2] == 0  # the exact duplicate of a centre is covered at distance 0


def test_kcenter_already_selected_uses_faiss_assignment():
    rng = np.random.default_rng(1)
    X = unit(rng, 200, 16)
    pre = np.array([5, 17, 99])
    res = kcenter_greedy(X, 10, already_selected=pre)
    d = np.maximum(2 - 2 * X @ X[np.concatenate([pre, res.order])].T, 0)
    assert np.allclose(res.min_dist, d.min(1), atol=1e-5)
    assert not set(res.order) & set(pre)
    # the same picks as a naive farthest-first loop from those centres
    m = np.maximum(2 - 2 * X @ X[pre].T, 0).min(1)
    naive = []
    for _ in range(10):
        i = int(np.argmax(m))
        naive.append(i)
        m = np.minimum(m, np.maximum(2 - 2 * X @ X[i], 0))
    assert res.order.tolist() == naive


def test_kcenter_selector_reasons_and_init():
    rng = np.random.default_rng(2)
    X = unit(rng, 40, 8)
    p = pool(values=np.arange(40.0), emb=X)
    r = run("kcenter", p, budget=5, score="s.v")
    assert r.keep.sum() == 5 and r.stats["init"] == "max_score" and r.stats["first_row"] == 390
    assert r.rank[39] == 0
    dropped = np.flatnonzero(~r.keep)
    assert all(r.reason[i] == "covered" and "to nearest centre (row" in r.detail[i] for i in dropped)
    r2 = run("kcenter", p, budget=5)
    assert r2.stats["init"] == "medoid"
    r3 = run("kcenter", p, budget=0.25)
    assert r3.keep.sum() == 10


def test_kcenter_extends_a_preselected_set(tmp_path):
    rng = np.random.default_rng(3)
    X = unit(rng, 60, 8)
    p = pool(emb=X)
    (tmp_path / "before.txt").write_text("id4\nid9\nnot-in-pool\n")
    r = selector_class("kcenter")({"budget": 6, "already_selected": "before.txt"}, base_dir=str(tmp_path)).select(p)
    assert r.keep.sum() == 6 and not r.keep[4] and not r.keep[9]
    assert r.reason[4] == r.reason[9] == "already_selected"
    assert r.stats["n_already_selected"] == 2 and r.stats["init"] == "already_selected"
    expect = kcenter_greedy(X, 6, already_selected=np.array([4, 9]))
    assert np.flatnonzero(r.keep).tolist() == sorted(expect.order.tolist())
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        selector_class("kcenter")({"budget": 2, "already_selected": "missing.txt"}, base_dir=str(tmp_path)).select(p)
