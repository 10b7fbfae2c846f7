"""One output folder, many runs: a lock, the previous run kept for comparison, the diff, the run log.

- :func:`output_lock`: an exclusive ``flock`` on ``<output_dir>/.lock`` for the whole run, so two runs of
  one flow (two CLI runs, or a CLI run beside a scheduled one) never write the same folder at once;
  the second waits, saying whose lock it waits for.
- :func:`keep_previous`: before a run writes anything, the previous run's ``run.json``, ledger and
  selection score table are copied to ``<output_dir>/previous/`` (replaced as a whole).
- :func:`run_diff`: what changed in the selection since the previous run — rows added / removed /
  unchanged (by ``sample_id``, each added or removed row with its outcome and reason now and then) and
  the drift of every score over the candidates: median shift, the Kolmogorov–Smirnov distance between
  the two distributions, and both histograms on shared bins.
- :func:`log_run`: one line per finished run appended to ``<output_dir>/runs.jsonl``.
- versioned runs (``runtime.versioned``, on for ``curate serve``): :func:`new_run_dir` makes
  ``<output_dir>/runs/<number>-<UTC time>/`` for each run and :func:`point_latest` moves the
  ``<output_dir>/latest`` link to it atomically once it is complete; the previous run is the folder
  ``latest`` pointed at (nothing is copied).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

PREVIOUS = "previous"
EXAMPLES = 20


@contextlib.contextmanager
def output_lock(out: Path, log=None) -> Iterator[None]:
    """Hold ``<out>/.lock`` exclusively for the block (waiting for another run that holds it)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another run"
            if log is not None:
                log.info("waiting for %s to finish writing %s", holder, out)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def keep_previous(out: Path) -> Path | None:
    """Copy the last finished run's record, ledger and selection table to ``<out>/previous`` and set
    its ``run.json`` aside (this run writes a new one when it finishes). Without a finished run here,
    the ``previous/`` kept by an earlier run (a run in between failed), else None."""
    run_json = out / "run.json"
    if not run_json.exists() or not (out / "ledger.parquet").exists():
        # no finished run here now: the last one kept (if a run failed since, its partial files are not compared)
        return out / PREVIOUS if (out / PREVIOUS / "run.json").exists() else None
    summary = json.loads(run_json.read_text())
    tmp = out / f".{PREVIOUS}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copy2(run_json, tmp / "run.json")
    shutil.copy2(out / "ledger.parquet", tmp / "ledger.parquet")
    table = summary.get("selection_table")
    if table and Path(table).exists():
        shutil.copy2(table, tmp / "scores.parquet")
    dest = out / PREVIOUS
    old = out / f".{PREVIOUS}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    run_json.unlink()  # written again when this run finishes: a run that fails leaves no run.json beside partial files
    return dest


def run_dir(out: str | os.PathLike) -> Path:
    """The folder of a flow's latest finished run: ``<out>/latest`` in a versioned output folder, else ``out``."""
    out = Path(out)
    link = out / "latest"
    return link.resolve() if link.is_symlink() else out


def new_run_dir(out: Path) -> Path:
    """``<out>/runs/<number>-<UTC time>`` (created under the output lock: numbers go up, names sort in order)."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.name.split("-", 1)[0]) for p in runs.iterdir() if p.name.split("-", 1)[0].isdigit()), default=0)
    d = runs / f"{n:05d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    d.mkdir()
    return d


def latest_run(out: Path) -> Path | None:
    """The run folder ``<out>/latest`` points at (a finished run), or None."""
    link = out / "latest"
    return link.resolve() if link.is_symlink() and (link.resolve() / "run.json").exists() else None


def point_latest(out: Path, target: Path) -> None:
    """Point ``<out>/latest`` at ``target`` atomically (a new link renamed over the old one)."""
    tmp = out / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, out), tmp)
    os.replace(tmp, out / "latest")


def _selected(ledger: Path) -> dict[str, dict[str, Any]]:
    """Each distinct row's outcome, by sample_id: the first row with that id (a later exact duplicate is
    filtered at ingest; the first one carries the outcome that counts)."""
    out: dict[str, dict[str, Any]] = {}
    for r in pq.read_table(ledger, columns=["sample_id", "outcome", "stage", "reason"]).to_pylist():
        if r["sample_id"] is not None:
            out.setdefault(r["sample_id"], r)
    return out


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov distance: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    return float(np.max(np.abs(np.searchsorted(np.sort(a), grid, side="right") / len(a)
                               - np.searchsorted(np.sort(b), grid, side="right") / len(b))))


def score_drift(previous: Path, current: Path, bins: int = 10) -> dict[str, dict[str, Any]]:
    """Per score column present in both selection tables: candidates' n, medians, KS distance, histograms."""
    a, b = pq.read_table(previous), pq.read_table(current)
    out = {}
    for name in sorted(set(a.column_names) & set(b.column_names)):
        if "." not in name or name.endswith(".status"):
            continue
        x = np.asarray(a.column(name).to_numpy(zero_copy_only=False), dtype=float)
        y = np.asarray(b.column(name).to_numpy(zero_copy_only=False), dtype=float)
        x, y = x[~np.isnan(x)], y[~np.isnan(y)]
        if not len(x) or not len(y):
            continue
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        out[name] = {"n_previous": len(x), "n_current": len(y), "median_previous": float(np.median(x)),
                     "median_current": float(np.median(y)),
                     "ks": _ks(x, y), "bins": edges.tolist(), "hist_previous": np.histogram(x, edges)[0].tolist(),
                     "hist_current": np.histogram(y, edges)[0].tolist()}
    return out


