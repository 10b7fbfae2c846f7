"""The decontaminate step on the first 40 AlpacaEval prompts (data/eval/alpaca_eval_40.json) with the
real MiniLM embedder: a copied eval prompt (exact match), the copy behind a preamble (eval-side n-gram
overlap), a short eval prompt inside a longer row (normalised substring), a 13-word window of a long
eval prompt (the GPT-3 collision rule), a paraphrase with no shared 8-gram but a high prompt-to-prompt
cosine (embedding reason, prompt view by default), an unrelated row kept, the vectors cached in the
store, the vectorised n-gram maths against a brute force on real rows, and a real in-process run
whose ledger reconciles."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

import curate.select.decontaminate as decon
from curate.config import EmbedSpec, load_flow
from curate.embed import build_embedder
from curate.pipeline import execute
from curate.records import message, sample_id
from curate.select import Pool, SelectContext, selector_class
from curate.select.decontaminate import EvalNgrams, Tokens, normalise, short_prompt_matches, words
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
PREAMBLE = "Below is an instruction that describes a task, please answer it: "  # 11 words before the copy
# 13 words of eval row 9 (a 42-word Koala prompt; row 12 shares its first sentence, not these words), inside other text
WINDOW = ("My friend wrote: I am interested in trying some Georgian dishes, can you give me a recipe for dinner? "
          "What should I reply to her, and which wines of the region go with such food?")
TEXT_ONLY = {"max_similarity": None}


@pytest.fixture(scope="module")
def embedder():
    return build_embedder(SPEC, torch_threads=2)


def pool_of(prompts, responses, vectors) -> Pool:
    pairs = list(zip(prompts, responses))
    ids = [sample_id([message("user", p), message("assistant", r)], None) for p, r in pairs]
    return Pool(rows=np.arange(len(pairs), dtype=np.int64), ids=ids, scores={}, orientation={}, embeddings=vectors,
                n_input=len(pairs), text_loader=lambda positions: [pairs[i] for i in positions])


def run_step(embedder, store, **params):
    context = SelectContext(base_dir=str(ROOT), embed=SPEC, embed_key=embedder.key, store_dir=str(store), torch_threads=2)
    step = selector_class("decontaminate")("decontaminate", {**PARAMS, **params}, context)
    return step.select(pool_of(PROMPTS, RESPONSES, embedder.embed(PROMPTS)))


def text_step(prompts, **params):
    """The step with the embedding check off, on rows with these prompts (no embedder needed)."""
    step = selector_class("decontaminate")("decontaminate", {**PARAMS, **TEXT_ONLY, **params}, SelectContext(base_dir=str(ROOT)))
    return step.select(pool_of(prompts, ["An answer."] * len(prompts), None))


def test_words_and_eval_side_overlap():
    assert words("Don't PANIC: it's 4.2 km!") == ["don", "t", "panic", "it", "s", "4", "2", "km"]
    assert normalise(["  What is   ATLANTIS?!", ""]) == ["what is atlantis", ""]
    g = EvalNgrams(Tokens(EVAL_PROMPTS), 8)
    m = g.match(Tokens([COPIED, PREAMBLE + COPIED, PARAPHRASE, "too short"]))
    # scored from the eval side: the 7 distinct 8-grams of eval row 0's 14 words are all in the copy, preamble or not
    assert m["share"].tolist() == [1.0, 1.0, 0.0, 0.0] and m["eval"].tolist() == [0, 0, -1, -1]
    assert m["shared"].tolist() == [7, 7, 0, 0] and m["total"].tolist() == [7, 7, 0, 0]


def test_copy_behind_a_preamble_is_caught():
    # before: the share of the *row's* 8-grams, 7/18 behind this 11-word preamble, < 0.5: kept
    res = text_step([PREAMBLE + COPIED, UNRELATED])
    assert res.keep.tolist() == [False, True] and res.reason == ["eval_ngram_overlap", None]
    assert res.detail[0].startswith("8-gram overlap 1 (7/7 of the eval prompt's 8-grams in this row) >= 0.5 "
                                    "with eval row 0 of alpaca_eval_40")
    assert res.columns["ngram_overlap"].tolist() == [1.0, 0.0]


def test_exact_match_and_short_prompts():
    rows = ["WHAT   is atlantis", "Tell me in two lines: who is Larry Page? Mention Google.", "Who is Larry's page designer?",
            "What is Atlantis", "Describe Atlantis."]
    res = text_step(rows)
    assert res.reason == ["eval_exact_match", "eval_short_prompt_substring", None, "eval_exact_match", None]
    assert "normalised prompt equals eval row" in res.detail[0] and "('What is Atlantis?')" in res.detail[0]
    assert "contains the 4-word eval row" in res.detail[1] and "'Who is Larry Page?'" in res.detail[1]
    s = res.stats
    assert (s["filtered_eval_exact_match"], s["filtered_eval_short_prompt_substring"], s["eval_short_prompts"]) == (2, 1, 15)
    # each check turns off on its own
    assert text_step(rows, exact_match=False).reason[0] == "eval_short_prompt_substring"  # the whole row is the 3-word prompt
    assert text_step(rows, exact_match=False, short_prompts=False).keep.all()
    assert text_step(rows, min_short_words=5).reason[1] is None


def test_gpt3_collision_rule():
    default = text_step([WINDOW])
    assert default.keep.tolist() == [True] and 0 < default.columns["ngram_overlap"][0] < 0.5
    res = text_step([WINDOW, UNRELATED], collision_ngram=13)
    assert res.reason == ["eval_ngram_collision", None]
    assert res.detail[0].startswith("3 13-gram(s) shared with eval prompts (3 with eval row 9 of alpaca_eval_40")
    assert res.columns["ngram_collisions"].tolist() == [3.0, 0.0] and res.stats["filtered_eval_ngram_collision"] == 1


def brute_force(eval_prompts, rows, n, collision_n, min_short):
    """The checks' definitions written out with Python sets and strings, row by row."""

    def grams(text, k):
        w = words(text)
        return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)}

    eg = [grams(e, n) for e in eval_prompts]
    ec = [grams(e, collision_n) for e in eval_prompts]
    out = []
    for r in rows:
        rg, rc, padded = grams(r, n), grams(r, collision_n), " " + " ".join(words(r)) + " "
        shares = [len(g & rg) / len(g) if g else 0.0 for g in eg]
        best = max(range(len(eval_prompts)), key=lambda j: (shares[j], -j)) if any(shares) else -1
        short = [j for j, e in enumerate(eval_prompts) if min_short <= len(words(e)) < n and " " + " ".join(words(e)) + " " in padded]
        short_best = max(short, key=lambda j: (len(words(eval_prompts[j])), -j)) if short else -1
        out.append((max(shares), best, len(rc & set().union(*ec)), short_best))
    return out


