"""The content-addressed store: idempotent parts, done-markers, dedup on read, identity."""

from __future__ import annotations

import pyarrow as pa

from curate.store import Store


def table(ids, value):
    return pa.table({"sample_id": ids, "variant": ["v"] * len(ids), "score": [float(value)] * len(ids), "status": ["ok"] * len(ids)})


def test_parts_ids_and_read(tmp_path):
    c = Store(tmp_path).scores("k1")
    assert c.ids() == set() and c.read() is None
    p1 = c.write(table(["a", "b"], 1))
    assert c.write(table(["b", "a"], 1)) == p1  # same ids → same part name
    c.write(table(["c"], 2))
    assert c.ids() == {"a", "b", "c"}
    assert sorted(c.read(["a", "c"]).column("sample_id").to_pylist()) == ["a", "c"]
    # a second writer that scored "a" again (concurrent run): read keeps one row per (id, variant)
    c.write(table(["a", "d"], 9))
    got = c.read()
    assert sorted(got.column("sample_id").to_pylist()) == ["a", "b", "c", "d"]
    # a fresh process sees the same ids (the cache is rebuilt from the parts)
    assert Store(tmp_path).scores("k1").ids() == {"a", "b", "c", "d"}
    assert Store(tmp_path).scores("k2").ids() == set()


def test_markers_fingerprint_identity(tmp_path):
    s = Store(tmp_path)
    c = s.embeddings("k")
    assert not c.done("h")
    c.mark_done("h", {"statuses": {"ok": 3}})
    assert c.done("h") and c.marker("h")["statuses"] == {"ok": 3}
    c.describe({"model_id": "m"})
    c.describe({"model_id": "other"})  # never overwritten: a key means one thing
    assert c.fingerprint() == {"model_id": "m"}
    assert s.identity() == Store(tmp_path).identity() != Store(tmp_path / "other").identity()
    assert not list(tmp_path.rglob("*.tmp"))
