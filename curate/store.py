"""The content-addressed store for scores and embeddings.

Layout (``store_dir`` in the flow, shared by every run of a project)::

    <store>/scores/<scorer_key>/fingerprint.json      what the key means (method, params, model…)
    <store>/scores/<scorer_key>/part-<hash>.parquet   long rows: sample_id, variant, score, status…
    <store>/scores/<scorer_key>/done/<shard>.json     shard marker: every row of that shard is stored
    <store>/embeddings/<embedder_key>/…               the same, with a ``vector`` column
    <store>/rewrites/<rewrite_key>/unit-<hash>.json   a rewrite step's finished units (see curate.stages.rewrite)

Keys are sha256 hashes of the fingerprint, rows are keyed by ``sample_id`` (a hash of the content),
so nothing already computed is computed again, whatever run, file or row order it came from. Parts are
written atomically; a run killed mid-shard loses only the shard in flight.

Damage is detected, never read as data: a done-marker records the name and size of every part
present when it was written, so a marker whose part is gone, or whose part changed size and no
longer reads, is dropped and its shard checked row by row. A part that does not read (truncated,
garbled) is moved to ``<collection>/corrupt/`` with a warning, and its rows count as not stored:
the next shard run computes them (``read`` raises :class:`StoreCorrupt` rather than return rows
with a gap). See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io import write_json, write_parquet
from curate.records import sha256_hex

_ID_CACHE: dict[Path, tuple[set[str], set[str]]] = {}  # dir -> (ids, part names already read)
_LOCK = threading.RLock()  # re-entrant: a part set aside while ids() reads drops the cache under the same lock
logger = logging.getLogger("curate")


class StoreCorrupt(CurateError):
    """A stored part does not read; it was set aside and the next run computes its rows again."""


class Collection:
    """One key's rows: a folder of Parquet parts plus shard markers."""

    def __init__(self, root: Path, kind: str, key: str):
        self.kind = kind
        self.key = key
        self.dir = Path(root) / kind / key

    def __repr__(self) -> str:
        return f"Collection({self.kind}/{self.key[:12]})"

    def describe(self, fingerprint: dict[str, Any]) -> None:
        path = self.dir / "fingerprint.json"
        if not path.exists():
            write_json(path, fingerprint)

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def ids(self) -> set[str]:
        """All sample_ids stored under this key (incrementally cached per process)."""
        with _LOCK:
            ids, seen = _ID_CACHE.setdefault(self.dir.resolve(), (set(), set()))
            for part in self.parts():
                if part.name not in seen:
                    t = self.read_part(part, ["sample_id"])  # None: corrupt, set aside (its rows count as not stored)
                    if t is not None:
                        ids.update(t.column(0).to_pylist())
                    seen.add(part.name)
            return set(ids)

    def write(self, table: pa.Table) -> Path:
        """Store new rows; the part is named by the hash of its ids, so a rewrite is idempotent."""
        ids = table.column("sample_id").to_pylist()
        name = f"part-{sha256_hex(*sorted(set(ids)))[:24]}.parquet"
        path = write_parquet(self.dir / name, table)
        with _LOCK:
            cached = _ID_CACHE.get(self.dir.resolve())
            if cached is not None:
                cached[0].update(ids)
                cached[1].add(name)
        return path

    def done(self, shard_hash: str) -> bool:
        """True when the shard's marker exists and every part the collection held when it was written
        is still there, intact. A marker that cannot be read, or that lists a part now gone, is removed
        (the shard then computes only the rows the store lacks); a listed part whose size changed and
        that no longer reads is moved aside (:meth:`set_aside`)."""
        path = self.dir / "done" / f"{shard_hash}.json"
        if not path.exists():
            return False
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return self._drop_marker(path, f"unreadable ({exc})")
        for name, size in (marker.get("parts") or {}).items():  # markers written before parts were recorded: trusted
            part = self.dir / name
            try:
                now = part.stat().st_size
            except FileNotFoundError:
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
        parts = {}
        for p in self.parts():
            with contextlib.suppress(FileNotFoundError):  # set aside by a concurrent reader meanwhile
                parts[p.name] = p.stat().st_size
        write_json(self.dir / "done" / f"{shard_hash}.json", {**info, "parts": parts})

    def check_part(self, part: Path) -> bool:
        """Read ``part`` whole; when it does not read, set it aside and return False."""
        try:
            pq.read_table(part)
        except FileNotFoundError:
            return False
        except (OSError, pa.ArrowException) as exc:
            self.set_aside(part, exc)
            return False
        return True

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
        try:
            return pq.read_table(part, columns=columns)
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
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # another reader set it aside first
            os.replace(part, dest)
        with _LOCK:
            _ID_CACHE.pop(self.dir.resolve(), None)
        for marker in sorted((self.dir / "done").glob("*.json")):  # shards that may have rows in it are checked again
            try:
                listed = json.loads(marker.read_text(encoding="utf-8")).get("parts")
            except (OSError, ValueError):
                listed = None
            if listed is None or part.name in listed:
                marker.unlink(missing_ok=True)
        logger.warning("%s: %s does not read (%s): moved to %s; its rows will be computed again", self, part.name,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__, dest)
        return dest

    def read(self, ids: list[str] | None = None, columns: list[str] | None = None) -> pa.Table | None:
        """Rows for ``ids`` (all when None); duplicates from concurrent writers are dropped."""
        parts = self.parts()
        if not parts:
            return None
        tables = []
        id_array = pa.array(sorted(set(ids)), type=pa.string()) if ids is not None else None  # typed: an empty pool too
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
        return _drop_duplicates(table, keys)

    def fingerprint(self) -> dict[str, Any] | None:
        path = self.dir / "fingerprint.json"
        return json.loads(path.read_text()) if path.exists() else None


def _drop_duplicates(table: pa.Table, keys: list[str]) -> pa.Table:
    if table.num_rows == 0:
        return table
    idx = pa.array(range(table.num_rows), pa.int64())
    first = table.append_column("_i", idx).group_by(keys, use_threads=False).aggregate([("_i", "min")])
    if first.num_rows == table.num_rows:
        return table
    keep = pc.sort_indices(first.column("_i_min"))
    return table.take(pc.take(first.column("_i_min"), keep))


class Store:
    """Entry point: ``Store(dir).scores(key)`` and ``Store(dir).embeddings(key)``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def identity(self) -> str:
        """A random id made when the store is first used: a recreated store is a new store."""
        path = self.root / "store_id"
        if not path.exists():
            import uuid

            self.root.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "x", encoding="utf-8") as f:  # first writer wins
                    f.write(uuid.uuid4().hex + "\n")
            except FileExistsError:
                pass
        return path.read_text(encoding="utf-8").strip()

    def scores(self, key: str) -> Collection:
        return Collection(self.root, "scores", key)

    def embeddings(self, key: str) -> Collection:
        return Collection(self.root, "embeddings", key)

    def calls(self) -> Path:
        """The LLM call cache: one JSON reply per (backend, messages, decoding, seed) hash (see curate.lm.calls)."""
        return self.root / "calls"

    def rewrites(self, key: str) -> Path:
        """The folder of one rewrite step's finished units (key: its fingerprint + its input set's hash)."""
        return self.root / "rewrites" / key
