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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import StepSpec
from curate.io import write_parquet, write_text
from curate.ledger import ledger_table
from curate.ledger import counts as ledger_counts
from curate.manifests import RecordSetRef, SelectionRef
from curate.records import sha256_hex
from curate.recordset import QUARANTINE_STATUSES, load_embeddings, read_records, take_records, wide_scores, write_recordset
from curate.select import Pool, selector_class

META = ["sample_id", "row", "source", "source_index", "source_line", "task"]


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
    pool (a rewrite can reproduce its parent) is ``filtered`` as ``exact_duplicate``."""
    out = Path(out_dir)
    meta = read_records(pool_sets, META)
    if exclude_rows:
        meta = meta.filter(pc.invert(pc.is_in(meta.column("row"), value_set=pa.array(exclude_rows, pa.int64()))))
    ledger: list[dict] = pq.read_table(prior_ledger).to_pylist() if prior_ledger else []
    meta, duplicates = _first_of_each_id(meta)
    for d in duplicates:
        first_row = d.pop("first_row")
        ledger.append({**d, "outcome": "filtered", "stage": name, "reason": "exact_duplicate",
                       "detail": f"same content as row {first_row} (sample_id {d['sample_id'][:12]}…)", "rank": None})
    ids: list[str] = meta.column("sample_id").to_pylist()
    rows = np.asarray(meta.column("row").to_pylist(), dtype=np.int64)
    n = len(ids)
    m = meta.to_pydict()

    scores, statuses, errors, orientation = wide_scores(store_dir, scorers, ids)

    def entry(i: int, outcome: str, stage: str, reason: str | None, detail: str | None, rank=None) -> dict:
        return {"row": int(rows[i]), "sample_id": ids[i], "source": m["source"][i], "source_index": m["source_index"][i],
                "source_line": m["source_line"][i], "outcome": outcome, "stage": stage, "reason": reason, "detail": detail, "rank": rank}

    # rows whose scoring failed (an exception, not a data status) are quarantined
    alive = np.ones(n, dtype=bool)
    for label in scorers:
        for i, (st, err) in enumerate(zip(statuses[label], errors[label])):
            if alive[i] and st in QUARANTINE_STATUSES:
                alive[i] = False
                ledger.append(entry(i, "quarantined", f"score:{label}", err[0] or st, err[1]))
            elif alive[i] and st == "missing":
                raise RuntimeError(f"row {rows[i]} has no stored score for '{label}': the score stage did not finish")

    needs_emb = any(getattr(selector_class(s.method), "needs_embeddings", False) for s in steps)
    embeddings = None
    if needs_emb:
        if embed_key is None:
            raise RuntimeError("a selection step needs embeddings but the flow has no embed stage")
        embeddings, emb_status = load_embeddings(store_dir, embed_key, ids)
        for i, st in enumerate(emb_status):
            if alive[i] and st != "ok":
                alive[i] = False
                ledger.append(entry(i, "quarantined", "embed", st.split(":", 1)[-1], f"embedding failed ({st})"))

    pool_idx = np.flatnonzero(alive)

    def text_loader(positions):
        """(prompt, response) of rows at these positions of the full candidate list (read from the record sets)."""
        from curate.records import prompt_text, response_text

        want = {ids[p]: k for k, p in enumerate(positions)}
        found = take_records(pool_sets, set(want)).select(["sample_id", "messages"]).to_pylist()
        out: list = [None] * len(positions)
        for rec in found:
            out[want[rec["sample_id"]]] = (prompt_text(rec["messages"]), response_text(rec["messages"]))
        return out

    pool = Pool(rows=rows, ids=ids, scores=scores, orientation=orientation, embeddings=embeddings, n_input=n_input, seed=seed,
                sources=m.get("source"), tasks=m.get("task"), text_loader=text_loader).take(alive)
    rank = np.arange(len(pool), dtype=np.int64)
    step_stats = []
    step_columns: dict[str, np.ndarray] = {}
    prefix = "select" if name == "select" else name
    context = {"embed": embed_spec, "embed_key": embed_key, "store_dir": store_dir, "torch_threads": torch_threads}
    for s_i, step in enumerate(steps):
        selector = selector_class(step.method)(step.params, step_index=s_i, base_dir=base_dir, context=context)
        res = selector.select(pool)
        stage = f"{prefix}:{s_i}:{step.label}"
        for j in np.flatnonzero(~res.keep):
            ledger.append(entry(int(pool_idx[j]), res.outcome, stage, res.reason[j], res.detail[j]))
        step_stats.append({"step": s_i, "method": step.method, "name": step.label, "in": len(pool), "kept": int(res.keep.sum()),
                           "outcome_of_dropped": res.outcome, **res.stats})
        for col_name, values in res.columns.items():  # aligned to the step's pool; NaN for rows it never saw
            col = np.full(n, np.nan)
            col[pool_idx] = values
            step_columns[f"{step.label}.{col_name}"] = col
        rank = res.rank[res.keep]
        pool_idx = pool_idx[res.keep]
        pool = pool.take(res.keep)

    order = np.argsort(rank, kind="stable")
    for r, j in enumerate(order):
        ledger.append(entry(int(pool_idx[j]), "selected", prefix, None, None, rank=r))
    final_rank = np.full(n, -1, dtype=np.int64)
    final_rank[pool_idx[order]] = np.arange(len(order))

    ledger.sort(key=lambda r: r["row"])
    ledger_t = ledger_table(ledger)
    ledger_path = write_parquet(out / name / "ledger.parquet", ledger_t)

    cols = {k: m[k] for k in META}
    for score_name, values in scores.items():
        cols[score_name] = values
    for label in scorers:
        cols[f"{label}.status"] = statuses[label]
    cols.update(step_columns)
    cols["selected"] = final_rank >= 0
    cols["rank"] = np.where(final_rank >= 0, final_rank, None)
    table = pa.table({k: (pa.array(list(v), pa.int64()) if k == "rank" else v) for k, v in cols.items()})
    path = write_parquet(out / name / "scores.parquet", table)
    selected_ids = [ids[i] for i in pool_idx[order]]
    write_text(out / name / "selected_ids.txt", "".join(f"{s}\n" for s in selected_ids))
    config = sha256_hex(*(s.model_dump_json() for s in steps), str(seed), str(n_input), *(rs.sha256 for rs in pool_sets))
    kept = write_recordset(take_records(pool_sets, rows=rows[pool_idx].tolist()), out, name, name, config, shard_size)
    return SelectionRef(name=name, path=str(path), ledger_path=str(ledger_path), selected=kept, n_selected=len(selected_ids),
                        counts=ledger_counts(ledger_t), steps=step_stats)


def _first_of_each_id(meta: pa.Table) -> tuple[pa.Table, list[dict]]:
    """The pool without rows whose sample_id appeared earlier in it, and those rows (with ``first_row``)."""
    ids = meta.column("sample_id").to_pylist()
    first: dict[str, int] = {}
    keep, dups = [], []
    rows = meta.column("row").to_pylist()
    for i, sid in enumerate(ids):
        if sid in first:
            dups.append(i)
        else:
            first[sid] = rows[i]
            keep.append(i)
    if not dups:
        return meta, []
    dup_rows = meta.take(pa.array(dups, pa.int64())).select(["row", "sample_id", "source", "source_index", "source_line"]).to_pylist()
    for d in dup_rows:
        d["first_row"] = first[d["sample_id"]]
    return meta.take(pa.array(keep, pa.int64())), dup_rows
