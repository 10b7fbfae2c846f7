"""The stage contract and the state a run carries from stage to stage.

A flow is a list of :class:`Stage` objects built from its YAML (:func:`curate.pipeline.stages.build_stages`).
Each stage declares what it ``reads`` and ``writes`` (record-set names such as ``input`` or
``select``, store keys such as ``score:heuristic``), how its per-shard work is cached, and how to
estimate its cost; ``run`` does its work through the run's executor, one call per task (per shard
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
from curate.manifests import DatasetRef, RecordSetRef, RewriteRef, SelectionRef, WorkRef


@dataclass
class ShardCache:
    """How a model stage's per-shard task is cached: the store collection its results go to.

    ``key(call)`` is the task's content cache key (the stage kind, its op version, the shard's
    content hash, the store key and the store's identity); ``stale(call)`` is true when the shard's
    done-marker is missing, so a stale cache record never masks missing data."""

    kind: str  # the store collection: "scores" | "embeddings"
    label: str  # the stage family in the key: "score" | "embed"
    op_version: str

    def collection(self, call: dict[str, Any]):
        from curate.store import Store

        store = Store(call["store_dir"])
        return store.scores(call["key"]) if self.kind == "scores" else store.embeddings(call["key"])

    def key(self, call: dict[str, Any]) -> str:
        from curate.records import sha256_hex
        from curate.store import Store

        return sha256_hex(self.label, self.op_version, call["shard"].sha256, call["key"], Store(call["store_dir"]).identity())

    def stale(self, call: dict[str, Any]) -> bool:
        return not self.collection(call).done(call["shard"].sha256)


@dataclass
class Run:
    """What the stages of one run share: the spec, where it writes, and what earlier stages made."""

    spec: FlowSpec
    executor: Any
    sets: dict[str, RecordSetRef] = field(default_factory=dict)
    dataset: DatasetRef | None = None
    scorers: dict[str, tuple[Any, str]] = field(default_factory=dict)  # label -> (step, store key)
    embed_key: str | None = None
    fingerprints: dict[str, dict] = field(default_factory=dict)
    selections: list[SelectionRef] = field(default_factory=list)
    rewrites: list[RewriteRef] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)  # other stage outputs by name (ledger, export, report)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    previous: Path | None = None  # the previous run of this output folder (curate.history.keep_previous)

    @property
    def out(self) -> Path:
        return self.spec.out

    @property
    def store_dir(self) -> str:
        return str(self.spec.store)

    @property
    def next_row(self) -> int:
        """The first free row number: derived rows are numbered after every row made before them."""
        return (self.dataset.n_input if self.dataset else 0) + sum(rw.n_derived for rw in self.rewrites)

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


def work_summary(stage: str, refs: list[WorkRef], seconds: float) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for r in refs:
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    return {"stage": stage, "tasks": len(refs), "rows": sum(r.n_rows for r in refs), "computed_rows": sum(r.computed_rows for r in refs),
            "computed_shards": sum(1 for r in refs if r.computed_rows), "statuses": statuses, "seconds": seconds,
            "warnings": [w for r in refs for w in r.warnings]}


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
