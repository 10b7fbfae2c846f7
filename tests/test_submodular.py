"""The selection library (methods.md B1, B3, B4, B5): every objective's gains against brute force,
lazy = naive (submodular objectives), lazy = submodlib's heap restated (signed graph cut), tie-breaks,
kernels, apricot parity, Repr Filter exactness, SMART's budget split against the reference restated
and its λ defaults. Parity with submodlib itself: test_submodlib_parity.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curate.select import Pool, selector_class
from curate.select.repr_filter import repr_filter, repr_filter_one_by_one
from curate.select.smart import budget_split, taylor_softmax
from curate.select.submodular import (DenseKernel, EmbeddingKernel, FacilityLocation, GraphCut, LogDeterminant, SparseKernel,
                                      lazy_greedy, maximize, naive_greedy, stochastic_greedy)


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sym(rng, n, low=0.0):
    A = rng.uniform(low, 1, size=(n, n))
    return ((A + A.T) / 2).astype(np.float32)


# brute-force set functions, straight from the definitions
def fl_value(K, A, cap=None, initial=None):
    c = np.zeros(K.shape[0]) if initial is None else initial.astype(np.float64)
    base = c.sum()
    for j in A:
        col = K[:, j] if cap is None else np.minimum(K[:, j], cap)
        c = np.maximum(c, col)
    return c.sum() - base


def gc_value(K, A, lam):
    A = list(A)
    return K[:, A].sum() - lam * K[np.ix_(A, A)].sum()


def logdet_value(K, A, lam):
    A = list(A)
    return 0.0 if not A else float(np.linalg.slogdet(K[np.ix_(A, A)].astype(np.float64) + lam * np.eye(len(A)))[1])


@pytest.mark.parametrize("name", ["fl", "gc", "logdet", "flmi", "flcg"])
def test_gains_match_brute_force(name):
    rng = np.random.default_rng(0)
    X = unit(rng, 10, 4)
    K = (X @ X.T).astype(np.float32)
    cap = rng.uniform(0.2, 0.9, size=10).astype(np.float32)
    initial = rng.uniform(0.0, 0.5, size=10).astype(np.float32)
    make = {
        "fl": (lambda: FacilityLocation(DenseKernel(K)), lambda A: fl_value(np.maximum(K, 0), A)),
        "gc": (lambda: GraphCut(DenseKernel(K), 0.4), lambda A: gc_value(K, A, 0.4)),
        "logdet": (lambda: LogDeterminant(DenseKernel(K), 1.0), lambda A: logdet_value(K, A, 1.0)),
        "flmi": (lambda: FacilityLocation(DenseKernel(K), cap=cap), lambda A: fl_value(np.maximum(K, 0), A, cap=cap)),
        "flcg": (lambda: FacilityLocation(DenseKernel(K), initial=initial), lambda A: fl_value(np.maximum(K, 0), A, initial=initial)),
    }[name]
    for trial in range(4):
        A = list(rng.choice(10, size=trial + 1, replace=False))
        obj = make[0]()
        for j in A:
            obj.add(int(j))
        f = make[1]
        for j in set(range(10)) - set(A):
            want = f(A + [j]) - f(A)
            assert obj.gain(j) == pytest.approx(want, abs=1e-5), (name, A, j)
            assert obj.gains(np.array([j]))[0] == pytest.approx(want, abs=1e-5)
        assert obj.value() == pytest.approx(f(A), abs=1e-5)


def test_graph_cut_closed_form_equals_dense():
    rng = np.random.default_rng(1)
    X = unit(rng, 30, 8)
    a = naive_greedy(GraphCut(EmbeddingKernel(X), 0.4), 10)
    b = naive_greedy(GraphCut(DenseKernel(X @ X.T), 0.4), 10)
    assert a.ranking.tolist() == b.ranking.tolist() and np.allclose(a.gains, b.gains, atol=1e-4)


@pytest.mark.parametrize("make", [lambda K, X: FacilityLocation(DenseKernel(K)), lambda K, X: FacilityLocation(EmbeddingKernel(X)),
                                  lambda K, X: LogDeterminant(EmbeddingKernel(X), 1.0), lambda K, X: GraphCut(DenseKernel(np.abs(K)), 0.1)])
def test_lazy_equals_naive(make):
    rng = np.random.default_rng(2)
    X = unit(rng, 200, 16)
    K = X @ X.T
    lazy = lazy_greedy(make(K, X), 25)
    naive = naive_greedy(make(K, X), 25)
    assert lazy.ranking.tolist() == naive.ranking.tolist()
    assert np.allclose(lazy.gains, naive.gains, atol=1e-6)
    assert lazy.evaluations < naive.evaluations


def test_tie_breaks():
    K = np.ones((4, 4), dtype=np.float32)  # every candidate has the same gain
    assert naive_greedy(FacilityLocation(DenseKernel(K)), 1).ranking.tolist() == [0]
    assert lazy_greedy(FacilityLocation(DenseKernel(K)), 1).ranking.tolist() == [0]
    assert lazy_greedy(FacilityLocation(DenseKernel(K)), 1, ties="larger").ranking.tolist() == [3]  # submodlib's heap
    assert naive_greedy(FacilityLocation(DenseKernel(K)), 2, ties="larger").ranking.tolist() == [3, 2]  # submodlib's NaiveGreedy
    X = unit(np.random.default_rng(12), 30, 8)  # cosine: K_kk is exactly 1, so every first log-det gain is log(1 + λ)
    assert lazy_greedy(LogDeterminant(EmbeddingKernel(X), 1.0), 1).ranking.tolist() == [0]
    assert lazy_greedy(LogDeterminant(EmbeddingKernel(X), 1.0), 1, ties="larger").ranking.tolist() == [29]


def submodlib_lazy_greedy(f, n: int, budget: int, larger: bool = True) -> list[int]:
    """submodlib's LazyGreedy restated from cpp/optimizers/LazyGreedyOptimizer.cpp, with brute-force
    gains f(A + [j]) − f(A): a max-heap of (gain, index) (std::less: larger index first on ties); pop
    the top, recompute its gain, take it if the gain is ≥ the next entry's (stale) gain, else push it
    back with the new gain."""
    import heapq

    A: list[int] = []
    heap = [(-(f([j]) - f([])), -j if larger else j, j) for j in range(n)]
    heapq.heapify(heap)
    while len(A) < budget:
        _, key, j = heapq.heappop(heap)
        g = f(A + [j]) - f(A)
        if g >= -heap[0][0]:
            A.append(j)
        else:
            heapq.heappush(heap, (-g, key, j))
    return A


@pytest.mark.parametrize("ties", ["larger", "lowest"])
def test_lazy_greedy_is_submodlibs_heap_on_signed_graph_cut(ties):
    """Graph cut on a raw-cosine kernel is not submodular: a stale gain is no upper bound, so lazy
    greedy is defined by its procedure. 30 random signed kernels (n 40, λ 0.4): the ranking is the
    restated submodlib heap's, not naive greedy's (they differ on most kernels)."""
    differs_from_naive = 0
    for seed in range(30):
        X = unit(np.random.default_rng(100 + seed), 40, 8)
        K = (X @ X.T).astype(np.float64)
        obj = GraphCut(EmbeddingKernel(X), 0.4)
        assert not obj.submodular
        res = lazy_greedy(obj, 20, ties=ties)
        assert res.variant == "lazy-heap"
        assert res.ranking.tolist() == submodlib_lazy_greedy(lambda A: gc_value(K, A, 0.4), 40, 20, larger=ties == "larger"), seed
        differs_from_naive += res.ranking.tolist() != naive_greedy(GraphCut(EmbeddingKernel(X), 0.4), 20).ranking.tolist()
    assert differs_from_naive >= 10
    nonneg = GraphCut(DenseKernel(np.abs(K)), 0.4)
    assert nonneg.submodular and lazy_greedy(nonneg, 5).variant == "lazy-batched"


def test_sparse_kernel_with_all_neighbours_is_exact_and_stochastic_is_seeded():
    rng = np.random.default_rng(3)
    X = unit(rng, 60, 8)
    exact = lazy_greedy(FacilityLocation(EmbeddingKernel(X)), 10)
    sparse = lazy_greedy(FacilityLocation(SparseKernel(X, k=60)), 10)
    assert exact.ranking.tolist() == sparse.ranking.tolist()
    a = stochastic_greedy(FacilityLocation(EmbeddingKernel(X)), 10, seed=1)
    b = stochastic_greedy(FacilityLocation(EmbeddingKernel(X)), 10, seed=1)
    assert a.ranking.tolist() == b.ranking.tolist() and a.evaluations < exact.evaluations * 10
    assert a.gains.sum() >= 0.8 * exact.gains.sum()


def test_facility_location_matches_apricot():
    apricot = pytest.importorskip("apricot", reason="apricot-select is a test dependency (pip install '.[test]')")
    rng = np.random.default_rng(4)
    X = rng.random((300, 20))
    K = ((X @ X.T) / 20).astype(np.float64)
    ours = maximize(FacilityLocation(DenseKernel(K)), 30, "lazy")
    theirs = apricot.FacilityLocationSelection(30, metric="precomputed", optimizer="lazy").fit(K)
    assert ours.ranking.tolist() == list(theirs.ranking)
    assert np.allclose(ours.gains, theirs.gains, rtol=1e-4)


def test_repr_filter_blocked_equals_one_by_one():
    rng = np.random.default_rng(5)
    base = unit(rng, 400, 12)
    X = np.concatenate([base, base[:100] + 0.02 * rng.normal(size=(100, 12)).astype(np.float32), base[:50]])  # near and exact duplicates
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    order = rng.permutation(len(X))
    for tau, budget in ((0.9, None), (0.5, None), (0.9, 120), (1.01, 200)):
        kept, blocker, sim, _ = repr_filter(X, order, tau, budget, block=64)
        assert kept.tolist() == repr_filter_one_by_one(X, order, tau, budget).tolist()
        assert all(sim[i] > tau for i in np.flatnonzero(blocker >= 0))
    kept, *_ = repr_filter(X, order, 1.01, 200)
    assert kept.tolist() == order[:200].tolist()  # τ > 1: top-k by score


def test_repr_filter_step_keeps_the_better_duplicate():
    rng = np.random.default_rng(6)
    X = unit(rng, 6, 8)
    X[4] = X[1]  # an exact duplicate of row 1, scored higher
    pool = Pool(rows=np.arange(6), ids=[f"r{i}" for i in range(6)], scores={"d.evol": np.array([5, 3, 4, 2, 9, np.nan])},
                orientation={"d.evol": "higher_is_better"}, embeddings=X, n_input=6)
    res = selector_class("repr_filter")("repr_filter", {"score": "d.evol"}).select(pool)
    assert res.keep.tolist() == [True, False, True, True, True, False]
    assert res.reason[1] == "too_similar" and "to kept row 4" in res.detail[1] and res.reason[5] == "unscored"
    assert res.rank[4] == 0  # visited by score: 9, 5, 4, 3 (blocked), 2


def reference_budget_split(total: int, weights, sizes) -> list[int]:
    """SMART's reference split restated (get_SMART_mixture.py: budget_split, then the capping loop of
    get_task_budgets): floors, remainder round-robin from index 0 without a capacity check, then clip
    to the task sizes and redistribute the overflow +1 per pass from index 0 over tasks with room."""
    if sum(sizes) < total:
        raise ValueError("the chosen tasks hold fewer rows than the budget")  # as the reference does
    ratio_sum = sum(weights)
    parts = [math.floor(total * r / ratio_sum) for r in weights]
    for i in range(total - sum(parts)):
        parts[i % len(weights)] += 1
    overflow = 0
    for j, size in enumerate(sizes):
        if parts[j] > size:
            overflow += parts[j] - size
            parts[j] = size
    while overflow > 0:
        for j, size in enumerate(sizes):
            if size > parts[j]:
                parts[j] += 1
                overflow -= 1
                if overflow == 0:
                    break
    return parts


def test_budget_split_follows_the_reference_order():
    w = np.array([5.4, 3.3, 3.3]) / 12
    assert budget_split(12, w, np.array([10, 10, 2])).tolist() == [7, 3, 2]  # clipping first would give [6, 4, 2]
    rng = np.random.default_rng(11)
    for _ in range(300):
        m = int(rng.integers(1, 7))
        weights = taylor_softmax(rng.uniform(0, 4, size=m))
        sizes = rng.integers(1, 30, size=m)
        total = int(rng.integers(1, sizes.sum() + 1))
        got = budget_split(total, weights, sizes)
        assert got.tolist() == reference_budget_split(total, weights.tolist(), sizes.tolist()), (total, weights, sizes)
        assert got.sum() == total and (got <= sizes).all()


def test_smart_split_and_weights():
    g = np.array([5.0, 2.0, 1.0])
    w = taylor_softmax(g)
    assert np.allclose(w, (1 + g + g ** 2 / 2) / (1 + g + g ** 2 / 2).sum())
    b = budget_split(100, w, np.array([1000, 1000, 1000]))
    assert b.sum() == 100 and b[0] >= b[1] >= b[2]
    floors = np.floor(100 * w).astype(int)
    rest = 100 - floors.sum()  # handed out +1 from the highest-gain task down
    assert (b - floors).tolist() == [1] * rest + [0] * (3 - rest)
    capped = budget_split(100, w, np.array([10, 1000, 1000]))
    assert capped.sum() == 100 and capped[0] == 10
    assert budget_split(100, w, np.array([5, 5, 5])).sum() == 15  # fewer rows than the budget: all of them


def test_smart_step_on_task_labels():
    rng = np.random.default_rng(7)
    centres = unit(rng, 5, 16)
    X = np.concatenate([c + 0.1 * rng.normal(size=(40, 16)) for c in centres]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    tasks = [f"t{i // 40}" for i in range(200)]
    pool = Pool(rows=np.arange(200), ids=[str(i) for i in range(200)], scores={}, orientation={}, embeddings=X, n_input=200,
                tasks=tasks, sources=["s"] * 200)
    res = selector_class("smart")("smart", {"budget": 30, "num_tasks": 3}).select(pool)
    assert res.keep.sum() == 30 and sum(res.stats["task_budgets"]) == 30 and len(res.stats["tasks"]) == 3
    chosen = {tasks[i] for i in np.flatnonzero(res.keep)}
    assert chosen == set(res.stats["tasks"])
    assert {res.reason[i] for i in np.flatnonzero(~res.keep)} <= {"low_gain", "task_not_chosen"}
    assert res.stats["task_optimizer"] == "lazy-heap" and res.stats["instance_optimizer"] == ["lazy-batched"]


def test_smart_lambda_defaults_per_objective():
    """B4: λ = 0.4 for graph cut, λ = 1 for log-determinant. On unit task vectors the first log-det
    gain is log(K_kk + λ) = log 2; the first graph-cut gain is Σ_i K_ik − 0.4."""
    rng = np.random.default_rng(9)
    X = unit(rng, 60, 8)
    tasks = [f"t{i % 6}" for i in range(60)]
    pool = Pool(rows=np.arange(60), ids=[str(i) for i in range(60)], scores={}, orientation={}, embeddings=X, n_input=60,
                tasks=tasks, sources=["s"] * 60)
    logdet = selector_class("smart")("smart", {"budget": 10, "num_tasks": 3, "task_objective": "log_determinant"}).select(pool)
    assert logdet.stats["task_gains"][0] == pytest.approx(math.log(2), abs=1e-4)
    explicit = selector_class("smart")("smart", {"budget": 10, "num_tasks": 3, "task_objective": "log_determinant", "task_lambda": 0.4})
    explicit = explicit.select(pool)
    assert explicit.stats["task_gains"][0] == pytest.approx(math.log(1.4), abs=1e-4)
    gc = selector_class("smart")("smart", {"budget": 10, "num_tasks": 3}).select(pool)
    T = np.stack([X[np.array(tasks) == t].mean(axis=0) for t in sorted(set(tasks))])
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    assert gc.stats["task_gains"][0] == pytest.approx(float((T @ T.T).sum(axis=0).max() - 0.4), abs=1e-4)


def test_submodular_steps_with_query_and_private_sets():
    rng = np.random.default_rng(8)
    X = unit(rng, 80, 8)
    sources = ["pool"] * 60 + ["target"] * 20
    pool = Pool(rows=np.arange(80), ids=[str(i) for i in range(80)], scores={}, orientation={}, embeddings=X, n_input=80, sources=sources)
    for method, extra in (("facility_location", {}), ("graph_cut", {"lambda": 0.2}), ("log_determinant", {}),
                          ("flmi", {"query_source": "target"}), ("flcg", {"private_source": "target"})):
        res = selector_class(method)(method, {"budget": 10, **extra}).select(pool)
        assert res.keep.sum() == 10, method
        assert res.stats["optimizer_variant"] == ("lazy-heap" if method == "graph_cut" else "lazy-batched"), method  # signed cosine
        if "source" in str(extra):
            assert not res.keep[60:].any() and {res.reason[i] for i in range(60, 80)} <= {"query_set", "private_set"}
        assert np.isfinite(res.columns["gain"][res.keep]).all() and res.stats["evaluations"] > 0


def test_delift_utility_sign_on_a_constructed_pair():
    from curate.lm import LMParams, load_backend
    from curate.select.delift import Delift, distance

    assert distance(np.zeros(4)) == 0.0 and distance(np.log(np.full(4, 0.5))) == pytest.approx(0.5)
    texts = [("What is the code word for the vault?", "The code word is zebra kettle forty three."),
             ("What is the code word for the vault?", "The code word is zebra kettle forty three."),
             ("Write a haiku about autumn leaves.", "Red leaves drift and fall / quiet wind carries them home / the branches stand bare")]
    step = Delift("delift", {"budget": 1})
    u = step.utilities(texts, np.array([0]), [np.array([1, 2])], load_backend(LMParams(), torch_threads=2))
    raw, forwards = u.raw, u.forwards
    assert forwards == 3  # one baseline + one per example
    assert raw[(0, 1)] > 0.1  # an unguessable answer, shown in context, becomes near-certain
    assert raw[(0, 1)] > raw[(0, 2)] + 0.1  # an unrelated example cannot help with it


PRESET_FLOWS = {
    "superfiltering-10pct": dict(score=[{"method": "superfiltering"}]),
    "deita-6k": dict(score=[{"method": "deita"}], embed={"model": "all-MiniLM-L6-v2"}),
    "kcenter": dict(embed={"model": "all-MiniLM-L6-v2"}),
    "smart-mixture": dict(embed={"model": "all-MiniLM-L6-v2", "text": "prompt"}),
    "delift-instruction": dict(embed={"model": "all-MiniLM-L6-v2"}),
}


@pytest.mark.parametrize("preset", sorted(PRESET_FLOWS))
def test_presets_run_end_to_end_through_curate_run(preset, tmp_path, shared_store):
    from typer.testing import CliRunner

    from conftest import ROOT, write_flow
    from curate.cli import app

    inputs = [{"path": "data/sample/t0_40_tasks.parquet", "task_field": "task"}] if preset == "smart-mixture" else \
        [{"path": "data/sample/cherry_alpaca.jsonl", "limit": 10}, {"path": "data/sample/code_alpaca.csv", "limit": 6}]
    if preset == "delift-instruction":  # every pair is measured (n + n² forwards): a small pool of short rows
        inputs = [{"path": "data/sample/code_alpaca.csv", "limit": 6}]
    flow = write_flow(tmp_path, name="preset", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(shared_store),
                      inputs=inputs, select=preset, export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                      **PRESET_FLOWS[preset])
    r = CliRunner().invoke(app, ["run", str(flow), "--no-prefect", "--quiet"])
    assert r.exit_code == 0, r.output
    import json

    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert summary["reconciled"] and summary["counts"]["selected"] > 0
    assert [s["method"] for s in summary["steps"]][-1] == {"superfiltering-10pct": "top_k", "deita-6k": "repr_filter", "kcenter": "kcenter",
                                                           "smart-mixture": "smart", "delift-instruction": "delift"}[preset]
