"""Select: one global task per selection round. Builds the candidate pool from record sets, the
score store and the embedding store, applies the round's selection steps in order, writes the ledger
rows of every pool row and the kept rows as a record set.

Outputs under ``<output_dir>/<name>/`` (``select`` for the first round, ``select-2`` …):

- ``scores.parquet``: one row per pool row: ``row``, ``sample_id``, provenance, a column per score
  (``<scorer>.<output>``) and per scorer status, ``selected``, ``rank``.
- ``selected_ids.txt``: selected sample_ids in rank order, one per line.
- ``ledger.parquet``: the outcome of every pool row (the first round also carries the ingest
  outcomes, so that file alone covers every input row; see :mod:`curate.ledger`).
- the kept rows as the record set ``<name>`` (``<output_dir>/recordsets/<name>/``).

The pool is held as columns, never as one Python object per row: the provenance columns come from a
lazy Polars scan of the shards, sample_ids are a fixed-width numpy array, sources and tasks numpy
object arrays that share one string object per distinct value, and the ledger is assembled from
Arrow columns (each step's rows taken from its :class:`~curate.select.base.StepResult` at once).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import StepSpec
from curate.io import write_parquet, write_text
from curate.ledger import LEDGER_SCHEMA
from curate.ledger import counts as ledger_counts
from curate.manifests import RecordSetRef, RewriteRef, SelectionRef
from curate.pipeline.context import torch_threads
from curate.pipeline.stage import Run, Stage
from curate.records import RECORD_SCHEMA, sha256_hex
from curate.recordset import QUARANTINE_STATUSES, load_embeddings, scan_records, take_records, wide_scores, write_recordset
from curate.select import Pool, SelectContext, selector_class

META = ["sample_id", "row", "source", "source_index", "source_line", "task"]
IDENTITY = ["row", "sample_id", "source", "source_index", "source_line"]  # the pool columns a ledger row carries


def select_stage(
    pool_sets: list[RecordSetRef],
    steps: list[StepSpec],
    scorers: dict[str, tuple[StepSpec, str]],
    embed_key: str | None,
    store_dir: str,
    out_dir: str,
    n_input: int,
    seed: int = 0,
    base_dir: str | None = None,
    name: str = "select",
    prior_ledger: str | None = None,
    shard_size: int = 10_000,
    exclude_rows: list[int] | None = None,
    embed_spec=None,
    torch_threads: int | None = None,
) -> SelectionRef:
    """Select from the rows of ``pool_sets`` (less ``exclude_rows``, decided earlier). ``n_input``:
    the base of a fractional budget with ``rate_base: input`` (methods.md B0: every input row of the
    round, quarantined included). ``embed_spec``/``torch_threads``: the flow's embedder, handed to
    the steps (decontaminate embeds its eval set with it). ``prior_ledger``: ledger rows decided
    before this round (the ingest outcomes), copied into this round's ledger file. A row whose content repeats an earlier row of the
    pool (a rewrite can reproduce its parent) is ``filtered`` as ``exact_duplicate``. A step whose pool is
    empty is not run: it keeps nothing and its stats say ``skipped: empty pool``."""
    out = Path(out_dir)
    meta = pool_meta(pool_sets, exclude_rows)
    book = _Ledger(meta)
    if prior_ledger:
        book.add_table(pq.read_table(prior_ledger))
    first, first_row = _first_of_each_id(meta)
    if not first.all():
        dup = np.flatnonzero(~first)
        head = pc.utf8_slice_codeunits(meta.column("sample_id").take(pa.array(dup, pa.int64())), 0, 12).combine_chunks()
        detail = pc.binary_join_element_wise("same content as row ", pa.array(first_row).cast(pa.string()), " (sample_id ", head, "…)", "")
        book.add(dup, "filtered", name, "exact_duplicate", detail)
        meta = meta.filter(pa.array(first))
        book.meta = meta
    rows = meta.column("row").to_numpy()
    n = meta.num_rows
    ids = fixed_width_strings(meta.column("sample_id"))

    scores, statuses, errors, orientation = wide_scores(store_dir, scorers, meta.column("sample_id"))

    # rows whose scoring failed (an exception, not a data status) are quarantined
    alive = np.ones(n, dtype=bool)
    for label in scorers:
        st = statuses[label]
        missing = np.flatnonzero(alive & (st == "missing"))
        bad = np.flatnonzero(alive & np.isin(st, QUARANTINE_STATUSES))
        if len(missing):
            raise RuntimeError(f"row {rows[missing[0]]} has no stored score for '{label}': the score stage did not finish")
        err = [errors[label].get(int(i), (None, None)) for i in bad]
        book.add(bad, "quarantined", f"score:{label}", [e[0] or s for e, s in zip(err, st[bad])], [e[1] for e in err])
        alive[bad] = False

    needs_emb = any(getattr(selector_class(s.method), "needs_embeddings", False) for s in steps)
    embeddings = None
    if needs_emb:
        if embed_key is None:
            raise RuntimeError("a selection step needs embeddings but the flow has no embed stage")
        if alive.any():
            embeddings, emb_status = load_embeddings(store_dir, embed_key, meta.column("sample_id"))
            emb_status = np.asarray(emb_status, dtype=object)
            bad = np.flatnonzero(alive & (emb_status != "ok"))
            book.add(bad, "quarantined", "embed", [st.split(":", 1)[-1] for st in emb_status[bad]],
                     [f"embedding failed ({st})" for st in emb_status[bad]])
            alive[bad] = False
        else:  # no row reaches the steps: no vector is read (an empty pool may have none in the store)
            embeddings = np.zeros((n, 0), dtype=np.float32)

    pool_idx = np.flatnonzero(alive)

    def text_loader(positions):
        """(prompt, response) of rows at these positions of the full candidate list (read from the record sets)."""
        from curate.records import prompt_text, response_text

        positions = np.asarray(positions, dtype=np.int64)
        found = take_records(pool_sets, rows=rows[positions]).select(["row", "messages"])
        at = {r: k for k, r in enumerate(rows[positions].tolist())}
        out: list = [None] * len(positions)
        for r, msgs in zip(found.column("row").to_pylist(), found.column("messages").to_pylist()):
            out[at[r]] = (prompt_text(msgs), response_text(msgs))
        return out

    pool = Pool(rows=rows, ids=ids, scores=scores, orientation=orientation, embeddings=embeddings, n_input=n_input, seed=seed,
                sources=shared_strings(meta.column("source")), tasks=shared_strings(meta.column("task")),
                text_loader=text_loader).take(alive)
    rank = np.arange(len(pool), dtype=np.int64)
    pool.rank = rank  # the first step sees input order; each later one the rank order of the step before it
    step_stats = []
    step_columns: dict[str, np.ndarray] = {}
    for s_i, step in enumerate(steps):
        context = SelectContext(step_index=s_i, base_dir=base_dir, embed=embed_spec, embed_key=embed_key, store_dir=store_dir,
                                torch_threads=torch_threads)
        selector = selector_class(step.method)(step.label, step.params, context)
        stage = f"{name}:{s_i}:{step.label}"
        if not len(pool):  # an empty pool (everything dropped before, or nothing to select from): the step is not run
            step_stats.append({"step": s_i, "method": step.method, "name": step.label, "in": 0, "kept": 0, "outcome_of_dropped": "–",
                               "skipped": "empty pool"})
            continue
        res = selector.select(pool)
        dropped = np.flatnonzero(~res.keep)
        book.add(pool_idx[dropped], res.outcome, stage, _take(res.reason, dropped), _take(res.detail, dropped))
        step_stats.append({"step": s_i, "method": step.method, "name": step.label, "in": len(pool), "kept": int(res.keep.sum()),
                           "outcome_of_dropped": res.outcome, **budget_record(selector.params, len(pool), pool.n_input, res.stats,
                                                                               f"step {s_i} ({step.label})", int(res.keep.sum())),
                           **res.stats})
        if "warning" in step_stats[-1]:
            from curate.progress import logger

            logger.warning("%s: %s", name, step_stats[-1]["warning"])
        for col_name, values in res.columns.items():  # aligned to the step's pool; NaN for rows it never saw
            col = np.full(n, np.nan)
            col[pool_idx] = values
            step_columns[f"{step.label}.{col_name}"] = col
        rank = res.rank[res.keep]
        pool_idx = pool_idx[res.keep]
        pool = pool.take(res.keep)
        pool.rank = rank

    order = np.argsort(rank, kind="stable")
    chosen = pool_idx[order]
    book.add(chosen, "selected", name, None, None, rank=np.arange(len(order), dtype=np.int64))
    final_rank = np.full(n, -1, dtype=np.int64)
    final_rank[chosen] = np.arange(len(order))

    ledger_t = book.table()
    ledger_path = write_parquet(out / name / "ledger.parquet", ledger_t)

    cols: dict[str, pa.Array] = {k: _inferred(meta.column(k)) for k in META}
    for score_name, values in scores.items():
        cols[score_name] = pa.array(values)
    for label in scorers:
        cols[f"{label}.status"] = pa.array(statuses[label], pa.string() if n else pa.null())
    for col_name, values in step_columns.items():
        cols[col_name] = pa.array(values)
    cols["selected"] = pa.array(final_rank >= 0)
    cols["rank"] = pa.array(final_rank, pa.int64(), mask=final_rank < 0)
    path = write_parquet(out / name / "scores.parquet", pa.table(cols))
    chosen_ids = meta.column("sample_id").take(pa.array(chosen, pa.int64()))
    write_text(out / name / "selected_ids.txt", _lines(chosen_ids))
    config = sha256_hex(*(s.model_dump_json() for s in steps), str(seed), str(n_input), *(rs.sha256 for rs in pool_sets))
    kept = write_recordset(take_records(pool_sets, rows=rows[pool_idx]), out, name, name, config, shard_size)
    return SelectionRef(name=name, path=str(path), ledger_path=str(ledger_path), selected=kept, n_selected=len(chosen),
                        counts=ledger_counts(ledger_t), steps=step_stats)


def budget_record(params, n_pool: int, n_input: int, stats: dict, where: str, kept: int | None = None) -> dict:
    """The budget a step was asked for and the one it applied (``budget_asked``, ``budget_applied``; a
    fraction of ``input`` or ``pool`` also gives the rows it came to, ``budget_rows``), and a ``warning``
    when the budget is larger than the rows the step could keep: the rows that reach it (a budget of 5000
    on 894 rows applies 894), or fewer — ``kept``, the rows it kept, when that is less (a ``top_k`` keeps
    only rows with a score). A fraction of ``valid`` rows is resolved by the step on its scored rows: the
    rows it kept are then the budget applied. A token budget (``tokens``) is larger than its pool when
    every row fits with tokens to spare."""
    from curate.select.base import BudgetParams

    if isinstance(params, BudgetParams):
        asked = params.budget
        if isinstance(asked, float) and params.rate_base == "valid":
            return {"budget_asked": asked, **({"budget_applied": kept} if kept is not None else {})}
        if isinstance(asked, float):
            base = {"input": n_input, "pool": n_pool}[params.rate_base]
            rows = int(math.floor(asked * base))
            what = f"{asked} of {params.rate_base} ({base} rows) = {rows} rows"
        else:
            rows, what = int(asked), f"{asked} rows"
    elif isinstance(getattr(params, "budget", None), int) and not isinstance(params.budget, bool):
        asked = rows = params.budget
        what = f"{asked} rows"
    elif isinstance(getattr(params, "tokens", None), int) and "tokens_kept" in stats:
        asked, kept = params.tokens, stats["tokens_kept"]
        every = stats.get("rows_kept") == n_pool
        rec = {"budget_asked": f"{asked} tokens", "budget_applied": f"{kept if every else asked} tokens"}
        if every and n_pool and kept < asked:
            rec["warning"] = (f"{where}: the budget of {asked} tokens is larger than the {kept} tokens of the {n_pool} rows that "
                              f"reach it: every row is kept ({kept} tokens applied)")
        return rec
    else:
        return {}
    applied = min(rows, n_pool)
    if kept is not None and kept < applied:
        applied = kept
    rec = {"budget_asked": asked, **({"budget_rows": rows} if rows != asked else {}), "budget_applied": applied}
    if rows > n_pool:
        rec["warning"] = (f"{where}: the budget of {what} is larger than the {n_pool} rows that reach it: "
                          f"every row is kept ({applied} applied)")
    elif rows > applied:
        rec["warning"] = (f"{where}: the budget of {what} is larger than the {applied} rows the step kept of the "
                          f"{n_pool} that reach it (e.g. a top_k keeps only rows with a score): {applied} applied")
    return rec


def pool_meta(pool_sets: list[RecordSetRef], exclude_rows=None) -> pa.Table:
    """The ``META`` columns of every row of ``pool_sets`` (in set and shard order) less ``exclude_rows``:
    one lazy Polars scan over the shard files, the exclusion pushed into it."""
    import polars as pl

    schema = pa.schema([RECORD_SCHEMA.field(c) for c in META])
    lf = scan_records(pool_sets, META)
    if exclude_rows is not None and len(exclude_rows):
        lf = lf.filter(~pl.col("row").is_in(pl.Series(np.asarray(exclude_rows, dtype=np.int64)).implode()))
    return lf.collect().to_arrow().cast(schema).combine_chunks()


def _first_of_each_id(meta: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(whether each row is the first of its sample_id in the pool, the row number of that first row
    for each row that is not)."""
    import polars as pl

    ids = pl.from_arrow(meta.column("sample_id"))
    first = ids.is_first_distinct().to_numpy()
    if first.all():
        return first, np.zeros(0, dtype=np.int64)
    frame = pl.DataFrame({"sample_id": ids, "row": pl.from_arrow(meta.column("row"))})
    earlier = frame.filter(pl.Series(first)).rename({"row": "first_row"})
    later = frame.filter(pl.Series(~first)).join(earlier, on="sample_id", how="left", maintain_order="left")
    return first, later["first_row"].to_numpy()


