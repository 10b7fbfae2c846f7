"""The stage contract and the state a run carries from stage to stage.

A flow is a list of :class:`Stage` objects built from its YAML (:func:`curate.pipeline.build.build_stages`);
each kind of stage lives, with its task functions, in its own file under :mod:`curate.stages`. Each
stage declares what it ``reads`` and ``writes``: record sets (``input``, ``select``, a rewrite step's
rows), files (``ledger``, ``export``, ``report``) and store collections (``embeddings``,
``score:<scorer>``). What it makes it hands to :meth:`Run.write` under one of its ``writes`` names; what
it needs it takes from :meth:`Run.read` / :meth:`Run.records` under one of its ``reads`` names — both
refuse an undeclared name, so the declarations are the whole data flow between stages. A stage also
says how its per-shard work is cached (:class:`ShardCache`), how to estimate its cost, and its rows
of the counts table; ``run`` does its work through the run's executor, one call per task (per shard
for model stages, once for global stages). :func:`~curate.pipeline.execute.execute`,
:func:`~curate.pipeline.plan.plan`, the executors and the report iterate that list; nobody else
names a stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curate.config import FlowSpec
from curate.manifests import RecordSetRef, WorkRef


@dataclass
class ShardCache:
    """How a model stage's per-shard task is cached: the store collection its results go to.

    ``key(call)`` is the task's content cache key (the stage kind, its op version, the shard's
    content hash, the store key and the store's identity); ``stale(call)`` is true when the shard's
    done-marker is missing, so a stale cache record never masks missing data."""

    kind: str  # the store collection (curate.store.COLLECTIONS): "scores" | "embeddings"
    label: str  # the stage family in the key: "score" | "embed"
    op_version: str

    def collection(self, call: dict[str, Any]):
        from curate.store import Store

        return Store(call["store_dir"]).collection(self.kind, call["key"])

    def key(self, call: dict[str, Any]) -> str:
        from curate.records import sha256_hex
        from curate.store import Store

        return sha256_hex(self.label, self.op_version, call["shard"].sha256, call["key"], Store(call["store_dir"]).identity())

    def stale(self, call: dict[str, Any]) -> bool:
        return not self.collection(call).done(call["shard"].sha256)


class UndeclaredOutput(KeyError):
    """A stage read or wrote an output it does not declare (a bug in the stage, not in the flow)."""


@dataclass
class Run:
    """What the stages of one run share: the spec, where it writes, the executor, the model keys, the
    previous run, and the outputs earlier stages declared (:meth:`write`), found by name (:meth:`read`)."""

    spec: FlowSpec
    executor: Any
    #: record sets by name (``input``, ``select``, a rewrite step's label, ``select-2``), in the order made
    sets: dict[str, RecordSetRef] = field(default_factory=dict)
    #: every stage output by name (its ``writes``): DatasetRef, SelectionRef, RewriteRef, LedgerRef, ExportRef, the report's path
    outputs: dict[str, Any] = field(default_factory=dict)
    scorers: dict[str, tuple[Any, str]] = field(default_factory=dict)  # label -> (step, store key)
    embed_key: str | None = None
    fingerprints: dict[str, dict] = field(default_factory=dict)
    #: the first free row number: input rows are 0 … n_input-1, each rewrite numbers its rows after every row made before
    next_row: int = 0
    summaries: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    previous: Path | None = None  # the previous run of this output folder (curate.history.keep_previous)
    diff: dict[str, Any] | None = None  # the changes since ``previous`` (curate.history.run_diff), computed once

    @property
    def out(self) -> Path:
        return self.spec.out

    @property
    def store_dir(self) -> str:
        return str(self.spec.store)

    def keys(self) -> dict[str, str]:
        """The run's keys: its config hash and every model's store key (the export manifest's ``keys``)."""
        return {"config_hash": self.spec.fingerprint(), **{k: v["key"] for k, v in self.fingerprints.items()}}

    def write(self, stage: Stage, name: str, ref: Any, records: RecordSetRef | None = None) -> None:
        """Hand over ``stage``'s output ``name`` (one of its ``writes``): ``ref`` its manifest, ``records``
        the record set it holds (found by later stages through :meth:`records`)."""
        if name not in stage.writes:
            raise UndeclaredOutput(f"stage {stage.name} writes '{name}', which it does not declare (writes={stage.writes})")
        self.outputs[name] = ref
        if records is not None:
            self.sets[name] = records

    def read(self, stage: Stage, name: str) -> Any:
        """The output ``name`` of an earlier stage, which ``stage`` declares in its ``reads``."""
        if name not in stage.reads:
            raise UndeclaredOutput(f"stage {stage.name} reads '{name}', which it does not declare (reads={stage.reads})")
        return self.outputs[name]

    def records(self, stage: Stage, name: str) -> RecordSetRef:
        """The record set ``name``, which ``stage`` declares in its ``reads``."""
        if name not in stage.reads:
            raise UndeclaredOutput(f"stage {stage.name} reads the record set '{name}', which it does not declare (reads={stage.reads})")
        return self.sets[name]

    def map(self, stage: Stage, fn: Callable, calls: list[dict[str, Any]], task: str | None = None) -> tuple[list[Any], float]:
        """Run ``fn`` once per call through the executor; returns (results, seconds)."""
        t0 = time.perf_counter()
        res = self.executor.map(stage, fn, calls, task or stage.task_name)
        return res, time.perf_counter() - t0


class Stage:
    """One step of a flow. Subclasses set ``kind`` and implement ``run`` and ``estimate``."""

    kind: ClassVar[str]
    #: per-shard cache of a model stage (None: the stage always runs)
    cache: ShardCache | None = None
    #: a dry run (curate plan) runs this stage for real, in a temporary folder, before it estimates the others
    runs_in_plan: ClassVar[bool] = False
    #: where this stage's rows go in the counts table: ingest 0, the stages that make or score rows 1, selection steps 2
    counts_order: ClassVar[int] = 1

    def __init__(self, name: str, reads: tuple[str, ...] = (), writes: tuple[str, ...] = (), task_name: str | None = None):
        self.name = name
        self.reads = reads
        self.writes = writes
        self.task_name = task_name or name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, reads={self.reads}, writes={self.writes})"

    def describe(self) -> dict[str, Any]:
        """One line of ``curate plan`` and of docs: name, kind, reads, writes, cache."""
        return {"stage": self.name, "kind": self.kind, "reads": list(self.reads), "writes": list(self.writes),
                "cache": "per shard, in the store" if self.cache else "none"}

    def run(self, run: Run) -> dict[str, Any]:
        """Do the work; return this stage's summary row (stage, tasks, rows, seconds, …)."""
        raise NotImplementedError

    def estimate(self, plan: Any) -> dict[str, Any]:
        """This stage's row of the dry run (what is cached, what would be computed, how long)."""
        return self.describe()

    def counts(self, row: dict[str, Any], run: Run) -> list[dict[str, Any]]:
        """This stage's rows of the counts table (the Prefect table artifact), from its summary ``row``:
        ``{"stage", "in", "out", "note"}`` each; none by default."""
        return []


