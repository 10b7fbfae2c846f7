"""SMART — submodular data mixture (methods.md B4).

1. Task representation: the mean of the task's instance embeddings (embed the prompt: ``embed.text:
   prompt``), not renormalised — the objective normalises where it needs unit vectors.
2. Stage 1: choose ``num_tasks`` tasks with a submodular function over the task vectors (default
   graph cut, λ = 0.4, closed form on L2-normalised task vectors; lazy greedy as the reference).
3. Mixture weights: the second-order Taylor softmax of the raw greedy gains,
   ``p_j ∝ 1 + g_j + g_j²/2`` (peaked on purpose; not normalised).
4. Integer split of the budget: floors of ``N·p_j``, the remainder +1 at a time round-robin from the
   highest-gain task; a task with fewer rows than its share is capped and the overflow redistributed
   the same way over unsaturated tasks. The split always sums to the budget (or to every row of the
   chosen tasks when they hold fewer — reported).
5. Stage 2: inside each chosen task, the task's budget by facility location (cosine; greedy prefix —
   exactly the first b_t of the full ordering, computed to b_t only).

Task labels come from the record's ``task`` (an input's ``task`` or ``task_field``); rows without one
are a single task named by their source. The template-type split of the reference is not applied
(one template group per task).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from curate.select.base import BudgetParams, Pool, Selector, StepResult, fmt
from curate.select.submodular import EmbeddingKernel, FacilityLocation, GraphCut, LogDeterminant, maximize


def taylor_softmax(gains: np.ndarray) -> np.ndarray:
    w = 1 + gains + gains ** 2 / 2
    return w / w.sum()


def budget_split(total: int, weights: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Integer budgets: floors, then +1 round-robin from index 0 (highest gain first), capped at each
    task's size with the overflow redistributed round-robin over unsaturated tasks."""
    total = min(int(total), int(sizes.sum()))
    b = np.floor(total * weights / weights.sum()).astype(np.int64)
    b = np.minimum(b, sizes)
    i = 0
    while b.sum() < total:
        j = i % len(b)
        if b[j] < sizes[j]:
            b[j] += 1
        i += 1
    return b


class Smart(Selector):
    method = "smart"
    needs_embeddings = True

    class Params(BudgetParams):
        num_tasks: int = Field(8, gt=0, description="M′: tasks in the mixture.")
        task_objective: Literal["graph_cut", "facility_location", "log_determinant", "random"] = "graph_cut"
        instance_objective: Literal["facility_location", "graph_cut", "log_determinant", "random"] = "facility_location"
        task_lambda: float = Field(0.4, ge=0, description="λ of a graph-cut (0.4) or log-determinant (1.0) task objective.")
        instance_lambda: float = Field(0.4, ge=0)

    def _objective(self, name: str, X: np.ndarray, lam: float):
        if name == "facility_location":
            return FacilityLocation(EmbeddingKernel(X))
        if name == "graph_cut":
            return GraphCut(EmbeddingKernel(X), lam)
        return LogDeterminant(EmbeddingKernel(X), lam if lam > 0 else 1.0)

    def _order(self, name: str, X: np.ndarray, budget: int, lam: float, purpose: str, pool: Pool):
        if name == "random":
            rng = np.random.default_rng(self.seed(pool, purpose))
            perm = rng.permutation(len(X))[:budget]
            return perm, np.ones(len(perm))
        res = maximize(self._objective(name, X, lam), budget, "lazy")
        return res.ranking, res.gains

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        n = len(pool)
        labels = [t if t is not None else f"source:{s}" for t, s in zip(pool.tasks or [None] * n, pool.sources or ["?"] * n)]
        names = sorted(set(labels))
        members = {t: np.flatnonzero(np.array([lab == t for lab in labels])) for t in names}
        T = np.stack([pool.embeddings[members[t]].mean(axis=0) for t in names]).astype(np.float32)
        Tn = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
        m = min(p.num_tasks, len(names))
        order, gains = self._order(p.task_objective, Tn, m, p.task_lambda, "tasks", pool)
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
        for t, g, w, b in zip(chosen, gains, weights, budgets):
            rows = members[t]
            picks, pg = self._order(p.instance_objective, pool.embeddings[rows], int(b), p.instance_lambda, f"task:{t}", pool)
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
                 "task_budgets": budgets.tolist()}
        return StepResult(keep, rank, "not_selected", reason, detail, stats, columns={"gain": gain_col})