class _Ledger:
    """The round's ledger rows, gathered as Arrow tables (one per decision: a step's dropped rows,
    the quarantined rows of a scorer …) and ordered by row when written."""

    def __init__(self, meta: pa.Table):
        self.meta = meta  # the pool: positions given to ``add`` index its rows
        self.parts: list[pa.Table] = []

    def add_table(self, table: pa.Table) -> None:
        self.parts.append(table.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA))

    def add(self, positions: np.ndarray, outcome: str, stage: str, reason, detail, rank: np.ndarray | None = None) -> None:
        """Rows at ``positions`` of the pool; ``reason``/``detail``: one value for all, or one per row (None: null)."""
        k = len(positions)
        if not k:
            return
        idx = pa.array(positions, pa.int64())
        cols = {c: self.meta.column(c).take(idx) for c in IDENTITY}
        cols.update(outcome=pa.repeat(pa.scalar(outcome, pa.string()), k), stage=pa.repeat(pa.scalar(stage, pa.string()), k),
                    reason=_per_row(reason, k), detail=_per_row(detail, k),
                    rank=pa.nulls(k, pa.int64()) if rank is None else pa.array(rank, pa.int64()))
        self.add_table(pa.table(cols))

    def table(self) -> pa.Table:
        """Every row once, ordered by row (a stable sort: rows keep the order they were decided in)."""
        if not self.parts:
            return LEDGER_SCHEMA.empty_table()
        t = pa.concat_tables(self.parts)
        return t.take(pc.sort_indices(t, [("row", "ascending")])).combine_chunks()


