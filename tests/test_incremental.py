"""Incremental curation over a folder that grows: only new files are read, only new rows are scored,
selection is global, and each run records its diff against the previous one; an unchanged folder
re-runs with nothing read or scored and the same selection; two runs of one flow at once never write
the output folder together, and both are recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from conftest import SAMPLE, write_flow
from curate.config import load_flow
from curate.pipeline import execute


def split_sample(folder: Path, parts: int, rows: int = 10) -> list[Path]:
    """Real rows of the cherry sample, written as ``parts`` files of ``rows`` rows each."""
    lines = (SAMPLE / "cherry_alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(parts):
        f = folder / f"part-{i}.jsonl"
        f.write_text("\n".join(lines[i * rows:(i + 1) * rows]) + "\n", encoding="utf-8")
        out.append(f)
    return out


def growing_flow(tmp_path: Path) -> Path:
    return write_flow(tmp_path, name="grow", inputs=[{"path": "pool/*.jsonl", "name": "pool"}], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 8}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})


def stage(summary: dict, name: str) -> dict:
    return next(s for s in summary["stages"] if s["stage"] == name)


def selected(out: Path) -> set[str]:
    t = pq.read_table(out / "ledger.parquet", columns=["sample_id", "outcome"]).to_pylist()
    return {r["sample_id"] for r in t if r["outcome"] == "selected"}


def test_a_growing_folder_reads_and_scores_only_what_is_new(tmp_path):
    split_sample(tmp_path / "pool", 2)
    flow = growing_flow(tmp_path)
    out = tmp_path / "out"
    first = execute(load_flow(flow))
    assert stage(first, "ingest")["files"] == 2 and stage(first, "ingest")["files_cached"] == 0
    assert stage(first, "score:heuristic")["computed_rows"] == first["n_input"] == 20 and "diff" not in first
    before = selected(out)

    lines = (SAMPLE / "cherry_alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "pool" / "part-2.jsonl").write_text("\n".join(lines[20:30]) + "\n", encoding="utf-8")  # the folder grows
    grown = execute(load_flow(flow))
    assert stage(grown, "ingest")["files"] == 3 and stage(grown, "ingest")["files_cached"] == 2  # only the new file is parsed
    assert stage(grown, "score:heuristic")["computed_rows"] == 10  # only its rows are scored
    after = selected(out)
    d = grown["diff"]
    assert (d["added"], d["removed"], d["unchanged"]) == (len(after - before), len(before - after), len(after & before))
    assert d["added"] == d["removed"] > 0 and d["new_rows"] == 10 and d["gone_rows"] == 0  # top-8 over the whole pool: new rows displace old
    assert all(r["before"] == "not in the previous run" for r in d["added_examples"])
    assert {r["now"].split(" ")[0] for r in d["removed_examples"]} == {"not_selected"}
    drift = d["score_drift"]["heuristic.response_tokens"]
    assert (drift["n_previous"], drift["n_current"]) == (20, 30) and 0 < drift["ks"] <= 1
    assert sum(drift["hist_previous"]) == 20 and sum(drift["hist_current"]) == 30
    report = (out / "report" / "report.md").read_text()
    assert f"**{d['added']} added**, **{d['removed']} removed**, {d['unchanged']} unchanged" in report
    assert "Changes since the previous run" in (out / "report" / "report.html").read_text()

    export = (out / "export" / "messages" / "curated_messages.jsonl").read_bytes()
    same = execute(load_flow(flow))  # nothing changed
    assert stage(same, "ingest")["files_cached"] == 3 and stage(same, "score:heuristic")["computed_rows"] == 0
    assert (same["diff"]["added"], same["diff"]["removed"], same["diff"]["new_rows"]) == (0, 0, 0)
    assert selected(out) == after and (out / "export" / "messages" / "curated_messages.jsonl").read_bytes() == export
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["n_input"] for r in runs] == [20, 30, 30] and runs[1]["diff"]["added"] == d["added"]


def test_a_changed_file_is_read_again(tmp_path):
    files = split_sample(tmp_path / "pool", 2)
    flow = growing_flow(tmp_path)
    execute(load_flow(flow))
    files[1].write_text(files[1].read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")  # shrunk to one row
    again = execute(load_flow(flow))
    assert stage(again, "ingest")["files_cached"] == 1 and again["n_input"] == 11 and again["diff"]["gone_rows"] == 9


def test_two_runs_of_one_flow_at_once_are_serialised_and_both_recorded(tmp_path):
    """While one run holds the output folder, a second waits (and says so); then it runs; both are recorded."""
    from curate.history import output_lock

    split_sample(tmp_path / "pool", 2)
    flow = growing_flow(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "curate.cli", "run", str(flow), "--no-prefect", "--quiet"]
    with output_lock(out):  # stands for a run in progress in this folder
        waiting = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in waiting.stdout:  # it must block on the lock, not write
            seen.append(line)
            if "waiting for pid" in line:
                break
        assert any("waiting for pid" in line for line in seen), seen
        assert not (out / "run.json").exists() and waiting.poll() is None
    rest = waiting.communicate(timeout=300)[0]
    assert waiting.returncode == 0, rest
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 and all(r["counts"]["selected"] == 8 for r in runs)
    summary = json.loads((out / "run.json").read_text())
    assert summary["reconciled"] and summary["diff"]["added"] == summary["diff"]["removed"] == 0
    assert len((out / "export" / "messages" / "curated_messages.jsonl").read_text().splitlines()) == 8


def test_a_duplicate_of_a_selected_row_is_not_reported_as_removed(tmp_path):
    files = split_sample(tmp_path / "pool", 2)
    flow = growing_flow(tmp_path)
    execute(load_flow(flow))
    out = tmp_path / "out"
    chosen = selected(out)
    dup = next(line for line in files[0].read_text(encoding="utf-8").splitlines()
               if _sid(line) in chosen)
    (tmp_path / "pool" / "part-2.jsonl").write_text(dup + "\n", encoding="utf-8")  # a new file repeating a selected row
    again = execute(load_flow(flow))
    d = again["diff"]
    assert again["counts"]["filtered"] == 1 and (d["added"], d["removed"], d["unchanged"]) == (0, 0, 8) and d["new_rows"] == 0


def _sid(line: str) -> str:
    from curate.ingest.formats import CONVERTERS
    from curate.ingest.validate import normalise_messages
    from curate.records import sample_id

    messages, tools = CONVERTERS["alpaca"](json.loads(line), {})
    return sample_id(normalise_messages(messages), tools)


def test_versioned_runs_each_get_a_folder_and_latest_moves_when_one_is_complete(tmp_path):
    split_sample(tmp_path / "pool", 2)
    flow = growing_flow(tmp_path)
    out = tmp_path / "out"
    first = execute(load_flow(flow, ["runtime.versioned=true"]))
    (run1,) = (out / "runs").iterdir()
    assert (out / "latest").is_symlink() and (out / "latest").resolve() == run1 and first["output_dir"] == str(run1)
    lines = (SAMPLE / "cherry_alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "pool" / "part-2.jsonl").write_text("\n".join(lines[20:30]) + "\n", encoding="utf-8")
    second = execute(load_flow(flow, ["runtime.versioned=true"]))
    run2 = (out / "latest").resolve()
    assert run2 != run1 and sorted((out / "runs").iterdir()) == [run1, run2]
    assert (run1 / "run.json").exists() and json.loads((run1 / "run.json").read_text())["n_input"] == 20  # the old run is kept as it was
    d = second["diff"]
    assert d["previous_run"]["finished_at"] == first["finished_at"] and d["new_rows"] == 10 and "score_drift" in d
    assert not (run2 / "previous").exists()  # the previous run is the folder latest pointed at: nothing copied
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["n_input"] for r in runs] == [20, 30]
    from curate.train.sft import locate_export

    assert locate_export(out, "messages").export_dir == run2 / "export"  # curate train <output_dir> follows latest
