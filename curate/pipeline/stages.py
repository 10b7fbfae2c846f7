"""The stages of a flow, and the list a flow file declares.

:func:`build_stages` turns a flow spec into its stage list::

    ingest → embed → score:<each scorer> → select
           [→ rewrite:<each step> → embed@<set> → score:<scorer>@<set> → select-2]
           → ledger → export → report

The bracketed round exists when the flow has a ``rewrite:`` section: the derived rows are embedded and
re-scored by the flow's own embedder and scorers (the store computes only what it lacks) and meet
the round's selection steps, alone (``pool: derived``, the default) or with the originals
(``pool: selected_and_derived``).
"""

from __future__ import annotations

import os
from typing import Any

from curate.config import FlowSpec, StepSpec
from curate.pipeline.stage import Run, ShardCache, Stage, model_resume, work_summary

#: bump when a model stage's code changes what it returns (Prefect's task cache ignores called code)
SCORE_CACHE = ShardCache("scores", "score", "1")
EMBED_CACHE = ShardCache("embeddings", "embed", "1")


def torch_threads(spec: FlowSpec) -> int:
    return spec.runtime.torch_threads or min(2, os.cpu_count() or 1)


def scorer_context(spec: FlowSpec):
    """What scorers get from the run: threads, seed, and where API responses are cached (the store's
    ``requests/``, which every worker reaches, a URL store included)."""
    from curate.scorers import ScorerContext

    return ScorerContext(torch_threads=torch_threads(spec), seed=spec.seed, extra={"request_cache": str(spec.store / "requests")})


def rewrite_context(spec: FlowSpec):
    """What rewriters get from the run: seed, threads, the project root, the store (LLM call cache)
    and the flow's embedder (AIDE dedups and picks personas with it)."""
    from curate.rewrite import RewriteContext

    return RewriteContext(seed=spec.seed, torch_threads=torch_threads(spec), base_dir=str(spec.base), store_dir=str(spec.local_store),
                          extra={"embed": spec.embed})


def model_keys(spec: FlowSpec) -> tuple[dict[str, tuple[Any, str]], str | None, dict[str, dict]]:
    """Store keys of every scorer and of the embedder, computed without loading any model."""
    from curate.embed import build_embedder
    from curate.stages.score import build_scorer

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


def check_error_budget(stage: str, refs: list, max_rate: float, hints: dict[str, str] | None = None) -> None:
    """Fail ``stage`` when the rows with a failure status (any but ok / truncated_ok, summed over
    statuses) exceed ``max_rate`` of its rows; the message names each status with its count, its
    share and what it means (``hints``: the scorer's own explanations)."""
    from curate.errors import StageError

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


def status_warnings(refs: list, shares: dict[str, float], hints: dict[str, str] | None = None) -> list[str]:
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


def _suffix(recordset: str) -> str:
    return "" if recordset == "input" else f"@{recordset}"


class IngestStage(Stage):
    """Read every input (a task each), then number, dedup and shard them (one task): the ``input`` set."""

    kind = "ingest"

    def __init__(self):
        super().__init__("ingest", reads=("inputs",), writes=("input", "ingest_ledger"))

    def run(self, run: Run) -> dict[str, Any]:
        from curate.stages.ingest import build_dataset, read_input

        spec = run.spec
        work_dir = str(run.out / "ingest")
        cache_dir = str(spec.local_store / "ingest")  # files read before (same bytes, same settings) are not parsed again
        refs, secs = run.map(self, read_input, [dict(spec=inp, input_index=i, base_dir=str(spec.base), work_dir=work_dir, ingest=spec.ingest,
                                                     cache_dir=cache_dir, workers=spec.runtime.ingest_workers) for i, inp in enumerate(spec.inputs)],
                              task="ingest-{input_index}")
        _ingest_resume(refs)
        (dataset,), secs2 = run.map(self, build_dataset, [dict(inputs=refs, out_dir=str(run.out), ingest=spec.ingest, store_dir=str(spec.store),
                                                               embed=spec.embed)], task="shard")
        run.dataset = dataset
        run.sets["input"] = dataset.records
        n_files = sum(len(r.files) for r in refs)
        cached = sum(r.files_cached for r in refs)
        return {"stage": "ingest", "tasks": len(refs) + 1, "rows": dataset.n_input, "seconds": secs + secs2, "files": n_files,
                "files_cached": cached, "chunks": sum(len(r.chunks) for r in refs), "chunks_cached": sum(r.chunks_cached for r in refs)}

    def estimate(self, plan) -> dict[str, Any]:
        return {**self.describe(), "what": f"{len(plan.spec.inputs)} inputs"}


