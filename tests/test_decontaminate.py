"""The decontaminate step on the first 40 AlpacaEval prompts (data/eval/alpaca_eval_40.json) with the
real MiniLM embedder: a copied eval prompt (n-gram reason), a paraphrase with no shared 8-gram but a
high cosine (embedding reason), an unrelated row kept, the eval vectors cached in the store, and a
real in-process run whose ledger reconciles."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.config import EmbedSpec, load_flow
from curate.embed import build_embedder
from curate.pipeline import execute
from curate.records import message, sample_id
from curate.select import Pool, selector_class
from curate.select.decontaminate import EvalNgrams, words
from conftest import ROOT, write_flow

EVAL = ROOT / "data" / "eval" / "alpaca_eval_40.json"
EVAL_PROMPTS = [r["instruction"] for r in json.loads(EVAL.read_text())]
COPIED = EVAL_PROMPTS[0]  # "What are the names of some famous actors that started their careers on Broadway?"
PARAPHRASE = "Which well-known actors began their careers on Broadway stages?"
UNRELATED = "Write a Python function that reverses a singly linked list in place."
PROMPTS = [COPIED, PARAPHRASE, UNRELATED]
RESPONSES = ["Hugh Jackman and Idina Menzel, among others.", "Many, for example Lin-Manuel Miranda.", "def rev(head): ..."]
SPEC = EmbedSpec(text="prompt")
PARAMS = {"eval_set": {"path": str(EVAL)}, "max_similarity": 0.85}  # n-gram default 0.5, n = 8


@pytest.fixture(scope="module")
def embedder():
    return build_embedder(SPEC, torch_threads=2)


def pool_of(prompts, responses, vectors) -> Pool:
    pairs = list(zip(prompts, responses))
    ids = [sample_id([message("user", p), message("assistant", r)], None) for p, r in pairs]
    return Pool(rows=np.arange(len(pairs), dtype=np.int64), ids=ids, scores={}, orientation={}, embeddings=vectors,
                n_input=len(pairs), text_loader=lambda positions: [pairs[i] for i in positions])


def run_step(embedder, store, **params):
    step = selector_class("decontaminate")({**PARAMS, **params}, base_dir=str(ROOT),
                                           context={"embed": SPEC, "embed_key": embedder.key, "store_dir": str(store), "torch_threads": 2})
    return step.select(pool_of(PROMPTS, RESPONSES, embedder.embed(PROMPTS)))


def test_words_and_ngram_overlap():
    assert words("Don't PANIC: it's 4.2 km!") == ["don", "t", "panic", "it", "s", "4", "2", "km"]
    g = EvalNgrams(EVAL_PROMPTS, 8)
    assert g.overlap(COPIED) == (1.0, 7, 7, 0)  # 14 words -> 7 distinct 8-grams, all in eval row 0
    # the copied question after 5 more words: 19 words, 12 8-grams, the 7 inside the question shared
    share, shared, total, best = g.overlap("Quick question for you today: " + COPIED)
    assert (shared, total, best) == (7, 12, 0) and share == pytest.approx(7 / 12)
    assert g.overlap(PARAPHRASE)[:2] == (0.0, 0) and g.overlap("too short")[2] == 0


def test_copy_paraphrase_and_unrelated(embedder, tmp_path):
    res = run_step(embedder, tmp_path / "store")
    assert res.keep.tolist() == [False, False, True] and res.outcome == "filtered"
    assert res.reason == ["eval_ngram_overlap", "eval_embedding_similarity", None]
    assert res.detail[0].startswith("8-gram overlap 1 (7/7 of the prompt's 8-grams) >= 0.5")
    assert "eval row 0 of alpaca_eval_40" in res.detail[0] and "What are the names of some famous actors" in res.detail[0]
    # the paraphrase shares no 8-gram; its cosine to eval row 0 decides
    E = embedder.embed(EVAL_PROMPTS)
    cos = embedder.embed([PARAPHRASE])[0] @ E.T
    assert int(cos.argmax()) == 0 and 0.85 <= cos.max() < 0.95
    assert res.columns["ngram_overlap"][1] == 0.0
    assert res.columns["eval_similarity"][1] == pytest.approx(float(cos.max()), abs=1e-5)
    measured = float(re.match(r"cosine similarity ([0-9.]+) ", res.detail[1]).group(1))
    assert measured == pytest.approx(float(cos.max()), abs=1e-5)
    assert ">= 0.85 to eval row 0 of alpaca_eval_40" in res.detail[1]
    assert res.columns["eval_similarity"][2] < 0.5 and res.columns["ngram_overlap"][2] == 0.0 and res.detail[2] is None
    s = res.stats
    assert (s["checked"], s["kept"], s["filtered_eval_ngram_overlap"], s["filtered_eval_embedding_similarity"]) == (3, 1, 1, 1)
    assert (s["eval_rows"], s["eval_rows_invalid"], s["max_ngram_overlap"], s["max_similarity"], s["ngram"]) == (40, 0, 0.5, 0.85, 8)
    assert len(s["eval_sha256"]) == 64 and s["eval_embedded_now"] == 40
    # default thresholds: the paraphrase (cosine < 0.95) stays; the n-gram check alone: the copy still goes
    assert run_step(embedder, tmp_path / "store", max_similarity=0.95).keep.tolist() == [False, True, True]
    only_ngram = run_step(embedder, tmp_path / "store", max_similarity=None)
    assert only_ngram.keep.tolist() == [False, True, True] and np.isnan(only_ngram.columns["eval_similarity"]).all()


def test_eval_vectors_are_stored_once(embedder, tmp_path):
    first = run_step(embedder, tmp_path / "store")
    again = run_step(embedder, tmp_path / "store")
    assert first.stats["eval_embedded_now"] == 40 and again.stats["eval_embedded_now"] == 0
    assert np.array_equal(first.columns["eval_similarity"], again.columns["eval_similarity"])
    assert first.stats["eval_sha256"] == again.stats["eval_sha256"]


def test_flow_run_ledger_reconciles(tmp_path, shared_store):
    rows = [{"instruction": p, "input": "", "output": r} for p, r in zip(PROMPTS, RESPONSES)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.json").write_text(EVAL.read_text())
    flow = write_flow(tmp_path, name="decon", inputs=[{"path": "mine.jsonl"}, {"path": str(ROOT / "data/sample/alpaca_gpt4_en.json"), "limit": 20}],
                      embed={"model": "all-MiniLM-L6-v2", "text": "prompt"}, score=[],
                      select=[{"method": "decontaminate", "eval_set": {"path": "eval.json", "name": "alpacaeval"}, "max_similarity": 0.85}])
    spec = load_flow(flow)
    summary = execute(spec)
    assert summary["n_input"] == 23 and summary["reconciled"]
    ledger = pq.read_table(spec.out / "ledger.parquet").to_pylist()
    assert [r["row"] for r in ledger] == list(range(23))
    by_row = {r["row"]: r for r in ledger}
    assert (by_row[0]["outcome"], by_row[0]["reason"], by_row[0]["stage"]) == ("filtered", "eval_ngram_overlap", "select:0:decontaminate")
    assert "eval row 0 of alpacaeval" in by_row[0]["detail"]
    assert (by_row[1]["outcome"], by_row[1]["reason"]) == ("filtered", "eval_embedding_similarity")
    assert by_row[2]["outcome"] == "selected"
    assert summary["counts"]["filtered"] == sum(r["outcome"] == "filtered" for r in ledger)
    assert summary["counts"]["selected"] + summary["counts"]["filtered"] == 23
    scores = pq.read_table(spec.out / "select" / "scores.parquet").to_pylist()
    assert scores[1]["decontaminate.eval_similarity"] >= 0.85 and scores[1]["decontaminate.ngram_overlap"] == 0.0
