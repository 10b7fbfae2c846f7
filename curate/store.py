"""The content-addressed store for scores and embeddings.

Layout (``store_dir`` in the flow, shared by every run of a project)::

    <store>/scores/<scorer_key>/fingerprint.json      what the key means (method, params, model…)
    <store>/scores/<scorer_key>/part-<hash>.parquet   long rows: sample_id, variant, score, status…
    <store>/scores/<scorer_key>/done/<shard>.json     shard marker: every row of that shard is stored
    <store>/embeddings/<embedder_key>/…               the same, with a ``vector`` column (:func:`embedding_table`)
    <store>/embeddings/<embedder_key>/matrix/…        assembled matrices selection memory-maps (:func:`matrix_dir`)
    <store>/embeddings/<embedder_key>/vector_dim.json a precomputed producer's vector length (:func:`noted_dim`)
    <store>/rewrites/<rewrite_key>/unit-<hash>.json   a rewrite step's finished units (see curate.stages.rewrite)
    <store>/calls/…                                   the LLM call cache (:func:`calls_dir`, curate.lm.calls)
    <store>/requests/…                                API scorers' response cache (:func:`request_cache`)
    <store>/ingest/…                                  input chunks read before (:func:`ingest_cache_dir`)
    <store>/aide/personas/<key>.json                  AIDE's persona pools (:func:`persona_cache`)
    <store>/shards/<shard sha256>.parquet             a URL store's copies of the shards (:func:`shard_copies_dir`)
    <store>/prefect-results/…                         Prefect's task results (:func:`prefect_results_dir`)
    <store>/store_id                                  the store's identity (:meth:`Store.identity`)

Every ``<store>/…`` path and every part schema (:data:`SCORE_SCHEMA`, :func:`embedding_table`,
:data:`NO_VECTOR`) is named here, and only here: the stages, record sets, flows and plug-ins ask.

Keys are sha256 hashes of the fingerprint, rows are keyed by ``sample_id`` (a hash of the content),
so nothing already computed is computed again, whatever run, file or row order it came from. Parts are
written atomically; a run killed mid-shard loses only the rows of the shard in flight not yet committed
(a slow shard commits its finished batches every ``runtime.commit_interval_s``: curate.stages.shardwork).

Damage is detected, never read as data: a done-marker records the name and size of every part
present when it was written, so a marker whose part is gone, or whose part changed size and no
longer reads, is dropped and its shard checked row by row. A part that does not read (truncated,
garbled) is moved to ``<collection>/corrupt/`` with a warning, and its rows count as not stored:
the next shard run computes them (``read`` raises :class:`StoreCorrupt` rather than return rows
with a gap). See docs/reliability.md.

``store_dir`` may be an fsspec URL (``s3://bucket/store``): the same layout, read and written through
that file system (parts and markers are uploaded whole; a part is fetched before it is parsed, so a
network error is raised, never taken for damage; a set-aside part is copied then deleted; ``store_id``
is a conditional write). Listings are re-read from the file system each time (other workers write
there), never from fsspec's listing cache. See docs/scale.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Set
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io import is_url, location, write_json, write_parquet

_ID_CACHE: dict[str, _IdIndex] = {}  # dir -> sorted runs of the stored ids + part names already read (see _IdIndex)
_LOCK = threading.RLock()  # re-entrant: a part set aside while ids() reads drops the cache under the same lock
logger = logging.getLogger("curate")


class StoreCorrupt(CurateError):
    """A stored part does not read; it was set aside and the next run computes its rows again."""


def string_array(ids: pa.Array | pa.ChunkedArray | list[str]) -> pa.Array:
    """``ids`` (a list, Array or ChunkedArray of n strings) as one ``pa.string()`` Array of length n."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())
    return (ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())).cast(pa.string())


