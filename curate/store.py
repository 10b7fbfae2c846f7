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
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.io import write_json, write_parquet
from curate.records import sha256_hex

_ID_CACHE: dict[Path, tuple[set[str], set[str]]] = {}  # dir -> (ids, part names already read)
_LOCK = threading.Lock()


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
                    ids.update(pq.read_table(part, columns=["sample_id"]).column(0).to_pylist())
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
        return (self.dir / "done" / f"{shard_hash}.json").exists()

    def marker(self, shard_hash: str) -> dict[str, Any]:
        return json.loads((self.dir / "done" / f"{shard_hash}.json").read_text())

    def mark_done(self, shard_hash: str, info: dict[str, Any]) -> None:
        write_json(self.dir / "done" / f"{shard_hash}.json", info)

    def read(self, ids: list[str] | None = None, columns: list[str] | None = None) -> pa.Table | None:
        """Rows for ``ids`` (all when None); duplicates from concurrent writers are dropped."""
        parts = self.parts()
        if not parts:
            return None
        tables = []
        id_array = pa.array(sorted(set(ids)), type=pa.string()) if ids is not None else None  # typed: an empty pool too
        for part in parts:
            t = pq.read_table(part, columns=columns)
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
