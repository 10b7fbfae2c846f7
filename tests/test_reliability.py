"""Reliability at scale: kill -9 at random points, a disk that fills during export, a damaged store,
bad rows scattered through the input (docs/reliability.md).

Every run is a real ``python -m curate run`` subprocess over a pool of ``CURATE_SCALE_ROWS`` rows
(default 100,000; CI runs that size) made by ``tests/scale_rows.py`` from the rows in ``data/sample``,
about one row in a thousand broken. Flow: ingest → heuristic → threshold → top_k → export, no Prefect.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from scale_rows import alpaca_rows, write_scale_pool

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = int(os.environ.get("CURATE_SCALE_ROWS", "100000"))
N_FILES = 2
N_SHARDS = 10
SHARD_SIZE = -(-N_ROWS // N_SHARDS)
BUDGET = max(10, N_ROWS // 50)
STAGES = ("ingest", "score:heuristic", "select", "ledger", "export", "report")
#: what a killed-and-resumed run must reproduce byte for byte (paths of the output folder normalised)
COMPARED = ("ledger.parquet", "derived_ledger.parquet", "lineage.parquet", "select", "recordsets", "export")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    base = alpaca_rows(sorted((ROOT / "data" / "sample").glob("*.json*")))
    return write_scale_pool(tmp_path_factory.mktemp("pool"), N_ROWS, base, dim=None, bad_every=1000, files=N_FILES)


def write_flow(path: Path, pool, out: Path, store: Path, budget: int = BUDGET, layouts=("messages", "alpaca"),
               file_types=("jsonl", "parquet")) -> Path:
    flow = {
        "name": "reliability", "base_dir": str(pool.paths[0].parent), "output_dir": str(out), "store_dir": str(store), "seed": 0,
        "inputs": [{"path": p.name, "format": "alpaca"} for p in pool.paths],
        "ingest": {"shard_size": SHARD_SIZE},
        "score": [{"method": "heuristic"}],
        "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0},
                   {"method": "top_k", "score": "heuristic.response_tokens", "budget": budget}],
        "export": {"layouts": list(layouts), "file_types": list(file_types)},
        "report": {"plots": False},
        "runtime": {"prefect": False, "progress": False},
    }
    path.write_text(yaml.safe_dump(flow, sort_keys=False))
    return path


def command(flow: Path) -> list[str]:
    return [sys.executable, "-m", "curate", "run", str(flow)]


ENV = {**os.environ, "CURATE_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}


def run_flow(flow: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command(flow), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800, **kw)


def run_ok(flow: Path) -> dict:
    res = run_flow(flow)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = Path(yaml.safe_load(flow.read_text())["output_dir"])
    return json.loads((out / "run.json").read_text())


def digests(out: Path) -> dict[str, str]:
    """sha256 of every compared file under ``out`` (the folder's own path replaced, for manifests)."""
    got = {}
    for name in COMPARED:
        root = out / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for f in files:
            got[f.relative_to(out).as_posix()] = hashlib.sha256(f.read_bytes().replace(str(out).encode(), b"<out>")).hexdigest()
    return got


def stage_row(summary: dict, name: str) -> dict:
    return next(s for s in summary["stages"] if s["stage"] == name)


def score_dir(store: Path) -> Path:
    (d,) = (store / "scores").iterdir()
    return d


def stored_rows(store: Path) -> int:
    """Rows stored in the score collection now (a part being written is still a hidden temporary file)."""
    if not (store / "scores").is_dir() or not any((store / "scores").iterdir()):
        return 0
    ids = set()
    for part in sorted(score_dir(store).glob("part-*.parquet")):
        ids.update(pq.read_table(part, columns=["sample_id"]).column(0).to_pylist())
    return len(ids)


def markers(store: Path) -> int:
    if not (store / "scores").is_dir() or not any((store / "scores").iterdir()):
        return 0
    return len(list((score_dir(store) / "done").glob("*.json")))


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory):
    """One uninterrupted run: its digests, its summary and its folders."""
    work = tmp_path_factory.mktemp("reference")
    flow = write_flow(work / "flow.yaml", pool, work / "out", work / "store")
    t0 = time.perf_counter()
    summary = run_ok(flow)
    return {"digests": digests(work / "out"), "summary": summary, "wall": time.perf_counter() - t0, "out": work / "out",
            "store": work / "store"}


