"""The eval flow: ``curate eval`` runs it as a Prefect flow run of its own."""

from __future__ import annotations

from typing import Any

import curate.flow  # noqa: F401  (curate's Prefect settings)
from prefect import flow

from curate.evaluate.spec import EvalSpec


@flow(name="curate-eval", flow_run_name="curate-eval", persist_result=False, validate_parameters=True)
def eval_flow(model: str, spec: dict[str, Any], out_dir: str | None = None, store_dir: str | None = None, base_dir: str = ".") -> dict[str, Any]:
    """Held-out loss, generation and pairwise judging of ``model`` on the eval set; returns the record."""
    from prefect.artifacts import create_markdown_artifact

    from curate.evaluate.run import evaluate

    rec = evaluate(model, EvalSpec.model_validate(spec), out_dir, store_dir, base_dir)
    loss, judge = rec.get("loss") or {}, rec.get("judge") or {}
    create_markdown_artifact(key="curate-eval", description="curate eval", markdown=(
        f"# curate eval\n\n- model: `{model}`\n- eval set: `{rec['eval_set'].get('path') or rec['eval_set'].get('hub')}` "
        f"({rec['eval_set']['n_rows']} rows)\n- held-out loss: {loss.get('loss')} (ppl {loss.get('ppl')})\n"
        f"- win rate vs reference: {judge.get('win_rate')} (soft {judge.get('soft_win_rate')}; {judge.get('n_judged')} judged)\n"))
    return rec
