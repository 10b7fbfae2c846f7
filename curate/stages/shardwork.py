"""The resumable per-shard loop shared by model stages (score, embed).

For one shard and one store key: skip the shard if its done-marker exists; otherwise compute only
the rows whose ``sample_id`` is not stored yet, in chunks, write them as one part, then write the
marker. A run killed inside this function loses at most this shard's work.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from curate.manifests import ShardRef, WorkRef
from curate.progress import logger, stage_progress
from curate.recordset import read_shard
from curate.store import Collection, _drop_duplicates


def run_shard(
    stage: str,
    name: str,
    collection: Collection,
    shard: ShardRef,
    compute: Callable[[list[dict]], pa.Table],
    chunk_rows: int,
    order: Callable[[list[dict]], list[int]] | None = None,
    check: Callable[[pa.Table], list[str]] | None = None,
    check_columns: tuple[str, ...] = (),
    compute_table: Callable[[pa.Table], pa.Table] | None = None,
    table_columns: tuple[str, ...] = ("sample_id", "messages"),
) -> WorkRef:
    """``compute(records) -> table`` of store rows for those records (one or more rows each).
    With ``compute_table``, the shard's rows are never made into Python dicts: it gets chunks of the
    shard as an Arrow table (``table_columns``) instead, and ``compute``/``order`` are not used.
    ``check(stored rows of the shard) -> warnings`` runs once, when the shard is finished; its
    warnings are kept in the shard's marker, so a cached shard reports them without re-reading."""
    t0 = time.perf_counter()
    if collection.done(shard.sha256):
        marker = collection.marker(shard.sha256)
        logger.info("%s %s shard %d: %d rows already in the store", stage, name, shard.shard_id, shard.n_rows)
        return WorkRef(stage=stage, name=name, key=collection.key, shard_id=shard.shard_id, shard_sha256=shard.sha256,
                       n_rows=shard.n_rows, computed_rows=0, statuses=marker.get("statuses", {}), warnings=marker.get("warnings", []))
    ids = read_shard(shard, ["sample_id"]).column(0)
    todo_mask = ~collection.stored(ids)
    computed = int(todo_mask.sum())
    new = None
    if computed:
        tables = []
        with stage_progress(f"{stage} {name} shard {shard.shard_id}", computed) as bar:
            if compute_table is not None:
                rows = read_shard(shard, list(table_columns))
                if computed < len(todo_mask):
                    rows = rows.filter(pa.array(todo_mask))
                for start in range(0, rows.num_rows, chunk_rows):
                    chunk = rows.slice(start, chunk_rows)
                    tables.append(compute_table(chunk))
                    bar.advance(chunk.num_rows)
            else:
                records = [r for r, todo in zip(read_shard(shard).to_pylist(), todo_mask) if todo]
                idx = order(records) if order else list(range(len(records)))
                for start in range(0, len(idx), chunk_rows):
                    chunk = [records[i] for i in idx[start : start + chunk_rows]]
                    tables.append(compute(chunk))
                    bar.advance(len(chunk))
        new = pa.concat_tables(tables)
        collection.write(new)
    else:
        logger.info("%s %s shard %d: %d rows already in the store", stage, name, shard.shard_id, shard.n_rows)
    columns = sorted({"sample_id", "status", *check_columns})
    if new is not None and computed == len(todo_mask):  # every row was computed now: no need to read it back
        stored = _drop_duplicates(new.select(columns), ["sample_id"] + (["variant"] if "variant" in new.column_names else []))
    else:
        stored = collection.read(ids, columns=columns)
    statuses = _statuses(stored)
    warnings = check(stored) if check is not None and stored is not None else []
    collection.mark_done(shard.sha256, {"shard_id": shard.shard_id, "n_rows": shard.n_rows, "statuses": statuses, "warnings": warnings})
    return WorkRef(stage=stage, name=name, key=collection.key, shard_id=shard.shard_id, shard_sha256=shard.sha256, n_rows=shard.n_rows,
                   computed_rows=computed, statuses=statuses, seconds=round(time.perf_counter() - t0, 3), warnings=warnings)


def _statuses(table: pa.Table | None) -> dict[str, int]:
    if table is None or table.num_rows == 0:
        return {}
    # one status per sample (scores may hold several variants with the same status): each sample's first row
    first = _drop_duplicates(table.select(["sample_id", "status"]), ["sample_id"])
    counts = pc.value_counts(first.column("status").combine_chunks())
    return dict(sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