# -- kill -9 ----------------------------------------------------------------------------------------

#: the stage each seed aims at; which stage the kill hit is read from the log. One kill per stage: a fifth seed
#: drawing its stage at random (it drew one of these four, at another moment) cost a kill and a resume (~15 s of
#: the suite); dropped to keep the suite's time, at the cost of that second moment
TARGETS = {0: "ingest", 1: "score:heuristic", 2: "select", 3: "ledger/export"}
#: the log line that ends the stage before each target (None: wait for the run to take the output folder's lock)
ANCHOR = {"ingest": None, "score:heuristic": "ingest", "select": "score:heuristic", "ledger/export": "select"}
STAGE_LINE = re.compile(r"curate - stage (\S+): ")


class Child:
    """``curate run`` in its own process group, its log lines collected as they come."""

    def __init__(self, flow: Path):
        self.proc = subprocess.Popen(command(flow), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.finished: list[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line)
                if m := STAGE_LINE.search(line):
                    self.finished.append(m.group(1))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for_stage_end(self, stage: str, timeout: float = 900) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: stage in self.finished or self.proc.poll() is not None, timeout) and stage in self.finished

    def kill(self) -> str:
        """SIGKILL the whole process group; returns the stage that was running (from the lines seen)."""
        with self.cond:
            done = list(self.finished)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(10)
        return STAGES[len(done)] if len(done) < len(STAGES) else "finished"


def kill_at_random(flow: Path, out: Path, target: str, seconds: dict[str, float], rng: random.Random, late: float = 0.8) -> str:
    child = Child(flow)
    anchor = ANCHOR[target]
    if anchor is None:
        deadline = time.monotonic() + 600
        while not (out / ".lock").exists() and child.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        window = seconds["ingest"]
    else:
        assert child.wait_for_stage_end(anchor), "".join(child.lines[-20:])
        window = seconds["select"] if target == "select" else seconds["ledger"] + seconds["export"] if target == "ledger/export" else seconds[target]
    time.sleep(rng.uniform(0.05, late) * window)
    return child.kill()


def export_is_whole_or_absent(out: Path) -> None:
    """Whatever a kill left under ``export/`` is a finished export: its manifest and files agree."""
    export = out / "export"
    if not export.exists():
        return
    manifest = json.loads((export / "manifest.json").read_text())
    for f in manifest["files"]:
        assert hashlib.sha256((export / f["path"]).read_bytes()).hexdigest() == f["sha256"], f["path"]


def test_kill_9_at_random_points_then_resume_gives_identical_output(pool, reference, tmp_path):
    """Four seeded kills (one aimed at each stage), each followed by a resume that must reproduce the uninterrupted run. The kill
    time is drawn from the reference run's stage times; a stage can run faster than it did there (a
    machine less loaded), so a kill that lands past its target stage is checked like any other and the
    seed tries again, earlier in the window (at most three tries), until each stage has been hit."""
    seconds = {s["stage"]: s["seconds"] for s in reference["summary"]["stages"]}
    hit = {}
    for seed, target in TARGETS.items():
        rng = random.Random(seed)
        target = target or rng.choice([t for t in ANCHOR])
        for attempt, late in enumerate((0.8, 0.4, 0.1)):
            stage = kill_and_resume(pool, reference, tmp_path / f"seed-{seed}-{attempt}", target, seconds, rng, late, seed)
            hit[seed] = stage
            if ("ledger/export" if stage in ("ledger", "export") else stage) == target:
                break
    stages_hit = {("ledger/export" if s in ("ledger", "export") else s) for s in hit.values()}
    assert stages_hit >= {"ingest", "score:heuristic", "select", "ledger/export"}, hit