def test_vectorised_checks_match_a_brute_force(monkeypatch):
    sample = json.loads((ROOT / "data/sample/alpaca_gpt4_en.json").read_text())
    rows = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in sample]
    made = [PREAMBLE + COPIED, WINDOW, EVAL_PROMPTS[9][:150], EVAL_PROMPTS[12] + " " + EVAL_PROMPTS[3],
            "Who is Larry Page? What is Atlantis?", ""]
    rows = rows[:60] + made
    ev, tok = Tokens(EVAL_PROMPTS), Tokens(rows)
    m, c = EvalNgrams(ev, 8).match(tok), EvalNgrams(ev, 13).match(tok)
    short = short_prompt_matches(ev, tok, 8, 3)
    expected = brute_force(EVAL_PROMPTS, rows, 8, 13, 3)
    got = list(zip(m["share"].tolist(), m["eval"].tolist(), c["collisions"].tolist(), short.tolist()))
    assert got == expected
    assert sum(e[0] > 0 for e in expected) >= 4 and sum(e[3] >= 0 for e in expected) == 1 and sum(e[2] > 0 for e in expected) >= 3
    # the step tokenises the pool in chunks: the same answer with a chunk of 7 rows
    whole = text_step(rows, collision_ngram=13)
    monkeypatch.setattr(decon, "CHUNK_ROWS", 7)
    chunked = text_step(rows, collision_ngram=13)
    assert chunked.reason == whole.reason and chunked.detail == whole.detail
    assert np.array_equal(chunked.columns["ngram_overlap"], whole.columns["ngram_overlap"])


