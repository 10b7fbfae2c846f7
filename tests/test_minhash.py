"""The minhash_dedup step (issue 22 item 12) on constructed near-copies of real rows (Alpaca-GPT4 in
data/sample): two words changed, a sentence appended, an exact copy re-cased with other whitespace;
a partial copy below the threshold; unrelated rows. The vectorised signatures against a brute force,
the banding rule against datasketch's values, determinism, the pool's rank deciding which copy is
kept, an empty pool, and the ledger of a real in-process flow run (heuristic scorer only)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from conftest import SAMPLE, write_flow
from curate.config import load_flow
from curate.pipeline import execute
from curate.records import message, sample_id
from curate.select import Pool, selector_class
from curate.select.minhash import candidate_probability, optimal_bands, permutations, shingle_hashes, signatures

ROWS = json.loads((SAMPLE / "alpaca_gpt4_en.json").read_text())[:40]
WORD = re.compile(r"\w+")


def prompt(r: dict) -> str:
    return r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")


BASE = [(prompt(r), r["output"]) for r in ROWS]


def change_words(text: str, at: list[int], new: str = "zebra") -> str:
    words = text.split(" ")
    for i in at:
        words[i] = new
    return " ".join(words)


def shingle_set(text: str, k: int = 5) -> set:
    w = WORD.findall(text.lower())
    return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)} if len(w) >= k else ({tuple(w)} if w else set())


def jaccard(a: tuple[str, str], b: tuple[str, str]) -> float:
    A, B = shingle_set(f"{a[0]}\n\n{a[1]}"), shingle_set(f"{b[0]}\n\n{b[1]}")
    return len(A & B) / len(A | B)


# near-copies of rows 0, 2 and 7, a partial copy of row 12 (its first half), at rows 40 … 43
WORDS_CHANGED = (BASE[0][0], change_words(BASE[0][1], [40, 160]))
APPENDED = (BASE[2][0], BASE[2][1] + " Every small step, like rinsing a bottle before recycling it, counts.")
RECASED = (BASE[7][0].upper(), "  ".join(BASE[7][1].upper().split()))
PARTIAL = (BASE[12][0], " ".join(BASE[12][1].split(" ")[: len(BASE[12][1].split(" ")) // 2]))
PAIRS = BASE + [WORDS_CHANGED, APPENDED, RECASED, PARTIAL]


def pool_of(pairs, rank=None) -> Pool:
    ids = [sample_id([message("user", p), message("assistant", r)], None) for p, r in pairs]
    return Pool(rows=np.arange(len(pairs), dtype=np.int64), ids=ids, scores={}, orientation={}, embeddings=None,
                n_input=len(pairs), text_loader=lambda positions: [pairs[i] for i in positions], rank=rank)


def run(pairs=PAIRS, rank=None, **params):
    return selector_class("minhash_dedup")("minhash_dedup", {"seed": 7, **params}).select(pool_of(pairs, rank))


def test_the_constructed_pairs_are_what_they_claim():
    assert jaccard(WORDS_CHANGED, BASE[0]) > 0.9
    assert jaccard(APPENDED, BASE[2]) > 0.9
    assert jaccard(RECASED, BASE[7]) == 1.0
    assert 0.4 < jaccard(PARTIAL, BASE[12]) < 0.6
    others = [jaccard(BASE[i], BASE[j]) for i in range(40) for j in range(i + 1, 40)]
    assert max(others) < 0.2  # the 40 real rows are unrelated


def test_near_copies_are_filtered_naming_the_kept_row():
    res = run()
    ids = pool_of(PAIRS).ids
    assert list(np.flatnonzero(~res.keep)) == [40, 41, 42]  # the three copies; the partial copy (43) and all real rows kept
    for copy, source in ((40, 0), (41, 2), (42, 7)):
        assert res.reason[copy] == "near_duplicate"
        assert f"near-duplicate of row {source} (sample_id {ids[source][:12]}…" in res.detail[copy]
        assert "cluster of 2" in res.detail[copy] and "estimated Jaccard" in res.detail[copy]
        assert res.reason[source] is None and res.detail[source] is None
        assert res.columns["cluster_size"][source] == 2 and res.columns["cluster_size"][copy] == 2
    assert res.columns["jaccard_to_kept"][42] == 1.0
    assert res.columns["jaccard_to_kept"][40] >= 0.8
    assert res.reason[43] is None and res.columns["cluster_size"][43] == 1
    assert res.stats["filtered_near_duplicate"] == 3 and res.stats["clusters"] == 3 and res.stats["keep_order"] == "input"
    assert (res.stats["bands"], res.stats["rows"]) == (14, 9)
    assert list(res.rank[res.keep]) == list(range(41))  # kept rows in their incoming order


def test_a_candidate_below_the_threshold_is_verified_and_kept():
    """With 128 bands of one value every pair sharing any minimum is a candidate: only the verification
    (estimated Jaccard >= threshold) keeps the partial copy."""
    res = run(bands=128, rows=1)
    assert res.stats["candidate_pairs"] > res.stats["verified_pairs"]
    assert res.keep[43] and res.keep[12]
    assert list(np.flatnonzero(~res.keep)) == [40, 41, 42]
    low = run(bands=128, rows=1, threshold=0.4)  # the same pair above a lower threshold
    assert not low.keep[43] and "near-duplicate of row 12" in low.detail[43]


def test_the_first_in_rank_order_is_kept():
    rank = np.arange(len(PAIRS), dtype=np.int64)
    rank[40], rank[0] = 0, 40  # the two-words-changed copy ranked first, its source last
    res = run(rank=rank)
    assert not res.keep[0] and res.keep[40]
    assert "near-duplicate of row 40" in res.detail[0] and "first in rank order" in res.detail[0]
    assert res.stats["keep_order"] == "rank"
    kept = np.flatnonzero(res.keep)
    assert list(kept[np.argsort(res.rank[kept])][:1]) == [40]  # the incoming rank order is kept


def test_deterministic_and_thread_independent():
    a, b = run(), run(threads=1, chunk_rows=7)
    assert np.array_equal(a.keep, b.keep) and a.detail == b.detail and a.stats == b.stats
    for k in a.columns:
        assert np.array_equal(a.columns[k], b.columns[k], equal_nan=True)
    c = run(seed=8)
    assert c.stats["seed"] == 8 and np.array_equal(c.keep, a.keep)  # other permutations, the same clear decisions
    assert not np.array_equal(c.columns["jaccard_to_kept"][40:42], a.columns["jaccard_to_kept"][40:42])  # but other estimates


def test_signatures_equal_a_brute_force():
    texts = [f"{p}\n\n{r}" for p, r in PAIRS[:6]] + ["Hi there", ""]  # a short text (one shingle) and an empty one
    owner, x = shingle_hashes(texts, 5)
    a, b = permutations(16, 3)
    sig = signatures(owner, x, len(texts), a, b, threads=2)
    assert list(np.bincount(owner, minlength=len(texts))[-2:]) == [1, 0]
    for t in range(len(texts) - 1):
        xs = [int(v) for v in x[owner == t]]
        ref = [min((((int(ai) * v + int(bi)) % 2**64) >> 32) for v in xs) for ai, bi in zip(a, b)]
        assert sig[t].tolist() == ref
    assert (sig[-1] == np.iinfo(np.uint32).max).all()


def test_banding_rule_matches_datasketch_and_params_are_checked():
    # datasketch 2.0's MinHashLSH._optimal_param(threshold, num_perm, 0.5, 0.5)
    assert optimal_bands(0.8, 128) == (9, 13)
    assert optimal_bands(0.7, 128) == (14, 9)
    assert optimal_bands(0.5, 256) == (42, 6)
    assert optimal_bands(0.8, 128, 0.1, 0.9) == (14, 9)
    assert candidate_probability(0.8, 14, 9) > 0.85
    with pytest.raises(ValidationError, match="both 'bands' and 'rows'"):
        selector_class("minhash_dedup")("minhash_dedup", {"bands": 8})
    with pytest.raises(ValidationError, match="exceeds num_perm"):
        selector_class("minhash_dedup")("minhash_dedup", {"bands": 20, "rows": 8})


def test_empty_pool_and_rows_without_text():
    res = run(pairs=[])
    assert len(res.keep) == 0 and res.stats["checked"] == 0 and res.stats["kept"] == 0
    res = run(pairs=[("", ""), ("", ""), ("...", "!")], field="response")
    assert res.keep.all() and res.stats["rows_without_shingles"] == 3 and np.isnan(res.columns["cluster_size"]).all()


def test_flow_run_ledger(tmp_path):
    rows = [{"instruction": ROWS[i]["instruction"], "input": ROWS[i].get("input", ""), "output": ROWS[i]["output"]} for i in range(12)]
    rows += [{"instruction": WORDS_CHANGED[0], "input": ROWS[0].get("input", ""), "output": WORDS_CHANGED[1]},
             {"instruction": ROWS[7]["instruction"].upper(), "input": "", "output": RECASED[1]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flow = write_flow(tmp_path, name="dedup", inputs=[{"path": "rows.jsonl"}], score=[{"method": "heuristic"}],
                      select=[{"method": "minhash_dedup", "seed": 3}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    spec = load_flow(flow)
    summary = execute(spec)
    assert summary["n_input"] == 14 and summary["reconciled"]
    assert summary["counts"]["selected"] == 12 and summary["counts"]["filtered"] == 2
    by_row = {r["row"]: r for r in pq.read_table(spec.out / "ledger.parquet").to_pylist()}
    for copy, source in ((12, 0), (13, 7)):
        assert (by_row[copy]["outcome"], by_row[copy]["reason"], by_row[copy]["stage"]) == ("filtered", "near_duplicate",
                                                                                            "select:0:minhash_dedup")
        assert f"near-duplicate of row {source} (sample_id {by_row[source]['sample_id'][:12]}…" in by_row[copy]["detail"]
        assert by_row[source]["outcome"] == "selected" and by_row[source]["reason"] is None
    scores = {r["row"]: r for r in pq.read_table(spec.out / "select" / "scores.parquet").to_pylist()}
    assert scores[0]["minhash_dedup.cluster_size"] == 2 and scores[1]["minhash_dedup.cluster_size"] == 1
    run_json = json.loads((spec.out / "run.json").read_text())
    assert "minhash_dedup" in json.dumps(run_json) and '"filtered_near_duplicate": 2' in json.dumps(run_json)


def test_a_flood_of_copies_in_one_bucket_is_one_cluster():
    """Above max_bucket rows a bucket pairs each row with its first and its neighbour: still one cluster."""
    pairs = BASE[:5] + [(BASE[0][0], BASE[0][1] + " " * k) for k in range(1, 9)]  # 8 more copies of row 0
    res = run(pairs=pairs, max_bucket=3)
    assert res.stats["large_buckets"] >= 1
    assert list(np.flatnonzero(~res.keep)) == list(range(5, 13))
    assert all("near-duplicate of row 0 " in res.detail[i] and "cluster of 9" in res.detail[i] for i in range(5, 13))


def test_character_shingles_for_text_without_spaces():
    """Chinese rows: a word is a whole clause, so a one-character change breaks whole word shingles;
    character 5-grams still see the copy."""
    zh = json.loads((SAMPLE / "alpaca_gpt4_zh.json").read_text())[:10]
    base = [(prompt(r), r["output"]) for r in zh]
    src = max(range(10), key=lambda i: len(base[i][1]))
    text = base[src][1]
    copy = (base[src][0], text[:10] + "他" + text[11:])  # one character replaced
    pairs = base + [copy]
    assert len(WORD.findall(text)) < 40  # few "words" in a long text
    words = run(pairs=pairs)
    chars = run(pairs=pairs, unit="char", ngram=5)
    assert chars.stats["unit"] == "char" and list(np.flatnonzero(~chars.keep)) == [10]
    assert f"near-duplicate of row {src} " in chars.detail[10]
    assert chars.stats["shingles"] > 5 * words.stats["shingles"]
