"""The stage list a flow file declares, and the store keys of its models.

:func:`build_stages` turns a flow spec into its stage list::

    ingest → embed → score:<each scorer> → select
           [→ rewrite:<each step> → embed@<set> → score:<scorer>@<set> → select-2]
           → ledger → export → report

The bracketed round exists when the flow has a ``rewrite:`` section: the derived rows are embedded and
re-scored by the flow's own embedder and scorers (the store computes only what it lacks) and meet
the round's selection steps, alone (``pool: derived``, the default) or with the originals
(``pool: selected_and_derived``).

Each kind of stage is one file, :mod:`curate.stages.<kind>` (its task functions, then its Stage
class); this module only puts them in order, one line per kind, and wires each stage's ``reads`` to
the names earlier stages ``write``.
"""

from __future__ import annotations

from typing import Any

from curate.config import FlowSpec
from curate.pipeline.context import scorer_context, torch_threads
from curate.pipeline.stage import Stage
from curate.stages.embed import EmbedStage
from curate.stages.export import ExportStage
from curate.stages.ingest import IngestStage
from curate.stages.ledger import LedgerStage
from curate.stages.report import ReportStage
from curate.stages.rewrite import RewriteStage
from curate.stages.score import ScoreStage, build_scorer
from curate.stages.select import SelectStage


def build_stages(spec: FlowSpec) -> list[Stage]:
    """The flow's stage list, in order (see the module docstring)."""
    stages: list[Stage] = [IngestStage()]

    def model_stages(recordset: str) -> list[Stage]:
        out: list[Stage] = [EmbedStage(recordset)] if spec.embed is not None else []
        return out + [ScoreStage(step, recordset) for step in spec.score]

    stages += model_stages("input")
    stages.append(SelectStage("select", ("input",), spec.select, first=True))
    selections, derived = ["select"], []
    if spec.rewrite is not None:
        for step in spec.rewrite.steps:
            stages.append(RewriteStage(step, "select"))
            derived.append(step.label)
        for name in derived:
            stages += model_stages(name)
        stages.append(SelectStage("select-2", ("select", *derived), spec.rewrite.select, first=False))
        selections.append("select-2")
    stages.append(LedgerStage(tuple(selections), tuple(derived)))
    stages.append(ExportStage(selections[-1], derived=bool(derived)))
    if spec.report.enabled:
        stages.append(ReportStage(selections[-1], tuple(dict.fromkeys(name for s in stages for name in s.writes))))
    return stages


def model_keys(spec: FlowSpec) -> tuple[dict[str, tuple[Any, str]], str | None, dict[str, dict]]:
    """Store keys of every scorer and of the embedder, computed without loading any model."""
    from curate.embed import build_embedder

    ctx = scorer_context(spec)
    scorers, fingerprints = {}, {}
    for step in spec.score:
        scorer = build_scorer(step, ctx)
        scorers[step.label] = (step, scorer.key)
        fingerprints[f"score:{step.label}"] = {"key": scorer.key, **scorer.fingerprint()}
    embed_key = None
    if spec.embed is not None:
        embedder = build_embedder(spec.embed, torch_threads(spec))
        embed_key = embedder.key
        fingerprints["embed"] = {"key": embed_key, **embedder.fingerprint()}
    return scorers, embed_key, fingerprints
