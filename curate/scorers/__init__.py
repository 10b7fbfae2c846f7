"""Scorers: one file each, one line each in ``SCORERS`` (imported lazily, by dotted path)."""

from __future__ import annotations

from curate.registry import load_class
from curate.scorers.base import Score, Scorer, ScorerContext

SCORERS: dict[str, str] = {
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
}


def scorer_class(method: str) -> type[Scorer]:
    return load_class(SCORERS, "scorer", method)


__all__ = ["SCORERS", "Score", "Scorer", "ScorerContext", "scorer_class"]
