"""The run's spine: plug-in registries, what a run prints when output is not a terminal, expected errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import write_flow
from curate.config import load_flow
from curate.errors import ConfigError


def test_embedders_come_from_a_registry(tmp_path):
    from curate.config import EmbedSpec
    from curate.embed import EMBEDDERS, build_embedder
    from curate.embed.base import Embedder

    assert "sentence_transformers" in EMBEDDERS
    e = build_embedder(EmbedSpec(), torch_threads=1)
    assert isinstance(e, Embedder) and e.fingerprint()["dim"] == 384  # read from the model's files, no weights loaded
    (tmp_path / "r.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    flow = write_flow(tmp_path, inputs=[{"path": "r.jsonl"}], embed={"method": "word2vec"})
    with pytest.raises(ConfigError, match=r"test.yaml:\d+: embed.method: unknown embedder 'word2vec'"):
        load_flow(flow)


def _cli(args, cwd, **env):
    full = {**os.environ, **env}
    full.pop("CURATE_NO_PROGRESS", None)
    return subprocess.run([sys.executable, "-m", "curate", *args], cwd=cwd, capture_output=True, text=True, env=full, timeout=300)


@pytest.mark.slow
def test_log_reads_well_when_output_is_not_a_terminal(tmp_path):
    rows = "".join(json.dumps({"instruction": f"Name {i} fruits.", "output": "apple pear " * (i + 1)}) + "\n" for i in range(30))
    (tmp_path / "rows.jsonl").write_text(rows)
    write_flow(tmp_path, name="logs", inputs=[{"path": "rows.jsonl"}], ingest={"shard_size": 10}, score=[{"method": "heuristic"}],
               embed={"model": "all-MiniLM-L6-v2"}, select=[{"method": "kcenter", "budget": 5}], report={"plots": False},
               runtime={"prefect": False, "torch_threads": 1})
    r = _cli(["run", "logs.yaml"], tmp_path)  # progress left to auto: stderr is a pipe, not a terminal
    assert r.returncode == 0, r.stderr
    log = r.stderr
    for shard in range(3):
        assert f"score heuristic shard {shard}: 10 done in" in log
        assert f"embed all-MiniLM-L6-v2 shard {shard}: 10 done in" in log
    assert "Loading weights" not in log and "it/s]" not in log and "\r" not in log  # no library progress bars
    r = _cli(["run", "logs.yaml"], tmp_path)
    assert "score heuristic shard 0: 10 rows already in the store" in r.stderr


def test_missing_input_stops_before_prefect_starts(tmp_path):
    write_flow(tmp_path, name="missing", inputs=[{"path": "nowhere/*.jsonl"}], runtime={"prefect": True})
    r = _cli(["run", "missing.yaml"], tmp_path)
    assert r.returncode == 2
    out = (r.stdout + r.stderr).strip()
    assert out.count("\n") == 0 and "nowhere/*.jsonl: the pattern matches no file" in out, out
    assert "Traceback" not in out and "temporary server" not in out
