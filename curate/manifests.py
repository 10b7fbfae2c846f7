"""Small, JSON-serialisable manifests that stages pass to each other (never DataFrames).

A manifest says where a stage's output lives and what it holds (paths, content hashes, counts), so
Prefect tasks stay cheap to hash, persist and show, and the data stays in our own files.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class ShardRef(BaseModel):
    """One shard of canonical records (a Parquet file)."""

    shard_id: int
    path: str
    sha256: str = Field(description="Content hash of the shard: sha256 over its sample_ids in order.")
    n_rows: int


class IngestRef(BaseModel):
    """Result of reading one input spec: its valid records and its quarantined rows."""

    input_index: int
    source: str
    files: list[str]
    file_sha256: list[str]
    records_path: str
    quarantine_path: str
    n_rows: int
    n_valid: int
    n_quarantined: int
    format: str


class DatasetRef(BaseModel):
    """All inputs after dedup, split into shards; plus the per-row outcomes decided at ingest."""

    shards: list[ShardRef]
    ledger_path: str = Field(description="Ingest outcomes: quarantined and duplicate rows.")
    n_input: int
    n_valid: int
    n_quarantined: int
    n_duplicates: int
    sources: list[IngestRef]


class WorkRef(BaseModel):
    """What a per-shard model stage (score, embed) did for one shard."""

    stage: str
    name: str
    key: str
    shard_id: int
    shard_sha256: str
    n_rows: int
    computed_rows: int
    statuses: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = Field(default_factory=list)


class SelectionRef(BaseModel):
    path: str
    ledger_path: str
    n_selected: int
    counts: dict[str, int]
    steps: list[dict]


class ExportRef(BaseModel):
    dir: str
    files: list[dict]
    manifest_path: str
