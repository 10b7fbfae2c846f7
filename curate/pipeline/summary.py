"""The run summary (run.json) and the counts table (a Prefect artifact).

Both read the outputs the stages declared and handed to the run (:meth:`curate.pipeline.stage.Run.write`),
by name and by manifest type: ``input`` (a DatasetRef), the selection rounds (SelectionRefs, in order),
the rewrite steps (RewriteRefs), ``ledger``, ``export`` and ``report``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from curate.manifests import RewriteRef, SelectionRef
from curate.pipeline.stage import Run, Stage
from curate.version import __version__


def run_summary(run: Run, seconds: float | None = None) -> dict[str, Any]:
    """Everything a person or a later command needs to know about the run (written to run.json)."""
    spec, dataset = run.spec, run.outputs["input"]
    ledger = run.outputs.get("ledger")
    selections = [ref for ref in run.outputs.values() if isinstance(ref, SelectionRef)]
    rewrites = [ref for ref in run.outputs.values() if isinstance(ref, RewriteRef)]
    selection = selections[-1] if selections else None
    export = run.outputs.get("export")
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
        "keys": run.keys() if export else {},
        "fingerprints": run.fingerprints,
        "export": export.model_dump() if export else None,
        "seconds": seconds,
    }
    if selection is not None:
        summary["selection_table"] = selection.path  # the candidates' scores (the next run's drift compares with it)
    if run.previous is not None and ledger is not None:
        if run.diff is None:
            from pathlib import Path

            from curate.history import run_diff

            run.diff = run_diff(run.previous, Path(ledger.path), Path(selection.path) if selection is not None else None)
        summary["diff"] = run.diff
    if spec.train is not None:  # what `curate train <output_dir>` trains with (the flow's train: section, --set included)
        summary["train"] = spec.train.model_dump(mode="json")
    if rewrites:
        summary["derived"] = {
            "n_derived": ledger.n_derived if ledger else sum(rw.n_derived for rw in rewrites),
            "counts": ledger.derived_counts if ledger else {},
            "reconciled": bool(ledger) and sum(ledger.derived_counts.values()) == ledger.n_derived,
            "rewrites": {rw.name: {k: v for k, v in rw.stats.items() if k != "units"} for rw in rewrites},
            "rounds": [{"round": s.name, "steps": s.steps, "selected": s.n_selected} for s in selections],
        }
    return summary


def finish_summary(summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    summary["seconds"] = seconds
    summary["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return summary


def counts_table(summary: dict[str, Any], run: Run, stages: list[Stage]) -> list[dict[str, Any]]:
    """Rows in and out of every stage (the Prefect table artifact): each stage's own rows
    (:meth:`~curate.pipeline.stage.Stage.counts`, ingest first, selection steps after the stages that
    make and score rows), then the final counts."""
    c = summary["counts"]
    own = [(stage.counts_order, stage.counts(row, run)) for stage, row in zip(stages, summary["stages"])]
    rows = [r for _, part in sorted(own, key=lambda x: x[0]) for r in part]
    rows.append({"stage": "selected", "in": summary["n_input"], "out": c["selected"],
                 "note": f"not_selected {c['not_selected']}, filtered {c['filtered']}, quarantined {c['quarantined']}"})
    if "derived" in summary:
        d = summary["derived"]["counts"]
        rows.append({"stage": "selected (derived rows)", "in": summary["derived"]["n_derived"], "out": d.get("selected", 0),
                     "note": f"not_selected {d.get('not_selected', 0)}, filtered {d.get('filtered', 0)}, "
                             f"quarantined {d.get('quarantined', 0)}"})
    return rows
