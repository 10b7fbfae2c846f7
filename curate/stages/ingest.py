"""Ingest: read inputs, convert to canonical records, validate, dedup, shard.

``read_input`` runs once per input spec (one Prefect task each). It cuts every file into *chunks*
of about ``ingest.shard_size`` rows — JSONL by byte ranges split at line ends (one streaming pass
hashes the file and counts its lines, so every chunk knows its first line and row index; a compressed
JSONL file is streamed), Parquet by record batches, CSV streamed, saved HF datasets in batches, a
JSON array decoded whole and then cut — and each chunk is parsed, converted, validated and hashed on
its own, in ``runtime.ingest_workers`` processes. A chunk's records, quarantined rows (and precomputed vectors) are written to the ingest
cache (the store's ``ingest/``, keyed by the file's sha256, the chunk's range, the reader code and
the read settings) with a done-marker last: a killed ingest loses at most the chunks in flight, and
a folder that grows re-reads only new files.

``build_dataset`` then numbers rows globally (inputs in flow order, files in order, chunks in
order), finds exact duplicates over the ``sample_id`` column alone (polars ``is_first_distinct``:
the first row wins), streams the kept rows into the ``input`` record set in shards of
``shard_size`` rows (the unit of work and resume of every later stage), writes the ingest ledger
(quarantined and duplicate rows) with Arrow, and hands an input's precomputed vectors to the store.
Rows are Python objects a chunk at a time (at most about ``2 × ingest_workers`` chunks wait in memory);
a JSON array file's text is decoded whole first (its items are then walked one by one).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import EmbedSpec, IngestSpec, InputSpec
from curate.errors import IngestError, RecordError
from curate.ingest.formats import CONVERTERS, detect_format, required_fields
from curate.ingest.readers import (RawRow, compression, csv_delimiter, delimiter_hint, expand_paths, file_digest, file_stem, file_type,
                                   hf_row_batches, load_hf_disk, plan_jsonl, read_csv, read_hub, read_json, read_jsonl, read_parquet_tables)
from curate.ingest.validate import normalise_messages, validate_messages
from curate.io import relpath, write_json, write_parquet
from curate.ledger import LEDGER_SCHEMA
from curate.manifests import DatasetRef, IngestChunk, IngestRef
from curate.records import RECORD_SCHEMA, canonical_json, sample_id, sha256_hex
from curate import progress
from curate.progress import logger
from curate.recordset import RecordSetWriter
from curate.store import fixed_bytes

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

MAX_RAW_CHARS = 10_000

#: precomputed vectors handed to the store per call (rows): bounds the memory of build_dataset
VECTOR_FLUSH_ROWS = 65_536


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


def _location(file_label: str, line: int | None, index: int) -> str:
    return f"{file_label}:{line}" if line is not None else f"{file_label} (row {index})"


def _check_declared(fmt: str, record: dict, spec: InputSpec, where: str, csv_hint: str = "") -> None:
    missing = [f for f in required_fields(fmt, spec.fields) if f not in record]
    if missing:
        seen = detect_format(record)
        hint = f"; it looks like '{seen}' (set format: {seen} or auto)" if seen else csv_hint
        raise IngestError(
            f"{where}: declared format '{fmt}' needs field(s) {', '.join(repr(m) for m in missing)}, "
            f"but the row has {', '.join(repr(k) for k in list(record)[:8]) or 'no fields'}{hint}"
        )


# The layout of a cache entry; what the code makes of a file is keyed by _reader_code().
# 2: one entry per chunk of a file (records, quarantine, vectors, done-marker), rows numbered in the file.
INGEST_CACHE_VERSION = "2"


def _file_key(spec: InputSpec, source: str, label: str, sha: str, ingest: IngestSpec) -> str:
    """What decides one file's records: its bytes, how it is read (format, fields, limit, embedding
    …), its source name and label (they go into every record), the conversation rules and the chunk
    size (it places the chunk boundaries)."""
    # keep_columns and license change only the ledger, the exports and the card: not what a file's records are
    how = spec.model_dump(mode="json", exclude={"path", "name", "hub", "revision", "keep_columns", "license"})
    return sha256_hex(canonical_json({"v": INGEST_CACHE_VERSION, "code": _reader_code(), "file": sha, "source": source, "label": label, "read": how,
                                      "max_chars": ingest.max_chars, "chunk_rows": ingest.shard_size}))


@functools.cache
def _reader_code() -> str:
    """sha256 of the code that turns a file into records (readers, converters, rules, ids): an upgrade
    that changes it misses the cache instead of mixing old records with new ones."""
    import curate.ingest.formats as f
    import curate.ingest.readers as r
    import curate.ingest.validate as v
    import curate.records as rec

    return sha256_hex(*(Path(m.__file__).read_bytes() for m in (f, r, v, rec)), Path(__file__).read_bytes())


# -- one chunk: parse → convert → validate → sample_id → Parquet ------------------------------------


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
    rows: list[tuple[int, int | None, Any, tuple | None]] | None = None  # index, line, record, (error_class, message, field)
    table: pa.Table | None = None


def _chunk_paths(folder: str, key: str) -> tuple[str, str, str, str]:
    d = Path(folder) / key[:2]
    return (str(d / f"{key}.records.parquet"), str(d / f"{key}.quarantine.parquet"), str(d / f"{key}.vectors.parquet"),
            str(d / f"{key}.json"))


def _job_rows(job: ChunkJob) -> Iterator[RawRow]:
    if job.kind == "jsonl":
        start, end, first_line = job.jsonl
        yield from read_jsonl(Path(job.path), start, end, first_line, job.first_index)
    elif job.kind == "arrow":
        for i, rec in enumerate(job.table.to_pylist()):
            yield RawRow(job.first_index + i, None, record=rec)
    else:
        for index, line, rec, err in job.rows:
            yield RawRow(index, line, record=rec, error=RecordError(*err) if err else None)


def _vector(value: Any, name: str, dim: int | None) -> np.ndarray:
    """A row's vector as float32, or a RecordError naming the field."""
    if isinstance(value, str):  # CSV cells hold it as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError("invalid_json", f"field '{name}' is not a JSON list of numbers: {exc.msg}", name) from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise RecordError("wrong_type", f"field '{name}' must be a list of numbers (a vector)", name)
    if dim is not None and len(value) != dim:
        raise RecordError("wrong_length", f"field '{name}' has {len(value)} numbers, but this input's vectors have {dim}", name)
    return np.asarray(value, dtype=np.float32)


