"""``store_dir`` as an fsspec URL: the store on S3 (moto's S3 server on 127.0.0.1, see the ``s3_bucket``
fixture) gives the same selections and exports as a local store, resumes from what it holds, and
detects damaged parts there as it does on disk. The same store from a Ray cluster: tests/test_cluster.py.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curate.config import load_flow
from curate.errors import CurateError
from curate.io import is_url, location
from curate.launch import run
from conftest import ROOT, write_flow


def _flow(directory: Path, store: str) -> Path:
    """80 sample rows in 4 shards: heuristic scores, MiniLM embeddings, a threshold and k-center."""
    return write_flow(
        directory, name="s3", base_dir=str(ROOT), output_dir=str(directory / "out"), store_dir=store,
        inputs=[{"path": "data/sample/alpaca_gpt4_en.json", "limit": 60}, {"path": "data/sample/cherry_alpaca.jsonl", "limit": 20}],
        ingest={"shard_size": 20}, score=[{"method": "heuristic"}], embed={"model": "all-MiniLM-L6-v2", "batch_size": 16},
        select=[{"method": "threshold", "score": "heuristic.response_tokens", "min": 3}, {"method": "kcenter", "budget": 20}],
        export={"layouts": ["messages", "alpaca"], "file_types": ["jsonl", "parquet"]}, report={"plots": False})


def _outputs(out: Path) -> dict[str, bytes]:
    files = [out / "select" / "selected_ids.txt", out / "ledger.parquet"] + sorted(p for p in (out / "export").rglob("*") if p.is_file())
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def _computed(result: dict) -> dict[str, int]:
    return {s["stage"]: s["computed_rows"] for s in result["stages"] if s.get("computed_rows") is not None}


def _fresh_fs():
    """An s3fs instance of its own (its own listing cache), as another process would have."""
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def test_flow_on_an_s3_store_matches_a_local_store(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    url = f"s3://{s3_bucket}/{uuid.uuid4().hex[:8]}/store"
    local = run(load_flow(_flow(tmp_path / "local", str(tmp_path / "store"))))
    first = run(load_flow(_flow(tmp_path / "remote", url)))
    again = run(load_flow(_flow(tmp_path / "remote2", url)))
    reference = _outputs(tmp_path / "local" / "out")
    assert local["reconciled"] and first["reconciled"] and first["counts"] == local["counts"]
    assert _outputs(tmp_path / "remote" / "out") == reference
    assert _outputs(tmp_path / "remote2" / "out") == reference
    assert _computed(first) == {"embed": 80, "score:heuristic": 80}
    assert _computed(again) == {"embed": 0, "score:heuristic": 0}  # everything came from the bucket
    # what the store holds is in the bucket: parts and done-markers per collection, the shards the tasks read
    prefix = url.removeprefix("s3://") + "/"
    keys = [k.removeprefix(prefix) for k in _fresh_fs().find(url)]
    for kind in ("scores", "embeddings"):
        assert sum(k.startswith(f"{kind}/") and k.endswith(".parquet") and "/part-" in k for k in keys) >= 1
        assert sum(k.startswith(f"{kind}/") and "/done/" in k for k in keys) == 4
    assert sum(k.startswith("shards/") for k in keys) == 4
    # nothing was written to a local folder named after the URL; the memory-mapped matrix is a local cache file
    assert not any(p.name.startswith("s3:") for d in (tmp_path, ROOT, Path.cwd()) for p in d.iterdir())
    assert not any("s3:" in str(p) for p in tmp_path.rglob("*"))
    assert list((tmp_path / "cache" / "matrix").rglob("*.npy"))
    # the machine-local caches (ingest chunks) went to the local cache folder, not the bucket
    assert not any(k.startswith("ingest/") for k in keys) and list((tmp_path / "cache" / "stores").glob("*/ingest"))


def test_a_damaged_part_in_the_bucket_is_set_aside(s3_bucket):
    from curate.store import Store, StoreCorrupt

    url = f"s3://{s3_bucket}/{uuid.uuid4().hex[:8]}/store"
    coll = Store(url).scores("k" * 64)
    table = pa.table({"sample_id": ["a", "b"], "variant": ["x", "x"], "score": [1.0, 2.0], "status": ["ok", "ok"]})
    part = coll.write(table)
    coll.mark_done("shard0", {"shard_id": 0})
    assert coll.done("shard0") and coll.stored(["a", "b", "c"]).tolist() == [True, True, False]
    fs = _fresh_fs()  # another writer garbles the part (same size would pass the marker's size check: make it shorter)
    fs.pipe_file(part.path, b"PAR1 not parquet")
    with pytest.raises(StoreCorrupt, match="set aside"):
        Store(url).scores("k" * 64).read()
    names = [p.rsplit("/", 2)[-2:] for p in fs.find(str(coll.dir))]
    assert ["corrupt", part.name] in names and not any(n[0] == "done" for n in names)
    assert Store(url).scores("k" * 64).parts() == []


def test_parts_written_by_another_process_are_seen(s3_bucket):
    """This process has listed the collection and its markers (fsspec caches listings); another client
    then adds a part and a marker: both are seen, and the marker's part check passes."""
    from curate.store import Store

    url = f"s3://{s3_bucket}/{uuid.uuid4().hex[:8]}/store"
    coll = Store(url).embeddings("e" * 64)
    vec = pa.array([np.ones(3, np.float32)], pa.list_(pa.float32()))
    coll.write(pa.table({"sample_id": ["a"], "status": ["ok"], "vector": vec}))
    coll.mark_done("s0", {})
    assert [p.name for p in coll.parts()] == [coll.parts()[0].name] and coll.done("s0") and not coll.done("s1")
    assert coll.stored(["a", "z"]).tolist() == [True, False]
    fs = coll.dir.fs
    assert fs.ls(coll.dir.path, detail=False) and fs.ls((coll.dir / "done").path, detail=False)  # both listings now cached here
    other = _fresh_fs()
    with other.open(f"{coll.dir.path}/part-1.parquet", "wb") as f:
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"sample_id": ["z"], "status": ["ok"], "vector": vec}), f)
    sizes = {p.rsplit("/", 1)[-1]: int(other.info(p)["size"]) for p in other.glob(f"{coll.dir.path}/part-*.parquet")}
    with other.open(f"{coll.dir.path}/done/s1.json", "w") as f:
        f.write(json.dumps({"parts": sizes}))
    assert len(coll.parts()) == 2 and coll.done("s1")
    assert coll.stored(["a", "z"]).tolist() == [True, True]