def run_diff(previous: Path, ledger: Path, selection_table: Path | None) -> dict[str, Any]:
    """The selection's changes since the run kept in ``previous`` (see the module docstring)."""
    before, after = _selected(previous / "ledger.parquet"), _selected(ledger)
    was = {s for s, r in before.items() if r["outcome"] == "selected"}
    now = {s for s, r in after.items() if r["outcome"] == "selected"}

    def row(sid: str, then: dict | None, nowr: dict | None) -> dict[str, Any]:
        return {"sample_id": sid, "now": None if nowr is None else f"{nowr['outcome']} ({nowr['stage']}: {nowr['reason'] or '–'})",
                "before": "not in the previous run" if then is None else f"{then['outcome']} ({then['stage']}: {then['reason'] or '–'})"}

    added = sorted(now - was)
    removed = sorted(was - now)
    prev_run = json.loads((previous / "run.json").read_text())
    out: dict[str, Any] = {
        "previous_run": {k: prev_run.get(k) for k in ("finished_at", "flow_run_id", "config_hash", "counts")},
        "added": len(added), "removed": len(removed), "unchanged": len(now & was),
        "new_rows": len(set(after) - set(before)), "gone_rows": len(set(before) - set(after)),
        "added_examples": [row(s, before.get(s), after[s]) for s in added[:EXAMPLES]],
        "removed_examples": [row(s, before[s], after.get(s)) for s in removed[:EXAMPLES]],
    }
    before_table = previous / "scores.parquet"  # kept by keep_previous; a versioned run folder has its own table
    if not before_table.exists() and prev_run.get("selection_table"):
        before_table = Path(prev_run["selection_table"])
    if selection_table is not None and before_table.exists():
        out["score_drift"] = score_drift(before_table, selection_table)
    return out


def diff_markdown(diff: dict[str, Any]) -> str:
    """The diff as a report / artifact section."""
    p = diff["previous_run"]
    lines = ["## Changes since the previous run", "",
             (f"Previous run: {p.get('finished_at')} (flow run {p.get('flow_run_id') or '–'}, "
              f"config `{(p.get('config_hash') or '')[:12]}`)."),
             f"Selection: **{diff['added']} added**, **{diff['removed']} removed**, {diff['unchanged']} unchanged; "
             f"{diff['new_rows']} input rows are new, {diff['gone_rows']} are gone.", ""]
    for key, title in (("added_examples", "Added (first 20)"), ("removed_examples", "Removed (first 20)")):
        if diff[key]:
            lines += [f"{title}:", "", "| sample_id | now | before |", "|---|---|---|"]
            lines += [f"| {r['sample_id'][:12]} | {r['now'] or 'not in this run'} | {r['before']} |" for r in diff[key]] + [""]
    drift = diff.get("score_drift") or {}
    if drift:
        lines += ["Score drift over the candidates (KS: the largest gap between the two distributions, 0 = same):", "",
                  "| score | candidates before → now | median before → now | KS |", "|---|---|---|---|"]
        lines += [f"| {n} | {d['n_previous']} → {d['n_current']} | {d['median_previous']:.4g} → {d['median_current']:.4g} | {d['ks']:.3f} |"
                  for n, d in drift.items()] + [""]
    return "\n".join(lines)


def log_run(out: Path, summary: dict[str, Any]) -> None:
    """Append this run to ``<out>/runs.jsonl`` (under the output lock)."""
    line = {k: summary.get(k) for k in ("finished_at", "flow_run_id", "config_hash", "n_input", "counts", "seconds")}
    if summary.get("diff"):
        line["diff"] = {k: summary["diff"][k] for k in ("added", "removed", "unchanged", "new_rows", "gone_rows")}
    with open(out / "runs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
