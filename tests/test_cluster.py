"""The same flow on a real local Ray cluster and a real Dask cluster: byte-identical selections,
ledgers and exports to the thread-pool runner, with the model stages' shards run by the clusters'
worker processes and reported to the flow's Prefect API.

Ray: a head and a second node, each its own ``ray start`` (1 CPU, on 127.0.0.1, a temp dir of
their own), with the store in an S3 bucket (moto's S3 server, see conftest's ``s3_bucket``); teardown ends those two process groups only (``ray stop`` would stop every Ray on the
machine). Dask: a ``distributed.LocalCluster`` of two worker processes, one thread each.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from curate.config import load_flow
from curate.launch import run
from conftest import ROOT, write_flow

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

N_SHARDS = 4
SHARD_TASKS = {f"{kind}-{i}" for kind in ("embed", "score-heuristic") for i in range(N_SHARDS)}


def _flow(directory: Path, runtime: dict, store: str | None = None) -> Path:
    """80 sample rows in 4 shards: heuristic scores, MiniLM embeddings, a threshold and k-center."""
    return write_flow(
        directory, name="cluster", base_dir=str(ROOT), output_dir=str(directory / "out"), store_dir=store or str(directory / "store"),
        inputs=[{"path": "data/sample/alpaca_gpt4_en.json", "limit": 60}, {"path": "data/sample/cherry_alpaca.jsonl", "limit": 20}],
        ingest={"shard_size": 20}, score=[{"method": "heuristic"}], embed={"model": "all-MiniLM-L6-v2", "batch_size": 16},
        select=[{"method": "threshold", "score": "heuristic.response_tokens", "min": 3}, {"method": "kcenter", "budget": 20}],
        export={"layouts": ["messages", "alpaca", "sharegpt"], "file_types": ["jsonl", "parquet"]}, report={"plots": False},
        runtime={"prefect": True, "workers": 2, "torch_threads": 1, "progress": False, **runtime})


def _outputs(out: Path) -> dict[str, bytes]:
    """The files a runner must not change: the selection, the ledgers and every export file."""
    files = [out / "select" / "selected_ids.txt", out / "ledger.parquet", out / "derived_ledger.parquet"]
    files += sorted(p for p in (out / "export").rglob("*") if p.is_file())
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def _task_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
    return {r.name: r.state.name for r in runs}


def _check_run(result: dict, reference: dict[str, bytes], out: Path) -> None:
    assert result["reconciled"] and result["counts"]["selected"] == 20
    assert result["task_runner"] in ("RayTaskRunner", "DaskTaskRunner")
    got = _outputs(out)
    assert sorted(got) == sorted(reference)
    assert len(reference) >= 3 + 6  # selected ids, 2 ledgers, 3 layouts × 2 file types (+ configs, scores)
    different = [name for name in reference if got[name] != reference[name]]
    assert not different, f"differ from the threads runner: {different}"
    # every shard task reached the flow's Prefect API from the worker that ran it
    states = _task_states(result["flow_run_id"])
    assert {name: states.get(name) for name in SHARD_TASKS} == dict.fromkeys(SHARD_TASKS, "Completed")
    assert states["select"] == "Completed" and states["export-configs"] == "Completed"


@pytest.fixture(scope="module")
def reference(prefect_harness, tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("threads")
    result = run(load_flow(_flow(d, {"task_runner": "threads"})))
    assert result["reconciled"] and result["counts"]["selected"] == 20
    return _outputs(d / "out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    path = Path(sys.executable).with_name("ray")
    return str(path) if path.exists() else shutil.which("ray") or "ray"


def _end_groups(pgids: list[int], temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, the process groups of our own `ray start` calls, and any process
    still running from our cluster's temp dir (a worker a raylet started in a group of its own)."""

    def ours() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.getpgid(int(proc.name)) in pgids or temp_dir.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except (OSError, ProcessLookupError):
                continue
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while ours() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not ours():
            return


