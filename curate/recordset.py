"""Record sets: the one way stages hand rows to each other, and the one place that reads them.

A *record set* is a folder of shards of canonical records (:data:`curate.records.RECORD_SCHEMA`)
plus a ``manifest.json``: its name, the stage and config that made it, its row count and content
hash. Ingest writes the ``input`` set, select writes the rows it keeps, a rewrite step writes the rows
it derives; embed, score, select, rewrite, export and report read any set::

    <output_dir>/recordsets/<name>/shard-00000.parquet …  manifest.json

Rows are numbered in one space: input rows ``0 … n_input-1`` in ingest order, derived rows from
``n_input`` on, in the order they were made, so ties (methods.md E2) and the ledgers stay well-defined
when originals and derived rows meet in one selection.

This module also reads what the store holds for a set's rows: the wide score table and the
embedding matrix. Stages import it instead of importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.io import is_url, read_parquet, write_json, write_parquet
from curate.manifests import RecordSetRef, RewriteRef, ShardRef
from curate.records import RECORD_SCHEMA, sha256_hex
from curate.store import NO_VECTOR, Collection, Store, matrix_dir, shard_copies_dir

#: score statuses that take a row out of selection: a failed call, or a judge answer with no rating
QUARANTINE_STATUSES = ("error", "parse_failed")


def shard_hash(ids: list[str]) -> str:
    """A shard's content hash: sha256 over its sample_ids in order (the unit of store resume)."""
    return sha256_hex(*ids)


class RecordSetWriter:
    """Writes a record set shard by shard as rows stream in: ``add(table)`` as often as needed, then
    ``close()`` writes the last, shorter shard and the manifest and returns the :class:`RecordSetRef`.
    Shards hold ``shard_size`` rows (RECORD_SCHEMA, in the order added); shards of an earlier set of the
    same name are removed first."""

    def __init__(self, out_dir: str | Path, name: str, stage: str, config_hash: str, shard_size: int):
        self.folder = Path(out_dir) / "recordsets" / name
        for old in self.folder.glob("shard-*.parquet") if self.folder.exists() else []:
            old.unlink()
        self.name, self.stage, self.config_hash, self.shard_size = name, stage, config_hash, shard_size
        self.held: list[pa.Table] = []
        self.n_held = 0
        self.shards: list[ShardRef] = []
        self.n_rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.held.append(table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA))
            self.n_held += table.num_rows
        while self.n_held >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.held)
        part, rest = table.slice(0, n).combine_chunks(), table.slice(n)
        self.held, self.n_held = ([rest] if rest.num_rows else []), rest.num_rows
        i = len(self.shards)
        path = self.folder / f"shard-{i:05d}.parquet"
        write_parquet(path, part)
        self.shards.append(ShardRef(shard_id=i, path=str(path), sha256=shard_hash(part.column("sample_id").to_pylist()),
                                    n_rows=part.num_rows))
        self.n_rows += part.num_rows

    def close(self) -> RecordSetRef:
        if self.n_held:
            self._flush(self.n_held)
        ref = RecordSetRef(name=self.name, stage=self.stage, config_hash=self.config_hash, dir=str(self.folder), shards=self.shards,
                           n_rows=self.n_rows, sha256=sha256_hex(*(s.sha256 for s in self.shards)))
        write_json(ref.manifest_path, ref.model_dump(mode="json"))
        return ref


def write_recordset(table: pa.Table, out_dir: str | Path, name: str, stage: str, config_hash: str, shard_size: int) -> RecordSetRef:
    """Write ``table`` (RECORD_SCHEMA rows, in row order) as shards of ``shard_size`` rows + manifest."""
    writer = RecordSetWriter(out_dir, name, stage, config_hash, shard_size)
    writer.add(table)
    return writer.close()


def read_shard(shard: ShardRef, columns: list[str] | None = None) -> pa.Table:
    return read_parquet(shard.path, columns=columns, schema=RECORD_SCHEMA if columns is None else None)


