"""Start a run: as a Prefect flow run (the default) or in-process (``runtime.prefect: false``).

The one place that chooses the executor, so the pipeline never imports the Prefect flow and the
flow imports only the pipeline (no import cycle).
"""

from __future__ import annotations

from typing import Any

from curate.config import FlowSpec


def check_inputs(spec: FlowSpec) -> None:
    """Raise IngestError (file and folder named) for an input path or glob that matches no file."""
    from curate.ingest.readers import expand_paths

    for inp in spec.inputs:
        if inp.path is not None:
            expand_paths(inp.path, spec.base)


def run(spec: FlowSpec) -> dict[str, Any]:
    """Run a validated flow. Missing input files are reported before anything starts."""
    check_inputs(spec)
    if not spec.runtime.prefect:
        from curate.executors import LocalExecutor
        from curate.pipeline import execute

        return execute(spec, LocalExecutor())
    from curate.flow import run_prefect

    return run_prefect(spec)
