"""Read an evaluation set with the ingest code: the same readers, layout converters and rules."""

from __future__ import annotations

import tempfile
from typing import Any

import pyarrow.parquet as pq

from curate.config import IngestSpec, InputSpec


def read_eval_set(spec: InputSpec, base_dir: str = ".") -> tuple[list[dict[str, Any]], int]:
    """(the set's valid canonical records in file order, how many rows broke the conversation rules).
    Raises ValueError when no row is valid."""
    from curate.stages.ingest import read_input

    with tempfile.TemporaryDirectory(prefix="curate-eval-") as work:
        ref = read_input(spec, 0, base_dir, work, IngestSpec(dedup=False))
        records = pq.read_table(ref.records_path).to_pylist()
    if not records:
        raise ValueError(f"eval set {spec.path or spec.hub}: no valid rows ({ref.n_quarantined} broke the conversation rules)")
    return records, ref.n_quarantined
