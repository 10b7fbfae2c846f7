"""The ingest cache: where a chunk of an input file is kept once read, and whether it is finished.

A chunk's entry is four files under the cache folder (the store's ``ingest/``, or a run's
``ingest/chunks`` without a store), in a sub-folder named by the key's first two hex digits:
``<key>.records.parquet``, ``<key>.quarantine.parquet``, ``<key>.vectors.parquet`` (only when the
input carries vectors) and ``<key>.json``, the done-marker written last. The key hashes the file's
bytes, how it is read and the code that reads it (:func:`reader_code`), so a file read before with
the same settings is not parsed again, and an upgrade that changes the reading code misses the cache.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import IngestSpec, InputSpec
from curate.progress import logger
from curate.records import canonical_json, sha256_hex

# The layout of a cache entry; what the code makes of a file is keyed by reader_code().
# 2: one entry per chunk of a file (records, quarantine, vectors, done-marker), rows numbered in the file.
INGEST_CACHE_VERSION = "2"

#: the modules of curate/ingest/ that turn a file into a chunk's records (hashed by reader_code, in this order)
READING_MODULES = ("cache.py", "chunks.py", "read.py", "vectors.py")


def file_key(spec: InputSpec, source: str, label: str, sha: str, ingest: IngestSpec) -> str:
    """What decides one file's records: its bytes, how it is read (format, fields, limit, embedding
    …), its source name and label (they go into every record), the conversation rules and the chunk
    size (it places the chunk boundaries). A sha256 hex string."""
    # keep_columns and license change only the ledger, the exports and the card: not what a file's records are
    how = spec.model_dump(mode="json", exclude={"path", "name", "hub", "revision", "keep_columns", "license"})
    return sha256_hex(canonical_json({"v": INGEST_CACHE_VERSION, "code": reader_code(), "file": sha, "source": source, "label": label,
                                      "read": how, "max_chars": ingest.max_chars, "chunk_rows": ingest.shard_size}))


@functools.cache
def reader_code() -> str:
    """sha256 of the code that turns a file into records (readers, converters, rules, ids, and the
    chunking, quarantine, vector and cache code of curate/ingest/): an upgrade that changes it misses
    the cache instead of mixing old records with new ones."""
    import curate.ingest.formats as f
    import curate.ingest.readers as r
    import curate.ingest.validate as v
    import curate.records as rec

    here = Path(__file__).parent
    return sha256_hex(*(Path(m.__file__).read_bytes() for m in (f, r, v, rec)), *((here / name).read_bytes() for name in READING_MODULES))


def chunk_paths(folder: str, key: str) -> tuple[str, str, str, str]:
    """A chunk's files under the cache ``folder``: (records, quarantine, vectors, done-marker) paths."""
    d = Path(folder) / key[:2]
    return (str(d / f"{key}.records.parquet"), str(d / f"{key}.quarantine.parquet"), str(d / f"{key}.vectors.parquet"),
            str(d / f"{key}.json"))


def chunk_done(paths: tuple[str, str, str, str]) -> dict | None:
    """A finished chunk's marker (None when the chunk must be read: no marker, or a file missing)."""
    rec, quar, vec, done = paths
    try:
        meta = json.loads(Path(done).read_text())
    except (OSError, ValueError):
        return None
    if not (Path(rec).exists() and Path(quar).exists()) or (meta.get("n_vectors", 0) and not Path(vec).exists()):
        return None
    for path in (rec, quar, vec):  # a file cut short (a kill, a full disk) has no readable footer: read the chunk again
        if Path(path).exists():
            try:
                pq.read_metadata(path)
            except (OSError, pa.ArrowException):
                logger.warning("ingest cache: %s is damaged; the chunk is read again", path)
                return None
    return meta


def link_parts(folder: Path, paths: list[str]) -> None:
    """``folder``/part-NNNNN.parquet for each of ``paths``, in order (hard links; copies across devices)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, p in enumerate(paths):
        dest = folder / f"part-{i:05d}.parquet"
        try:
            os.link(p, dest)
        except OSError:
            shutil.copyfile(p, dest)