@pytest.fixture(scope="module")
def ray_cluster(s3_bucket):
    """A Ray head and one more node on 127.0.0.1, 1 CPU each; yields (address, temp dir). Started after
    the S3 endpoint, so its worker processes reach it (they inherit the environment)."""
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", "--object-store-memory=150000000",
              "--dashboard-agent-listen-port=0", "--metrics-export-port=0"]
    head = [_ray_bin(), "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={_free_port()}", f"--dashboard-port={_free_port()}", *common]
    node = [_ray_bin(), "start", f"--address=127.0.0.1:{port}", *common]
    pgids: list[int] = []
    try:
        for cmd in (head, node):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            pgids.append(proc.pid)  # a new session: its group id is its pid, and the daemons it starts keep it
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        _end_groups(pgids, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_cluster_matches_threads(reference, ray_cluster, s3_bucket, tmp_path):
    """On Ray with the store in an S3 bucket (store_dir: s3://…): the workers read their shards from and
    write scores, embeddings and Prefect's cache records to the bucket; then the threads runner on the
    same bucket computes nothing again and gives the same files."""
    import fsspec

    address, temp_dir = ray_cluster
    store = f"s3://{s3_bucket}/ray-{tmp_path.name}/store"
    result = run(load_flow(_flow(tmp_path / "ray", {"task_runner": "ray", "address": address}, store)))
    _check_run(result, reference, tmp_path / "ray" / "out")
    keys = [k.removeprefix(store.removeprefix("s3://") + "/") for k in fsspec.filesystem("s3", skip_instance_cache=True).find(store)]
    assert {k.split("/")[0] for k in keys} >= {"scores", "embeddings", "shards", "prefect-results", "store_id"}
    assert sum("/done/" in k for k in keys) == len(SHARD_TASKS)
    again = run(load_flow(_flow(tmp_path / "threads", {"task_runner": "threads"}, store)))
    assert {s["stage"]: s["computed_rows"] for s in again["stages"] if s.get("computed_rows") is not None} == {"embed": 0, "score:heuristic": 0}
    assert _outputs(tmp_path / "threads" / "out") == reference
    # the shard tasks ran in the cluster's worker processes; the once-only stages in this one
    logs = "".join(p.read_text(errors="replace") for p in Path(temp_dir).glob("session_*/logs/worker-*")
                   if p.suffix in (".out", ".err"))
    assert all(f"Task run '{name}'" in logs for name in SHARD_TASKS)
    assert "Task run 'select'" not in logs and "Task run 'ingest-0'" not in logs


def test_dask_cluster_matches_threads(reference, tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        with get_task_stream(client=client) as stream:
            result = run(load_flow(_flow(tmp_path, {"task_runner": "dask", "address": cluster.scheduler_address})))
        workers = set(cluster.scheduler_info["workers"])
    _check_run(result, reference, tmp_path / "out")
    # the cluster ran exactly the shard tasks (embed and score, 4 shards each), on its worker processes
    assert len(stream.data) == len(SHARD_TASKS)
    assert {t["worker"] for t in stream.data} <= workers


def test_runner_choice_and_missing_extra(tmp_path, monkeypatch):
    from curate.errors import ConfigError, MissingDependency
    from curate.flow import task_runner

    threads = load_flow(_flow(tmp_path / "t", {"task_runner": "threads"}))
    on_ray = load_flow(_flow(tmp_path / "r", {"task_runner": "ray", "address": "10.0.0.5:6379"}))
    assert threads.fingerprint() == on_ray.fingerprint()  # where it runs is not what it computes
    assert type(task_runner(on_ray.runtime)).__name__ == "RayTaskRunner" and task_runner(on_ray.runtime).address == "10.0.0.5:6379"
    with pytest.raises(ConfigError, match="needs runtime.task_runner: dask or ray"):
        task_runner(threads.runtime.model_copy(update={"address": "tcp://10.0.0.5:8786"}))
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if the cluster extra were not installed
    with pytest.raises(MissingDependency, match=r"pip install 'curate\[cluster\]'"):
        task_runner(threads.runtime.model_copy(update={"task_runner": "dask"}))


def test_ray_gpu_request_follows_explicit_cuda_devices():
    from curate.config import EmbedSpec, StepSpec
    from curate.executors import task_gpus

    assert task_gpus({"spec": EmbedSpec(device="cuda:0"), "store_dir": "s"}) == 1
    assert task_gpus({"step": StepSpec(method="ifd", model="m", device="cuda")}) == 1
    assert task_gpus({"spec": EmbedSpec(), "store_dir": "s"}) == 0  # cpu
    assert task_gpus({"step": StepSpec(method="ifd", model="m", device="auto")}) == 0  # "a GPU if the worker has one"
    assert task_gpus({"step": StepSpec(method="heuristic")}) == 0
