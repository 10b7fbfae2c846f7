"""Facility location, graph cut and SMART over a FAISS kNN graph on large pools (issue 13).

    .venv/bin/python bench/knn_select.py [--rows 100000 1000000] [--budget 2000] [--knn 64] [--index ivf]

For each pool size: seeded clustered unit vectors (384-d, numpy; written once to a ``.npy`` file and
memory-mapped read-only, as the store's embeddings are), then each step runs in its own process —
the real selection step (``curate.select``) with ``kernel: sparse`` (the graph, at any size;
``knn_index: auto`` is exact up to 20,000 rows, IVF above) — and reports: graph build (index training and adding) and search time,
recall@k against exact search on 1,000 sampled rows, selection time (the rest of the step: the
greedy, its bookkeeping, the ledger reasons), wall time and the process's peak RSS (the memory-mapped
vectors it touched included). SMART: 16 tasks (clusters, mod 16), 8 chosen; stage 2 builds one graph
per chosen task. ``coverage`` is the dense facility-location value of the selection,
``Σ_i max(0, max_{j∈A} cos(i, j))`` over every row, divided by n, against a random set of the same size
(computed afterwards, outside the measured processes). Results: bench/results/knn_select.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, write_result  # noqa: E402

D = 384
TASKS = 16


def write_vectors(path: Path, n: int, seed: int = 0, block: int = 100_000) -> None:
    """Clustered unit vectors (n // 200 centres, noise 0.35), float32, generated in blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(8, n // 200), D)).astype(np.float32)
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
    labels = np.empty(n, dtype=np.int64)
    for s in range(0, n, block):
        e = min(s + block, n)
        c = rng.integers(len(centres), size=e - s)
        B = centres[c] + 0.35 * rng.normal(size=(e - s, D)).astype(np.float32)
        X[s:e] = B / np.linalg.norm(B, axis=1, keepdims=True)
        labels[s:e] = c
    X.flush()
    np.save(str(path) + ".clusters.npy", labels)


def child(vectors: str, method: str, budget: int, knn: int, index: str, out: str) -> None:
    import resource

    from curate.select import Pool, selector_class

    E = np.load(vectors, mmap_mode="r")
    n = len(E)
    tasks = None
    params = {"budget": budget, "knn": knn, "knn_index": index, "kernel": "sparse"}
    if method == "smart":
        clusters = np.load(vectors + ".clusters.npy")
        tasks = np.array([f"task{c % TASKS:02d}" for c in range(TASKS)])[clusters % TASKS]
        params |= {"num_tasks": 8}
    pool = Pool(rows=np.arange(n, dtype=np.int64), ids=np.array([f"r{i}" for i in range(n)]), scores={}, orientation={},
                embeddings=E, n_input=n, seed=0, tasks=tasks)
    t = time.perf_counter()
    res = selector_class(method)(method, params).select(pool)
    wall = time.perf_counter() - t
    graphs = res.stats["instance_knn"] if method == "smart" else [res.stats["knn_graph"]]
    graph_s = sum(g["build_s"] + g["search_s"] for g in graphs)
    recall_s = sum(g["recall_s"] for g in graphs)
    picked = np.flatnonzero(res.keep)
    np.save(out + ".picked.npy", picked)
    Path(out).write_text(json.dumps({
        "method": method, "rows": n, "picked": int(len(picked)), "wall_s": wall, "graph_s": graph_s, "recall_s": recall_s,
        "select_s": wall - graph_s - recall_s, "recall": float(np.mean([g["recall_at_k"] for g in graphs])),
        "graphs": len(graphs), "index": graphs[0]["index"], "k": graphs[0]["k"], "nlist": graphs[0].get("nlist"),
        "nprobe": graphs[0].get("nprobe"), "variant": res.stats.get("optimizer_variant") or res.stats.get("instance_optimizer"),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


def coverage(E: np.ndarray, picked: np.ndarray, block: int = 50_000) -> float:
    C = np.ascontiguousarray(E[np.sort(picked)], dtype=np.float32)
    total = 0.0
    for s in range(0, len(E), block):
        S = np.asarray(E[s : s + block], dtype=np.float32) @ C.T
        total += float(np.maximum(S.max(axis=1), 0).sum(dtype=np.float64))
    return total / len(E)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000])
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--knn", type=int, default=64)
    ap.add_argument("--index", default="auto", choices=["auto", "exact", "ivf", "hnsw"])
    ap.add_argument("--methods", nargs="+", default=["facility_location", "graph_cut", "smart"])
    ap.add_argument("--workdir", default=None, help="where the vectors go (default: a temporary folder)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        vectors, method, budget, knn, index, out = a.child
        child(vectors, method, int(budget), int(knn), index, out)
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="knn_select-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in a.rows:
        vec = work / f"vectors-{n}.npy"
        if not vec.exists():
            t = time.perf_counter()
            write_vectors(vec, n)
            print(f"{n} vectors written in {time.perf_counter() - t:.1f} s", flush=True)
        E = np.load(vec, mmap_mode="r")
        rand = coverage(E, np.random.default_rng(1).choice(n, size=a.budget, replace=False))
        for method in a.methods:
            out = str(work / f"{method}-{n}.json")
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, __file__, "--child", str(vec), method, str(a.budget), str(a.knn), a.index, out],
                           check=True, env=env, cwd=ROOT)
            r = json.loads(Path(out).read_text())
            r["coverage"] = coverage(E, np.load(out + ".picked.npy"))
            r["coverage_random"] = rand
            print(json.dumps(r), flush=True)
            rows.append(r)
    lines = [
        "# kNN-graph submodular selection (bench/knn_select.py)", "",
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {D}-d clustered unit vectors (n/200 centres), budget {a.budget}, "
        f"knn {a.knn}, knn_index {a.index}, FAISS on 2 threads. One process per row; peak RSS includes the memory-mapped vectors "
        "it touched. Graph = index training + adding + searching every row; recall@k on 1,000 sampled rows against exact search "
        "(its time in `recall s`); selection = the rest of the step. Coverage = dense facility-location value / n of the "
        "selection vs a random set of the same size.", "",
        "| rows | step | index (nlist/nprobe) | graphs | graph s | recall@k | recall s | selection s | wall s | peak RSS GB | coverage | random | variant |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        idx = r["index"] + (f" ({r['nlist']}/{r['nprobe']})" if r["nlist"] else "")
        lines.append(f"| {r['rows']:,} | {r['method']} | {idx} | {r['graphs']} | {r['graph_s']:.1f} | {r['recall']:.3f} | {r['recall_s']:.1f} | "
                     f"{r['select_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['coverage']:.4f} | {r['coverage_random']:.4f} | {r['variant']} |")
    write_result("knn_select", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