def _ingest_resume(refs: list) -> None:
    """One line when ingest found chunks of the inputs read before (kept in the store's ``ingest/``)."""
    from curate.progress import logger

    chunks = sum(len(r.chunks) for r in refs)
    cached = sum(r.chunks_cached for r in refs)
    if not cached:
        return
    files = sum(len(r.files) for r in refs)
    whole = sum(r.files_cached for r in refs)
    rows = sum(c.n_rows for r in refs for c in r.chunks)
    if cached == chunks:
        logger.info("ingest: all %d chunks of the %d input file%s already read before (%s rows, in the store); nothing parsed again",
                    chunks, files, "s" if files != 1 else "", f"{rows:,}")
    else:
        logger.info("ingest: %d of %d chunks already read before (%d of %d files whole); read the other %d", cached, chunks, whole, files,
                    chunks - cached)


class EmbedStage(Stage):
    """Embed one record set's rows, a task per shard; vectors go to the store."""

    kind = "embed"
    cache = EMBED_CACHE

    def __init__(self, recordset: str):
        super().__init__(f"embed{_suffix(recordset)}", reads=(recordset,), writes=("embeddings",),
                         task_name="embed-{shard.shard_id}" if recordset == "input" else f"embed-{recordset}-{{shard.shard_id}}")
        self.recordset = recordset

    def run(self, run: Run) -> dict[str, Any]:
        from curate.recordset import shared_shards
        from curate.stages.embed import embed_shard
        from curate.store import Store

        spec = run.spec
        Store(run.store_dir).embeddings(run.embed_key).describe({k: v for k, v in run.fingerprints["embed"].items() if k != "key"})
        shards = shared_shards(run.sets[self.recordset].shards, run.store_dir)
        calls = [dict(shard=s, spec=spec.embed, key=run.embed_key, store_dir=run.store_dir, torch_threads=torch_threads(spec),
                      commit_s=spec.runtime.commit_interval_s) for s in shards]
        if spec.embed.method != "precomputed":  # precomputed vectors came with ingest: nothing is computed here
            model_resume(self, calls)
        work, secs = run.map(self, embed_shard, calls)
        check_error_budget(self.name, work, spec.runtime.max_error_rate)
        return work_summary(self.name, work, secs)

    def estimate(self, plan) -> dict[str, Any]:
        return plan.model_stage(self, "embed", plan.run.embed_key)


class ScoreStage(Stage):
    """Score one record set's rows with one scorer, a task per shard; scores go to the store."""

    kind = "score"
    cache = SCORE_CACHE

    def __init__(self, step: StepSpec, recordset: str):
        super().__init__(f"score:{step.label}{_suffix(recordset)}", reads=(recordset,), writes=(f"score:{step.label}",),
                         task_name=f"score-{step.method}-{{shard.shard_id}}" if recordset == "input" else f"score-{step.method}-{recordset}-{{shard.shard_id}}")
        self.step = step
        self.recordset = recordset

    def run(self, run: Run) -> dict[str, Any]:
        from curate.recordset import shared_shards
        from curate.stages.score import score_shard

        from curate.progress import logger
        from curate.scorers import scorer_class

        step, key = run.scorers[self.step.label]
        ctx = scorer_context(run.spec)
        calls = [dict(shard=s, step=step, key=key, store_dir=run.store_dir, context=ctx, commit_s=run.spec.runtime.commit_interval_s)
                 for s in shared_shards(run.sets[self.recordset].shards, run.store_dir)]
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
        return plan.model_stage(self, "score", plan.run.scorers[self.step.label][1], self.step)