def kill_and_resume(pool, reference, work: Path, target: str, seconds: dict[str, float], rng: random.Random, late: float, seed: int) -> str:
    """One kill aimed at ``target``, then a resume: the output equals the reference run's, and nothing
    finished before the kill is done again. Returns the stage the kill hit."""
    out, store = work / "out", work / "store"
    flow = write_flow(work.with_suffix(".yaml"), pool, out, store)
    stage = kill_at_random(flow, out, target, seconds, rng, late)
    print(f'seed {seed}: aimed at {target}, killed in {stage}')
    # the state the kill left
    ingest_done = len(list((store / "ingest").rglob("*.json"))) if (store / "ingest").exists() else 0  # chunk markers
    marked, stored = markers(store), stored_rows(store)
    export_is_whole_or_absent(out)
    assert not (out / "run.json").exists() or stage == "finished"

    summary = run_ok(flow)
    assert digests(out) == reference["digests"], f"seed {seed} (killed in {stage}): output differs from the uninterrupted run"
    # a kill may leave an atomic write's hidden temporary (``.<name>.<random>.tmp``), never a file under a final name
    assert all(t.name.startswith(".") for t in out.rglob("*.tmp")) and not (out / ".export.partial").exists()
    assert not list((out / "export").rglob("*.tmp"))
    # nothing finished before the kill is done again; the killed stage loses at most its one shard in flight
    ingest = stage_row(summary, "ingest")
    assert ingest["chunks_cached"] == ingest_done, (seed, stage, ingest, ingest_done)  # every chunk marked before the kill
    score = stage_row(summary, "score:heuristic")
    scored = stage_row(reference["summary"], "score:heuristic")["rows"]
    assert score["computed_rows"] == scored - stored, (seed, stage, score, stored)
    assert score["computed_shards"] <= N_SHARDS - marked, (seed, stage, score, marked)
    if stage not in ("ingest", "score:heuristic"):  # killed after scoring: nothing before it runs again
        assert score["computed_shards"] == 0 and ingest["chunks_cached"] == ingest["chunks"] and ingest["files_cached"] == N_FILES
    if stage == "score:heuristic":  # shards run in order: every shard before the one in flight was marked
        assert N_SHARDS - marked - score["computed_shards"] in (0, 1)
    shutil.rmtree(work)
    return stage


# -- a disk that fills during export ----------------------------------------------------------------


