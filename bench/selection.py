"""Selection library speed, side by side in one run (issue 5).

    .venv/bin/python bench/selection.py [--real]

1. Repr Filter (τ = 0.9) on 20k rows: the blocked exact algorithm vs the one-by-one reference
   algorithm (each candidate against the kept set, gathered anew) — identical ids, speed-up.
2. Facility location on one dense precomputed kernel (n = 3,000, 300 picks): ours (lazy greedy) vs
   apricot's lazy greedy — identical ranking, time.
3. k-center on 100k × 384 unit vectors selecting 5k: ours (with nearest-centre tracking and
   reasons) vs the bare loop of k distance-update passes — ratio.
4. Growth: Repr Filter, facility location (lazy, embedding kernel, 5% budget) and k-center (5%) at
   10k / 20k / 40k rows.

Embeddings: seeded clustered unit vectors (384-d, like MiniLM's), or with ``--real`` MiniLM
embeddings of ../shared/data rows (up to the number available). Results: bench/results/selection.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
from common import ROOT, write_result  # noqa: E402


def clustered(n: int, d: int = 384, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(8, n // 200), d)).astype(np.float32)
    X = centres[rng.integers(len(centres), size=n)] + 0.35 * rng.normal(size=(n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def real_embeddings(limit: int) -> np.ndarray:
    from curate.config import EmbedSpec
    from curate.embed import build_embedder

    texts = []
    for path in sorted((ROOT.parent / "shared" / "data").rglob("*.json*")):
        try:
            rows = json.loads(path.read_text()) if path.suffix == ".json" else [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        for r in rows if isinstance(rows, list) else []:
            if isinstance(r, dict):
                texts.append(" ".join(str(v) for v in r.values() if isinstance(v, str))[:1000])
    return build_embedder(EmbedSpec(), torch_threads=2).embed(texts[:limit])


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def bare_kcenter(X: np.ndarray, k: int) -> np.ndarray:
    """The bare loop: k passes of (GEMV, minimum, argmax) — the floor any k-center must pay."""
    m = np.full(len(X), np.inf, dtype=np.float32)
    i = 0
    for _ in range(k):
        d = 2.0 - 2.0 * (X @ X[i])
        np.minimum(m, d, out=m)
        i = int(np.argmax(m))
    return m


def main() -> None:
    from threadpoolctl import threadpool_limits

    from curate.select.kcenter import kcenter_greedy
    from curate.select.repr_filter import repr_filter, repr_filter_one_by_one
    from curate.select.submodular import DenseKernel, EmbeddingKernel, FacilityLocation, maximize

    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true")
    args = ap.parse_args()
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs. Embeddings: "
             + ("MiniLM on ../shared/data rows." if args.real else "seeded clustered unit vectors, 384-d."), ""]

    # 1. Repr Filter
    X = real_embeddings(20_000) if args.real else clustered(20_000)
    order = np.random.default_rng(1).permutation(len(X))  # score order (random scores)
    (kept, *_), t_ours = timed(repr_filter, X, order, 0.9, None)
    with threadpool_limits(1):
        ref, t_ref = timed(repr_filter_one_by_one, X, order, 0.9, None)
    same = kept.tolist() == ref.tolist()
    lines += ["| benchmark | ours s | baseline s | ratio | check |", "|---|---|---|---|---|",
              f"| Repr Filter, {len(X):,} rows, τ 0.9 ({len(kept):,} kept) vs one-by-one | {t_ours:.2f} | {t_ref:.2f} | "
              f"{t_ref / t_ours:.1f}× faster | identical ids: {same} |"]

    # 2. FL vs apricot on a dense kernel
    try:
        import apricot

        Y = clustered(3000, 64, seed=2)
        K = np.maximum(Y @ Y.T, 0).astype(np.float64)
        ours, t_fl = timed(lambda: maximize(FacilityLocation(DenseKernel(K)), 300, "lazy"))
        sel, t_ap = timed(lambda: apricot.FacilityLocationSelection(300, metric="precomputed", optimizer="lazy").fit(K))
        same = ours.ranking.tolist() == list(sel.ranking)
        lines.append(f"| facility location, dense 3,000² kernel, 300 picks vs apricot lazy greedy | {t_fl:.2f} | {t_ap:.2f} | "
                     f"{t_ap / t_fl:.2f}× | identical ranking: {same} |")
    except ImportError:
        lines.append("| facility location vs apricot | – | – | – | apricot-select not installed |")

    # 3. k-center
    Z = clustered(100_000, 384, seed=3)
    _, t_kc = timed(kcenter_greedy, Z, 5000, first=0)
    with threadpool_limits(1):
        _, t_bare = timed(bare_kcenter, Z, 5000)
    lines.append(f"| k-center, 100,000 × 384 → 5,000 vs the bare loop of 5,000 update passes | {t_kc:.2f} | {t_bare:.2f} | "
                 f"{t_kc / t_bare:.2f}× the bare loop | one BLAS thread both |")

    # 4. growth
    lines += ["", "| rows | Repr Filter s | facility location s (5%, lazy, exact columns) | k-center s (5%) |", "|---|---|---|---|"]
    for n in (10_000, 20_000, 40_000):
        W = clustered(n, seed=4)
        o = np.random.default_rng(5).permutation(n)
        _, a = timed(repr_filter, W, o, 0.9, None)
        _, b = timed(lambda: maximize(FacilityLocation(EmbeddingKernel(W)), n // 20, "lazy"))
        _, c = timed(kcenter_greedy, W, n // 20, first=0)
        lines.append(f"| {n:,} | {a:.2f} | {b:.1f} | {c:.2f} |")
        print(lines[-1], flush=True)
    write_result("selection", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
