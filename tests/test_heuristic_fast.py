"""The columnar heuristic scorer equals its per-row reference; the columnar score stage equals the row
path; the store's id index answers like a set; part names hash like sha256_hex(*sorted(set(ids)))."""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import IngestSpec, InputSpec, StepSpec
from curate.manifests import ShardRef
from curate.records import MESSAGE_TYPE, RECORD_SCHEMA, message, sample_id, sha256_hex
from curate.scorers import ScorerContext
from curate.scorers.heuristic import ALNUM, CP, SPACE, SPECIAL, WORD, HeuristicScorer, _reference_scores, _table
from curate.ingest.read import read_input
from curate.stages.score import score_shard
from curate.store import Store, _ids_digest
from conftest import ROOT

SAMPLES = ["alpaca_gpt4_en.json", "cherry_alpaca.jsonl", "code_alpaca.csv", "glaive_toolcall.json", "sharegpt_dialogstudio.json"]


def sample_records(tmp_path) -> list[dict]:
    out = []
    for i, name in enumerate(SAMPLES):
        ref = read_input(InputSpec(path=str(ROOT / "data/sample" / name)), i, str(ROOT), str(tmp_path / str(i)), IngestSpec())
        out += pq.read_table(ref.records_path).to_pylist()
    return out


def rec(*msgs) -> dict:
    messages = [message(r, c, t) for r, c, *rest in msgs for t in [rest[0] if rest else None]]
    return {"sample_id": sample_id(messages), "messages": messages}


