"""SMART — submodular data mixture (methods.md B4).

1. Task representation: the mean of the task's instance embeddings (embed the prompt: ``embed.text:
   prompt``), not renormalised — the objective normalises where it needs unit vectors.
2. Stage 1: choose ``num_tasks`` tasks with a submodular function over the task vectors (default
   graph cut, λ = 0.4, closed form on L2-normalised task vectors; log-determinant λ = 1). Graph cut
   on the signed cosine kernel is not submodular: lazy greedy runs submodlib's LazyGreedy heap step
   for step, as the reference does (``task_optimizer`` in the stats).
3. Mixture weights: the second-order Taylor softmax of the raw greedy gains,
   ``p_j ∝ 1 + g_j + g_j²/2`` (peaked on purpose; not normalised).
4. Integer split of the budget, in the reference's order: floors of ``N·p_j``, the remainder +1 at a
   time round-robin from the highest-gain task (no capacity check); then each budget is clipped to
   its task's size and the overflow handed out +1 per pass from the highest-gain task over tasks with
   room. The split sums to the budget (or to every row of the chosen tasks when they hold fewer —
   reported; the reference raises).
5. Stage 2: inside each chosen task, the task's budget by facility location (cosine; greedy prefix —
   exactly the first b_t of the full ordering, computed to b_t only).

Stage 2 on a large task: a task of more than ``knn_threshold`` rows (``kernel: auto``) runs facility
location or graph cut over a sparse kNN graph of its rows (:mod:`curate.select.submodular.knn`, the
same settings as the submodular steps: ``knn``, ``knn_index``, …); the stats list each such graph
(``instance_knn``: task, index, times, recall@k on a sample). Log-determinant and the task stage
always use exact kernels.

Task labels come from the record's ``task`` (an input's ``task`` or ``task_field``); rows without one
are a single task named by their source. The template-type split of the reference is not applied
(one template group per task).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from curate.select.base import BudgetParams, Pool, Selector, StepResult, fmt
from curate.select.submodular import EmbeddingKernel, FacilityLocation, GraphCut, LogDeterminant, SparseKernel, maximize
from curate.select.submodular.knn import KnnParams


def taylor_softmax(gains: np.ndarray) -> np.ndarray:
    w = 1 + gains + gains ** 2 / 2
    return w / w.sum()


def budget_split(total: int, weights: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Integer budgets (int64, one per task in greedy order) in the reference's order of operations:

    1. floors ``⌊N·w_j/Σw⌋``, the remainder +1 at a time round-robin from index 0 (the highest-gain
       task), with no capacity check;
    2. clip each budget to its task's size and sum the overflow;
    3. hand the overflow out +1 per pass over the tasks from index 0, skipping full tasks.

    ``N`` is ``min(total, Σ sizes)``: the split sums to the budget, or to every row of the chosen tasks
    when they hold fewer (the reference raises there).
    """
    total = min(int(total), int(sizes.sum()))
    b = np.floor(total * weights / weights.sum()).astype(np.int64)
    for i in range(total - int(b.sum())):
        b[i % len(b)] += 1
    overflow = int(np.maximum(b - sizes, 0).sum())
    b = np.minimum(b, sizes)
    while overflow > 0:
        for j in range(len(b)):
            if overflow > 0 and b[j] < sizes[j]:
                b[j] += 1
                overflow -= 1
    return b


DEFAULT_LAMBDA = {"graph_cut": 0.4, "log_determinant": 1.0}  # methods.md B4