def test_copy_paraphrase_and_unrelated(embedder, tmp_path):
    res = run_step(embedder, tmp_path / "store")
    assert res.keep.tolist() == [False, False, True] and res.outcome == "filtered"
    assert res.reason == ["eval_exact_match", "eval_embedding_similarity", None]
    assert "eval row 0 of alpaca_eval_40" in res.detail[0] and "What are the names of some famous actors" in res.detail[0]
    # the paraphrase shares no 8-gram; its cosine to eval row 0 decides
    E = embedder.embed(EVAL_PROMPTS)
    cos = embedder.embed([PARAPHRASE])[0] @ E.T
    assert int(cos.argmax()) == 0 and 0.85 <= cos.max() < 0.95
    assert res.columns["ngram_overlap"][1] == 0.0 and res.columns["ngram_overlap"][0] == 1.0
    assert res.columns["eval_similarity"][1] == pytest.approx(float(cos.max()), abs=1e-5)
    measured = float(re.match(r"cosine similarity ([0-9.]+) ", res.detail[1]).group(1))
    assert measured == pytest.approx(float(cos.max()), abs=1e-5)
    assert ">= 0.85 (prompt view) to eval row 0 of alpaca_eval_40" in res.detail[1]
    assert res.columns["eval_similarity"][2] < 0.5 and res.columns["ngram_overlap"][2] == 0.0 and res.detail[2] is None
    s = res.stats
    assert (s["checked"], s["kept"], s["filtered_eval_exact_match"], s["filtered_eval_embedding_similarity"]) == (3, 1, 1, 1)
    assert (s["eval_rows"], s["eval_rows_invalid"], s["max_ngram_overlap"], s["max_similarity"], s["ngram"]) == (40, 0, 0.5, 0.85, 8)
    assert len(s["eval_sha256"]) == 64 and s["eval_embedded_now"] == 40
    # at 0.95 the paraphrase stays; the text checks alone: the copy still goes
    assert run_step(embedder, tmp_path / "store", max_similarity=0.95).keep.tolist() == [False, True, True]
    only_text = run_step(embedder, tmp_path / "store", max_similarity=None)
    assert only_text.keep.tolist() == [False, True, True] and np.isnan(only_text.columns["eval_similarity"]).all()


def test_embedding_compares_prompts_by_default(tmp_path):
    """A flow embedding whole conversations: the step embeds the rows' prompts once (kept in the store) and
    compares them with the eval prompts; embed_view: flow keeps the old conversation-to-conversation cosine."""
    conv = EmbedSpec(text="conversation")
    flow_embedder = build_embedder(conv, torch_threads=2)
    records = [{"messages": [message("user", p), message("assistant", r)]} for p, r in zip(PROMPTS, RESPONSES)]
    vectors = flow_embedder.embed_records(records)
    ctx = SelectContext(base_dir=str(ROOT), embed=conv, embed_key=flow_embedder.key, store_dir=str(tmp_path / "store"), torch_threads=2)

    def run(**params):
        step = selector_class("decontaminate")("decontaminate", {**PARAMS, "exact_match": False, "max_ngram_overlap": None, **params}, ctx)
        return step.select(pool_of(PROMPTS, RESPONSES, vectors))

    first = run()
    assert first.reason == ["eval_embedding_similarity", "eval_embedding_similarity", None]
    assert first.columns["eval_similarity"][1] == pytest.approx(0.9012, abs=1e-3) and "(prompt view)" in first.detail[1]
    assert (first.stats["pool_prompts_embedded_now"], first.stats["eval_embedded_now"], first.stats["embed_view"]) == (3, 40, "prompt")
    again = run()
    assert (again.stats["pool_prompts_embedded_now"], again.stats["eval_embedded_now"]) == (0, 0)
    assert np.array_equal(first.columns["eval_similarity"], again.columns["eval_similarity"])
    flow_view = run(embed_view="flow")  # conversation vs conversation (the eval row's reference answer included)
    assert flow_view.columns["eval_similarity"][1] < 0.8 and flow_view.reason[1] is None


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
    inputs = [{"path": "mine.jsonl"}, {"path": str(ROOT / "data/sample/alpaca_gpt4_en.json"), "limit": 20}]
    flow = write_flow(tmp_path, name="decon", inputs=inputs,
                      embed={"model": "all-MiniLM-L6-v2", "text": "prompt"}, score=[],
                      select=[{"method": "decontaminate", "eval_set": {"path": "eval.json", "name": "alpacaeval"}, "max_similarity": 0.85}])
    spec = load_flow(flow)
    summary = execute(spec)
    assert summary["n_input"] == 23 and summary["reconciled"]
    ledger = pq.read_table(spec.out / "ledger.parquet").to_pylist()
    assert [r["row"] for r in ledger] == list(range(23))
    by_row = {r["row"]: r for r in ledger}
    assert (by_row[0]["outcome"], by_row[0]["reason"], by_row[0]["stage"]) == ("filtered", "eval_exact_match", "select:0:decontaminate")
    assert "eval row 0 of alpacaeval" in by_row[0]["detail"]
    assert (by_row[1]["outcome"], by_row[1]["reason"]) == ("filtered", "eval_embedding_similarity")
    assert by_row[2]["outcome"] == "selected"
    assert summary["counts"]["filtered"] == sum(r["outcome"] == "filtered" for r in ledger)
    assert summary["counts"]["selected"] + summary["counts"]["filtered"] == 23
    scores = pq.read_table(spec.out / "select" / "scores.parquet").to_pylist()
    assert scores[1]["decontaminate.eval_similarity"] >= 0.85 and scores[1]["decontaminate.ngram_overlap"] == 0.0
    assert scores[0]["decontaminate.ngram_overlap"] == 1.0
