"""Executors run stage functions; the stages never know which one runs them.

- :class:`LocalExecutor` calls them in-process, one after another (``runtime.prefect: false``,
  ``curate run --no-prefect``, unit tests).
- :class:`PrefectExecutor` wraps each stage function in a Prefect task — one task run per
  (stage × shard), never per row — submits them to the flow's task runner and waits for every
  future. Model stages (score, embed) get a content cache key (shard hash, store key, store
  identity), so a finished shard shows as ``Cached`` in the UI; a shard whose done-marker is missing
  from the store always runs, so a stale Prefect cache record never masks missing data.
"""

from __future__ import annotations

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

    def map(self, stage: str, fn: Callable, calls: list[dict[str, Any]]) -> list[Any]:
        return [fn(**kw) for kw in calls]

    def call(self, stage: str, fn: Callable, **kwargs: Any) -> Any:
        return self.map(stage, fn, [kwargs])[0]

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name}

    def publish(self, summary: dict[str, Any], markdown: str, table: list[dict[str, Any]]) -> None:
        return None


def _content_key(kind: str):
    """Cache key of a model-stage task: the stage, its op version, the shard's content hash, the
    store key of the scorer/embedder and the identity of the store (a new store never hits an old
    cache record)."""
    from curate.store import Store

    def key_fn(context, params: dict[str, Any]) -> str:
        store = Store(params["store_dir"])
        return sha256_hex(kind, OP_VERSION[kind], params["shard"].sha256, params["key"], store.identity())

    return key_fn


class PrefectExecutor(LocalExecutor):
    """Submit each call as a Prefect task run from inside a running flow."""

    name = "prefect"

    def __init__(self, result_dir: Path) -> None:
        self.result_dir = Path(result_dir)
        self._tasks: dict[tuple[str, bool], Any] = {}

    def _task(self, stage: str, fn: Callable, refresh: bool = False):
        if (stage, refresh) in self._tasks:
            return self._tasks[(stage, refresh)]
        from prefect import task
        from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy

        options: dict[str, Any] = {"name": stage, "task_run_name": TASK_RUN_NAMES.get(stage, stage), "retries": 0}
        if stage in OP_VERSION:
            options.update(
                cache_policy=CacheKeyFnPolicy(cache_key_fn=_content_key(stage)),
                refresh_cache=refresh,
                persist_result=True,
                result_serializer="json",
                result_storage=self.result_dir,  # a Path: local storage, no saved block needed
                cache_result_in_memory=False,
            )
        else:
            options.update(cache_policy=NO_CACHE, persist_result=False)
        self._tasks[(stage, refresh)] = task(fn, **options)
        return self._tasks[(stage, refresh)]

    def _refresh(self, stage: str, kw: dict[str, Any]) -> bool:
        """A model-stage shard whose done-marker is missing always runs (and rewrites its cache record)."""
        if stage not in OP_VERSION:
            return False
        from curate.store import Store

        store = Store(kw["store_dir"])
        collection = store.scores(kw["key"]) if stage == "score" else store.embeddings(kw["key"])
        return not collection.done(kw["shard"].sha256)

    def map(self, stage: str, fn: Callable, calls: list[dict[str, Any]]) -> list[Any]:
        from prefect.futures import wait

        futures = [self._task(stage, fn, self._refresh(stage, kw)).submit(**kw) for kw in calls]
        wait(futures)  # every future resolves before we look at any, so none is left unfinished
        results = [f.result() for f in futures]  # raises the first failure
        # a Cached task replays the manifest of the run that computed it; in this run it computed nothing
        return [r.model_copy(update={"computed_rows": 0, "seconds": 0.0}) if f.state.name == "Cached" else r
                for f, r in zip(futures, results)]

    def describe(self) -> dict[str, Any]:
        from prefect.runtime import flow_run
        from prefect.settings import PREFECT_API_URL

        return {"executor": self.name, "flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "api_url": PREFECT_API_URL.value()}

    def publish(self, summary: dict[str, Any], markdown: str, table: list[dict[str, Any]]) -> None:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        from curate.config import slug

        s = slug(summary["flow"])
        create_markdown_artifact(key=f"curate-summary-{s}", markdown=markdown, description=f"curate run summary: {summary['flow']}")
        create_table_artifact(key=f"curate-counts-{s}", table=table, description="rows in and out of every stage")
