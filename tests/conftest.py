"""Test setup: isolated Prefect state, offline hub, one Prefect harness for the session.

PREFECT_HOME must point at a temp dir before prefect is imported, so nothing touches the
developer's ~/.prefect (see docs/prefect.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="curate-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "storage")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = os.path.join(_PREFECT_HOME, "hf-datasets")  # datasets.load_dataset caches here, not in ~/.cache
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["CURATE_NO_PROGRESS"] = "1"

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
FIXTURES = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def prefect_harness():
    """The real Prefect API on a temporary SQLite database, started once for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def s3_bucket():
    """An S3 endpoint on 127.0.0.1 for URL stores: moto's S3 server (an implementation of the S3 HTTP
    API; no real S3 is reachable from the test machines), in a thread of this process. Its address and
    dummy credentials go into the environment, where s3fs/botocore read them, here and in the worker
    processes a cluster fixture starts afterwards. Yields the bucket name."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "curate-test", "AWS_SECRET_ACCESS_KEY": "curate-test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("curate-test")
        yield "curate-test"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


#: seconds `transformers serve` gets to load the model and answer a first request (under a minute on a busy 2-core machine)
SERVE_START_S = 300


@pytest.fixture(scope="session")
def transformers_server(tmp_path_factory):
    """A real OpenAI-compatible server: ``transformers serve --continuous-batching`` on a free
    127.0.0.1 port, serving the bundled SmolLM2 (de-quantised once into a local HF directory by
    curate's model resolver), offline. Ready once a chat request is answered; if it exits or is not
    ready within :data:`SERVE_START_S` seconds, the test fails with the server's log. Stopped (SIGTERM,
    then SIGKILL to its process group) at the end of the session. Yields ``base_url``, ``model`` (the
    name requests give: the model directory the server is pinned to) and ``log`` (its output file).

    The continuous-batching KV cache is sized by flags (32 pages of 256 tokens, 2048 tokens per
    step): left to itself, on CPU, it takes 90% of free RAM (13 GB here)."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    import httpx

    from curate.models import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct").location
    with socket.socket() as s:  # a free port (closed again just before the server binds it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("transformers-serve") / "serve.log"
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--continuous-batching", "--cb-num-blocks", "32", "--cb-max-batch-tokens", "2048", "--enable-log-requests"]
    # one torch thread: the tests' own process computes too, and on shared cores two threads that wait for each
    # other at every operation made SmolLM2's plain `generate` 8x slower than one (measured at load average 8)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()  # uvicorn shuts down; the model's process exits with its parent
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its session (start_new_session: its own group)
        except ProcessLookupError:
            pass
        proc.wait()

    def fail(why: str) -> None:
        stop()
        pytest.fail(f"transformers serve {why}: {' '.join(cmd)}\n--- its log ({log}) ---\n{log.read_text(errors='replace')[-6000:]}")

    deadline, ready = time.monotonic() + SERVE_START_S, False
    probe = {"model": model_dir, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    while not ready:
        if proc.poll() is not None:
            fail(f"exited with code {proc.returncode} before answering")
        if time.monotonic() > deadline:
            fail(f"did not answer a chat request within {SERVE_START_S} s")
        try:
            resp = httpx.post(f"{base_url}/chat/completions", json=probe, timeout=60)
        except httpx.HTTPError:  # not listening yet
            resp = None
        if resp is not None and resp.status_code != 200:
            fail(f"answered a first chat request with HTTP {resp.status_code}: {resp.text[:300]}")
        ready = resp is not None
        if not ready:
            time.sleep(0.5)
    try:
        yield SimpleNamespace(base_url=base_url, model=model_dir, log=log, proc=proc)
    finally:
        stop()


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory) -> Path:
    """A store shared by tests that only need embeddings to exist (computed once per session)."""
    return tmp_path_factory.mktemp("store")


def write_flow(directory: Path, **spec) -> Path:
    """Write a flow YAML into ``directory`` (paths in it are relative to that directory)."""
    spec.setdefault("name", "test")
    spec.setdefault("output_dir", "out")
    spec.setdefault("store_dir", "store")
    runtime = spec.setdefault("runtime", {})
    runtime.setdefault("prefect", False)
    runtime.setdefault("torch_threads", 2)
    runtime.setdefault("progress", False)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def copy_sample(directory: Path, *names: str) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(SAMPLE / n, directory / n)
    return list(names)


@pytest.fixture
def flow_dir(tmp_path) -> Path:
    return tmp_path


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright (Playwright cannot download its own browsers here):
    ``$CURATE_CHROMIUM`` or ``chromium`` on PATH; for the UI, report and ``curate browse`` tests. Module-scoped:
    Playwright's sync API keeps an asyncio loop running in this thread while it is open, and a later test that
    calls ``asyncio.run`` (the stand-in and OpenAI-client servers) would fail inside it."""
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    path = os.environ.get("CURATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium: `bash scripts/setup.sh --test` installs Debian's chromium (or set CURATE_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()
