"""Precomputed embeddings: vectors that come with the inputs (``embed: {method: precomputed, model: <producer>}``).

Ingest hands each input's vectors (a column of its rows, or a side file keyed by an id field) to
:func:`store_vectors`, which writes them to the store under this embedder's key, in the dtype of
``embed.storage``, L2-normalised when ``embed.normalize``; the producer's name is in the collection's
``fingerprint.json``. The embed stage then computes nothing: it counts, per shard, the rows that have
a stored vector (``ok``) and the rows that have none (``error:no_vector``); the embedding matrix
gives the latter that status, so selection quarantines them.

A vector that is not finite, or is all zeros when ``normalize`` is on, is stored with status
``error:bad_vector`` (kept, so the row is quarantined with a reason rather than silently missing).
The first vector stored for a ``sample_id`` wins: a row whose id is already in the collection is not
written again (ids are content hashes, and the key names the producer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.embed.base import Embedder
from curate.embed.spec import EmbedSpec
from curate.store import BAD_VECTOR

VERSION = "1.0"


class PrecomputedEmbedder(Embedder):
    """Vectors made elsewhere; ``embed.model`` is the producer's name. Computes nothing itself."""

    method = "precomputed"
    version = VERSION

    def fingerprint(self) -> dict[str, Any]:
        return {
            "method": "precomputed",
            "embedder_version": VERSION,
            "producer": self.spec.model,
            "normalize": self.spec.normalize,
            **self.storage_fingerprint(),
        }

    @property
    def dim(self) -> int:
        raise RuntimeError("a precomputed embedder's dimension comes from the stored vectors (curate.embed.precomputed.stored_dim)")

    def embed(self, texts: list[str]) -> np.ndarray:
        raise RuntimeError(f"embed.method 'precomputed' computes no vectors: give an input `embedding: {{producer: {self.spec.model}}}`")


def stored_dim(collection) -> int | None:
    """The vector length of a collection's stored rows, None when empty: from ``vector_dim.json``
    (written with the first vectors), else from the first part's first row."""
    import pyarrow.parquet as pq

    from curate.store import noted_dim

    noted = noted_dim(collection)
    if noted is not None:
        return noted
    parts = collection.parts()
    if not parts:
        return None
    with parts[0].open("rb") as f:
        first = next(pq.ParquetFile(f).iter_batches(batch_size=1, columns=["vector"])).column(0)
    return int(pc.list_value_length(first)[0].as_py())


def store_vectors(store_dir: str, embed: EmbedSpec, sample_ids: list[str] | pa.Array, vectors: np.ndarray) -> None:
    """Write ``vectors`` (n, dim) for ``sample_ids`` to ``Store(store_dir).embeddings(key)``, where
    ``key`` is the key of ``embed`` (method ``precomputed``, ``model`` = the producer).

    Rows get status ``ok`` (``error:bad_vector`` for a non-finite vector, or a zero one when
    normalising), dtype per ``embed.storage``. Ids already stored, and repeats of an id within the
    call, are skipped (the first vector wins). A vector length that differs from what the collection
    already holds is an error.
    """
    from curate.embed import build_embedder
    from curate.errors import CurateError
    from curate.store import Store, embedding_table, first_occurrence, string_array

    if embed.method != "precomputed":
        raise ValueError(f"store_vectors needs embed.method 'precomputed', got '{embed.method}'")
    ids = string_array(sample_ids)
    vecs = np.asarray(vectors)
    if vecs.ndim != 2 or vecs.shape[0] != len(ids):
        raise ValueError(f"vectors must be (n, dim) with n = {len(ids)} ids, got shape {vecs.shape}")
    embedder = build_embedder(embed)
    collection = Store(store_dir).embeddings(embedder.key)
    dim = stored_dim(collection)
    if dim is not None and dim != vecs.shape[1]:
        raise CurateError(f"precomputed embeddings of '{embed.model}': vectors of length {vecs.shape[1]}, "
                          f"but the store already holds vectors of length {dim} for this producer")
    collection.describe(embedder.fingerprint())
    if not len(ids):
        return
    # first occurrence of each id, and only ids not stored yet
    keep = np.flatnonzero(first_occurrence(ids) & ~collection.stored(ids))
    if not len(keep):
        return
    v = vecs[keep].astype(np.float32)
    finite = np.isfinite(v).all(axis=1)
    if embed.normalize:
        norms = np.linalg.norm(np.where(finite[:, None], v, 0.0), axis=1)
        good = finite & (norms > 0)
        v[good] /= norms[good, None]
    else:
        good = finite
    v[~good] = np.nan
    statuses = np.where(good, "ok", BAD_VECTOR).tolist()
    collection.write(embedding_table(ids.take(pa.array(keep)), v, statuses, storage=embed.storage))
    if dim is None:
        from curate.store import note_dim

        note_dim(collection, vecs.shape[1])
