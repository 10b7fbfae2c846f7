"""Rewrite: one rewrite step over a record set, writing the derived rows as a new record set.

The step's work is split into its units (see :mod:`curate.rewrite.base`); each finished unit is
stored under ``<store>/rewrites/<key>/`` (key = the rewriter's fingerprint and the input set's
content hash) with what its calls were charged, so a re-run recomputes nothing, a killed run resumes
losing at most the unit in flight, and the budget caps hold across runs. A unit with a failed call is
not stored (see :func:`rewrite_stage`). Derived rows are numbered after every row that existed before them (``row_offset``); a
derived row that breaks the conversation rules is quarantined in the derived ledger, never dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.config import StepSpec
from curate.errors import RecordError
from curate.ingest.validate import normalise_messages, validate_messages
from curate.io import write_json, write_parquet, write_text
from curate.manifests import RecordSetRef, RewriteRef
from curate.pipeline.context import rewrite_context
from curate.pipeline.stage import Run, Stage
from curate.progress import logger, stage_progress
from curate.records import RECORD_SCHEMA, canonical_json, sample_id, sha256_hex
from curate.recordset import read_records, write_recordset
from curate.rewrite import Derived, RewriteContext, Rewriter, UnitResult, rewriter_class
from curate.store import Store

DISPOSITION_SCHEMA = pa.schema([("sample_id", pa.string()), ("row", pa.int64()), ("disposition", pa.string()), ("reason", pa.string()),
                                ("detail", pa.string()), ("n_derived", pa.int64())])
QUARANTINE_SCHEMA = pa.schema([("row", pa.int64()), ("origin", pa.string()), ("parents", pa.list_(pa.string())), ("reason", pa.string()),
                               ("detail", pa.string())])


def build_rewriter(step: StepSpec, context: RewriteContext) -> Rewriter:
    return rewriter_class(step.method)(step.label, step.params, context)


def rewrite_key(rewriter: Rewriter, source: RecordSetRef) -> str:
    return sha256_hex(rewriter.key, source.sha256)


def _unit_to_json(result: UnitResult, charged: dict[str, Any]) -> str:
    return canonical_json({
        "format": UNIT_FORMAT,
        "derived": [{"messages": d.messages, "parents": d.parents, "variant": d.variant, "generation": d.generation,
                     "tools": d.tools, "original": d.original} for d in result.derived],
        "dispositions": {k: list(v) for k, v in result.dispositions.items()},
        "stats": result.stats,
        "charged": charged,
    })


def _unit_from_json(data: dict[str, Any]) -> UnitResult:
    return UnitResult(derived=[Derived(**d) for d in data["derived"]], dispositions={k: tuple(v) for k, v in data["dispositions"].items()},
                      stats=data["stats"])


#: the layout of a stored unit (2: with what its calls were charged); a unit stored in another layout is run again
UNIT_FORMAT = 2


def rewrite_stage(source: RecordSetRef, step: StepSpec, context: RewriteContext, store_dir: str, out_dir: str, row_offset: int,
                  shard_size: int, max_error_rate: float = 0.01) -> RewriteRef:
    """Run the step's units (stored ones are read back), then assemble the derived record set.

    A unit is stored as done only when none of its calls failed: a unit with a failed call (transport
    error, an HTTP error, retries exhausted, a reply without text) still gives this run its rows, and
    the next run asks exactly the failed calls again (the others come from the reply cache). What a
    stored unit's calls were charged is stored with it and counted again when a later run reads it
    back, so the step's budget caps hold over every run of it. The step stops with a
    :class:`~curate.errors.StageError` naming it, the count and the first error when every call of a
    unit failed, or when failed calls exceed ``max_error_rate`` of the step's calls."""
    from curate.lm.calls import CHARGED

    rewriter = build_rewriter(step, context)
    key = rewrite_key(rewriter, source)
    folder = Store(store_dir).rewrites(key)
    if not (folder / "fingerprint.json").exists():
        write_json(folder / "fingerprint.json", {**rewriter.fingerprint(), "input_recordset": source.sha256})
    records = read_records(source).to_pylist()
    results: list[UnitResult] = []
    computed = pending = 0
    units = list(rewriter.units(len(records)))
    _resume_note(step, [folder / f"unit-{sha256_hex(u)[:24]}.json" for u in units])
    for unit in units:
        path = folder / f"unit-{sha256_hex(unit)[:24]}.json"
        stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        if stored is not None and stored.get("format") == UNIT_FORMAT:
            logger.info("rewrite %s unit %s: already in the store", step.label, unit)
            rewriter.carry(stored["charged"])
            results.append(_unit_from_json(stored))
            continue
        before = rewriter.spending()
        with stage_progress(f"rewrite {step.label} unit {unit}", len(records)) as bar:
            result = rewriter.run_unit(unit, records)
            bar.advance(len(records))
        after = rewriter.spending()
        charged = {k: after.get(k, 0) - before.get(k, 0) for k in CHARGED}
        failed = after.get("failed", 0) - before.get("failed", 0)
        if failed:
            pending += 1
            made = after.get("made", 0) - before.get("made", 0)
            logger.warning("rewrite %s unit %s: %d of its calls failed (first: %s); the unit is not stored, the next run asks them again",
                           step.label, unit, failed, after.get("first_error"))
            if made and failed == made and failed == charged["calls"]:
                _stop(step, failed, after, f"every call of unit {unit} failed")
        else:
            write_text(path, _unit_to_json(result, charged))
            computed += 1
        results.append(result)
    spent = rewriter.spending()
    if spent.get("calls") and spent.get("failed", 0) / spent["calls"] > max_error_rate:
        _stop(step, spent["failed"], spent, f"{spent['failed'] / spent['calls']:.1%} of {spent['calls']} calls failed, over "
                                            f"runtime.max_error_rate={max_error_rate:.1%}")
    ref = _assemble(step, rewriter, key, source, records, results, out_dir, row_offset, shard_size, computed)
    if spent:
        ref.stats["calls"] = {k: spent.get(k) for k in ("calls", "made", "cache_hits", "carried", "refused", "failed", "truncated",
                                                         "usage_missing", "prompt_tokens_estimated", "new_tokens", "prompt_tokens", "cost")}
        if spent.get("first_error"):
            ref.stats["calls"]["first_error"] = spent["first_error"]
        ref.stats["units_not_stored"] = pending
    return ref


