"""How many tokens an export holds as a training run would see them (``curate compare`` sizes its
steps with it): the export file :func:`~curate.train.sft.locate_export` finds for ``spec.layout`` /
``spec.file_type``, each row rendered by the training tokenizer's chat template (``spec.chat_template``
or the base model's own) and cut at the run's ``max_length`` (``spec.max_length``, else the export
manifest's, else 1024), as :func:`~curate.train.sft.row_lengths` counts them for the batch size.
Only the tokenizer loads, not the model."""

from __future__ import annotations

import json
import os

from curate.train.spec import TrainSpec


def export_row_lengths(spec: TrainSpec, source: str | os.PathLike) -> list[int]:
    """Tokens of each row of the export at ``source`` (a run's output_dir or its export folder)."""
    from curate.models import resolve_model
    from curate.train.sft import _tokenizer, locate_export, row_lengths

    export = locate_export(source, spec.layout, spec.file_type)
    base = resolve_model(spec.model, spec.revision)
    tok = _tokenizer(spec, base.location, base.revision if base.source == "hub" else None)
    max_length = spec.max_length or int(export.manifest.get("max_length") or 1024)
    if export.file_type == "jsonl":
        rows = [json.loads(line) for line in export.path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(export.path).to_pylist()
    return row_lengths(tok, rows, max_length)


def export_token_count(spec: TrainSpec, source: str | os.PathLike) -> int:
    """The export's tokens in all (the sum of :func:`export_row_lengths`)."""
    return int(sum(export_row_lengths(spec, source)))
