"""Selection steps: one file each, one line each in ``SELECTORS`` (a :class:`curate.plugin.Registry`: imported lazily).

Named ``curate.select`` (never a top-level ``selectors`` package, which would shadow the standard
library module that asyncio needs). The YAML presets live in the top-level ``selectors/`` folder.
"""

from __future__ import annotations

from curate.plugin import Registry
from curate.select.base import Pool, SelectContext, Selector, StepResult

SELECTORS = Registry("selection method", {
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
})


def selector_class(method: str) -> type[Selector]:
    return SELECTORS.get(method)


__all__ = ["SELECTORS", "Pool", "SelectContext", "Selector", "StepResult", "selector_class"]
