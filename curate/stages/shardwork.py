"""The resumable per-shard loop shared by model stages (score, embed).

For one shard and one store key: skip the shard if its done-marker exists; otherwise compute only
the rows whose ``sample_id`` is not stored yet, in chunks, write them to the store, then write the
marker. The rows are written as one part when the shard ends — and, when the shard runs longer than
``commit_s`` seconds (``runtime.commit_interval_s``), also at the end of the first chunk after each
``commit_s``, so a run killed inside this function loses at most about ``commit_s`` seconds of work
plus one chunk, never a whole slow shard.

Committing does not change what is computed: the chunks are the same whatever was committed before.
The rows still to do are the shard's rows (each sample_id once, at its first row) minus whole chunks
from the front of the computing order (rows in shard order, or ``order`` over them — a stable sort, so
the rows left keep their relative order), so a resumed shard cuts its remaining rows into exactly the chunks an uninterrupted run would
have cut, and a model sees the same batches (padding included).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from curate.manifests import ShardRef, WorkRef
from curate.progress import logger, stage_progress
from curate.recordset import read_shard
from curate.store import Collection, drop_duplicates, first_occurrence


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
    commit_s: float | None = None,
) -> WorkRef:
    """``compute(records) -> table`` of store rows for those records (one or more rows each).
    With ``compute_table``, the shard's rows are never made into Python dicts: it gets chunks of the
    shard as an Arrow table (``table_columns``) instead, and ``compute``/``order`` are not used.
    ``check(stored rows of the shard) -> warnings`` runs once, when the shard is finished; its
    warnings are kept in the shard's marker, so a cached shard reports them without re-reading.
    ``commit_s``: store the rows computed so far at the end of a chunk once this many seconds have
    passed since the last store (None: only at the end of the shard)."""
    t0 = time.perf_counter()
    if collection.done(shard.sha256):
        marker = collection.marker(shard.sha256)
        logger.info("%s %s shard %d: %d rows already in the store", stage, name, shard.shard_id, shard.n_rows)
        return WorkRef(stage=stage, name=name, key=collection.key, shard_id=shard.shard_id, shard_sha256=shard.sha256,
                       n_rows=shard.n_rows, computed_rows=0, statuses=marker.get("statuses", {}), warnings=marker.get("warnings", []))
    ids = read_shard(shard, ["sample_id"]).column(0)
    # a repeated sample_id (possible in a derived set) is computed once, at its first row: so the rows still to do
    # after a kill are always the first run's rows minus whole committed chunks, and the chunks come out the same
    todo_mask = ~collection.stored(ids) & first_occurrence(ids)
    computed = int(todo_mask.sum())
    new = None
    if computed:
        tables: list[pa.Table] = []
        committed = 0  # tables[:committed] are in the store already
        last_commit = time.monotonic()

        def done_chunk(table: pa.Table, n: int, last: bool) -> None:
            nonlocal committed, last_commit
            tables.append(table)
            bar.advance(n)
            if commit_s is not None and not last and time.monotonic() - last_commit >= commit_s:
                collection.write(pa.concat_tables(tables[committed:]))  # a killed run keeps these rows
                committed = len(tables)
                last_commit = time.monotonic()

        with stage_progress(f"{stage} {name} shard {shard.shard_id}", computed) as bar:
            if compute_table is not None:
                rows = read_shard(shard, list(table_columns))
                if computed < len(todo_mask):
                    rows = rows.filter(pa.array(todo_mask))
                for start in range(0, rows.num_rows, chunk_rows):
                    chunk = rows.slice(start, chunk_rows)
                    done_chunk(compute_table(chunk), chunk.num_rows, start + chunk_rows >= rows.num_rows)
            else:
                records = [r for r, todo in zip(read_shard(shard).to_pylist(), todo_mask) if todo]
                idx = order(records) if order else list(range(len(records)))
                for start in range(0, len(idx), chunk_rows):
                    chunk = [records[i] for i in idx[start : start + chunk_rows]]
                    done_chunk(compute(chunk), len(chunk), start + chunk_rows >= len(idx))
        new = pa.concat_tables(tables)
        if committed < len(tables):  # uncommitted: the whole shard in one part (as when nothing was committed)
            collection.write(pa.concat_tables(tables[committed:]))
    else:
        logger.info("%s %s shard %d: %d rows already in the store", stage, name, shard.shard_id, shard.n_rows)
    columns = sorted({"sample_id", "status", *check_columns})
    if new is not None and computed == len(todo_mask):  # every row was computed now: no need to read it back
        stored = drop_duplicates(new.select(columns), ["sample_id"] + (["variant"] if "variant" in new.column_names else []))
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
    first = drop_duplicates(table.select(["sample_id", "status"]), ["sample_id"])
    counts = pc.value_counts(first.column("status").combine_chunks())
    return dict(sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
