"""Greedy maximisers — a separate axis from the objectives, as in apricot.

Each returns :class:`GreedyResult`: ``ranking`` (indices in selection order) and ``gains`` (the
marginal gain of each pick, float64).

- ``naive``: every step evaluates every remaining candidate (vectorised); ties → lowest index.
- ``lazy``: a max-heap of stale gains; pop, re-evaluate, accept when the fresh gain is at least the
  next stale one. Identical to naive for submodular objectives. Ties → lowest index (methods.md E2),
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


def lazy_greedy(obj, budget: int, ties: str = "lowest", progress=None) -> GreedyResult:
    sign = 1 if ties == "lowest" else -1
    init = obj.gains(np.arange(obj.n))
    heap = [(-float(g), sign * j, j) for j, g in enumerate(init)]
    heapq.heapify(heap)
    evals = obj.n
    ranking, gains = [], []
    while heap and len(ranking) < min(budget, obj.n):
        _, _, j = heapq.heappop(heap)
        g = obj.gain(j)
        evals += 1
        if not heap or g >= -heap[0][0]:
            if heap and g == -heap[0][0] and sign * heap[0][2] < sign * j:
                heapq.heappush(heap, (-g, sign * j, j))  # an equal fresh gain with a better tie-break wins
                continue
            ranking.append(j)
            gains.append(g)
            obj.add(j)
            if progress is not None:
                progress.advance(1)
        else:
            heapq.heappush(heap, (-g, sign * j, j))
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
