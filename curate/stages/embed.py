"""Embed: one task per shard; unit vectors go to the store, keyed by (sample_id, embedder key).

Vectors are stored as ``embed.storage`` says (float32, or float16: half the disk and the memory
traffic of large-pool selection; the dtype is in the store key). With ``embed.method: precomputed``
the vectors came with the inputs (written at ingest by :func:`curate.embed.precomputed.store_vectors`)
and this stage only counts, per shard, the rows with a stored vector and those without
(``error:no_vector``), which selection quarantines.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pyarrow as pa

from curate.config import EmbedSpec
from curate.embed import build_embedder, embed_text
from curate.errors import CurateError
from curate.manifests import ShardRef, WorkRef
from curate.pipeline.context import torch_threads
from curate.pipeline.stage import Run, ShardCache, Stage, check_error_budget, model_resume, set_suffix, work_counts, work_summary
from curate.stages.shardwork import run_shard
from curate.store import NO_VECTOR, Store, embedding_table, first_occurrence


def embed_shard(shard: ShardRef, spec: EmbedSpec, key: str, store_dir: str, torch_threads: int | None = None,
                commit_s: float | None = None) -> WorkRef:
    embedder = build_embedder(spec, torch_threads)
    if spec.method == "precomputed":
        return _precomputed_shard(shard, spec, Store(store_dir).embeddings(key))
    if embedder.key != key:  # the orchestrator and the task must agree on what is being computed
        raise RuntimeError(f"embedder key mismatch: {embedder.key} != {key} (this worker runs embed.backend "
                           f"{embedder.spec.backend!r}: {embedder.backend_reason})")
    collection = Store(store_dir).embeddings(key)

    def compute(records: list[dict]) -> pa.Table:
        texts = [embed_text(r, spec.text) for r in records]
        ids = [r["sample_id"] for r in records]
        try:
            vecs = embedder.embed(texts)
            statuses = ["ok"] * len(texts)
        except CurateError:  # the embedder cannot run at all (a missing package, a failed export): the stage stops with it
            raise
        except Exception:  # isolate the failing row(s); the others keep their vectors
            vecs = np.full((len(texts), embedder.dim), np.nan, dtype=np.float32)
            statuses = []
            for i, text in enumerate(texts):
                try:
                    vecs[i] = embedder.embed([text])[0]
                    statuses.append("ok")
                except Exception as exc:
                    statuses.append(f"error:{type(exc).__name__}")
        return embedding_table(ids, vecs, statuses, storage=spec.storage)

    def by_length(records: list[dict]) -> list[int]:
        lengths = [len(embed_text(r, spec.text)) for r in records]
        return sorted(range(len(records)), key=lambda i: (-lengths[i], i))

    collection.describe(embedder.fingerprint())
    return run_shard("embed", spec.model, collection, shard, compute, chunk_rows=spec.batch_size * 8, order=by_length,
                     commit_s=commit_s)


def _precomputed_shard(shard: ShardRef, spec: EmbedSpec, collection) -> WorkRef:
    """Count the shard's rows with and without a stored vector; nothing is computed or written (a
    later ingest may still bring the missing vectors, so no done-marker and no error rows are stored)."""
    import time

    import pyarrow.compute as pc

    from curate.embed.precomputed import stored_dim
    from curate.errors import CurateError
    from curate.recordset import read_shard

    t0 = time.perf_counter()
    if stored_dim(collection) is None:
        raise CurateError(f"embed.method 'precomputed' (producer '{spec.model}'): the store holds no vectors for this producer; "
                          f"give an input `embedding: {{producer: {spec.model}, field: …}}` (or `path:` a side file of vectors)")
    ids = read_shard(shard, ["sample_id"]).column(0).combine_chunks()
    stored = collection.stored(ids)  # the store's id index: each id once, whatever parts repeat it
    failed = _not_ok(collection)  # the few stored rows whose status is not ok (first part wins)
    hit = pc.index_in(ids, value_set=failed.column("sample_id")).to_numpy(zero_copy_only=False)
    bad = ~np.isnan(hit) if hit.dtype.kind == "f" else np.ones(len(hit), dtype=bool)
    statuses: dict[str, int] = {}
    n_ok = int((stored & ~bad).sum())
    if n_ok:
        statuses["ok"] = n_ok
    for status in failed.column("status").take(pa.array(hit[bad].astype(np.int64))).to_pylist():
        statuses[status] = statuses.get(status, 0) + 1
    missing = int((~stored).sum())
    if missing:
        statuses[NO_VECTOR] = statuses.get(NO_VECTOR, 0) + missing
    return WorkRef(stage="embed", name=spec.model, key=collection.key, shard_id=shard.shard_id, shard_sha256=shard.sha256,
                   n_rows=shard.n_rows, computed_rows=0, statuses=dict(sorted(statuses.items())),
                   seconds=round(time.perf_counter() - t0, 3))


_NOT_OK: dict[tuple, pa.Table] = {}
_NOT_OK_LOCK = threading.Lock()


def _not_ok(collection) -> pa.Table:
    """(sample_id, status) of the collection's stored rows whose status is not ``ok``, the first row of
    an id only; read once per process for a given list of parts (a shard's count reads no part)."""
    import pyarrow.compute as pc

    parts = tuple(collection.parts())
    key = (str(collection.dir), parts)
    with _NOT_OK_LOCK:  # shards of one stage may run on several threads
        if key not in _NOT_OK:
            # a damaged part is set aside
            tables = [t for p in parts if (t := collection.read_part(p, columns=["sample_id", "status"])) is not None]
            t = pa.concat_tables(tables) if tables else pa.table({"sample_id": pa.array([], pa.string()),
                                                                 "status": pa.array([], pa.string())})
            keep = first_occurrence(t.column("sample_id")) & pc.fill_null(pc.not_equal(t.column("status"), "ok"),
                                                                          False).to_numpy(zero_copy_only=False)
            _NOT_OK.clear()
            _NOT_OK[key] = t.filter(pa.array(keep)).combine_chunks()
        return _NOT_OK[key]


# -- the stage ---------------------------------------------------------------------------------------

#: bump when embed_shard's code changes what it returns (Prefect's task cache ignores called code)
EMBED_CACHE = ShardCache("embeddings", "embed", "1")


class EmbedStage(Stage):
    """Embed one record set's rows, a task per shard; vectors go to the store."""

    kind = "embed"
    cache = EMBED_CACHE

    def __init__(self, recordset: str):
        super().__init__(f"embed{set_suffix(recordset)}", reads=(recordset,), writes=("embeddings",),
                         task_name="embed-{shard.shard_id}" if recordset == "input" else f"embed-{recordset}-{{shard.shard_id}}")
        self.recordset = recordset

    def run(self, run: Run) -> dict[str, Any]:
        from curate.recordset import shared_shards

        spec = run.spec
        Store(run.store_dir).embeddings(run.embed_key).describe({k: v for k, v in run.fingerprints["embed"].items() if k != "key"})
        shards = shared_shards(run.records(self, self.recordset).shards, run.store_dir)
        embed_spec = spec.embed
        if embed_spec.method != "precomputed":  # embed.backend: auto resolved here, once: every worker runs what the key says
            embed_spec = build_embedder(spec.embed, torch_threads(spec)).spec
        calls = [dict(shard=s, spec=embed_spec, key=run.embed_key, store_dir=run.store_dir, torch_threads=torch_threads(spec),
                      commit_s=spec.runtime.commit_interval_s) for s in shards]
        if spec.embed.method != "precomputed":  # precomputed vectors came with ingest: nothing is computed here
            model_resume(self, calls)
        work, secs = run.map(self, embed_shard, calls)
        check_error_budget(self.name, work, spec.runtime.max_error_rate)
        return work_summary(self.name, work, secs)

    def estimate(self, plan) -> dict[str, Any]:
        def measure():
            embedder = build_embedder(plan.spec.embed, torch_threads(plan.spec))
            return embedder.embed_records, max(plan.warmup_rows, 32), None

        return plan.model_stage(self, plan.run.embed_key, plan.spec.embed.model, measure)

    def counts(self, row: dict[str, Any], run: Run) -> list[dict[str, Any]]:
        return work_counts(row)