def _per_row(values, k: int) -> pa.Array:
    if values is None:
        return pa.nulls(k, pa.string())
    if isinstance(values, str):
        return pa.repeat(pa.scalar(values, pa.string()), k)
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks().cast(pa.string())
    return pa.array(values, pa.string()) if not isinstance(values, pa.Array) else values.cast(pa.string())


def _take(values, idx: np.ndarray) -> pa.Array:
    """Entries ``idx`` of a per-row list (a StepResult's reasons or details) as an Arrow string array."""
    if not len(idx):
        return pa.nulls(0, pa.string())
    arr = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
    return pa.array(arr[idx], pa.string())


def _inferred(col: pa.ChunkedArray) -> pa.Array:
    """A provenance column as the score table stores it: its own type, or Arrow's null type when it
    has rows and every one is None (the type a column of only None infers to). An empty pool keeps
    the column's own type, so later stages can match its (zero) ids against typed columns."""
    return pa.nulls(len(col)) if len(col) and col.null_count == len(col) else col.combine_chunks()


def fixed_width_strings(col) -> np.ndarray:
    """A string column as a numpy unicode array (``<U{width}``): converted from the Arrow buffers,
    without a Python object per row, when every value is ASCII of one length (sample_ids are
    64 hex digits); otherwise through Python strings."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    arr = arr.cast(pa.string())
    n = len(arr)
    if n and not arr.null_count and pc.all(pc.string_is_ascii(arr)).as_py():
        mm = pc.min_max(pc.utf8_length(arr))
        width = mm["min"].as_py()
        if width and width == mm["max"].as_py():
            offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + n + 1]
            data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
            return data.view(f"S{width}").astype(f"U{width}")
    return np.array(arr.to_pylist(), dtype=str) if n else np.array([], dtype="<U1")


def shared_strings(col) -> np.ndarray:
    """A low-cardinality string column (source, task) as a numpy object array in which every row
    points to one Python string per distinct value (None where null)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    enc = pc.dictionary_encode(arr)
    values = np.empty(len(enc.dictionary) + 1, dtype=object)
    values[:-1] = enc.dictionary.to_pylist()
    return values[pc.fill_null(enc.indices, len(enc.dictionary)).to_numpy(zero_copy_only=False).astype(np.int64)]


