"""One chunk of an input file: parse → convert → validate → sample_id → Parquet, in ingest workers.

A file is cut into chunks of about ``ingest.shard_size`` rows: an uncompressed JSONL file by byte
ranges split at line ends (:func:`jsonl_chunk_jobs`), any other file by batches of decoded rows
(:func:`row_batches`, :func:`batch_chunk_jobs`). :func:`process_chunk` turns one chunk into its
records, quarantined rows (:data:`QUARANTINE_SCHEMA`) and precomputed vectors and writes them with a
done-marker last; :class:`ChunkRunner` runs chunks in this process or in ``runtime.ingest_workers``
spawned processes, at most a few chunks ahead of the one that finishes next. Rows are numbered within
their file (``row`` = ``source_index``); ``build_dataset`` numbers them globally.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.config import InputSpec
from curate.errors import RecordError
from curate.ingest.formats import CONVERTERS
from curate.ingest.readers import RawRow, hf_row_batches, load_hf_disk, read_csv, read_hub, read_json, read_jsonl, read_parquet_tables
from curate.ingest.validate import normalise_messages, validate_messages
from curate.ingest.vectors import parse_vector, side_vectors, vector_table
from curate.io import write_json, write_parquet
from curate.records import RECORD_SCHEMA, sample_id
from curate import progress

QUARANTINE_SCHEMA = pa.schema(
    [
        ("local_row", pa.int64()),
        ("source", pa.string()),
        ("source_file", pa.string()),
        ("source_index", pa.int64()),
        ("source_line", pa.int64()),
        ("error_class", pa.string()),
        ("field", pa.string()),
        ("message", pa.string()),
        ("raw", pa.string()),
    ]
)

#: a quarantined row's raw record is kept up to this many characters (of its JSON text)
MAX_RAW_CHARS = 10_000


def _raw(record: Any) -> str | None:
    if record is None:
        return None
    try:
        text = json.dumps(record, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(record)
    return text[:MAX_RAW_CHARS]


def _original(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=str, sort_keys=True)


def row_location(file_label: str, line: int | None, index: int) -> str:
    """Where a row is, for messages: ``file:line``, or ``file (row N)`` when rows have no line."""
    return f"{file_label}:{line}" if line is not None else f"{file_label} (row {index})"


@dataclass(frozen=True)
class FileContext:
    """What a worker needs to know about the file a chunk comes from (small, picklable)."""

    source: str
    label: str
    fmt: str | None  # None: no row of the file decoded (every row is quarantined anyway)
    fields: dict[str, str]
    task: str | None
    task_field: str | None
    max_chars: int | None
    vector_field: str | None = None  # embedding.field
    id_field: str | None = None  # embedding.id_field, with a side file
    side_path: str | None = None  # the side file's vectors as an Arrow IPC file (memory-mapped)
    side_label: str | None = None
    dim: int | None = None  # the vector length every row must have


@dataclass
class ChunkJob:
    ctx: FileContext
    kind: str  # "jsonl" (a byte range of the file), "rows" (decoded rows), "arrow" (a table of rows)
    first_index: int
    paths: tuple[str, str, str, str]  # records, quarantine, vectors, done-marker
    path: str | None = None
    jsonl: tuple[int, int, int] | None = None  # start, end, first_line
    # index, line, record, (error_class, message, field), text
    rows: list[tuple[int, int | None, Any, tuple | None, str | None]] | None = None
    table: pa.Table | None = None


def _job_rows(job: ChunkJob) -> Iterator[RawRow]:
    if job.kind == "jsonl":
        start, end, first_line = job.jsonl
        yield from read_jsonl(Path(job.path), start, end, first_line, job.first_index)
    elif job.kind == "arrow":
        for i, rec in enumerate(job.table.to_pylist()):
            yield RawRow(job.first_index + i, None, record=rec)
    else:
        for index, line, rec, err, text in job.rows:
            yield RawRow(index, line, record=rec, error=RecordError(*err) if err else None, text=text)


def process_chunk(job: ChunkJob) -> dict[str, Any]:
    """Turn one chunk into its records (rows numbered as in the file), quarantined rows and vectors;
    write them, then the done-marker. Returns what the marker holds. Runs in an ingest worker."""
    ctx = job.ctx
    fmt = ctx.fmt
    rows: list[tuple[str, Any, Any]] = []  # ("ok", record, vector or side id) | ("bad", quarantine row, None)
    n_rows = 0
    converted = False
    for raw in _job_rows(job):
        n_rows += 1
        where = row_location(ctx.label, raw.line, raw.index)
        error = raw.error
        rec = vec = None
        if error is None:
            record = raw.record
            try:
                if ctx.vector_field is not None:
                    value = record.pop(ctx.vector_field, None)  # kept out of `original`: it would bloat every record
                    vec = None if value is None else parse_vector(value, ctx.vector_field, ctx.dim)
                elif ctx.id_field is not None:
                    value = record.get(ctx.id_field)
                    vec = None if value is None else str(value)
                converted = True
                messages, tools = CONVERTERS[fmt](record, ctx.fields)
                messages = normalise_messages(messages)
                validate_messages(messages, ctx.max_chars)
                task = ctx.task
                if ctx.task_field:
                    value = record.get(ctx.task_field)
                    task = None if value is None else str(value)
                rec = {
                    "sample_id": sample_id(messages, tools),
                    "row": raw.index,
                    "source": ctx.source,
                    "source_index": raw.index,
                    "source_file": ctx.label,
                    "source_line": raw.line,
                    "task": task,
                    "format": fmt,
                    "messages": messages,
                    "tools": tools,
                    "original": _original(record),
                    "origin": "input",
                }
            except RecordError as exc:
                error = exc
        if error is not None:
            rows.append(("bad", _quarantine_row(ctx, raw, where, error), None))
        else:
            rows.append(("ok", rec, vec))
    if ctx.id_field is not None:  # join the side file's vectors on the rows' ids
        wanted = [i for i, (kind, _, v) in enumerate(rows) if kind == "ok" and v is not None]
        found = side_vectors(ctx.side_path, [rows[i][2] for i in wanted])
        for i, value in zip(wanted, found):
            rec = rows[i][1]
            if value is None:
                rows[i] = ("ok", rec, None)
                continue
            if ctx.dim is not None and len(value) != ctx.dim:
                err = RecordError("wrong_length", f"the vector of id '{rows[i][2]}' in {ctx.side_label} has {len(value)} numbers, "
                                  f"but this input's vectors have {ctx.dim}", ctx.id_field)
                raw = RawRow(rec["source_index"], rec["source_line"], record=json.loads(rec["original"]))
                rows[i] = ("bad", _quarantine_row(ctx, raw, row_location(ctx.label, raw.line, raw.index), err), None)
            else:
                rows[i] = ("ok", rec, value)
    records = [r for kind, r, _ in rows if kind == "ok"]
    quarantine = [r for kind, r, _ in rows if kind == "bad"]
    with_vec = [(r["sample_id"], r["row"], v) for kind, r, v in rows if kind == "ok" and v is not None]
    rec_path, q_path, v_path, done = job.paths
    write_parquet(rec_path, pa.Table.from_pylist(records, schema=RECORD_SCHEMA))
    write_parquet(q_path, pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
    if ctx.vector_field is not None or ctx.id_field is not None:
        write_parquet(v_path, vector_table([s for s, _, _ in with_vec], [r for _, r, _ in with_vec], [v for _, _, v in with_vec], ctx.dim))
    meta = {"n_rows": n_rows, "n_valid": len(records), "n_quarantined": len(quarantine), "n_vectors": len(with_vec),
            "formats": [fmt] if converted and fmt else []}
    write_json(done, meta)  # last: a chunk without its marker is read again
    return meta


def _quarantine_row(ctx: FileContext, raw: RawRow, where: str, error: RecordError) -> dict[str, Any]:
    field_ = f" {error.field}:" if error.field else ""
    return {
        "local_row": raw.index,
        "source": ctx.source,
        "source_file": ctx.label,
        "source_index": raw.index,
        "source_line": raw.line,
        "error_class": error.error_class,
        "field": error.field,
        "message": f"{where}:{field_} {error.message}",
        "raw": _raw(raw.record) if raw.record is not None else (raw.text[:MAX_RAW_CHARS] if raw.text is not None else None),
    }


class ChunkRunner:
    """Runs chunk jobs in order, in this process or in ``workers`` processes (spawn), at most a few
    jobs ahead of the one that finishes next (decoded rows wait in memory only that long)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        self.pending: list[tuple[int, Future]] = []
        self.results: dict[int, dict] = {}

    def __enter__(self):
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self

    def submit(self, slot: int, job: ChunkJob) -> None:
        if self.pool is None:
            self._done(slot, process_chunk(job))
            return
        self.pending.append((slot, self.pool.submit(process_chunk, job)))
        while len(self.pending) > 2 * self.workers:
            s, fut = self.pending.pop(0)
            self._done(s, fut.result())

    def finish(self) -> dict[int, dict]:
        for s, fut in self.pending:
            self._done(s, fut.result())
        self.pending = []
        return self.results

    def _done(self, slot: int, result: dict) -> None:
        self.results[slot] = result
        progress.advance(result["n_rows"])  # the ingest stage's progress line (curate.progress)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def jsonl_chunk_jobs(path: Path, ranges) -> Iterator[tuple[str, dict]]:
    """(what the chunk covers — part of its cache key —, the ChunkJob's arguments) for each byte range
    of an uncompressed JSONL file (``ranges``: ``readers.plan_jsonl``'s)."""
    for c in ranges:
        job = dict(kind="jsonl", first_index=c.first_index, path=str(path), jsonl=(c.start, c.end, c.first_line))
        yield f"bytes {c.start}-{c.end}", job


