"""Scorers: one file each, one line each in ``SCORERS`` (imported lazily, by dotted path)."""

from __future__ import annotations

import importlib

from curate.scorers.base import Score, Scorer, ScorerContext

SCORERS: dict[str, str] = {
    "heuristic": "curate.scorers.heuristic:HeuristicScorer",
}


def scorer_class(method: str) -> type[Scorer]:
    try:
        target = SCORERS[method]
    except KeyError:
        raise KeyError(f"unknown scorer '{method}' (known: {', '.join(sorted(SCORERS))})") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["SCORERS", "Score", "Scorer", "ScorerContext", "scorer_class"]