@functools.lru_cache(maxsize=2)
def _side_index(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The side file's ids sorted (fixed-width bytes), the side-file row of each, and the first row of
    each record batch — made once per process (the path names the side file's content). A repeated id
    sorts its first row first (stable sort), so the first row wins."""
    with pa.memory_map(path) as source:
        reader = pa.ipc.open_file(source)
        sizes = [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
        ids = pa.concat_arrays([reader.get_batch(b).column(0) for b in range(reader.num_record_batches)]) if sizes else pa.array([], pa.string())
        keys = fixed_bytes(ids)
    order = np.argsort(keys, kind="stable")
    return keys[order], order, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _side_vectors(ctx: FileContext, ids: list[str]) -> list[np.ndarray | None]:
    """Per id: its vector from the side file (a float32 numpy view), or None when the side file has none.
    Ids are found by binary search in the side file's sorted ids; only the record batches that hold a
    wanted row are read (a take over the whole file would first concatenate every vector in it)."""
    if not ids:
        return []
    keys, order, starts = _side_index(ctx.side_path)
    out: list[np.ndarray | None] = [None] * len(ids)
    if not len(keys):
        return out
    query = fixed_bytes(ids)
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    found = keys[at] == query
    pos = np.where(found, order[at], -1)
    batch_of = np.searchsorted(starts, pos, side="right") - 1
    with pa.memory_map(ctx.side_path) as source:
        reader = pa.ipc.open_file(source)
        for b in np.unique(batch_of[found]).tolist():
            sel = np.flatnonzero(found & (batch_of == b))
            vectors = reader.get_batch(b).column(1).take(pa.array(pos[sel] - starts[b]))
            lengths = pc.fill_null(pc.list_value_length(vectors), -1).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(vectors).to_numpy(zero_copy_only=False).astype(np.float32, copy=True)  # owns its memory
            ends = np.cumsum(np.maximum(lengths, 0))
            for k, n, a, e in zip(sel.tolist(), lengths.tolist(), (ends - np.maximum(lengths, 0)).tolist(), ends.tolist()):
                out[k] = None if n < 0 else flat[a:e]
    return out


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
        where = _location(ctx.label, raw.line, raw.index)
        error = raw.error
        rec = vec = None
        if error is None:
            record = raw.record
            try:
                if ctx.vector_field is not None:
                    value = record.pop(ctx.vector_field, None)  # kept out of `original`: it would bloat every record
                    vec = None if value is None else _vector(value, ctx.vector_field, ctx.dim)
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
        found = _side_vectors(ctx, [rows[i][2] for i in wanted])
        for i, value in zip(wanted, found):
            rec = rows[i][1]
            if value is None:
                rows[i] = ("ok", rec, None)
                continue
            if ctx.dim is not None and len(value) != ctx.dim:
                err = RecordError("wrong_length", f"the vector of id '{rows[i][2]}' in {ctx.side_label} has {len(value)} numbers, "
                                  f"but this input's vectors have {ctx.dim}", ctx.id_field)
                raw = RawRow(rec["source_index"], rec["source_line"], record=json.loads(rec["original"]))
                rows[i] = ("bad", _quarantine_row(ctx, raw, _location(ctx.label, raw.line, raw.index), err), None)
            else:
                rows[i] = ("ok", rec, value)
    records = [r for kind, r, _ in rows if kind == "ok"]
    quarantine = [r for kind, r, _ in rows if kind == "bad"]
    with_vec = [(r["sample_id"], r["row"], v) for kind, r, v in rows if kind == "ok" and v is not None]
    rec_path, q_path, v_path, done = job.paths
    write_parquet(rec_path, pa.Table.from_pylist(records, schema=RECORD_SCHEMA))
    write_parquet(q_path, pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
    if ctx.vector_field is not None or ctx.id_field is not None:
        write_parquet(v_path, _vector_table([s for s, _, _ in with_vec], [r for _, r, _ in with_vec], [v for _, _, v in with_vec], ctx.dim))
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
        "raw": _raw(raw.record),
    }


def _vector_table(ids: list[str], rows: list[int], vecs: list[np.ndarray], dim: int | None) -> pa.Table:
    dim = dim or (len(vecs[0]) if vecs else 0)
    flat = np.concatenate(vecs).astype(np.float32) if vecs else np.empty(0, np.float32)
    return pa.table({"sample_id": pa.array(ids, pa.string()), "row": pa.array(rows, pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)})


# -- one input: plan the chunks of each file, run them (in worker processes), collect --------------


class _Runner:
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


@dataclass
class _FilePlan:
    source: str
    label: str
    sha: str
    chunks: list[int] = field(default_factory=list)  # slots of this file's chunks, in order


def _first_record(rows: Iterator[RawRow]) -> RawRow | None:
    for raw in rows:
        if raw.error is None:
            return raw
    return None


def _file_format(spec: InputSpec, first: RawRow | None, label: str, csv_file: tuple[Path, str] | None = None) -> str | None:
    """The file's layout, from its first decodable row (as the rows are read, so the same error).
    ``csv_file``: (path, delimiter) of a CSV/TSV file, for the hint when its header did not split."""
    if first is None:
        return None
    where = _location(label, first.line, first.index)
    csv_hint = delimiter_hint(*csv_file) if csv_file is not None and len(first.record) <= 1 else ""
    if spec.format != "auto":
        _check_declared(spec.format, first.record, spec, where, csv_hint)
        return spec.format
    fmt = detect_format(first.record, spec.fields)
    if fmt is None:
        raise IngestError(
            f"{where}: cannot tell the format from the fields "
            f"{', '.join(repr(k) for k in list(first.record)[:8])}{csv_hint}; "
            "set format: alpaca | sharegpt | openai | prompt_completion (and fields: to map column names)"
        )
    return fmt


def _field_dim(rows: Iterator[RawRow], name: str) -> int | None:
    """The length of the first vector in ``rows`` (the one every row of the input must have)."""
    for raw in rows:
        if raw.error is None and raw.record.get(name) is not None:
            try:
                return len(_vector(raw.record[name], name, None))
            except RecordError:
                continue  # quarantined when its chunk is read
    return None


def _side_file(spec: InputSpec, base: Path, folder: Path) -> tuple[str, str, str, int | None]:
    """The side file of vectors as an Arrow IPC file (``id`` as text, ``vector``), written once per
    side-file content under ``folder``: (its path, the side file's label, sha256, vector length)."""
    emb = spec.embedding
    src = Path(emb.path) if Path(emb.path).is_absolute() else base / emb.path
    if not src.is_file():
        raise IngestError(f"{emb.path}: the side file of vectors does not exist (looked in {base})")
    sha = file_digest(src)
    out = folder / "side" / f"{sha}.arrow"
    pf = pq.ParquetFile(src)
    if not {"id", "vector"} <= set(pf.schema_arrow.names):
        raise IngestError(f"{emb.path}: a side file of vectors needs columns 'id' and 'vector', it has {', '.join(pf.schema_arrow.names)}")
    if not out.exists():
        from curate.io import atomic_path

        with atomic_path(out) as tmp:
            schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32()))])
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for group in range(pf.num_row_groups):  # one row group in memory at a time
                    for batch in pf.read_row_group(group, columns=["id", "vector"]).to_batches(max_chunksize=65_536):
                        try:
                            writer.write_batch(pa.record_batch([pc.cast(batch.column(0), pa.string()),
                                                                pc.cast(batch.column(1), pa.list_(pa.float32()))], schema=schema))
                        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                            raise IngestError(f"{emb.path}: 'id' must be text or integers and 'vector' a list of numbers ({exc})") from None
            pa.default_memory_pool().release_unused()
    dim = None
    for batch in pf.iter_batches(batch_size=1024, columns=["vector"]):
        lengths = pc.drop_null(pc.list_value_length(batch.column(0)))
        if len(lengths):
            dim = int(lengths[0].as_py())
            break
    return str(out), relpath(src, base), sha, dim


