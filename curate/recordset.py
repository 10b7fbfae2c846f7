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

from curate.io import write_json, write_parquet
from curate.manifests import RecordSetRef, ShardRef
from curate.records import RECORD_SCHEMA, sha256_hex
from curate.store import Store

#: score statuses that take a row out of selection: a failed call, or a judge answer with no rating
QUARANTINE_STATUSES = ("error", "parse_failed")


def shard_hash(ids: list[str]) -> str:
    """A shard's content hash: sha256 over its sample_ids in order (the unit of store resume)."""
    return sha256_hex(*ids)


def write_recordset(table: pa.Table, out_dir: str | Path, name: str, stage: str, config_hash: str, shard_size: int) -> RecordSetRef:
    """Write ``table`` (RECORD_SCHEMA rows, in row order) as shards of ``shard_size`` rows + manifest."""
    folder = Path(out_dir) / "recordsets" / name
    for old in folder.glob("shard-*.parquet") if folder.exists() else []:
        old.unlink()
    table = table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    shards = []
    for i, start in enumerate(range(0, table.num_rows, shard_size)):
        part = table.slice(start, shard_size)
        path = folder / f"shard-{i:05d}.parquet"
        write_parquet(path, part)
        shards.append(ShardRef(shard_id=i, path=str(path), sha256=shard_hash(part.column("sample_id").to_pylist()), n_rows=part.num_rows))
    ref = RecordSetRef(name=name, stage=stage, config_hash=config_hash, dir=str(folder), shards=shards, n_rows=table.num_rows,
                       sha256=sha256_hex(*(s.sha256 for s in shards)))
    write_json(ref.manifest_path, ref.model_dump(mode="json"))
    return ref


def read_shard(shard: ShardRef, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(shard.path, columns=columns, schema=RECORD_SCHEMA if columns is None else None)


def read_records(sets: RecordSetRef | list[RecordSetRef], columns: list[str] | None = None) -> pa.Table:
    """All rows of one or more record sets, in the order of the sets and their shards."""
    sets = [sets] if isinstance(sets, RecordSetRef) else sets
    tables = [read_shard(s, columns) for rs in sets for s in rs.shards]
    if not tables:
        return (RECORD_SCHEMA if columns is None else pa.schema([RECORD_SCHEMA.field(c) for c in columns])).empty_table()
    return pa.concat_tables(tables)


def iter_shards(sets: list[RecordSetRef]) -> Iterator[ShardRef]:
    for rs in sets:
        yield from rs.shards


def take_records(sets: list[RecordSetRef], ids: list[str] | set[str] | None = None, rows: list[int] | None = None) -> pa.Table:
    """The rows of ``sets`` whose sample_id is in ``ids`` (or whose row number is in ``rows``),
    filtered shard by shard with Arrow (never the whole sets as Python objects), sorted by row."""
    column, wanted = ("sample_id", pa.array(sorted(set(ids)), pa.string())) if rows is None else ("row", pa.array(sorted(set(rows)), pa.int64()))
    parts = []
    for shard in iter_shards(sets):
        t = read_shard(shard)
        parts.append(t.filter(pc.is_in(t.column(column), value_set=wanted)))
    table = pa.concat_tables(parts) if parts else RECORD_SCHEMA.empty_table()
    return table.take(pc.sort_indices(table, [("row", "ascending")]))


# -- what the store holds for a set's rows ----------------------------------------------------------


def wide_scores(store_dir: str, scorers: dict[str, tuple[Any, str]], ids: list[str]):
    """Scores aligned with ``ids``: ``scores`` (name -> float64 array), ``statuses`` (scorer -> list),
    ``errors`` (scorer -> list of (error_class, message) or None), ``orientation`` (name -> str).

    ``scorers``: label -> (step spec, store key). Rows never scored get NaN and status ``missing``.
    """
    from curate.scorers import scorer_class

    pos = {sid: i for i, sid in enumerate(ids)}
    n = len(ids)
    scores: dict[str, np.ndarray] = {}
    statuses: dict[str, list] = {}
    errors: dict[str, list] = {}
    orientation: dict[str, str] = {}
    for label, (step, key) in scorers.items():
        outputs = scorer_class(step.method).outputs
        status = ["missing"] * n
        errs: list[tuple[str | None, str | None] | None] = [None] * n
        for variant, orient in outputs.items():
            scores[f"{label}.{variant}"] = np.full(n, np.nan)
            orientation[f"{label}.{variant}"] = orient
        table = Store(store_dir).scores(key).read(ids, columns=["sample_id", "variant", "score", "status", "error_class", "message"])
        if table is not None:
            cols = table.to_pydict()
            for sid, variant, value, st, ec, msg in zip(cols["sample_id"], cols["variant"], cols["score"], cols["status"], cols["error_class"], cols["message"]):
                i = pos[sid]
                name = f"{label}.{variant}"
                if name in scores:
                    scores[name][i] = np.nan if value is None else value
                status[i] = st
                if st in QUARANTINE_STATUSES:
                    errs[i] = (ec, msg)
        statuses[label] = status
        errors[label] = errs
    return scores, statuses, errors, orientation


def load_embeddings(store_dir: str, key: str, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """(vectors (len(ids), dim) float32 in the order of ``ids``, status per id); missing ids raise."""
    table = Store(store_dir).embeddings(key).read(ids)
    if table is None:
        raise RuntimeError("no embeddings stored for this run")
    pos = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    missing = [sid for sid in ids if sid not in pos]
    if missing:
        raise RuntimeError(f"{len(missing)} rows have no stored embedding (first: {missing[0]})")
    order = np.fromiter((pos[s] for s in ids), dtype=np.int64, count=len(ids))
    flat = pc.list_flatten(table.column("vector")).to_numpy()
    vecs = flat.reshape(table.num_rows, -1)[order]
    stored = table.column("status").to_pylist()
    statuses = [stored[i] for i in order]
    return np.ascontiguousarray(vecs, dtype=np.float32), statuses
