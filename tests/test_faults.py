"""Failure policy: a scorer that raises on some rows gives NaN + status for those rows only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.config import load_flow
from curate.errors import StageError
from curate.pipeline import execute
from curate.scorers import SCORERS
from curate.scorers.heuristic import HeuristicScorer
from curate.store import Store
from conftest import write_flow


class FaultInjectingScorer(HeuristicScorer):
    """The real heuristic scorer, made to raise on rows that ask for it (fault injection)."""

    method = "faulty"

    def score_batch(self, records):
        if any("FAIL-ME" in m["content"] for r in records for m in r["messages"]):
            raise RuntimeError("injected fault")
        return super().score_batch(records)


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.setitem(SCORERS.targets, "faulty", "test_faults:FaultInjectingScorer")


def _rows(n_fail: int, n: int = 40) -> str:
    rows = []
    for i in range(n):
        tag = " FAIL-ME" if i < n_fail else ""
        rows.append({"instruction": f"Write sentence number {i}.{tag}", "output": f"This is sentence number {i}, written in full."})
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_failed_rows_get_nan_and_status_and_nothing_shifts(tmp_path, faulty):
    (tmp_path / "rows.jsonl").write_text(_rows(3))
    flow = write_flow(tmp_path, name="faults", inputs=[{"path": "rows.jsonl"}], ingest={"shard_size": 16},
                      score=[{"method": "faulty"}, {"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "faulty.response_chars", "budget": 100}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                      runtime={"prefect": False, "max_error_rate": 0.1})
    summary = execute(load_flow(flow))
    out = Path(summary["output_dir"])
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    bad = [r for r in ledger if r["outcome"] == "quarantined"]
    assert [r["row"] for r in bad] == [0, 1, 2]
    assert all(r["stage"] == "score:faulty" and r["reason"] == "RuntimeError" and r["detail"] == "injected fault" for r in bad)
    assert summary["counts"] == {"selected": 37, "not_selected": 0, "filtered": 0, "quarantined": 3}
    wide = pq.read_table(out / "select" / "scores.parquet").to_pydict()
    for i, row in enumerate(wide["row"]):
        if row < 3:
            assert wide["faulty.status"][i] == "error" and math.isnan(wide["faulty.response_chars"][i])
        else:  # the other rows of the failing batches keep their own values, in their own places
            assert wide["faulty.status"][i] == "ok"
            assert wide["faulty.response_chars"][i] == wide["heuristic.response_chars"][i]
    # the store keeps the failure (status + class), never a substituted value
    key = summary["keys"]["score:faulty"]
    stored = Store(summary["store_dir"]).scores(key).read()
    errs = stored.filter(pc.equal(stored.column("status"), "error")).to_pydict()
    assert set(errs["error_class"]) == {"RuntimeError"} and all(math.isnan(v) for v in errs["score"])


def test_error_budget_fails_the_stage(tmp_path, faulty):
    (tmp_path / "rows.jsonl").write_text(_rows(3))
    flow = write_flow(tmp_path, name="budget", inputs=[{"path": "rows.jsonl"}], score=[{"method": "faulty"}],
                      runtime={"prefect": False, "max_error_rate": 0.05})
    with pytest.raises(StageError, match=r"score:faulty: 3 of 40 rows failed \(7.5%\)"):
        execute(load_flow(flow))
