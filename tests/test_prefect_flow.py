"""The flow under the real Prefect API (one harness for the session): task runs per stage × shard,
artifacts, Cached task runs, and a run killed mid-stage that resumes losing at most one shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.config import load_flow
from curate.launch import run
from curate.pipeline import execute
from curate.recordset import load_embeddings
from conftest import ROOT, write_flow
from test_pipeline import sample_flow

pytestmark = pytest.mark.prefect


def _task_runs(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)


def test_flow_run_tasks_artifacts_and_cache(prefect_harness, tmp_path, shared_store):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    spec = load_flow(sample_flow(tmp_path, shared_store, runtime={"prefect": True, "torch_threads": 2, "progress": False}))
    first = run(spec)
    assert first["executor"] == "prefect" and first["reconciled"] and first["counts"]["selected"] == 40
    runs = _task_runs(first["flow_run_id"])
    names = sorted(r.name for r in runs)
    n_shards = 4
    assert sum(n.startswith("embed-") for n in names) == n_shards
    assert sum(n.startswith("score-heuristic-") for n in names) == n_shards
    assert {"select", "shard", "ledger", "export-messages", "export-configs", "report"} <= set(names)
    # 6 inputs + shard + (embed, heuristic) per shard + select + ledger + 4 layouts + export-configs + report
    assert len(runs) == 6 + 1 + 2 * n_shards + 1 + 1 + 4 + 1 + 1  # never one task per row

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["curate-summary-sample", "curate-counts-sample"])))
    kinds = {a.key: a for a in arts}
    assert set(kinds) == {"curate-summary-sample", "curate-counts-sample"}
    assert "40 selected" in kinds["curate-summary-sample"].data
    table = kinds["curate-counts-sample"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert any(row["stage"] == "selected" and row["out"] == 40 for row in table)

    second = run(spec)
    states = {r.name: r.state.name for r in _task_runs(second["flow_run_id"])}
    assert all(states[f"embed-{i}"] == "Cached" for i in range(n_shards))
    assert all(states[f"score-heuristic-{i}"] == "Cached" for i in range(n_shards))
    assert states["select"] == "Completed"
    work = {s["stage"]: s for s in second["stages"]}
    assert work["embed"]["computed_rows"] == 0


def _done(store: Path) -> set[str]:
    return {p.name for p in store.glob("embeddings/*/done/*.json")}


def test_killed_run_resumes_losing_at_most_one_shard(prefect_harness, tmp_path):
    """SIGKILL the CLI in the middle of the embed stage, re-run, compare with an uninterrupted run."""
    inputs = [{"path": "data/sample/alpaca_gpt4_en.json", "limit": 240}]
    common = dict(base_dir=str(ROOT), inputs=inputs, ingest={"shard_size": 20}, score=[{"method": "heuristic"}],
                  embed={"model": "all-MiniLM-L6-v2", "batch_size": 16}, select=[{"method": "kcenter", "budget": 25}],
                  export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    store = tmp_path / "store"
    flow = write_flow(tmp_path / "killed", name="killed", output_dir=str(tmp_path / "killed" / "out"), store_dir=str(store),
                      runtime={"prefect": True, "torch_threads": 2, "progress": False}, **common)
    env = {**os.environ, "PREFECT_API_URL": prefect_harness}
    proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(flow)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while len(_done(store)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _done(store)
    n_shards = 12
    assert 3 <= len(done_before) < n_shards
    parts_before = {p.name for p in store.glob("embeddings/*/part-*.parquet")}
    assert len(parts_before) >= len(done_before)  # at most the in-flight shard's work is lost

    resumed = run(load_flow(flow))
    embed = next(s for s in resumed["stages"] if s["stage"] == "embed")
    assert embed["computed_shards"] == n_shards - len(parts_before)  # finished shards are never recomputed
    assert embed["computed_rows"] == 20 * (n_shards - len(parts_before))
    assert resumed["reconciled"]

    ref = execute(load_flow(write_flow(tmp_path / "ref", name="ref", output_dir=str(tmp_path / "ref" / "out"),
                                       store_dir=str(tmp_path / "ref-store"), runtime={"prefect": False, "torch_threads": 2}, **common)))
    a = Path(resumed["output_dir"]) / "select" / "selected_ids.txt"
    b = Path(ref["output_dir"]) / "select" / "selected_ids.txt"
    assert a.read_bytes() == b.read_bytes()
    ids = pq.read_table(Path(ref["output_dir"]) / "select" / "scores.parquet", columns=["sample_id"]).column(0).to_pylist()
    key = ref["keys"]["embed"]
    assert resumed["keys"]["embed"] == key
    va, _ = load_embeddings(str(store), key, ids)
    vb, _ = load_embeddings(str(tmp_path / "ref-store"), key, ids)
    assert np.array_equal(va, vb)  # the resumed vectors are bit-identical to an uninterrupted run's