def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_disk_full_during_export_keeps_the_previous_export(pool, reference, tmp_path):
    # a large selection in one layout: its JSONL file is the largest file the run writes
    out, store = tmp_path / "out", tmp_path / "store"
    shutil.copytree(reference["store"], store)
    flow = write_flow(tmp_path / "flow.yaml", pool, out, store, budget=N_ROWS * 3 // 5, layouts=("messages",), file_types=("jsonl",))
    run_ok(flow)
    export = out / "export"
    before = {p.relative_to(export).as_posix(): p.read_bytes() for p in sorted(export.rglob("*")) if p.is_file()}
    big = export / "messages" / "curated_messages.jsonl"
    others = max(p.stat().st_size for p in out.rglob("*") if p.is_file() and export not in p.parents)
    assert big.stat().st_size > others * 1.2, "the export file must be the largest file for this test to aim at the export"
    limit = (big.stat().st_size + others) // 2

    res = run_flow(flow, preexec_fn=_limit_file_size(limit))
    assert res.returncode != 0
    err = res.stderr + res.stdout
    assert "disk full / file too large" in err and "curated_messages.jsonl" in err, err[-3000:]
    written = int(re.search(r"after (\d+) bytes were written", err).group(1))
    assert 0 < written <= limit
    after = {p.relative_to(export).as_posix(): p.read_bytes() for p in sorted(export.rglob("*")) if p.is_file()}
    assert after == before  # the previous export, untouched
    assert not list(out.rglob("*.tmp")) and not (out / ".export.partial").exists()
    assert not (out / "run.json").exists()  # the failed run is not recorded as finished

    run_ok(flow)  # room again: the same export
    assert {p.relative_to(export).as_posix(): p.read_bytes() for p in sorted(export.rglob("*")) if p.is_file()} == before


# -- a damaged store --------------------------------------------------------------------------------


def _damaged_store(reference, tmp_path, pool):
    out, store = tmp_path / "out", tmp_path / "store"
    shutil.copytree(reference["store"], store)
    col = score_dir(store)
    parts = sorted(col.glob("part-*.parquet"))
    variants = len(set(pq.read_table(parts[0], columns=["variant"]).column(0).to_pylist()))
    rows = {p.name: pq.read_metadata(p).num_rows // variants for p in parts}
    return write_flow(tmp_path / "flow.yaml", pool, out, store), out, col, parts, rows


def _markers_by_shard(col: Path) -> list[tuple[Path, dict]]:
    found = [(m, json.loads(m.read_text())) for m in (col / "done").glob("*.json")]
    return sorted(found, key=lambda mi: mi[1]["shard_id"])


def test_truncated_part_and_missing_markers_are_detected_and_recomputed(pool, reference, tmp_path):
    flow, out, col, parts, rows = _damaged_store(reference, tmp_path, pool)
    truncated = parts[1]
    os.truncate(truncated, truncated.stat().st_size // 2)  # cut short: its size no longer matches the markers
    for m, _ in _markers_by_shard(col)[:3]:  # shards whose marker is missing: only rows not stored are computed
        m.unlink()
    res = run_flow(flow)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{truncated.name} does not read" in res.stderr
    assert (col / "corrupt" / truncated.name).exists()  # its rows were computed again: the same ids, the same part name
    assert pq.read_table(truncated).num_rows == rows[truncated.name] * len(set(pq.read_table(truncated, columns=["variant"]).column(0).to_pylist()))
    score = stage_row(json.loads((out / "run.json").read_text()), "score:heuristic")
    assert score["computed_rows"] == rows[truncated.name] and score["computed_shards"] == 1
    assert digests(out) == reference["digests"]


def test_marker_whose_part_is_gone_is_detected(pool, reference, tmp_path):
    flow, out, col, parts, rows = _damaged_store(reference, tmp_path, pool)
    by_shard = _markers_by_shard(col)
    (gone,) = set(by_shard[-1][1]["parts"]) - set(by_shard[-2][1]["parts"])  # the last shard's own part
    (col / gone).unlink()
    for m, _ in by_shard[:3]:
        m.unlink()
    res = run_flow(flow)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"lists {gone}, which is gone" in res.stderr
    score = stage_row(json.loads((out / "run.json").read_text()), "score:heuristic")
    assert score["computed_rows"] == rows[gone] and score["computed_shards"] == 1
    assert digests(out) == reference["digests"]


def test_garbled_part_found_on_read_is_set_aside_and_recomputed_by_the_next_run(pool, reference, tmp_path):
    flow, out, col, parts, rows = _damaged_store(reference, tmp_path, pool)
    garbled = parts[3]
    data = bytearray(garbled.read_bytes())  # same size, footer destroyed: every marker still looks right
    data[-8:] = b"\0" * 8
    garbled.write_bytes(bytes(data))
    first = run_flow(flow)
    err = first.stderr + first.stdout
    assert first.returncode != 0 and "could not be read and was set aside" in err, err[-3000:]
    assert (col / "corrupt" / garbled.name).exists()
    assert not (out / "run.json").exists()
    summary = run_ok(flow)
    score = stage_row(summary, "score:heuristic")
    assert score["computed_rows"] == rows[garbled.name] and score["computed_shards"] == 1
    assert digests(out) == reference["digests"]


# -- bad rows ---------------------------------------------------------------------------------------


def test_bad_rows_are_quarantined_with_file_and_line_and_counts_reconcile(pool, reference):
    ledger = pq.read_table(reference["out"] / "ledger.parquet")
    assert ledger.num_rows == N_ROWS and sorted(ledger.column("row").to_pylist()) == list(range(N_ROWS))
    q = ledger.filter(pc.equal(ledger.column("outcome"), "quarantined")).to_pylist()
    got = {(r["source"], r["source_line"]) for r in q}
    want = {(Path(name).stem, line) for name, lines in pool.bad_lines.items() for line in lines}
    assert got == want and len(q) == pool.n_bad > 0
    for r in q:
        assert r["detail"].startswith(f"{r['source']}.jsonl:{r['source_line']}:"), r
    counts = reference["summary"]["counts"]
    assert sum(counts.values()) == N_ROWS and counts["quarantined"] == pool.n_bad
    outcomes = {}
    for o in ledger.column("outcome").to_pylist():
        outcomes[o] = outcomes.get(o, 0) + 1
    assert outcomes == {k: v for k, v in counts.items() if v}
    assert reference["summary"]["reconciled"] is True
