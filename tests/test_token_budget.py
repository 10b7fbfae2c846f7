"""The token_budget selection step: rows in the previous step's rank order up to a budget in tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curate.errors import ConfigError
from curate.select import Pool, selector_class


def pool(prompt, response, rank=None):
    n = len(prompt)
    return Pool(rows=np.arange(n, dtype=np.int64) * 10, ids=[f"id{i}" for i in range(n)],
                scores={"heuristic.prompt_tokens": np.asarray(prompt, float), "heuristic.response_tokens": np.asarray(response, float)},
                orientation={}, embeddings=None, n_input=n, rank=None if rank is None else np.asarray(rank, dtype=np.int64))


def run(p, **params):
    return selector_class("token_budget")("token_budget", params).select(p)


def test_keeps_a_prefix_of_the_rank_order_within_the_budget():
    # rows of 10, 20, 30, 40 tokens ranked 3, 0, 2, 1: the order is rows 1 (20), 3 (40), 2 (30), 0 (10)
    p = pool([5, 10, 15, 20], [5, 10, 15, 20], rank=[3, 0, 2, 1])
    r = run(p, tokens=60)
    assert np.flatnonzero(r.keep).tolist() == [1, 3] and r.rank[[1, 3]].tolist() == [0, 1]
    assert r.outcome == "not_selected" and r.reason == ["over_token_budget", None, "over_token_budget", None]
    # row 0 (10 tokens) would fit after row 2 stops the selection, but the kept rows are a prefix of the ranking
    assert r.detail[2] == "rank 3 in the previous step's order; the rows up to it hold 90 tokens (30 its own), over the budget of 60"
    assert r.stats == {"tokens": 60, "tokens_kept": 60.0, "rows_kept": 2, "count": ["heuristic.prompt_tokens", "heuristic.response_tokens"],
                       "fill": False}
    assert run(p, tokens=59).keep.sum() == 1  # exactly at the budget is kept, one token under is not
    # no rank (a pool built outside a run): input order
    r = run(pool([5, 10, 15, 20], [5, 10, 15, 20]), tokens=35)
    assert np.flatnonzero(r.keep).tolist() == [0, 1] and r.stats["tokens_kept"] == 30.0


def test_fill_skips_a_row_that_does_not_fit_and_keeps_later_ones_that_do():
    # the same order, rows 1 (20), 3 (40), 2 (30), 0 (10): at 70, row 2 does not fit beside 60, row 0 does
    p = pool([5, 10, 15, 20], [5, 10, 15, 20], rank=[3, 0, 2, 1])
    r = run(p, tokens=70, fill=True)
    assert np.flatnonzero(r.keep).tolist() == [0, 1, 3] and r.rank[[1, 3, 0]].tolist() == [0, 1, 2]  # rank order kept
    assert r.stats["tokens_kept"] == 70.0 and r.stats["rows_kept"] == 3 and r.stats["fill"] is True
    assert r.reason == [None, None, "over_token_budget", None]
    assert r.detail[2] == "rank 3 in the previous step's order; 30 tokens do not fit beside the 60 kept before it (budget 70)"
    assert run(p, tokens=70).stats["tokens_kept"] == 60.0  # without fill: the prefix only
    # a first row over the budget no longer empties the selection; NaN rows are still never kept
    r = run(pool([100, 1, np.nan, 2], [100, 1, 1, 2]), tokens=5, fill=True)
    assert r.keep.tolist() == [False, True, False, False] and r.reason == ["over_token_budget", None, "unscored", "over_token_budget"]


def test_a_row_longer_than_the_budget_an_empty_pool_and_unscored_rows():
    r = run(pool([100, 1], [100, 1]), tokens=50)  # the first-ranked row alone is over the budget: nothing is kept
    assert not r.keep.any() and r.reason == ["over_token_budget"] * 2 and r.stats["tokens_kept"] == 0.0
    r = run(pool([], []), tokens=50)
    assert r.keep.shape == (0,) and r.rank.shape == (0,) and r.stats["rows_kept"] == 0
    r = run(pool([1, np.nan, 1], [1, 1, 1]), tokens=50)  # NaN: never kept, and it does not stop the rows after it
    assert r.keep.tolist() == [True, False, True] and r.reason[1] == "unscored" and r.stats["tokens_kept"] == 4.0
    r = run(pool([1, 2], [1, 2]), tokens=50, count=["heuristic.response_tokens"])
    assert r.stats["tokens_kept"] == 3.0


def test_without_the_heuristic_scores_the_error_names_them():
    p = Pool(rows=np.arange(2), ids=["a", "b"], scores={"other.x": np.ones(2)}, orientation={}, embeddings=None, n_input=2)
    with pytest.raises(ConfigError, match=r"no score 'heuristic.prompt_tokens', 'heuristic.response_tokens'.*method: heuristic"):
        run(p, tokens=5)
    with pytest.raises(Exception, match="greater than 0"):
        run(p, tokens=0)


def test_in_a_flow_it_follows_the_previous_step_and_fills_the_ledger(tmp_path):
    """top_k ranks by response length (longest first); token_budget keeps the longest rows up to the budget."""
    import pyarrow.parquet as pq

    from conftest import write_flow
    from curate.config import load_flow
    from curate.pipeline import execute

    rows = [{"instruction": f"Say {i}", "output": " ".join(["word"] * (2 * i + 1))} for i in range(6)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    select = [{"method": "top_k", "score": "heuristic.response_tokens", "budget": 1.0, "rate_base": "pool"},
              {"method": "token_budget", "tokens": 25}]
    flow = write_flow(tmp_path, name="tb", inputs=[{"path": "rows.jsonl"}], score=[{"method": "heuristic"}], select=select,
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    s = execute(load_flow(flow))
    ledger = {r["row"]: r for r in pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()}
    # tokens per row: prompt 2 ("Say", "i") + response 2i + 1: rows 5, 4 (13 + 11 = 24) fit, row 3 (9) does not
    assert sorted(r for r, x in ledger.items() if x["outcome"] == "selected") == [4, 5]
    assert ledger[5]["rank"] == 0 and ledger[4]["rank"] == 1
    assert ledger[3]["outcome"] == "not_selected" and ledger[3]["reason"] == "over_token_budget"
    assert ledger[0]["reason"] == "over_token_budget"  # rows after the first that does not fit: dropped too
    step = s["steps"][-1]
    assert step["tokens_kept"] == 24.0 and step["rows_kept"] == 2
    bad = write_flow(tmp_path, name="nohe", inputs=[{"path": "rows.jsonl"}], score=[], select=[{"method": "token_budget", "tokens": 5}],
                     export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False}, output_dir="out2")
    with pytest.raises(Exception, match="method: heuristic"):
        execute(load_flow(bad))


def test_chat_tokens_counts_what_the_trainer_counts():
    """The chat_tokens scorer (compare's token count) equals the trainer's row_lengths on the exported row, for a
    multi-turn row with a system prompt, a tool call and tool schemas, and is cut at max_length."""
    from curate.export.layouts import convert_rows
    from curate.models import resolve_model
    from curate.records import message
    from curate.scorers import scorer_class
    from curate.train.sft import _tokenizer, row_lengths
    from curate.train.spec import TrainSpec

    # one schema object (not a list), its keys out of order: the export wraps it and sorts its keys; the count must too
    tools = json.dumps({"type": "function", "function": {"parameters": {"type": "object"}, "name": "add"}})
    rows = [{"sample_id": "a", "messages": [message("user", "Hello there"), message("assistant", "Hi! How can I help?")], "tools": None},
            {"sample_id": "b", "messages": [message("system", "Be short."), message("user", "Add 2 and 2."),
                          message("assistant", "", tool_calls='[{"name": "add", "arguments": {"a": 2, "b": 2}}]'),
                          message("tool", "4"), message("assistant", "It is 4.")], "tools": tools}]
    counts = [s.values["tokens"] for s in scorer_class("chat_tokens")("chat_tokens", {"model": "smollm2-135m-instruct"}).score_records(rows)]
    spec = TrainSpec(model="smollm2-135m-instruct")
    tok = _tokenizer(spec, resolve_model(spec.model).location)  # the training template (SmolLM2: ours, rendering the model's text)
    for layout in ("messages", "prompt_completion"):
        exported, skipped = convert_rows(rows, layout)  # the rows as the export writes them
        assert not skipped and counts == row_lengths(tok, exported, 10_000), layout
    assert counts[1] > counts[0] > 20  # the template's default system prompt counts
    cut = scorer_class("chat_tokens")("chat_tokens", {"model": "smollm2-135m-instruct", "max_length": 30}).score_records(rows)
    assert [s.values["tokens"] for s in cut] == [min(c, 30) for c in counts]
    a, b = (scorer_class("chat_tokens")("chat_tokens", {"model": "smollm2-135m-instruct", "max_length": m}) for m in (30, 31))
    assert a.key != b.key and "model_revision" in a.fingerprint()