class Smart(Selector):
    method = "smart"
    needs_embeddings = True

    class Params(BudgetParams, KnnParams):
        num_tasks: int = Field(8, gt=0, description="M′: tasks in the mixture.")
        task_objective: Literal["graph_cut", "facility_location", "log_determinant", "random"] = "graph_cut"
        instance_objective: Literal["facility_location", "graph_cut", "log_determinant", "random"] = "facility_location"
        task_lambda: float | None = Field(None, ge=0, description="λ of the task objective; default per objective: graph cut 0.4, "
                                                                   "log-determinant 1.0 (B4).")
        instance_lambda: float | None = Field(None, ge=0, description="λ of the instance objective; default per objective as task_lambda.")
        ties: Literal["lowest", "larger"] = Field("lowest", description="Equal gains: lowest index (E2), or larger index with "
                                                                         "submodlib's LazyGreedy heap step for step (parity).")

    @staticmethod
    def _objective(name: str, X: np.ndarray, lam: float | None, kernel=None):
        lam = DEFAULT_LAMBDA.get(name) if lam is None else lam
        if name == "facility_location":
            return FacilityLocation(kernel or EmbeddingKernel(X))
        if name == "graph_cut":
            return GraphCut(kernel or EmbeddingKernel(X), lam)
        if lam <= 0:
            raise ValueError("smart: a log-determinant objective needs λ > 0 (default 1)")
        return LogDeterminant(EmbeddingKernel(X), lam)

    def _order(self, name: str, X: np.ndarray, budget: int, lam: float | None, purpose: str, pool: Pool, graphs: list | None = None):
        """(ranking, gains, optimizer variant) of ``budget`` rows of X (n × d) by objective ``name``; with
        ``graphs`` (stage 2) a large enough X runs facility location / graph cut over a kNN graph,
        whose stats are appended to ``graphs``."""
        if name == "random":
            rng = np.random.default_rng(self.seed(pool, purpose))
            perm = rng.permutation(len(X))[:budget]
            return perm, np.ones(len(perm)), "random"
        kernel = None
        if graphs is not None and name in ("facility_location", "graph_cut") and self.params.use_graph(len(X)):
            graph = self.params.graph(X, self.seed(pool, f"knn:{purpose}"))
            graphs.append({"group": purpose, **graph.stats})
            kernel = SparseKernel.from_graph(graph)
        res = maximize(self._objective(name, X, lam, kernel), budget, "lazy", ties=self.params.ties)
        return res.ranking, res.gains, res.variant

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        n = len(pool)
        tasks = [None] * n if pool.tasks is None else pool.tasks
        sources = ["?"] * n if pool.sources is None else pool.sources
        labels = [t if t is not None else f"source:{s}" for t, s in zip(tasks, sources)]
        uniq, inverse = np.unique(np.array(labels, dtype=str), return_inverse=True)  # sorted like sorted(set(labels))
        names = uniq.tolist()
        order = np.argsort(inverse, kind="stable")
        members = dict(zip(names, np.split(order, np.cumsum(np.bincount(inverse, minlength=len(names)))[:-1])))
        T = np.stack([np.asarray(pool.embeddings[members[t]], dtype=np.float32).mean(axis=0) for t in names]).astype(np.float32)
        Tn = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
        m = min(p.num_tasks, len(names))
        order, gains, task_variant = self._order(p.task_objective, Tn, m, p.task_lambda, "tasks", pool)
        chosen = [names[i] for i in order]
        weights = taylor_softmax(np.asarray(gains, dtype=np.float64))
        sizes = np.array([len(members[t]) for t in chosen])
        total = p.resolve_budget(pool)
        budgets = budget_split(total, weights, sizes)
        keep = np.zeros(n, dtype=bool)
        rank = np.full(n, -1, dtype=np.int64)
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        gain_col = np.full(n, np.nan)
        r = 0
        instance_variants = set()
        graphs: list[dict] = []
        for t, g, w, b in zip(chosen, gains, weights, budgets):
            rows = members[t]
            X = pool.embedding_rows(rows)
            picks, pg, variant = self._order(p.instance_objective, X, int(b), p.instance_lambda, f"task:{t}", pool, graphs)
            instance_variants.add(variant)
            picked = rows[picks]
            keep[picked] = True
            rank[picked] = np.arange(r, r + len(picked))
            gain_col[picked] = pg
            r += len(picked)
            for i in np.setdiff1d(rows, picked):
                reason[i], detail[i] = "low_gain", f"task {t}: not among its {b} picks (task gain {fmt(g)}, weight {w:.3f})"
        for t in names:
            if t not in chosen:
                for i in members[t]:
                    reason[i], detail[i] = "task_not_chosen", f"task {t} is not among the {m} tasks chosen by {p.task_objective}"
        stats = {"budget": int(budgets.sum()), "requested": total, "tasks_in_pool": len(names), "tasks": chosen,
                 "task_gains": [round(float(x), 4) for x in gains], "weights": [round(float(x), 4) for x in weights],
                 "task_budgets": budgets.tolist(), "task_optimizer": task_variant, "instance_optimizer": sorted(instance_variants)}
        if graphs:
            stats["instance_knn"] = graphs
        return StepResult(keep, rank, "not_selected", reason, detail, stats, columns={"gain": gain_col})

