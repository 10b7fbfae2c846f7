"""``plan``: the dry run behind ``curate plan`` — the flow's stage list with what each would do."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

from curate.config import FlowSpec
from curate.executors import LocalExecutor
from curate.pipeline.build import build_stages, model_keys
from curate.pipeline.stage import Run, Stage


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


class Plan:
    """What stages see in a dry run: the ingested input (in a temp dir), the store, the model keys."""

    def __init__(self, run: Run, warmup: bool, warmup_rows: int):
        self.run = run
        self.spec = run.spec
        self.warmup = warmup
        self.warmup_rows = warmup_rows
        self._ids = None

    def ids(self):
        """The input set's sample_ids (an Arrow column: no Python object per row)."""
        if self._ids is None:
            from curate.recordset import read_records

            self._ids = read_records(self.run.sets["input"], ["sample_id"]).column("sample_id")
        return self._ids

    def records(self, mask) -> list[dict]:
        """The input rows where ``mask`` (bool per row) is true, as dicts (the warm-up's rows to compute)."""
        import pyarrow as pa

        from curate.recordset import read_records

        return read_records(self.run.sets["input"]).filter(pa.array(mask)).to_pylist()

    def model_stage(self, stage: Stage, key: str, what: str,
                    measure: Callable[[], tuple[Callable, int, Callable | None]]) -> dict[str, Any]:
        """Cached and to-compute rows of a model stage (one with a per-shard ``cache``: its store
        collection), and its estimated time: ``measure()`` loads the model and gives (the function to
        time on a list of records, the warm-up rows, the cost of a list of records in tokens or None to
        count rows)."""
        from curate.store import Store

        row = {**stage.describe(), "what": what, "key": key[:12]}
        recordset = stage.reads[0]
        if recordset not in self.run.sets:
            return {**row, "to_compute": None, "note": f"rows of '{recordset}' exist only after the rewrite runs"}
        stored = Store(self.spec.store).collection(stage.cache.kind, key).stored(self.ids())
        n_todo = int((~stored).sum())
        row.update(shards=len(self.run.sets[recordset].shards), cached_rows=len(stored) - n_todo, to_compute=n_todo)
        if self.warmup and n_todo:
            todo = self.records(~stored)
            fn, warmup_rows, cost = measure()
            row.update(_estimate(fn, todo, warmup_rows, cost or len), unit="tokens" if cost else "rows")
        return row


def plan(spec: FlowSpec, warmup: bool = True, warmup_rows: int = 8) -> dict[str, Any]:
    """Dry run: read the inputs (into a temp dir), count rows and tokens, list every stage with what
    the store already holds and, with ``warmup``, each model stage's time estimated from its token
    counts and a short measured warm-up (this loads the models). Writes nothing under output_dir."""
    import pyarrow.compute as pc

    from curate.config import check_flow
    from curate.recordset import read_records
    from curate.scorers.heuristic import TOKEN

    check_flow(spec)  # what the run checks before ingest: the scores the steps read, the output folder

    with tempfile.TemporaryDirectory(prefix="curate-plan-") as tmp:
        run = Run(spec=spec.model_copy(update={"output_dir": tmp}), executor=LocalExecutor())  # flow_path is copied too
        run.scorers, run.embed_key, run.fingerprints = model_keys(spec)
        stages = build_stages(spec)
        for stage in stages:
            if stage.runs_in_plan:
                stage.run(run)
        dataset = run.outputs["input"]
        contents = pc.list_flatten(
            read_records(dataset.records, ["messages"]).column("messages")).combine_chunks().field("content").to_pylist()
        n_tokens = sum(len(TOKEN.findall(c or "")) for c in contents)
        p = Plan(run, warmup, warmup_rows)
        stages = [s.estimate(p) for s in stages if not s.runs_in_plan]
        return {
            "flow": spec.name,
            "output_dir": str(spec.out),
            "store_dir": str(spec.store),
            "inputs": [r.model_dump(include={"source", "format", "files", "n_rows", "n_valid", "n_quarantined"}) for r in dataset.sources],
            "n_input": dataset.n_input,
            "n_valid": dataset.n_valid,
            "n_quarantined": dataset.n_quarantined,
            "n_duplicates": dataset.n_duplicates,
            "n_shards": len(dataset.shards),
            "tokens": n_tokens,
            "stages": stages,
            "estimate_s": round(sum(s.get("estimate_s", 0.0) for s in stages), 1),
        }
