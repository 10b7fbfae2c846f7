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
