"""File readers: JSON, JSONL, Parquet, CSV, saved HF datasets and hub datasets.

Each reader yields :class:`RawRow` items in file order: the row's 0-based index in the file, the
1-based line where it starts (when the file has lines), and either the decoded record or a
:class:`~curate.errors.RecordError`. A problem with one row never stops the others; a problem with the
whole file (missing, empty, undecodable JSON array) raises :class:`~curate.errors.IngestError`.
"""

from __future__ import annotations

import csv
import glob
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


def read_jsonl(path: Path) -> Iterator[RawRow]:
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
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
    with open(path, "rb") as fb:
        raw = fb.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise IngestError(f"{path}:{line}: invalid UTF-8 at byte {exc.start}; re-encode the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    index = 0
    line = reader.line_num + 1
    for row in reader:
        rec = {k: v for k, v in row.items() if k is not None}
        if None in row:
            yield RawRow(index, line, error=RecordError("wrong_type", f"the row has {len(row[None])} more cells than the header"))
        else:
            yield RawRow(index, line, record=rec)
        index += 1
        line = reader.line_num + 1


def read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        for rec in batch.to_pylist():
            yield RawRow(index, None, record=rec)
            index += 1


def _iter_hf(ds) -> Iterator[RawRow]:
    for i, rec in enumerate(ds):
        yield RawRow(i, None, record=dict(rec))


def read_hf_disk(path: Path, split: str) -> Iterator[RawRow]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise IngestError(f"{path}: saved dataset has no split '{split}' (splits: {', '.join(ds)})")
        ds = ds[split]
    yield from _iter_hf(ds)


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
