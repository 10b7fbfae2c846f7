"""File readers: JSON, JSONL, Parquet, CSV, saved HF datasets and hub datasets.

A text file (JSON, JSONL, CSV, TSV) may be compressed — ``data.jsonl.gz``, ``x.csv.zst``,
``y.json.bz2``, ``z.tsv.xz`` — and is decompressed as it is read; its format is the suffix under the
compression suffix. A CSV/TSV file's delimiter is the one given (``delimiter:``) or the one of
``,`` tab ``;`` ``|`` that splits its header into the most columns.

Each reader yields :class:`RawRow` items in file order: the row's 0-based index in the file, the
1-based line where it starts (when the file has lines), and either the decoded record or a
:class:`~curate.errors.RecordError`. A problem with one row never stops the others; a problem with the
whole file (missing, empty, undecodable JSON array) raises :class:`~curate.errors.IngestError`.

Large files are read in pieces, never whole: JSONL by byte ranges that :func:`plan_jsonl` cuts at
line ends (in the same single pass that hashes the file; a compressed JSONL file is streamed
instead), CSV/TSV as a stream, Parquet by record batches, saved HF datasets by batches. A JSON array
(or an object holding one) is decoded whole: its items are located by line one after another in the
decoded text. A JSON object of equal-length lists (column format, ``{"instruction": [...],
"output": [...]}``) is read as rows.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import IngestError, RecordError

FILE_TYPES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}

#: compression suffixes read transparently (the file's format is the suffix under it)
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}

#: CSV/TSV delimiters tried on the header when the input sets none
DELIMITERS = (",", "\t", ";", "|")


@dataclass
class RawRow:
    index: int
    line: int | None
    record: dict[str, Any] | None = None
    error: RecordError | None = None
    #: the row as read when it is not a record (invalid JSON or UTF-8, a JSON array): kept for the quarantine's ``raw``
    text: str | None = None


def expand_paths(pattern: str, base: Path) -> list[Path]:
    """Resolve a file, directory or glob relative to ``base``; sorted, never empty. A path that exists
    as written is used as it is, glob characters and all (``data/my data [v2].jsonl``); ``base``
    itself is never read as a pattern."""
    p = Path(pattern)
    if not p.is_absolute():
        p = base / p
    if p.exists():
        return [p]
    if any(ch in pattern for ch in "*?["):
        root = None if Path(pattern).is_absolute() else str(base)
        found = glob.glob(pattern, root_dir=root, recursive=True)
        matches = sorted(q for q in (Path(m) if root is None else base / m for m in found) if q.is_file())
        if not matches and any(ch in pattern for ch in "*?"):
            raise IngestError(f"{pattern}: the pattern matches no file (looked in {base})")
        if not matches:  # brackets only: most likely a file name as written
            raise IngestError(f"{pattern}: no such file or directory (looked in {base}; read as a glob pattern, it matches no file either)")
        return matches
    raise IngestError(f"{pattern}: no such file or directory (looked in {base})")


def is_hf_saved_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def compression(path: Path) -> str | None:
    """The compression of a file from its name (``gzip``, ``zstd``, ``bz2``, ``xz``), or None."""
    return COMPRESSIONS.get(path.suffix.lower()) if path.suffix else None


def _format_suffix(path: Path) -> str:
    """The suffix that names the format: ``.jsonl`` for ``data.jsonl`` and for ``data.jsonl.gz``."""
    return Path(path.stem).suffix if compression(path) else path.suffix


def file_stem(path: Path) -> str:
    """The file's name without its format and compression suffixes (``data`` for ``data.jsonl.gz``)."""
    name = path.stem if compression(path) else path.name
    return Path(name).stem


def file_type(path: Path) -> str:
    if path.is_dir():
        if is_hf_saved_dir(path):
            return "hf_disk"
        raise IngestError(f"{path}: a directory that is not a saved HF dataset; give a file or a glob such as '{path}/*.jsonl'")
    suffix = _format_suffix(path)
    kind = FILE_TYPES.get(suffix.lower())
    if kind is None:
        shown = "".join(path.suffixes[-2:]) if compression(path) else path.suffix
        raise IngestError(f"{path}: unknown file type '{shown}' (known: {', '.join(sorted(FILE_TYPES))}, "
                          f"each also compressed: {', '.join(sorted(set(COMPRESSIONS) - {'.gzip', '.zstd'}))})")
    if kind == "parquet" and compression(path):
        raise IngestError(f"{path}: a compressed Parquet file; Parquet compresses its own columns, so give the .parquet file "
                          "itself (decompress this one first)")
    return kind


