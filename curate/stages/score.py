"""Score: one task per (scorer × shard); results go to the score store, keyed by content."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import StepSpec
from curate.manifests import ShardRef, WorkRef
from curate.pipeline.context import scorer_context
from curate.pipeline.stage import (Run, ShardCache, Stage, check_error_budget, model_resume, set_suffix, status_warnings, work_counts,
                                   work_summary)
from curate.scorers import Scorer, ScorerContext, scorer_class
from curate.scorers.base import ScoreColumns
from curate.stages.shardwork import run_shard
from curate.store import SCORE_SCHEMA, Store
from curate.version import __version__


def build_scorer(step: StepSpec, context: ScorerContext) -> Scorer:
    cls = scorer_class(step.method)
    return cls(step.label, step.params, context)


def auto_hint(step: StepSpec, fp: dict) -> str:
    """For a key mismatch: what this worker resolved for ``dtype: auto`` / ``runtime: auto`` (the step's, or its
    defaults), which depend on the worker's CPU and installed packages."""
    params = step.params
    fields = getattr(scorer_class(step.method).Params, "model_fields", {})
    autos = [k for k in ("dtype", "runtime") if k in fields and params.get(k, fields[k].default) == "auto"]
    if not autos:
        return ""
    model = (fp.get("models") or [fp])[0]
    got = ", ".join(f"{k} {model.get(k, 'torch' if k == 'runtime' else None)!r}" for k in autos)
    why = f": {fp['dtype_reason']}" if fp.get("dtype_reason") else ""
    return (f" (this worker resolved {got}{why}; a worker whose CPU or installed packages differ from the driver's resolves "
            f"{' / '.join(k + ': auto' for k in autos)} differently: set them in the flow)")


def score_shard(shard: ShardRef, step: StepSpec, key: str, store_dir: str, context: ScorerContext,
                commit_s: float | None = None) -> WorkRef:
    """Score the rows of ``shard`` that the store lacks for this scorer (``commit_s``: see :func:`run_shard`)."""
    scorer = build_scorer(step, context)
    if scorer.key != key:  # the orchestrator and the task must agree on what is being computed
        hint = auto_hint(step, scorer.fingerprint())
        raise RuntimeError(f"scorer key mismatch for {step.label}: {scorer.key} != {key}{hint}")
    collection = Store(store_dir).scores(key)
    fp = scorer.fingerprint()
    collection.describe(fp)
    # duplicated from the fingerprint into every row, for convenience (methods.md E1)
    echo = {k: fp.get(k) for k in ("model_id", "model_revision", "dtype", "template_id", "template_hash", "max_length")}

    def compute(records: list[dict[str, Any]]) -> pa.Table:
        ids = pa.array([r["sample_id"] for r in records], pa.string())
        return score_table(scorer, key, echo, ids, ScoreColumns.from_scores(scorer.score_records(records), scorer.outputs))

    def compute_table(table: pa.Table) -> pa.Table:
        return score_table(scorer, key, echo, table.column("sample_id"), scorer.score_columns(table))

    columnar = scorer.columnar
    ref = run_shard("score", step.label, collection, shard, compute, scorer.table_rows if columnar else scorer.batch_rows,
                    check=lambda table: collapse_warnings(scorer, step.label, shard.shard_id, table), check_columns=("variant", "score"),
                    compute_table=compute_table if columnar else None, table_columns=scorer.table_columns,
                    commit_s=commit_s)
    _log_warnings(ref.warnings)
    return ref