def shared_shards(shards: list[ShardRef], store_dir: str) -> list[ShardRef]:
    """The shards as the model stages' tasks should read them. For a local store, unchanged. For a URL
    store (a cluster whose workers may not see this machine's disk), each shard is copied once to
    ``<store>/shards/<shard sha256>.parquet`` (content-addressed: a copy already there is not copied
    again) and the returned refs point there."""
    if not is_url(store_dir):
        return list(shards)
    folder = shard_copies_dir(store_dir)
    folder.fs.invalidate_cache(folder.path)
    have = {p.name for p in folder.glob("*.parquet")} if folder.exists() else set()
    out = []
    for shard in shards:
        dest = folder / f"{shard.sha256}.parquet"
        if dest.name not in have:
            folder.fs.put_file(shard.path, dest.path)  # uploaded whole: the object appears complete or not at all
        out.append(shard.model_copy(update={"path": str(dest)}))
    return out


def read_records(sets: RecordSetRef | list[RecordSetRef], columns: list[str] | None = None) -> pa.Table:
    """All rows of one or more record sets, in the order of the sets and their shards."""
    sets = [sets] if isinstance(sets, RecordSetRef) else sets
    tables = [read_shard(s, columns) for rs in sets for s in rs.shards]
    if not tables:
        return (RECORD_SCHEMA if columns is None else pa.schema([RECORD_SCHEMA.field(c) for c in columns])).empty_table()
    return pa.concat_tables(tables)


def scan_records(sets: RecordSetRef | list[RecordSetRef], columns: list[str]):
    """A lazy Polars scan of ``columns`` over the rows of one or more record sets (set and shard
    order): filters and selections given to it are pushed into the Parquet reads."""
    import polars as pl

    sets = [sets] if isinstance(sets, RecordSetRef) else sets
    paths = [s.path for rs in sets for s in rs.shards]
    if not paths:
        return pl.from_arrow(pa.schema([RECORD_SCHEMA.field(c) for c in columns]).empty_table()).lazy()
    return pl.scan_parquet(paths).select(columns)


def iter_shards(sets: list[RecordSetRef]) -> Iterator[ShardRef]:
    for rs in sets:
        yield from rs.shards


def rows_leaving_pool(rewrites: list[RewriteRef]) -> list[int]:
    """The rows of a rewrite's source set that it used or dropped (its dispositions file): with
    ``pool: derived`` they leave the next selection round (the ledger stage records why)."""
    import polars as pl

    if not rewrites:
        return []
    disp = pl.concat([pl.scan_parquet(rw.dispositions_path).select("row", "disposition") for rw in rewrites], how="vertical_relaxed")
    return disp.filter(pl.col("disposition").is_in(["used", "dropped"])).select(pl.col("row").unique().sort()).collect()["row"].to_list()


def take_records(sets: list[RecordSetRef], ids=None, rows=None) -> pa.Table:
    """The rows of ``sets`` whose sample_id is in ``ids`` (or whose row number is in ``rows``),
    sorted by row. ``ids``/``rows``: a list, set, numpy array or Arrow array. Each shard's key column
    is read first and the whole shard only when it holds a wanted row (never the whole sets as
    Python objects)."""
    if rows is None:
        column, wanted = "sample_id", pc.unique(_arrow(ids, pa.string()))
    else:
        column, wanted = "row", pc.unique(_arrow(rows, pa.int64()))
    parts = []
    for shard in iter_shards(sets):
        mask = pc.is_in(read_parquet(shard.path, columns=[column]).column(0), value_set=wanted)
        if pc.any(mask).as_py():
            parts.append(read_shard(shard).filter(mask))
    table = pa.concat_tables(parts) if parts else RECORD_SCHEMA.empty_table()
    return table.take(pc.sort_indices(table, [("row", "ascending")]))


