"""Selection steps: budgets, tie-breaks (methods.md E2), NaN handling, k-center (B2)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from curate.select import Pool, SelectContext, selector_class
from curate.select.kcenter import kcenter_greedy


def pool(values=None, emb=None, n=None, seed=0):
    n = n if n is not None else (len(values) if values is not None else len(emb))
    scores = {"s.v": np.asarray(values, float)} if values is not None else {}
    return Pool(rows=np.arange(n, dtype=np.int64) * 10, ids=[f"id{i}" for i in range(n)], scores=scores,
                orientation={"s.v": "higher_is_better"}, embeddings=emb, n_input=n, seed=seed)


def run(method, p, **params):
    return selector_class(method)(method, params).select(p)


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
    at = SelectContext(base_dir=str(tmp_path))
    r = selector_class("kcenter")("kcenter", {"budget": 6, "already_selected": "before.txt"}, at).select(p)
    assert r.keep.sum() == 6 and not r.keep[4] and not r.keep[9]
    assert r.reason[4] == r.reason[9] == "already_selected"
    assert r.stats["n_already_selected"] == 2 and r.stats["init"] == "already_selected"
    expect = kcenter_greedy(X, 6, already_selected=np.array([4, 9]))
    assert np.flatnonzero(r.keep).tolist() == sorted(expect.order.tolist())
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        selector_class("kcenter")("kcenter", {"budget": 2, "already_selected": "missing.txt"}, at).select(p)


def test_fractional_budget_input_base_counts_every_input_row(tmp_path):
    """methods.md B0: ``rate_base: input`` is a fraction of all input rows, quarantined ones included."""
    import json

    import pyarrow.parquet as pq

    from conftest import write_flow
    from curate.config import load_flow
    from curate.pipeline import execute

    rows = [{"instruction": f"Describe the number {i} in words.", "output": "It is the number " + "and so on " * i + f"{i}."}
            for i in range(1, 7)]
    rows += [{"instruction": f"A row with no answer {i}"} for i in range(4)]  # quarantined at ingest: missing output
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    select = [{"method": "top_k", "score": "heuristic.response_tokens", "budget": 0.5}]
    flow = write_flow(tmp_path, name="base", inputs=[{"path": "rows.jsonl"}], score=[{"method": "heuristic"}], select=select,
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    summary = execute(load_flow(flow))
    assert summary["counts"]["quarantined"] == 4
    assert summary["counts"]["selected"] == 5  # floor(0.5 × 10 input rows), not floor(0.5 × 6 rows that reached selection)
    ledger = pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()
    assert sorted(r["row"] for r in ledger if r["outcome"] == "selected") == [1, 2, 3, 4, 5]  # the five longest answers
    pool_base = execute(load_flow(flow, ["select.0.rate_base=pool", f"output_dir={tmp_path / 'pool'}"]))
    assert pool_base["counts"]["selected"] == 3  # floor(0.5 × 6): the step's own rows


# -- DS2 (methods.md A5 step 2, B6): the corrected default and match_reference ----------------------

def ds2_pool(n_per=20, seed=5):
    """Six clusters of unit vectors with noisy ratings (a quarter moved to another class)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 16))
    X = np.concatenate([c + 0.3 * rng.normal(size=(n_per, 16)) for c in centres]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.repeat(np.arange(6), n_per).astype(float)
    flip = rng.random(len(y)) < 0.25
    y[flip] = rng.integers(0, 6, flip.sum())
    n = len(y)
    return Pool(rows=np.arange(n), ids=[f"r{i}" for i in range(n)], scores={"ds2.class": y}, orientation={}, embeddings=X, n_input=n)


DS2_FAST = {"budget": 30, "k": 10, "hoc_rounds": 5, "hoc_steps": 200, "epochs": 5}


def test_ds2_default_uses_the_pool_once_in_fp32():
    from curate.select.ds2 import knn

    p = ds2_pool()
    res = selector_class("ds2")("ds2", DS2_FAST).select(p)
    assert res.stats["working_rows"] == len(p) and res.keep.sum() == 30 and not res.stats["match_reference"]
    d, _ = knn(p.embeddings, 10)
    assert np.allclose(res.columns["long_tail"], np.tanh(d.mean(axis=1) / 2))  # the k nearest *other* rows, not rounded
    assert not np.allclose(res.columns["long_tail"] * 1e4, np.round(res.columns["long_tail"] * 1e4))


def test_ds2_match_reference_duplicates_the_pool_fp16_and_rounds():
    from curate.select.ds2 import knn

    p = ds2_pool()
    X = p.embeddings
    default = selector_class("ds2")("ds2", DS2_FAST).select(p)
    ref = selector_class("ds2")("ds2", {**DS2_FAST, "match_reference": True}).select(p)
    assert ref.stats["working_rows"] == 2 * len(p) and ref.stats["match_reference"] and ref.keep.sum() == 30
    # a sampled row's copy is usually present and is its nearest neighbour, with the same label (A5)
    assert ref.stats["neighbour_agreement"] > 0.85 > default.stats["neighbour_agreement"] + 0.1
    lt = ref.columns["long_tail"]
    assert np.array_equal(lt, np.round(lt, 4))  # 4-decimal rounding
    d4, _ = knn(X, 4)  # A5's identity: x = 0.8 × mean distance to the 4 nearest distinct rows
    assert np.allclose(lt, np.round(np.tanh(0.8 * d4.mean(axis=1) / 2), 4), atol=2e-3)
    d16, i16 = knn(X, 10, fp16=True)
    assert np.array_equal(d16, d16.astype(np.float16).astype(d16.dtype))  # distances are fp16 values
    d32, _ = knn(X, 10)
    assert np.abs(d16 - d32).max() < 2e-3 and not np.array_equal(d16, d32)
    assert (i16 != np.arange(len(X))[:, None]).all()  # self excluded in fp16 too


# -- DELIFT (methods.md B5): unmeasurable targets, unknown entries, dense by default ------------------

DELIFT_TEXTS = [
    ("What is the code word for the vault?", "The code word is zebra kettle forty three."),
    ("Tell me the vault's code word.", "The code word is zebra kettle forty three."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name the capital city of France.", "Paris is the capital city of France."),
    ("Write a haiku about autumn leaves.", "Red leaves drift and fall, quiet wind carries them home, the branches stand bare."),
    ("Add 17 and 25.", "17 plus 25 equals 42."),
    ("What is 30 plus 12?", "30 plus 12 equals 42."),
    ("Translate 'good morning' into Spanish.", "Good morning in Spanish is 'buenos días'."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs do insects have?", "Insects have six legs."),
]


def text_pool(texts, sources=None, seed=0):
    n = len(texts)
    emb = unit(np.random.default_rng(seed), n, 16)
    return Pool(rows=np.arange(n, dtype=np.int64), ids=[f"t{i}" for i in range(n)], scores={}, orientation={}, embeddings=emb,
                n_input=n, sources=sources, text_loader=lambda positions: [texts[i] for i in positions])


def test_delift_kernel_scales_each_kernel_alone_and_imputes_unknown_as_no_effect():
    from curate.select.delift import scaled_kernel

    raw = {(0, 0): 0.6, (0, 1): -0.2, (1, 1): 0.2, (0, 7): 0.1, (1, 7): 0.3}  # column 7 is a reference row
    U, info = scaled_kernel(raw, {0: 0, 1: 1}, {0: 0, 1: 1})
    assert info["range"] == [-0.2, 0.6] and info["measured"] == 3 and info["unknown"] == 1
    assert info["unknown_value"] == pytest.approx(0.25)  # u = 0 on the [-0.2, 0.6] scale, not the worst value 0
    np.testing.assert_allclose(U, [[1.0, 0.0], [0.25, 0.5]])
    R, r_info = scaled_kernel(raw, {0: 0, 1: 1}, {7: 0})  # its own range [0.1, 0.3], not U's
    np.testing.assert_allclose(R, [[0.0], [1.0]])
    assert r_info["range"] == [0.1, 0.3]
    assert r_info["unknown_value"] == 0.0  # u = 0 lies below every measured utility: clipped to the bottom
    M, m_info = scaled_kernel(raw, {0: 0, 1: 1}, {0: 0, 1: 1}, masked={(0, 0), (1, 1)})
    assert M[0, 0] == M[1, 1] == 0.0 and m_info["range"] == [-0.2, -0.2] and m_info["unknown"] == 1


def test_delift_is_dense_by_default_and_neighbors_above_the_forward_limit():
    texts = [DELIFT_TEXTS[i] for i in (0, 1, 5, 6)]  # two pairs of related rows
    p = text_pool(texts, ["train"] * 3 + ["bench"])
    flmi = selector_class("delift")("delift", {"budget": 2, "stage": "flmi", "query_source": "bench"}).select(p)
    s = flmi.stats
    assert s["pairs"] == "all" and s["forwards"] == 3 * (1 + 3 + 1) and s["unknown_entries"] == 0 and "n_neighbors" not in s
    assert s["utilities"] == 3 * 4 and s["reference_unknown_entries"] == 0
    assert s["utility_range"] != s["reference_utility_range"]  # two kernels, two scales
    assert flmi.keep.sum() == 2 and not flmi.keep[3] and flmi.reason[3] == "query_set"

    approx = selector_class("delift")("delift", {"budget": 2, "max_dense_forwards": 19, "n_neighbors": 2}).select(text_pool(texts))
    s = approx.stats  # dense would take 4 × 5 = 20 forwards > 19
    assert s["pairs"] == "neighbors" and s["n_neighbors"] == 2 and s["forwards"] == 4 + 4 * 2
    assert s["utilities"] == 8 and s["unknown_entries"] == 16 - 8
    lo, hi = s["utility_range"]
    assert s["unknown_value"] == pytest.approx(min(1.0, max(0.0, -lo / (hi - lo))))
    assert approx.keep.sum() == 2 and {approx.reason[i] for i in np.flatnonzero(~approx.keep)} == {"low_gain"}


def test_delift_unmeasurable_targets_get_a_status_and_leave_the_objective():
    from lm_server import LocalCompletionsServer

    from curate.lm import LMParams, load_backend

    texts = DELIFT_TEXTS[:3] + [("Describe the sea.", "The sea is wide and deep. " * 30)] + DELIFT_TEXTS[3:5]
    p = text_pool(texts)
    hf = load_backend(LMParams(), torch_threads=2)
    # the stand-in server answers 429 to the first request, and the backend may not retry: the first
    # baseline (row 0) fails; row 3's answer alone is longer than max_length
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, fail_first=1) as server:
        params = {"budget": len(texts), "max_length": 96, "backend": "openai", "base_url": server.base_url,
                  "served_name": "local-smollm2", "max_retries": 0, "concurrency": 1}
        res = selector_class("delift")("delift", params).select(p)
    assert res.reason[0] == "error" and "RequestError" in res.detail[0] and "HTTP 429" in res.detail[0]
    assert res.reason[3] == "skipped_too_long" and "over max_length 96" in res.detail[3]
    assert np.flatnonzero(res.keep).tolist() == [1, 2, 4, 5]  # the budget covers every row: only measurable ones
    s = res.stats
    assert s["represented"] == 4 and s["error"] == 1 and s["skipped_too_long"] == 1
    assert s["forwards"] == 5 + 4 * 4 and s["utilities"] == 16  # 5 baselines tried; pairs among the 4 measured rows only
