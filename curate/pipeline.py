"""The pipeline: ingest → embed/score → select → export → report, on any executor.

:func:`execute` is the whole run, written once; :func:`run` picks the executor (Prefect flow by
default, in-process with ``runtime.prefect: false``). :func:`plan` is the dry run behind
``curate plan``. Stages never reach back: each takes the manifests of the stages before it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import time
from typing import Any

from curate import __version__, progress
from curate.config import FlowSpec
from curate.errors import StageError
from curate.executors import LocalExecutor
from curate.io import write_json
from curate.manifests import DatasetRef, WorkRef
from curate.scorers import ScorerContext, scorer_class
from curate.stages.embed import embed_shard
from curate.stages.export import export_finalize, export_layout
from curate.stages.ingest import build_dataset, read_input
from curate.stages.score import _log_warnings, build_scorer, score_shard
from curate.stages.select import select_stage
from curate.store import Store


def torch_threads(spec: FlowSpec) -> int:
    return spec.runtime.torch_threads or min(2, os.cpu_count() or 1)


def scorer_context(spec: FlowSpec) -> ScorerContext:
    """What scorers get from the run: threads, seed, and where API responses are cached."""
    return ScorerContext(torch_threads=torch_threads(spec), seed=spec.seed, extra={"request_cache": str(spec.store / "requests")})


def model_keys(spec: FlowSpec) -> tuple[dict[str, tuple[Any, str]], str | None, dict[str, dict]]:
    """Store keys of every scorer and of the embedder, computed without loading any model."""
    from curate.embed import build_embedder

    ctx = scorer_context(spec)
    scorers, fingerprints = {}, {}
    for step in spec.score:
        scorer = build_scorer(step, ctx)
        scorers[step.label] = (step, scorer.key)
        fingerprints[f"score:{step.label}"] = {"key": scorer.key, **scorer.fingerprint()}
    embed_key = None
    if spec.embed is not None:
        embedder = build_embedder(spec.embed, torch_threads(spec))
        embed_key = embedder.key
        fingerprints["embed"] = {"key": embed_key, **embedder.fingerprint()}
    return scorers, embed_key, fingerprints


#: statuses that are successes; every other status (error, parse_failed, skipped_too_long,
#: fallback_needed, …) counts against ``runtime.max_error_rate`` (methods.md E5)
SUCCESS_STATUSES = ("ok", "truncated_ok")
#: what each failure status means, for the error-budget message (a scorer's ``status_hints`` come first)
STATUS_HINTS = {
    "error": "calls that raised; each row's error_class and message are in the store",
    "parse_failed": "the model's answer held no rating in range",
    "skipped_too_long": "the prompt does not fit max_length even with its bodies cut: raise max_length",
    "fallback_needed": "a rating digit's log-probability was not returned by the backend",
    "empty_response": "no response token to score",
    "short_response": "fewer response tokens than min_response_tokens",
}


def _check_error_budget(stage: str, refs: list[WorkRef], max_rate: float, hints: dict[str, str] | None = None) -> None:
    """Fail ``stage`` when the rows with a failure status (any but ok / truncated_ok, summed over
    statuses) exceed ``max_rate`` of its rows; the message names each status with its count, its
    share and what it means (``hints``: the scorer's own explanations)."""
    n = sum(r.n_rows for r in refs)
    failed: dict[str, int] = {}
    for r in refs:
        for status, count in r.statuses.items():
            if status not in SUCCESS_STATUSES:
                failed[status] = failed.get(status, 0) + count
    total = sum(failed.values())
    if n and total / n > max_rate:
        hints = {**STATUS_HINTS, **(hints or {})}
        parts = [f"{status} {count} ({count / n:.1%}): {hints.get(status.split(':')[0], 'see the store')}"
                 for status, count in sorted(failed.items(), key=lambda kv: (-kv[1], kv[0]))]
        raise StageError(f"{stage}: {total} of {n} rows failed ({total / n:.1%}), over runtime.max_error_rate={max_rate:.1%} — "
                         + "; ".join(parts) + " (every row's status, error_class and message are in the store)")


def _status_warnings(refs: list[WorkRef], shares: dict[str, float], hints: dict[str, str] | None = None) -> list[str]:
    """Per shard, a warning for each status whose share of the shard's rows exceeds its limit in
    ``shares`` (a scorer's ``status_warn_share``, e.g. deita's fallback above 1%, methods.md A6)."""
    hints = {**STATUS_HINTS, **(hints or {})}
    out = []
    for r in refs:
        for status, limit in shares.items():
            count = r.statuses.get(status, 0)
            if r.n_rows and count / r.n_rows > limit:
                out.append(f"shard {r.shard_id}: {count} of {r.n_rows} rows ({count / r.n_rows:.1%}) are {status}, over {limit:.0%} "
                           f"({hints.get(status, 'see the store')})")
    return out


def _work_summary(stage: str, refs: list[WorkRef], seconds: float, warnings: list[str] | None = None) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for r in refs:
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    return {"stage": stage, "tasks": len(refs), "rows": sum(r.n_rows for r in refs), "computed_rows": sum(r.computed_rows for r in refs),
            "computed_shards": sum(1 for r in refs if r.computed_rows), "statuses": statuses, "seconds": seconds,
            "warnings": [w for r in refs for w in r.warnings] + (warnings or [])}


def execute(spec: FlowSpec, executor: LocalExecutor | None = None) -> dict[str, Any]:
    """Run the whole flow with ``executor``; returns the run summary (also written to run.json)."""
    executor = executor or LocalExecutor()
    t_start = time.perf_counter()
    progress.configure(spec.runtime.progress)
    if executor.name == "local":
        progress.attach_console_log()
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    store_dir = str(spec.store)
    threads = torch_threads(spec)
    stages: list[dict[str, Any]] = []

    def timed(stage, fn, calls):
        t0 = time.perf_counter()
        res = executor.map(stage, fn, calls)
        return res, time.perf_counter() - t0

    # ingest
    ingest_dir = str(out / "ingest")
    refs, secs = timed("ingest", read_input, [dict(spec=inp, input_index=i, base_dir=str(spec.base), work_dir=ingest_dir, ingest=spec.ingest)
                                              for i, inp in enumerate(spec.inputs)])
    stages.append({"stage": "ingest", "tasks": len(refs), "rows": sum(r.n_rows for r in refs), "seconds": secs})
    (dataset,), secs = timed("shard", build_dataset, [dict(inputs=refs, out_dir=ingest_dir, ingest=spec.ingest)])
    stages.append({"stage": "shard", "tasks": 1, "rows": dataset.n_valid, "seconds": secs})

    scorers, embed_key, fingerprints = model_keys(spec)

    # embed
    if spec.embed is not None:
        Store(store_dir).embeddings(embed_key).describe({k: v for k, v in fingerprints["embed"].items() if k != "key"})
        work, secs = timed("embed", embed_shard, [dict(shard=s, spec=spec.embed, key=embed_key, store_dir=store_dir, torch_threads=threads)
                                                  for s in dataset.shards])
        _check_error_budget("embed", work, spec.runtime.max_error_rate)
        stages.append(_work_summary("embed", work, secs))

    # score
    ctx = scorer_context(spec)
    for label, (step, key) in scorers.items():
        work, secs = timed("score", score_shard, [dict(shard=s, step=step, key=key, store_dir=store_dir, context=ctx) for s in dataset.shards])
        hints = getattr(scorer_class(step.method), "status_hints", {})
        warnings = _status_warnings(work, getattr(scorer_class(step.method), "status_warn_share", {}), hints)
        _log_warnings(warnings)
        _check_error_budget(f"score:{label}", work, spec.runtime.max_error_rate, hints)
        stages.append(_work_summary(f"score:{label}", work, secs, warnings))

    # select
    (selection,), secs = timed("select", select_stage, [dict(dataset=dataset, steps=spec.select, scorers=scorers, embed_key=embed_key,
                                                            store_dir=store_dir, out_dir=str(out), seed=spec.seed,
                                                            base_dir=str(spec.base))])
    stages.append({"stage": "select", "tasks": 1, "rows": selection.n_selected, "seconds": secs})

    # export
    keys = {"config_hash": spec.fingerprint(), **{k: v["key"] for k, v in fingerprints.items()}}
    files, secs = timed("export", export_layout, [dict(selection=selection, dataset=dataset, spec=spec.export, layout=layout, out_dir=str(out))
                                                  for layout in spec.export.layouts])
    files = [f for group in files for f in group]
    (export,), secs2 = timed("export-configs", export_finalize, [dict(selection=selection, dataset=dataset, spec=spec.export, files=files,
                                                                     out_dir=str(out), keys=keys)])
    stages.append({"stage": "export", "tasks": len(spec.export.layouts) + 1, "rows": selection.n_selected, "seconds": secs + secs2})

    summary = {
        "flow": spec.name,
        "description": spec.description,
        "flow_path": spec.flow_path,
        "config_hash": spec.fingerprint(),
        "seed": spec.seed,
        "output_dir": str(out),
        "store_dir": store_dir,
        **executor.describe(),
        "curate_version": __version__,
        "n_input": dataset.n_input,
        "counts": selection.counts,
        "reconciled": sum(selection.counts.values()) == dataset.n_input,
        "inputs": [r.model_dump(include={"source", "format", "files", "n_rows", "n_valid", "n_quarantined"}) for r in dataset.sources],
        "n_duplicates": dataset.n_duplicates,
        "stages": stages,
        "steps": selection.steps,
        "keys": keys,
        "fingerprints": fingerprints,
        "export": export.model_dump(),
        "seconds": time.perf_counter() - t_start,
    }
    if spec.report.enabled:
        (report_path,), secs = timed("report", make_report, [dict(summary=summary, selection_path=selection.path, ledger_path=selection.ledger_path,
                                                                  embed_key=embed_key, store_dir=store_dir, out_dir=str(out),
                                                                  plots=spec.report.plots, max_points=spec.report.max_points, seed=spec.seed)])
        stages.append({"stage": "report", "tasks": 1, "seconds": secs})
        summary["report"] = report_path
    summary["seconds"] = time.perf_counter() - t_start
    summary["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(out / "run.json", summary)

    from curate.report.report import summary_markdown

    executor.publish(summary, summary_markdown(summary), counts_table(summary, dataset))
    return summary


def make_report(summary: dict, selection_path: str, ledger_path: str, embed_key: str | None, store_dir: str, out_dir: str,
                plots: bool, max_points: int, seed: int) -> str:
    import pyarrow.parquet as pq

    from curate.report import write_report
    from curate.stages.embed import load_embeddings

    embeddings = None
    if embed_key is not None and plots:
        ids = pq.read_table(selection_path, columns=["sample_id"]).column(0).to_pylist()
        if ids:
            embeddings, statuses = load_embeddings(store_dir, embed_key, ids)
    return write_report(summary, selection_path, ledger_path, out_dir, embeddings, plots, max_points, seed)


def counts_table(summary: dict[str, Any], dataset: DatasetRef) -> list[dict[str, Any]]:
    """Rows in and out of every stage (the Prefect table artifact)."""
    c = summary["counts"]
    rows = [{"stage": "ingest", "in": dataset.n_input, "out": dataset.n_valid + dataset.n_duplicates, "note": f"{dataset.n_quarantined} quarantined"},
            {"stage": "dedup", "in": dataset.n_valid + dataset.n_duplicates, "out": dataset.n_valid, "note": f"{dataset.n_duplicates} exact duplicates"}]
    for s in summary["stages"]:
        if s["stage"].startswith(("score:", "embed")):
            rows.append({"stage": s["stage"], "in": s["rows"], "out": s["rows"], "note": f"computed {s['computed_rows']}; statuses {s['statuses']}"})
    for s in summary["steps"]:
        rows.append({"stage": f"select:{s['step']}:{s['name']}", "in": s["in"], "out": s["kept"], "note": f"dropped rows are {s['outcome_of_dropped']}"})
    rows.append({"stage": "selected", "in": summary["n_input"], "out": c["selected"],
                 "note": f"not_selected {c['not_selected']}, filtered {c['filtered']}, quarantined {c['quarantined']}"})
    return rows


def run(spec: FlowSpec, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run a validated flow: as a Prefect flow when ``runtime.prefect`` (the default), else in-process.
    Missing input files are reported before anything starts."""
    check_inputs(spec)
    if not spec.runtime.prefect:
        return execute(spec, LocalExecutor())
    from curate.flow import run_prefect

    return run_prefect(spec, overrides or [])


def check_inputs(spec: FlowSpec) -> None:
    """Raise IngestError (file and folder named) for an input path or glob that matches no file."""
    from curate.ingest.readers import expand_paths

    for inp in spec.inputs:
        if inp.path is not None:
            expand_paths(inp.path, spec.base)


def _estimate(measure, todo: list[dict], warmup_rows: int, cost) -> dict[str, Any]:
    """Time ``measure`` on a few rows (after one untimed row that loads the model) and extrapolate by
    ``cost`` (tokens, when the stage counts them; else rows)."""
    if not todo:
        return {"estimate_s": 0.0}
    sample = todo[: warmup_rows + 1]
    measure(sample[:1])
    t0 = time.perf_counter()
    measure(sample[1:] or sample)
    secs = time.perf_counter() - t0
    unit_sample = cost(sample[1:] or sample)
    total = cost(todo)
    rate = unit_sample / secs if secs > 0 else float("inf")
    return {"estimate_s": round(total / rate, 1), "work": total, "rate": round(rate, 1)}


def plan(spec: FlowSpec, warmup: bool = True, warmup_rows: int = 8) -> dict[str, Any]:
    """Dry run: read the inputs (into a temp dir), count rows and tokens, list the stages with what
    the store already holds and, with ``warmup``, each model stage's time estimated from its token
    counts and a short measured warm-up (this loads the models). Writes nothing under output_dir."""
    import pyarrow.compute as pc

    from curate.embed import build_embedder, embed_text
    from curate.scorers.heuristic import _TOKEN
    from curate.stages.ingest import read_shard
    from curate.stages.score import build_scorer

    with tempfile.TemporaryDirectory(prefix="curate-plan-") as tmp:
        refs = [read_input(inp, i, str(spec.base), tmp, spec.ingest) for i, inp in enumerate(spec.inputs)]
        dataset = build_dataset(refs, tmp, spec.ingest)
        records: list[dict] = []
        n_tokens = 0
        for shard in dataset.shards:
            t = read_shard(shard)
            records += t.to_pylist()
            contents = pc.list_flatten(t.column("messages")).combine_chunks().field("content").to_pylist()
            n_tokens += sum(len(_TOKEN.findall(c or "")) for c in contents)
        scorers, embed_key, fingerprints = model_keys(spec)
        stages = []
        if spec.embed is not None:
            have = Store(spec.store).embeddings(embed_key).ids()
            todo = [r for r in records if r["sample_id"] not in have]
            row = {"stage": "embed", "what": spec.embed.model, "key": embed_key[:12], "shards": len(dataset.shards),
                   "cached_rows": len(records) - len(todo), "to_compute": len(todo)}
            if warmup and todo:
                embedder = build_embedder(spec.embed, torch_threads(spec))
                row.update(_estimate(lambda rs: embedder.embed([embed_text(r, spec.embed.text) for r in rs]), todo,
                                     max(warmup_rows, 32), len), unit="rows")
            stages.append(row)
        ctx = scorer_context(spec)
        for label, (step, key) in scorers.items():
            have = Store(spec.store).scores(key).ids()
            todo = [r for r in records if r["sample_id"] not in have]
            row = {"stage": f"score:{label}", "what": step.method, "key": key[:12], "shards": len(dataset.shards),
                   "cached_rows": len(records) - len(todo), "to_compute": len(todo)}
            if warmup and todo:
                scorer = build_scorer(step, ctx)
                cost = getattr(scorer, "cost", None)
                row.update(_estimate(scorer.score_records, todo, warmup_rows, cost or len), unit="tokens" if cost else "rows")
            stages.append(row)
        for i, step in enumerate(spec.select):
            stages.append({"stage": f"select:{i}:{step.label}", "what": json.dumps(step.params, sort_keys=True)})
        stages.append({"stage": "export", "what": ", ".join(f"{l}/{t}" for l in spec.export.layouts for t in spec.export.file_types)})
        return {
            "flow": spec.name,
            "output_dir": str(spec.out),
            "store_dir": str(spec.store),
            "inputs": [r.model_dump(include={"source", "format", "files", "n_rows", "n_valid", "n_quarantined"}) for r in refs],
            "n_input": dataset.n_input,
            "n_valid": dataset.n_valid,
            "n_quarantined": dataset.n_quarantined,
            "n_duplicates": dataset.n_duplicates,
            "n_shards": len(dataset.shards),
            "tokens": n_tokens,
            "stages": stages,
            "estimate_s": round(sum(s.get("estimate_s", 0.0) for s in stages), 1),
        }
