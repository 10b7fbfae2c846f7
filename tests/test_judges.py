"""Judge scorers (methods.md A4–A7, B6): golden values of every formula on fixed numbers, DS2
curation on synthetic ratings with a known noise matrix, and the real SmolLM2 end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.config import IngestSpec, InputSpec, load_flow
from curate.pipeline import execute
from curate.prompts import DEITA_COMPLEXITY, DEITA_QUALITY
from curate.scorers import ScorerContext, scorer_class
from curate.scorers.deita import expected_score
from curate.scorers.ds2 import compress, parse_ds2
from curate.scorers.judge import parse_rating
from curate.scorers.selectit import REFERENCE_WEIGHTS, model_weights, sentence_level, token_level
from curate.select import Pool, selector_class
from curate.select.ds2 import consensus, fit_transition, long_tail, simifeat
from curate.stages.ingest import read_input
from conftest import ROOT, write_flow

CTX = ScorerContext(torch_threads=2)


# -- formulas on fixed numbers ------------------------------------------------------------------

def test_deita_expectation_and_trained_strings():
    assert expected_score(np.zeros(6)) == pytest.approx(3.5)
    z = np.array([2.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    w = np.exp(z) / np.exp(z).sum()
    assert expected_score(z) == pytest.approx(float((w * np.arange(1, 7)).sum()), rel=1e-12)
    assert expected_score(z + 100) == pytest.approx(expected_score(z))  # logits or log-probs: same value
    # the trained format, byte for byte (hkust-nlp/deita llama_scorer.py, Apache-2.0)
    q = DEITA_QUALITY.text.format(instruction="word to describe UI with helpful tooltips", output="User-friendly or intuitive UI")
    assert q == ("You are a helpful assistant. Please identify the quality score of the Response corresponding to the Question. \n"
                 " #Question#:\nword to describe UI with helpful tooltips\n#Response#:\nUser-friendly or intuitive UI \n##Quality: ")
    c = DEITA_COMPLEXITY.text.format(instruction="Say hi.")
    assert c.endswith("\n##Query: Say hi.  \n##Complexity: ")


def test_selectit_levels_both_formulas():
    one_hot = np.array([0.0, 0.0, 0.0, 0.8, 0.0])  # full-vocab probabilities; renormalised first
    assert token_level(one_hot, "paper") == (4.0, 1.0, 4.0)
    base, u, s = token_level(one_hot, "reference")  # double softmax flattens: q_max = e / (e + 4)
    q_max = math.e / (math.e + 4)
    assert base == 4.0 and u == pytest.approx((5 * q_max - 1) / 4) and s == pytest.approx(4 * (5 * q_max - 1) / 4)
    assert token_level(np.array([0, 0, 0, 0, 1.0]), "reference")[2] == pytest.approx(1.2789, abs=1e-4)  # S_token max
    uniform = np.full(5, 0.1)
    assert token_level(uniform, "paper") == (1.0, 0.0, 0.0)  # ties: the first maximum
    assert sentence_level([4.0, 4.0, 4.0], 0.2) == 4.0
    assert sentence_level([2.0, 4.0], 0.2) == pytest.approx(3.0 / (1 + 0.2 * 1.0))  # population std = 1
    assert model_weights([7, 13, 70], "paper") == pytest.approx([7 / 90, 13 / 90, 70 / 90])
    assert model_weights([7, 13, 70], "reference") == list(REFERENCE_WEIGHTS) and sum(REFERENCE_WEIGHTS) == pytest.approx(1.7778, abs=1e-4)
    with pytest.raises(ValueError, match="exactly three"):
        model_weights([1, 2], "reference")


def test_ds2_compress_and_parse():
    assert [compress(v) for v in range(1, 11)] == [0, 0, 0, 0, 1, 2, 3, 4, 5, 5]
    text = 'Sure. {"Rarity": 2} and then {"Rarity": 7, "Complexity": 8, "Informativeness": 6, "Overall rating": 9} done'
    assert parse_ds2(text) == {"Rarity": 7, "Complexity": 8, "Informativeness": 6, "Overall rating": 9}  # the last object
    assert parse_ds2('{"Rarity": "high", "Complexity": 8, "Informativeness": 6, "Overall rating": 9}') is None
    assert parse_ds2('{"Rarity": 7, "Complexity": 8, "Informativeness": 6}') is None
    assert parse_ds2("no json at all") is None


def test_judge_parsing_strict_then_tolerant():
    assert parse_rating("4.5\nThe response is accurate.", "first_line", 0, 5) == (4.5, "first_line")
    assert parse_rating("Score: 3 because ...", "first_line", 0, 5) == (3.0, "fallback:score")
    assert parse_rating("I rate it 4 out of 5", "first_line", 0, 5) == (4.0, "fallback:first_number")
    assert parse_rating("Score: 10 out of 10", "first_line", 0, 5) == (None, "failed")  # never clipped into range
    assert parse_rating('{"score": 8, "reason": "ok"}', "json", 1, 10) == (8.0, "json")
    assert parse_rating("", "json", 1, 10) == (None, "empty")


# -- DS2 curation -------------------------------------------------------------------------------

def synthetic(n_per=350, seed=0, noise=0.25):
    """Six well-separated clusters (true classes) with ratings flipped to a neighbouring class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 32))
    X = np.concatenate([c + 0.15 * rng.normal(size=(n_per, 32)) for c in centres]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    clean = np.repeat(np.arange(6), n_per)
    T = np.zeros((6, 6))
    for a in range(6):
        T[a, a] = 1 - noise
        nbrs = [b for b in (a - 1, a + 1) if 0 <= b < 6]
        for b in nbrs:
            T[a, b] = noise / len(nbrs)
    y = np.array([rng.choice(6, p=T[c]) for c in clean])
    return X, clean, y, T


def test_ds2_recovers_the_noise_matrix_and_corrects_ratings():
    X, clean, y, T = synthetic()
    c1, c2, c3 = consensus(X, y, rounds=20, rng=np.random.default_rng(1))
    T_hat, p_hat = fit_transition(c1, c2, c3, steps=1501, seed=0)
    assert np.abs(T_hat - T).max() < 0.08 and np.abs(p_hat - 1 / 6).max() < 0.05
    cur = simifeat(X, y, T_hat, p_hat, epochs=21, k=10, rng=np.random.default_rng(2))
    before = (y == clean).mean()
    after = (cur.curated == clean).mean()
    assert before < 0.8 and after > before + 0.1  # confidently mis-rated rows are corrected
    assert cur.flagged.sum() > 0 and (cur.confidence[~cur.flagged] == 0).all()


def test_ds2_selection_order_and_long_tail():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(12, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    lt = long_tail(X, k=3)
    assert ((0 <= lt) & (lt <= math.tanh(1))).all()
    classes = np.array([5, 4, 4, 3, 5, 4, 0, 2, 4, np.nan, 1, 4], dtype=float)
    pool = Pool(rows=np.arange(12), ids=[f"r{i}" for i in range(12)], scores={"ds2.class": classes}, orientation={},
                embeddings=X, n_input=12)
    res = selector_class("ds2")({"budget": 5, "curate": False, "k": 3}).select(pool)
    chosen = np.flatnonzero(res.keep)
    fours = [1, 2, 5, 8, 11]
    best_fours = sorted(fours, key=lambda i: (-lt[i], i))[:3]
    assert set(chosen) == {0, 4, *best_fours}  # both 5s, then the rarest 4s
    order = np.argsort(res.rank[res.keep])
    assert list(chosen[order][:2]) == sorted([0, 4], key=lambda i: -lt[i]) and list(chosen[order][2:]) == best_fours
    assert res.reason[9] == "unscored" and res.stats["cutoff_class"] == 4
    assert np.allclose(res.columns["long_tail"], lt)


# -- the real SmolLM2 -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    ref = read_input(InputSpec(path="data/sample/cherry_alpaca.jsonl", limit=4), 0, str(ROOT), str(tmp_path_factory.mktemp("j")), IngestSpec())
    return pq.read_table(ref.records_path).to_pylist()


def test_real_rating_scorers_end_to_end(rows, mt_rows):
    deita = scorer_class("deita")("deita", {}, CTX)
    out = deita.score_records(rows + mt_rows)
    for o in out:
        c = o.components
        assert o.status == "ok" and all(1 <= v <= 6 for v in c["complexity_per_turn"] + c["quality_per_turn"])
        assert o.values["evol"] == pytest.approx(sum(a * b for a, b in zip(c["complexity_per_turn"], c["quality_per_turn"])))
        assert all(len(r["quality_logits"]) == 6 for r in c["raw"])
    assert len(out[-1].components["quality_per_turn"]) == 2  # each turn alone, as the reference
    fp = deita.fingerprint()
    assert [p["id"] for p in fp["prompts"]] == ["deita_complexity_chat", "deita_quality_chat"]
    sel = scorer_class("selectit")("selectit", {"n_prompts": 3}, CTX).score_records(rows)
    for o in sel:
        m = o.components["models"][0]
        assert o.status == "ok" and 0 <= o.values["selectit"] <= 5 and len(m["p"]) == 3 and len(m["p"][0]) == 5
        assert all(0 < sum(p) <= 1 for p in m["p"])  # full-vocabulary probabilities of the five digits
    trained = scorer_class("deita")("deita", {"format": "trained"}, CTX)
    assert [p["id"] for p in trained.fingerprint()["prompts"]] == ["deita_complexity_trained", "deita_quality_trained"]
    assert 1 <= trained.score_records(rows[:1])[0].values["quality"] <= 6
    with pytest.raises(ValueError, match="not one token"):  # SmolLM2 splits "10" into two digit tokens
        trained.digit_ids(DEITA_QUALITY, ["9", "10"], chat=False)


@pytest.fixture(scope="module")
def mt_rows(tmp_path_factory):
    from conftest import FIXTURES

    ref = read_input(InputSpec(path=str(FIXTURES / "mt_bench_two_turn.jsonl"), limit=1), 0, str(ROOT), str(tmp_path_factory.mktemp("m")), IngestSpec())
    return pq.read_table(ref.records_path).to_pylist()


def test_generative_judges_store_raw_text(rows):
    judge = scorer_class("llm_rating")("llm_rating", {"answer_prefix": "Score:", "max_tokens": 8}, CTX)
    out = judge.score_records(rows)
    assert all(o.raw_output and o.raw_output.startswith("Score:") for o in out)
    assert all((o.status == "ok" and 0 <= o.values["rating"] <= 5) or (o.status == "parse_failed" and math.isnan(o.values["rating"])) for o in out)
    assert any(o.status == "ok" for o in out)
    ds2 = scorer_class("ds2")("ds2", {"answer_prefix": '{"Rarity": ', "max_tokens": 40, "max_attempts": 2}, CTX)
    a = ds2.score_records(rows)
    b = scorer_class("ds2")("ds2", {"answer_prefix": '{"Rarity": ', "max_tokens": 40, "max_attempts": 2}, CTX).score_records(rows[::-1])[::-1]
    assert [x.raw_output for x in a] == [x.raw_output for x in b]  # per-sample seeds: order does not matter
    for o in a:
        if o.status == "ok":
            r = o.components["ratings"]
            assert o.values["class"] == compress(r["Overall rating"]) and parse_ds2(o.raw_output.split("\n---\n")[-1]) == r


def test_unparseable_judge_answer_quarantines_only_its_row(tmp_path):
    from lm_server import LocalCompletionsServer

    from curate.lm import LMParams, load_backend

    backend = load_backend(LMParams(), torch_threads=2)
    rows = [{"instruction": f"Name the capital of country number {i}.", "output": f"The capital is city {i}."} for i in range(5)]
    rows[2]["instruction"] += " MARK-UNPARSEABLE"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with LocalCompletionsServer(backend.model, tokenizer=backend.tokenizer, canned={"MARK-UNPARSEABLE": "I would rather not say."}) as server:
        flow = write_flow(tmp_path, name="judge", inputs=[{"path": "rows.jsonl"}],
                          score=[{"method": "llm_rating", "backend": "openai", "base_url": server.base_url, "served_name": "local-smollm2",
                                  "answer_prefix": "Score:", "max_tokens": 6}],
                          export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                          runtime={"prefect": False, "max_error_rate": 1.0})
        summary = execute(load_flow(flow))
    ledger = pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()
    wide = pq.read_table(tmp_path / "out" / "select" / "scores.parquet").to_pydict()
    status = dict(zip(wide["row"], wide["llm_rating.status"]))
    assert status[2] == "parse_failed"
    bad = {r["row"]: r for r in ledger if r["outcome"] == "quarantined"}
    assert 2 in bad and bad[2]["stage"] == "score:llm_rating" and bad[2]["reason"] == "ParseError"
    assert set(bad) == {r for r, s in status.items() if s == "parse_failed"}  # only unparseable rows, each its own
    assert summary["counts"]["selected"] == sum(s == "ok" for s in status.values())


def test_ds2_flow_end_to_end(tmp_path, shared_store):
    flow = write_flow(tmp_path, name="ds2", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(shared_store),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 24}],
                      score=[{"method": "ds2", "answer_prefix": '{"Rarity": ', "max_tokens": 40, "max_attempts": 1, "temperature": 0.0}],
                      embed={"model": "all-MiniLM-L6-v2"},
                      select=[{"method": "ds2", "budget": 8, "k": 3, "hoc_rounds": 5, "hoc_steps": 200, "epochs": 5}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                      runtime={"prefect": False, "max_error_rate": 1.0})
    summary = execute(load_flow(flow))
    assert summary["reconciled"]
    wide = pq.read_table(tmp_path / "out" / "select" / "scores.parquet").to_pydict()
    ok = [i for i, s in enumerate(wide["ds2.status"]) if s == "ok"]
    assert summary["counts"]["selected"] == min(8, len(ok))
    for i in ok:
        assert 0 <= wide["ds2.class_curated"][i] <= 5 and 0 <= wide["ds2.long_tail"][i] <= math.tanh(1)
    step = summary["steps"][0]
    assert step["method"] == "ds2" and len(step["classes_before"]) == 6


def test_collapse_detectors():
    import pyarrow as pa

    from curate.stages.score import collapse_warnings

    def table(variant, values):
        return pa.table({"sample_id": [f"s{i}" for i in range(len(values))], "variant": [variant] * len(values), "score": values})

    deita = scorer_class("deita")("deita", {}, CTX)
    w = collapse_warnings(deita, "deita", 0, table("quality", [3.0] * 30 + [2.0] * 5))
    assert w == ["shard 0: deita.quality = 3 for 86% of 35 rows (collapsed?)"]
    w = collapse_warnings(deita, "deita", 1, table("quality", list(3.0 + np.linspace(0, 0.02, 30))))
    assert len(w) == 1 and "spread (std 0.0060) is below 0.05" in w[0]
    assert collapse_warnings(deita, "deita", 0, table("quality", list(np.linspace(1, 6, 40)))) == []
    ifd = scorer_class("ifd")("ifd", {}, CTX)
    w = collapse_warnings(ifd, "ifd", 3, table("ifd", list(np.linspace(0.9, 1.4, 40))))
    assert w == ["shard 3: 80% of ifd.ifd are ≥ 1 — does the model know this template?"]
    assert collapse_warnings(ifd, "ifd", 0, table("ifd", [1.2] * 10)) == []  # too few rows to judge
    heuristic = scorer_class("heuristic")("heuristic", {}, CTX)
    assert collapse_warnings(heuristic, "heuristic", 0, table("turns", [1.0] * 40)) == []  # statistics, not judgments
