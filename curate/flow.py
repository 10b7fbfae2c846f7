"""The Prefect flow: one flow run per ``curate run``, one task run per (stage × shard).

The flow takes the validated spec (as JSON, ``--set`` overrides and presets already applied), the
flow file's path (relative paths resolve against it) and the spec's hash, which it checks: the run
computes exactly what was asked, and nothing re-reads a file that may have changed since. Without
``PREFECT_API_URL`` Prefect starts a temporary local server for the run (ephemeral mode); with it,
runs appear in that server's UI.
"""

from __future__ import annotations

import os
from typing import Any

# Ephemeral server start-up on a cold, busy machine can exceed Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# The temporary server would try to send usage telemetry; most curate machines have no route out.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# curate's own log lines (one per stage and shard) go to Prefect's console and to the run in the UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "curate")

from prefect import flow  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

import logging  # noqa: E402

from curate.config import FlowSpec  # noqa: E402
from curate.executors import PrefectExecutor  # noqa: E402
from curate.pipeline import execute  # noqa: E402


class _ExpectedErrorsWithoutTraceback(logging.Filter):
    """A CurateError (a missing file, an empty input, a bad value) is an expected stop with a message
    that says everything: Prefect logs it in one line instead of with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from curate.errors import CurateError

        if record.exc_info and isinstance(record.exc_info[1], CurateError):
            record.exc_info = None
            record.exc_text = None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_ExpectedErrorsWithoutTraceback())


@flow(name="curate", flow_run_name="curate-{name}", persist_result=False, validate_parameters=True)
def curate_flow(spec: dict[str, Any], flow_path: str | None = None, name: str = "", config_hash: str = "") -> dict[str, Any]:
    """Run a curate flow: ingest → embed/score → select [→ rewrite → score → select] → export → report."""
    flow_spec = FlowSpec.model_validate(spec)
    flow_spec.flow_path = flow_path
    if config_hash and flow_spec.fingerprint() != config_hash:
        raise RuntimeError(f"the flow spec does not match its hash ({config_hash[:12]} → {flow_spec.fingerprint()[:12]})")
    return execute(flow_spec, PrefectExecutor(flow_spec.store / "prefect-results"))


def run_prefect(spec: FlowSpec) -> dict[str, Any]:
    runner = ThreadPoolTaskRunner(max_workers=spec.runtime.workers)
    return curate_flow.with_options(task_runner=runner)(
        spec=spec.model_dump(mode="json"), flow_path=spec.flow_path, name=spec.name, config_hash=spec.fingerprint()
    )