def set_suffix(recordset: str) -> str:
    """The suffix of a model stage's name over ``recordset``: none for ``input``, else ``@<name>``."""
    return "" if recordset == "input" else f"@{recordset}"


def work_summary(stage: str, refs: list[WorkRef], seconds: float) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for r in refs:
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    return {"stage": stage, "tasks": len(refs), "rows": sum(r.n_rows for r in refs), "computed_rows": sum(r.computed_rows for r in refs),
            "computed_shards": sum(1 for r in refs if r.computed_rows), "statuses": statuses, "seconds": seconds,
            "warnings": [w for r in refs for w in r.warnings]}


def work_counts(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A model stage's row of the counts table, from its :func:`work_summary` row."""
    return [{"stage": row["stage"], "in": row["rows"], "out": row["rows"],
             "note": f"computed {row['computed_rows']}; statuses {row['statuses']}"}]


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


def model_resume(stage: Stage, calls: list[dict[str, Any]]) -> int:
    """Before a score or embed stage runs its shards: which are done (their marker is in the store) and
    how many rows of the others the store already holds (a killed run's committed batches, another
    flow's rows). Says so once, in one line, when any work was found done — e.g. ``score:superfiltering:
    4 of 6 shards already computed, and 256 rows of the other 2; computing 944 rows in 2 shards`` — and
    sets the stage's progress total. Returns the rows to compute."""
    from curate import progress
    from curate.recordset import read_shard

    cache = stage.cache
    n_done = rows_stored = rows_todo = shards_todo = 0
    has_parts: dict[str, bool] = {}
    for call in calls:
        shard = call["shard"]
        collection = cache.collection(call)
        if collection.done(shard.sha256):
            n_done += 1
            continue
        # rows stored without a marker: counted on a local store (its parts' id columns, which the shard
        # tasks read anyway); a URL store's parts would be fetched whole here, so its shards count as to do
        if not collection.remote and has_parts.setdefault(collection.key, bool(collection.parts())):
            stored = int(collection.stored(read_shard(shard, ["sample_id"]).column(0)).sum())
        else:  # nothing stored under this key yet (a first run): no need to read the shard's ids
            stored = 0
        rows_stored += stored
        rows_todo += shard.n_rows - stored
        shards_todo += shard.n_rows > stored
    progress.set_total(rows_todo)
    if n_done or rows_stored:
        def shards(n: int) -> str:
            return f"{n} shard{'s' if n != 1 else ''}"

        found = []
        if n_done:
            found.append(f"{n_done} of {len(calls)} shards already computed" if n_done < len(calls)
                         else f"all {n_done} shards already computed")
        if rows_stored:
            found.append(f"{rows_stored:,} rows of the {'other ' if n_done else ''}{shards(len(calls) - n_done)} already stored")
        todo = f"computing {rows_todo:,} rows in {shards(shards_todo)}" if rows_todo else "nothing to compute"
        progress.logger.info("%s: %s; %s", stage.name, ", and ".join(found), todo)
    return rows_todo
