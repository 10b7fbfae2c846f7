"""Large-pool selection over the store's memory-mapped matrix: k-center and the Repr Filter on 1M × 384.

    .venv/bin/python bench/large_select.py [--rows 1000000] [--k 2000] [--threads 1] [--dir /tmp/large_select]

Vectors are made with numpy: ``rows / 20`` random unit base directions, each repeated 20 times with
seeded noise (copies ~0.95 cosine-similar to each other, so the Repr Filter has near-duplicates to
reject), written to a store through :func:`curate.embed.precomputed.store_vectors` (parts of 50k
rows), once as float32 and once as float16 storage. Each phase runs in its own process (spawned), so
its peak RSS (``VmHWM``, which counts the memmap's resident file pages too) and its anonymous memory
at the end (``RssAnon``: what the process allocated itself) are its own.

Phases, per storage dtype:

- ``assemble``: ``load_embeddings`` builds ``matrix/<hash of ids>.npy`` from the parts; ``reuse``:
  the second call, which maps the file it made.
- ``bare loop``: the reference for k-center's speed, side by side with it in the same run: for each of
  k steps, ``d = min(d, ||x − c||²)`` over all rows in blocks (float32: one ``np.dot`` per block;
  float16: the block converted to float32, then one matrix-vector product), then ``argmax``. Same
  dtype, block size and thread count as k-center.
- ``k-center``: ``curate.select.kcenter.kcenter_greedy`` on the memmap (k steps; it also tracks the
  nearest centre of every row).
- ``repr filter``: ``curate.select.repr_filter.repr_filter`` over a random score order, τ 0.9,
  budget ``--repr-budget``, on the memmap.

Results go to ``bench/results/large_select.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _mem() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            out[key] = int(val.split()[0]) / 1024 / 1024  # GiB
    return out


def _ids(n: int) -> list[str]:
    return [f"r{i:08d}" for i in range(n)]


def make_store(store: str, n: int, dim: int, storage: str, seed: int = 0, copies: int = 20, part_rows: int = 50_000) -> None:
    from curate.config import EmbedSpec
    from curate.embed.precomputed import store_vectors

    spec = EmbedSpec(method="precomputed", model="bench-vectors", storage=storage)
    rng = np.random.default_rng(seed)
    n_base = max(1, n // copies)
    base = rng.standard_normal((n_base, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    sigma = np.sqrt(0.05 / dim)  # |noise|² ≈ 0.05: copies ≈ 0.95 cosine to each other
    ids = _ids(n)
    for s in range(0, n, part_rows):
        e = min(s + part_rows, n)
        v = base[np.arange(s, e) % n_base] + sigma * rng.standard_normal((e - s, dim)).astype(np.float32)
        store_vectors(store, spec, ids[s:e], v)


def _key(storage: str) -> str:
    from curate.config import EmbedSpec
    from curate.embed import build_embedder

    return build_embedder(EmbedSpec(method="precomputed", model="bench-vectors", storage=storage)).key


def phase_assemble(store: str, n: int, storage: str) -> dict:
    from curate.recordset import load_embeddings

    t = time.perf_counter()
    X, st = load_embeddings(store, _key(storage), _ids(n))
    first = time.perf_counter() - t
    t = time.perf_counter()
    X2, st2 = load_embeddings(store, _key(storage), _ids(n))
    again = time.perf_counter() - t
    assert X2.shape == (n, X.shape[1]) and st2.count("ok") == n
    return {"assemble_s": first, "reuse_s": again, "dtype": str(X.dtype), **_mem()}


def _matrix(store: str, n: int, storage: str) -> np.ndarray:
    from curate.recordset import load_embeddings

    return load_embeddings(store, _key(storage), _ids(n))[0]


def bare_loop(X: np.ndarray, k: int, block: int, threads: int) -> float:
    """k passes of d = min(d, ||x − c||²) (unit vectors: 2 − 2·x·c) over all rows, then argmax."""
    from threadpoolctl import threadpool_limits

    n, dim = X.shape
    d = np.full(n, np.inf, dtype=np.float32)
    buf = np.empty(block, dtype=np.float32)
    half = X.dtype == np.float16
    if half:
        import warnings

        import torch

        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(np.asarray(X))
        conv = torch.empty((block, dim), dtype=torch.float32)
    t = time.perf_counter()
    i = 0
    with threadpool_limits(threads):
        for _ in range(k):
            c = np.asarray(X[i], dtype=np.float32)
            for s in range(0, n, block):
                e = min(s + block, n)
                b = buf[: e - s]
                if half:
                    cb = conv[: e - s]
                    cb.copy_(src[s:e])
                    torch.mv(cb, torch.from_numpy(c), out=torch.from_numpy(b))
                else:
                    np.dot(X[s:e], c, out=b)
                b *= -2.0
                b += 2.0
                np.minimum(d[s:e], b, out=d[s:e])
            i = int(np.argmax(d))
    return time.perf_counter() - t


def phase_bare(store: str, n: int, storage: str, k: int, threads: int) -> dict:
    from curate.select.kcenter import BLOCK_ROWS

    X = _matrix(store, n, storage)
    secs = bare_loop(X, k, BLOCK_ROWS[X.dtype], threads)
    return {"seconds": secs, **_mem()}


def phase_kcenter(store: str, n: int, storage: str, k: int, threads: int) -> dict:
    from curate.select.kcenter import kcenter_greedy

    X = _matrix(store, n, storage)
    t = time.perf_counter()
    res = kcenter_greedy(X, k, first=0, threads=threads)
    secs = time.perf_counter() - t
    return {"seconds": secs, "final_radius_sq": float(res.min_dist.max()), **_mem()}


def phase_repr(store: str, n: int, storage: str, budget: int, threads: int) -> dict:
    from curate.select.repr_filter import repr_filter

    X = _matrix(store, n, storage)
    order = np.random.default_rng(1).permutation(n)
    t = time.perf_counter()
    kept, blocker, _, visited = repr_filter(X, order, 0.9, budget, threads=threads)
    secs = time.perf_counter() - t
    return {"seconds": secs, "kept": int(len(kept)), "visited": int(visited), "rejected": int((blocker >= 0).sum()), **_mem()}


def _run(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=2000)
    ap.add_argument("--repr-budget", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--storage", nargs="+", default=["float32", "float16"])
    ap.add_argument("--dir", default="/tmp/large_select")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "large_select.md"))
    a = ap.parse_args()

    lines = [f"# Large-pool selection: {a.rows:,} × {a.dim}, k-center k = {a.k}, Repr Filter budget {a.repr_budget}, {a.threads} thread(s)", "",
             f"Machine: {os.cpu_count()} CPUs (shared). Peak RSS = VmHWM of the phase's own process (the memmap's resident file pages "
             "included); anon = RssAnon at the end of the phase (memory the process allocated itself).", "",
             "| storage | phase | seconds | s / step | ratio to bare loop | peak RSS GiB | anon GiB | notes |", "|---|---|---|---|---|---|---|---|"]
    for storage in a.storage:
        store = str(Path(a.dir) / f"store-{storage}")
        t = time.perf_counter()
        if not Path(store).exists():
            make_store(store, a.rows, a.dim, storage)
        made = time.perf_counter() - t
        print(f"[{storage}] store ready in {made:.1f} s", flush=True)
        asm = _run(phase_assemble, store, a.rows, storage)
        print(f"[{storage}] assemble {asm}", flush=True)
        bare = _run(phase_bare, store, a.rows, storage, a.k, a.threads)
        print(f"[{storage}] bare loop {bare}", flush=True)
        kc = _run(phase_kcenter, store, a.rows, storage, a.k, a.threads)
        print(f"[{storage}] k-center {kc}", flush=True)
        rf = _run(phase_repr, store, a.rows, storage, a.repr_budget, a.threads)
        print(f"[{storage}] repr filter {rf}", flush=True)
        lines += [
            f"| {storage} | write store (store_vectors, parts of 50k) | {made:.1f} | | | | | {'reused' if made < 1 else ''} |",
            f"| {storage} | load_embeddings: assemble .npy | {asm['assemble_s']:.1f} | | | {asm['VmHWM']:.2f} | {asm['RssAnon']:.2f} | {asm['dtype']} |",
            f"| {storage} | load_embeddings: second call (reuse) | {asm['reuse_s']:.2f} | | | | | |",
            f"| {storage} | bare loop (k passes) | {bare['seconds']:.1f} | {bare['seconds'] / a.k:.3f} | 1.00 | {bare['VmHWM']:.2f} | {bare['RssAnon']:.2f} | |",
            f"| {storage} | k-center (kcenter_greedy) | {kc['seconds']:.1f} | {kc['seconds'] / a.k:.3f} | {kc['seconds'] / bare['seconds']:.2f} | "
            f"{kc['VmHWM']:.2f} | {kc['RssAnon']:.2f} | |",
            f"| {storage} | Repr Filter (τ 0.9) | {rf['seconds']:.1f} | | | {rf['VmHWM']:.2f} | {rf['RssAnon']:.2f} | "
            f"kept {rf['kept']:,}, visited {rf['visited']:,}, rejected {rf['rejected']:,} |",
        ]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
