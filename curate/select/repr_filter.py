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

Large pools (1M rows): the pool's stored matrix is read as it is (a read-only memmap, float32 or
float16), a block of candidates gathered and converted to float32 at a time; the kept rows' vectors
live in one float32 buffer that grows by doubling (at most the kept rows: ``budget`` × d), and a
block is compared with them in chunks of ``kept_chunk`` rows, so no temporary grows with the pool.
Memory beyond the matrix: O(n) per-row state plus the kept buffer. Time: O(rows visited × kept × d),
in GEMMs; with a budget the walk stops when it is full.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from curate.select.base import Pool, Selector, StepResult, fmt, ranked_order


def repr_filter(X: np.ndarray, order: np.ndarray, tau: float, budget: int | None, block: int = 512, index: np.ndarray | None = None,
                kept_chunk: int = 16384, threads: int = 2):
    """(kept indices in visit order, blocker index per row or −1, similarity to it, rows visited).

    ``X``: (N, d) float32 or float16 (a memmap is read in place); ``index``: the rows of ``X`` that are
    this pool (pool row j is ``X[index[j]]``; None: all of X). ``order`` lists pool rows to visit.
    """
    from threadpoolctl import threadpool_limits

    n = X.shape[0] if index is None else len(index)
    d = X.shape[1]
    work = np.float32 if X.dtype == np.float16 else np.result_type(X.dtype, np.float32)  # float16 is compared in float32
    blocker = np.full(n, -1, dtype=np.int64)
    blocker_sim = np.full(n, np.nan)
    cap = budget if budget is not None else len(order)
    kept_idx = np.empty(min(cap, len(order)), dtype=np.int64)
    kept_mat = np.empty((min(max(cap, 1), len(order), 4096), d), dtype=work)  # grows by doubling up to the cap
    n_kept = 0
    visited = 0
    with threadpool_limits(threads):
        for start in range(0, len(order), block):
            if n_kept >= cap:
                break
            blk = order[start : start + block]
            E = np.asarray(X[blk if index is None else index[blk]], dtype=work)
            if n_kept:
                m = np.full(len(blk), -np.inf, dtype=work)
                who = np.full(len(blk), -1, dtype=np.int64)
                for c0 in range(0, n_kept, kept_chunk):  # chunks of the kept set: first maximum wins across chunks
                    c1 = min(c0 + kept_chunk, n_kept)
                    S = E @ kept_mat[c0:c1].T
                    best = S.argmax(axis=1)
                    val = S[np.arange(len(blk)), best]
                    upd = val > m
                    m[upd] = val[upd]
                    who[upd] = kept_idx[c0 + best[upd]]
            else:
                m = np.full(len(blk), -np.inf, dtype=np.float32)
                who = np.full(len(blk), -1)
            inner = E @ E.T
            new = []
            for a, i in enumerate(blk):
                if n_kept + len(new) >= cap:
                    break
                visited += 1
                if m[a] > tau:
                    blocker[i], blocker_sim[i] = who[a], m[a]
                    continue
                new.append(a)
                row = inner[a]
                upd = row > m
                m = np.where(upd, row, m)
                who = np.where(upd, i, who)
            if new:
                rows_new = np.asarray(new)
                end = n_kept + len(new)
                if end > len(kept_mat):
                    grown = np.empty((min(max(2 * len(kept_mat), end), len(kept_idx)), d), dtype=work)
                    grown[:n_kept] = kept_mat[:n_kept]
                    kept_mat = grown
                kept_mat[n_kept:end] = E[rows_new]
                kept_idx[n_kept:end] = blk[rows_new]
                n_kept = end
    return kept_idx[:n_kept].copy(), blocker, blocker_sim, visited


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
        base, index = pool.embedding_source()  # the stored matrix read in place, with this pool's positions in it
        if not isinstance(base, np.ndarray):
            base, index = np.asarray(pool.embeddings), None
        kept, blocker, bsim, visited = repr_filter(base, order, p.max_similarity, p.budget, index=index)
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
        stats = {"max_similarity": p.max_similarity, "budget": p.budget, "kept": int(len(kept)),
                 "rejected_similar": int((blocker >= 0).sum()),
                 "visited": len(reached), "near_ties": near}
        return StepResult(keep, rank, "not_selected", reason, detail, stats)
