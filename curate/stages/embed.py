"""Embed: one task per shard; unit vectors go to the store, keyed by (sample_id, embedder key)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from curate.config import EmbedSpec
from curate.embed import build_embedder, embed_text
from curate.manifests import ShardRef, WorkRef
from curate.stages.shardwork import run_shard
from curate.store import Store


def embedding_table(ids: list[str], vectors: np.ndarray, statuses: list[str]) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(vectors.astype(np.float32, copy=False).reshape(-1))
    return pa.table(
        {
            "sample_id": pa.array(ids, pa.string()),
            "status": pa.array(statuses, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


def embed_shard(shard: ShardRef, spec: EmbedSpec, key: str, store_dir: str, torch_threads: int | None = None) -> WorkRef:
    embedder = build_embedder(spec, torch_threads)
    collection = Store(store_dir).embeddings(key)

    def compute(records: list[dict]) -> pa.Table:
        texts = [embed_text(r, spec.text) for r in records]
        ids = [r["sample_id"] for r in records]
        try:
            vecs = embedder.embed(texts)
            statuses = ["ok"] * len(texts)
        except Exception:  # isolate the failing row(s); the others keep their vectors
            vecs = np.full((len(texts), embedder.dim), np.nan, dtype=np.float32)
            statuses = []
            for i, text in enumerate(texts):
                try:
                    vecs[i] = embedder.embed([text])[0]
                    statuses.append("ok")
                except Exception as exc:
                    statuses.append(f"error:{type(exc).__name__}")
        return embedding_table(ids, vecs, statuses)

    def by_length(records: list[dict]) -> list[int]:
        lengths = [len(embed_text(r, spec.text)) for r in records]
        return sorted(range(len(records)), key=lambda i: (-lengths[i], i))

    collection.describe(embedder.fingerprint())
    return run_shard("embed", spec.model, collection, shard, compute, chunk_rows=spec.batch_size * 8, order=by_length)
