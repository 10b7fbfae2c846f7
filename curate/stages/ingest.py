"""Ingest: read inputs, convert to canonical records, validate, dedup, shard.

Each input is read by :func:`curate.ingest.read.read_input` (one Prefect task each) into chunks of
canonical records and quarantined rows, kept in the ingest cache (the store's ``ingest/``,
:mod:`curate.ingest.cache`); chunks are processed in ``runtime.ingest_workers`` processes
(:mod:`curate.ingest.chunks`) and an input's precomputed vectors come along (:mod:`curate.ingest.vectors`).

``build_dataset`` then numbers rows globally (inputs in flow order, files in order, chunks in
order), finds exact duplicates over the ``sample_id`` column alone (polars ``is_first_distinct``:
the first row wins), streams the kept rows into the ``input`` record set in shards of
``shard_size`` rows (the unit of work and resume of every later stage), writes the ingest ledger
(quarantined and duplicate rows) with Arrow, and hands an input's precomputed vectors to the store.
Rows are Python objects a chunk at a time (at most about ``2 × ingest_workers`` chunks wait in memory);
a JSON array file's text is decoded whole first (its items are then walked one by one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import EmbedSpec, IngestSpec
from curate.ingest.chunks import QUARANTINE_SCHEMA
from curate.ingest.vectors import VectorSink, check_embeddings
from curate.io import write_json, write_parquet
from curate.ledger import LEDGER_SCHEMA
from curate.manifests import DatasetRef, IngestChunk, IngestRef
from curate.pipeline.stage import Run, Stage
from curate.records import RECORD_SCHEMA, sha256_hex
from curate.recordset import RecordSetWriter


def build_dataset(inputs: list[IngestRef], out_dir: str, ingest: IngestSpec, store_dir: str | None = None,
                  embed: EmbedSpec | None = None) -> DatasetRef:
    """Number rows globally, filter duplicates, write the ``input`` record set (under ``out_dir``)
    and the ingest part of the ledger (under ``out_dir/ingest``); the kept rows' precomputed vectors
    go to the store under ``store_dir`` (``embed`` names the collection: method ``precomputed``)."""
    import polars as pl

    out = Path(out_dir) / "ingest"
    vectors = check_embeddings(inputs, store_dir, embed)
    chunks: list[tuple[IngestChunk, int]] = []  # (chunk, global row offset of its file's row 0)
    offset = 0
    for ref in inputs:
        for c in ref.chunks:
            chunks.append((c, offset + c.row_offset))
        offset += ref.n_rows
    n_input = offset

    # -- pass 1: which rows are first of their content (only the sample_id column is held)
    ids, rows = [], []
    for c, base in chunks:
        t = pq.read_table(c.records_path, columns=["sample_id", "row"])
        ids.append(t.column("sample_id"))
        rows.append(pc.add(t.column("row"), base))
    frame = pl.DataFrame({"sid": pl.Series(pa.chunked_array(ids, pa.string())) if ids else pl.Series([], dtype=pl.String),
                          "row": pl.Series(pa.chunked_array(rows, pa.int64())) if rows else pl.Series([], dtype=pl.Int64)})
    if ingest.dedup:
        frame = frame.with_columns(keep=pl.col("sid").is_first_distinct(), first=pl.col("row").first().over("sid"))
    else:
        frame = frame.with_columns(keep=pl.lit(True), first=pl.col("row"))
    keep_all = frame.get_column("keep").to_numpy()
    first_all = frame.get_column("first").to_numpy()
    del frame, ids, rows

    # -- pass 2: stream the kept rows into shards; duplicates and quarantined rows into the ledger
    made_from = sha256_hex(*(r.model_dump_json(include={"source", "files", "file_sha256", "format", "n_rows"}) for r in inputs),
                           ingest.model_dump_json())
    writer = RecordSetWriter(out_dir, "input", "ingest", made_from, ingest.shard_size)
    sink = VectorSink(store_dir, embed) if vectors else None
    ledger_parts: list[pa.Table] = []
    at = 0
    n_dup = 0
    for c, base in chunks:
        t = pq.read_table(c.records_path, schema=RECORD_SCHEMA)
        t = t.set_column(t.schema.get_field_index("row"), "row", pc.add(t.column("row"), base))
        keep = keep_all[at:at + t.num_rows]
        first = first_all[at:at + t.num_rows]
        at += t.num_rows
        kept = t.filter(pa.array(keep)) if not keep.all() else t
        writer.add(kept)
        if not keep.all():
            dup = ~keep
            n_dup += int(dup.sum())
            ledger_parts.append(_duplicate_ledger(t.filter(pa.array(dup)), first[dup]))
        q = pq.read_table(c.quarantine_path, schema=QUARANTINE_SCHEMA)
        if q.num_rows:
            ledger_parts.append(_quarantine_ledger(q, base))
        if sink is not None and c.vectors_path and Path(c.vectors_path).exists():
            v = pq.read_table(c.vectors_path)
            if v.num_rows and not keep.all():  # a duplicate's vector is not stored: its first row's is
                v = v.filter(pc.is_in(pc.add(v.column("row"), base), value_set=kept.column("row")))
            sink.add(v)
    records = writer.close()
    if sink is not None:
        sink.flush()

    ledger = pa.concat_tables(ledger_parts) if ledger_parts else LEDGER_SCHEMA.empty_table()
    ledger = ledger.take(pc.sort_indices(ledger, [("row", "ascending")])).combine_chunks()
    ledger_path = out / "ingest_ledger.parquet"
    write_parquet(ledger_path, ledger)
    ref = DatasetRef(
        records=records,
        ledger_path=str(ledger_path),
        n_input=n_input,
        n_valid=records.n_rows,
        n_quarantined=sum(r.n_quarantined for r in inputs),
        n_duplicates=n_dup,
        sources=inputs,
    )
    write_json(out / "dataset.json", ref.model_dump(mode="json"))
    return ref


def _ledger(n: int, cols: dict[str, Any]) -> pa.Table:
    nulls = {"sample_id": pa.nulls(n, pa.string()), "rank": pa.nulls(n, pa.int64())}
    return pa.table({f.name: cols[f.name] if f.name in cols else nulls[f.name] for f in LEDGER_SCHEMA}, schema=LEDGER_SCHEMA)


def _duplicate_ledger(dups: pa.Table, first: np.ndarray) -> pa.Table:
    import polars as pl

    detail = pl.DataFrame({"first": first, "sid": pl.Series(dups.column("sample_id"))}).select(
        pl.format("same content as input row {} (sample_id {}…)", "first", pl.col("sid").str.slice(0, 12))).to_series().to_arrow()
    n = dups.num_rows
    return _ledger(n, {"row": dups.column("row"), "sample_id": dups.column("sample_id"), "source": dups.column("source"),
                       "source_index": dups.column("source_index"), "source_line": dups.column("source_line"),
                       "outcome": pa.array(["filtered"] * n, pa.string()), "stage": pa.array(["ingest"] * n, pa.string()),
                       "reason": pa.array(["exact_duplicate"] * n, pa.string()), "detail": pc.cast(detail, pa.string())})


def _quarantine_ledger(q: pa.Table, base: int) -> pa.Table:
    n = q.num_rows
    return _ledger(n, {"row": pc.add(q.column("local_row"), base), "source": q.column("source"), "source_index": q.column("source_index"),
                       "source_line": q.column("source_line"), "outcome": pa.array(["quarantined"] * n, pa.string()),
                       "stage": pa.array(["ingest"] * n, pa.string()), "reason": q.column("error_class"), "detail": q.column("message")})


# -- the stage ---------------------------------------------------------------------------------------


class IngestStage(Stage):
    """Read every input (a task each), then number, dedup and shard them (one task): the ``input`` set
    (its DatasetRef: the record set, the ingest ledger and the sources)."""

    kind = "ingest"
    runs_in_plan = True  # a dry run reads the inputs too (into a temporary folder): the other stages' estimates count their rows
    counts_order = 0

    def __init__(self):
        super().__init__("ingest", reads=("inputs",), writes=("input",))

    def run(self, run: Run) -> dict[str, Any]:
        from curate.ingest.read import read_input
        from curate.store import ingest_cache_dir

        spec = run.spec
        work_dir = str(run.out / "ingest")
        cache_dir = str(ingest_cache_dir(spec.local_store))  # files read before (same bytes, same settings) are not parsed again
        refs, secs = run.map(self, read_input, [dict(spec=inp, input_index=i, base_dir=str(spec.base), work_dir=work_dir,
                                                     ingest=spec.ingest, cache_dir=cache_dir, workers=spec.runtime.ingest_workers)
                                                for i, inp in enumerate(spec.inputs)], task="ingest-{input_index}")
        _ingest_resume(refs)
        (dataset,), secs2 = run.map(self, build_dataset, [dict(inputs=refs, out_dir=str(run.out), ingest=spec.ingest,
                                                               store_dir=str(spec.store), embed=spec.embed)], task="shard")
        run.write(self, "input", dataset, records=dataset.records)
        run.next_row = dataset.n_input  # derived rows are numbered after the input rows
        n_files = sum(len(r.files) for r in refs)
        cached = sum(r.files_cached for r in refs)
        return {"stage": "ingest", "tasks": len(refs) + 1, "rows": dataset.n_input, "seconds": secs + secs2, "files": n_files,
                "files_cached": cached, "chunks": sum(len(r.chunks) for r in refs), "chunks_cached": sum(r.chunks_cached for r in refs)}

    def estimate(self, plan) -> dict[str, Any]:
        return {**self.describe(), "what": f"{len(plan.spec.inputs)} inputs"}

    def counts(self, row: dict[str, Any], run: Run) -> list[dict[str, Any]]:
        dataset = run.outputs["input"]
        return [{"stage": "ingest", "in": dataset.n_input, "out": dataset.n_valid + dataset.n_duplicates,
                 "note": f"{dataset.n_quarantined} quarantined"},
                {"stage": "dedup", "in": dataset.n_valid + dataset.n_duplicates, "out": dataset.n_valid,
                 "note": f"{dataset.n_duplicates} exact duplicates"}]


def _ingest_resume(refs: list) -> None:
    """One line when ingest found chunks of the inputs read before (kept in the store's ``ingest/``)."""
    from curate.progress import logger

    chunks = sum(len(r.chunks) for r in refs)
    cached = sum(r.chunks_cached for r in refs)
    if not cached:
        return
    files = sum(len(r.files) for r in refs)
    whole = sum(r.files_cached for r in refs)
    rows = sum(c.n_rows for r in refs for c in r.chunks)
    if cached == chunks:
        logger.info("ingest: all %d chunks of the %d input file%s already read before (%s rows, in the store); nothing parsed again",
                    chunks, files, "s" if files != 1 else "", f"{rows:,}")
    else:
        logger.info("ingest: %d of %d chunks already read before (%d of %d files whole); read the other %d", cached, chunks, whole, files,
                    chunks - cached)
