"""k-center greedy (Gonzalez farthest-first traversal; methods.md B2).

Choose ``k`` centres that minimise the largest distance from any row to its nearest centre (a
2-approximation). State: ``m[i]`` = squared distance from row i to its nearest centre. Each step
picks ``argmax m`` (ties: lowest row), records the radius before the pick, and updates ``m`` with one
matrix-vector product over all rows — O(n·d) per step, O(n) memory, never a (k × n) matrix.

Geometry: ``cosine`` (default) on unit vectors, squared chord distance ``2 − 2·cos``; or
``euclidean``. The loop is memory-bound, so it runs on one BLAS thread. A pre-selected set is
assigned with FAISS (exact inner-product search), which is where FAISS wins: one batched search
instead of one pass per centre.

Reported per row: the nearest centre and the distance to it at the end (cosine distance
``1 − cos`` for the cosine metric, Euclidean distance otherwise); the radius curve is in the stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from curate.select.base import BudgetParams, Pool, Selector, StepResult, fmt, read_ids


@dataclass
class KCenterResult:
    order: np.ndarray  # (k,) selected indices in pick order
    radii: np.ndarray  # (k,) squared radius before each pick (inf before the first)
    min_dist: np.ndarray  # (n,) squared distance to the nearest centre at the end
    nearest: np.ndarray  # (n,) index of that centre


def _sq_dists(X: np.ndarray, sq_norms: np.ndarray | None, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.dot(X, x, out=out)
    if sq_norms is None:  # unit vectors: |a-b|^2 = 2 - 2 a.b
        out *= -2.0
        out += 2.0
    else:
        out *= -2.0
        out += sq_norms
        out += float(x @ x)
    np.maximum(out, 0.0, out=out)
    return out


def kcenter_greedy(
    X: np.ndarray,
    k: int,
    first: int | None = None,
    already_selected: np.ndarray | None = None,
    metric: Literal["cosine", "euclidean"] = "cosine",
    progress=None,
) -> KCenterResult:
    """Farthest-first traversal over rows of ``X`` (n, d) float32.

    ``first``: the first centre when nothing is pre-selected. ``already_selected``: indices that are
    centres from the start (not part of the returned order). For ``cosine`` rows must be unit vectors.
    """
    from threadpoolctl import threadpool_limits

    n = X.shape[0]
    X = np.ascontiguousarray(X, dtype=np.float32)
    sq_norms = None if metric == "cosine" else np.einsum("ij,ij->i", X, X)
    m = np.full(n, np.inf, dtype=np.float32)
    nearest = np.full(n, -1, dtype=np.int64)
    buf = np.empty(n, dtype=np.float32)
    closer = np.empty(n, dtype=bool)

    if already_selected is not None and len(already_selected):
        import faiss

        C = X[already_selected]
        if metric == "cosine":
            index = faiss.IndexFlatIP(X.shape[1])
            index.add(C)
            sim, nn = index.search(X, 1)
            m[:] = np.maximum(2.0 - 2.0 * sim[:, 0], 0.0)
        else:
            index = faiss.IndexFlatL2(X.shape[1])
            index.add(C)
            dist, nn = index.search(X, 1)
            m[:] = dist[:, 0]
        nearest[:] = already_selected[nn[:, 0]]
        m[already_selected] = 0.0
        nearest[already_selected] = already_selected

    k = min(k, n - (0 if already_selected is None else len(already_selected)))
    order = np.empty(k, dtype=np.int64)
    radii = np.empty(k, dtype=np.float32)
    with threadpool_limits(1):
        for t in range(k):
            if t == 0 and (already_selected is None or not len(already_selected)):
                i = 0 if first is None else int(first)
                radii[t] = np.inf
            else:
                i = int(np.argmax(m))  # first maximum = lowest index
                radii[t] = m[i]
            order[t] = i
            _sq_dists(X, sq_norms, X[i], buf)
            np.less(buf, m, out=closer)
            np.copyto(m, buf, where=closer)
            nearest[closer] = i
            m[i] = 0.0
            nearest[i] = i
            if progress is not None:
                progress.advance(1)
    return KCenterResult(order, radii, m, nearest)


class KCenter(Selector):
    method = "kcenter"
    needs_embeddings = True

    class Params(BudgetParams):
        init: Literal["auto", "medoid", "max_score", "random"] = Field(
            "auto", description="First centre: auto = max_score when 'score' is set, else medoid."
        )
        score: str | None = Field(None, description="Quality score for init=max_score.")
        metric: Literal["cosine", "euclidean"] = "cosine"
        already_selected: str | None = Field(
            None, description="File of sample_ids already chosen (e.g. an earlier run's selected_ids.txt): they are centres from "
            "the start and the budget adds new rows to them."
        )

    def select(self, pool: Pool) -> StepResult:
        from curate.progress import stage_progress

        p = self.params
        n = len(pool)
        X = pool.embeddings
        k = min(p.resolve_budget(pool), n)
        init = p.init if p.init != "auto" else ("max_score" if p.score else "medoid")
        if init == "max_score":
            if not p.score:
                raise ValueError("kcenter init=max_score needs 'score'")
            v = pool.score(p.score)
            if np.isnan(v).all():
                raise ValueError(f"kcenter init=max_score: {p.score} has no finite value")
            first = int(np.nanargmax(v))
        elif init == "random":
            first = int(np.random.default_rng(self.seed(pool, "init")).integers(n))
        else:  # medoid: the row closest to the mean direction
            mean = X.mean(axis=0)
            first = int(np.argmax(X @ mean)) if p.metric == "cosine" else int(np.argmin(((X - mean) ** 2).sum(1)))
        keep = np.zeros(n, dtype=bool)
        rank = np.full(n, -1, dtype=np.int64)
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        pre = None
        if p.already_selected:
            wanted = set(read_ids(p.already_selected, self.base_dir))
            pre = np.array([i for i, sid in enumerate(pool.ids) if sid in wanted], dtype=np.int64)
            k = min(k, n - len(pre))
        if k == 0:
            return StepResult(keep, rank, "not_selected", ["beyond_budget"] * n, ["budget is 0"] * n, {"budget": 0})
        with stage_progress("select k-center", k) as bar:
            res = kcenter_greedy(X, k, first=first, already_selected=pre, metric=p.metric, progress=bar)
        keep[res.order] = True
        rank[res.order] = np.arange(k)
        dist = res.min_dist / 2.0 if p.metric == "cosine" else np.sqrt(res.min_dist)
        unit = "cosine distance" if p.metric == "cosine" else "distance"
        radius = float(dist.max())
        pre_set = set() if pre is None else set(pre.tolist())
        for i in np.flatnonzero(~keep):
            if i in pre_set:
                reason[i], detail[i] = "already_selected", f"in the pre-selected set ({p.already_selected}); a centre from the start"
                continue
            reason[i] = "covered"
            detail[i] = f"{unit} {fmt(dist[i])} to nearest centre (row {int(pool.rows[res.nearest[i]])}); final radius {fmt(radius)}"
        start = 0 if pre is not None and len(pre) else 1  # the first pick of a fresh run has no radius yet
        radii = res.radii[start:] / 2.0 if p.metric == "cosine" else np.sqrt(res.radii[start:])
        curve = [float(x) for x in radii[:: max(1, len(radii) // 20)]] if len(radii) else []
        stats = {"budget": k, "init": "already_selected" if start == 0 else init, "n_already_selected": len(pre_set),
                 "first_row": int(pool.rows[res.order[0]]), "metric": p.metric,
                 "final_radius": radius, "radius_curve": curve}
        return StepResult(keep, rank, "not_selected", reason, detail, stats)