def open_bytes(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed when its name ends in a compression suffix (a stream: read in order)."""
    kind = compression(path)
    if kind is None:
        return open(path, "rb")
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    import pyarrow as pa  # zstd: pyarrow's codec (a base dependency), no extra package

    return io.BufferedReader(pa.input_stream(str(path), compression="zstd"), buffer_size=1 << 20)


@contextlib.contextmanager
def _decompressing(path: Path) -> Iterator[None]:
    """Turn a decompression failure (not that format, cut short) into an IngestError naming the file."""
    try:
        yield
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        kind = compression(path)
        if kind is None or isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise IngestError(f"{path}: cannot decompress it as {kind} ({exc}); is the file complete, and is its suffix right?") from None


def _as_record(obj: Any, index: int, line: int | None) -> RawRow:
    if isinstance(obj, dict):
        return RawRow(index, line, record=obj)
    return RawRow(index, line, error=RecordError("not_an_object", f"the row is a JSON {type(obj).__name__}, not an object"),
                  text=json.dumps(obj, ensure_ascii=False, default=str))


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
    if compression(path) is not None and (start or end is not None):
        raise ValueError(f"{path}: a compressed file is read whole, not by byte ranges")
    with open_bytes(path) as f, _decompressing(path):
        if start:
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
                yield RawRow(index, line_no, error=RecordError("invalid_utf8", f"invalid UTF-8 at byte {exc.start} of the line"),
                             text=raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                index += 1
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(index, line_no, error=RecordError("invalid_json", f"invalid JSON at column {exc.colno}: {exc.msg}"),
                             text=text.rstrip("\r\n"))
                index += 1
                continue
            yield _as_record(obj, index, line_no)
            index += 1


def file_digest(path: Path, check_utf8: bool = False, block: int = 1 << 20) -> str:
    """sha256 of a file (its stored bytes), read once in blocks; with ``check_utf8``, invalid UTF-8
    raises an :class:`IngestError` naming the line and byte (the check of a text file that is then
    streamed; for a compressed file the decompressed text is checked, in a second pass)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if check_utf8 and compression(path) is None:
            _check_utf8(_Hashing(f, h), path, block)
            return h.hexdigest()
        while data := f.read(block):
            h.update(data)
    if check_utf8:
        with open_bytes(path) as f, _decompressing(path):
            _check_utf8(f, path, block)
    return h.hexdigest()


class _Hashing:
    """A binary file whose bytes also go into a hash as they are read."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


def _check_utf8(f, path: Path, block: int = 1 << 20) -> None:
    """Read ``f`` to its end; invalid UTF-8 raises an :class:`IngestError` naming the line and byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = newlines = 0
    while data := f.read(block):
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(data)
        except UnicodeDecodeError as exc:
            at = fed - pending + exc.start
            line = newlines + data[: max(0, at - fed)].count(b"\n") + 1
            raise IngestError(f"{path}:{line}: invalid UTF-8 at byte {at}; re-encode the file as UTF-8") from None
        newlines += data.count(b"\n")
        fed += len(data)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        at = fed - len(exc.object) + exc.start
        raise IngestError(f"{path}:{newlines + 1}: invalid UTF-8 at byte {at}; re-encode the file as UTF-8") from None


def _decode_file(path: Path) -> str:
    with open_bytes(path) as f, _decompressing(path):
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise IngestError(f"{path}:{line}: invalid UTF-8 at byte {exc.start}; re-encode the file as UTF-8") from None


def read_json(path: Path, field: str | None = None, fields: dict[str, str] | None = None) -> Iterator[RawRow]:
    """A JSON array of objects (or an object holding one under ``field``), with line numbers; a JSON
    object of equal-length lists (column format) as one row per position. ``fields`` (the input's
    column mapping) tells a single record from an object that wraps the records."""
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
            keys = _list_keys(obj) if isinstance(obj, dict) else []
            have = f"; its lists are under {', '.join(repr(k) for k in keys)}" if keys else ""
            raise IngestError(f"{path}: json_field: {field}, but the file is not an object with a '{field}' key{have}")
        obj = obj[field]
    if isinstance(obj, dict):
        columns = _columns(obj, path)
        if columns is not None:
            yield from columns
            return
        wrapped = _wrapped(obj, fields or {})
        if wrapped is not None and field is None:
            key, n = wrapped
            raise IngestError(f"{path}: a JSON object that holds its records under '{key}' (a list of {n} objects), "
                              f"not an array of records; set json_field: {key} on this input")
        obj = [obj]
    if not isinstance(obj, list):
        raise IngestError(f"{path}: expected a JSON array of records, got a {type(obj).__name__}")
    for i, item in enumerate(obj):
        yield _as_record(item, i, None)


def _list_keys(obj: dict) -> list[str]:
    return [k for k, v in obj.items() if isinstance(v, list)]


def _columns(obj: dict, path: Path) -> Iterator[RawRow] | None:
    """Column-format JSON (``{"instruction": [...], "output": [...]}``: every value a list, of one
    length, none of them holding objects) as rows; None when ``obj`` is not that. An object with a list
    of objects is a single record (``{"messages": [{...}, {...}], "tags": ["a", "b"]}``: its turns),
    not columns."""
    if not obj or not all(isinstance(v, list) for v in obj.values()):
        return None
    if any(isinstance(item, dict) for v in obj.values() for item in v):
        return None
    lengths = {k: len(v) for k, v in obj.items()}
    if len(set(lengths.values())) > 1:
        raise IngestError(f"{path}: column-format JSON (an object of lists) needs lists of one length, but "
                          + ", ".join(f"'{k}' has {n}" for k, n in lengths.items()))
    keys = list(obj)
    n = next(iter(lengths.values()))
    return (RawRow(i, None, record={k: obj[k][i] for k in keys}) for i in range(n))


def _wrapped(obj: dict, fields: dict[str, str]) -> tuple[str, int] | None:
    """(key, length) of the longest list of objects in ``obj`` when ``obj`` is not itself a record of
    a known layout (``{"version": 1, "data": [{...}, …]}``); else None."""
    from curate.ingest.formats import detect_format

    if detect_format(obj, fields) is not None:
        return None
    lists = [(k, len(v)) for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    return max(lists, key=lambda kv: kv[1]) if lists else None


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def normalise_delimiter(value: str | None) -> str | None:
    """An input's ``delimiter:`` as one character (``tab`` and a written ``\\t`` mean a tab)."""
    if value is None:
        return None
    value = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}.get(value.lower(), value)
    if len(value) != 1 or value in "\r\n\"":
        raise IngestError(f"delimiter: {value!r} must be one character (or 'tab'), e.g. delimiter: ';'")
    return value


def _header_text(path: Path, size: int = 1 << 16) -> str:
    with open_bytes(path) as f, _decompressing(path):
        data = f.read(size)
    return data.decode("utf-8-sig", errors="replace")


def _split_header(text: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    except csv.Error:
        return []


def csv_delimiter(path: Path, kind: str, given: str | None = None) -> str:
    """The delimiter of a CSV/TSV file: ``given`` (the input's ``delimiter:``), else the one of
    ``,`` tab ``;`` ``|`` that splits the header into the most columns (ties: the file type's own,
    ``,`` for .csv and tab for .tsv)."""
    given = normalise_delimiter(given)
    if given is not None:
        return given
    default = "\t" if kind == "tsv" else ","
    text = _header_text(path)
    counts = {d: len(_split_header(text, d)) for d in DELIMITERS}
    best = max(counts.values(), default=0)
    if best <= 1 or counts[default] == best:
        return default
    return next(d for d in DELIMITERS if counts[d] == best)


def delimiter_hint(path: Path, delimiter: str) -> str:
    """A hint for a CSV/TSV header that did not split into columns: the delimiter that seems to be
    used (the most frequent punctuation in the header) and the ``delimiter:`` option."""
    header = next(iter(_header_text(path).splitlines()), "")
    marks = [c for c in header if not (c.isalnum() or c in "_- \"'")]
    guess = max(sorted(set(marks)), key=marks.count) if marks else None
    shown = "tab" if delimiter == "\t" else repr(delimiter)
    suggest = f"delimiter: {guess!r}" if guess and guess != delimiter else "delimiter: <the character between the columns>"
    return (f"; the header did not split into columns with the delimiter {shown}: "
            f"set the input's delimiter (e.g. {suggest}; 'tab' for tabs)")


def read_csv(path: Path, delimiter: str = ",") -> Iterator[RawRow]:
    """The rows of a CSV/TSV file, streamed (a header line, then one row per record; a quoted cell
    may span lines). A row's line is where it starts in the file, the header being line 1. Invalid
    UTF-8 raises :class:`IngestError` (:func:`file_digest` checks it first)."""
    if csv.field_size_limit() < 1 << 30:  # a long response is one cell: the default limit is 128 KiB
        csv.field_size_limit(1 << 30)
    with open_bytes(path) as fb, _decompressing(path), io.TextIOWrapper(fb, encoding="utf-8-sig", newline="") as text:
        reader = csv.DictReader(text, delimiter=delimiter)
        index = 0
        try:
            reader.fieldnames  # reads the header
            line = reader.line_num + 1
            for row in reader:
                rec = {k: v for k, v in row.items() if k is not None}
                if None in row:
                    cells = io.StringIO()
                    csv.writer(cells, delimiter=delimiter, lineterminator="").writerow([*rec.values(), *row[None]])
                    yield RawRow(index, line, error=RecordError("wrong_type", f"the row has {len(row[None])} more cells than the header"),
                                 text=cells.getvalue())
                else:
                    yield RawRow(index, line, record=rec)
                index += 1
                line = reader.line_num + 1
        except UnicodeDecodeError:
            file_digest(path, check_utf8=True)  # names the line and byte
            raise
        except csv.Error as exc:
            raise IngestError(f"{path}:{reader.line_num}: not readable as CSV with the delimiter {delimiter!r}: {exc}") from None


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


def read_file(path: Path, split: str = "train", field: str | None = None, delimiter: str | None = None) -> Iterator[RawRow]:
    kind = file_type(path)
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "json":
        return read_json(path, field)
    if kind in ("csv", "tsv"):
        return read_csv(path, csv_delimiter(path, kind, delimiter))
    if kind == "parquet":
        return read_parquet(path)
    return read_hf_disk(path, split)
