"""Greedy maximisers — a separate axis from the objectives, as in apricot.

Each returns :class:`GreedyResult`: ``ranking`` (indices in selection order) and ``gains`` (the
marginal gain of each pick, float64).

- ``naive``: every step evaluates every remaining candidate (vectorised); ties → lowest index.
- ``lazy``: a max-heap of stale gains (upper bounds); re-evaluate the top ones (in small batches)
  until the top is fresh, then take it. Identical to naive for submodular objectives. Ties → lowest index (methods.md E2),
  or → larger index with ``ties="larger"`` (submodlib's ``std::less`` heap, for parity).
- ``stochastic``: each step evaluates ⌈(n/k)·ln(1/ε)⌉ random remaining candidates (ε = 0.1), from a
  seeded generator — an approximation, recorded.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np


@dataclass
class GreedyResult:
    ranking: np.ndarray
    gains: np.ndarray
    evaluations: int


def naive_greedy(obj, budget: int, progress=None) -> GreedyResult:
    remaining = np.ones(obj.n, dtype=bool)
    ranking, gains, evals = [], [], 0
    for _ in range(min(budget, obj.n)):
        cols = np.flatnonzero(remaining)
        g = obj.gains(cols)
        evals += len(cols)
        best = int(np.argmax(g))  # first maximum → lowest index
        j = int(cols[best])
        ranking.append(j)
        gains.append(float(g[best]))
        obj.add(j)
        remaining[j] = False
        if progress is not None:
            progress.advance(1)
    return GreedyResult(np.array(ranking, dtype=np.int64), np.array(gains), evals)


def lazy_greedy(obj, budget: int, ties: str = "lowest", progress=None, batch: int = 64) -> GreedyResult:
    """Lazy greedy with batched re-evaluation: while the heap's top is stale, the ``batch`` stalest
    bounds at the top are re-evaluated together (one kernel block instead of one column each — the
    same cost on memory-bound kernels); a top evaluated against the current selection is the true
    maximum, since every other entry is an upper bound (exact for submodular objectives)."""
    sign = 1 if ties == "lowest" else -1
    init = obj.gains(np.arange(obj.n))
    step = 0
    heap = [(-float(g), sign * j, j, step) for j, g in enumerate(init)]  # (−gain, tie key, index, step evaluated)
    heapq.heapify(heap)
    evals = obj.n
    ranking, gains = [], []
    k = min(budget, obj.n)
    while heap and len(ranking) < k:
        if heap[0][3] == step:
            neg, _, j, _ = heapq.heappop(heap)
            ranking.append(j)
            gains.append(-neg)
            obj.add(j)
            step += 1
            if progress is not None:
                progress.advance(1)
            continue
        stale = []
        while heap and len(stale) < batch and heap[0][3] != step:
            stale.append(heapq.heappop(heap))
        cols = np.array([e[2] for e in stale])
        fresh = obj.gains(cols)
        evals += len(cols)
        for (_, key, j, _), g in zip(stale, fresh):
            heapq.heappush(heap, (-float(g), key, j, step))
    return GreedyResult(np.array(ranking, dtype=np.int64), np.array(gains), evals)


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
    return GreedyResult(np.array(ranking, dtype=np.int64), np.array(gains), evals)


def maximize(obj, budget: int, optimizer: str = "lazy", seed: int = 0, ties: str = "lowest", epsilon: float = 0.1,
             progress=None) -> GreedyResult:
    if optimizer == "naive":
        return naive_greedy(obj, budget, progress)
    if optimizer == "lazy":
        return lazy_greedy(obj, budget, ties, progress)
    if optimizer == "stochastic":
        return stochastic_greedy(obj, budget, seed, epsilon, progress)
    raise ValueError(f"unknown optimizer '{optimizer}' (naive, lazy, stochastic)")
