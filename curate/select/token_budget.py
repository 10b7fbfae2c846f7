"""Keep rows up to a budget in tokens, in the order the previous step ranked them.

A row's tokens are the sum of the scores named in ``count`` (default: ``heuristic.prompt_tokens`` +
``heuristic.response_tokens``, the heuristic scorer's token counts of the prompt and the response
sides: words and punctuation marks with its default ``tokenizer: regex``, or the tokens of the HF
tokenizer it is given). Rows are taken in the pool's rank order (:attr:`Pool.rank`: the order the
step before ranked them in; input-row order for a first step or a pool without a rank) while the
running total stays within ``tokens``; the first row that would take the total past the budget
ends the selection, and it and every row after it are ``not_selected`` (``over_token_budget``): the
kept rows are a prefix of the ranking. ``fill: true`` instead skips a row that does not fit and goes
on down the ranking, keeping every later row that still fits (greedy, in rank order), so the kept
tokens come within the shortest remaining row of the budget — what equal-token comparisons need
(``curate compare``'s random baseline fills). Put rule steps (``threshold``, ``decontaminate``) before the ranking
step: a rule step ranks its kept rows in input order, so one placed between would cut in that order.
A row whose count is NaN (not scored) is never kept (``unscored``) and does not stop the rows after it.

Shapes: every count score is (n,) float64 in tokens; ``keep`` / ``rank`` are (n,); ``stats``
gives ``tokens`` (the budget), ``tokens_kept`` (the kept rows' total) and ``rows_kept``.

    select:
      - {method: top_k, score: superfiltering.ifd, budget: 0.5, rate_base: pool}   # ranks the rows
      - {method: token_budget, tokens: 20000}                                      # the best rows up to 20,000 tokens
      - {method: token_budget, tokens: 20000, fill: true}                        # … then shorter rows further down that fit
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from curate.errors import ConfigError
from curate.select.base import Pool, Selector, StepResult, fmt

DEFAULT_COUNT = ("heuristic.prompt_tokens", "heuristic.response_tokens")


class TokenBudget(Selector):
    method = "token_budget"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        tokens: int = Field(gt=0, description="The budget: the kept rows' tokens (the sum of the count scores) add up to at most this.")
        count: list[str] = Field(default_factory=lambda: list(DEFAULT_COUNT), min_length=1,
                                 description="Scores (<scorer>.<output>) whose sum is a row's tokens; default: the heuristic "
                                 "scorer's prompt_tokens + response_tokens.")
        fill: bool = Field(False, description="false: the kept rows are the ranking's longest prefix within the budget; true: a row "
                           "that does not fit is skipped and later rows that still fit are kept (greedy in rank order).")

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        missing = [c for c in p.count if c not in pool.scores]
        if missing:
            hint = (" add '- method: heuristic' to the flow's score: section" if set(missing) & set(DEFAULT_COUNT)
                    else " name scores the flow computes in count")
            raise ConfigError(f"select step {self.step_index} (token_budget) counts a row's tokens as "
                              f"{' + '.join(p.count)}, but the pool has no score {', '.join(repr(m) for m in missing)} "
                              f"(scores: {', '.join(sorted(pool.scores)) or 'none'}):{hint}")
        n = len(pool)
        tokens = np.zeros(n, dtype=np.float64)
        for c in p.count:
            tokens += pool.scores[c]
        rank = pool.rank if pool.rank is not None else np.arange(n, dtype=np.int64)
        order = np.lexsort((pool.rows, rank))  # rank order, ties by input row
        unscored = np.isnan(tokens)
        ranked = order[~unscored[order]]
        total = np.cumsum(tokens[ranked])
        k = int(np.searchsorted(total, p.tokens, side="right"))  # the longest prefix whose total is within the budget
        fits = np.zeros(len(ranked), dtype=bool)
        fits[:k] = True
        running = float(total[k - 1]) if k else 0.0
        before = np.full(len(ranked), np.nan)  # the kept total a row was weighed against
        for pos in range(k, len(ranked)) if p.fill else ():
            before[pos] = running
            if running + tokens[ranked[pos]] <= p.tokens:
                fits[pos] = True
                running += float(tokens[ranked[pos]])
        kept = ranked[fits]
        keep = np.zeros(n, dtype=bool)
        keep[kept] = True
        out_rank = np.full(n, -1, dtype=np.int64)
        out_rank[kept] = np.arange(len(kept))
        used = running
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        for pos in np.flatnonzero(~fits):
            i = ranked[pos]
            reason[i] = "over_token_budget"
            if p.fill:
                detail[i] = (f"rank {pos + 1} in the previous step's order; {fmt(tokens[i])} tokens do not fit beside the "
                             f"{fmt(before[pos])} kept before it (budget {p.tokens})")
            else:
                detail[i] = (f"rank {pos + 1} in the previous step's order; the rows up to it hold {fmt(total[pos])} tokens "
                             f"({fmt(tokens[i])} its own), over the budget of {p.tokens}")
        for i in np.flatnonzero(unscored):
            reason[i], detail[i] = "unscored", f"{' + '.join(p.count)} is NaN (no token count)"
        stats = {"tokens": p.tokens, "tokens_kept": used, "rows_kept": int(len(kept)), "count": list(p.count), "fill": p.fill}
        return StepResult(keep, out_rank, "not_selected", reason, detail, stats)