def _binary(ids) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, bytes) of ``ids`` as one contiguous UTF-8 buffer (offsets start at 0)."""
    arr = string_array(ids).cast(pa.large_binary())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    data = arr.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]] if data is not None and n else np.zeros(0, np.uint8)
    return offsets - offsets[0] if n else np.zeros(1, np.int64), raw


def fixed_bytes(ids) -> np.ndarray:
    """``ids`` as a numpy ``S<width>`` array (compared bytewise; trailing NUL bytes do not count)."""
    offsets, raw = _binary(ids)
    lengths = np.diff(offsets)
    n, width = len(lengths), max(1, int(lengths.max()) if len(lengths) else 1)
    if n and (lengths == width).all():
        return raw.reshape(n, width).copy().view(f"S{width}").ravel()
    out = np.zeros((n, width), dtype=np.uint8)
    if len(raw):
        rows = np.repeat(np.arange(n), lengths)
        out[rows, np.arange(len(raw)) - offsets[rows]] = raw
    return out.view(f"S{width}").ravel()


def _ids_digest(ids) -> str:
    """``sha256_hex(*sorted(set(ids)))`` computed on Arrow buffers (no Python string per id)."""
    import hashlib

    uniq = pc.unique(string_array(ids))
    offsets, raw = _binary(uniq.take(pc.sort_indices(uniq)))  # UTF-8 byte order = code point order = str order
    lengths = np.diff(offsets)
    n = len(lengths)
    buf = np.empty(int(offsets[-1]) + 8 * n, dtype=np.uint8)
    at = offsets[:-1] + 8 * np.arange(n)  # where each id's 8-byte length prefix starts
    buf[(at[:, None] + np.arange(8)).ravel()] = lengths.astype("<u8").view(np.uint8)
    if len(raw):
        rows = np.repeat(np.arange(n), lengths)
        buf[np.arange(len(raw)) + 8 * (rows + 1)] = raw
    return hashlib.sha256(buf.tobytes()).hexdigest()


class StoredIds(Set):
    """A read-only set of stored ids: sorted runs of numpy byte strings, searched with ``np.searchsorted``."""

    def __init__(self, runs: tuple[np.ndarray, ...]):
        self._runs = runs

    def isin(self, ids) -> np.ndarray:
        """Bool per entry of ``ids`` (list of str or Arrow strings): stored?"""
        q = fixed_bytes(ids)
        out = np.zeros(len(q), dtype=bool)
        if not len(q):
            return out
        qlen = np.strings.str_len(q)
        for run in self._runs:
            width = run.dtype.itemsize
            fits = np.flatnonzero(~out & (qlen <= width))  # a longer id cannot be in this run
            if not len(fits) or not len(run):
                continue
            sub = q[fits].astype(run.dtype)
            at = np.minimum(np.searchsorted(run, sub), len(run) - 1)
            out[fits] = run[at] == sub
        return out

    def __contains__(self, sid) -> bool:
        return isinstance(sid, str) and bool(self.isin([sid])[0])

    def __len__(self) -> int:
        if len(self._runs) <= 1:
            return sum(len(r) for r in self._runs)
        return len(np.unique(np.concatenate(self._runs)))

    def __iter__(self):
        seen = np.unique(np.concatenate(self._runs)) if len(self._runs) > 1 else (self._runs[0] if self._runs else ())
        for b in seen:
            yield b.decode("utf-8")

    __hash__ = None


class _IdIndex:
    """Per collection and process: the stored ids as sorted, de-duplicated runs (a small log-structured
    merge: a new run is merged with the last while that one is at most twice its size, so a query
    searches O(log n) runs and every id is re-sorted O(log n) times), and the part names already read."""

    def __init__(self):
        self.runs: list[np.ndarray] = []
        self.seen: set[str] = set()

    def add(self, ids) -> None:
        run = np.unique(fixed_bytes(ids))
        while self.runs and len(self.runs[-1]) <= 2 * len(run):
            run = np.unique(np.concatenate([self.runs.pop(), run]))
        self.runs.append(run)

    def snapshot(self) -> StoredIds:
        return StoredIds(tuple(self.runs))


class Collection:
    """One key's rows: a folder of Parquet parts plus shard markers."""

    def __init__(self, root: Path, kind: str, key: str):
        self.kind = kind
        self.key = key
        self.dir = location(root) / kind / key
        self.remote = is_url(self.dir)

    def __repr__(self) -> str:
        return f"Collection({self.kind}/{self.key[:12]})"

    def describe(self, fingerprint: dict[str, Any]) -> None:
        path = self.dir / "fingerprint.json"
        if not path.exists():
            write_json(path, fingerprint)

    def _ident(self) -> str:
        """This collection's key in the per-process id cache."""
        return str(self.dir) if self.remote else str(self.dir.resolve())

    def _fresh(self) -> None:
        """Forget fsspec's cached listings of this collection and its markers (other processes write there)."""
        if self.remote:
            for sub in ("", "done", "corrupt"):
                self.dir.fs.invalidate_cache((self.dir / sub).path if sub else self.dir.path)

    def parts(self) -> list[Path]:
        self._fresh()
        return sorted(self.dir.glob("part-*.parquet"), key=lambda p: p.name)

    def _part_sizes(self) -> dict[str, int]:
        """Name -> size in bytes of every part stored now: one listing for a URL store (not a request per
        part), a ``stat`` per part on disk."""
        if self.remote:
            self._fresh()
            try:
                entries = self.dir.fs.ls(self.dir.path, detail=True)
            except FileNotFoundError:
                return {}
            found = ((e["name"].rsplit("/", 1)[-1], e) for e in entries if e.get("type") == "file")
            return {name: int(e["size"]) for name, e in found if name.startswith("part-") and name.endswith(".parquet")}
        sizes = {}
        for p in self.parts():
            with contextlib.suppress(FileNotFoundError):  # set aside by a concurrent reader meanwhile
                sizes[p.name] = p.stat().st_size
        return sizes

    def ids(self) -> StoredIds:
        """All sample_ids stored under this key: a read-only set (``in``, ``len``, iteration, ``==`` a set)
        whose :meth:`StoredIds.isin` answers for many ids at once. Kept per process as sorted numpy
        byte strings (no Python object per id), read incrementally from new parts."""
        with _LOCK:
            parts = self.parts()
            index = _ID_CACHE.setdefault(self._ident(), _IdIndex())
            if index.seen - {p.name for p in parts}:  # a part read before is gone (set aside by another process): read afresh
                index = _ID_CACHE[self._ident()] = _IdIndex()
            for part in parts:
                if part.name not in index.seen:
                    t = self.read_part(part, ["sample_id"])  # None: corrupt, set aside (its rows count as not stored)
                    if t is not None:
                        index.add(t.column(0))
                    index.seen.add(part.name)
            return index.snapshot()

    def stored(self, ids: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
        """Bool per entry of ``ids``: is it stored under this key?"""
        return self.ids().isin(ids)

    def write(self, table: pa.Table) -> Path:
        """Store new rows; the part is named by the hash of its ids, so a rewrite is idempotent."""
        ids = table.column("sample_id")
        name = f"part-{_ids_digest(ids)[:24]}.parquet"
        path = write_parquet(self.dir / name, table)
        with _LOCK:
            cached = _ID_CACHE.get(self._ident())
            if cached is not None and name not in cached.seen:
                cached.add(ids)
                cached.seen.add(name)
        return path

    def done(self, shard_hash: str) -> bool:
        """True when the shard's marker exists and every part the collection held when it was written
        is still there, intact. A marker that cannot be read, or that lists a part now gone, is removed
        (the shard then computes only the rows the store lacks); a listed part whose size changed and
        that no longer reads is moved aside (:meth:`set_aside`)."""
        path = self.dir / "done" / f"{shard_hash}.json"
        self._fresh()
        if not path.exists():
            return False
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return self._drop_marker(path, f"unreadable ({exc})")
        listed = marker.get("parts") or {}  # markers written before parts were recorded: trusted
        sizes = self._part_sizes() if self.remote and listed else None
        for name, size in listed.items():
            part = self.dir / name
            try:
                now = part.stat().st_size if sizes is None else sizes[name]
            except (FileNotFoundError, KeyError):
                return self._drop_marker(path, f"lists {name}, which is gone")
            if now != size and not self.check_part(part):  # a same-ids part rewritten by another writer has another size
                return self._drop_marker(path, f"lists {name}, which was corrupt")
        return True

    def _drop_marker(self, path: Path, why: str) -> bool:
        logger.warning("%s: done-marker %s %s; the shard will be checked row by row and its missing rows computed", self, path.name, why)
        path.unlink(missing_ok=True)
        return False

    def marker(self, shard_hash: str) -> dict[str, Any]:
        return json.loads((self.dir / "done" / f"{shard_hash}.json").read_text())

    def mark_done(self, shard_hash: str, info: dict[str, Any]) -> None:
        """Write the shard's marker, with the name and size of every part stored now (the shard's rows
        are among them; :meth:`done` checks they are all still there)."""
        write_json(self.dir / "done" / f"{shard_hash}.json", {**info, "parts": self._part_sizes()})

    def check_part(self, part: Path) -> bool:
        """Read ``part`` whole; when it does not read, set it aside and return False."""
        return self.read_part(part) is not None

    def verify(self, parts: list[Path] | None = None) -> None:
        """For a reader whose own scan of ``parts`` (all by default) failed: read each whole, set aside
        those that do not read, and raise :class:`StoreCorrupt` naming them and any that are gone.
        Returns only when every part reads (the scan failed for another reason: re-raise that)."""
        bad = [p.name for p in (self.parts() if parts is None else parts) if not self.check_part(p)]
        if bad:
            raise StoreCorrupt(f"{self}: {', '.join(bad)} could not be read and was set aside in {self.dir / 'corrupt'} (or was gone); "
                               "run the flow again: the shards that need its rows compute them again")

    def read_part(self, part: Path, columns: list[str] | None = None) -> pa.Table | None:
        """One part's rows, or None when it is corrupt (then it is set aside) or gone."""
        source: Any = part
        if self.remote:  # fetch first: a network error is raised as it is, never taken for a damaged part
            try:
                source = pa.BufferReader(part.fs.cat_file(part.path))
            except FileNotFoundError:
                return None
        try:
            return pq.read_table(source, columns=columns)
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            self.set_aside(part, exc)
            return None

    def set_aside(self, part: Path, exc: BaseException) -> Path:
        """Move a corrupt part to ``<collection>/corrupt/`` (kept for inspection, never read again), forget
        its ids and remove the done-markers that may rely on it (those listing it, and older markers
        that list no parts), so its rows count as not stored and the next shard run computes them."""
        dest = self.dir / "corrupt" / part.name
        if not self.remote:  # an object store has no folders (and s3fs's mkdir would create a bucket)
            dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # another reader set it aside first
            if self.remote:
                part.rename(dest)  # an object store: copy, then delete
            else:
                os.replace(part, dest)
        with _LOCK:
            _ID_CACHE.pop(self._ident(), None)
        for marker in sorted((self.dir / "done").glob("*.json"), key=lambda p: p.name):  # shards that may have rows in it are checked again
            try:
                listed = json.loads(marker.read_text(encoding="utf-8")).get("parts")
            except (OSError, ValueError):
                listed = None
            if listed is None or part.name in listed:
                marker.unlink(missing_ok=True)
        logger.warning("%s: %s does not read (%s): moved to %s; its rows will be computed again", self, part.name,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__, dest)
        return dest

    def read(self, ids: list[str] | pa.Array | pa.ChunkedArray | None = None, columns: list[str] | None = None) -> pa.Table | None:
        """Rows for ``ids`` (all when None); duplicates from concurrent writers are dropped."""
        parts = self.parts()
        if not parts:
            return None
        tables = []
        id_array = pc.unique(string_array(ids)) if ids is not None else None  # typed: an empty pool too
        for part in parts:
            t = self.read_part(part, columns)
            if t is None:  # corrupt (now set aside) or set aside meanwhile: its rows would silently be missing
                raise StoreCorrupt(f"{self}: {part.name} could not be read and was set aside in {self.dir / 'corrupt'}; "
                                   "run the flow again: the shards that need its rows compute them again")
            if id_array is not None:
                t = t.filter(pc.is_in(t.column("sample_id"), value_set=id_array))
            if t.num_rows:
                tables.append(t)
        if not tables:
            return None
        table = pa.concat_tables(tables, promote_options="default")
        keys = ["sample_id"] + (["variant"] if "variant" in table.column_names else [])
        return drop_duplicates(table, keys)

    def fingerprint(self) -> dict[str, Any] | None:
        path = self.dir / "fingerprint.json"
        return json.loads(path.read_text()) if path.exists() else None


def first_occurrence(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Bool per entry of ``ids``: is it the first entry with that value? (one hash pass in Arrow)"""
    ids = string_array(ids)
    return (pc.index_in(ids, value_set=ids).to_numpy(zero_copy_only=False) == np.arange(len(ids))) if len(ids) else np.zeros(0, dtype=bool)


def drop_duplicates(table: pa.Table, keys: list[str]) -> pa.Table:
    """The first row of each distinct ``keys`` value, rows in table order (every column kept)."""
    if table.num_rows == 0:
        return table
    idx = pa.array(range(table.num_rows), pa.int64())
    first = table.append_column("_i", idx).group_by(keys, use_threads=False).aggregate([("_i", "min")])
    if first.num_rows == table.num_rows:
        return table
    keep = pc.sort_indices(first.column("_i_min"))
    return table.take(pc.take(first.column("_i_min"), keep))


#: the store's collections of parts (:meth:`Store.collection`)
COLLECTIONS = ("scores", "embeddings")


class Store:
    """Entry point: ``Store(dir).scores(key)`` and ``Store(dir).embeddings(key)``."""

    def __init__(self, root: str | Path):
        self.root = location(root)

    def identity(self) -> str:
        """A random id made when the store is first used: a recreated store is a new store."""
        path = self.root / "store_id"
        if not path.exists():
            import uuid

            remote = is_url(self.root)
            if not remote:  # an object store has no folders (and s3fs's mkdir would create a bucket)
                self.root.mkdir(parents=True, exist_ok=True)
            try:  # first writer wins (on S3 a conditional PUT, If-None-Match)
                with (path.fs.open(path.path, "xb") if remote else open(path, "xb")) as f:
                    f.write((uuid.uuid4().hex + "\n").encode())
            except FileExistsError:
                pass
        return path.read_text(encoding="utf-8").strip()

    def collection(self, kind: str, key: str) -> Collection:
        """The collection ``kind`` (one of :data:`COLLECTIONS`) of ``key``."""
        if kind not in COLLECTIONS:
            raise ValueError(f"store collection '{kind}': one of {COLLECTIONS}")
        return Collection(self.root, kind, key)

    def scores(self, key: str) -> Collection:
        return self.collection("scores", key)

    def embeddings(self, key: str) -> Collection:
        return self.collection("embeddings", key)

    def calls(self) -> Path:
        """The LLM call cache: one JSON reply per (backend, messages, decoding, seed) hash (see curate.lm.calls)."""
        return self.root / "calls"

    def rewrites(self, key: str) -> Path:
        """The folder of one rewrite step's finished units (key: its fingerprint + its input set's hash)."""
        return self.root / "rewrites" / key


# -- the store's other folders: caches each named here, built by whoever fills them ---------------------


def calls_dir(root: str | Path) -> Path:
    """The LLM call cache: one JSON reply per (backend, messages, decoding, seed) hash (curate.lm.calls)."""
    return Store(root).calls()


def request_cache(root: str | Path) -> Path:
    """API scorers' response cache (a scorer context's ``request_cache``)."""
    return location(root) / "requests"


def ingest_cache_dir(root: str | Path) -> Path:
    """Input chunks ingest read before (same bytes, same settings), so they are not parsed again."""
    return location(root) / "ingest"


def persona_cache(root: str | Path, key: str) -> Path:
    """One AIDE persona pool (``key``: what it was drawn from and how), as JSON."""
    return location(root) / "aide" / "personas" / f"{key}.json"


def shard_copies_dir(root: str | Path) -> Path:
    """A URL store's copies of the shards (``<shard sha256>.parquet``), which every worker reads."""
    return location(root) / "shards"