def _arrow(values, type_: pa.DataType) -> pa.Array:
    """``values`` (list, set, numpy array, Arrow or Polars column) as one Arrow array of ``type_``."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif isinstance(values, (set, frozenset)):
        values = sorted(values)
    elif hasattr(values, "to_arrow"):  # a Polars Series
        values = values.to_arrow()
    return pa.array(values, type_) if not isinstance(values, pa.Array) else values.cast(type_)


# -- what the store holds for a set's rows ----------------------------------------------------------


def wide_scores(store_dir: str, scorers: dict[str, tuple[Any, str]], ids):
    """Scores aligned with ``ids`` (distinct sample_ids: a list, numpy array or Arrow array):
    ``scores`` (name -> float64 array), ``statuses`` (scorer -> numpy object array; one shared
    string object per distinct status, never one per row), ``errors`` (scorer -> {position:
    (error_class, message)} for the rows whose status is in :data:`QUARANTINE_STATUSES`),
    ``orientation`` (name -> str).

    ``scorers``: label -> (step spec, store key). Each scorer's store parts are scanned lazily with
    Polars (a URL store's parts are fetched whole, once each, and held while this scorer is read),
    joined on ``sample_id`` to the positions of ``ids`` and pivoted from long (one row per variant) to
    wide. Rows never scored get NaN and status ``missing``. As
    :meth:`curate.store.Collection.read`: a (sample_id, variant) stored twice (concurrent writers)
    counts once, the first in part order; a row's status is that of its last stored variant.
    """
    import polars as pl

    from curate.scorers import scorer_class

    id_frame = pl.DataFrame({"sample_id": pl.from_arrow(_arrow(ids, pa.string()))}).with_row_index("_pos").lazy()
    n = len(ids)
    scores: dict[str, np.ndarray] = {}
    statuses: dict[str, np.ndarray] = {}
    errors: dict[str, dict[int, tuple[str | None, str | None]]] = {}
    orientation: dict[str, str] = {}
    for label, (step, key) in scorers.items():
        outputs = scorer_class(step.method).outputs
        status = np.full(n, "missing", dtype=object)
        errs: dict[int, tuple[str | None, str | None]] = {}
        for variant, orient in outputs.items():
            scores[f"{label}.{variant}"] = np.full(n, np.nan)
            orientation[f"{label}.{variant}"] = orient
        parts = Store(store_dir).scores(key).parts()
        if parts:
            fetched: dict[str, pa.Table] = {}  # a URL store's parts, read once each (Polars scans local files only)

            def read(p, columns):
                if not is_url(p):
                    return read_parquet(p, columns)
                if str(p) not in fetched:
                    fetched[str(p)] = read_parquet(p)
                return fetched[str(p)].select(columns)

            def scan(columns):  # every part, in part order, with the global index of each stored row
                frames = [pl.from_arrow(read(p, columns)).lazy() if is_url(p) else pl.scan_parquet(p).select(columns) for p in parts]
                return pl.concat(frames, how="vertical_relaxed").with_row_index("_i")

            try:
                # variant and status as enums (their distinct values first, read per part): the long table is
                # then numbers only, and the streaming engine never holds the parts' sample_ids all at once
                variants, kinds = set(), set()
                for p in parts:
                    t = read(p, ["variant", "status"])
                    variants.update(pc.unique(t.column(0)).to_pylist())
                    kinds.update(pc.unique(t.column(1)).to_pylist())
                venum, senum = pl.Enum(sorted(v for v in variants if v is not None)), pl.Enum(sorted(s for s in kinds if s is not None))
                long = (scan(["sample_id", "variant", "score", "status"])
                        .join(id_frame, on="sample_id", how="inner", maintain_order="left")
                        .select("_i", "_pos", pl.col("variant").cast(venum), "score", pl.col("status").cast(senum))
                        .collect(engine="streaming"))
            except (pl.exceptions.PolarsError, pa.ArrowException, OSError):
                Store(store_dir).scores(key).verify(parts)  # a part that does not read: set aside, StoreCorrupt
                raise
            pos = long["_pos"].to_numpy()
            code = long["variant"].to_physical().fill_null(len(venum.categories)).to_numpy()
            keep = np.ones(len(pos), dtype=bool)
            for c in range(len(venum.categories) + 1):  # a (sample_id, variant) stored twice: the first in part order counts
                at = np.flatnonzero(code == c)
                if len(at) and np.bincount(pos[at], minlength=n).max() > 1:
                    _, first = np.unique(pos[at], return_index=True)
                    keep[at] = False
                    keep[at[first]] = True
            if not keep.all():
                long = long.filter(pl.Series(keep))
                pos, code = long["_pos"].to_numpy(), long["variant"].to_physical().fill_null(len(venum.categories)).to_numpy()
            value = long["score"].to_numpy()  # a null score reads as NaN
            for c, variant in enumerate(venum.categories.to_list()):  # the long table pivoted to wide, one variant at a time
                if variant in outputs:
                    at = np.flatnonzero(code == c)
                    scores[f"{label}.{variant}"][pos[at]] = value[at]
            last = long.group_by("_pos").agg(pl.col("status").last())  # in-group order is part order
            names = np.empty(len(senum.categories) + 1, dtype=object)  # one str object per distinct status
            names[:-1] = senum.categories.to_list()
            status[last["_pos"].to_numpy()] = names[last["status"].to_physical().fill_null(len(senum.categories)).to_numpy()]
            quarantine = np.flatnonzero(np.isin(names[:-1], QUARANTINE_STATUSES))
            bad = long.filter(pl.Series(np.isin(long["status"].to_physical().fill_null(len(senum.categories)).to_numpy(), quarantine)))
            bad = bad.select("_i", "_pos")
            if bad.height:
                found = (scan(["status", "error_class", "message"]).filter(pl.col("status").is_in(QUARANTINE_STATUSES))
                         .join(bad.lazy(), on="_i", how="inner").sort("_i").collect())
                for pos, ec, msg in found.select("_pos", "error_class", "message").iter_rows():
                    errs[pos] = (ec, msg)  # the last stored quarantine row of a sample_id wins
        statuses[label] = status
        errors[label] = errs
    return scores, statuses, errors, orientation


def load_embeddings(store_dir: str, key: str, ids) -> tuple[np.ndarray, list[str]]:
    """(vectors (len(ids), dim) in the order of ``ids``, status per id).

    The vectors are a read-only ``np.memmap`` of ``<store>/embeddings/<key>/matrix/<hash of ids>.npy``
    (for a URL store, of a local file under ``$CURATE_CACHE_DIR/matrix/``: see :func:`curate.store.matrix_dir`),
    in the stored dtype (float32, or float16 with ``embed.storage: float16``). The file is assembled
    once, part by part, into a temporary file renamed into place; a later call for the same ids over
    the same store parts reuses it (``<hash>.json`` records the parts, ``<hash>.status.parquet`` the
    statuses). Ids missing from the store raise, except for a precomputed embedder's collection, where
    they get status ``error:no_vector`` (and a zero vector).
    """
    collection = Store(store_dir).embeddings(key)
    parts = collection.parts()
    if not parts:
        raise RuntimeError("no embeddings stored for this run")
    if len(ids) == 0:  # ids: a list, a numpy array or an Arrow string array
        first = read_parquet(parts[0], columns=["vector"]).column(0).combine_chunks()
        return np.empty((0, len(first[0]) if len(first) else 0), dtype=pc.list_flatten(first).type.to_pandas_dtype()), []
    id_array = _arrow(ids, pa.string())
    digest = _ordered_ids_digest(id_array)
    folder = matrix_dir(collection)
    path, meta_path, status_path = folder / f"{digest}.npy", folder / f"{digest}.json", folder / f"{digest}.status.parquet"
    part_names = [p.name for p in parts]
    cached = _cached_matrix(path, meta_path, status_path, part_names, len(ids))
    if cached is not None:
        return cached
    fingerprint = collection.fingerprint() or {}
    allow_missing = fingerprint.get("method") == "precomputed"
    _sweep_abandoned(folder)
    _build_matrix(collection, parts, id_array, path, status_path, allow_missing)
    write_json(meta_path, {"parts": part_names, "n": len(ids)})
    out = _cached_matrix(path, meta_path, status_path, part_names, len(ids))
    assert out is not None
    return out


#: a matrix assembly's temporary file untouched for this long was left by a killed run
ABANDONED_AFTER_S = 24 * 3600


def _sweep_abandoned(folder: Path) -> None:
    """Remove temporary matrix files (``.<name>.*.tmp``) untouched for :data:`ABANDONED_AFTER_S`: what
    killed assemblies left. A younger one may be another flow's assembly in progress (the store is shared)."""
    import time

    now = time.time()
    for tmp in folder.glob(".*.tmp") if folder.exists() else ():
        try:
            if now - tmp.stat().st_mtime > ABANDONED_AFTER_S:
                tmp.unlink()
        except FileNotFoundError:
            continue


def _ordered_ids_digest(id_array: pa.Array) -> str:
    """sha256 (32 hex) over a string array's lengths and bytes, in order: one pass in C, not per id."""
    import hashlib

    arr = id_array.combine_chunks() if isinstance(id_array, pa.ChunkedArray) else id_array
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    h = hashlib.sha256(np.diff(offsets).astype("<i8").tobytes())
    if data is not None and len(arr):
        h.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])
    return h.hexdigest()[:32]


