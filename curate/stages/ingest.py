"""Ingest: read inputs, convert to canonical records, validate, dedup, shard.

``read_input`` runs once per input spec (one Prefect task each) and writes that input's valid
records and quarantined rows. ``build_dataset`` then numbers rows globally (inputs in flow order),
filters exact duplicates (first row wins) and writes the rest as the ``input`` record set, in shards
of ``shard_size`` rows: the unit of work and resume for every later stage.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import InputSpec, IngestSpec
from curate.errors import IngestError, RecordError
from curate.ingest.formats import CONVERTERS, detect_format, required_fields
from curate.ingest.readers import expand_paths, read_file, read_hub
from curate.ingest.validate import normalise_messages, validate_messages
from curate.io import file_sha256, relpath, write_json, write_parquet
from curate.ledger import ledger_table
from curate.manifests import DatasetRef, IngestRef
from curate.records import RECORD_SCHEMA, canonical_json, sample_id, sha256_hex
from curate.recordset import write_recordset

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


def _check_declared(fmt: str, record: dict, spec: InputSpec, where: str) -> None:
    missing = [f for f in required_fields(fmt, spec.fields) if f not in record]
    if missing:
        seen = detect_format(record)
        hint = f"; it looks like '{seen}' (set format: {seen} or auto)" if seen else ""
        raise IngestError(
            f"{where}: declared format '{fmt}' needs field(s) {', '.join(repr(m) for m in missing)}, "
            f"but the row has {', '.join(repr(k) for k in list(record)[:8]) or 'no fields'}{hint}"
        )


# The layout of a cache entry; what the code makes of a file is keyed by _reader_code().
INGEST_CACHE_VERSION = "1"


def _file_key(spec: InputSpec, source: str, label: str, sha: str, ingest: IngestSpec) -> str:
    """What decides one file's records: its bytes, how it is read (format, fields, limit …), its
    source name and label (they go into every record), and the conversation rules."""
    how = spec.model_dump(mode="json", exclude={"path", "name", "hub", "revision"})
    return sha256_hex(canonical_json({"v": INGEST_CACHE_VERSION, "code": _reader_code(), "file": sha, "source": source, "label": label, "read": how,
                                      "max_chars": ingest.max_chars}))


@functools.cache
def _reader_code() -> str:
    """sha256 of the code that turns a file into records (readers, converters, rules, ids): an upgrade
    that changes it misses the cache instead of mixing old records with new ones."""
    import curate.ingest.formats as f
    import curate.ingest.readers as r
    import curate.ingest.validate as v
    import curate.records as rec

    return sha256_hex(*(Path(m.__file__).read_bytes() for m in (f, r, v, rec)), Path(__file__).read_bytes())


def _cache_paths(cache_dir: str, key: str) -> tuple[Path, Path, Path]:
    d = Path(cache_dir) / key[:2]
    return d / f"{key}.records.parquet", d / f"{key}.quarantine.parquet", d / f"{key}.json"


def _cached_file(cache_dir: str, key: str):
    rec, quar, done = _cache_paths(cache_dir, key)
    if not done.exists():  # written last: a file cut short by a kill is never read
        return None
    meta = json.loads(done.read_text())
    return (pq.read_table(rec, schema=RECORD_SCHEMA).to_pylist(), pq.read_table(quar, schema=QUARANTINE_SCHEMA).to_pylist(),
            meta["formats"], meta["n_rows"])


def _cache_file(cache_dir: str, key: str, records: list[dict], quarantine: list[dict], formats: list[str], n_rows: int) -> None:
    rec, quar, done = _cache_paths(cache_dir, key)
    write_parquet(rec, pa.Table.from_pylist(records, schema=RECORD_SCHEMA))
    write_parquet(quar, pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
    write_json(done, {"formats": formats, "n_rows": n_rows})


def read_input(spec: InputSpec, input_index: int, base_dir: str, work_dir: str, ingest: IngestSpec,
               cache_dir: str | None = None) -> IngestRef:
    """Read one input spec (all files of a glob) into canonical records + quarantined rows. With a
    ``cache_dir`` (the store's ``ingest/``), a file whose bytes and read settings were seen before is
    not parsed again: its records come from the cache (a folder that grows re-reads only new files)."""
    base = Path(base_dir)
    work = Path(work_dir)
    if spec.hub:
        sources = [(spec.name or spec.hub.split("/")[-1], f"hub:{spec.hub}", read_hub(spec.hub, spec.split, spec.revision), None)]
    else:
        files = expand_paths(spec.path, base)
        sources = []
        for f in files:
            name = spec.name or f.stem
            if spec.name and len(files) > 1:
                name = f"{spec.name}/{f.stem}"
            sources.append((name, relpath(f, base), read_file(f, spec.split, spec.json_field), f))

    records: list[dict] = []
    quarantine: list[dict] = []
    local_row = 0
    formats_seen = set()
    file_hashes = []
    files_cached = 0
    for source, label, rows, path in sources:
        file_hashes.append(file_sha256(path) if path is not None and path.is_file() else sha256_hex(label))
        key = _file_key(spec, source, label, file_hashes[-1], ingest) if cache_dir and path is not None and path.is_file() else None
        hit = _cached_file(cache_dir, key) if key else None
        if hit is not None:  # this file, with these settings, was read before: its rows come from the store
            file_records, file_quarantine, file_formats, n_file = hit
            files_cached += 1
            for r in file_records:
                records.append({**r, "row": r["row"] + local_row})
            for q in file_quarantine:
                quarantine.append({**q, "local_row": q["local_row"] + local_row})
            formats_seen |= set(file_formats)
            local_row += n_file
            continue
        first_record, first_quarantine, first_row = len(records), len(quarantine), local_row
        fmt = None if spec.format == "auto" else spec.format
        checked = spec.format == "auto"
        n_file = 0
        file_formats: set[str] = set()  # formats of rows that got as far as conversion (cached with the file)
        for raw in rows:
            if spec.limit is not None and n_file >= spec.limit:
                break
            n_file += 1
            where = _location(label, raw.line, raw.index)
            error = raw.error
            rec = None
            if error is None:
                record = raw.record
                if fmt is None:
                    fmt = detect_format(record, spec.fields)
                    if fmt is None:
                        raise IngestError(
                            f"{where}: cannot tell the format from the fields "
                            f"{', '.join(repr(k) for k in list(record)[:8])}; set format: alpaca | sharegpt | openai | prompt_completion"
                            " (and fields: to map column names)"
                        )
                elif not checked:
                    _check_declared(fmt, record, spec, where)
                    checked = True
                file_formats.add(fmt)
                try:
                    messages, tools = CONVERTERS[fmt](record, spec.fields)
                    messages = normalise_messages(messages)
                    validate_messages(messages, ingest.max_chars)
                    task = spec.task
                    if spec.task_field:
                        value = record.get(spec.task_field)
                        task = None if value is None else str(value)
                    rec = {
                        "sample_id": sample_id(messages, tools),
                        "row": local_row,
                        "source": source,
                        "source_index": raw.index,
                        "source_file": label,
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
                field = f" {error.field}:" if error.field else ""
                quarantine.append(
                    {
                        "local_row": local_row,
                        "source": source,
                        "source_file": label,
                        "source_index": raw.index,
                        "source_line": raw.line,
                        "error_class": error.error_class,
                        "field": error.field,
                        "message": f"{where}:{field} {error.message}",
                        "raw": _raw(raw.record),
                    }
                )
            else:
                records.append(rec)
            local_row += 1
        if n_file == 0:
            raise IngestError(f"{label}: the input has no rows (empty file?)")
        if key:
            _cache_file(cache_dir, key, [{**r, "row": r["row"] - first_row} for r in records[first_record:]],
                        [{**q, "local_row": q["local_row"] - first_row} for q in quarantine[first_quarantine:]],
                        sorted(file_formats), n_file)
        formats_seen |= file_formats

    name = spec.name or (sources[0][0] if len(sources) == 1 else Path(spec.path or "input").stem)
    rec_path = work / f"input-{input_index:03d}.records.parquet"
    q_path = work / f"input-{input_index:03d}.quarantine.parquet"
    write_parquet(rec_path, pa.Table.from_pylist(records, schema=RECORD_SCHEMA))
    write_parquet(q_path, pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
    return IngestRef(
        input_index=input_index,
        source=name,
        files=[s[1] for s in sources],
        file_sha256=file_hashes,
        records_path=str(rec_path),
        quarantine_path=str(q_path),
        n_rows=local_row,
        n_valid=len(records),
        n_quarantined=len(quarantine),
        format=",".join(sorted(formats_seen)) or (spec.format if spec.format != "auto" else "unknown"),
        files_cached=files_cached,
    )


def build_dataset(inputs: list[IngestRef], out_dir: str, ingest: IngestSpec) -> DatasetRef:
    """Number rows globally, filter duplicates, write the ``input`` record set (under ``out_dir``)
    and the ingest part of the ledger (under ``out_dir/ingest``)."""
    out = Path(out_dir) / "ingest"
    offset = 0
    tables = []
    ledger_rows: list[dict] = []
    for ref in inputs:
        t = pq.read_table(ref.records_path, schema=RECORD_SCHEMA)
        t = t.set_column(t.schema.get_field_index("row"), "row", pa.compute.add(t.column("row"), offset))
        tables.append(t)
        q = pq.read_table(ref.quarantine_path, schema=QUARANTINE_SCHEMA).to_pylist()
        for r in q:
            ledger_rows.append(
                {
                    "row": r["local_row"] + offset,
                    "sample_id": None,
                    "source": r["source"],
                    "source_index": r["source_index"],
                    "source_line": r["source_line"],
                    "outcome": "quarantined",
                    "stage": "ingest",
                    "reason": r["error_class"],
                    "detail": r["message"],
                    "rank": None,
                }
            )
        offset += ref.n_rows
    n_input = offset
    table = pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()

    ids = table.column("sample_id").to_pylist()
    keep = []
    first_row: dict[str, int] = {}
    rows = table.column("row").to_pylist()
    meta = table.select(["source", "source_index", "source_line", "source_file"]).to_pylist()
    n_dup = 0
    for i, (sid, row) in enumerate(zip(ids, rows)):
        if ingest.dedup and sid in first_row:
            n_dup += 1
            m = meta[i]
            ledger_rows.append(
                {
                    "row": row,
                    "sample_id": sid,
                    "source": m["source"],
                    "source_index": m["source_index"],
                    "source_line": m["source_line"],
                    "outcome": "filtered",
                    "stage": "ingest",
                    "reason": "exact_duplicate",
                    "detail": f"same content as input row {first_row[sid]} (sample_id {sid[:12]}…)",
                    "rank": None,
                }
            )
            continue
        first_row.setdefault(sid, row)
        keep.append(i)
    table = table.take(pa.array(keep, pa.int64()))

    made_from = sha256_hex(*(r.model_dump_json(include={"source", "files", "file_sha256", "format", "n_rows"}) for r in inputs),
                           ingest.model_dump_json())
    records = write_recordset(table, out_dir, "input", "ingest", made_from, ingest.shard_size)

    ledger_rows.sort(key=lambda r: r["row"])
    ledger_path = out / "ingest_ledger.parquet"
    write_parquet(ledger_path, ledger_table(ledger_rows))
    ref = DatasetRef(
        records=records,
        ledger_path=str(ledger_path),
        n_input=n_input,
        n_valid=table.num_rows,
        n_quarantined=sum(r.n_quarantined for r in inputs),
        n_duplicates=n_dup,
        sources=inputs,
    )
    write_json(out / "dataset.json", ref.model_dump(mode="json"))
    return ref
