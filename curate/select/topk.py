"""Top-k by score: keep the ``budget`` best rows (a count, or a ratio of ``rate_base``).

Order: the score in its better direction (from the scorer's declared orientation, or
``descending``), ties by input row ascending (methods.md E2). NaN rows are never selected unless
``include_unscored`` (then they come last, in row order)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from curate.select.base import BudgetParams, Pool, Selector, StepResult, descending_for, fmt, ranked_order


class TopK(Selector):
    method = "top_k"

    class Params(BudgetParams):
        score: str = Field(description="<scorer>.<output>")
        descending: bool | None = Field(None, description="Default: from the score's orientation (higher is better).")
        include_unscored: bool = False

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        v = pool.score(p.score)
        n = len(v)
        desc = descending_for(pool.orientation.get(p.score), p.descending)
        order = ranked_order(v, pool.rows, desc)
        nan_idx = np.flatnonzero(np.isnan(v))
        if p.include_unscored:
            order = np.concatenate([order, nan_idx])
        k = min(p.resolve_budget(pool, n_valid=int((~np.isnan(v)).sum())), len(order))
        keep = np.zeros(n, dtype=bool)
        keep[order[:k]] = True
        rank = np.full(n, -1, dtype=np.int64)
        rank[order[:k]] = np.arange(k)
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        direction = "highest" if desc else "lowest"
        cutoff = fmt(v[order[k - 1]]) if k else "n/a"
        for pos, i in enumerate(order[k:], start=k):
            reason[i] = "beyond_budget"
            detail[i] = f"rank {pos + 1} by {direction} {p.score} (= {fmt(v[i])}); budget {k}, cutoff {cutoff}"
        if not p.include_unscored:
            for i in nan_idx:
                reason[i], detail[i] = "unscored", f"{p.score} is NaN (no valid score)"
        stats = {"budget": k, "score": p.score, "descending": desc, "cutoff": None if not k else float(v[order[k - 1]])}
        return StepResult(keep, rank, "not_selected", reason, detail, stats)
