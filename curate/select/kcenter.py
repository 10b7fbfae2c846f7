"""k-center greedy (Gonzalez farthest-first traversal; methods.md B2).

Choose ``k`` centres that minimise the largest distance from any row to its nearest centre (a
2-approximation). State: ``m[i]`` = squared distance from row i to its nearest centre. Each step
picks ``argmax m`` (ties: lowest row), records the radius before the pick, and updates ``m`` with one
matrix-vector product over all rows — O(n·d) per step, O(n) memory, never a (k × n) matrix.

Geometry: ``cosine`` (default) on unit vectors, squared chord distance ``2 − 2·cos``; or
``euclidean``. The loop is memory-bound, so it runs on one BLAS thread (``threads``). A pre-selected
set is assigned with FAISS (exact inner-product search), which is where FAISS wins: one batched
search instead of one pass per centre.

Large pools: the matrix is read in blocks of rows (the store's read-only memmap is used as it is,
nothing the size of the matrix is allocated), with preallocated per-block buffers; a float16 matrix
is converted to float32 one block at a time (torch's vectorised conversion) and the distances are
computed in float32. A pool no larger than one block is one block: one matrix-vector product per step.

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


#: rows per block of the distance pass (float32 / float16 matrices)
BLOCK_ROWS = {np.dtype(np.float32): 65536, np.dtype(np.float16): 8192}


class BlockReader:
    """Rows ``s:e`` of ``X`` as float32: a view of a float32 matrix, or a float16 block converted
    into a preallocated buffer (torch's SIMD conversion). ``dot(s, e, x, out)``: ``X[s:e] @ x``."""

    def __init__(self, X: np.ndarray, block: int | None = None):
        self.X = X
        self.n, self.d = X.shape
        self.half = X.dtype == np.float16
        self.block = int(block or BLOCK_ROWS.get(X.dtype, 65536))
        if self.half:
            import torch

            import warnings

            self._torch = torch
            with warnings.catch_warnings():  # a read-only memmap: torch warns it is not writable; it is only read here
                warnings.simplefilter("ignore", UserWarning)
                self._src = torch.from_numpy(np.asarray(X))
            self._buf = torch.empty((min(self.block, self.n), self.d), dtype=torch.float32)

    def spans(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.block, self.n)) for s in range(0, self.n, self.block)]

    def rows(self, s: int, e: int) -> np.ndarray:
        if not self.half:
            return self.X[s:e]
        buf = self._buf[: e - s]
        buf.copy_(self._src[s:e])
        return buf.numpy()

    def row(self, i: int) -> np.ndarray:
        return np.asarray(self.X[i], dtype=np.float32)

    def dot(self, s: int, e: int, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        if not self.half:
            return np.dot(self.X[s:e], x, out=out)
        buf = self._buf[: e - s]
        buf.copy_(self._src[s:e])
        t = self._torch
        t.mv(buf, t.from_numpy(x), out=t.from_numpy(out))
        return out


def _sq_dists(sq_norms: np.ndarray | None, x: np.ndarray, out: np.ndarray, reader: BlockReader, s: int, e: int) -> np.ndarray:
    """Squared distances of rows ``s:e`` (one block) to ``x`` into ``out``."""
    reader.dot(s, e, x, out)
    if sq_norms is None:  # unit vectors: |a-b|^2 = 2 - 2 a.b
        out *= -2.0
        out += 2.0
    else:
        out *= -2.0
        out += sq_norms[s:e]
        out += float(x @ x)
    np.maximum(out, 0.0, out=out)
    return out


def _as_matrix(X: np.ndarray) -> np.ndarray:
    """float32 and float16 matrices (a memmap included) as they are; anything else as float32."""
    if isinstance(X, np.ndarray) and X.dtype in (np.float32, np.float16) and X.flags.c_contiguous:
        return X
    return np.ascontiguousarray(X, dtype=np.float32)


def medoid(X: np.ndarray, metric: str = "cosine", block: int | None = None) -> int:
    """The row closest to the mean (cosine: the largest dot product with the mean direction).
    One block: ``X.mean`` and one product, as always; larger: accumulated block by block in float64."""
    X = _as_matrix(X)
    reader = BlockReader(X, block)
    if len(reader.spans()) <= 1:
        Xf = reader.rows(0, len(X)) if len(X) else X.astype(np.float32)
        mean = Xf.mean(axis=0)
        return int(np.argmax(Xf @ mean)) if metric == "cosine" else int(np.argmin(((Xf - mean) ** 2).sum(1)))
    total = np.zeros(X.shape[1], dtype=np.float64)
    for s, e in reader.spans():
        total += reader.rows(s, e).sum(axis=0, dtype=np.float64)
    mean = (total / len(X)).astype(np.float32)
    best_i, best = -1, None
    buf = np.empty(reader.block, dtype=np.float32)
    for s, e in reader.spans():
        if metric == "cosine":
            v = reader.dot(s, e, mean, buf[: e - s])
            j = int(np.argmax(v))
            better = best is None or v[j] > best
        else:
            R = reader.rows(s, e)
            v = ((R - mean) ** 2).sum(1)
            j = int(np.argmin(v))
            better = best is None or v[j] < best
        if better:
            best_i, best = s + j, float(v[j])
    return best_i


def kcenter_greedy(
    X: np.ndarray,
    k: int,
    first: int | None = None,
    already_selected: np.ndarray | None = None,
    metric: Literal["cosine", "euclidean"] = "cosine",
    progress=None,
    block: int | None = None,
    threads: int = 1,
) -> KCenterResult:
    """Farthest-first traversal over rows of ``X`` (n, d): float32 or float16 (a read-only memmap
    is read as it is, in blocks of ``block`` rows; other dtypes are converted to float32 first).

    ``first``: the first centre when nothing is pre-selected. ``already_selected``: indices that are
    centres from the start (not part of the returned order). For ``cosine`` rows must be unit vectors.
    ``threads``: BLAS (and torch) threads of the distance pass.
    """
    from threadpoolctl import threadpool_limits

    n = X.shape[0]
    X = _as_matrix(X)
    reader = BlockReader(X, block)
    spans = reader.spans()
    sq_norms = None
    if metric != "cosine":
        sq_norms = np.empty(n, dtype=np.float32)
        for s, e in spans:
            R = reader.rows(s, e)
            sq_norms[s:e] = np.einsum("ij,ij->i", R, R)
    m = np.full(n, np.inf, dtype=np.float32)
    nearest = np.full(n, -1, dtype=np.int64)
    buf = np.empty(min(n, reader.block), dtype=np.float32)
    closer = np.empty(len(buf), dtype=bool)

    if already_selected is not None and len(already_selected):
        import faiss

        C = np.ascontiguousarray(np.asarray(X[already_selected], dtype=np.float32))
        index = faiss.IndexFlatIP(X.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(X.shape[1])
        index.add(C)
        for s, e in spans:
            Q = np.ascontiguousarray(reader.rows(s, e))
            score, nn = index.search(Q, 1)
            m[s:e] = np.maximum(2.0 - 2.0 * score[:, 0], 0.0) if metric == "cosine" else score[:, 0]
            nearest[s:e] = already_selected[nn[:, 0]]
        m[already_selected] = 0.0
        nearest[already_selected] = already_selected

    k = min(k, n - (0 if already_selected is None else len(already_selected)))
    order = np.empty(k, dtype=np.int64)
    radii = np.empty(k, dtype=np.float32)
    torch_threads = None
    if reader.half:
        torch_threads = reader._torch.get_num_threads()
        reader._torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            for t in range(k):
                if t == 0 and (already_selected is None or not len(already_selected)):
                    i = 0 if first is None else int(first)
                    radii[t] = np.inf
                else:
                    i = int(np.argmax(m))  # first maximum = lowest index
                    radii[t] = m[i]
                order[t] = i
                x = reader.row(i)
                for s, e in spans:
                    b, c, mb = buf[: e - s], closer[: e - s], m[s:e]
                    _sq_dists(sq_norms, x, b, reader, s, e)
                    np.less(b, mb, out=c)
                    np.copyto(mb, b, where=c)
                    np.copyto(nearest[s:e], i, where=c)
                m[i] = 0.0
                nearest[i] = i
                if progress is not None:
                    progress.advance(1)
    finally:
        if torch_threads is not None:
            reader._torch.set_num_threads(torch_threads)
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
        base, index = pool.embedding_source()
        # the whole pool: the stored matrix as it is (a memmap); a subset: its rows, once, in the stored dtype
        X = _as_matrix(base if index is None else base[index])
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
            first = medoid(X, p.metric)
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
