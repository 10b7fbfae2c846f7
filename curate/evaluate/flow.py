"""The eval flow: ``curate eval`` runs it as a Prefect flow run of its own."""

from __future__ import annotations

from typing import Any

import curate.flow  # noqa: F401  (curate's Prefect settings)
from prefect import flow

from curate.evaluate.spec import EvalSpec


@flow(name="curate-eval", flow_run_name="curate-eval", persist_result=False, validate_parameters=True)
def eval_flow(model: str, spec: dict[str, Any], out_dir: str | None = None, store_dir: str | None = None,
              base_dir: str = ".") -> dict[str, Any]:
    """Held-out loss, generation and pairwise judging of ``model`` on the eval set; returns the record."""
    from prefect.artifacts import create_markdown_artifact

    from curate.evaluate.run import evaluate

    rec = evaluate(model, EvalSpec.model_validate(spec), out_dir, store_dir, base_dir)
    create_markdown_artifact(key="curate-eval", description="curate eval", markdown=artifact_markdown(model, rec))
    return rec


def artifact_markdown(model: str, rec: dict[str, Any]) -> str:
    """The eval's summary in words: the judge's validity first, rates only where it is valid."""
    loss, judge, gen = rec.get("loss") or {}, rec.get("judge") or {}, rec.get("generation") or {}
    lines = [f"# curate eval\n\n- model: `{model}`\n- eval set: `{rec['eval_set'].get('path') or rec['eval_set'].get('hub')}` "
             f"({rec['eval_set']['n_rows']} rows)"]
    if loss:
        lines.append(f"- held-out loss: {loss.get('loss')} (standard error {loss.get('se')}, 95% CI {loss.get('ci95')}; "
                     f"ppl {loss.get('ppl')})")
    if gen:
        lines.append(f"- answers: {gen.get('n_ok')} made, average length {gen.get('avg_length')} characters, "
                     f"{gen.get('n_truncated')} cut by the token limit ({gen.get('truncated_rate')})")
    if judge and not judge.get("valid", True):
        lines.append(f"- judge: **not valid** on this set, so no win rate is reported: {'; '.join(judge['invalid_reasons'])}")
    elif judge:
        ci = judge.get("ci95") or {}
        lines.append(f"- judge: valid (first-position rate {judge.get('first_position_rate')}, consistent {judge.get('consistent')})")
        lines.append(f"- win rate vs reference: {judge.get('win_rate')} (95% CI {ci.get('win_rate')}; {judge.get('n_judged')} judged); "
                     f"length-controlled {judge.get('lc_win_rate')} (95% CI {ci.get('lc_win_rate')}); soft {judge.get('soft_win_rate')}")
    return "\n".join(lines) + "\n"
