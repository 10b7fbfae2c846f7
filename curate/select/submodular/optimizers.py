"""Greedy maximisers — a separate axis from the objectives, as in apricot.

Each returns :class:`GreedyResult`: ``ranking`` (indices in selection order), ``gains`` (the
marginal gain of each pick, float64), ``evaluations`` (gains computed) and ``variant`` (which
algorithm ran — recorded in the step's stats).

- ``naive``: every step evaluates every remaining candidate (vectorised); ties → lowest index, or →
  larger index with ``ties="larger"`` (submodlib's NaiveGreedy walks its ground set from the largest
  index down and keeps the first strict maximum).
- ``lazy`` runs one of two algorithms:

  - ``lazy-heap`` — submodlib's LazyGreedy step for step: a max-heap of (stale gain, index); pop the
    top, re-evaluate it, accept it when the new gain is ≥ the next entry's stale bound, else push it
    back. Used for objectives that are not submodular (graph cut on a signed kernel: a stale bound
    is then no upper bound, so the result depends on this exact procedure), and for every objective
    under ``ties="larger"`` (parity: even on a submodular objective the accept rule decides between
    equal gains). Ties in the heap → lowest index (methods.md E2) or → larger index (submodlib's
    ``std::less`` heap on (gain, index)).
  - ``lazy-batched`` — for submodular objectives under ``ties="lowest"``: while the heap's top is
    stale, the ``batch`` stalest bounds at the top are re-evaluated together (one kernel block instead
    of one column each); a top evaluated against the current selection is the true maximum since
    every other entry is an upper bound. Identical to naive greedy, ties → lowest index.
  - ``lazy-incremental`` — submodular objectives over a sparse kNN kernel (``obj.incremental``) under
    ``ties="lowest"``: every gain is held in an array; after a pick only the candidates the objective
    lists in ``obj.changed`` (those sharing a graph row with the pick) are recomputed, and the next
    pick is the array's maximum, lowest index first. Every held gain is the current one, so this is
    naive greedy's ranking at the cost of the touched neighbourhoods plus one argmax per step.
- ``stochastic``: each step evaluates ⌈(n/k)·ln(1/ε)⌉ random remaining candidates (ε = 0.1), from a
  seeded generator — an approximation, recorded.

An objective says whether it is submodular with a ``submodular`` attribute (True when absent).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

TIES = ("lowest", "larger")


@dataclass
class GreedyResult:
    ranking: np.ndarray
    gains: np.ndarray
    evaluations: int
    variant: str = ""


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"unknown tie rule '{ties}' ({', '.join(TIES)})")


def naive_greedy(obj, budget: int, progress=None, ties: str = "lowest") -> GreedyResult:
    _check_ties(ties)
    remaining = np.ones(obj.n, dtype=bool)
    ranking, gains, evals = [], [], 0
    for _ in range(min(budget, obj.n)):
        cols = np.flatnonzero(remaining)
        g = obj.gains(cols)
        evals += len(cols)
        best = int(np.argmax(g)) if ties == "lowest" else len(g) - 1 - int(np.argmax(g[::-1]))
        j = int(cols[best])
        ranking.append(j)
        gains.append(float(g[best]))
        obj.add(j)
        remaining[j] = False
        if progress is not None:
            progress.advance(1)
    return GreedyResult(np.array(ranking, dtype=np.int64), np.array(gains), evals, "naive")


def heap_lazy_greedy(obj, budget: int, ties: str = "lowest", progress=None) -> GreedyResult:
    """submodlib's LazyGreedy: heap entries (−stale gain, tie key, index); pop the top, re-evaluate
    it against the current selection, accept it if its new gain is ≥ the stale gain now on top
    (or the heap is empty), otherwise push it back with the new gain. One column per evaluation."""
    _check_ties(ties)
    sign = 1 if ties == "lowest" else -1
    heap = [(-float(g), sign * j, j) for j, g in enumerate(obj.gains(np.arange(obj.n)))]
    heapq.heapify(heap)
    evals = obj.n
    ranking, gains = [], []
    k = min(budget, obj.n)
    while len(ranking) < k:
        _, key, j = heapq.heappop(heap)
        g = obj.gain(j)
        evals += 1
        if heap and g < -heap[0][0]:
            heapq.heappush(heap, (-g, key, j))
            continue
        ranking.append(j)
        gains.append(g)
        obj.add(j)
        if progress is not None:
            progress.advance(1)
    return GreedyResult(np.array(ranking, dtype=np.int64), np.array(gains), evals, "lazy-heap")


def batched_lazy_greedy(obj, budget: int, progress=None, batch: int = 64) -> GreedyResult:
    """Lazy greedy for submodular objectives (ties → lowest index): while the top is stale, re-evaluate
    the ``batch`` stalest bounds at the top in one block; take a top that is fresh."""
    init = obj.gains(np.arange(obj.n))
    step = 0
    heap = [(-float(g), j, step) for j, g in enumerate(init)]  # (−gain, index, step evaluated)
    heapq.heapify(heap)
    evals = obj.n
    ranking, gains = [], []
    k = min(budget, obj.n)
    while heap and len(ranking) < k:
        if heap[0][2] == step:
            neg, j, _ = heapq.heappop(heap)
            ranking.append(j)
            gains.append(-neg)
            obj.add(j)
            step += 1
            if progress is not None:
                progress.advance(1)
            continue
        stale = []
        while heap and len(stale) < batch and heap[0][2] != step:
            stale.append(heapq.heappop(heap))
        cols = np.array([e[1] for e in stale])
        fresh = obj.gains(cols)
        evals += len(cols)
        for j, g in zip(cols.tolist(), fresh):
            heapq.heappush(heap, (-float(g), j, step))
    return GreedyResult(np.array(ranking, dtype=np.int64), np.array(gains), evals, "lazy-batched")


def incremental_greedy(obj, budget: int, progress=None) -> GreedyResult:
    """Exact greedy (ties → lowest index) keeping every current gain: after ``obj.add(j)`` only the
    candidates in ``obj.changed`` are re-evaluated."""
    current = np.asarray(obj.gains(np.arange(obj.n)), dtype=np.float64).copy()
    evals = obj.n
    taken = np.zeros(obj.n, dtype=bool)
    ranking, gains = [], []
    for _ in range(min(budget, obj.n)):
        j = int(np.argmax(current))
        ranking.append(j)
        gains.append(float(current[j]))
        obj.add(j)
        taken[j] = True
        current[j] = -np.inf
        touched = np.asarray(obj.changed, dtype=np.int64)
        touched = touched[~taken[touched]]
        if len(touched):
            current[touched] = obj.gains(touched)
            evals += len(touched)
        if progress is not None:
            progress.advance(1)
    return GreedyResult(np.array(ranking, dtype=np.int64), np.array(gains), evals, "lazy-incremental")


def lazy_greedy(obj, budget: int, ties: str = "lowest", progress=None, batch: int = 64) -> GreedyResult:
    """The batched form for submodular objectives under ``ties="lowest"`` (the incremental form over a
    sparse kNN kernel), submodlib's heap otherwise."""
    _check_ties(ties)
    if ties == "lowest" and getattr(obj, "submodular", True) and getattr(obj, "incremental", False):
        return incremental_greedy(obj, budget, progress)
    if ties == "lowest" and getattr(obj, "submodular", True):
        return batched_lazy_greedy(obj, budget, progress, batch)
    return heap_lazy_greedy(obj, budget, ties, progress)


