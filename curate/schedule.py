"""Scheduled curation: the Prefect UI on loopback, deployments served on a schedule, and a
``prefect.yaml`` for work pools (reference: prefect.md §7 and §9).

- :func:`start_ui` / :func:`stop_ui` (``curate ui [--stop]``): a Prefect server on 127.0.0.1 in the
  background, waited for until it answers; ``PREFECT_API_URL`` is set in the active Prefect profile, so
  every later ``curate`` (and ``prefect``) command in that environment reports to it.
- :func:`deployments` / :func:`serve` (``curate serve FLOW.yaml … --cron/--interval``): one deployment
  per flow file, named after the flow, of :func:`scheduled_curation` — a flow that reads the flow file
  *when it runs* (so an edited file or a grown input folder is picked up) with the deployment's
  ``overrides`` (``--set`` values, editable in the UI as a parameter; ``runtime.versioned=true`` is added,
  so each run writes ``<output_dir>/runs/<number>-<UTC time>/`` and moves ``<output_dir>/latest``). Served by ``flow.serve``'s
  runner (no work pool), with ``pause_on_shutdown=False`` so a restart never silently stops the
  schedule, and a deployment concurrency limit of 1 so two runs never write one output folder at once.
- :func:`prefect_yaml` (``curate deploy``): the same deployments for ``prefect deploy`` on a work pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import curate.flow  # noqa: F401  (curate's Prefect settings)
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from curate.errors import ConfigError, CurateError

HOST = "127.0.0.1"


def _run_name() -> str:
    """``curate-<flow file stem>`` for a run of a deployment."""
    from prefect.runtime import flow_run

    return f"curate-{Path(flow_run.parameters.get('flow_file', 'flow')).stem}"


# one task at a time, as `curate run` with the default runtime.workers (model stages share one loaded model)
@flow(name="curate-scheduled", flow_run_name=_run_name, persist_result=False, validate_parameters=True,
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def scheduled_curation(flow_file: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the curation stages of the flow in ``flow_file`` (read now, with ``overrides`` applied), as
    ``curate run`` does: one task at a time, or with ``runtime.task_runner: dask | ray`` as a nested
    ``curate`` flow run whose shard tasks go to that cluster. A ``train:`` section is not run here (use
    ``curate train``)."""
    from curate.config import load_flow
    from curate.executors import PrefectExecutor
    from curate.launch import check_inputs
    from curate.pipeline import execute
    from curate.store import prefect_results_dir

    spec = load_flow(flow_file, list(overrides or []))
    check_inputs(spec)
    if spec.runtime.task_runner != "threads":  # the runner is known only now, so it runs in a subflow that has it
        from curate.flow import run_prefect

        return run_prefect(spec)
    return execute(spec, PrefectExecutor(prefect_results_dir(spec.store)))


# -- deployments ----------------------------------------------------------------------------------


def _schedules(cron: str | None, interval: float | None, timezone: str | None) -> list:
    from prefect.schedules import Cron, Interval

    if (cron is None) == (interval is None):
        raise ConfigError("give exactly one of --cron (e.g. \"0 3 * * *\") or --interval (seconds)")
    from pydantic import ValidationError
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    tz = timezone or "UTC"
    try:  # Prefect's own checks of the expression and the timezone, before anything is registered
        if cron is not None:
            CronSchedule(cron=cron, timezone=tz)
        else:
            IntervalSchedule(interval=interval, timezone=tz)
    except ValidationError as exc:
        what = f"cron {cron!r}" if cron is not None else f"interval {interval!r} s"
        raise ConfigError(f"schedule: {exc.errors()[0]['msg']} ({what}, timezone {tz!r})") from None
    # an interval is anchored at midnight (in its time zone), so restarting serve does not shift its slots
    import datetime
    from zoneinfo import ZoneInfo

    anchor = datetime.datetime(2026, 1, 1, tzinfo=ZoneInfo(tz))
    return [Cron(cron, timezone=tz)] if cron is not None else [Interval(interval, anchor_date=anchor, timezone=tz)]


def deployments(flow_files: list[str | os.PathLike], overrides: list[str] | None = None, cron: str | None = None,
                interval: float | None = None, timezone: str | None = None, versioned: bool | None = True) -> list:
    """One ``RunnerDeployment`` per flow file (validated now, so a bad file fails before serving). Runs
    of a deployment are ``versioned`` by default (a folder per run, ``latest`` moved atomically)."""
    from curate.config import load_flow

    schedules = _schedules(cron, interval, timezone)
    out, names = [], set()
    for f in flow_files:
        path = Path(f).resolve()
        spec = load_flow(path, list(overrides or []))
        if spec.name in names:
            raise ConfigError(f"{path}: two flows are named '{spec.name}'; deployments are named after the flow")
        names.add(spec.name)
        params = [*(overrides or []), *([] if versioned is None else [f"runtime.versioned={'true' if versioned else 'false'}"])]
        out.append(scheduled_curation.to_deployment(
            name=spec.name, schedules=schedules, parameters={"flow_file": str(path), "overrides": params},
            description=spec.description or f"curate {spec.name}", tags=["curate"], concurrency_limit=1,
            version=_version(path)))
    return out