def read_input(spec: InputSpec, input_index: int, base_dir: str, work_dir: str, ingest: IngestSpec,
               cache_dir: str | None = None, workers: int = 1) -> IngestRef:
    """Read one input spec (all files of a glob) into canonical records + quarantined rows, chunk by
    chunk, in ``workers`` processes (``runtime.ingest_workers``; the output does not depend on it).

    Chunks are written under ``cache_dir`` (the store's ``ingest/``) when given, else under
    ``work_dir``; a chunk whose done-marker is there (same file bytes, range and settings) is not
    parsed again. ``records_path`` / ``quarantine_path`` of the result are folders holding the
    input's chunk files in order (``pq.read_table`` reads them whole); ``row`` and ``source_index``
    there count rows within each file.
    """
    base = Path(base_dir)
    work = Path(work_dir)
    chunk_dir = cache_dir or str(work / "chunks")
    rows_per_chunk = ingest.shard_size
    emb = spec.embedding
    side = None
    if emb is not None and emb.path is not None:
        side = _side_file(spec, base, Path(cache_dir) if cache_dir else work)
    dim = side[3] if side else None

    if spec.hub:
        files = [(spec.name or spec.hub.split("/")[-1], f"hub:{spec.hub}", None)]
    else:
        paths = expand_paths(spec.path, base)
        files = []
        for f in paths:
            name = spec.name or file_stem(f)
            if spec.name and len(paths) > 1:
                name = f"{spec.name}/{file_stem(f)}"
            files.append((name, relpath(f, base), f))

    plans: list[_FilePlan] = []
    jobs_cached: dict[int, dict] = {}
    chunk_refs: list[tuple[str, str, int]] = []  # (key, file label, slot)
    slot = 0
    with _Runner(workers) as runner:
        for source, label, path in files:
            kind = "hub" if path is None else file_type(path)
            if kind == "jsonl" and compression(path) is not None:
                kind = "jsonl_stream"  # a compressed JSONL file: streamed, not cut by byte ranges
            delimiter = csv_delimiter(path, kind, getattr(spec, "delimiter", None)) if kind in ("csv", "tsv") else None
            if kind == "jsonl":
                sha, ranges = plan_jsonl(path, rows_per_chunk, spec.limit)
            else:
                sha = file_digest(path, check_utf8=kind in ("csv", "tsv")) if path is not None and path.is_file() else sha256_hex(label)
            cacheable = path is not None and path.is_file()
            side_sha = side[2] if side else None
            file_key = _file_key(spec, source, label, sha, ingest)
            if side_sha:
                file_key = sha256_hex(file_key, side_sha)
            plan = _FilePlan(source, label, sha)
            plans.append(plan)

            # the file's layout and vector length, from its first rows
            if kind == "jsonl":
                first_rows = (r for c in ranges for r in read_jsonl(path, c.start, c.end, c.first_line, c.first_index))
                batches = None
            else:
                batches = _row_batches(kind, path, spec, rows_per_chunk, delimiter)
                first_batch = next(batches, None)
                first_rows = iter(() if first_batch is None else _batch_raw_rows(first_batch))
            fmt = _file_format(spec, _first_record(first_rows), label, (path, delimiter) if delimiter else None)
            if emb is not None and emb.field is not None and dim is None:
                if kind == "jsonl":
                    dim = _field_dim((r for c in ranges for r in read_jsonl(path, c.start, c.end, c.first_line, c.first_index)), emb.field)
                else:
                    dim = _field_dim(_batch_raw_rows(first_batch) if first_batch is not None else iter(()), emb.field)
            ctx = FileContext(source, label, fmt, dict(spec.fields), spec.task, spec.task_field, ingest.max_chars,
                              vector_field=emb.field if emb else None, id_field=emb.id_field if side else None,
                              side_path=side[0] if side else None, side_label=side[1] if side else None, dim=dim)

            for desc, job_args in _chunk_jobs(kind, path, ranges if kind == "jsonl" else None, _chain(first_batch, batches) if kind != "jsonl" else None):
                key = sha256_hex(file_key, desc, canonical_json({"dim": dim}))
                job_paths = _chunk_paths(chunk_dir, key)
                meta = _done(job_paths) if cacheable else None
                if meta is not None:
                    jobs_cached[slot] = meta
                    progress.skip(meta["n_rows"])
                else:
                    runner.submit(slot, ChunkJob(ctx=ctx, paths=job_paths, **job_args))
                plan.chunks.append(slot)
                chunk_refs.append((key, label, slot))
                slot += 1
        results = {**runner.finish(), **jobs_cached}

    # -- collect, in file order then chunk order
    chunks_out: list[IngestChunk] = []
    formats_seen: set[str] = set()
    local_row = n_valid = n_quarantined = n_vectors = files_cached = 0
    for plan in plans:
        n_file = 0
        for s in plan.chunks:
            meta = results[s]
            key = chunk_refs[s][0]
            rec_path, q_path, v_path, _ = _chunk_paths(chunk_dir, key)
            chunks_out.append(IngestChunk(file=plan.label, records_path=rec_path, quarantine_path=q_path,
                                          vectors_path=v_path if emb is not None else None, row_offset=local_row,
                                          n_rows=meta["n_rows"], n_valid=meta["n_valid"], n_quarantined=meta["n_quarantined"]))
            formats_seen |= set(meta["formats"])
            n_file += meta["n_rows"]
            n_valid += meta["n_valid"]
            n_quarantined += meta["n_quarantined"]
            n_vectors += meta.get("n_vectors", 0)
        if n_file == 0:
            raise IngestError(f"{plan.label}: the input has no rows (empty file?)")
        if plan.chunks and all(s in jobs_cached for s in plan.chunks):
            files_cached += 1
        local_row += n_file

    name = spec.name or (files[0][0] if len(files) == 1 else file_stem(Path(spec.path or "input")))
    rec_dir = work / f"input-{input_index:03d}.records"
    q_dir = work / f"input-{input_index:03d}.quarantine"
    _link_parts(rec_dir, [c.records_path for c in chunks_out])
    _link_parts(q_dir, [c.quarantine_path for c in chunks_out])
    return IngestRef(
        input_index=input_index,
        source=name,
        files=[p.label for p in plans],
        file_sha256=[p.sha for p in plans],
        records_path=str(rec_dir),
        quarantine_path=str(q_dir),
        n_rows=local_row,
        n_valid=n_valid,
        n_quarantined=n_quarantined,
        format=",".join(sorted(formats_seen)) or (spec.format if spec.format != "auto" else "unknown"),
        files_cached=files_cached,
        chunks=chunks_out,
        chunks_cached=len(jobs_cached),
        embedding_producer=emb.producer if emb else None,
        embedding_dim=dim,
        n_vectors=n_vectors,
    )


