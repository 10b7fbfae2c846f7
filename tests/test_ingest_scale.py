"""Chunked, multi-process ingest: byte-identical output for 1 and 3 workers, exact lines for bad rows
scattered over chunks, dedup across chunks and files, resume after a kill, precomputed vectors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, write_flow
from curate.config import EmbedSpec, IngestSpec, InputSpec, load_flow
from curate.errors import ConfigError
from curate.ingest.read import read_input
from curate.stages.ingest import build_dataset
from scale_rows import alpaca_rows, write_scale_pool

ROWS = alpaca_rows([SAMPLE / "cherry_alpaca.jsonl", SAMPLE / "alpaca_gpt4_en.json"])


def ingest(base: Path, out: Path, specs: list[InputSpec], shard_size: int, workers: int = 1, cache: bool = True, **build):
    ing = IngestSpec(shard_size=shard_size)
    refs = [read_input(s, i, str(base), str(out / "work"), ing, cache_dir=str(out / "cache") if cache else None, workers=workers)
            for i, s in enumerate(specs)]
    return refs, build_dataset(refs, str(out), ing, **build)


def input_rows(out: Path, columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in sorted((out / "recordsets" / "input").glob("shard-*.parquet")))


def outputs(out: Path) -> dict[str, bytes]:
    files = sorted((out / "recordsets" / "input").glob("shard-*.parquet")) + [out / "ingest" / "ingest_ledger.parquet"]
    return {f.name: f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, object]:
    """Two JSONL files of real rows with broken rows scattered through them; file 1 repeats two rows
    of file 0 (one from its second chunk), and file 0 repeats its own row 3 in a later chunk."""
    d = tmp_path_factory.mktemp("pool")
    p = write_scale_pool(d, 900, ROWS, dim=None, seed=3, bad_every=40, files=2)
    f0, f1 = (d / "pool-000.jsonl"), (d / "pool-001.jsonl")
    lines0 = f0.read_text(encoding="utf-8").splitlines(keepends=True)
    good = [i for i, line in enumerate(lines0) if i + 1 not in p.bad_lines["pool-000.jsonl"]]
    f0.write_text("".join(lines0) + lines0[good[3]], encoding="utf-8")  # same content in its last chunk
    with open(f1, "a", encoding="utf-8") as fh:
        fh.write(lines0[good[0]] + lines0[good[150]])
    return d, p, good


def test_one_and_three_workers_write_identical_record_sets_and_ledger(pool, tmp_path):
    d, p, _ = pool
    spec = [InputSpec(path="pool-*.jsonl", format="auto")]
    refs1, ds1 = ingest(d, tmp_path / "w1", spec, shard_size=64, workers=1)
    refs3, ds3 = ingest(d, tmp_path / "w3", spec, shard_size=64, workers=3)
    assert len(refs1[0].chunks) >= 14 and refs1[0].chunks_cached == 0
    assert outputs(tmp_path / "w1") == outputs(tmp_path / "w3")
    assert ds1.records.sha256 == ds3.records.sha256 and ds1.n_valid == ds3.n_valid
    assert (ds1.n_input, ds1.n_quarantined, ds1.n_duplicates) == (903, p.n_bad, 3)
    assert ds1.n_valid == ds1.n_input - p.n_bad - 3
    rows = input_rows(tmp_path / "w1", ["row"]).column("row").to_pylist()
    assert rows == sorted(rows) and len(set(rows)) == len(rows)


def test_bad_rows_scattered_over_chunks_are_quarantined_with_their_lines(pool, tmp_path):
    d, p, _ = pool
    _, ds = ingest(d, tmp_path, [InputSpec(path="pool-*.jsonl")], shard_size=50, workers=2)
    ledger = pq.read_table(ds.ledger_path).to_pylist()
    quarantined = [r for r in ledger if r["outcome"] == "quarantined"]
    by_file: dict[str, list[int]] = {}
    for r in quarantined:
        by_file.setdefault(r["source"], []).append(r["source_line"])
        assert r["detail"].startswith(f"{r['source']}.jsonl:{r['source_line']}:"), r
        assert r["source_index"] == r["source_line"] - 1  # no blank lines in these files
    assert by_file == {Path(f).stem: lines for f, lines in p.bad_lines.items() if lines}
    n0 = sum(1 for _ in open(d / "pool-000.jsonl", encoding="utf-8"))
    for r in quarantined:  # global row = file offset + index in the file
        assert r["row"] == r["source_index"] + (n0 if r["source"] == "pool-001" else 0)
    classes = {r["reason"] for r in quarantined}
    assert classes == {"invalid_json", "not_an_object", "missing_field", "empty_prompt"}
    missing = next(r for r in quarantined if r["reason"] == "missing_field")
    assert ": output: missing required field 'output'" in missing["detail"]


def test_lines_and_indices_stay_exact_with_blank_lines_and_a_bom(tmp_path):
    good = [json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) for i in range(12)]
    text = "\ufeff" + good[0] + "\n\n" + "\n".join(good[1:5]) + "\n  \n" + "{broken\n" + "\n".join(good[5:]) + "\n\n"
    (tmp_path / "b.jsonl").write_text(text, encoding="utf-8")
    want_lines = [1, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15]
    for size in (1, 2, 5, 100):
        ref = read_input(InputSpec(path="b.jsonl"), 0, str(tmp_path), str(tmp_path / f"w{size}"), IngestSpec(shard_size=size))
        recs = pq.read_table(ref.records_path).to_pylist()
        q = pq.read_table(ref.quarantine_path).to_pylist()
        assert [r["source_line"] for r in recs] == want_lines, size
        assert [r["source_index"] for r in recs] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
        assert [(r["source_line"], r["source_index"], r["error_class"]) for r in q] == [(8, 5, "invalid_json")]
        assert ref.n_rows == 13 and q[0]["message"].startswith("b.jsonl:8: invalid JSON")
    limited = read_input(InputSpec(path="b.jsonl", limit=4), 0, str(tmp_path), str(tmp_path / "lim"), IngestSpec(shard_size=3))
    assert limited.n_rows == 4 and [r["source_line"] for r in pq.read_table(limited.records_path).to_pylist()] == [1, 3, 4, 5]


def test_dedup_across_chunks_and_files_keeps_the_first_row(pool, tmp_path):
    d, p, good = pool
    _, ds = ingest(d, tmp_path, [InputSpec(path="pool-000.jsonl"), InputSpec(path="pool-001.jsonl")], shard_size=40, workers=2)
    ledger = pq.read_table(ds.ledger_path).to_pylist()
    dups = [r for r in ledger if r["reason"] == "exact_duplicate"]
    n0 = sum(1 for _ in open(d / "pool-000.jsonl", encoding="utf-8"))
    n1 = sum(1 for _ in open(d / "pool-001.jsonl", encoding="utf-8"))
    assert [(r["source"], r["source_line"]) for r in dups] == [("pool-000", n0), ("pool-001", n1 - 1), ("pool-001", n1)]
    assert [r["row"] for r in dups] == [n0 - 1, n0 + n1 - 2, n0 + n1 - 1]
    assert [int(r["detail"].split("input row ")[1].split(" ")[0]) for r in dups] == [good[3], good[0], good[150]]
    kept = input_rows(tmp_path, ["sample_id", "row", "source_line"])
    by_id = {s: (row, line) for s, row, line in zip(*(kept.column(c).to_pylist() for c in ("sample_id", "row", "source_line")))}
    for r in dups:
        first_row = int(r["detail"].split("input row ")[1].split(" ")[0])
        assert by_id[r["sample_id"]] == (first_row, first_row + 1)
    assert len(by_id) == ds.n_valid


def test_a_killed_ingest_resumes_reading_only_the_chunks_it_lost(pool, tmp_path):
    d, _, _ = pool
    spec = [InputSpec(path="pool-*.jsonl")]
    refs, _ = ingest(d, tmp_path / "a", spec, shard_size=100, workers=1)
    first = outputs(tmp_path / "a")
    chunks = refs[0].chunks
    no_marker, half = chunks[2], chunks[7]
    Path(no_marker.records_path.replace(".records.parquet", ".json")).unlink()  # killed before its marker
    Path(half.records_path.replace(".records.parquet", ".json")).unlink()  # killed while writing its records
    data = Path(half.records_path).read_bytes()
    Path(half.records_path).write_bytes(data[: len(data) // 2])
    untouched = Path(chunks[0].records_path).stat().st_mtime_ns
    refs2, _ = ingest(d, tmp_path / "a", spec, shard_size=100, workers=2)
    assert refs2[0].chunks_cached == len(chunks) - 2 and refs2[0].files_cached == 0
    assert Path(chunks[0].records_path).stat().st_mtime_ns == untouched
    assert Path(half.records_path).read_bytes() != data[: len(data) // 2]
    assert outputs(tmp_path / "a") == first
    refs3, _ = ingest(d, tmp_path / "a", spec, shard_size=100)
    assert refs3[0].chunks_cached == len(chunks) and refs3[0].files_cached == 2
    # a chunk file damaged after its marker was written (a disk error): detected, read again
    damaged = Path(chunks[4].records_path)
    good_bytes = damaged.read_bytes()
    damaged.write_bytes(good_bytes[: len(good_bytes) // 3])
    refs4, _ = ingest(d, tmp_path / "a", spec, shard_size=100)
    assert refs4[0].chunks_cached == len(chunks) - 1
    assert damaged.read_bytes() == good_bytes and outputs(tmp_path / "a") == first


def test_chunk_size_and_file_type_do_not_change_the_records(tmp_path):
    base = SAMPLE.parent.parent
    for path in ("data/sample/t0_tasks.parquet", "data/sample/code_alpaca.csv", "data/sample/alpaca_gpt4_en.json",
                 "data/sample/cherry_alpaca.jsonl"):
        got = []
        for size in (7, 10_000):
            ref = read_input(InputSpec(path=path), 0, str(base), str(tmp_path / f"{Path(path).stem}-{size}"), IngestSpec(shard_size=size),
                             workers=2 if size == 7 else 1)
            assert len(ref.chunks) == (-(-ref.n_rows // size))
            got.append(pq.read_table(ref.records_path).to_pylist())
        assert got[0] == got[1] and [r["source_index"] for r in got[0]] == list(range(len(got[0]))), path


def _store_vectors(store: Path, producer: str, ids: list[str]) -> dict[str, tuple[str, list[float] | None]]:
    from curate.embed import build_embedder
    from curate.store import Store

    key = build_embedder(EmbedSpec(method="precomputed", model=producer, normalize=False)).key
    t = Store(str(store)).embeddings(key).read(ids)
    if t is None:
        return {}
    return {s: (st, v) for s, st, v in zip(t.column("sample_id").to_pylist(), t.column("status").to_pylist(), t.column("vector").to_pylist())}


def test_precomputed_vectors_from_a_column_and_from_a_side_file_land_in_the_store(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((9, 8)).astype(np.float32)
    rows = [{"id": f"x{i}", "instruction": ROWS[i]["instruction"], "output": ROWS[i]["output"], "emb": vecs[i].tolist()} for i in range(9)]
    rows[4]["emb"] = vecs[4][:5].tolist()  # wrong length: quarantined with its line and field
    del rows[6]["emb"]  # no vector: none stored
    rows.append({**rows[1], "emb": vecs[8].tolist(), "id": "x1"})  # a duplicate: its first row's vector is stored
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    embed = EmbedSpec(method="precomputed", model="maker/m1", normalize=False)
    spec = InputSpec(path="rows.jsonl", embedding={"producer": "maker/m1", "field": "emb"})
    refs, ds = ingest(tmp_path, tmp_path / "col", [spec], shard_size=3, workers=2, store_dir=str(tmp_path / "store"), embed=embed)
    assert refs[0].embedding_dim == 8 and refs[0].n_vectors == 8
    ledger = pq.read_table(ds.ledger_path).to_pylist()
    bad = next(r for r in ledger if r["outcome"] == "quarantined")
    assert (bad["source_line"], bad["reason"]) == (5, "wrong_length") and bad["detail"].startswith("rows.jsonl:5: emb:")
    recs = input_rows(tmp_path / "col").to_pylist()
    assert all("emb" not in json.loads(r["original"]) and json.loads(r["original"])["id"] for r in recs)
    stored = _store_vectors(tmp_path / "store", "maker/m1", [r["sample_id"] for r in recs])
    by_line = {r["source_line"]: r["sample_id"] for r in recs}
    assert set(stored) == {by_line[n] for n in (1, 2, 3, 4, 6, 8, 9)}  # line 7 has none, line 5 is quarantined
    for line in (1, 2, 9):
        np.testing.assert_array_equal(np.array(stored[by_line[line]][1], np.float32), vecs[line - 1])

    side = {"id": [f"x{i}" for i in range(9)] + ["x3"], "vector": [v.tolist() for v in vecs] + [vecs[0].tolist()]}
    side["vector"][2] = vecs[2][:3].tolist()  # wrong length in the side file
    pq.write_table(pa.table(side), tmp_path / "vectors.parquet")
    plain = [{k: v for k, v in r.items() if k != "emb"} for r in rows[:9]]
    plain[5].pop("id")  # a row without an id: no vector
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain), encoding="utf-8")
    embed2 = EmbedSpec(method="precomputed", model="maker/m2", normalize=False)
    spec2 = InputSpec(path="plain.jsonl", embedding={"producer": "maker/m2", "path": "vectors.parquet"})
    refs, ds = ingest(tmp_path, tmp_path / "side", [spec2], shard_size=4, workers=1, store_dir=str(tmp_path / "store"), embed=embed2)
    bad = [r for r in pq.read_table(ds.ledger_path).to_pylist() if r["outcome"] == "quarantined"]
    assert [(r["source_line"], r["reason"]) for r in bad] == [(3, "wrong_length")] and "id: the vector of id 'x2'" in bad[0]["detail"]
    recs = input_rows(tmp_path / "side").to_pylist()
    stored = _store_vectors(tmp_path / "store", "maker/m2", [r["sample_id"] for r in recs])
    by_line = {r["source_line"]: r["sample_id"] for r in recs}
    assert set(stored) == {by_line[n] for n in (1, 2, 4, 5, 7, 8, 9)}
    np.testing.assert_array_equal(np.array(stored[by_line[4]][1], np.float32), vecs[3])  # x3: the side file's first x3 wins

    # a chunk whose vectors file is gone from the ingest cache (its marker says it had vectors): read again, not vectorless
    gone = Path(refs[0].chunks[1].vectors_path)
    gone.unlink()
    refs, _ = ingest(tmp_path, tmp_path / "side", [spec2], shard_size=4, workers=1, store_dir=str(tmp_path / "store2"), embed=embed2)
    assert refs[0].chunks_cached == len(refs[0].chunks) - 1 and gone.exists()
    assert set(_store_vectors(tmp_path / "store2", "maker/m2", [r["sample_id"] for r in recs])) == set(stored)


def test_an_input_with_embeddings_needs_the_precomputed_embedder(tmp_path):
    shutil.copy(SAMPLE / "cherry_alpaca.jsonl", tmp_path / "c.jsonl")
    inputs = [{"path": "c.jsonl", "embedding": {"producer": "maker/m1", "field": "emb"}}]
    with pytest.raises(ConfigError, match=r"carries embeddings made by 'maker/m1'.*method: precomputed, model: maker/m1"):
        load_flow(write_flow(tmp_path, name="a", inputs=inputs))
    with pytest.raises(ConfigError, match="embed has method 'precomputed', model 'other'"):
        load_flow(write_flow(tmp_path, name="b", inputs=inputs, embed={"method": "precomputed", "model": "other"}))
    assert load_flow(write_flow(tmp_path, name="c", inputs=inputs, embed={"method": "precomputed", "model": "maker/m1"}))
