"""Report: the run report (markdown, HTML and plots) from the run's own files, one task.

The report reads what the run made, by name: the run summary (:func:`curate.pipeline.summary.run_summary`,
over every earlier stage's declared output), the last selection round's score table, the ledger and,
for the plots, the selected rows' vectors from the store. Writes ``<output_dir>/report/`` (:mod:`curate.report`).
"""

from __future__ import annotations

from typing import Any

from curate.pipeline.stage import Run, Stage


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


class ReportStage(Stage):
    """The run report (markdown + plots), from the run's own files (one task). It summarises the whole
    run, so it reads every output declared before it (``reads``); ``selection``: the last round's."""

    kind = "report"

    def __init__(self, selection: str, reads: tuple[str, ...]):
        super().__init__("report", reads=reads, writes=("report",))
        self.selection = selection

    def run(self, run: Run) -> dict[str, Any]:
        import time

        from curate.pipeline.summary import finish_summary, run_summary

        spec = run.spec
        selection = run.read(self, self.selection)
        ledger = run.read(self, "ledger")
        summary = finish_summary(run_summary(run), time.perf_counter() - run.started)
        (path,), secs = run.map(self, make_report, [dict(summary=summary, selection_path=selection.path, ledger_path=ledger.path,
                                                        embed_key=run.embed_key, store_dir=run.store_dir, out_dir=str(run.out),
                                                        plots=spec.report.plots, max_points=spec.report.max_points, seed=spec.seed,
                                                        sample_rows=spec.report.sample_rows)])
        run.write(self, "report", path)
        return {"stage": "report", "tasks": 1, "seconds": secs}