def _chunk_jobs(kind: str, path: Path | None, ranges, batches) -> Iterator[tuple[str, dict]]:
    """(what the chunk covers — part of its cache key —, the ChunkJob's arguments) for each chunk of a file."""
    if kind == "jsonl":
        for c in ranges:
            yield f"bytes {c.start}-{c.end}", dict(kind="jsonl", first_index=c.first_index, path=str(path), jsonl=(c.start, c.end, c.first_line))
        return
    index = 0
    for batch in batches:
        n = batch.num_rows if isinstance(batch, pa.Table) else len(batch)
        if isinstance(batch, pa.Table):
            yield f"rows {index}-{index + n}", dict(kind="arrow", first_index=index, table=batch)
        else:
            yield f"rows {index}-{index + n}", dict(kind="rows", first_index=index, rows=batch)
        index += n


def _chain(first, rest):
    if first is not None:
        yield first
        yield from rest


def _row_batches(kind: str, path: Path | None, spec: InputSpec, rows: int, delimiter: str | None = None) -> Iterator[pa.Table | list[tuple]]:
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
                yield [(n + i, None, rec, None) for i, rec in enumerate(batch)]
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
        batch.append((raw.index, raw.line, raw.record, err))
        if len(batch) == rows:
            yield batch
            batch = []
    if batch:
        yield batch