def score_table(scorer: Scorer, key: str, echo: dict[str, Any], ids: pa.Array | pa.ChunkedArray, res: ScoreColumns) -> pa.Table:
    """The store rows (SCORE_SCHEMA) of one chunk: one row per (sample, output), samples in order and
    outputs in the scorer's order; the value is NaN unless the status is ok / truncated_ok, and
    ``raw_output`` is kept once per sample (on its first output)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    n, outputs = len(ids), list(scorer.outputs)
    v = len(outputs)
    per_row = np.repeat(np.arange(n, dtype=np.int64), v)  # sample of each store row
    take = pa.array(per_row)
    status = res.column("status", pa.string(), n)
    ok = pc.is_in(status, value_set=pa.array(["ok", "truncated_ok"])).take(take)
    values = pa.concat_arrays([res.value_array(o, n) for o in outputs]) if v else pa.array([], pa.float64())
    interleave = (np.arange(n, dtype=np.int64)[:, None] + np.arange(v, dtype=np.int64)[None, :] * n).ravel()
    score = pc.if_else(ok, values.take(pa.array(interleave)), pa.scalar(math.nan))
    first = pa.array(np.tile(np.arange(v) == 0, n))
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)

    def const(value, type_):
        return pa.array([value], type_).take(pa.array(np.zeros(n * v, dtype=np.int64)))

    cols = {
        "sample_id": ids.cast(pa.string()).take(take),
        "scorer_key": const(key, pa.string()),
        "method": const(scorer.method, pa.string()),
        "variant": pa.array(outputs, pa.string()).take(pa.array(np.tile(np.arange(v, dtype=np.int64), n))),
        "score": score,
        "status": status.take(take),
    }
    for name in ("error_class", "message", "components", "n_tokens_in", "n_tokens_used"):
        cols[name] = res.column(name, SCORE_SCHEMA.field(name).type, n).take(take)
    for name in ("model_id", "model_revision", "dtype", "template_id", "template_hash", "max_length"):
        cols[name] = const(echo.get(name), SCORE_SCHEMA.field(name).type)
    cols["seed"] = res.column("seed", pa.int64(), n).take(take)
    cols["decoding"] = res.column("decoding", pa.string(), n).take(take)
    cols["raw_output"] = pc.if_else(first, res.column("raw_output", pa.string(), n).take(take), pa.scalar(None, pa.string()))
    cols["created_at"] = const(now, SCORE_SCHEMA.field("created_at").type)
    cols["code_version"] = const(__version__, pa.string())
    return pa.table(cols, schema=SCORE_SCHEMA)


def collapse_warnings(scorer: Scorer, label: str, shard_id: int, table: pa.Table | None, max_share: float = 0.5) -> list[str]:
    """methods.md E5: one value covering most of a shard, a spread below the method's floor, or most
    IFD-like values at or above 1 (a template the model does not know) — the failure users hit."""
    if table is None or not getattr(scorer, "collapse_check", True):
        return []
    out = []
    variants = table.column("variant")
    scores = table.column("score")
    floors = getattr(scorer, "collapse_std_floor", {})
    for variant, orient in scorer.outputs.items():
        v = pc.drop_null(scores.filter(pc.equal(variants, variant))).to_numpy().astype(np.float64, copy=False)
        v = v[np.isfinite(v)]
        if len(v) < 20 or orient == "flag":
            continue
        name = f"{label}.{variant}"
        values, counts = np.unique(v, return_counts=True)
        if counts.max() / len(v) > max_share:
            out.append(f"shard {shard_id}: {name} = {values[counts.argmax()]:.6g} for {counts.max() / len(v):.0%} "
                       f"of {len(v)} rows (collapsed?)")
        if variant in floors and v.std() < floors[variant]:
            out.append(f"shard {shard_id}: {name} spread (std {v.std():.4f}) is below {floors[variant]} — the scorer may not discriminate")
        if orient == "band" and (v >= 1).mean() > 0.5:
            out.append(f"shard {shard_id}: {(v >= 1).mean():.0%} of {name} are ≥ 1 — does the model know this template?")
    return out


def _log_warnings(warnings: list[str]) -> None:
    if not warnings:
        return
    try:
        from prefect import get_run_logger

        logger = get_run_logger()
    except Exception:  # outside a Prefect run
        import logging

        logger = logging.getLogger("curate")
    for w in warnings:
        logger.warning(w)


# -- the stage ---------------------------------------------------------------------------------------

#: bump when score_shard's code changes what it returns (Prefect's task cache ignores called code)
SCORE_CACHE = ShardCache("scores", "score", "1")


class ScoreStage(Stage):
    """Score one record set's rows with one scorer, a task per shard; scores go to the store."""

    kind = "score"
    cache = SCORE_CACHE

    def __init__(self, step: StepSpec, recordset: str):
        task = f"score-{step.method}-{{shard.shard_id}}" if recordset == "input" else f"score-{step.method}-{recordset}-{{shard.shard_id}}"
        super().__init__(f"score:{step.label}{set_suffix(recordset)}", reads=(recordset,), writes=(f"score:{step.label}",), task_name=task)
        self.step = step
        self.recordset = recordset

    def run(self, run: Run) -> dict[str, Any]:
        from curate.progress import logger
        from curate.recordset import shared_shards

        step, key = run.scorers[self.step.label]
        ctx = scorer_context(run.spec)
        calls = [dict(shard=s, step=step, key=key, store_dir=run.store_dir, context=ctx, commit_s=run.spec.runtime.commit_interval_s)
                 for s in shared_shards(run.records(self, self.recordset).shards, run.store_dir)]
        model_resume(self, calls)
        work, secs = run.map(self, score_shard, calls)
        cls = scorer_class(step.method)
        hints = getattr(cls, "status_hints", {})
        warnings = status_warnings(work, getattr(cls, "status_warn_share", {}), hints)
        for w in warnings:
            logger.warning("%s: %s", self.name, w)
        check_error_budget(self.name, work, run.spec.runtime.max_error_rate, hints)
        summary = work_summary(self.name, work, secs)
        summary["warnings"] += warnings
        return summary

    def estimate(self, plan) -> dict[str, Any]:
        def measure():
            scorer = build_scorer(self.step, scorer_context(plan.spec))
            return scorer.score_records, plan.warmup_rows, getattr(scorer, "cost", None)

        return plan.model_stage(self, plan.run.scorers[self.step.label][1], self.step.method, measure)

    def counts(self, row: dict[str, Any], run: Run) -> list[dict[str, Any]]:
        return work_counts(row)
