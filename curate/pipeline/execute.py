"""``execute``: run a flow's stage list with an executor (the in-process one, or Prefect's)."""

from __future__ import annotations

import time
from typing import Any

from curate import progress
from curate.config import FlowSpec
from curate.executors import LocalExecutor
from curate.io import write_json
from curate.pipeline.build import build_stages, model_keys
from curate.pipeline.stage import Run
from curate.pipeline.summary import counts_table, finish_summary, run_summary
from curate.history import keep_previous, latest_run, log_run, new_run_dir, output_lock, point_latest
from curate.progress import logger


def execute(spec: FlowSpec, executor: LocalExecutor | None = None) -> dict[str, Any]:
    """Run every stage of the flow in order; returns the run summary (also written to run.json).
    The output folder is locked for the run (a second run of it waits); the previous run's record,
    ledger and selection table are kept in ``previous/`` and the summary holds the diff against them."""
    executor = executor or LocalExecutor()
    progress.configure(spec.runtime.progress, spec.runtime.progress_interval_s)
    if executor.name == "local":
        progress.attach_console_log()
    spec.out.mkdir(parents=True, exist_ok=True)
    with output_lock(spec.out, logger):
        _remove_stale_temporaries(spec.out)
        # a folder that holds versioned runs stays versioned (a run that forgot the setting must not mix layouts)
        if not (spec.runtime.versioned or (spec.out / "latest").is_symlink()):
            summary = _execute(spec, executor, keep_previous(spec.out))
            log_run(spec.out, summary)
            return summary
        # a new folder per run; `latest` moves to it only once the run is complete
        previous = latest_run(spec.out)
        target = new_run_dir(spec.out)
        summary = _execute(spec.model_copy(update={"output_dir": str(target)}), executor, previous)
        point_latest(spec.out, target)
        log_run(spec.out, summary)
        return summary


def _remove_stale_temporaries(out) -> None:
    """A run killed while writing leaves ``.<name>.<random>.tmp`` files beside the file it was
    writing (curate.io.atomic_path); they were never renamed into place, so nothing reads them. Under
    the output lock no other run of this folder is writing: remove them."""
    for tmp in out.rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _execute(spec: FlowSpec, executor: LocalExecutor, previous) -> dict[str, Any]:
    run = Run(spec=spec, executor=executor, previous=previous)
    run.scorers, run.embed_key, run.fingerprints = model_keys(spec)
    stages = build_stages(spec)
    for stage in stages:
        with progress.stage_watch(stage.name):  # without bars: a line with rows, rate and time left every progress_interval_s
            row = stage.run(run)
        run.summaries.append(row)
        logger.info("stage %s: %s rows in %.1f s", stage.name, row.get("rows", "–"), row["seconds"])
    summary = finish_summary(run_summary(run), time.perf_counter() - run.started)
    if "report" in run.outputs:
        summary["report"] = run.outputs["report"]
    write_json(spec.out / "run.json", summary)

    from curate.report.report import summary_markdown

    executor.publish(summary, summary_markdown(summary), counts_table(summary, run, stages))
    return summary