def _batch_raw_rows(batch) -> Iterator[RawRow]:
    if isinstance(batch, pa.Table):
        for i in range(batch.num_rows):
            yield RawRow(i, None, record=batch.slice(i, 1).to_pylist()[0])
        return
    for index, line, rec, err in batch:
        yield RawRow(index, line, record=rec, error=RecordError(*err) if err else None)


def _done(paths: tuple[str, str, str, str]) -> dict | None:
    """A finished chunk's marker (None when the chunk must be read: no marker, or a file missing)."""
    rec, quar, vec, done = paths
    try:
        meta = json.loads(Path(done).read_text())
    except (OSError, ValueError):
        return None
    if not (Path(rec).exists() and Path(quar).exists()) or (meta.get("n_vectors", 0) and not Path(vec).exists()):
        return None
    for path in (rec, quar, vec):  # a file cut short (a kill, a full disk) has no readable footer: read the chunk again
        if Path(path).exists():
            try:
                pq.read_metadata(path)
            except (OSError, pa.ArrowException):
                logger.warning("ingest cache: %s is damaged; the chunk is read again", path)
                return None
    return meta


def _link_parts(folder: Path, paths: list[str]) -> None:
    """``folder``/part-NNNNN.parquet for each of ``paths``, in order (hard links; copies across devices)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, p in enumerate(paths):
        dest = folder / f"part-{i:05d}.parquet"
        try:
            os.link(p, dest)
        except OSError:
            shutil.copyfile(p, dest)


# -- all inputs: number, dedup, shard, ledger --------------------------------------------------------


class _VectorSink:
    """Collects the kept rows' precomputed vectors and hands them to the store in bounded batches."""

    def __init__(self, store_dir: str | None, embed: EmbedSpec | None):
        self.store_dir, self.embed = store_dir, embed
        self.ids: list[pa.Array] = []
        self.vecs: list[np.ndarray] = []
        self.n = 0

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.ids.append(table.column("sample_id").combine_chunks())
        flat = pc.list_flatten(table.column("vector").combine_chunks()).to_numpy(zero_copy_only=False)
        self.vecs.append(flat.reshape(table.num_rows, -1).astype(np.float32, copy=False))
        self.n += table.num_rows
        if self.n >= VECTOR_FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        from curate.embed.precomputed import store_vectors

        store_vectors(self.store_dir, self.embed, pa.concat_arrays(self.ids), np.concatenate(self.vecs))
        self.ids, self.vecs, self.n = [], [], 0