def test_a_network_error_is_not_taken_for_a_damaged_part(s3_bucket, monkeypatch):
    from curate.store import Store

    url = f"s3://{s3_bucket}/{uuid.uuid4().hex[:8]}/store"
    coll = Store(url).scores("n" * 64)
    part = coll.write(pa.table({"sample_id": ["a"], "variant": ["x"], "score": [1.0], "status": ["ok"]}))
    coll.mark_done("s0", {})

    def unreachable(*args, **kwargs):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(coll.dir.fs, "cat_file", unreachable)  # s3fs makes its sync methods per instance
    with pytest.raises(OSError, match="connection reset"):
        Store(url).scores("n" * 64).read()
    monkeypatch.undo()
    assert [p.name for p in coll.parts()] == [part.name] and coll.done("s0")  # left where it was, its marker too
    assert coll.read().num_rows == 1


def test_the_first_writer_of_the_store_id_wins(s3_bucket):
    import threading

    from curate.store import Store

    url = f"s3://{s3_bucket}/{uuid.uuid4().hex[:8]}/store"
    barrier, got = threading.Barrier(6), []

    def first_use():
        barrier.wait()
        got.append(Store(url).identity())

    threads = [threading.Thread(target=first_use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 6 and len(set(got)) == 1 and Store(url).identity() == got[0]


def test_a_missing_bucket_and_a_url_output_dir_are_config_errors(s3_bucket, tmp_path):
    from curate.errors import ConfigError
    from curate.launch import check_inputs

    spec = load_flow(_flow(tmp_path, "s3://no-such-bucket-here/store"))
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket-here' does not exist"):
        check_inputs(spec)
    assert not _fresh_fs().exists("no-such-bucket-here")  # never created
    with pytest.raises(Exception, match="only store_dir may be a URL"):
        load_flow(write_flow(tmp_path / "o", name="o", inputs=[{"path": "x.jsonl"}], output_dir="s3://b/out"))


def test_store_locations():
    assert not is_url("/tmp/store") and not is_url("store") and not is_url("file:///tmp/store")
    assert is_url("s3://bucket/store") and is_url("memory://x")
    assert location("file:///tmp/store") == Path("/tmp/store") and isinstance(location("rel/store"), Path)
    with pytest.raises(CurateError, match="nosuchfs://"):
        location("nosuchfs://bucket/store")
