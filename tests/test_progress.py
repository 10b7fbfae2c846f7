"""Long runs people can watch (issue 22 item 11): a progress line per running stage every
``runtime.progress_interval_s`` when output is not a terminal, a resume message saying what a run
found already done, score/embed shards that keep the batches they finished when killed, and
``curate inspect FLOW.yaml``."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate.config import load_flow
from curate.manifests import ShardRef
from curate.pipeline import execute
from curate.records import RECORD_SCHEMA, sha256_hex
from curate.stages.shardwork import run_shard
from curate.store import Store
from conftest import ROOT, write_flow
from scale_rows import alpaca_rows, write_scale_pool

HEARTBEAT = re.compile(r"^(?P<stage>[\w:@-]+): (?P<done>[\d,]+) of (?P<todo>[\d,]+) rows \(\d+%\), (?P<rate>[\d.,]+) rows/s, "
                       r"about (?P<left>.+) left \(running (?P<elapsed>.+)\)$")


def _rows(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"instruction": f"Write the number {i} in words and explain how it is spelled.",
                               "output": f"The number {i} is written " + "and so on " * (i % 7 + 1)}) + "\n"
                   for i in range(start, start + n))


def _curate_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "curate"]


def test_a_long_stage_logs_rows_rate_and_time_left_every_interval(tmp_path, caplog):
    """12,000 rows under the heuristic scorer take well over 0.05 s to ingest and to score on any
    machine: with the interval at 0.05 s and no terminal, the score stage logs lines with rows done,
    rate and time left, never two of a stage closer than the interval (at 0.2 s the ingest, 0.7 s on a
    quiet machine, once logged no line with a rate in the full suite)."""
    base = alpaca_rows(sorted((ROOT / "data" / "sample").glob("*.json*")))
    pool = write_scale_pool(tmp_path / "pool", 12_000, base, dim=None)
    flow = write_flow(tmp_path, name="watch", base_dir=str(pool.paths[0].parent), output_dir=str(tmp_path / "out"),
                      store_dir=str(tmp_path / "store"), inputs=[{"path": p.name, "format": "alpaca"} for p in pool.paths],
                      ingest={"shard_size": 1000}, score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 100}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"enabled": False},
                      runtime={"progress_interval_s": 0.05})  # ingest takes ~0.7 s on a quiet machine: several lines
    caplog.set_level(logging.INFO, logger="curate")
    summary = execute(load_flow(flow))
    score = next(s for s in summary["stages"] if s["stage"] == "score:heuristic")
    assert score["computed_rows"] == 12_000 and score["seconds"] > 0.2
    beats = [(r, HEARTBEAT.match(r.getMessage())) for r in _curate_lines(caplog)]
    beats = [(r, m) for r, m in beats if m]
    scored = [m for r, m in beats if m["stage"] == "score:heuristic"]
    assert scored, [r.getMessage() for r in _curate_lines(caplog)]
    assert all(m["todo"] == "12,000" for m in scored)
    assert any(int(m["done"].replace(",", "")) > 0 and float(m["rate"].replace(",", "")) > 0 for m in scored)
    # one line per stage per interval, no more
    for stage in {m["stage"] for _, m in beats}:
        times = [r.created for r, m in beats if m["stage"] == stage]
        assert all(b - a >= 0.04 for a, b in zip(times, times[1:])), (stage, times)
    # the ingest stage, whose total is not known in advance, says rows and rate
    ingest = [r.getMessage() for r in _curate_lines(caplog) if r.getMessage().startswith("ingest: ") and "rows/s" in r.getMessage()]
    assert ingest, [r.getMessage() for r in _curate_lines(caplog)]


def test_a_stage_after_one_with_a_long_interval_gets_its_lines(caplog, monkeypatch):
    """The heartbeat thread of an earlier stage, asleep (up to 1 s) with its long interval, takes up a new stage's short
    interval at once (it used to sleep on and then judge the new stage by the old interval, so a short stage logged no
    line: the flaky ingest line above)."""
    import time

    from curate import progress

    monkeypatch.setattr(progress, "_enabled", False)
    caplog.set_level(logging.INFO, logger="curate")
    deadline = time.monotonic() + 5
    while progress._beat is not None and time.monotonic() < deadline:  # an earlier test's heartbeat ends first
        time.sleep(0.05)
    progress.configure(False, 30)
    try:
        with progress.stage_watch("first", 10):
            time.sleep(0.2)
        progress.configure(False, 0.05)
        with progress.stage_watch("second", 10) as meter:
            meter.add(3)
            time.sleep(0.5)
    finally:
        progress.configure(False, progress.DEFAULT_INTERVAL_S)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("second: 3 of 10 rows")]


def test_resume_message_says_what_was_already_done(tmp_path, caplog):
    """A run over more rows than the last one: the shards it computed before and the rows of a shard
    it had partly stored are named in one line; an identical run says all of it was done, ingest too."""
    data = tmp_path / "rows.jsonl"
    data.write_text(_rows(100))
    flow = write_flow(tmp_path, name="resume", inputs=[{"path": "rows.jsonl"}], ingest={"shard_size": 80},
                      score=[{"method": "heuristic"}], select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 10}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"enabled": False})
    caplog.set_level(logging.INFO, logger="curate")
    execute(load_flow(flow))
    assert not [r for r in _curate_lines(caplog) if "already" in r.getMessage() and r.getMessage().startswith(("score:", "ingest:"))]

    caplog.clear()
    data.write_text(_rows(200))  # rows 0-79 make the same shard; 80-99 are stored, in a shard that now holds 80-159
    summary = execute(load_flow(flow))
    lines = [r.getMessage() for r in _curate_lines(caplog)]
    assert ("score:heuristic: 1 of 3 shards already computed, and 20 rows of the other 2 shards already stored; "
            "computing 100 rows in 2 shards") in lines, lines
    assert next(s for s in summary["stages"] if s["stage"] == "score:heuristic")["computed_rows"] == 100

    caplog.clear()
    execute(load_flow(flow))
    lines = [r.getMessage() for r in _curate_lines(caplog)]
    assert "score:heuristic: all 3 shards already computed; nothing to compute" in lines, lines
    assert any(re.fullmatch(r"ingest: all \d+ chunks of the 1 input file already read before \(200 rows, in the store\); "
                            r"nothing parsed again", line) for line in lines), lines


def _shard(tmp_path: Path, n: int) -> ShardRef:
    records = [{**{f: None for f in RECORD_SCHEMA.names}, "sample_id": sha256_hex("row", str(i)), "row": i,
                "messages": [{"role": "user", "content": "x" * (i * 7 % 23 + 1)}, {"role": "assistant", "content": "ok"}]}
               for i in range(n)]
    table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    path = tmp_path / "shard.parquet"
    pq.write_table(table, path)
    return ShardRef(shard_id=0, path=str(path), sha256=sha256_hex(*table.column("sample_id").to_pylist()), n_rows=n)


def _by_length(records: list[dict]) -> list[int]:  # as the embed stage orders rows: longest first, ties in row order
    return sorted(range(len(records)), key=lambda i: (-len(records[i]["messages"][0]["content"]), i))


class _Model:
    """A stand-in scorer that records the batches it is given; ``fail_at``: the call that dies (a kill)."""

    def __init__(self, fail_at: int | None = None):
        self.batches: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, records: list[dict]) -> pa.Table:
        if self.fail_at is not None and len(self.batches) == self.fail_at:
            raise KeyboardInterrupt("killed")
        ids = [r["sample_id"] for r in records]
        self.batches.append(ids)
        # a value that depends on the batch (as padding can): equal only if the batches are equal
        return pa.table({"sample_id": ids, "status": ["ok"] * len(ids),
                         "score": [float(len(r["messages"][0]["content"]) + len(records)) for r in records]})


def test_a_killed_shard_keeps_the_batches_it_finished_and_resumes_with_the_same_batches(tmp_path):
    shard = _shard(tmp_path, 50)
    whole = _Model()
    run_shard("score", "stand-in", Store(tmp_path / "a").scores("k"), shard, whole, chunk_rows=8, order=_by_length, commit_s=0)

    killed = _Model(fail_at=3)
    store = Store(tmp_path / "b").scores("k")
    with pytest.raises(KeyboardInterrupt):
        run_shard("score", "stand-in", store, shard, killed, chunk_rows=8, order=_by_length, commit_s=0)
    assert len(store.ids()) == 24 and set(store.ids()) == {i for b in killed.batches for i in b}  # the 3 finished batches were kept
    assert not store.done(shard.sha256)

    resumed = _Model()
    ref = run_shard("score", "stand-in", store, shard, resumed, chunk_rows=8, order=_by_length, commit_s=0)
    assert ref.computed_rows == 50 - 24 and store.done(shard.sha256)
    assert killed.batches + resumed.batches == whole.batches  # the same batches as an uninterrupted run
    a = Store(tmp_path / "a").scores("k").read().sort_by("sample_id")
    b = store.read().sort_by("sample_id")
    assert a.equals(b)


def test_a_repeated_sample_id_does_not_shift_the_resumed_chunks(tmp_path):
    """Row 10 has row 0's sample_id (a derived set may repeat a row): it is computed once, at row 0, so a run killed
    after the first chunk resumes with the uninterrupted run's chunks (found by review: the second copy dropped out on
    resume and every later chunk shifted by one)."""
    shard = _shard(tmp_path, 20)
    table = pq.read_table(shard.path)
    ids = table.column("sample_id").to_pylist()
    ids[10] = ids[0]
    path = tmp_path / "dup.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(ids)), path)
    shard = ShardRef(shard_id=0, path=str(path), sha256=sha256_hex(*ids), n_rows=20)
    whole = _Model()
    run_shard("score", "stand-in", Store(tmp_path / "a").scores("k"), shard, whole, chunk_rows=4, commit_s=0)
    assert sum(map(len, whole.batches)) == 19  # the repeated id once
    killed, store = _Model(fail_at=1), Store(tmp_path / "b").scores("k")
    with pytest.raises(KeyboardInterrupt):
        run_shard("score", "stand-in", store, shard, killed, chunk_rows=4, commit_s=0)
    resumed = _Model()
    run_shard("score", "stand-in", store, shard, resumed, chunk_rows=4, commit_s=0)
    assert killed.batches + resumed.batches == whole.batches


def test_a_fast_shard_is_still_one_part(tmp_path):
    """Committing is time-based: a shard that ends within commit_s writes one part, as before."""
    shard = _shard(tmp_path, 50)
    store = Store(tmp_path / "s").scores("k")
    run_shard("score", "stand-in", store, shard, _Model(), chunk_rows=8, order=_by_length, commit_s=3600)
    assert len(store.parts()) == 1


def test_inspect_follows_a_flow_file_to_its_output_dir(tmp_path):
    from curate.cli import app

    runner = CliRunner()
    (tmp_path / "rows.jsonl").write_text(_rows(12))
    flow = write_flow(tmp_path, name="tiny", inputs=[{"path": "rows.jsonl"}], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 5}], report={"plots": False})
    r = runner.invoke(app, ["inspect", str(flow)])
    assert r.exit_code == 2 and "holds no finished run yet" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["run", str(flow), "--no-prefect", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(flow)])
    assert r.exit_code == 0, r.output
    assert "5 selected" in r.output and "beyond_budget" in r.output


def test_a_real_model_shard_killed_mid_shard_resumes_from_its_committed_batches(tmp_path):
    """The real embedder (all-MiniLM-L6-v2) on one 64-row shard in chunks of 16 rows, committing each finished chunk
    (``runtime.commit_interval_s: 0``): SIGKILL the run once a batch is stored and before the shard is done,
    re-run; the re-run embeds only the rows not stored yet, and every vector equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from curate.recordset import load_embeddings

    (tmp_path / "rows.jsonl").write_text(_rows(64))
    common = dict(inputs=[{"path": str(tmp_path / "rows.jsonl")}], ingest={"shard_size": 64}, score=[{"method": "heuristic"}],
                  embed={"model": "all-MiniLM-L6-v2", "batch_size": 2}, select=[{"method": "kcenter", "budget": 5}],
                  export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    store = tmp_path / "store"
    flow = write_flow(tmp_path / "killed", name="killed", output_dir=str(tmp_path / "killed" / "out"), store_dir=str(store),
                      runtime={"prefect": False, "torch_threads": 1, "progress": False, "commit_interval_s": 0}, **common)
    proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(flow), "--no-prefect", "--quiet"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    parts = lambda: list(store.glob("embeddings/*/part-*.parquet"))  # noqa: E731
    deadline = time.time() + 300
    while not parts() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(store.glob("embeddings/*/done/*.json")), "killed after the shard finished: nothing to resume"
    kept = sum(pq.read_metadata(p).num_rows for p in parts())
    assert 16 <= kept < 64  # whole chunks (batch_size × 8 = 16 rows)

    resumed = execute(load_flow(flow))
    embed = next(s for s in resumed["stages"] if s["stage"] == "embed")
    assert embed["computed_rows"] == 64 - kept  # the committed batches are not embedded again
    ref = execute(load_flow(write_flow(tmp_path / "ref", name="ref", output_dir=str(tmp_path / "ref" / "out"),
                                       store_dir=str(tmp_path / "ref-store"), runtime={"prefect": False, "torch_threads": 1,
                                                                                       "progress": False}, **common)))
    key = ref["keys"]["embed"]
    assert resumed["keys"]["embed"] == key
    ids = pq.read_table(Path(ref["output_dir"]) / "select" / "scores.parquet", columns=["sample_id"]).column(0).to_pylist()
    va, _ = load_embeddings(str(store), key, ids)
    vb, _ = load_embeddings(str(tmp_path / "ref-store"), key, ids)
    assert np.array_equal(va, vb)  # the same batches as an uninterrupted run: bit-identical vectors
    assert (Path(resumed["output_dir"]) / "select" / "selected_ids.txt").read_bytes() == \
        (Path(ref["output_dir"]) / "select" / "selected_ids.txt").read_bytes()
