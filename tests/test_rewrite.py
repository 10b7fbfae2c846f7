"""Derived rows through the spine: a rewrite stage (Mosaic-IT, the real one) makes rows with
lineage, they are re-scored and re-selected, and both ledgers reconcile."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import copy_sample, write_flow
from curate.config import load_flow
from curate.errors import ConfigError
from curate.pipeline import build_stages, execute

pytestmark = pytest.mark.slow


def mosaic_flow(tmp_path: Path, store: Path | None = None, **over) -> Path:
    copy_sample(tmp_path, "alpaca_gpt4_en.json", "sharegpt_dialogstudio.json")
    spec = dict(name="mosaic-test", inputs=[{"path": "alpaca_gpt4_en.json", "limit": 40}, {"path": "sharegpt_dialogstudio.json"}],
                score=[{"method": "heuristic"}],
                select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 30}],
                rewrite={"steps": [{"method": "mosaic", "epochs": 2, "max_length": 700}],
                         "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0}]},
                export={"layouts": ["messages", "alpaca"], "file_types": ["jsonl"]}, report={"plots": False})
    if store is not None:
        spec["store_dir"] = str(store)
    spec.update(over)
    return write_flow(tmp_path, **spec)


def test_stage_list_is_declared_from_the_flow(tmp_path):
    spec = load_flow(mosaic_flow(tmp_path))
    stages = build_stages(spec)
    assert [s.name for s in stages] == ["ingest", "score:heuristic", "select", "rewrite:mosaic", "score:heuristic@mosaic", "select-2",
                                        "ledger", "export", "report"]
    by = {s.name: s for s in stages}
    assert by["rewrite:mosaic"].reads == ("select",) and by["rewrite:mosaic"].writes == ("mosaic",)
    assert by["select-2"].reads == ("select", "mosaic")
    assert by["score:heuristic@mosaic"].cache is not None and by["select"].cache is None
    plain = load_flow(write_flow(tmp_path / "plain", inputs=[{"path": "../alpaca_gpt4_en.json"}], score=[{"method": "heuristic"}]))
    assert [s.name for s in build_stages(plain)] == ["ingest", "score:heuristic", "select", "ledger", "export", "report"]


def test_unknown_rewriter_is_named_with_its_line(tmp_path):
    flow = mosaic_flow(tmp_path, rewrite={"steps": [{"method": "paraphrase"}]})
    with pytest.raises(ConfigError, match=r"mosaic-test.yaml:\d+: rewrite.steps\[0\].method: unknown method 'paraphrase'"):
        load_flow(flow)


def test_mosaic_rows_are_rescored_reselected_and_reconciled(tmp_path):
    spec = load_flow(mosaic_flow(tmp_path))
    s = execute(spec)
    out = Path(s["output_dir"])
    n_in = s["n_input"]
    # input ledger: every input row once; the 30 selected single-turn rows were used by the rewrite
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert [r["row"] for r in ledger] == list(range(n_in)) and s["reconciled"]
    rewritten = [r for r in ledger if r["reason"] == "rewritten"]
    passed = [r for r in ledger if r["stage"] == "select-2"]  # multi-turn rows the rewrite passed through meet round 2
    assert rewritten and all(r["outcome"] == "not_selected" and r["stage"] == "rewrite:mosaic" for r in rewritten)
    assert len(rewritten) + len(passed) == 30
    # the rows the rewrite did not use are counted by reason, in the summary and in the report
    reasons = s["derived"]["rewrites"]["mosaic"]["reasons"]
    assert sum(n for k, n in reasons.items() if k.startswith("passthrough")) == len(passed) and reasons.get("passthrough: multiturn")
    assert "| mosaic | passthrough: multiturn |" in (out / "report" / "report.md").read_text()
    # derived ledger: every derived row once, numbered after the input rows, decided by round 2
    derived = pq.read_table(out / "derived_ledger.parquet").to_pylist()
    d = s["derived"]
    assert d["reconciled"] and [r["row"] for r in derived] == list(range(n_in, n_in + d["n_derived"]))
    assert {r["stage"] for r in derived} <= {"select-2", "select-2:0:threshold", "rewrite:mosaic"}
    assert all(r["origin"].startswith("mosaic:") and r["parents"] for r in derived)
    # lineage: parents are selected input rows of this run
    lineage = pq.read_table(out / "lineage.parquet").to_pylist()
    used_rows = {r["row"] for r in rewritten}
    assert len(lineage) == d["n_derived"]
    assert all(set(x["parent_rows"]) <= used_rows for x in lineage), (sorted(used_rows), [x["parent_rows"] for x in lineage][:5])
    # each epoch uses every composable row exactly once
    import json

    per_epoch: dict[int, list[str]] = {}
    for x in lineage:
        per_epoch.setdefault(json.loads(x["generation"])["epoch"], []).extend(x["parents"])
    used_ids = {r["sample_id"] for r in rewritten}
    assert len(per_epoch) == 2 and all(sorted(v) == sorted(used_ids) for v in per_epoch.values())
    # the derived rows were re-scored: the store holds their heuristic scores
    scores = pq.read_table(out / "select-2" / "scores.parquet").to_pydict()
    derived_ids = {r["sample_id"] for r in derived}
    assert derived_ids <= set(scores["sample_id"]) and all(v == v for v in scores["heuristic.response_tokens"])
    # the export holds the derived rows with their parents
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["derived_counts"] == d["counts"] and "lineage" in manifest["sidecars"]
    rows = [json.loads(line) for line in (out / "export" / "messages" / "curated_messages.jsonl").read_text().splitlines()]
    assert len(rows) == s["counts"]["selected"] + d["counts"]["selected"]
    assert sum(1 for r in rows if r["curate.origin"].startswith("mosaic:")) == d["counts"]["selected"]


def test_rerun_recomputes_nothing_and_is_byte_identical(tmp_path):
    store = tmp_path / "store"
    a = execute(load_flow(mosaic_flow(tmp_path / "a", store)))
    b = execute(load_flow(mosaic_flow(tmp_path / "b", store)))
    stages = {x["stage"]: x for x in b["stages"]}
    assert stages["rewrite:mosaic"]["computed_rows"] == 0 and stages["score:heuristic@mosaic"]["computed_rows"] == 0
    for rel in ("derived_ledger.parquet", "lineage.parquet", "ledger.parquet", "export/messages/curated_messages.jsonl",
                "select-2/selected_ids.txt"):
        assert (Path(a["output_dir"]) / rel).read_bytes() == (Path(b["output_dir"]) / rel).read_bytes(), rel


def test_originals_and_rewrites_compete_in_one_pool(tmp_path):
    flow = mosaic_flow(tmp_path, rewrite={"steps": [{"method": "mosaic", "epochs": 1, "max_length": 700}], "pool": "selected_and_derived",
                                          "select": [{"method": "top_k", "score": "heuristic.response_tokens", "budget": 12}]})
    s = execute(load_flow(flow))
    d = s["derived"]
    assert s["counts"]["selected"] + d["counts"]["selected"] == 12
    ledger = pq.read_table(Path(s["output_dir"]) / "ledger.parquet").to_pylist()
    assert not any(r["reason"] == "rewritten" for r in ledger)  # originals stay candidates
    assert sum(r["stage"].startswith("select-2") for r in ledger) == 30
    # mosaics are longer than their parts: the longest responses are mosaics
    assert d["counts"]["selected"] >= 6
