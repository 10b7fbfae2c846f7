"""Seeded random sample of ``budget`` rows (a baseline every paper compares against).

The seed is derived from the run seed, the method and the step position, so the draw does not
depend on sharding or row order of other inputs; ``seed`` overrides it."""

from __future__ import annotations

import numpy as np

from curate.select.base import BudgetParams, Pool, Selector, StepResult


class RandomSample(Selector):
    method = "random"

    class Params(BudgetParams):
        seed: int | None = None

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        n = len(pool)
        k = min(p.resolve_budget(pool), n)
        seed = p.seed if p.seed is not None else self.seed(pool)
        rng = np.random.default_rng(seed)
        # order by row first so the draw is a function of the candidate set, not of its order
        by_row = np.argsort(pool.rows, kind="stable")
        picked = by_row[rng.permutation(n)[:k]]
        keep = np.zeros(n, dtype=bool)
        keep[picked] = True
        rank = np.full(n, -1, dtype=np.int64)
        rank[picked] = np.arange(k)
        reason = [None if keep[i] else "not_drawn" for i in range(n)]
        detail = [None if keep[i] else f"not among the {k} rows drawn (seed {seed})" for i in range(n)]
        return StepResult(keep, rank, "not_selected", reason, detail, {"budget": k, "seed": seed})
