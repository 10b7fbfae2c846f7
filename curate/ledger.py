"""The ledgers: where every input row, and every derived row, ended, and why.

``ledger.parquet`` has one row per input row (``row`` = global input index, in ingest order over all
inputs); ``derived_ledger.parquet`` one row per row a rewrite made (``row`` from ``n_input`` on), with
the same columns plus ``origin`` and ``parents``; ``lineage.parquet`` links each derived row to its
parents with what made it. Columns:

============  ==================================================================================
outcome       ``selected`` | ``not_selected`` | ``filtered`` | ``quarantined``
stage         where it was decided: ``ingest``, ``score:<scorer>``, ``embed``, ``select:<i>:<method>``
reason        short code: ``exact_duplicate``, ``below_min``, ``beyond_budget``, ``invalid_json``, …
detail        a sentence a person can read (threshold and value, blocking row, error message)
rank          order of selection for selected rows (0 = first), null otherwise
============  ==================================================================================

The counts reconcile exactly, for each ledger: ``n = selected + not_selected + filtered + quarantined``.
An input row used by a rewrite whose originals leave the pool ends ``not_selected`` with reason
``rewritten`` (its derived rows carry it on).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

OUTCOMES = ("selected", "not_selected", "filtered", "quarantined")

LEDGER_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("source_index", pa.int64()),
        ("source_line", pa.int64()),
        ("outcome", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("rank", pa.int64()),
    ]
)


DERIVED_LEDGER_SCHEMA = pa.schema([*LEDGER_SCHEMA, pa.field("origin", pa.string()), pa.field("parents", pa.list_(pa.string()))])

LINEAGE_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("sample_id", pa.string()),
        ("origin", pa.string()),
        ("parents", pa.list_(pa.string())),
        ("parent_rows", pa.list_(pa.int64())),
        ("recordset", pa.string()),
        ("generation", pa.string()),
    ]
)


def counts(table: pa.Table) -> dict[str, int]:
    """Rows per outcome (every outcome of :data:`OUTCOMES`, 0 when absent), counted in Arrow."""
    found = {v["values"]: v["counts"] for v in pc.value_counts(table.column("outcome")).to_pylist()}
    return {o: found.get(o, 0) for o in OUTCOMES}


class LedgerMismatch(AssertionError):
    pass


def reconcile(table: pa.Table, n_input: int, first_row: int = 0) -> dict[str, int]:
    """Check that every row ``first_row … first_row + n_input - 1`` appears exactly once; return
    counts per outcome."""
    rows = table.column("row").to_numpy()
    distinct = len(np.unique(rows))
    last = first_row + n_input - 1
    if len(rows) != n_input or distinct != n_input or (len(rows) and (rows.min() != first_row or rows.max() != last)):
        raise LedgerMismatch(f"ledger has {len(rows)} rows ({distinct} distinct) for {n_input} rows ({first_row}…{last})")
    c = counts(table)
    bad = {v for v in pc.unique(table.column("outcome")).to_pylist()} - set(OUTCOMES)
    if bad:
        raise LedgerMismatch(f"unknown outcomes in ledger: {sorted(bad)}")
    assert sum(c.values()) == n_input
    return c