def _lines(ids: pa.Array) -> str:
    """``ids`` as text, one per line (each followed by a newline), joined in Arrow."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if not len(ids):
        return ""
    lines = pc.binary_join_element_wise(ids.cast(pa.string()), "", "\n")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset: lines.offset + len(lines) + 1]
    return lines.buffers()[2].to_pybytes()[offsets[0]: offsets[-1]].decode("utf-8")


# -- the stage ---------------------------------------------------------------------------------------


class SelectStage(Stage):
    """One selection round over one or more record sets (one global task); writes the kept rows.

    The first round reads ``input`` (its record set, row count and ingest ledger); a later round reads
    its pool's sets, and a rewrite's dispositions for the rows that leave the pool (``pool: derived``)."""

    kind = "select"
    counts_order = 2  # after the stages that make and score rows, as the counts table lists them

    def __init__(self, name: str, pool: tuple[str, ...], steps: list[StepSpec], first: bool):
        super().__init__(name, reads=pool, writes=(name,), task_name=name)
        self.steps = steps
        self.first = first

    def run(self, run: Run) -> dict[str, Any]:
        spec = run.spec
        pool_sets, exclude, n_input, prior_ledger = self.pool(run)
        (selection,), secs = run.map(self, select_stage, [dict(
            pool_sets=pool_sets, steps=self.steps, scorers=run.scorers, embed_key=run.embed_key, store_dir=run.store_dir,
            out_dir=str(run.out), n_input=n_input, seed=spec.seed, base_dir=str(spec.base), name=self.name, exclude_rows=exclude,
            prior_ledger=prior_ledger, shard_size=spec.ingest.shard_size,
            embed_spec=spec.embed, torch_threads=torch_threads(spec))])
        run.write(self, self.name, selection, records=selection.selected)
        return {"stage": self.name, "tasks": 1, "rows": selection.n_selected, "seconds": secs,
                "warnings": [s["warning"] for s in selection.steps if s.get("warning")]}

    def pool(self, run: Run) -> tuple[list, list[int], int, str | None]:
        """(record sets, rows decided earlier and left out, the base of a fractional budget, the ledger
        file of the rows decided before this round: ingest's, for the first)."""
        if self.first:
            dataset = run.read(self, "input")
            return [run.records(self, "input")], [], dataset.n_input, dataset.ledger_path
        from curate.recordset import rows_leaving_pool

        sets = [run.records(self, name) for name in self.reads]
        rewrites = [ref for name in self.reads if isinstance(ref := run.read(self, name), RewriteRef)]
        exclude = rows_leaving_pool(rewrites) if run.spec.rewrite.pool == "derived" else []
        n = sum(s.n_rows for s in sets) - len(exclude)
        return sets, exclude, n, None

    def estimate(self, plan) -> dict[str, Any]:
        import json

        what = "; ".join(f"{s.method} {json.dumps(s.params, sort_keys=True)}" for s in self.steps)
        return {**self.describe(), "what": what or "keep all"}

    def counts(self, row: dict[str, Any], run: Run) -> list[dict[str, Any]]:
        selection = run.outputs[self.name]
        return [{"stage": f"{selection.name}:{s['step']}:{s['name']}", "in": s["in"], "out": s["kept"],
                 "note": f"dropped rows are {s['outcome_of_dropped']}"} for s in selection.steps]