def _version(path: Path) -> str:
    """The git commit of the flow file's checkout (short), else the file's sha256 (short)."""
    try:
        sha = subprocess.run(["git", "-C", str(path.parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            return sha.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from curate.io import file_sha256

    return file_sha256(path)[:12]


def serve(flow_files: list[str | os.PathLike], overrides: list[str] | None = None, cron: str | None = None,
          interval: float | None = None, timezone: str | None = None, pause_on_shutdown: bool = False, versioned: bool = True) -> None:
    """Register the deployments and serve them until interrupted (runs go to the API at PREFECT_API_URL)."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise CurateError("curate serve needs a Prefect server that stays up: start one with `curate ui` (or set PREFECT_API_URL)")
    deps = deployments(flow_files, overrides, cron, interval, timezone, versioned)
    prefect_serve(*deps, pause_on_shutdown=pause_on_shutdown)


def prefect_yaml(flow_files: list[str | os.PathLike], pool: str, overrides: list[str] | None = None, cron: str | None = None,
                 interval: float | None = None, timezone: str | None = None, project_dir: str | os.PathLike = ".") -> str:
    """A ``prefect.yaml`` with one deployment per flow file, on the work pool ``pool`` (``prefect deploy --all``)."""
    import yaml

    from curate.config import load_flow

    _schedules(cron, interval, timezone)  # validates
    root = Path(project_dir).resolve()
    entries = []
    for f in flow_files:
        path = Path(f).resolve()
        spec = load_flow(path, list(overrides or []), check_output=False)  # its output_dir is on the workers' hosts
        sched = {"cron": cron, "timezone": timezone or "UTC"} if cron else {"interval": interval, "timezone": timezone or "UTC"}
        entries.append({
            "name": spec.name, "description": spec.description or f"curate {spec.name}",
            "entrypoint": "curate.schedule:scheduled_curation",  # a module path: any host with curate installed
            "parameters": {"flow_file": os.path.relpath(path, root), "overrides": [*(overrides or []), "runtime.versioned=true"]},
            "tags": ["curate"], "concurrency_limit": 1, "schedules": [{**sched, "active": True}],
            "work_pool": {"name": pool, "work_queue_name": None, "job_variables": {}},
        })
    doc = {"name": "curate", "prefect-version": _prefect_version(),
           "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}], "deployments": entries}
    return ("# Written by `curate deploy`. Register with `prefect deploy --all`, then run a worker on each host:\n"
            f"#   prefect work-pool create {pool} --type process   (once)\n#   prefect worker start --pool {pool}\n"
            + yaml.safe_dump(doc, sort_keys=False))


def _prefect_version() -> str:
    import prefect

    return prefect.__version__


# -- the UI ---------------------------------------------------------------------------------------


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def _answers(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url(port)}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _prefect(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True, text=True, env=env or os.environ.copy())


def start_ui(port: int = 4200, timeout_s: float = 180.0) -> str:
    """Start a Prefect server on 127.0.0.1:``port`` in the background (unless one answers there
    already), wait until it answers, and point the active Prefect profile at it. Returns the UI URL."""
    if not _answers(port):
        # the UI in the browser calls the API at PREFECT_SERVER_UI_API_URL (else it assumes port 4200)
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_API_URL": api_url(port),
               "PREFECT_API_URL": api_url(port)}
        res = _prefect("server", "start", "--host", HOST, "--port", str(port), "--background", "--analytics-off", env=env)
        if res.returncode != 0 and not _answers(port):
            raise CurateError(f"could not start the Prefect server on {HOST}:{port}: {(res.stderr or res.stdout).strip()[-800:]}")
        deadline = time.monotonic() + timeout_s
        while not _answers(port):
            if time.monotonic() > deadline:
                raise CurateError(f"the Prefect server on {HOST}:{port} did not answer within {timeout_s:.0f} s "
                                  "(a first start migrates its database; try again, or see `prefect server status`)")
            time.sleep(1)
    res = _prefect("config", "set", f"PREFECT_API_URL={api_url(port)}")
    if res.returncode != 0:
        raise CurateError(f"could not set PREFECT_API_URL in the Prefect profile: {res.stderr.strip()[-500:]}")
    return f"http://{HOST}:{port}"


def stop_ui() -> None:
    """Stop the background server and take PREFECT_API_URL out of the profile (runs go back to a
    temporary server per run)."""
    _prefect("server", "stop")
    _prefect("config", "unset", "PREFECT_API_URL", "-y")
