"""Selection steps: one file each, one line each in ``SELECTORS`` (imported lazily).

Named ``curate.select`` (never a top-level ``selectors`` package, which would shadow the standard
library module that asyncio needs). The YAML presets live in the top-level ``selectors/`` folder.
"""

from __future__ import annotations

from curate.registry import load_class
from curate.select.base import Pool, Selector, StepResult

SELECTORS: dict[str, str] = {
    "threshold": "curate.select.threshold:ThresholdFilter",
    "top_k": "curate.select.topk:TopK",
    "random": "curate.select.random:RandomSample",
    "token_budget": "curate.select.token_budget:TokenBudget",
    "kcenter": "curate.select.kcenter:KCenter",
    "ds2": "curate.select.ds2:DS2Select",
    "repr_filter": "curate.select.repr_filter:ReprFilter",
    "facility_location": "curate.select.submodular_steps:FacilityLocationSelect",
    "graph_cut": "curate.select.submodular_steps:GraphCutSelect",
    "log_determinant": "curate.select.submodular_steps:LogDeterminantSelect",
    "flmi": "curate.select.submodular_steps:FLMISelect",
    "flcg": "curate.select.submodular_steps:FLCGSelect",
    "smart": "curate.select.smart:Smart",
    "delift": "curate.select.delift:Delift",
    "decontaminate": "curate.select.decontaminate:Decontaminate",
    "minhash_dedup": "curate.select.minhash:MinHashDedup",
}


def selector_class(method: str) -> type[Selector]:
    return load_class(SELECTORS, "selection method", method)


__all__ = ["SELECTORS", "Pool", "Selector", "StepResult", "selector_class"]
