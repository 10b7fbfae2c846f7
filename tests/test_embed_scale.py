"""Embeddings at scale: float16 storage, precomputed vectors, the memory-mapped matrix, and k-center /
Repr Filter over it (unchanged results on small pools)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from curate.config import EmbedSpec
from curate.embed import build_embedder
from curate.embed.precomputed import store_vectors
from curate.store import BAD_VECTOR, NO_VECTOR
from curate.records import RECORD_SCHEMA, canonical_json, sample_id, sha256_hex
from curate.recordset import load_embeddings, write_recordset
from curate.select import Pool, selector_class
from curate.select.kcenter import kcenter_greedy, medoid
from curate.select.repr_filter import repr_filter, repr_filter_one_by_one
from curate.stages.embed import embed_shard
from curate.store import Store
from tests.conftest import SAMPLE
from tests.scale_rows import alpaca_rows


def unit_rows(n: int, d: int, seed: int = 0, copies: int = 1, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((max(1, n // copies), d))
    X = base[np.arange(n) % len(base)] + noise * rng.standard_normal((n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def sample_records(n: int) -> list[dict]:
    rows = alpaca_rows([SAMPLE / "alpaca_gpt4_en.json"])[:n]
    out = []
    for i, r in enumerate(rows):
        msgs = [{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""), "tool_calls": None},
                {"role": "assistant", "content": r["output"], "tool_calls": None}]
        out.append({"sample_id": sample_id(msgs), "row": i, "source": "alpaca", "source_index": 0, "source_file": "alpaca_gpt4_en.json",
                    "source_line": i + 1, "task": None, "format": "alpaca", "messages": msgs, "tools": None, "original": None,
                    "origin": None, "parents": None, "generation": None})
    return out


# -- keys and float16 storage ----------------------------------------------------------------------


def test_storage_enters_the_key_only_when_float16():
    st32 = build_embedder(EmbedSpec())
    st16 = build_embedder(EmbedSpec(storage="float16"))
    assert "storage" not in st32.fingerprint()  # float32 keys are the keys they were
    assert st32.key == sha256_hex(canonical_json(st32.fingerprint()))
    assert st16.fingerprint() == {**st32.fingerprint(), "storage": "float16"} and st16.key != st32.key
    p32 = build_embedder(EmbedSpec(method="precomputed", model="bge-small"))
    p16 = build_embedder(EmbedSpec(method="precomputed", model="bge-small", storage="float16"))
    assert p32.fingerprint()["producer"] == "bge-small" and "storage" not in p32.fingerprint()
    assert p16.fingerprint()["storage"] == "float16" and p16.key != p32.key
    assert build_embedder(EmbedSpec(method="precomputed", model="other")).key != p32.key


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_precomputed_round_trip_in_stored_dtype(tmp_path, storage):
    spec = EmbedSpec(method="precomputed", model="bge-small", storage=storage)
    raw = np.random.default_rng(0).standard_normal((6, 12)).astype(np.float32) * 3.0
    raw[4] = np.nan
    raw[5] = 0.0
    ids = [f"s{i}" for i in range(6)]
    store_vectors(str(tmp_path), spec, ids + ["s0"], np.vstack([raw, raw[1:2]]))  # a repeat of s0 (another vector): the first wins
    store_vectors(str(tmp_path), spec, pa.array(["s1", "s6"]), raw[2:4])  # s1 already stored: skipped
    key = build_embedder(spec).key
    coll = Store(tmp_path).embeddings(key)
    fp = json.loads((coll.dir / "fingerprint.json").read_text())
    assert fp["producer"] == "bge-small" and fp["method"] == "precomputed" and fp.get("storage", "float32") == storage
    X, statuses = load_embeddings(str(tmp_path), key, ids + ["s6"])
    assert isinstance(X, np.memmap) and X.dtype == np.dtype(storage) and not X.flags.writeable
    assert statuses == ["ok"] * 4 + [BAD_VECTOR, BAD_VECTOR, "ok"]
    expect = raw[[0, 1, 2, 3, 3]] / np.linalg.norm(raw[[0, 1, 2, 3, 3]], axis=1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(X[[0, 1, 2, 3, 6]]), expect.astype(storage))
    with pytest.raises(Exception, match="length 5"):
        store_vectors(str(tmp_path), spec, ["s9"], np.ones((1, 5), np.float32))


def test_embed_stage_stores_float16_vectors(tmp_path):
    records = sample_records(6)
    ref = write_recordset(pa.Table.from_pylist(records, RECORD_SCHEMA), tmp_path / "out", "input", "ingest", "x", shard_size=6)
    ids = [r["sample_id"] for r in records]
    got = {}
    for storage in ("float32", "float16"):
        spec = EmbedSpec(storage=storage, batch_size=8)
        key = build_embedder(spec, 1).key
        work = embed_shard(ref.shards[0], spec, key, str(tmp_path / "store"), torch_threads=1)
        assert work.statuses == {"ok": 6}
        got[storage], _ = load_embeddings(str(tmp_path / "store"), key, ids)
    assert got["float16"].dtype == np.float16 and got["float32"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got["float16"]), np.asarray(got["float32"]).astype(np.float16))


# -- the precomputed embedder -----------------------------------------------------------------------


def test_precomputed_embed_stage_marks_rows_without_vector(tmp_path):
    records = sample_records(8)
    ref = write_recordset(pa.Table.from_pylist(records, RECORD_SCHEMA), tmp_path / "out", "input", "ingest", "x", shard_size=5)
    ids = [r["sample_id"] for r in records]
    spec = EmbedSpec(method="precomputed", model="bge-small")
    key = build_embedder(spec).key
    with pytest.raises(Exception, match="no vectors for this producer"):
        embed_shard(ref.shards[0], spec, key, str(tmp_path / "store"))
    V = unit_rows(8, 16)
    have = [0, 1, 3, 5, 6]
    store_vectors(str(tmp_path / "store"), spec, [ids[i] for i in have], V[have])
    works = [embed_shard(s, spec, key, str(tmp_path / "store")) for s in ref.shards]
    assert [w.statuses for w in works] == [{"ok": 3, NO_VECTOR: 2}, {"ok": 2, NO_VECTOR: 1}]
    assert all(w.computed_rows == 0 for w in works)
    X, statuses = load_embeddings(str(tmp_path / "store"), key, ids)
    assert [i for i, s in enumerate(statuses) if s == NO_VECTOR] == [2, 4, 7]
    np.testing.assert_allclose(np.asarray(X[have]), V[have], atol=1e-6)  # normalised again: last-bit rounding
    assert not np.asarray(X[[2, 4, 7]]).any()
    # the missing vectors arrive later (another ingest): the matrix is rebuilt, the rows become ok
    store_vectors(str(tmp_path / "store"), spec, [ids[2]], V[[2]])
    _, statuses = load_embeddings(str(tmp_path / "store"), key, ids)
    assert [i for i, s in enumerate(statuses) if s == NO_VECTOR] == [4, 7]


def test_computed_collection_still_raises_on_missing_rows(tmp_path):
    from curate.store import embedding_table

    coll = Store(tmp_path).embeddings("k")
    coll.describe({"method": "sentence_transformers"})
    coll.write(embedding_table(["a", "b"], unit_rows(2, 4), ["ok", "ok"]))
    with pytest.raises(RuntimeError, match="1 rows have no stored embedding"):
        load_embeddings(str(tmp_path), "k", ["a", "c"])


# -- the memory-mapped matrix ------------------------------------------------------------------------


def test_matrix_built_once_reused_and_identical(tmp_path):
    from curate.store import embedding_table

    coll = Store(tmp_path).embeddings("k")
    V = unit_rows(30, 8, seed=3)
    ids = [f"i{j:02d}" for j in range(30)]
    coll.write(embedding_table(ids[:20], V[:20], ["ok"] * 20))
    coll.write(embedding_table(ids[20:], V[20:], ["ok"] * 9 + ["error:RuntimeError"]))
    coll.write(embedding_table(ids[5:7], V[5:7] * 0.5, ["ok", "ok"]))  # a concurrent writer's duplicate rows: one part's copy wins
    want = ids[::-1] + [ids[3]]  # any order, a repeated id included
    X, st = load_embeddings(str(tmp_path), "k", want)
    files = sorted((coll.dir / "matrix").glob("*.npy"))
    assert len(files) == 1 and len(files[0].stem) == 32
    import pyarrow.parquet as pq

    winner = {}
    for p in coll.parts():  # the first part (in name order) that holds an id gives its vector, as Collection.read does
        t = pq.read_table(p)
        for sid, vec in zip(t.column("sample_id").to_pylist(), t.column("vector").to_pylist()):
            winner.setdefault(sid, vec)
    np.testing.assert_array_equal(np.asarray(X), np.array([winner[s] for s in want], dtype=np.float32))
    assert st[want.index("i29")] == "error:RuntimeError" and st.count("ok") == 30
    mtime = files[0].stat().st_mtime_ns
    X2, st2 = load_embeddings(str(tmp_path), "k", want)
    assert files[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert np.asarray(X2).tobytes() == np.asarray(X).tobytes() and st2 == st
    expected = np.array(X).tobytes()
    del X, X2  # unmapped before the file is cut short
    head = files[0].read_bytes()[:100]
    files[0].unlink()
    files[0].write_bytes(head)  # a truncated matrix file is built again
    X3, _ = load_embeddings(str(tmp_path), "k", want)
    assert np.asarray(X3).tobytes() == expected


def test_pool_take_keeps_base_and_positions():
    X = unit_rows(10, 4)
    p = Pool(rows=np.arange(10), ids=[str(i) for i in range(10)], scores={}, orientation={}, embeddings=X, n_input=10)
    assert p.embeddings is X
    whole = p.take(np.ones(10, bool))
    assert whole.embedding_source() == (X, None) and whole.embeddings is X  # every row: still the base, no copy
    sub = whole.take(np.arange(10) % 2 == 0).take(np.array([True, False, True, True, False]))
    base, index = sub.embedding_source()
    assert base is X and index.tolist() == [0, 4, 6]
    np.testing.assert_array_equal(sub.embeddings, X[[0, 4, 6]])
    H = X.astype(np.float16)
    ph = Pool(rows=np.arange(10), ids=[str(i) for i in range(10)], scores={}, orientation={}, embeddings=H, n_input=10).take(np.arange(10) < 3)
    assert ph.embeddings.dtype == np.float32 and ph.embedding_source()[0] is H


# -- k-center and the Repr Filter over the stored matrix ---------------------------------------------


def reference_kcenter(X, k, first, metric="cosine"):
    """The single-product loop k-center ran before blocking (one GEMV over all rows per step)."""
    n = len(X)
    sq = None if metric == "cosine" else np.einsum("ij,ij->i", X, X)
    m = np.full(n, np.inf, dtype=np.float32)
    nearest = np.full(n, -1, dtype=np.int64)
    buf = np.empty(n, dtype=np.float32)
    order, radii = [], []
    for t in range(k):
        i = first if t == 0 else int(np.argmax(m))
        radii.append(np.inf if t == 0 else m[i])
        order.append(i)
        np.dot(X, X[i], out=buf)
        buf *= -2.0
        if sq is None:
            buf += 2.0
        else:
            buf += sq
            buf += float(X[i] @ X[i])
        np.maximum(buf, 0.0, out=buf)
        closer = buf < m
        np.copyto(m, buf, where=closer)
        nearest[closer] = i
        m[i] = 0.0
        nearest[i] = i
    return np.array(order), np.array(radii, dtype=np.float32), m, nearest


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kcenter_unchanged_on_small_pools(metric):
    for n, d, k in [(300, 16, 40), (2500, 32, 120)]:
        X = unit_rows(n, d, seed=n, copies=3, noise=0.2) * (1.0 if metric == "cosine" else 2.5)
        order, radii, m, nearest = reference_kcenter(X, k, first=7, metric=metric)
        res = kcenter_greedy(X, k, first=7, metric=metric)
        assert res.order.tobytes() == order.tobytes() and res.radii.tobytes() == radii.tobytes()
        assert res.min_dist.tobytes() == m.tobytes() and res.nearest.tobytes() == nearest.tobytes()
        small = kcenter_greedy(X, k, first=7, metric=metric, block=256)  # many blocks: the same picks
        assert small.order.tolist() == order.tolist() and small.nearest.tolist() == nearest.tolist()
        np.testing.assert_allclose(small.min_dist, m, atol=1e-6)
        assert medoid(X, metric) == medoid(X, metric, block=128)


def test_kcenter_step_on_a_memmap_subset_and_float16(tmp_path):
    from curate.store import embedding_table

    X = unit_rows(400, 24, seed=5, copies=4, noise=0.3)
    ids = [f"r{i}" for i in range(400)]
    for storage in ("float32", "float16"):
        coll = Store(tmp_path / storage).embeddings("k")
        coll.write(embedding_table(ids, X, ["ok"] * 400, storage=storage))
        M, _ = load_embeddings(str(tmp_path / storage), "k", ids)
        keep = np.arange(400) % 3 != 0
        pool = Pool(rows=np.arange(400) * 10, ids=ids, scores={}, orientation={}, embeddings=M, n_input=400).take(keep)
        res = selector_class("kcenter")("kcenter", {"budget": 25}).select(pool)
        Xs = X[keep].astype(storage).astype(np.float32)
        first = int(np.argmax(Xs @ Xs.mean(axis=0)))
        order, _, _, _ = reference_kcenter(Xs, 25, first)
        assert np.flatnonzero(res.keep)[np.argsort(res.rank[res.keep])].tolist() == order.tolist()
        blocked = kcenter_greedy(M, 25, first=first, block=64)
        if storage == "float16":  # float16 rows compared in float32, block by block
            assert blocked.order[0] == first and len(set(blocked.order.tolist())) == 25


def test_repr_filter_reads_stored_rows_by_position():
    X = unit_rows(3000, 16, seed=2, copies=6, noise=0.15)
    scores = np.random.default_rng(4).random(3000)
    keep = np.arange(3000) % 4 != 1
    pool = Pool(rows=np.arange(3000), ids=[str(i) for i in range(3000)], scores={"d.s": scores},
                orientation={"d.s": "higher_is_better"}, embeddings=X, n_input=3000).take(keep)
    r = selector_class("repr_filter")("repr_filter", {"score": "d.s", "max_similarity": 0.8, "budget": 300}).select(pool)
    sub = X[keep]
    order = np.lexsort((np.arange(len(sub)), -scores[keep]))
    want = repr_filter_one_by_one(sub, order, 0.8, 300)
    assert np.flatnonzero(r.keep)[np.argsort(r.rank[r.keep])].tolist() == want.tolist()
    kept, blocker, _, _ = repr_filter(X, order, 0.8, 300, index=np.flatnonzero(keep), kept_chunk=7)  # kept set in small chunks
    assert kept.tolist() == want.tolist() and (blocker >= 0).sum() == sum(x == "too_similar" for x in r.reason)
    H = X.astype(np.float16)
    kept16, _, _, _ = repr_filter(H, order, 0.8, 300, index=np.flatnonzero(keep))
    want16 = repr_filter_one_by_one(H[keep].astype(np.float32), order, 0.8, 300)
    assert kept16.tolist() == want16.tolist()


def test_abandoned_matrix_temp_files_are_swept(tmp_path):
    """A temporary matrix file a killed assembly left goes once a day old; a younger one may be another
    flow's assembly in progress and stays."""
    import os
    import time

    from curate.recordset import ABANDONED_AFTER_S, _sweep_abandoned

    old, young, done = tmp_path / ".abc.npy.x1.tmp", tmp_path / ".def.npy.x2.tmp", tmp_path / "abc.npy"
    for p in (old, young, done):
        p.write_bytes(b"x")
    past = time.time() - ABANDONED_AFTER_S - 60
    os.utime(old, (past, past))
    os.utime(done, (past, past))
    _sweep_abandoned(tmp_path)
    assert not old.exists() and young.exists() and done.exists()