def batch_chunk_jobs(batches: Iterator[pa.Table | list[tuple]]) -> Iterator[tuple[str, dict]]:
    """(what the chunk covers — part of its cache key —, the ChunkJob's arguments) for each of a file's
    row batches (:func:`row_batches`'s)."""
    index = 0
    for batch in batches:
        n = batch.num_rows if isinstance(batch, pa.Table) else len(batch)
        if isinstance(batch, pa.Table):
            yield f"rows {index}-{index + n}", dict(kind="arrow", first_index=index, table=batch)
        else:
            yield f"rows {index}-{index + n}", dict(kind="rows", first_index=index, rows=batch)
        index += n


def row_batches(kind: str, path: Path | None, spec: InputSpec, rows: int,
                delimiter: str | None = None) -> Iterator[pa.Table | list[tuple]]:
    """A file's rows in batches of ``rows`` (``limit`` applied) — any file but an uncompressed JSONL
    one (cut by byte ranges): Arrow tables for Parquet, else lists of (index, line, record, error)
    tuples. ``delimiter``: a CSV/TSV file's."""
    limit = spec.limit
    if kind == "parquet":
        yield from read_parquet_tables(path, rows, limit)
        return
    if kind in ("hf_disk", "hub"):
        ds = load_hf_disk(path, spec.split) if kind == "hf_disk" else None
        if ds is not None:
            n = 0
            for batch in hf_row_batches(ds, rows):
                if limit is not None:
                    batch = batch[: max(0, limit - n)]
                if not batch:
                    return
                yield [(n + i, None, rec, None, None) for i, rec in enumerate(batch)]
                n += len(batch)
            return
        raws = read_hub(spec.hub, spec.split, spec.revision)
    elif kind == "json":
        raws = read_json(path, spec.json_field, spec.fields)
    elif kind == "jsonl_stream":
        raws = read_jsonl(path)
    else:
        raws = read_csv(path, delimiter or ("\t" if kind == "tsv" else ","))
    batch: list[tuple] = []
    for n, raw in enumerate(raws):
        if limit is not None and n >= limit:
            break
        err = (raw.error.error_class, raw.error.message, raw.error.field) if raw.error is not None else None
        batch.append((raw.index, raw.line, raw.record, err, raw.text))
        if len(batch) == rows:
            yield batch
            batch = []
    if batch:
        yield batch


def batch_raw_rows(batch: pa.Table | list[tuple]) -> Iterator[RawRow]:
    """One of :func:`row_batches`'s batches as RawRows (a table's rows numbered from 0)."""
    if isinstance(batch, pa.Table):
        for i in range(batch.num_rows):
            yield RawRow(i, None, record=batch.slice(i, 1).to_pylist()[0])
        return
    for index, line, rec, err, text in batch:
        yield RawRow(index, line, record=rec, error=RecordError(*err) if err else None, text=text)