def _cached_matrix(path: Path, meta_path: Path, status_path: Path, part_names: list[str], n: int):
    """The stored matrix and statuses when built from exactly these parts, else None."""
    import json

    if not (meta_path.exists() and path.exists() and status_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("parts") != part_names or meta.get("n") != n:
            return None
        mat = np.load(path, mmap_mode="r")
        status = pq.read_table(status_path).column("status")
    except (OSError, ValueError, pa.ArrowException):  # a truncated or unreadable file: build it again
        return None
    if mat.shape[0] != n or len(status) != n:
        return None
    return mat, _status_list(status)


def _status_list(column) -> list[str]:
    """A status column as a list whose equal values share one str object (1M rows: 8 MB of pointers)."""
    enc = pc.dictionary_encode(column).combine_chunks()
    names = enc.dictionary.to_pylist()
    return [names[c] for c in enc.indices.to_numpy(zero_copy_only=False).tolist()]


def _build_matrix(collection: Collection, parts: list[Path], id_array: pa.Array, path: Path, status_path: Path,
                  allow_missing: bool) -> None:
    """Fill ``path`` (.npy, the stored dtype) part by part; the first stored row of an id wins."""
    from curate.io import atomic_path

    n = len(id_array)
    pos_first = pc.index_in(id_array, value_set=id_array).to_numpy(zero_copy_only=False).astype(np.int64)  # first position of each id
    filled = np.zeros(n, dtype=bool)
    status_codes = np.full(n, -1, dtype=np.int32)
    names: list[str] = []
    mat = None
    with atomic_path(path) as tmp:
        for part in parts:
            try:
                t = read_parquet(part, columns=["sample_id", "status", "vector"])
            except (OSError, pa.ArrowException):
                collection.verify([part])  # sets a damaged part aside and raises StoreCorrupt
                raise
            where = pc.index_in(t.column("sample_id"), value_set=id_array).to_numpy(zero_copy_only=False)
            hit = ~np.isnan(where) if where.dtype.kind == "f" else np.ones(len(where), dtype=bool)
            rows = np.flatnonzero(hit)
            if not len(rows):
                continue
            dest = where[rows].astype(np.int64)
            fresh = ~filled[dest]  # a duplicate from a concurrent writer: the earlier part's row stays
            rows, dest = rows[fresh], dest[fresh]
            _, first_in_part = np.unique(dest, return_index=True)
            keep = np.sort(first_in_part)
            rows, dest = rows[keep], dest[keep]
            if not len(rows):
                continue
            vec = t.column("vector").combine_chunks()
            flat = pc.list_flatten(vec).to_numpy(zero_copy_only=False)
            block = flat.reshape(len(vec), -1)
            if mat is None:
                mat = np.lib.format.open_memmap(tmp, mode="w+", dtype=block.dtype, shape=(n, block.shape[1]))
            elif block.shape[1] != mat.shape[1] or block.dtype != mat.dtype:
                raise RuntimeError(f"embedding part {part.name}: vectors {block.dtype}×{block.shape[1]}, others {mat.dtype}×{mat.shape[1]}")
            order = np.argsort(dest, kind="stable")  # write in file order
            mat[dest[order]] = block[rows[order]]
            enc = pc.dictionary_encode(t.column("status").take(pa.array(rows))).combine_chunks()
            local = enc.dictionary.to_pylist()
            remap = np.array([names.index(s) if s in names else (names.append(s) or len(names) - 1) for s in local], dtype=np.int32)
            status_codes[dest] = remap[enc.indices.to_numpy(zero_copy_only=False)]
            filled[dest] = True
            del t, vec, flat, block
        if mat is None:
            raise RuntimeError("no embeddings stored for this run")
        dup = pos_first != np.arange(n)
        if dup.any():  # a repeated id gets its first occurrence's vector
            mat[np.flatnonzero(dup)] = mat[pos_first[dup]]
            filled[dup] = filled[pos_first[dup]]
            status_codes[dup] = status_codes[pos_first[dup]]
        missing = np.flatnonzero(~filled)
        if len(missing):
            if not allow_missing:
                raise RuntimeError(f"{len(missing)} rows have no stored embedding (first: {id_array[int(missing[0])].as_py()})")
            mat[missing] = 0
            names.append(NO_VECTOR)
            status_codes[missing] = len(names) - 1
        mat.flush()
        del mat
    statuses = pa.DictionaryArray.from_arrays(pa.array(status_codes), pa.array(names, pa.string())).cast(pa.string())
    write_parquet(status_path, pa.table({"status": statuses}))
