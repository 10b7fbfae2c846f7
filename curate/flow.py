"""The Prefect flow: one flow run per ``curate run``, one task run per (stage × shard).

The flow takes the validated spec (as JSON, ``--set`` overrides and presets already applied), the
flow file's path (relative paths resolve against it) and the spec's hash, which it checks: the run
computes exactly what was asked, and nothing re-reads a file that may have changed since. Without
``PREFECT_API_URL`` Prefect starts a temporary local server for the run (ephemeral mode); with it,
runs appear in that server's UI.

``runtime.task_runner`` picks where the per-shard tasks of the model stages (embed, score) run: a
thread pool in this process (``threads``), or the worker processes of a Dask or Ray cluster — an
existing one at ``runtime.address``, else a local one started for the run (:func:`task_runner`). The
stages that run once (ingest, select, ledger, export, report, rewrite) stay in this process on a
thread pool whatever the runner. The runner is not part of the flow's hash, and results are
collected in submission order, so it changes neither the fingerprint nor the outputs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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

from curate.config import FlowSpec, RuntimeSpec  # noqa: E402
from curate.errors import ConfigError, MissingDependency  # noqa: E402
from curate.executors import PrefectExecutor  # noqa: E402
from curate.pipeline import execute  # noqa: E402
from curate.store import prefect_results_dir  # noqa: E402


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
    result_dir = prefect_results_dir(flow_spec.store)
    if flow_spec.runtime.task_runner == "threads":
        return execute(flow_spec, PrefectExecutor(result_dir))
    # a cluster runs the model stages' shards; the stages that run once stay here, on threads
    with ThreadPoolTaskRunner(max_workers=flow_spec.runtime.workers) as local:
        return execute(flow_spec, PrefectExecutor(result_dir, local_runner=local))


_CLUSTER_EXTRA = "pip install 'curate[cluster]'"


def task_runner(runtime: RuntimeSpec):
    """The Prefect task runner ``runtime`` asks for (the cluster packages are imported only here).

    - ``threads``: a thread pool of ``runtime.workers`` threads in this process.
    - ``dask``: ``prefect_dask.DaskTaskRunner`` on the scheduler at ``runtime.address``, or on a local
      ``distributed.LocalCluster`` of ``runtime.workers`` worker processes, one thread each.
    - ``ray``: ``prefect_ray.RayTaskRunner`` connected to ``runtime.address`` (``host:port`` of a head
      this machine is a node of, or ``ray://host:10001`` for Ray Client), or a local Ray instance
      started for the run with ``runtime.workers`` CPUs.
    """
    if runtime.task_runner == "threads":
        if runtime.address:
            raise ConfigError(f"runtime.address ({runtime.address!r}) needs runtime.task_runner: dask or ray")
        return ThreadPoolTaskRunner(max_workers=runtime.workers)
    if runtime.task_runner == "dask":
        DaskTaskRunner = _runner_class("dask", "distributed", "prefect_dask", "DaskTaskRunner")
        if runtime.address:
            return DaskTaskRunner(address=runtime.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": runtime.workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    if runtime.task_runner == "ray":
        RayTaskRunner = _runner_class("ray", "ray", "prefect_ray", "RayTaskRunner")
        if runtime.address:
            return RayTaskRunner(address=runtime.address)
        # "local": a new instance even where RAY_ADDRESS or a `ray start` cluster exists
        return RayTaskRunner(address="local", init_kwargs={"num_cpus": runtime.workers, "include_dashboard": False})
    raise ConfigError(f"runtime.task_runner: unknown runner {runtime.task_runner!r}")


def _runner_class(runner: str, engine: str, module: str, name: str):
    """Prefect's task runner class ``module.name`` for ``runtime.task_runner: runner``, after importing the
    cluster package ``engine``; a missing package stops the run with the install line."""
    import importlib

    try:
        importlib.import_module(engine)
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise MissingDependency(f"runtime.task_runner: {runner}", exc.name or module, _CLUSTER_EXTRA) from exc


def _address_host(address: str) -> str:
    from urllib.parse import urlsplit

    return (urlsplit(address if "://" in address else f"tcp://{address}").hostname or "").lower()


_LOOPBACK = {"127.0.0.1", "localhost", "::1", ""}


@contextlib.contextmanager
def api_for_workers(runtime: RuntimeSpec) -> Iterator[str | None]:
    """Make sure the cluster's worker processes can reach this run's Prefect API.

    Dask and Ray task runners send the flow's settings with every task, so workers use whatever
    ``PREFECT_API_URL`` the flow process has. In ephemeral mode (no URL) each worker would start
    a temporary server of its own, which knows nothing of this flow run; so for those runners the
    temporary server is started here and its URL (``http://127.0.0.1:<port>/api``) set for the run.
    That URL is reachable from worker processes on this machine only: a cluster on other machines
    needs ``PREFECT_API_URL`` set to a server every node reaches (a warning says so)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    url = PREFECT_API_URL.value()
    if runtime.task_runner == "threads":
        yield url
        return
    if not url and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the instance Prefect's own client would start
        server.start()
        url = server.api_url
        ctx: contextlib.AbstractContextManager = temporary_settings(updates={PREFECT_API_URL: url})
    else:
        ctx = contextlib.nullcontext()
    if runtime.address and _address_host(runtime.address) not in _LOOPBACK and url and _address_host(url) in _LOOPBACK:
        logging.getLogger("curate").warning(
            "runtime.address %s is another machine, but the Prefect API is %s: workers there cannot report their task runs. "
            "Start a Prefect server every node reaches and set PREFECT_API_URL (docs/scale.md).", runtime.address, url)
    with ctx:
        yield url


def run_prefect(spec: FlowSpec) -> dict[str, Any]:
    runner = task_runner(spec.runtime)
    with api_for_workers(spec.runtime):
        return curate_flow.with_options(task_runner=runner)(
            spec=spec.model_dump(mode="json"), flow_path=spec.flow_path, name=spec.name, config_hash=spec.fingerprint()
        )
