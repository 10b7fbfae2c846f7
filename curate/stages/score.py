"""Score: one task per (scorer × shard); results go to the score store, keyed by content."""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa

from curate import __version__
from curate.config import StepSpec
from curate.manifests import ShardRef, WorkRef
from curate.scorers import Scorer, ScorerContext, scorer_class
from curate.stages.shardwork import run_shard
from curate.store import Store

SCORE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("scorer_key", pa.string()),
        ("method", pa.string()),
        ("variant", pa.string()),
        ("score", pa.float64()),
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("message", pa.string()),
        ("components", pa.string()),
        ("n_tokens_in", pa.int64()),
        ("n_tokens_used", pa.int64()),
        ("model_id", pa.string()),
        ("model_revision", pa.string()),
        ("dtype", pa.string()),
        ("template_id", pa.string()),
        ("template_hash", pa.string()),
        ("max_length", pa.int64()),
        ("seed", pa.int64()),
        ("decoding", pa.string()),
        ("raw_output", pa.string()),
        ("created_at", pa.timestamp("s", tz="UTC")),
        ("code_version", pa.string()),
    ]
)


def build_scorer(step: StepSpec, context: ScorerContext) -> Scorer:
    cls = scorer_class(step.method)
    return cls(step.label, step.params, context)


def score_shard(shard: ShardRef, step: StepSpec, key: str, store_dir: str, context: ScorerContext) -> WorkRef:
    """Score the rows of ``shard`` that the store lacks for this scorer."""
    scorer = build_scorer(step, context)
    if scorer.key != key:  # the orchestrator and the task must agree on what is being computed
        raise RuntimeError(f"scorer key mismatch for {step.label}: {scorer.key} != {key}")
    collection = Store(store_dir).scores(key)
    fp = scorer.fingerprint()
    collection.describe(fp)
    # duplicated from the fingerprint into every row, for convenience (methods.md E1)
    echo = {k: fp.get(k) for k in ("model_id", "model_revision", "dtype", "template_id", "template_hash", "max_length")}

    def compute(records: list[dict[str, Any]]) -> pa.Table:
        results = scorer.score_records(records)
        now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
        rows = []
        for rec, res in zip(records, results):
            comp = json.dumps(res.components, ensure_ascii=False, sort_keys=True, default=float) if res.components else None
            for v_i, variant in enumerate(scorer.outputs):
                value = res.values.get(variant, math.nan)
                rows.append(
                    {
                        "sample_id": rec["sample_id"],
                        "scorer_key": key,
                        "method": scorer.method,
                        "variant": variant,
                        "score": value if res.status in ("ok", "truncated_ok") else math.nan,
                        "status": res.status,
                        "error_class": res.error_class,
                        "message": res.message,
                        "components": comp,
                        "n_tokens_in": res.n_tokens_in,
                        "n_tokens_used": res.n_tokens_used,
                        **echo,
                        "seed": res.seed,
                        "decoding": res.decoding,
                        "raw_output": res.raw_output if v_i == 0 else None,  # once per row
                        "created_at": now,
                        "code_version": __version__,
                    }
                )
        return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)

    ref = run_shard("score", step.label, collection, shard, compute, scorer.batch_rows,
                    check=lambda table: collapse_warnings(scorer, step.label, shard.shard_id, table), check_columns=("variant", "score"))
    _log_warnings(ref.warnings)
    return ref


def collapse_warnings(scorer: Scorer, label: str, shard_id: int, table: pa.Table | None, max_share: float = 0.5) -> list[str]:
    """methods.md E5: one value covering most of a shard, a spread below the method's floor, or most
    IFD-like values at or above 1 (a template the model does not know) — the failure users hit."""
    if table is None or not getattr(scorer, "collapse_check", True):
        return []
    out = []
    cols = table.to_pydict()
    floors = getattr(scorer, "collapse_std_floor", {})
    for variant, orient in scorer.outputs.items():
        v = np.array([s for var, s in zip(cols["variant"], cols["score"]) if var == variant and s is not None], dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v) < 20 or orient == "flag":
            continue
        name = f"{label}.{variant}"
        values, counts = np.unique(v, return_counts=True)
        if counts.max() / len(v) > max_share:
            out.append(f"shard {shard_id}: {name} = {values[counts.argmax()]:.6g} for {counts.max() / len(v):.0%} of {len(v)} rows (collapsed?)")
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
