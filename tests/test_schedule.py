"""Scheduled curation: deployments named after their flows with the cron schedule and time zone,
`--set` overrides as an editable parameter, a concurrency limit of 1; `curate serve` as a real process
against a real Prefect API — a run triggered through the API (what the UI's Quick run does) is
executed by it, and stopping it leaves the schedule active (pause_on_shutdown false); `curate deploy`
writes a prefect.yaml whose entrypoint Prefect can load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, write_flow
from curate.errors import ConfigError


def tiny_flow(directory: Path, name: str) -> Path:
    return write_flow(directory, name=name, base_dir=str(ROOT), output_dir=str(directory / "out" / name), store_dir=str(directory / "store"),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 6}], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 3}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                      runtime={"prefect": True, "torch_threads": 1, "progress": False})


def test_one_deployment_per_flow_with_its_schedule(tmp_path):
    from curate.schedule import deployments

    a, b = tiny_flow(tmp_path, "nightly-a"), tiny_flow(tmp_path, "nightly-b")
    deps = deployments([a, b], ["select.0.budget=2"], cron="0 3 * * *", timezone="Europe/Berlin")
    assert [d.name for d in deps] == ["nightly-a", "nightly-b"]
    for d, f in zip(deps, (a, b)):
        (s,) = d.schedules
        assert s.schedule.cron == "0 3 * * *" and s.schedule.timezone == "Europe/Berlin" and s.active
        assert d.parameters == {"flow_file": str(f.resolve()), "overrides": ["select.0.budget=2", "runtime.versioned=true"]}
        assert d.concurrency_limit == 1 and d.entrypoint.endswith("schedule.py:scheduled_curation")
    (d,) = deployments([a], interval=3600)
    assert d.schedules[0].schedule.interval.total_seconds() == 3600 and d.schedules[0].schedule.timezone == "UTC"
    with pytest.raises(ConfigError, match="Invalid cron"):
        deployments([a], cron="61 3 * * *")
    with pytest.raises(ConfigError, match="exactly one of --cron"):
        deployments([a], cron="0 3 * * *", interval=60)
    with pytest.raises(ConfigError, match="two flows are named"):
        deployments([a, a], cron="0 3 * * *")
    with pytest.raises(ConfigError, match="timezone"):
        deployments([a], cron="0 3 * * *", timezone="Mars/Olympus")


def test_prefect_yaml_for_work_pools(tmp_path):
    from prefect.flows import load_flow_from_entrypoint

    from curate.schedule import prefect_yaml

    f = tiny_flow(tmp_path, "weekly")
    doc = yaml.safe_load(prefect_yaml([f], "gpu-pool", ["select.0.budget=2"], cron="0 4 * * 1", project_dir=tmp_path))
    (d,) = doc["deployments"]
    assert d["name"] == "weekly" and d["work_pool"]["name"] == "gpu-pool" and d["concurrency_limit"] == 1
    assert d["schedules"] == [{"cron": "0 4 * * 1", "timezone": "UTC", "active": True}]
    assert d["parameters"] == {"flow_file": "weekly.yaml", "overrides": ["select.0.budget=2", "runtime.versioned=true"]}
    assert doc["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(tmp_path.resolve())
    assert load_flow_from_entrypoint(d["entrypoint"]).name == "curate-scheduled"  # a module path: loads wherever curate is installed


@pytest.mark.prefect
def test_curate_serve_runs_triggered_flows_and_keeps_the_schedule_on_stop(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow = tiny_flow(tmp_path, "served")
    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "serve", str(flow), "--cron", "0 3 * * *", "--timezone", "Europe/Berlin",
                             "--set", "select.0.budget=2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    async def deployment():
        async with get_client() as client:
            try:
                return await client.read_deployment_by_name("curate-scheduled/served")
            except Exception:  # noqa: BLE001 - not registered yet
                return None

    try:
        deadline = time.monotonic() + 120
        while (dep := asyncio.run(deployment())) is None:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "curate serve did not register the deployment"
            time.sleep(1)
        (s,) = dep.schedules
        assert s.schedule.cron == "0 3 * * *" and s.schedule.timezone == "Europe/Berlin" and s.active and not dep.paused
        assert dep.parameters["overrides"] == ["select.0.budget=2", "runtime.versioned=true"]
        run = run_deployment("curate-scheduled/served", timeout=240)  # what the UI's Quick run does
        assert run.state.is_completed(), run.state
        summary = yaml.safe_load((tmp_path / "out" / "served" / "latest" / "run.json").read_text())  # the run's own folder
        assert summary["counts"]["selected"] == 2 and summary["flow_run_id"] == str(run.id)  # the deployment's overrides applied
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    dep = asyncio.run(deployment())
    assert not dep.paused and all(s.active for s in dep.schedules)  # pause_on_shutdown=False: the schedule survives a restart


def test_a_scheduled_run_uses_the_flows_task_runner(prefect_harness, tmp_path):
    """A deployment's flow reads runtime.task_runner when it runs: dask here (a local cluster of two
    worker processes) runs the shard tasks in a nested `curate` flow run with Prefect's Dask runner."""
    from prefect.client.orchestration import get_client

    from curate.schedule import scheduled_curation

    flow = tiny_flow(tmp_path, "on-dask")
    state = scheduled_curation(flow_file=str(flow), overrides=["runtime.task_runner=dask", "runtime.workers=2"], return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["task_runner"] == "DaskTaskRunner" and result["counts"]["selected"] == 3 and result["reconciled"]
    with get_client(sync_client=True) as client:
        nested = client.read_flow_run(result["flow_run_id"])
    assert nested.parent_task_run_id is not None and nested.id != state.state_details.flow_run_id
