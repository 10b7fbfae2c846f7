"""deita Repr Filter (methods.md B1): score first, diversity-aware.

Walk the rows from the highest score down (stable: score descending, then input row); keep a row
unless its cosine similarity to some row already kept exceeds ``max_similarity`` (τ, default 0.9;
exactly τ is kept, as the reference); stop when ``budget`` rows are kept (no budget = no cap).

Exact and fast: candidates are visited in blocks; one matrix product gives each block's similarity
to every row kept before the block, a second the similarities inside the block, and a short loop
decides the block's rows one by one in order — the same decisions as the one-by-one algorithm, with
GEMMs instead of a growing per-row gather. Rejected rows name the kept row that blocked them and the
similarity; rows never reached because the budget was full say so. Near-ties (|sim − τ| < 1e−6) are
counted in the stats.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from curate.select.base import Pool, Selector, StepResult, fmt, ranked_order


def repr_filter(X: np.ndarray, order: np.ndarray, tau: float, budget: int | None, block: int = 512):
    """(kept indices in visit order, blocker index per row or −1, similarity to it, rows visited)."""
    from threadpoolctl import threadpool_limits

    n = len(X)
    blocker = np.full(n, -1, dtype=np.int64)
    blocker_sim = np.full(n, np.nan)
    kept: list[int] = []
    kept_mat = np.empty((0, X.shape[1]), dtype=np.float32)
    visited = 0
    cap = budget if budget is not None else len(order)
    with threadpool_limits(2):
        for start in range(0, len(order), block):
            if len(kept) >= cap:
                break
            blk = order[start : start + block]
            E = X[blk]
            if len(kept_mat):
                S = E @ kept_mat.T
                best = S.argmax(axis=1)
                m = S[np.arange(len(blk)), best]
                who = np.asarray(kept)[best]
            else:
                m = np.full(len(blk), -np.inf, dtype=np.float32)
                who = np.full(len(blk), -1)
            inner = E @ E.T
            new = []
            for a, i in enumerate(blk):
                if len(kept) + len(new) >= cap:
                    break
                visited += 1
                if m[a] > tau:
                    blocker[i], blocker_sim[i] = who[a], m[a]
                    continue
                new.append(i)
                row = inner[a]
                upd = row > m
                m = np.where(upd, row, m)
                who = np.where(upd, i, who)
            if new:
                kept += new
                kept_mat = np.concatenate([kept_mat, X[np.array(new)]])
    return np.array(kept, dtype=np.int64), blocker, blocker_sim, visited


def repr_filter_one_by_one(X: np.ndarray, order: np.ndarray, tau: float, budget: int | None) -> np.ndarray:
    """The reference algorithm (batch_size 1): each candidate against the kept set, gathered anew."""
    kept: list[int] = []
    for i in order:
        if budget is not None and len(kept) >= budget:
            break
        if kept:
            sims = X[np.array(kept)] @ X[i]
            if (sims > tau).any():
                continue
        kept.append(int(i))
    return np.array(kept, dtype=np.int64)


class ReprFilter(Selector):
    method = "repr_filter"
    needs_embeddings = True

    class Params(Selector.Params):
        score: str = Field(description="The score to walk down, e.g. deita.evol.")
        max_similarity: float = Field(0.9, description="τ: reject a row whose cosine similarity to a kept row exceeds this.")
        budget: int | None = Field(None, gt=0, description="Rows to keep (deita's data_size); none = no cap.")
        include_unscored: bool = False

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        n = len(pool)
        v = pool.score(p.score)
        order = ranked_order(v, pool.rows, descending=pool.orientation.get(p.score) != "lower_is_better")
        nan_idx = np.flatnonzero(np.isnan(v))
        if p.include_unscored:
            order = np.concatenate([order, nan_idx])
        kept, blocker, bsim, visited = repr_filter(pool.embeddings, order, p.max_similarity, p.budget)
        keep = np.zeros(n, dtype=bool)
        keep[kept] = True
        rank = np.full(n, -1, dtype=np.int64)
        rank[kept] = np.arange(len(kept))
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        for i in np.flatnonzero(blocker >= 0):
            reason[i] = "too_similar"
            detail[i] = f"cosine similarity {fmt(bsim[i])} > {p.max_similarity} to kept row {int(pool.rows[blocker[i]])}"
        reached = set(order[:visited].tolist())
        for i in order[visited:]:
            reason[i], detail[i] = "beyond_budget", f"not reached: the budget of {p.budget} rows was filled"
        if not p.include_unscored:
            for i in nan_idx:
                reason[i], detail[i] = "unscored", f"{p.score} is NaN (no valid score)"
        near = int(np.sum(np.abs(bsim[blocker >= 0] - p.max_similarity) < 1e-6))
        stats = {"max_similarity": p.max_similarity, "budget": p.budget, "kept": int(len(kept)), "rejected_similar": int((blocker >= 0).sum()),
                 "visited": len(reached), "near_ties": near}
        return StepResult(keep, rank, "not_selected", reason, detail, stats)