EDGE = [
    rec(("user", ""), ("assistant", "")),  # empty
    rec(("user", "   \n\t"), ("assistant", " \u3000 \x1c ")),  # white space only (\x1c is \s in Python, not in Rust regex)
    rec(("user", "Say hi"), ("assistant", "  say HI \n")),  # copies the prompt after strip + lower
    rec(("user", "Écris"), ("assistant", "ÉCRIS")),
    rec(("user", "emoji"), ("assistant", "🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂 ok")),  # a non-ASCII char run
    rec(("user", "x"), ("assistant", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa b c")),  # an ASCII char run
    rec(("user", "x"), ("assistant", "ab" * 30)),  # half and half: not over the share
    rec(("user", "loop"), ("assistant", " ".join(["the same words again and again"] * 40))),  # repetitive
    rec(("user", "loop"), ("assistant", " ".join(f"word{i}" for i in range(40)))),  # no repeat
    rec(("system", "Be brief."), ("user", "Q1"), ("assistant", "A1 ½ ² x_y ‿ é\u0301"), ("user", "Q2"), ("assistant", "A2")),  # multi-turn, numerics, marks
    rec(("user", "call it"), ("assistant", "", '[{"name": "f", "arguments": "{}"}]'), ("tool", "42"), ("assistant", "It is 42.")),
    rec(("user", "tool only"), ("assistant", "", '[{"name": "f"}]')),  # no text, but a tool call: not no_alnum
    rec(("user", "???"), ("assistant", "!!! ... ???")),  # no letter or digit
    rec(("user", "İstanbul ΣΟΦΙΑ"), ("assistant", "İSTANBUL ΟΔΟΣ ΟΔΟΣ")),  # special code points: the reference path
    rec(("user", "日本語"), ("assistant", "日本語の文章です。" * 5)),  # CJK: one word per run, non-ASCII chars
    rec(("user", "x"), ("assistant", "é" * 30 + " a")),  # a non-ASCII char run
]


def check_equal(records, scorer):
    fast = scorer.score_table(pa.table({"messages": pa.array([r["messages"] for r in records], pa.list_(MESSAGE_TYPE))}))
    got = fast.to_scores(scorer.outputs)
    want = _reference_scores(records, scorer.params, scorer._count_tokens)
    assert len(got) == len(want) == len(records)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.values == w.values, (i, records[i]["messages"], g.values, w.values)
        assert g.components == w.components and g.n_tokens_in == w.n_tokens_in == g.n_tokens_used, (i, g, w)


def test_lookup_table_is_pythons_re_for_every_code_point():
    tab = _table()
    word, space, alnum = re.compile(r"\w"), re.compile(r"\s"), re.compile(r"[^\W_]")
    for i in range(0x110000):
        if 0xD800 <= i < 0xE000:
            continue
        c, info = chr(i), int(tab[i])
        assert bool(info & WORD) == bool(word.match(c)) and bool(info & SPACE) == bool(space.match(c)) and bool(info & ALNUM) == bool(alnum.match(c)), hex(i)
        low = c.lower()
        if not info & SPECIAL:
            assert chr(info & CP) == low, hex(i)
            assert bool(tab[ord(low)] & WORD) == bool(info & WORD), hex(i)  # words of the lower case = words of the text


def test_equal_to_reference_on_sample_rows_and_edge_cases(tmp_path):
    rows = sample_records(tmp_path)
    assert len(rows) > 150 and any(m["tool_calls"] for r in rows for m in r["messages"])
    scorer = HeuristicScorer("heuristic", {})
    check_equal(rows + EDGE, scorer)
    values = scorer.score_table(pa.table({"messages": pa.array([r["messages"] for r in EDGE], pa.list_(MESSAGE_TYPE))})).to_scores(scorer.outputs)
    reasons = [v.components["reasons"] for v in values]
    assert "copies_prompt" in reasons[2] and "copies_prompt" in reasons[3] and "char_run" in reasons[4] and "char_run" in reasons[5]
    assert "char_run" not in reasons[6] and "repetitive" in reasons[7] and values[8].values["repetition"] == 0.0
    assert reasons[11] == [] and "no_alnum" in reasons[12] and "char_run" in reasons[15]
    # other parameters: short n-grams, a low share, a strict repetition threshold
    check_equal(rows[:80] + EDGE, HeuristicScorer("heuristic", {"ngram": 2, "max_char_share": 0.1, "min_chars_for_share": 3, "max_repetition": 0.05,
                                                               "min_ngrams": 1}))
    check_equal(EDGE, HeuristicScorer("heuristic", {"ngram": 1}))


def test_a_row_before_an_empty_last_row_keeps_its_last_character():
    # a chunk that ends with an empty response (a turn with only tool calls): the row before it is counted whole
    scorer = HeuristicScorer("heuristic", {})
    for row in EDGE[:11] + EDGE[12:]:
        check_equal([row, EDGE[11]], scorer)
        check_equal([row, EDGE[0]], scorer)


def test_score_batch_and_chunks_agree(tmp_path):
    rows = sample_records(tmp_path)[:120] + EDGE
    scorer = HeuristicScorer("heuristic", {})
    table = pa.table({"messages": pa.array([r["messages"] for r in rows], pa.list_(MESSAGE_TYPE))})
    whole = scorer.score_table(table).to_scores(scorer.outputs)
    parts = [s for start in range(0, len(rows), 37) for s in scorer.score_table(table.slice(start, 37)).to_scores(scorer.outputs)]
    assert [s.values for s in parts] == [s.values for s in whole] == [s.values for s in scorer.score_batch(rows)]


class RowPathHeuristic(HeuristicScorer):
    """The heuristic scorer through the row path (``score_batch`` overridden: the stage must not use score_table)."""

    def score_batch(self, records):
        return _reference_scores(records, self.params, self._count_tokens)


def test_columnar_stage_equals_row_path(tmp_path, monkeypatch):
    rows = sample_records(tmp_path)[:300] + EDGE
    records = [{**{f: None for f in RECORD_SCHEMA.names}, "sample_id": r["sample_id"], "messages": r["messages"], "row": i} for i, r in enumerate(rows)]
    table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    path = tmp_path / "shard.parquet"
    pq.write_table(table, path)
    shard = ShardRef(shard_id=0, path=str(path), sha256=sha256_hex(*table.column("sample_id").to_pylist()), n_rows=table.num_rows)
    step = StepSpec(method="heuristic")
    fast = HeuristicScorer("heuristic", {})
    slow = RowPathHeuristic("heuristic", {})
    assert fast.columnar and not slow.columnar
    ref_fast = score_shard(shard, step, fast.key, str(tmp_path / "a"), ScorerContext())
    monkeypatch.setattr("curate.stages.score.build_scorer", lambda step, ctx: RowPathHeuristic(step.label, step.params, ctx))
    ref_slow = score_shard(shard, step, fast.key, str(tmp_path / "b"), ScorerContext())
    # the EDGE rows repeat a sample_id: a repeated id is computed once (curate.stages.shardwork)
    assert ref_fast.statuses == ref_slow.statuses and ref_fast.computed_rows == ref_slow.computed_rows == len({r["sample_id"] for r in rows})
    a = Store(tmp_path / "a").scores(fast.key).read().drop_columns(["created_at"])
    b = Store(tmp_path / "b").scores(fast.key).read().drop_columns(["created_at"])
    assert a.num_rows == len(set(r["sample_id"] for r in rows)) * len(fast.outputs)
    assert a.equals(b)
    # a second run finds every row stored (done-marker removed: checked row by row through the id index)
    for marker in (tmp_path / "a").rglob("done/*.json"):
        marker.unlink()
    again = score_shard(shard, step, fast.key, str(tmp_path / "a"), ScorerContext())
    assert again.computed_rows == 0 and again.statuses == ref_fast.statuses


def test_stored_ids_index(tmp_path):
    c = Store(tmp_path).scores("k")
    t = lambda ids: pa.table({"sample_id": ids, "variant": ["v"] * len(ids), "score": [1.0] * len(ids), "status": ["ok"] * len(ids)})  # noqa: E731
    c.write(t(["ab", "é", "c" * 64]))
    for i in range(6):  # several runs of different sizes and widths, merged as they come
        c.write(t([f"id-{i}-{j}" for j in range(2 ** i)]))
    have = c.ids()
    assert len(have) == 3 + 63 and "ab" in have and "é" in have and "abc" not in have and "a" not in have and "" not in have
    q = ["abc", "ab", "id-5-31", "id-5-32", "c" * 64, "c" * 65, "é"]
    assert c.stored(pa.array(q)).tolist() == [False, True, True, False, True, False, True]
    assert c.stored(pa.chunked_array([pa.array(q[:3]), pa.array(q[3:])])).tolist() == c.stored(q).tolist()
    assert have == {"ab", "é", "c" * 64} | {f"id-{i}-{j}" for i in range(6) for j in range(2 ** i)}
    assert Store(tmp_path).scores("k").ids() == have  # the same answer from the cache of this process


@pytest.mark.parametrize("ids", [["b", "a", "b"], ["é", "z", "ab", "a"], [], [sample_id([message("user", str(i))]) for i in range(50)]])
def test_part_name_hash(ids):
    assert _ids_digest(pa.array(ids, pa.string())) == sha256_hex(*sorted(set(ids)))
    assert _ids_digest(pa.chunked_array([pa.array(ids, pa.string())])) == sha256_hex(*sorted(set(ids)))


def test_nan_only_where_not_ok():
    scorer = HeuristicScorer("heuristic", {})
    out = scorer.score_table(pa.table({"messages": pa.array([r["messages"] for r in EDGE], pa.list_(MESSAGE_TYPE))}))
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values.values()) and not any(math.isnan(x) for x in out.values["repetition"])


def test_texts_decode_every_code_point():
    """The numpy UTF-8 decoding and the per-character classes equal ``_table()`` for every code point."""
    from curate.scorers.heuristic import C_ALNUM, C_SPACE, C_WIDE, C_WORD, _Texts

    cps = np.array([i for i in range(0x110000) if not 0xD800 <= i < 0xE000], dtype=np.int64)
    text = "".join(map(chr, cps))
    t = _Texts(pa.array(["", text[:1000], None, text[1000:]]))
    assert t.lengths.tolist() == [0, 1000, 0, len(cps) - 1000] and t.starts[3] == 1000
    info = _table()[cps]
    assert (t.low == info & CP).all()
    cls = t.cls.astype(np.int64)
    assert ((cls & C_WORD > 0) == (info & WORD > 0)).all() and ((cls & C_SPACE > 0) == (info & SPACE > 0)).all()
    assert ((cls & C_ALNUM > 0) == (info & ALNUM > 0)).all() and ((cls & C_WIDE > 0) == (cps >= 128)).all()
    assert (t.wide_cps == cps[cps >= 128]).all() and t.special.tolist() == [False, True, False, False]  # U+0130, U+03A3
