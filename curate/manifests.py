"""Small, JSON-serialisable manifests that stages pass to each other (never DataFrames).

A manifest says where a stage's output lives and what it holds (paths, content hashes, counts), so
Prefect tasks stay cheap to hash, persist and show, and the data stays in our own files.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class ShardRef(BaseModel):
    """One shard of canonical records (a Parquet file)."""

    shard_id: int
    path: str
    sha256: str = Field(description="Content hash of the shard: sha256 over its sample_ids in order.")
    n_rows: int


class RecordSetRef(BaseModel):
    """A record set (see :mod:`curate.recordset`): shards of canonical records plus a manifest."""

    name: str = Field(description="Unique within a run: input, selected, mosaic, …")
    stage: str = Field(description="The stage that wrote it.")
    config_hash: str = Field(description="Hash of that stage's configuration.")
    dir: str
    shards: list[ShardRef]
    n_rows: int
    sha256: str = Field(description="Content hash: sha256 over the shards' hashes, in order.")

    @property
    def manifest_path(self) -> Path:
        return Path(self.dir) / "manifest.json"


class IngestChunk(BaseModel):
    """One chunk of an input file, as ingest wrote it (rows numbered within the file)."""

    file: str
    records_path: str
    quarantine_path: str
    vectors_path: str | None = Field(None, description="Precomputed vectors of its rows (sample_id, row, vector), "
                                     "when the input carries them.")
    row_offset: int = Field(description="The input-local row number of the file's row 0.")
    n_rows: int
    n_valid: int
    n_quarantined: int


class IngestRef(BaseModel):
    """Result of reading one input spec: its valid records and its quarantined rows, chunk by chunk."""

    input_index: int
    source: str
    files: list[str]
    file_sha256: list[str]
    records_path: str = Field(description="A folder of the input's chunk record files, in order (row numbers within each file).")
    quarantine_path: str = Field(description="A folder of the input's chunk quarantine files, in order.")
    n_rows: int
    n_valid: int
    n_quarantined: int
    format: str
    files_cached: int = 0  # files whose records came from the store's ingest cache
    chunks: list[IngestChunk] = Field(default_factory=list)
    chunks_cached: int = 0  # chunks read from the ingest cache instead of parsed
    embedding_producer: str | None = None
    embedding_dim: int | None = None
    n_vectors: int = 0


class DatasetRef(BaseModel):
    """All inputs after dedup, as the ``input`` record set; plus the per-row outcomes decided at ingest."""

    records: RecordSetRef
    ledger_path: str = Field(description="Ingest outcomes: quarantined and duplicate rows.")
    n_input: int
    n_valid: int
    n_quarantined: int
    n_duplicates: int
    sources: list[IngestRef]

    @property
    def shards(self) -> list[ShardRef]:
        return self.records.shards


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
    """What one selection round did: its score table, the ledger rows of its pool, the kept rows."""

    name: str = Field("select", description="select, select-2, …: also the folder under output_dir.")
    path: str = Field(description="The wide score table of the pool: scores, statuses, selected, rank.")
    ledger_path: str = Field(description="One ledger row per pool row (and, for the first round, per ingest outcome).")
    selected: RecordSetRef = Field(description="The kept rows, in row order.")
    n_selected: int
    counts: dict[str, int]
    steps: list[dict]


class RewriteRef(BaseModel):
    """What a rewrite step made: the derived rows (a record set) and what became of its inputs."""

    name: str
    key: str = Field(description="Store key of the step's work: its fingerprint and its input set's hash.")
    derived: RecordSetRef
    dispositions_path: str = Field(description="Per input row: used (as a parent), passthrough, or dropped with a reason.")
    quarantine_path: str = Field(description="Derived rows that broke the conversation rules (row, origin, parents, reason).")
    n_derived: int = Field(description="Derived rows made, quarantined ones included (rows row_offset … row_offset + n_derived - 1).")
    stats: dict
    computed_units: int = 0


class LedgerRef(BaseModel):
    """The final ledgers of a run (see :mod:`curate.stages.ledger`)."""

    path: str = Field(description="ledger.parquet: every input row once.")
    derived_path: str = Field(description="derived_ledger.parquet: every derived row once.")
    lineage_path: str
    n_input: int
    n_derived: int
    counts: dict[str, int]
    derived_counts: dict[str, int]


class ExportRef(BaseModel):
    dir: str
    files: list[dict]
    manifest_path: str