class SelectStage(Stage):
    """One selection round over one or more record sets (one global task); writes the kept rows."""

    kind = "select"

    def __init__(self, name: str, pool: tuple[str, ...], steps: list[StepSpec], first: bool):
        super().__init__(name, reads=pool, writes=(name,), task_name=name)
        self.steps = steps
        self.first = first

    def run(self, run: Run) -> dict[str, Any]:
        from curate.stages.select import select_stage

        spec = run.spec
        pool_sets, exclude, n_input = self.pool(run)
        (selection,), secs = run.map(self, select_stage, [dict(
            pool_sets=pool_sets, steps=self.steps, scorers=run.scorers, embed_key=run.embed_key, store_dir=run.store_dir, out_dir=str(run.out),
            n_input=n_input, seed=spec.seed, base_dir=str(spec.base), name=self.name, exclude_rows=exclude,
            prior_ledger=run.dataset.ledger_path if self.first else None, shard_size=spec.ingest.shard_size,
            embed_spec=spec.embed, torch_threads=torch_threads(spec))])
        run.selections.append(selection)
        run.sets[self.name] = selection.selected
        return {"stage": self.name, "tasks": 1, "rows": selection.n_selected, "seconds": secs,
                "warnings": [s["warning"] for s in selection.steps if s.get("warning")]}

    def pool(self, run: Run) -> tuple[list, list[int], int]:
        """(record sets, rows decided earlier and left out, the base of a fractional budget)."""
        if self.first:
            return [run.sets["input"]], [], run.dataset.n_input
        from curate.stages.ledger import rows_leaving_pool

        sets = [run.sets[name] for name in self.reads]
        exclude = rows_leaving_pool(run.rewrites) if run.spec.rewrite.pool == "derived" else []
        n = sum(s.n_rows for s in sets) - len(exclude)
        return sets, exclude, n

    def estimate(self, plan) -> dict[str, Any]:
        import json

        return {**self.describe(), "what": "; ".join(f"{s.method} {json.dumps(s.params, sort_keys=True)}" for s in self.steps) or "keep all"}


class RewriteStage(Stage):
    """One rewrite step over a record set (one task; its units are stored and resumed)."""

    kind = "rewrite"

    def __init__(self, step: StepSpec, source: str):
        super().__init__(f"rewrite:{step.label}", reads=(source,), writes=(step.label,), task_name=f"rewrite-{step.method}")
        self.step = step
        self.source = source

    def run(self, run: Run) -> dict[str, Any]:
        from curate.stages.rewrite import rewrite_stage

        spec = run.spec
        (ref,), secs = run.map(self, rewrite_stage, [dict(source=run.sets[self.source], step=self.step, context=rewrite_context(spec),
                                                          store_dir=str(spec.local_store),
                                                          out_dir=str(run.out), row_offset=run.next_row, shard_size=spec.ingest.shard_size,
                                                          max_error_rate=spec.runtime.max_error_rate)])
        run.rewrites.append(ref)
        run.sets[self.step.label] = ref.derived
        return {"stage": self.name, "tasks": 1, "rows": ref.n_derived, "computed_rows": ref.n_derived if ref.computed_units else 0,
                "seconds": secs, "rewrite": {k: v for k, v in ref.stats.items() if k != "units"}}

    def estimate(self, plan) -> dict[str, Any]:
        from curate.stages.rewrite import build_rewriter

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


def _keep_args(run: Run) -> dict[str, Any]:
    """The inputs' own columns to carry into the ledger and the exports (``inputs[i].keep_columns``);
    no argument at all when no input keeps one, so those tasks are called as before."""
    from curate.export.columns import keep_plan

    plan = keep_plan(run.spec.inputs, run.dataset.sources)
    return {} if plan is None else {"keep": plan, "sources": run.dataset.sources}


class LedgerStage(Stage):
    """Assemble the final ledgers (input rows, derived rows) and the lineage table; reconcile both."""

    kind = "ledger"

    def __init__(self, reads: tuple[str, ...]):
        super().__init__("ledger", reads=reads, writes=("ledger", "derived_ledger", "lineage"))

    def run(self, run: Run) -> dict[str, Any]:
        from curate.stages.ledger import ledger_stage

        (ref,), secs = run.map(self, ledger_stage, [dict(selections=run.selections, rewrites=run.rewrites, n_input=run.dataset.n_input,
                                                         input_set=run.sets["input"], pool=run.spec.rewrite.pool if run.spec.rewrite else "derived",
                                                         out_dir=str(run.out), **_keep_args(run))])
        run.results["ledger"] = ref
        return {"stage": "ledger", "tasks": 1, "rows": ref.n_input + ref.n_derived, "seconds": secs}


