"""Ledger: the final outcome of every input row and every derived row, and the lineage table.

The first selection round's ledger covers every input row (ingest outcomes included). A rewrite
takes the rows it used out of the next round when the originals leave the pool (``pool: derived``):
they end ``not_selected`` with reason ``rewritten``; rows it could not use end ``filtered`` with the
rewriter's reason; derived rows that broke the conversation rules are ``quarantined``. Every later
round decides the rows of its own pool. Writes, under ``<output_dir>``:

- ``ledger.parquet``: one row per input row (reconciled against the input count);
- ``derived_ledger.parquet``: one row per derived row, with ``origin`` and ``parents``;
- ``lineage.parquet``: each derived row with its parents (ids and rows), record set and generation record.

The ledgers are assembled with Polars: each later decision replaces the rows it names (an anti-join
plus a concatenation), derived rows get their provenance by a join on ``row`` and parents their row
numbers by a join on ``sample_id`` — no Python object per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.io import write_parquet
from curate.ledger import DERIVED_LEDGER_SCHEMA, LEDGER_SCHEMA, LINEAGE_SCHEMA, reconcile
from curate.manifests import LedgerRef, RecordSetRef, RewriteRef, SelectionRef
from curate.pipeline.stage import Run, Stage
from curate.recordset import scan_records

IDENTITY = ["sample_id", "source", "source_index", "source_line"]
DECISION = ["outcome", "stage", "reason", "detail", "rank"]


def _rewrite_outcomes(rw: RewriteRef):
    """What became of the input rows a rewrite used (``not_selected``/``rewritten``) or dropped
    (``filtered`` with the rewriter's reason), in the order of its dispositions file."""
    import polars as pl

    d = pl.read_parquet(rw.dispositions_path, columns=["row", "disposition", "reason", "detail", "n_derived"])
    used = pl.col("disposition") == "used"
    return d.filter(pl.col("disposition").is_in(["used", "dropped"])).select(
        "row",
        outcome=pl.when(used).then(pl.lit("not_selected")).otherwise(pl.lit("filtered")),
        stage=pl.lit(f"rewrite:{rw.name}"),
        reason=pl.when(used).then(pl.lit("rewritten"))
        .otherwise(pl.when(pl.col("reason").fill_null("") == "").then(pl.lit("dropped")).otherwise(pl.col("reason"))),
        detail=pl.when(used).then(pl.format("used in {} derived rows of '{}' (see lineage.parquet)",
                                            pl.col("n_derived").cast(pl.String).fill_null("None"), pl.lit(rw.name)))
        .otherwise(pl.col("detail")),
    )


def _replace(book, new):
    """``book`` with the rows ``new`` names replaced by ``new``'s (the last of a row in ``new`` wins)."""
    new = new.unique(subset=["row"], keep="last", maintain_order=True)
    return pl_concat([book.join(new.select("row"), on="row", how="anti"), new.select(book.columns)])


def pl_concat(frames):
    import polars as pl

    return pl.concat(frames, how="vertical_relaxed")


def _arrow(frame, schema: pa.Schema) -> pa.Table:
    """A Polars frame as an Arrow table of exactly ``schema`` (its column order, types, one chunk)."""
    if frame.height == 0:
        return pa.Table.from_pylist([], schema=schema)
    return frame.select(schema.names).to_arrow().cast(schema).combine_chunks()


def ledger_stage(selections: list[SelectionRef], rewrites: list[RewriteRef], n_input: int, input_set: RecordSetRef, pool: str,
                 out_dir: str, keep: dict | None = None, sources: list | None = None) -> LedgerRef:
    """``keep`` (:func:`curate.ingest.columns.keep_plan`, with the run's IngestRefs ``sources``): the
    inputs' own columns to add to ``ledger.parquet`` after its columns (none when None)."""
    import polars as pl

    out = Path(out_dir)
    book = pl.read_parquet(selections[0].ledger_path).select(LEDGER_SCHEMA.names)
    columns = ["row", "sample_id", "source", "source_index", "source_line", "origin", "parents", "generation"]
    # read once: ledger provenance and lineage
    derived_rows = {rw.derived.name: scan_records(rw.derived, columns).collect() for rw in rewrites}
    ident = [f.select(columns[:-1]) for f in derived_rows.values()]  # derived row -> its provenance
    for rw in rewrites:
        if pool == "derived":
            e = _rewrite_outcomes(rw).unique(subset=["row"], keep="last", maintain_order=True)
            merged = e.join(book.select("row", *IDENTITY), on="row", how="inner", maintain_order="left")
            if merged.height != e.height:
                missing = e.join(book.select("row"), on="row", how="anti")["row"][0]
                raise KeyError(f"rewrite '{rw.name}' decided row {missing}, which no earlier ledger holds")
            book = _replace(book, merged.with_columns(rank=pl.lit(None, pl.Int64)))
        q = pl.read_parquet(rw.quarantine_path)
        if q.height:
            ident.append(q.select("row", sample_id=pl.lit(None, pl.String), source=pl.lit(f"rewrite:{rw.name}"), source_index=pl.col("row"),
                                  source_line=pl.lit(None, pl.Int64), origin="origin", parents="parents"))
            book = _replace(book, q.select("row", sample_id=pl.lit(None, pl.String), source=pl.lit(None, pl.String),
                                           source_index=pl.lit(None, pl.Int64), source_line=pl.lit(None, pl.Int64),
                                           outcome=pl.lit("quarantined"), stage=pl.lit(f"rewrite:{rw.name}"), reason="reason",
                                           detail="detail", rank=pl.lit(None, pl.Int64)))
    for sel in selections[1:]:
        book = _replace(book, pl.read_parquet(sel.ledger_path).select(LEDGER_SCHEMA.names))

    book = book.sort("row", maintain_order=True)
    inputs = book.filter(pl.col("row") < n_input)
    derived = book.filter(pl.col("row") >= n_input).select("row", *DECISION)
    if ident:
        who = pl_concat(ident).unique(subset=["row"], keep="last", maintain_order=True)
        derived = derived.join(who.with_columns(_who=pl.lit(True)), on="row", how="left", maintain_order="left")
        if derived["_who"].null_count():
            raise KeyError(f"derived row {derived.filter(pl.col('_who').is_null())['row'][0]} has no provenance")
    elif derived.height:
        raise KeyError(f"derived row {derived['row'][0]} has no provenance")
    n_derived = sum(rw.n_derived for rw in rewrites)
    ledger_t = _arrow(inputs, LEDGER_SCHEMA)
    counts = reconcile(ledger_t, n_input)
    derived_t = _arrow(derived, DERIVED_LEDGER_SCHEMA)
    derived_counts = reconcile(derived_t, n_derived, first_row=n_input)
    if keep is not None:  # reconciled and sorted: position i holds row i
        from curate.ingest.columns import ledger_columns

        for name, array in ledger_columns(keep, sources or [], n_input)[0].items():
            ledger_t = ledger_t.append_column(name, array)
    path = write_parquet(out / "ledger.parquet", ledger_t)
    derived_path = write_parquet(out / "derived_ledger.parquet", derived_t)

    lineage = pl_concat([f.with_columns(recordset=pl.lit(name)) for name, f in derived_rows.items()]) if derived_rows else None
    if lineage is not None and lineage.height:
        # a parent's row: the first row with its content (a rewrite can reproduce its parent)
        known = pl_concat([scan_records(input_set, ["sample_id", "row"]).collect(),
                           *(f.select("sample_id", "row") for f in derived_rows.values())])
        parent_ids = lineage.select(pl.col("parents").explode()).drop_nulls().unique()
        row_of = (known.join(parent_ids, left_on="sample_id", right_on="parents", how="semi")
                  .unique(subset=["sample_id"], keep="first", maintain_order=True).rename({"row": "_parent_row"}))
        lineage = lineage.with_row_index("_k")
        found = (lineage.select("_k", "parents").explode("parents")
                 .join(row_of, left_on="parents", right_on="sample_id", how="left", maintain_order="left")
                 .group_by("_k", maintain_order=True).agg(pl.col("_parent_row")))
        lineage = lineage.join(found, on="_k", how="left", maintain_order="left").with_columns(
            parent_rows=pl.when(pl.col("parents").list.len().fill_null(0) == 0).then(pl.lit([], pl.List(pl.Int64)))
            .otherwise(pl.col("_parent_row")))
    lineage_path = write_parquet(out / "lineage.parquet", _arrow(lineage if lineage is not None else pl.DataFrame(), LINEAGE_SCHEMA))
    return LedgerRef(path=str(path), derived_path=str(derived_path), lineage_path=str(lineage_path), n_input=n_input, n_derived=n_derived,
                     counts=counts, derived_counts=derived_counts)


# -- the stage ---------------------------------------------------------------------------------------


class LedgerStage(Stage):
    """Assemble the final ledgers (input rows, derived rows) and the lineage table; reconcile both.
    Reads ``input`` and every selection round's and rewrite step's output, by name."""

    kind = "ledger"

    def __init__(self, selections: tuple[str, ...], rewrites: tuple[str, ...]):
        super().__init__("ledger", reads=("input", *selections, *rewrites), writes=("ledger", "derived_ledger", "lineage"))
        self.selections = selections
        self.rewrites = rewrites

    def run(self, run: Run) -> dict[str, Any]:
        from curate.ingest.columns import keep_plan

        dataset = run.read(self, "input")
        keep = keep_plan(run.spec.inputs, dataset.sources)
        carried = {} if keep is None else {"keep": keep, "sources": dataset.sources}  # no argument at all when no input keeps a column
        (ref,), secs = run.map(self, ledger_stage, [dict(selections=[run.read(self, name) for name in self.selections],
                                                         rewrites=[run.read(self, name) for name in self.rewrites], n_input=dataset.n_input,
                                                         input_set=run.records(self, "input"),
                                                         pool=run.spec.rewrite.pool if run.spec.rewrite else "derived",
                                                         out_dir=str(run.out), **carried)])
        run.write(self, "ledger", ref)
        return {"stage": "ledger", "tasks": 1, "rows": ref.n_input + ref.n_derived, "seconds": secs}
