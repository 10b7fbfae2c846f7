"""The tables on columns (issue 13, part D): the select stage, the wide score table, the ledgers and
the report's counts, checked against row-by-row references on a pool of a few thousand real rows
(``tests/scale_rows.py`` over ``data/sample``)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, write_flow
from curate.config import StepSpec, load_flow
from curate.ledger import OUTCOMES, LedgerMismatch, reconcile
from curate.manifests import RecordSetRef
from curate.pipeline import execute
from curate.recordset import QUARANTINE_STATUSES, read_records, take_records, wide_scores, write_recordset
from curate.report.report import reason_rows
from curate.stages.select import _lines, fixed_width_strings, select_stage, shared_strings
from curate.store import Store
from scale_rows import alpaca_rows, write_scale_pool

N_ROWS = 4000
BUDGET = 300


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tables")
    pool = write_scale_pool(d, N_ROWS, alpaca_rows([SAMPLE / "alpaca_gpt4_en.json", SAMPLE / "cherry_alpaca.jsonl"]), dim=None,
                            bad_every=250, seed=3)
    flow = write_flow(d, name="tables", inputs=[{"path": "pool-000.jsonl", "format": "alpaca"}], ingest={"shard_size": 700},
                      score=[{"method": "heuristic"}],
                      select=[{"method": "threshold", "score": "heuristic.degenerate", "max": 0},
                              {"method": "top_k", "score": "heuristic.response_tokens", "budget": BUDGET}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    summary = execute(load_flow(flow))
    return pool, summary, Path(summary["output_dir"])


def _input_set(out: Path) -> RecordSetRef:
    return RecordSetRef.model_validate_json((out / "recordsets" / "input" / "manifest.json").read_text())


def test_ledger_and_scores_match_a_row_by_row_reference(scale_run):
    pool, summary, out = scale_run
    n_input = summary["n_input"]
    scores = pq.read_table(out / "select" / "scores.parquet").to_pylist()
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert [r["row"] for r in ledger] == list(range(n_input)) == list(range(N_ROWS))
    by_row = {r["row"]: r for r in ledger}
    # the reference: the threshold drops degenerate rows, top-k keeps the BUDGET longest responses (ties: lower row first)
    passed = [s for s in scores if s["heuristic.degenerate"] <= 0]
    ranked = sorted(passed, key=lambda s: (-s["heuristic.response_tokens"], s["row"]))
    chosen = [s["sample_id"] for s in ranked[:BUDGET]]
    assert (out / "select" / "selected_ids.txt").read_text().split("\n")[:-1] == chosen
    rank_of = {sid: k for k, sid in enumerate(chosen)}
    for s in scores:
        e = by_row[s["row"]]
        assert (e["sample_id"], e["source_line"]) == (s["sample_id"], s["source_line"])
        if s["heuristic.degenerate"] > 0:
            assert (e["outcome"], e["stage"], e["reason"]) == ("filtered", "select:0:threshold", "above_max")
        elif s["sample_id"] in rank_of:
            assert (e["outcome"], e["stage"], e["rank"], e["reason"]) == ("selected", "select", rank_of[s["sample_id"]], None)
            assert (s["selected"], s["rank"]) == (True, rank_of[s["sample_id"]])
        else:
            assert (e["outcome"], e["stage"], e["reason"]) == ("not_selected", "select:1:top_k", "beyond_budget")
            assert (s["selected"], s["rank"]) == (False, None)
    # rows that never reached selection are the ingest's, each at one of the broken lines
    pool_rows = {s["row"] for s in scores}
    ingest = [r for r in ledger if r["row"] not in pool_rows]
    assert ingest and all(r["stage"] == "ingest" for r in ingest)
    assert {r["source_line"] for r in ingest if r["outcome"] == "quarantined"} <= set(pool.bad_lines["pool-000.jsonl"])
    assert summary["counts"] == {o: sum(r["outcome"] == o for r in ledger) for o in OUTCOMES}
    # the score table keeps the types a column of Python values inferred: no task at all is Arrow's null type
    schema = pq.read_schema(out / "select" / "scores.parquet")
    assert schema.field("task").type == pa.null() and schema.field("rank").type == pa.int64()
    assert schema.field("heuristic.status").type == pa.string() and schema.names[:6] == ["sample_id", "row", "source", "source_index",
                                                                                           "source_line", "task"]


def test_report_reason_counts_equal_a_counter_over_the_ledger(scale_run):
    _, _, out = scale_run
    t = pq.read_table(out / "ledger.parquet", columns=["outcome", "stage", "reason"]).to_pydict()
    c = Counter(zip(t["outcome"], t["stage"], t["reason"]))
    expect = [[o, s, r or "", n] for (o, s, r), n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]
    assert reason_rows(str(out / "ledger.parquet"), limit=100) == expect
    assert reason_rows(str(out / "ledger.parquet"), limit=2) == expect[:2]


def _reference_wide(store_dir: str, label: str, key: str, ids: list[str], variants: list[str]):
    """The row-by-row reading of the store the wide table must reproduce (Store.read: the first
    of each (sample_id, variant) in part order; a row's status from its last variant)."""
    pos = {sid: i for i, sid in enumerate(ids)}
    scores = {v: [math.nan] * len(ids) for v in variants}
    status, errs = ["missing"] * len(ids), {}
    table = Store(store_dir).scores(key).read(ids)
    for r in table.to_pylist() if table is not None else []:
        i = pos[r["sample_id"]]
        if r["variant"] in scores:
            scores[r["variant"]][i] = math.nan if r["score"] is None else r["score"]
        status[i] = r["status"]
        if r["status"] in QUARANTINE_STATUSES:
            errs[i] = (r["error_class"], r["message"])
    return {f"{label}.{v}": np.array(s) for v, s in scores.items()}, status, errs


def _part(rows: list[tuple]) -> pa.Table:
    sid, variant, score, status, ec, msg = zip(*rows)
    return pa.table({"sample_id": pa.array(sid, pa.string()), "variant": pa.array(variant, pa.string()), "score": pa.array(score, pa.float64()),
                     "status": pa.array(status, pa.string()), "error_class": pa.array(ec, pa.string()), "message": pa.array(msg, pa.string())})


def test_wide_scores_follow_the_stores_reading(tmp_path):
    from curate.scorers.heuristic import HeuristicScorer

    variants = list(HeuristicScorer.outputs)
    a, b = variants[0], variants[1]
    ids = [f"{i:064x}" for i in range(6)]
    col = Store(tmp_path).scores("k")
    # a concurrent writer stored id 1 twice (the earlier part's value stays); id 2 failed; id 3 has one variant
    # only, in a second part; id 4 has an unknown variant and a null score; id 5 was never scored
    col.write(_part([(ids[0], a, 1.0, "ok", None, None), (ids[0], b, 2.0, "ok", None, None), (ids[1], a, 3.0, "ok", None, None),
                     (ids[2], a, None, "error", "RuntimeError", "boom"), (ids[2], b, None, "error", "RuntimeError", "boom"),
                     (ids[4], "retired", 9.0, "ok", None, None), (ids[4], b, None, "ok", None, None)]))
    col.write(_part([(ids[1], a, 30.0, "parse_failed", "X", "late copy"), (ids[3], b, 5.0, "truncated_ok", None, None),
                     ("f" * 64, a, 7.0, "ok", None, None)]))
    step = StepSpec(method="heuristic")
    scores, statuses, errors, orientation = wide_scores(str(tmp_path), {"heuristic": (step, "k")}, np.array(ids))
    ref_scores, ref_status, ref_errs = _reference_wide(str(tmp_path), "heuristic", "k", ids, variants)
    assert set(scores) == set(ref_scores) == set(orientation)
    for name in scores:
        np.testing.assert_array_equal(scores[name], ref_scores[name])
    assert list(statuses["heuristic"]) == ref_status and errors["heuristic"] == ref_errs
    assert ref_status[1] in ("ok", "parse_failed") and ref_status[5] == "missing" and errors["heuristic"][2] == ("RuntimeError", "boom")
    # one shared string object per distinct status, not one per row
    assert len({id(s) for s in statuses["heuristic"]}) == len(set(ref_status))
    # no stored part at all: every row missing
    s2, st2, e2, _ = wide_scores(str(tmp_path), {"h": (StepSpec(method="heuristic"), "none")}, ids)
    assert list(st2["h"]) == ["missing"] * 6 and all(np.isnan(v).all() for v in s2.values()) and e2["h"] == {}


def test_select_stage_duplicates_exclusions_and_score_failures(scale_run, tmp_path):
    _, summary, out = scale_run
    inp = _input_set(out)
    n_input = summary["n_input"]
    # a later set repeats 40 input rows under new row numbers (a rewrite reproducing its parents)
    copies = read_records(inp).slice(100, 40)
    copies = copies.set_column(copies.schema.get_field_index("row"), "row", pa.array(range(n_input, n_input + 40), pa.int64()))
    rep = write_recordset(copies, tmp_path, "copies", "test", "x", 16)
    key = summary["keys"]["score:heuristic"]
    # a second scorer whose calls failed for some rows: they are quarantined with its error, before any step
    ids = read_records(inp, ["sample_id", "row"]).to_pydict()
    failed = set(ids["sample_id"][200:230:3])
    stored = Store(summary["store_dir"]).scores(key).read(ids["sample_id"], ["sample_id", "variant", "score", "status", "error_class", "message"])
    s = stored.to_pydict()
    bad = [sid in failed for sid in s["sample_id"]]
    Store(tmp_path / "store").scores(key).write(stored)
    Store(tmp_path / "store").scores("other").write(_part([
        (sid, v, None if b else x, "error" if b else st, "ValueError" if b else None, f"no score for {sid[:6]}" if b else None)
        for sid, v, x, st, b in zip(s["sample_id"], s["variant"], s["score"], s["status"], bad)]))
    steps = [StepSpec(method="top_k", score="other.response_tokens", budget=50)]
    scorers = {"heuristic": (StepSpec(method="heuristic"), key), "other": (StepSpec(method="heuristic", name="other"), "other")}
    ref = select_stage([inp, rep], steps, scorers, None, str(tmp_path / "store"), str(tmp_path / "run"), n_input=n_input + 40,
                       name="select-2", shard_size=500, exclude_rows=list(range(10)))
    ledger = pq.read_table(ref.ledger_path).to_pylist()
    rows = [r["row"] for r in ledger]
    pool_rows = [r for r in ids["row"] if r >= 10] + list(range(n_input, n_input + 40))
    assert rows == sorted(pool_rows)  # each pool row once, in row order; the excluded rows are not decided here
    by = {r["row"]: r for r in ledger}
    first_row = dict(zip(ids["sample_id"], ids["row"]))
    for k in range(40):
        e = by[n_input + k]
        sid = copies.column("sample_id")[k].as_py()
        assert (e["outcome"], e["stage"], e["reason"]) == ("filtered", "select-2", "exact_duplicate")
        assert e["detail"] == f"same content as row {first_row[sid]} (sample_id {sid[:12]}…)" and e["sample_id"] == sid
    q = [r for r in ledger if r["outcome"] == "quarantined"]
    assert {r["sample_id"] for r in q} == failed
    assert all((r["stage"], r["reason"], r["detail"]) == ("score:other", "ValueError", f"no score for {r['sample_id'][:6]}") for r in q)
    assert ref.counts == {"selected": 50, "not_selected": len(pool_rows) - 40 - len(failed) - 50, "filtered": 40, "quarantined": len(failed)}
    sel = (tmp_path / "run" / "select-2" / "selected_ids.txt").read_text().splitlines()
    kept = take_records([inp], ids=sel)
    assert kept.num_rows == 50 and ref.selected.n_rows == 50
    # a pool row with no stored score for a scorer stops the round, naming the row
    with pytest.raises(RuntimeError, match=r"row \d+ has no stored score for 'heuristic': the score stage did not finish"):
        select_stage([inp], steps, {"heuristic": (StepSpec(method="heuristic"), "absent")}, None, str(tmp_path / "store"), str(tmp_path / "r2"),
                     n_input=n_input)


def test_reconcile_names_what_does_not_add_up():
    from curate.ledger import LEDGER_SCHEMA

    t = pa.Table.from_pylist([{"row": r, "outcome": o} for r, o in [(0, "selected"), (1, "filtered"), (2, "not_selected")]], schema=LEDGER_SCHEMA)
    assert reconcile(t, 3) == {"selected": 1, "not_selected": 1, "filtered": 1, "quarantined": 0}
    with pytest.raises(LedgerMismatch, match=r"ledger has 3 rows \(3 distinct\) for 4 rows \(0…3\)"):
        reconcile(t, 4)
    dup = pa.Table.from_pylist([{"row": r, "outcome": "selected"} for r in (0, 1, 1)], schema=LEDGER_SCHEMA)
    with pytest.raises(LedgerMismatch, match=r"3 rows \(2 distinct\)"):
        reconcile(dup, 3)
    odd = pa.Table.from_pylist([{"row": 5, "outcome": "lost"}], schema=LEDGER_SCHEMA)
    with pytest.raises(LedgerMismatch, match=r"unknown outcomes in ledger: \['lost'\]"):
        reconcile(odd, 1, first_row=5)


def test_column_helpers_equal_their_python_forms():
    hexes = [f"{i * 7919:064x}" for i in range(1000)]
    for col in (pa.array(hexes), pa.chunked_array([hexes[:300], hexes[300:]]), pa.array(hexes).slice(17, 500)):
        got = fixed_width_strings(col)
        assert got.dtype == np.dtype("<U64") and got.tolist() == col.to_pylist()
    mixed = ["é", "ab", "abc"]  # not ASCII of one length: through Python strings, same values
    assert fixed_width_strings(pa.array(mixed)).tolist() == mixed and fixed_width_strings(pa.array([], pa.string())).tolist() == []
    src = pa.chunked_array([["a", None, "b"], ["a", "c", None]])
    shared = shared_strings(src)
    assert shared.dtype == object and shared.tolist() == src.to_pylist() and shared[0] is shared[3]
    assert _lines(pa.array(hexes[:3])) == "".join(f"{h}\n" for h in hexes[:3]) and _lines(pa.array([], pa.string())) == ""
    assert _lines(pa.chunked_array([["x"], ["yé"]])) == "x\nyé\n"