def _check_embeddings(inputs: list[IngestRef], store_dir: str | None, embed: EmbedSpec | None) -> bool:
    carrying = [r for r in inputs if r.embedding_producer]
    if not carrying:
        return False
    if embed is None or embed.method != "precomputed" or store_dir is None:
        raise IngestError(f"input '{carrying[0].source}' carries embeddings: the flow needs `embed: {{method: precomputed, "
                          f"model: {carrying[0].embedding_producer}}}`")
    dims = {r.source: r.embedding_dim for r in carrying if r.embedding_dim is not None}
    if len(set(dims.values())) > 1:
        raise IngestError("inputs carry vectors of different lengths: " + ", ".join(f"{s}: {d}" for s, d in dims.items()))
    return True


def build_dataset(inputs: list[IngestRef], out_dir: str, ingest: IngestSpec, store_dir: str | None = None,
                  embed: EmbedSpec | None = None) -> DatasetRef:
    """Number rows globally, filter duplicates, write the ``input`` record set (under ``out_dir``)
    and the ingest part of the ledger (under ``out_dir/ingest``); the kept rows' precomputed vectors
    go to the store under ``store_dir`` (``embed`` names the collection: method ``precomputed``)."""
    import polars as pl

    out = Path(out_dir) / "ingest"
    vectors = _check_embeddings(inputs, store_dir, embed)
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
    sink = _VectorSink(store_dir, embed) if vectors else None
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

