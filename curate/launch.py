"""Start a run: as a Prefect flow run (the default) or in-process (``runtime.prefect: false``).

The one place that chooses the executor, so the pipeline never imports the Prefect flow and the
flow imports only the pipeline (no import cycle).
"""

from __future__ import annotations

from typing import Any

from curate.config import FlowSpec


def check_inputs(spec: FlowSpec) -> None:
    """Raise IngestError (file and folder named) for an input path or glob that matches no file, and
    ConfigError for a URL store whose bucket does not exist or cannot be reached."""
    from curate.ingest.readers import expand_paths
    from curate.io import is_url

    for inp in spec.inputs:
        if inp.path is not None:
            expand_paths(inp.path, spec.base)
    if is_url(spec.store_dir):
        from curate.errors import ConfigError

        store = spec.store
        bucket = store.path.strip("/").split("/", 1)[0]
        try:
            found = store.fs.exists(bucket)
        except OSError as exc:  # no route, refused credentials
            raise ConfigError(f"store_dir {store}: cannot reach it ({type(exc).__name__}: {exc})") from exc
        if not found:
            raise ConfigError(f"store_dir {store}: the bucket '{bucket}' does not exist (or these credentials cannot see it); "
                              "create it first — curate never creates buckets")


def run(spec: FlowSpec) -> dict[str, Any]:
    """Run a validated flow. Missing input files, scores no scorer writes and an output folder that
    cannot be written are reported before anything starts."""
    from curate.config import check_flow

    check_flow(spec)
    check_inputs(spec)
    if not spec.runtime.prefect:
        from curate.executors import LocalExecutor
        from curate.pipeline import execute

        return execute(spec, LocalExecutor())
    from curate.flow import run_prefect

    return run_prefect(spec)
