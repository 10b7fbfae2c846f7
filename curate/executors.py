"""Executors run stage functions; the stages never know which one runs them.

- :class:`LocalExecutor` calls them in-process, one after another (``runtime.prefect: false``,
  ``curate run --no-prefect``, unit tests).
- :class:`PrefectExecutor` wraps each stage function in a Prefect task — one task run per
  (stage × shard), never per row — submits them to the flow's task runner and waits for every
  future. Model stages (score, embed) get a content cache key that exists only once the shard's
  done-marker is in the store, so a finished shard shows as ``Cached`` in the UI and a missing store
  is never masked by a stale Prefect cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curate.records import sha256_hex

#: bump when a stage's code changes what it returns (Prefect's TASK_SOURCE ignores called functions)
OP_VERSION = {"score": "1", "embed": "1"}

TASK_RUN_NAMES = {
    "ingest": "ingest-{input_index}",
    "shard": "shard",
    "embed": "embed-{shard.shard_id}",
    "score": "score-{step.method}-{shard.shard_id}",
    "select": "select",
    "export": "export-{layout}",
    "export-configs": "export-configs",
    "report": "report",
}


class LocalExecutor:
    """Run stages in this process, in order."""

    name = "local"

    def __init__(self) -> None:
        self.timings: list[dict[str, Any]] = []

    def map(self, stage: str, fn: Callable, calls: list[dict[str, Any]]) -> list[Any]:
        t0 = time.perf_counter()
        out = [fn(**kw) for kw in calls]
        self.timings.append({"stage": stage, "tasks": len(calls), "seconds": time.perf_counter() - t0})
        return out

    def call(self, stage: str, fn: Callable, **kwargs: Any) -> Any:
        return self.map(stage, fn, [kwargs])[0]

    def publish(self, summary: dict[str, Any], markdown: str, table: list[dict[str, Any]]) -> None:
        return None


def _done_key(kind: str):
    from curate.store import Store

    def key_fn(context, params: dict[str, Any]) -> str | None:
        shard, key, store_dir = params["shard"], params["key"], params["store_dir"]
        collection = getattr(Store(store_dir), kind)(key)
        if not collection.done(shard.sha256):
            return None  # not finished: run the task (it resumes from the store)
        return sha256_hex(kind, OP_VERSION["score" if kind == "scores" else "embed"], shard.sha256, key, str(Path(store_dir).resolve()))

    return key_fn


class PrefectExecutor(LocalExecutor):
    """Submit each call as a Prefect task run from inside a running flow."""

    name = "prefect"

    def __init__(self, result_dir: Path) -> None:
        super().__init__()
        self.result_dir = Path(result_dir)
        self._tasks: dict[str, Any] = {}

    def _task(self, stage: str, fn: Callable):
        if stage in self._tasks:
            return self._tasks[stage]
        from prefect import task
        from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy

        options: dict[str, Any] = {"name": stage, "task_run_name": TASK_RUN_NAMES.get(stage, stage), "retries": 0}
        if stage in ("score", "embed"):
            options.update(
                cache_policy=CacheKeyFnPolicy(cache_key_fn=_done_key("scores" if stage == "score" else "embeddings")),
                persist_result=True,
                result_serializer="json",
                result_storage=self.result_dir,  # a Path: local storage, no saved block needed
                cache_result_in_memory=False,
            )
        else:
            options.update(cache_policy=NO_CACHE, persist_result=False)
        self._tasks[stage] = task(fn, **options)
        return self._tasks[stage]

    def map(self, stage: str, fn: Callable, calls: list[dict[str, Any]]) -> list[Any]:
        t0 = time.perf_counter()
        t = self._task(stage, fn)
        from prefect.futures import wait

        futures = [t.submit(**kw) for kw in calls]
        wait(futures)  # every future resolves before we look at any, so none is left unfinished
        out = [f.result() for f in futures]  # raises the first failure
        self.timings.append({"stage": stage, "tasks": len(calls), "seconds": time.perf_counter() - t0})
        return out

    def publish(self, summary: dict[str, Any], markdown: str, table: list[dict[str, Any]]) -> None:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        from curate.config import slug

        s = slug(summary["flow"])
        create_markdown_artifact(key=f"curate-summary-{s}", markdown=markdown, description=f"curate run summary: {summary['flow']}")
        create_table_artifact(key=f"curate-counts-{s}", table=table, description="rows in and out of every stage")
