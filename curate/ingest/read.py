"""Read one input (all files of a glob, or a hub dataset) into cached chunks of canonical records.

:func:`read_input` runs once per input spec (one Prefect task each). It cuts every file into
*chunks* of about ``ingest.shard_size`` rows — JSONL by byte ranges split at line ends (one
streaming pass hashes the file and counts its lines, so every chunk knows its first line and row
index; a compressed JSONL file is streamed), Parquet by record batches, CSV streamed, saved HF
datasets in batches, a JSON array decoded whole and then cut — and each chunk is parsed, converted,
validated and hashed on its own, in ``runtime.ingest_workers`` processes (:mod:`curate.ingest.chunks`).
A chunk's records, quarantined rows (and precomputed vectors, :mod:`curate.ingest.vectors`) are
written to the ingest cache (:mod:`curate.ingest.cache`: the store's ``ingest/``, keyed by the
file's sha256, the chunk's range, the reader code and the read settings) with a done-marker last: a
killed ingest loses at most the chunks in flight, and a folder that grows re-reads only new files.
A file's layout (and its vectors' length) come from its first rows, read before its chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from curate.config import IngestSpec, InputSpec
from curate.errors import IngestError
from curate.ingest.cache import chunk_done, chunk_paths, file_key, link_parts
from curate.ingest.chunks import (ChunkJob, ChunkRunner, FileContext, batch_chunk_jobs, batch_raw_rows, jsonl_chunk_jobs, row_batches,
                                  row_location)
from curate.ingest.formats import detect_format, required_fields
from curate.ingest.readers import (RawRow, compression, csv_delimiter, delimiter_hint, expand_paths, file_digest, file_stem, file_type,
                                   plan_jsonl, read_jsonl)
from curate.ingest.vectors import field_dim, side_file
from curate.io import relpath
from curate.manifests import IngestChunk, IngestRef
from curate.records import canonical_json, sha256_hex
from curate import progress


def _check_declared(fmt: str, record: dict, spec: InputSpec, where: str, csv_hint: str = "") -> None:
    missing = [f for f in required_fields(fmt, spec.fields) if f not in record]
    if missing:
        seen = detect_format(record)
        hint = f"; it looks like '{seen}' (set format: {seen} or auto)" if seen else csv_hint
        raise IngestError(
            f"{where}: declared format '{fmt}' needs field(s) {', '.join(repr(m) for m in missing)}, "
            f"but the row has {', '.join(repr(k) for k in list(record)[:8]) or 'no fields'}{hint}"
        )


@dataclass
class _FilePlan:
    source: str
    label: str
    sha: str
    chunks: list[int] = field(default_factory=list)  # slots of this file's chunks, in order


@dataclass
class _OpenFile:
    """One input file, ready to be cut into chunks."""

    sha: str  # the file's sha256 (of its label for a hub dataset or a saved HF dataset folder)
    delimiter: str | None  # a CSV/TSV file's
    head: Callable[[], Iterator[RawRow]]  # the file's rows from its first, anew at each call (read lazily)
    jobs: Iterator[tuple[str, dict]]  # (what the chunk covers, the ChunkJob's arguments) per chunk, in order


def _open_file(spec: InputSpec, label: str, path: Path | None, rows_per_chunk: int) -> _OpenFile:
    """Plan how ``path`` (None: the hub dataset) is cut: an uncompressed JSONL file by byte ranges
    (its rows are read again from the start for ``head``), any other file by batches of decoded
    rows (the first batch is read now and kept for ``head`` and the first chunk)."""
    kind = "hub" if path is None else file_type(path)
    if kind == "jsonl" and compression(path) is not None:
        kind = "jsonl_stream"  # a compressed JSONL file: streamed, not cut by byte ranges
    if kind == "jsonl":
        sha, ranges = plan_jsonl(path, rows_per_chunk, spec.limit)

        def jsonl_head() -> Iterator[RawRow]:
            return (r for c in ranges for r in read_jsonl(path, c.start, c.end, c.first_line, c.first_index))

        return _OpenFile(sha, None, jsonl_head, jsonl_chunk_jobs(path, ranges))
    delimiter = csv_delimiter(path, kind, getattr(spec, "delimiter", None)) if kind in ("csv", "tsv") else None
    sha = file_digest(path, check_utf8=kind in ("csv", "tsv")) if path is not None and path.is_file() else sha256_hex(label)
    batches = row_batches(kind, path, spec, rows_per_chunk, delimiter)
    first_batch = next(batches, None)

    def batch_head() -> Iterator[RawRow]:
        return iter(()) if first_batch is None else batch_raw_rows(first_batch)

    return _OpenFile(sha, delimiter, batch_head, batch_chunk_jobs(_chain(first_batch, batches)))


def _chain(first, rest):
    if first is not None:
        yield first
        yield from rest


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
    where = row_location(label, first.line, first.index)
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
        side = side_file(spec, base, Path(cache_dir) if cache_dir else work)
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
    with ChunkRunner(workers) as runner:
        for source, label, path in files:
            opened = _open_file(spec, label, path, rows_per_chunk)
            cacheable = path is not None and path.is_file()
            key_of_file = file_key(spec, source, label, opened.sha, ingest)
            if side:
                key_of_file = sha256_hex(key_of_file, side[2])
            plan = _FilePlan(source, label, opened.sha)
            plans.append(plan)

            # the file's layout and vector length, from its first rows
            fmt = _file_format(spec, _first_record(opened.head()), label, (path, opened.delimiter) if opened.delimiter else None)
            if emb is not None and emb.field is not None and dim is None:
                dim = field_dim(opened.head(), emb.field)
            ctx = FileContext(source, label, fmt, dict(spec.fields), spec.task, spec.task_field, ingest.max_chars,
                              vector_field=emb.field if emb else None, id_field=emb.id_field if side else None,
                              side_path=side[0] if side else None, side_label=side[1] if side else None, dim=dim)

            for desc, job_args in opened.jobs:
                key = sha256_hex(key_of_file, desc, canonical_json({"dim": dim}))
                job_paths = chunk_paths(chunk_dir, key)
                meta = chunk_done(job_paths) if cacheable else None
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
            rec_path, q_path, v_path, _ = chunk_paths(chunk_dir, key)
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
    link_parts(rec_dir, [c.records_path for c in chunks_out])
    link_parts(q_dir, [c.quarantine_path for c in chunks_out])
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
