"""The ledger: where every input row ended, and why.

One row per input row (``row`` = global input index, in ingest order over all inputs):

============  ==================================================================================
outcome       ``selected`` | ``not_selected`` | ``filtered`` | ``quarantined``
stage         where it was decided: ``ingest``, ``score:<scorer>``, ``embed``, ``select:<i>:<method>``
reason        short code: ``exact_duplicate``, ``below_min``, ``beyond_budget``, ``invalid_json``, …
detail        a sentence a person can read (threshold and value, blocking row, error message)
rank          order of selection for selected rows (0 = first), null otherwise
============  ==================================================================================

The counts reconcile exactly: ``n_input = selected + not_selected + filtered + quarantined``.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

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


def ledger_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)


def counts(table: pa.Table) -> dict[str, int]:
    c = Counter(table.column("outcome").to_pylist())
    return {o: c.get(o, 0) for o in OUTCOMES}


class LedgerMismatch(AssertionError):
    pass


def reconcile(table: pa.Table, n_input: int) -> dict[str, int]:
    """Check that every input row appears exactly once; return counts per outcome."""
    rows = table.column("row").to_pylist()
    if len(rows) != n_input or len(set(rows)) != n_input or (rows and (min(rows) != 0 or max(rows) != n_input - 1)):
        raise LedgerMismatch(f"ledger has {len(rows)} rows ({len(set(rows))} distinct) for {n_input} input rows")
    c = counts(table)
    bad = set(table.column("outcome").to_pylist()) - set(OUTCOMES)
    if bad:
        raise LedgerMismatch(f"unknown outcomes in ledger: {sorted(bad)}")
    assert sum(c.values()) == n_input
    return c
