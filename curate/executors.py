"""Executors run a stage's calls; they never know which stage they run.

- :class:`LocalExecutor` calls them in-process, one after another (``runtime.prefect: false``,
  ``curate run --no-prefect``, unit tests).
- :class:`PrefectExecutor` wraps each stage function in a Prefect task — one task run per call
  (per shard for model stages, never per row) — submits them to the flow's task runner and waits
  for every future. A stage with a ``cache`` (score, embed) gets a content cache key per call, so a
  finished shard shows as ``Cached`` in the UI; a shard whose done-marker is missing from the store
  always runs, so a stale Prefect cache record never masks missing data.

  With a cluster runner (``runtime.task_runner: dask | ray``) only the per-shard calls of cached
  stages go to the flow's task runner (the cluster's workers); the calls of stages that run once
  (ingest, select, ledger, export, report, rewrite) go to ``local_runner``, a thread pool in the
  flow's process. Results come back in the order of ``calls``, never in completion order. On Ray,
  a call whose model is placed on an explicit CUDA device asks Ray for one GPU (:func:`task_gpus`):
  Ray hides the GPUs from tasks that did not ask for one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def task_gpus(call: dict[str, Any]) -> int:
    """1 when a call runs a model on an explicit CUDA device, else 0.

    Looks at the call's arguments, not at the stage: an argument with a ``device`` (the embed
    spec) or with ``params["device"]`` (a scorer's step) that starts with ``cuda``. ``auto`` asks
    for nothing: it means "a GPU if this worker sees one"."""
    for value in call.values():
        device = getattr(value, "device", None)
        if device is None and isinstance(getattr(value, "params", None), dict):
            device = value.params.get("device")
        if isinstance(device, str) and device.startswith("cuda"):
            return 1
    return 0


def result_storage(result_dir: Any) -> Any:
    """Prefect's result storage for the cached task records: a local path as it is (no saved block
    needed); for a URL store, a ``RemoteFileSystem`` block over that URL (fsspec), saved to the flow's
    Prefect API as ``curate-results-<hash of the URL>`` (Prefect accepts only saved blocks there)."""
    from curate.io import is_url

    if not is_url(result_dir):
        return Path(result_dir)
    from prefect.filesystems import RemoteFileSystem

    from curate.records import sha256_hex

    block = RemoteFileSystem(basepath=str(result_dir))
    block.save(f"curate-results-{sha256_hex(str(result_dir))[:16]}", overwrite=True)
    return block


class LocalExecutor:
    """Run calls in this process, in order."""

    name = "local"

    def map(self, stage: Any, fn: Callable, calls: list[dict[str, Any]], task_name: str | None = None) -> list[Any]:
        return [fn(**kw) for kw in calls]

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name}

    def publish(self, summary: dict[str, Any], markdown: str, table: list[dict[str, Any]]) -> None:
        return None


class PrefectExecutor(LocalExecutor):
    """Submit each call as a Prefect task run from inside a running flow."""

    name = "prefect"

    def __init__(self, result_dir: Path, local_runner: Any = None) -> None:
        self.result_dir = result_dir  # a Path, or a UPath for a URL store (see result_storage)
        self.local_runner = local_runner  # a started Prefect task runner for stages without a shard cache
        self._tasks: dict[tuple[str, str, bool], Any] = {}
        self._storage: Any = None  # result_storage(result_dir), made on first use

    def _result_storage(self) -> Any:
        if self._storage is None:
            self._storage = result_storage(self.result_dir)
        return self._storage

    def _task(self, stage: Any, fn: Callable, task_name: str, refresh: bool = False):
        ident = (stage.name, task_name, refresh)
        if ident in self._tasks:
            return self._tasks[ident]
        from prefect import task
        from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy

        options: dict[str, Any] = {"name": stage.name, "task_run_name": task_name, "retries": 0}
        if stage.cache is not None:
            cache = stage.cache
            options.update(
                cache_policy=CacheKeyFnPolicy(cache_key_fn=lambda context, params: cache.key(params)),
                refresh_cache=refresh,
                persist_result=True,
                result_serializer="json",
                result_storage=self._result_storage(),
                cache_result_in_memory=False,
            )
        else:
            options.update(cache_policy=NO_CACHE, persist_result=False)
        self._tasks[ident] = task(fn, **options)
        return self._tasks[ident]

    def map(self, stage: Any, fn: Callable, calls: list[dict[str, Any]], task_name: str | None = None) -> list[Any]:
        from prefect.futures import wait

        task_name = task_name or stage.name
        # a model-stage shard whose done-marker is missing always runs (and rewrites its cache record)
        if stage.cache is None and self.local_runner is not None:
            task = self._task(stage, fn, task_name)
            futures = [self.local_runner.submit(task, parameters=kw) for kw in calls]
        else:
            futures = [self._submit(self._task(stage, fn, task_name, stage.cache is not None and stage.cache.stale(kw)), kw)
                       for kw in calls]
        wait(futures)  # every future resolves before we look at any, so none is left unfinished
        results = [f.result() for f in futures]  # raises the first failure
        # a Cached task replays the manifest of the run that computed it; in this run it computed nothing
        return [r.model_copy(update={"computed_rows": 0, "seconds": 0.0}) if f.state.name == "Cached" else r
                for f, r in zip(futures, results)]

    def _submit(self, task: Any, call: dict[str, Any]) -> Any:
        """Submit to the flow's task runner; on Ray, with a GPU for a call that needs one."""
        gpus = task_gpus(call) if self.local_runner is not None else 0
        if gpus:
            from prefect.context import FlowRunContext

            ctx = FlowRunContext.get()
            if ctx is not None and type(ctx.task_runner).__name__ == "RayTaskRunner":
                from prefect_ray.context import remote_options

                with remote_options(num_gpus=gpus):
                    return task.submit(**call)
        return task.submit(**call)

    def describe(self) -> dict[str, Any]:
        from prefect.runtime import flow_run
        from prefect.settings import PREFECT_API_URL

        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        runner = type(ctx.task_runner).__name__ if ctx is not None and ctx.task_runner is not None else None
        return {"executor": self.name, "flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "api_url": PREFECT_API_URL.value(),
                "task_runner": runner}

    def publish(self, summary: dict[str, Any], markdown: str, table: list[dict[str, Any]]) -> None:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        from curate.config import slug

        s = slug(summary["flow"])
        create_markdown_artifact(key=f"curate-summary-{s}", markdown=markdown, description=f"curate run summary: {summary['flow']}")
        create_table_artifact(key=f"curate-counts-{s}", table=table, description="rows in and out of every stage")
        if summary.get("report"):  # the self-contained HTML report with the plots (image artifacts need a public URL)
            from prefect.artifacts import create_link_artifact

            html = Path(summary["report"]).with_suffix(".html")
            if html.exists():
                create_link_artifact(key=f"curate-report-{s}", link=html.resolve().as_uri(), link_text=f"report.html ({html})",
                                     description="the run report: plots, score histograms, embedding maps, the diff")