class ExportStage(Stage):
    """Write the final selection in every layout (a task each), then the trainer configs and manifest."""

    kind = "export"

    def __init__(self, selection: str):
        super().__init__("export", reads=(selection, "ledger"), writes=("export",))
        self.selection = selection

    def run(self, run: Run) -> dict[str, Any]:
        from curate.stages.export import export_finalize, export_layout

        spec = run.spec
        selection = run.selections[-1]
        ledger = run.results["ledger"]
        keys = {"config_hash": spec.fingerprint(), **{k: v["key"] for k, v in run.fingerprints.items()}}
        keep = _keep_args(run)
        files, secs = run.map(self, export_layout, [dict(selection=selection, spec=spec.export, layout=layout, out_dir=str(run.out),
                                                         **({"keep": keep["keep"]} if keep else {}))
                                                    for layout in spec.export.layouts], task="export-{layout}")
        files = [f for group in files for f in group]
        (export,), secs2 = run.map(self, export_finalize, [dict(selection=selection, ledger=ledger, spec=spec.export, files=files,
                                                                out_dir=str(run.out), keys=keys, derived=bool(run.rewrites),
                                                                flow=spec, sources=run.dataset.sources)],
                                   task="export-configs")
        run.results["export"] = export
        run.results["keys"] = keys
        return {"stage": "export", "tasks": len(spec.export.layouts) + 1, "rows": selection.n_selected, "seconds": secs + secs2}

    def estimate(self, plan) -> dict[str, Any]:
        spec = plan.spec
        return {**self.describe(), "what": ", ".join(f"{lay}/{t}" for lay in spec.export.layouts for t in spec.export.file_types)}


class ReportStage(Stage):
    """The run report (markdown + plots), from the run's own files (one task)."""

    kind = "report"

    def __init__(self):
        super().__init__("report", reads=("ledger", "export"), writes=("report",))

    def run(self, run: Run) -> dict[str, Any]:
        import time

        from curate.pipeline.summary import finish_summary, make_report, run_summary

        spec = run.spec
        selection = run.selections[-1]
        summary = finish_summary(run_summary(run), time.perf_counter() - run.started)
        (path,), secs = run.map(self, make_report, [dict(summary=summary, selection_path=selection.path, ledger_path=run.results["ledger"].path,
                                                        embed_key=run.embed_key, store_dir=run.store_dir, out_dir=str(run.out),
                                                        plots=spec.report.plots, max_points=spec.report.max_points, seed=spec.seed,
                                                        sample_rows=spec.report.sample_rows)])
        run.results["report"] = path
        return {"stage": "report", "tasks": 1, "seconds": secs}


def build_stages(spec: FlowSpec) -> list[Stage]:
    """The flow's stage list, in order (see the module docstring)."""
    stages: list[Stage] = [IngestStage()]

    def model_stages(recordset: str) -> list[Stage]:
        out: list[Stage] = [EmbedStage(recordset)] if spec.embed is not None else []
        return out + [ScoreStage(step, recordset) for step in spec.score]

    stages += model_stages("input")
    stages.append(SelectStage("select", ("input",), spec.select, first=True))
    last = "select"
    if spec.rewrite is not None:
        derived = []
        for step in spec.rewrite.steps:
            stages.append(RewriteStage(step, "select"))
            derived.append(step.label)
        for name in derived:
            stages += model_stages(name)
        pool = (("select",) + tuple(derived))
        stages.append(SelectStage("select-2", pool, spec.rewrite.select, first=False))
        last = "select-2"
    stages.append(LedgerStage(tuple(s.name for s in stages if isinstance(s, (SelectStage, RewriteStage)))))
    stages.append(ExportStage(last))
    if spec.report.enabled:
        stages.append(ReportStage())
    return stages
