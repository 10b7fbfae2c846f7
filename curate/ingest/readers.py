"""File readers: JSON, JSONL, Parquet, CSV, saved HF datasets and hub datasets.

Each reader yields :class:`RawRow` items in file order: the row's 0-based index in the file, the
1-based line where it starts (when the file has lines), and either the decoded record or a
:class:`~curate.errors.RecordError`. A problem with one row never stops the others; a problem with the
whole file (missing, empty, undecodable JSON array) raises :class:`~curate.errors.IngestError`.

Large files are read in pieces, never whole: JSONL by byte ranges that :func:`plan_jsonl` cuts at
line ends (in the same single pass that hashes the file), CSV/TSV as a stream, Parquet by record
batches, saved HF datasets by batches. A JSON array (or an object holding one) is decoded whole:
its items are located by line one after another in the decoded text.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import IngestError, RecordError

FILE_TYPES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}


@dataclass
class RawRow:
    index: int
    line: int | None
    record: dict[str, Any] | None = None
    error: RecordError | None = None


def expand_paths(pattern: str, base: Path) -> list[Path]:
    """Resolve a file, directory or glob relative to ``base``; sorted, never empty."""
    p = Path(pattern)
    if not p.is_absolute():
        p = base / p
    if any(ch in pattern for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not matches:
            raise IngestError(f"{pattern}: the pattern matches no file (looked in {base})")
        return matches
    if not p.exists():
        raise IngestError(f"{pattern}: no such file or directory (looked in {base})")
    return [p]


def is_hf_saved_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def file_type(path: Path) -> str:
    if path.is_dir():
        if is_hf_saved_dir(path):
            return "hf_disk"
        raise IngestError(f"{path}: a directory that is not a saved HF dataset; give a file or a glob such as '{path}/*.jsonl'")
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise IngestError(f"{path}: unknown file type '{path.suffix}' (known: {', '.join(sorted(FILE_TYPES))})")
    return kind


def _as_record(obj: Any, index: int, line: int | None) -> RawRow:
    if isinstance(obj, dict):
        return RawRow(index, line, record=obj)
    return RawRow(index, line, error=RecordError("not_an_object", f"the row is a JSON {type(obj).__name__}, not an object"))


@dataclass(frozen=True)
class JsonlChunk:
    """A byte range of a JSONL file that starts and ends at a line boundary."""

    start: int  # byte offset of the range's first line
    end: int  # byte offset just past its last line
    first_line: int  # 1-based line number of the first line
    first_index: int  # 0-based row index (non-blank lines before it)
    n_rows: int  # non-blank lines in the range


def plan_jsonl(path: Path, rows_per_chunk: int, limit: int | None = None) -> tuple[str, list[JsonlChunk]]:
    """One streaming pass over a JSONL file: (its sha256, its chunks of ``rows_per_chunk`` non-blank
    lines each, the last one shorter). With ``limit``, the chunks cover only the first ``limit`` rows
    (the hash still covers the whole file)."""
    h = hashlib.sha256()
    chunks: list[JsonlChunk] = []
    pos = start = 0
    line_no = first_line = 1
    index = first_index = 0
    planning = True
    with open(path, "rb") as f:
        for raw in f:
            h.update(raw)
            if planning and raw.strip():
                index += 1
                if index - first_index == rows_per_chunk or (limit is not None and index == limit):
                    chunks.append(JsonlChunk(start, pos + len(raw), first_line, first_index, index - first_index))
                    start, first_line, first_index = pos + len(raw), line_no + 1, index
                    planning = limit is None or index < limit
            pos += len(raw)
            line_no += 1
    if planning and index > first_index:
        chunks.append(JsonlChunk(start, pos, first_line, first_index, index - first_index))
    return h.hexdigest(), chunks


def read_jsonl(path: Path, start: int = 0, end: int | None = None, first_line: int = 1, first_index: int = 0) -> Iterator[RawRow]:
    """The rows of a JSONL file, or of the byte range ``start``–``end`` of it (a :class:`JsonlChunk`:
    ``first_line`` and ``first_index`` say where the range starts, so lines and indices stay those
    of the whole file)."""
    index = first_index
    pos = start
    with open(path, "rb") as f:
        f.seek(start)
        for line_no, raw in enumerate(f, start=first_line):
            if end is not None and pos >= end:
                break
            pos += len(raw)
            if not raw.strip():
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(index, line_no, error=RecordError("invalid_utf8", f"invalid UTF-8 at byte {exc.start} of the line"))
                index += 1
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(index, line_no, error=RecordError("invalid_json", f"invalid JSON at column {exc.colno}: {exc.msg}"))
                index += 1
                continue
            yield _as_record(obj, index, line_no)
            index += 1


def file_digest(path: Path, check_utf8: bool = False, block: int = 1 << 20) -> str:
    """sha256 of a file, read once in blocks; with ``check_utf8``, invalid UTF-8 raises an
    :class:`IngestError` naming the line and byte (the check of a text file that is then streamed)."""
    h = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = newlines = 0
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
            if check_utf8:
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(data)
                except UnicodeDecodeError as exc:
                    at = fed - pending + exc.start
                    line = newlines + data[: max(0, at - fed)].count(b"\n") + 1
                    raise IngestError(f"{path}:{line}: invalid UTF-8 at byte {at}; re-encode the file as UTF-8") from None
                newlines += data.count(b"\n")
            fed += len(data)
    if check_utf8:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            at = fed - len(exc.object) + exc.start
            raise IngestError(f"{path}:{newlines + 1}: invalid UTF-8 at byte {at}; re-encode the file as UTF-8") from None
    return h.hexdigest()


def _decode_file(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise IngestError(f"{path}:{line}: invalid UTF-8 at byte {exc.start}; re-encode the file as UTF-8") from None


def read_json(path: Path, field: str | None = None) -> Iterator[RawRow]:
    """A JSON array of objects (or an object holding one under ``field``), with line numbers."""
    text = _decode_file(path)
    if not text.strip():
        return
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if field is None and text[pos] == "[":
        # Walk the array item by item so each item knows its line and a bad item names it.
        pos = _skip_ws(text, pos + 1)
        index, line, last = 0, 1, 0
        if text[pos] == "]":
            return
        while True:
            line += text.count("\n", last, pos)
            last = pos
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise IngestError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON in array item {index}: {exc.msg}") from None
            yield _as_record(obj, index, line)
            index += 1
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                return
            err_line = text.count("\n", 0, pos) + 1
            raise IngestError(f"{path}:{err_line}: invalid JSON after array item {index - 1}: expected ',' or ']'")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one JSON object per line? name the file .jsonl)" if "Extra data" in exc.msg else ""
        raise IngestError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}{hint}") from None
    if field is not None:
        if not isinstance(obj, dict) or field not in obj:
            raise IngestError(f"{path}: expected an object with a '{field}' list")
        obj = obj[field]
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        raise IngestError(f"{path}: expected a JSON array of records, got a {type(obj).__name__}")
    for i, item in enumerate(obj):
        yield _as_record(item, i, None)


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_csv(path: Path, delimiter: str = ",") -> Iterator[RawRow]:
    """The rows of a CSV/TSV file, streamed (a header line, then one row per record; a quoted cell
    may span lines). Invalid UTF-8 raises :class:`IngestError` (:func:`file_digest` checks it first)."""
    with open(path, "rb") as fb, io.TextIOWrapper(fb, encoding="utf-8-sig", newline="") as text:
        reader = csv.DictReader(text, delimiter=delimiter)
        index = 0
        line = reader.line_num + 1
        try:
            for row in reader:
                rec = {k: v for k, v in row.items() if k is not None}
                if None in row:
                    yield RawRow(index, line, error=RecordError("wrong_type", f"the row has {len(row[None])} more cells than the header"))
                else:
                    yield RawRow(index, line, record=rec)
                index += 1
                line = reader.line_num + 1
        except UnicodeDecodeError:
            file_digest(path, check_utf8=True)  # names the line and byte
            raise


def read_parquet(path: Path) -> Iterator[RawRow]:
    index = 0
    for table in read_parquet_tables(path, 8192):
        for rec in table.to_pylist():
            yield RawRow(index, None, record=rec)
            index += 1


def read_parquet_tables(path: Path, rows: int, limit: int | None = None):
    """A Parquet file as Arrow tables of exactly ``rows`` rows (the last one shorter), read by
    record batches; with ``limit``, only its first ``limit`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = rows if limit is None else min(rows, limit)
    held: list = []
    n_held = n_out = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=min(rows, 65536)):
        held.append(batch)
        n_held += batch.num_rows
        while n_held >= want and want > 0:
            table = pa.Table.from_batches(held).combine_chunks()
            yield table.slice(0, want)
            n_out += want
            rest = table.slice(want)
            held, n_held = ([*rest.to_batches()] if rest.num_rows else []), rest.num_rows
            want = rows if limit is None else min(rows, limit - n_out)
        if want <= 0:
            return
    if n_held and want > 0:
        yield pa.Table.from_batches(held).combine_chunks().slice(0, want)


def hf_row_batches(ds, rows: int) -> Iterator[list[dict]]:
    """A datasets.Dataset's rows (as the library formats them, like iterating it), in lists of ``rows``."""
    for batch in ds.iter(batch_size=rows):
        keys = list(batch)
        yield [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def _iter_hf(ds) -> Iterator[RawRow]:
    for i, rec in enumerate(ds):
        yield RawRow(i, None, record=dict(rec))


def load_hf_disk(path: Path, split: str):
    """A saved HF dataset (memory-mapped Arrow), the ``split`` of a saved DatasetDict."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise IngestError(f"{path}: saved dataset has no split '{split}' (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds


def read_hf_disk(path: Path, split: str) -> Iterator[RawRow]:
    yield from _iter_hf(load_hf_disk(path, split))


def read_hub(name: str, split: str, revision: str | None = None) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as exc:  # offline, unknown name, auth
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        why = " (this machine is offline: download it elsewhere and give a local path)" if offline else ""
        raise IngestError(f"hub dataset '{name}' (split {split}) could not be loaded{why}: {exc}") from None
    yield from _iter_hf(ds)


def read_file(path: Path, split: str = "train", field: str | None = None) -> Iterator[RawRow]:
    kind = file_type(path)
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "json":
        return read_json(path, field)
    if kind == "csv":
        return read_csv(path)
    if kind == "tsv":
        return read_csv(path, "\t")
    if kind == "parquet":
        return read_parquet(path)
    return read_hf_disk(path, split)