def prefect_results_dir(root: str | Path) -> Path:
    """Where Prefect keeps its task results and cache records (under the store: every worker reaches it)."""
    return location(root) / "prefect-results"


def matrix_dir(collection: Collection) -> Path:
    """Where the assembled matrices of an embeddings ``collection`` go: beside its parts for a local
    store; for a URL store a local folder (``$CURATE_CACHE_DIR/matrix/<hash of the collection's URL>``),
    since a memory map needs a local file."""
    if not collection.remote:
        return collection.dir / "matrix"
    from curate.models import cache_dir
    from curate.records import sha256_hex

    return cache_dir() / "matrix" / sha256_hex(str(collection.dir))[:24]


# -- part schemas --------------------------------------------------------------------------------------

#: the rows of a ``scores`` part: one per (sample, scorer output)
SCORE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("scorer_key", pa.string()),
        ("method", pa.string()),
        ("variant", pa.string()),
        ("score", pa.float64()),
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("message", pa.string()),
        ("components", pa.string()),
        ("n_tokens_in", pa.int64()),
        ("n_tokens_used", pa.int64()),
        ("model_id", pa.string()),
        ("model_revision", pa.string()),
        ("dtype", pa.string()),
        ("template_id", pa.string()),
        ("template_hash", pa.string()),
        ("max_length", pa.int64()),
        ("seed", pa.int64()),
        ("decoding", pa.string()),
        ("raw_output", pa.string()),
        ("created_at", pa.timestamp("s", tz="UTC")),
        ("code_version", pa.string()),
    ]
)

#: the status of a row whose input carried no vector for a precomputed producer (given by the matrix, never stored)
NO_VECTOR = "error:no_vector"
#: the status of a stored vector that cannot be used (NaN / inf, or zero when normalising)
BAD_VECTOR = "error:bad_vector"


def embedding_table(ids: list[str] | pa.Array, vectors: np.ndarray, statuses: list[str], storage: str = "float32") -> pa.Table:
    """The rows of an ``embeddings`` part: ``sample_id``, ``status``, ``vector`` (fixed-size list of ``storage`` floats)."""
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.dtype(storage)).reshape(-1))
    return pa.table(
        {
            "sample_id": pa.array(ids, pa.string()),
            "status": pa.array(statuses, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


def noted_dim(collection: Collection) -> int | None:
    """The vector length noted beside an embeddings collection's parts (``vector_dim.json``), None if none."""
    noted = collection.dir / "vector_dim.json"
    return int(json.loads(noted.read_text())["dim"]) if noted.exists() else None


def note_dim(collection: Collection, dim: int) -> None:
    """Note the vector length of an embeddings collection (with its first vectors)."""
    write_json(collection.dir / "vector_dim.json", {"dim": int(dim)})