def stochastic_greedy(obj, budget: int, seed: int, epsilon: float = 0.1, progress=None) -> GreedyResult:
    rng = np.random.default_rng(seed)
    k = min(budget, obj.n)
    size = max(1, math.ceil(obj.n / max(k, 1) * math.log(1 / epsilon)))
    remaining = np.arange(obj.n)
    ranking, gains, evals = [], [], 0
    for _ in range(k):
        sample = np.sort(rng.choice(remaining, size=min(size, len(remaining)), replace=False))
        g = obj.gains(sample)
        evals += len(sample)
        best = int(np.argmax(g))
        j = int(sample[best])
        ranking.append(j)
        gains.append(float(g[best]))
        obj.add(j)
        remaining = remaining[remaining != j]
        if progress is not None:
            progress.advance(1)
    return GreedyResult(np.array(ranking, dtype=np.int64), np.array(gains), evals, "stochastic")


def maximize(obj, budget: int, optimizer: str = "lazy", seed: int = 0, ties: str = "lowest", epsilon: float = 0.1,
             progress=None) -> GreedyResult:
    if optimizer == "naive":
        return naive_greedy(obj, budget, progress, ties)
    if optimizer == "lazy":
        return lazy_greedy(obj, budget, ties, progress)
    if optimizer == "stochastic":
        return stochastic_greedy(obj, budget, seed, epsilon, progress)
    raise ValueError(f"unknown optimizer '{optimizer}' (naive, lazy, stochastic)")
