"""Read an evaluation set with the ingest code: the same readers, layout converters and rules.

Two kinds of set:

- **with reference answers** (AlpacaEval outputs, GSM8K answers, MT-Bench references …): any layout
  ingest reads, converted and checked by the ingest rules (:func:`read_eval_set`);
- **prompts only** (the Vicuna, Koala, LIMA and WizardLM test sets): one field per row holds the
  user's request — a string, or a list of user turns of which the first is used (later turns depend
  on answers the set does not have) — read by :func:`read_prompts`. Such rows have no reference
  answer: no held-out loss, and the judge compares against a reference *model*'s answers.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pyarrow.parquet as pq

from curate.config import IngestSpec, InputSpec


def read_eval_set(spec: InputSpec, base_dir: str = ".") -> tuple[list[dict[str, Any]], int]:
    """(the set's valid canonical records in file order, how many rows broke the conversation rules).
    Raises ValueError when no row is valid."""
    from curate.ingest.read import read_input

    with tempfile.TemporaryDirectory(prefix="curate-eval-") as work:
        ref = read_input(spec, 0, base_dir, work, IngestSpec(dedup=False))
        records = pq.read_table(ref.records_path).to_pylist()
    if not records:
        raise ValueError(f"eval set {spec.path or spec.hub}: no valid rows ({ref.n_quarantined} broke the conversation rules)")
    return records, ref.n_quarantined


def read_prompts(spec: InputSpec, field: str, base_dir: str = ".") -> tuple[list[dict[str, Any]], int]:
    """(one record per row whose ``field`` holds a non-empty request: ``messages`` = that one user
    message, in file order; how many rows had none). Raises ValueError naming the file and line of
    the first bad row when no row is usable."""
    from pathlib import Path

    from curate.ingest.readers import expand_paths, read_file
    from curate.records import sample_id

    records, bad, first_bad = [], 0, None
    for path in expand_paths(spec.path, Path(base_dir)):
        for n, raw in enumerate(read_file(path, spec.split, spec.json_field, getattr(spec, "delimiter", None))):
            if spec.limit is not None and n >= spec.limit:
                break
            value = raw.record.get(field) if raw.record else None
            if isinstance(value, list):
                value = value[0] if value else None
            if not isinstance(value, str) or not value.strip():
                bad += 1
                first_bad = first_bad or f"{path}:{raw.line or raw.index + 1}: field '{field}' is missing or not a non-empty string"
                continue
            msgs = [{"role": "user", "content": value}]
            records.append({"sample_id": sample_id(msgs), "messages": msgs})
    if not records:
        raise ValueError(f"eval set {spec.path}: no row has a request in '{field}' ({first_bad})")
    return records, bad
