"""Score: one task per (scorer × shard); results go to the score store, keyed by content."""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any

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
            for variant in scorer.outputs:
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
                        "created_at": now,
                        "code_version": __version__,
                    }
                )
        return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)

    return run_shard("score", step.label, collection, shard, compute, scorer.batch_rows)
