"""The training flow: ``curate train`` runs it as a Prefect flow run of its own (a train run is
hours on a GPU and must not sit inside a curation run's task), named after the base model."""

from __future__ import annotations

from typing import Any

import curate.flow  # noqa: F401  (curate's Prefect settings: ephemeral start-up timeout, no telemetry, log lines)
from prefect import flow

from curate.train.spec import TrainSpec


@flow(name="curate-train", flow_run_name="curate-train-{spec[model]}", persist_result=False, validate_parameters=True)
def train_flow(spec: dict[str, Any], source: str, out_dir: str | None = None) -> dict[str, Any]:
    """Fine-tune on an export (a run's output_dir or its export folder); returns the train record."""
    from curate.train.sft import train

    record = train(TrainSpec.model_validate(spec), source, out_dir)
    _publish(record)
    return record


def _publish(record: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    curve = record.get("loss_curve") or []
    md = (f"# curate train\n\n- model: `{record['base_model']['name']}` ({record['method']})\n- export: `{record['export']['file']}` "
          f"(sha256 `{record['export']['sha256'][:16]}…`, {record['export']['n_rows']} rows)\n- steps: {record['steps']}, "
          f"loss {record['first_loss']} → {record['last_loss']}\n- weights: `{record['weights']}`\n")
    if record.get("eval_loss") is not None:
        md += f"- eval loss (held-out {record['eval_rows']} rows): {record['eval_loss']}\n"
    if record.get("tokens_trained") is not None:
        md += (f"- tokens trained: {record['tokens_trained']}; tokens/s: {record['tokens_per_s']}"
               f"{' (resumed from step ' + str(record['resumed_from_step']) + ')' if record.get('resumed') else ''}\n")
    create_markdown_artifact(key="curate-train", markdown=md, description="curate train run")
    if curve:
        create_table_artifact(key="curate-train-loss", table=curve, description="training loss per logged step")
