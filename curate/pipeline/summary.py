"""The run summary (run.json), the counts table (a Prefect artifact) and the report task."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from curate import __version__
from curate.pipeline.stage import Run


def run_summary(run: Run, seconds: float | None = None) -> dict[str, Any]:
    """Everything a person or a later command needs to know about the run (written to run.json)."""
    spec, dataset = run.spec, run.dataset
    ledger = run.results.get("ledger")
    selection = run.selections[-1] if run.selections else None
    export = run.results.get("export")
    summary: dict[str, Any] = {
        "flow": spec.name,
        "description": spec.description,
        "flow_path": spec.flow_path,
        "config_hash": spec.fingerprint(),
        "seed": spec.seed,
        "output_dir": str(run.out),
        "store_dir": run.store_dir,
        **run.executor.describe(),
        "curate_version": __version__,
        "n_input": dataset.n_input,
        "counts": ledger.counts if ledger else {},
        "reconciled": bool(ledger) and sum(ledger.counts.values()) == dataset.n_input,
        "inputs": [r.model_dump(include={"source", "format", "files", "n_rows", "n_valid", "n_quarantined"}) for r in dataset.sources],
        "n_duplicates": dataset.n_duplicates,
        "stages": run.summaries,
        "steps": selection.steps if selection else [],
        "recordsets": {name: {"rows": rs.n_rows, "stage": rs.stage, "sha256": rs.sha256, "dir": rs.dir} for name, rs in run.sets.items()},
        "keys": run.results.get("keys", {}),
        "fingerprints": run.fingerprints,
        "export": export.model_dump() if export else None,
        "seconds": seconds,
    }
    if selection is not None:
        summary["selection_table"] = selection.path  # the candidates' scores (the next run's drift compares with it)
    if run.previous is not None and ledger is not None:
        if "diff" not in run.results:
            from pathlib import Path

            from curate.history import run_diff

            run.results["diff"] = run_diff(run.previous, Path(ledger.path), Path(selection.path) if selection is not None else None)
        summary["diff"] = run.results["diff"]
    if spec.train is not None:  # what `curate train <output_dir>` trains with (the flow's train: section, --set included)
        summary["train"] = spec.train.model_dump(mode="json")
    if run.rewrites:
        summary["derived"] = {
            "n_derived": ledger.n_derived if ledger else sum(rw.n_derived for rw in run.rewrites),
            "counts": ledger.derived_counts if ledger else {},
            "reconciled": bool(ledger) and sum(ledger.derived_counts.values()) == ledger.n_derived,
            "rewrites": {rw.name: {k: v for k, v in rw.stats.items() if k != "units"} for rw in run.rewrites},
            "rounds": [{"round": s.name, "steps": s.steps, "selected": s.n_selected} for s in run.selections],
        }
    return summary


def finish_summary(summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    summary["seconds"] = seconds
    summary["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return summary


def make_report(summary: dict, selection_path: str, ledger_path: str, embed_key: str | None, store_dir: str, out_dir: str,
                plots: bool, max_points: int, seed: int, sample_rows: int = 3) -> str:
    import pyarrow.parquet as pq

    from curate.recordset import load_embeddings
    from curate.report import write_report

    embeddings = None
    if embed_key is not None and plots:
        ids = pq.read_table(selection_path, columns=["sample_id"]).column(0).to_pylist()
        if ids:
            embeddings, statuses = load_embeddings(store_dir, embed_key, ids)
    return write_report(summary, selection_path, ledger_path, out_dir, embeddings, plots, max_points, seed, sample_rows)


def counts_table(summary: dict[str, Any], run: Run) -> list[dict[str, Any]]:
    """Rows in and out of every stage (the Prefect table artifact)."""
    dataset = run.dataset
    c = summary["counts"]
    rows = [{"stage": "ingest", "in": dataset.n_input, "out": dataset.n_valid + dataset.n_duplicates, "note": f"{dataset.n_quarantined} quarantined"},
            {"stage": "dedup", "in": dataset.n_valid + dataset.n_duplicates, "out": dataset.n_valid, "note": f"{dataset.n_duplicates} exact duplicates"}]
    for s in summary["stages"]:
        if s["stage"].startswith(("score:", "embed")):
            rows.append({"stage": s["stage"], "in": s["rows"], "out": s["rows"], "note": f"computed {s['computed_rows']}; statuses {s['statuses']}"})
        elif s["stage"].startswith("rewrite:"):
            rw = s.get("rewrite", {})
            rows.append({"stage": s["stage"], "in": rw.get("input_rows"), "out": s["rows"],
                         "note": f"used {rw.get('used')}, passthrough {rw.get('passthrough')}, dropped {rw.get('dropped')}, quarantined {rw.get('quarantined')}"})
    for sel in run.selections:
        prefix = "select" if sel.name == "select" else sel.name
        for s in sel.steps:
            rows.append({"stage": f"{prefix}:{s['step']}:{s['name']}", "in": s["in"], "out": s["kept"], "note": f"dropped rows are {s['outcome_of_dropped']}"})
    rows.append({"stage": "selected", "in": summary["n_input"], "out": c["selected"],
                 "note": f"not_selected {c['not_selected']}, filtered {c['filtered']}, quarantined {c['quarantined']}"})
    if "derived" in summary:
        d = summary["derived"]["counts"]
        rows.append({"stage": "selected (derived rows)", "in": summary["derived"]["n_derived"], "out": d.get("selected", 0),
                     "note": f"not_selected {d.get('not_selected', 0)}, filtered {d.get('filtered', 0)}, quarantined {d.get('quarantined', 0)}"})
    return rows
