"""Select: one global task. Builds the candidate pool from the shards, the score store and the
embedding store, applies the flow's selection steps in order, and writes the ledger.

Outputs under ``<output_dir>/select/``:

- ``scores.parquet``: one row per valid (non-duplicate) row: ``row``, ``sample_id``, provenance, a
  column per score (``<scorer>.<output>``) and per scorer status, ``selected``, ``rank``.
- ``selected_ids.txt``: selected sample_ids in rank order, one per line.
- ``ledger.parquet`` (in ``<output_dir>``): every input row's outcome (see :mod:`curate.ledger`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import StepSpec
from curate.io import write_parquet, write_text
from curate.ledger import ledger_table, reconcile
from curate.manifests import DatasetRef, SelectionRef
from curate.scorers import scorer_class
from curate.select import Pool, selector_class
from curate.stages.embed import load_embeddings
from curate.stages.ingest import read_shard
from curate.store import Store

META = ["sample_id", "row", "source", "source_index", "source_line", "task"]
#: score statuses that take a row out of selection: a failed call, or a judge answer with no rating
QUARANTINE_STATUSES = ("error", "parse_failed")


def wide_scores(store_dir: str, scorers: dict[str, tuple[StepSpec, str]], ids: list[str]):
    """Scores aligned with ``ids``: ``scores`` (name -> float64 array), ``statuses`` (scorer -> list),
    ``errors`` (scorer -> list of (error_class, message) or None), ``orientation`` (name -> str).

    Rows never scored get NaN and status ``missing``.
    """
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


def select_stage(
    dataset: DatasetRef,
    steps: list[StepSpec],
    scorers: dict[str, tuple[StepSpec, str]],
    embed_key: str | None,
    store_dir: str,
    out_dir: str,
    seed: int = 0,
    base_dir: str | None = None,
) -> SelectionRef:
    out = Path(out_dir)
    meta = pa.concat_tables([read_shard(s, META) for s in dataset.shards]) if dataset.shards else None
    ids: list[str] = [] if meta is None else meta.column("sample_id").to_pylist()
    rows = np.asarray([] if meta is None else meta.column("row").to_pylist(), dtype=np.int64)
    n = len(ids)
    m = {} if meta is None else meta.to_pydict()

    scores, statuses, errors, orientation = wide_scores(store_dir, scorers, ids)
    ledger: list[dict] = pq.read_table(dataset.ledger_path).to_pylist()

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
        """(prompt, response) of rows at these positions of the full candidate list (read from the shards)."""
        from curate.records import prompt_text, response_text

        want = {int(rows[p]): k for k, p in enumerate(positions)}
        out: list = [None] * len(positions)
        for shard in dataset.shards:
            t = read_shard(shard, ["row", "messages"]).to_pylist()
            for rec in t:
                k = want.get(rec["row"])
                if k is not None:
                    out[k] = (prompt_text(rec["messages"]), response_text(rec["messages"]))
        return out

    pool = Pool(rows=rows, ids=ids, scores=scores, orientation=orientation, embeddings=embeddings, n_input=dataset.n_input, seed=seed,
                sources=m.get("source"), tasks=m.get("task"), text_loader=text_loader).take(alive)
    rank = np.arange(len(pool), dtype=np.int64)
    step_stats = []
    step_columns: dict[str, np.ndarray] = {}
    for s_i, step in enumerate(steps):
        selector = selector_class(step.method)(step.params, step_index=s_i, base_dir=base_dir)
        res = selector.select(pool)
        stage = f"select:{s_i}:{step.label}"
        for j in np.flatnonzero(~res.keep):
            ledger.append(entry(int(pool_idx[j]), res.outcome, stage, res.reason[j], res.detail[j]))
        step_stats.append({"step": s_i, "method": step.method, "name": step.label, "in": len(pool), "kept": int(res.keep.sum()),
                           "outcome_of_dropped": res.outcome, **res.stats})
        for name, values in res.columns.items():  # aligned to the step's pool; NaN for rows it never saw
            col = np.full(n, np.nan)
            col[pool_idx] = values
            step_columns[f"{step.label}.{name}"] = col
        rank = res.rank[res.keep]
        pool_idx = pool_idx[res.keep]
        pool = pool.take(res.keep)

    order = np.argsort(rank, kind="stable")
    for r, j in enumerate(order):
        ledger.append(entry(int(pool_idx[j]), "selected", "select", None, None, rank=r))
    final_rank = np.full(n, -1, dtype=np.int64)
    final_rank[pool_idx[order]] = np.arange(len(order))

    ledger.sort(key=lambda r: r["row"])
    ledger_t = ledger_table(ledger)
    counts = reconcile(ledger_t, dataset.n_input)
    ledger_path = write_parquet(out / "ledger.parquet", ledger_t)

    cols = {k: m[k] for k in META} if meta is not None else {k: [] for k in META}
    for name, values in scores.items():
        cols[name] = values
    for label in scorers:
        cols[f"{label}.status"] = statuses[label]
    cols.update(step_columns)
    cols["selected"] = final_rank >= 0
    cols["rank"] = np.where(final_rank >= 0, final_rank, None)
    table = pa.table({k: (pa.array(list(v), pa.int64()) if k == "rank" else v) for k, v in cols.items()})
    path = write_parquet(out / "select" / "scores.parquet", table)
    selected_ids = [ids[i] for i in pool_idx[order]]
    write_text(out / "select" / "selected_ids.txt", "".join(f"{s}\n" for s in selected_ids))
    return SelectionRef(path=str(path), ledger_path=str(ledger_path), n_selected=len(selected_ids), counts=counts, steps=step_stats)
