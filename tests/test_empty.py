"""Zero rows at every stage is a normal outcome, not a crash (issue 20, item 5): an input whose rows are
all quarantined, a selection step that keeps nothing, a budget that rounds to zero, and a rewrite that
emits nothing each run to the end on real sample rows, with empty but valid exports (zero-line JSONL,
Parquet files that declare the layout's columns), ledgers that reconcile, and a report (markdown, HTML
and the Prefect summary artifact) that says why no row was selected."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, write_flow
from curate.config import load_flow
from curate.ledger import OUTCOMES
from curate.pipeline import execute

ROWS = [{"path": "data/sample/alpaca_gpt4_en.json", "name": "alpaca", "limit": 6}]
EXPORT = {"layouts": ["messages", "prompt_completion", "alpaca", "sharegpt"], "file_types": ["jsonl", "parquet"]}
#: the columns an empty Parquet file of each layout must still declare (what the trainer configs name)
LAYOUT_COLUMNS = {"messages": {"messages"}, "prompt_completion": {"prompt", "completion"},
                  "alpaca": {"instruction", "input", "output"}, "sharegpt": {"conversations"}}
NOTHING_PASSES = {"method": "threshold", "score": "heuristic.response_tokens", "min": 100_000}


def _flow(d: Path, store: Path, **extra) -> Path:
    spec = dict(name="empty", base_dir=str(ROOT), output_dir=str(d / "out"), store_dir=str(store), inputs=ROWS,
                score=[{"method": "heuristic"}], export=EXPORT)
    spec.update(extra)
    return write_flow(d, **spec)


def _check_empty_run(summary: dict, n_input: int, rewrite: bool) -> tuple[Path, str]:
    """Exports exist and are empty but valid, every ledger reconciles; returns (output dir, report.md)."""
    out = Path(summary["output_dir"])
    assert summary["reconciled"] and summary["counts"]["selected"] == 0 and sum(summary["counts"].values()) == n_input
    ledger = pq.read_table(out / "export" / "ledger.parquet")
    assert ledger.num_rows == n_input and sorted(ledger.column("row").to_pylist()) == list(range(n_input))
    assert set(ledger.column("outcome").to_pylist()) <= set(OUTCOMES) and "selected" not in ledger.column("outcome").to_pylist()
    export = out / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["n_selected"] == 0 and manifest["counts"] == summary["counts"]
    assert len(manifest["files"]) == len(EXPORT["layouts"]) * len(EXPORT["file_types"])
    for f in manifest["files"]:
        path = export / f["path"]
        assert f["n_rows"] == 0 and path.is_file(), f
        if f["file_type"] == "jsonl":
            assert path.read_bytes() == b""
        else:
            table = pq.read_table(path)
            assert table.num_rows == 0 and {"id", *LAYOUT_COLUMNS[f["layout"]]} <= set(table.column_names), (f, table.schema)
    assert pq.read_table(export / "scores.parquet").num_rows == 0
    for entry in json.loads((export / "dataset_info.json").read_text()).values():  # LLaMA-Factory entries name files that exist
        assert (export / entry["file_name"]).is_file()
    if rewrite:  # a flow with a rewrite stage exports its derived ledger and lineage even when they are empty
        derived = summary["derived"]
        assert derived["reconciled"] and derived["n_derived"] == sum(derived["counts"].values())
        assert manifest["sidecars"]["derived_ledger"] == "derived_ledger.parquet"
        assert pq.read_table(export / "derived_ledger.parquet").num_rows == derived["n_derived"]
        assert pq.read_table(export / "lineage.parquet").num_rows == derived["n_derived"]
    report = (out / "report" / "report.md").read_text()
    assert "no rows selected:" in (out / "report" / "report.html").read_text()
    return out, report


def test_an_input_whose_rows_are_all_quarantined(tmp_path, shared_store):
    """Every row breaks the conversation rules: ingest quarantines all, the embed and score stages get no
    shard, the k-center step an empty pool (no vector is read), the rewrite no row."""
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}", "output": ""}) + "\n" for i in range(3)))
    flow = _flow(tmp_path, shared_store, inputs=[{"path": str(tmp_path / "bad.jsonl")}], embed={"model": "all-MiniLM-L6-v2"},
                 select=[{"method": "kcenter", "budget": 2}], rewrite={"steps": [{"method": "mosaic", "epochs": 1}], "select": []},
                 report={"plots": True})
    s = execute(load_flow(flow))
    out, report = _check_empty_run(s, 3, rewrite=True)
    assert s["counts"]["quarantined"] == 3 and s["derived"]["n_derived"] == 0
    assert "**no rows selected: none of the 3 input rows passed ingest" in report
    step = s["derived"]["rounds"][0]["steps"][0]
    assert (step["in"], step["kept"], step["skipped"]) == (0, 0, "empty pool")


def test_a_selection_that_keeps_nothing(tmp_path, shared_store):
    """A threshold no row passes: the steps after it (random, top-k) see an empty pool, the rewrite
    gets an empty selection, and the report names the step where the rows ran out."""
    flow = _flow(tmp_path, shared_store,
                 select=[NOTHING_PASSES, {"method": "random", "budget": 2},
                         {"method": "top_k", "score": "heuristic.response_tokens", "budget": 1}],
                 rewrite={"steps": [{"method": "mosaic", "epochs": 1}], "select": [{"method": "random", "budget": 1}]},
                 report={"plots": True})
    s = execute(load_flow(flow))
    out, report = _check_empty_run(s, 6, rewrite=True)
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert {(r["outcome"], r["stage"], r["reason"]) for r in ledger} == {("filtered", "select:0:threshold", "below_min")}
    steps = s["derived"]["rounds"][0]["steps"]
    assert [(st["in"], st["kept"]) for st in steps] == [(6, 0), (0, 0), (0, 0)]
    assert "**no rows selected: select step 0 (threshold) kept none of the 6 rows that reached it (they are filtered)**" in report
    assert "rewrite `mosaic` made no rows from its 0 input rows" in report


def test_a_budget_that_rounds_to_zero(tmp_path, shared_store):
    """10% of a 6-row pool is no row: every row ends not_selected, and the report says which step."""
    flow = _flow(tmp_path, shared_store, report={"plots": False},
                 select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 0.1, "rate_base": "pool"}])
    s = execute(load_flow(flow))
    out, report = _check_empty_run(s, 6, rewrite=False)
    assert s["counts"]["not_selected"] == 6
    assert "**no rows selected: select step 0 (top_k) kept none of the 6 rows that reached it (they are not_selected)**" in report


@pytest.mark.prefect
def test_a_rewrite_that_emits_nothing_under_prefect(prefect_harness, tmp_path, shared_store):
    """Mosaic-IT with a cap no single row fits under drops every row (reason overlong) and makes none:
    re-scoring and the second selection get an empty pool, the export is empty (it raised ArrowTypeError
    on the empty, untyped selection), and the Prefect summary artifact says why."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from curate.launch import run

    flow = _flow(tmp_path, shared_store, name="empty-rewrite", select=[],
                 rewrite={"steps": [{"method": "mosaic", "epochs": 1, "max_length": 20}],
                          "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0}]},
                 report={"plots": False}, runtime={"prefect": True, "torch_threads": 2, "progress": False})
    s = run(load_flow(flow))
    assert s["executor"] == "prefect"
    out, report = _check_empty_run(s, 6, rewrite=True)
    assert s["derived"]["n_derived"] == 0 and s["derived"]["rewrites"]["mosaic"]["dropped"] == 6
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert {(r["outcome"], r["stage"], r["reason"]) for r in ledger} == {("filtered", "rewrite:mosaic", "overlong")}
    note = "**no rows selected: select-2 had an empty pool (a rewrite above made no rows)**"
    assert note in report and "rewrite `mosaic` made no rows from its 6 input rows (dropped: overlong 6)" in report
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["curate-summary-empty-rewrite"])))
    assert note in art.data
