"""Ledger: the final outcome of every input row and every derived row, and the lineage table.

The first selection round's ledger covers every input row (ingest outcomes included). A rewrite
takes the rows it used out of the next round when the originals leave the pool (``pool: derived``):
they end ``not_selected`` with reason ``rewritten``; rows it could not use end ``filtered`` with the
rewriter's reason; derived rows that broke the conversation rules are ``quarantined``. Every later
round decides the rows of its own pool. Writes, under ``<output_dir>``:

- ``ledger.parquet``: one row per input row (reconciled against the input count);
- ``derived_ledger.parquet``: one row per derived row, with ``origin`` and ``parents``;
- ``lineage.parquet``: each derived row with its parents (ids and rows), record set and generation record.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from curate.io import write_parquet
from curate.ledger import DERIVED_LEDGER_SCHEMA, LINEAGE_SCHEMA, ledger_table, reconcile
from curate.manifests import LedgerRef, RecordSetRef, RewriteRef, SelectionRef
from curate.recordset import read_records


def rows_leaving_pool(rewrites: list[RewriteRef]) -> list[int]:
    """Input rows a rewrite used or dropped: with ``pool: derived`` they leave the next round."""
    rows: set[int] = set()
    for rw in rewrites:
        t = pq.read_table(rw.dispositions_path, columns=["row", "disposition"]).to_pydict()
        rows.update(r for r, d in zip(t["row"], t["disposition"]) if d in ("used", "dropped"))
    return sorted(rows)


def _rewrite_outcomes(rw: RewriteRef) -> list[dict]:
    t = pq.read_table(rw.dispositions_path).to_pylist()
    out = []
    for d in t:
        if d["disposition"] == "used":
            out.append((d["row"], "not_selected", "rewritten", f"used in {d['n_derived']} derived rows of '{rw.name}' (see lineage.parquet)"))
        elif d["disposition"] == "dropped":
            out.append((d["row"], "filtered", d["reason"] or "dropped", d["detail"]))
    return [{"row": r, "outcome": o, "stage": f"rewrite:{rw.name}", "reason": reason, "detail": detail} for r, o, reason, detail in out]


def ledger_stage(selections: list[SelectionRef], rewrites: list[RewriteRef], n_input: int, input_set: RecordSetRef, pool: str,
                 out_dir: str) -> LedgerRef:
    out = Path(out_dir)
    book: dict[int, dict] = {r["row"]: r for r in pq.read_table(selections[0].ledger_path).to_pylist()}
    derived_sets = [rw.derived for rw in rewrites]
    derived_rows = {rs.name: read_records(rs, ["row", "sample_id", "source", "source_index", "source_line", "origin", "parents", "generation"])
                    .to_pylist() for rs in derived_sets}  # read once: ledger provenance and lineage
    ident: dict[int, dict] = {r["row"]: r for rows in derived_rows.values() for r in rows}  # derived row -> its provenance
    for rw in rewrites:
        if pool == "derived":
            for e in _rewrite_outcomes(rw):
                book[e["row"]] = {**book[e["row"]], **e, "rank": None}
        for q in pq.read_table(rw.quarantine_path).to_pylist():
            ident[q["row"]] = {"row": q["row"], "sample_id": None, "source": f"rewrite:{rw.name}", "source_index": q["row"],
                               "source_line": None, "origin": q["origin"], "parents": q["parents"]}
            book[q["row"]] = {"row": q["row"], "outcome": "quarantined", "stage": f"rewrite:{rw.name}", "reason": q["reason"],
                              "detail": q["detail"], "rank": None}
    for sel in selections[1:]:
        for r in pq.read_table(sel.ledger_path).to_pylist():
            book[r["row"]] = r

    inputs = [book[r] for r in sorted(book) if r < n_input]
    derived = []
    for r in sorted(row for row in book if row >= n_input):
        e, who = book[r], ident[r]
        derived.append({**e, "sample_id": who["sample_id"], "source": who["source"], "source_index": who["source_index"],
                        "source_line": who["source_line"], "origin": who["origin"], "parents": who["parents"]})
    n_derived = sum(rw.n_derived for rw in rewrites)
    ledger_t = ledger_table(inputs)
    counts = reconcile(ledger_t, n_input)
    derived_t = ledger_table(derived, DERIVED_LEDGER_SCHEMA)
    derived_counts = reconcile(derived_t, n_derived, first_row=n_input)
    path = write_parquet(out / "ledger.parquet", ledger_t)
    derived_path = write_parquet(out / "derived_ledger.parquet", derived_t)

    row_of: dict[str, int] = {}  # a parent's row: the first row with its content (a rewrite can reproduce its parent)
    inputs_ids = read_records(input_set, ["sample_id", "row"]).to_pydict()
    for sid, row in zip(inputs_ids["sample_id"], inputs_ids["row"]):
        row_of.setdefault(sid, row)
    for rows in derived_rows.values():
        for r in rows:
            row_of.setdefault(r["sample_id"], r["row"])
    lineage = [{**r, "parent_rows": [row_of.get(p) for p in r["parents"] or []], "recordset": name}
               for name, rows in derived_rows.items() for r in rows]
    lineage_path = write_parquet(out / "lineage.parquet", ledger_table(lineage, LINEAGE_SCHEMA))
    return LedgerRef(path=str(path), derived_path=str(derived_path), lineage_path=str(lineage_path), n_input=n_input, n_derived=n_derived,
                     counts=counts, derived_counts=derived_counts)