def _resume_note(step: StepSpec, paths: list) -> None:
    """One line when units of this step were finished by an earlier run (the rest also reuse every
    reply cached before: only calls never answered are made)."""
    stored = sum(1 for p in paths if p.exists())
    if stored == len(paths):
        logger.info("rewrite:%s: all %d unit%s already done before (in the store); nothing to ask", step.label, stored,
                    "s" if stored != 1 else "")
    elif stored:
        logger.info("rewrite:%s: %d of %d units already done before; running the other %d (replies cached before are reused)",
                    step.label, stored, len(paths), len(paths) - stored)


def _stop(step: StepSpec, failed: int, spent: dict[str, Any], why: str) -> None:
    from curate.errors import StageError

    raise StageError(f"rewrite:{step.label}: {why} — {failed} failed call(s); first error: {spent.get('first_error')}. "
                     "Nothing that failed was stored: fix the cause (endpoint, key, model) and run again; finished calls are cached.")


def _assemble(step: StepSpec, rewriter: Rewriter, key: str, source: RecordSetRef, records: list[dict], results: list[UnitResult],
              out_dir: str, row_offset: int, shard_size: int, computed: int) -> RewriteRef:
    """Number the derived rows, validate them, and merge the units' dispositions of the input rows."""
    name = step.label
    tasks = {r["sample_id"]: r["task"] for r in records}
    rows_out: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    children: dict[str, int] = {}
    k = 0
    for result in results:
        for d in result.derived:
            row = row_offset + k
            origin = f"{rewriter.method}:{d.variant}"
            k += 1
            for p in d.parents:
                children[p] = children.get(p, 0) + 1
            try:
                messages = normalise_messages(d.messages)
                validate_messages(messages, None)
            except RecordError as exc:
                quarantine.append({"row": row, "origin": origin, "parents": d.parents, "reason": exc.error_class,
                                   "detail": f"derived row {row} ({origin}): {exc.field or ''} {exc.message}".strip()})
                continue
            parent_tasks = {tasks.get(p) for p in d.parents}
            rows_out.append({
                "sample_id": sample_id(messages, d.tools), "row": row, "source": f"rewrite:{name}", "source_index": row - row_offset,
                "source_file": None, "source_line": None, "task": parent_tasks.pop() if len(parent_tasks) == 1 else None,
                "format": "derived", "messages": messages, "tools": d.tools, "original": canonical_json(d.original or {}),
                "origin": origin, "parents": d.parents, "generation": canonical_json(d.generation),
            })
    merged: dict[str, tuple[str, str | None, str | None]] = {}
    for result in results:
        for sid, disp in result.dispositions.items():
            if merged.get(sid, ("",))[0] != "used":
                merged[sid] = tuple(disp)
    disp_rows = []
    for r in records:
        what, reason, detail = merged.get(r["sample_id"], ("passthrough", None, None))
        disp_rows.append({"sample_id": r["sample_id"], "row": r["row"], "disposition": what, "reason": reason, "detail": detail,
                          "n_derived": children.get(r["sample_id"], 0)})
    out = Path(out_dir)
    derived = write_recordset(pa.Table.from_pylist(rows_out, schema=RECORD_SCHEMA), out, name, f"rewrite:{name}", key, shard_size)
    disp_path = write_parquet(out / "rewrite" / name / "dispositions.parquet", pa.Table.from_pylist(disp_rows, schema=DISPOSITION_SCHEMA))
    write_parquet(out / "rewrite" / name / "quarantine.parquet", pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
    stats: dict[str, Any] = {"input_rows": len(records), "derived_rows": k, "quarantined": len(quarantine),
                             "used": sum(d["disposition"] == "used" for d in disp_rows),
                             "passthrough": sum(d["disposition"] == "passthrough" for d in disp_rows),
                             "dropped": sum(d["disposition"] == "dropped" for d in disp_rows), "units": [r.stats for r in results]}
    # why input rows were passed through or dropped, and what the rewriter produced but rejected itself
    # (a unit's stats["rejected"]: {reason: count}, e.g. a rewrite whose grader failed it)
    reasons: Counter[str] = Counter(f"{d['disposition']}: {d['reason'] or 'unspecified'}" for d in disp_rows if d["disposition"] != "used")
    reasons.update(f"derived quarantined: {q['reason']}" for q in quarantine)
    for r in results:
        for reason, n in (r.stats.get("rejected") or {}).items():
            reasons[f"rejected by the rewriter: {reason}"] += int(n)
    stats["reasons"] = dict(sorted(reasons.items()))
    return RewriteRef(name=name, key=key, derived=derived, dispositions_path=str(disp_path),
                      quarantine_path=str(out / "rewrite" / name / "quarantine.parquet"), n_derived=k, stats=stats, computed_units=computed)


# -- the stage ---------------------------------------------------------------------------------------


class RewriteStage(Stage):
    """One rewrite step over a record set (one task; its units are stored and resumed)."""

    kind = "rewrite"

    def __init__(self, step: StepSpec, source: str):
        super().__init__(f"rewrite:{step.label}", reads=(source,), writes=(step.label,), task_name=f"rewrite-{step.method}")
        self.step = step
        self.source = source

    def run(self, run: Run) -> dict[str, Any]:
        spec = run.spec
        (ref,), secs = run.map(self, rewrite_stage, [dict(source=run.records(self, self.source), step=self.step,
                                                          context=rewrite_context(spec), store_dir=str(spec.local_store),
                                                          out_dir=str(run.out), row_offset=run.next_row, shard_size=spec.ingest.shard_size,
                                                          max_error_rate=spec.runtime.max_error_rate)])
        run.next_row += ref.n_derived
        run.write(self, self.step.label, ref, records=ref.derived)
        return {"stage": self.name, "tasks": 1, "rows": ref.n_derived, "computed_rows": ref.n_derived if ref.computed_units else 0,
                "seconds": secs, "rewrite": {k: v for k, v in ref.stats.items() if k != "units"}}

    def estimate(self, plan) -> dict[str, Any]:
        rewriter = build_rewriter(self.step, rewrite_context(plan.spec))
        row = {**self.describe(), "what": self.step.method, "key": rewriter.key[:12]}
        # the rows it will see exist only after selection: the input rows bound them
        n = plan.run.sets["input"].n_rows
        calls = rewriter.plan_calls(n)
        if calls is not None:
            cap = getattr(getattr(rewriter.params, "budget", None), "max_calls", None)
            row["max_calls"] = calls if cap is None else min(calls, cap)
            why = f"budget max_calls {cap}; {calls} over all {n} input rows" if cap is not None and cap < calls else \
                f"over all {n} input rows; fewer reach this step"
            row["note"] = f"at most {row['max_calls']} model calls ({why})"
        return row

    def counts(self, row: dict[str, Any], run: Run) -> list[dict[str, Any]]:
        rw = row.get("rewrite", {})
        return [{"stage": row["stage"], "in": rw.get("input_rows"), "out": row["rows"],
                 "note": f"used {rw.get('used')}, passthrough {rw.get('passthrough')}, dropped {rw.get('dropped')}, "
                         f"quarantined {rw.get('quarantined')}"}]
