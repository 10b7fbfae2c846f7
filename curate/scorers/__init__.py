"""Scorers: one file each, one line each in ``SCORERS`` (a :class:`curate.plugin.Registry`: imported lazily, by dotted path)."""

from __future__ import annotations

from curate.plugin import Registry
from curate.scorers.base import Score, Scorer, ScorerContext

SCORERS = Registry("scorer", {
    "heuristic": "curate.scorers.heuristic:HeuristicScorer",
    "chat_tokens": "curate.scorers.chat_tokens:ChatTokensScorer",
    "lang": "curate.scorers.lang:LangScorer",
    "ifd": "curate.scorers.ifd:IFDScorer",
    "superfiltering": "curate.scorers.superfiltering:SuperfilteringScorer",
    "rifd": "curate.scorers.rifd:RIFDScorer",
    "perplexity": "curate.scorers.perplexity:PerplexityScorer",
    "deita": "curate.scorers.deita:DeitaScorer",
    "selectit": "curate.scorers.selectit:SelectITScorer",
    "llm_rating": "curate.scorers.judge:JudgeScorer",
    "ds2": "curate.scorers.ds2:DS2RatingScorer",
})


def scorer_class(method: str) -> type[Scorer]:
    return SCORERS.get(method)


__all__ = ["SCORERS", "Score", "Scorer", "ScorerContext", "scorer_class"]
