"""Precomputed vectors carried by an input: in a field of each row, or in a side file joined on an id.

An input with ``embedding: {field: …}`` holds each row's vector in that field (a list of numbers,
or its JSON text in a CSV cell); one with ``embedding: {path: …, id_field: …}`` names a Parquet
side file of ``id`` and ``vector`` columns, converted once per side-file content to an Arrow IPC
file (memory-mapped by every ingest worker) and joined on the rows' ``id_field``. A chunk's kept
vectors are written beside its records (:func:`vector_table`); ``build_dataset`` hands the kept
rows' vectors to the store (:class:`VectorSink`). Vectors are float32; every row of an input must
have the same length (its *dim*, from the first vector seen).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import EmbedSpec, InputSpec
from curate.errors import IngestError, RecordError
from curate.ingest.readers import RawRow, file_digest
from curate.io import relpath
from curate.manifests import IngestRef
from curate.store import fixed_bytes

#: precomputed vectors handed to the store per call (rows): bounds the memory of build_dataset
VECTOR_FLUSH_ROWS = 65_536


def parse_vector(value: Any, name: str, dim: int | None) -> np.ndarray:
    """A row's vector as float32 (shape ``(dim,)``), or a RecordError naming the field."""
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


def field_dim(rows: Iterator[RawRow], name: str) -> int | None:
    """The length of the first vector in ``rows`` (the one every row of the input must have)."""
    for raw in rows:
        if raw.error is None and raw.record.get(name) is not None:
            try:
                return len(parse_vector(raw.record[name], name, None))
            except RecordError:
                continue  # quarantined when its chunk is read
    return None


@functools.lru_cache(maxsize=2)
def _side_index(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The side file's ids sorted (fixed-width bytes), the side-file row of each, and the first row of
    each record batch — made once per process (the path names the side file's content). A repeated id
    sorts its first row first (stable sort), so the first row wins."""
    with pa.memory_map(path) as source:
        reader = pa.ipc.open_file(source)
        sizes = [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
        columns = [reader.get_batch(b).column(0) for b in range(reader.num_record_batches)]
        ids = pa.concat_arrays(columns) if sizes else pa.array([], pa.string())
        keys = fixed_bytes(ids)
    order = np.argsort(keys, kind="stable")
    return keys[order], order, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def side_vectors(side_path: str, ids: list[str]) -> list[np.ndarray | None]:
    """Per id: its vector from the side file at ``side_path`` (a float32 numpy view), or None when the
    side file has none. Ids are found by binary search in the side file's sorted ids; only the record
    batches that hold a wanted row are read (a take over the whole file would first concatenate every
    vector in it)."""
    if not ids:
        return []
    keys, order, starts = _side_index(side_path)
    out: list[np.ndarray | None] = [None] * len(ids)
    if not len(keys):
        return out
    query = fixed_bytes(ids)
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    found = keys[at] == query
    pos = np.where(found, order[at], -1)
    batch_of = np.searchsorted(starts, pos, side="right") - 1
    with pa.memory_map(side_path) as source:
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


def vector_table(ids: list[str], rows: list[int], vecs: list[np.ndarray], dim: int | None) -> pa.Table:
    """A chunk's vectors: ``sample_id``, ``row`` (in the file) and ``vector`` (fixed-size lists of ``dim`` float32)."""
    dim = dim or (len(vecs[0]) if vecs else 0)
    flat = np.concatenate(vecs).astype(np.float32) if vecs else np.empty(0, np.float32)
    return pa.table({"sample_id": pa.array(ids, pa.string()), "row": pa.array(rows, pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)})


def side_file(spec: InputSpec, base: Path, folder: Path) -> tuple[str, str, str, int | None]:
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


class VectorSink:
    """Collects the kept rows' precomputed vectors and hands them to the store in bounded batches
    (about ``VECTOR_FLUSH_ROWS`` rows a call)."""

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


def check_embeddings(inputs: list[IngestRef], store_dir: str | None, embed: EmbedSpec | None) -> bool:
    """Whether any input carries vectors; raises IngestError when the flow cannot take them (no
    ``embed: {method: precomputed}``, no store) or the inputs' vector lengths differ."""
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
