"""Embeddings on CPU runtimes (issue 24, item 3): torch fp32 vs ONNX Runtime and OpenVINO, fp32 and int8.

    .venv/bin/python bench/embed_backends.py [--rows 2000] [--threads 2] [--backends torch:none onnx:none onnx:int8 ...]

Rows: real Cherry Alpaca conversations (../shared/data/cherry_llm/cherry_alpaca_5_percent.json, the first ``--rows``),
``embed.text: conversation``, all-MiniLM-L6-v2 (max 256 tokens), batch size 64, ``--threads`` threads. Per backend
(``embed.backend:embed.quantize``, curate's own embedder): export + load seconds (the model is exported into a fresh
cache folder), rows/s over every row after a warm-up batch, the ratio to torch fp32, the cosine of each row's vector
to the torch fp32 vector (min, 1st percentile, median), and how many of the same rows curate's selectors pick on these
vectors as on the fp32 ones: k-center (30 rows as in flows/select.yaml, and 10% as selectors/kcenter.yaml) and the
Repr Filter (τ 0.9, walking rows by response length; 30 rows as flows/deita.yaml, and 10%); for k-center also the
quality of the cover its picks give, measured on the fp32 vectors.
Results: bench/results/embed_backends.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from common import ROOT, write_result  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cherry_llm" / "cherry_alpaca_5_percent.json"


def load_texts(n: int) -> tuple[list[str], np.ndarray]:
    """The first ``n`` Cherry Alpaca rows as curate's conversation text, and each row's response length (chars)."""
    from curate.embed import embed_text

    rows = json.loads(DATA.read_text())[:n]
    texts, lengths = [], []
    for r in rows:
        prompt = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]
        texts.append(embed_text({"messages": msgs}, "conversation"))
        lengths.append(len(r["output"]))
    return texts, np.asarray(lengths, dtype=np.float64)


def picks(X: np.ndarray, score: np.ndarray) -> dict[str, set[int]]:
    """The rows curate's k-center and Repr Filter steps keep on the vectors ``X`` (n, d)."""
    from curate.select import Pool, selector_class

    n = len(X)
    pool = Pool(rows=np.arange(n, dtype=np.int64), ids=[f"r{i}" for i in range(n)], scores={"length": score},
                orientation={"length": "higher_is_better"}, embeddings=X, n_input=n, seed=0)
    tenth = max(1, n // 10)
    steps = {"k-center 30": ("kcenter", {"budget": 30}), f"k-center {tenth}": ("kcenter", {"budget": tenth}),
             "Repr Filter 30": ("repr_filter", {"score": "length", "max_similarity": 0.9, "budget": 30}),
             f"Repr Filter {tenth}": ("repr_filter", {"score": "length", "max_similarity": 0.9, "budget": tenth})}
    return {name: set(np.flatnonzero(selector_class(m)(m, p).select(pool).keep).tolist()) for name, (m, p) in steps.items()}


def coverage(X: np.ndarray, chosen: set[int]) -> float:
    """k-center's objective on the vectors ``X`` (unit rows): the largest cosine distance from a row to its nearest chosen row."""
    return float((1.0 - X @ X[sorted(chosen)].T).min(axis=1).max())


def run_backend(backend: str, quantize: str, texts: list[str], threads: int) -> dict:
    """Export/load seconds, rows/s after a warm-up batch, and the vectors, for one ``backend:quantize``."""
    from curate.embed.base import EmbedContext
    from curate.embed.sentence_transformer import SentenceTransformerEmbedder
    from curate.embed.spec import EmbedSpec

    spec = EmbedSpec(backend=backend, quantize=quantize, batch_size=64)
    emb = SentenceTransformerEmbedder("embed", spec, EmbedContext(torch_threads=threads))
    t = time.perf_counter()
    emb.embed(texts[:64])  # warm-up: loads (and exports) the model
    ready = time.perf_counter() - t
    t = time.perf_counter()
    X = emb.embed(texts)
    secs = time.perf_counter() - t
    return {"ready_s": ready, "secs": secs, "rows_s": len(texts) / secs, "X": X, "load": os.getloadavg()}


def simd_flags() -> str:
    """The CPU's vector-unit flags (AVX-512 family, VNNI, bf16, AMX) from ``curate.lm.base.cpu_flags``."""
    from curate.lm.base import cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma"))
    return " ".join(flags) or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="embed_backends", help="results file: bench/results/NAME.md")
    ap.add_argument("--backends", nargs="+", default=["torch:none", "onnx:none", "onnx:int8", "openvino:none", "openvino:int8"])
    args = ap.parse_args()
    texts, score = load_texts(args.rows)
    load0 = os.getloadavg()
    print(f"{len(texts)} rows; CPU flags: {simd_flags()}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CURATE_CACHE_DIR"] = cache  # exports go to $CURATE_CACHE_DIR/embed-models: a fresh one, so each is timed
        for b in args.backends:
            backend, quantize = b.split(":")
            try:
                results[b] = run_backend(backend, quantize, texts, args.threads)
            except Exception as exc:  # a runtime that is not installed is reported, the others still run
                results[b] = {"error": f"{type(exc).__name__}: {exc}"}
            r = results[b]
            print(b, {k: round(v, 2) for k, v in r.items() if isinstance(v, float)} if "error" not in r else r["error"], flush=True)
    base = results["torch:none"]
    ref = picks(base["X"], score)
    names = list(ref)
    kc = [f"{k} radius × fp32" for k in names if k.startswith("k-center")]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; CPU flags: {simd_flags()}.",
             f"Rows: the first {len(texts):,} Cherry Alpaca rows (conversation text, all-MiniLM-L6-v2, max 256 tokens), batch 64, "
             f"{args.threads} threads. Load average at the start: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} (1 / 5 / 15 min).",
             "Same picks: rows kept on these vectors that are also kept on the torch fp32 vectors (Repr Filter by response length). "
             "Radius × fp32: k-center's objective (largest cosine distance from a row to its nearest pick), measured on the fp32 "
             "vectors, for this backend's picks over the fp32 vectors' own picks (1.000 = as good a cover).",
             "",
             "| backend | export + load s | rows/s | × torch fp32 | cos min | cos p1 | cos median | "
             + " | ".join(names + kc) + " | load 1 min |",
             "|---|---|---|---|---|---|---|" + "---|" * len(names + kc) + "---|"]
    for b, r in results.items():
        if "error" in r:
            lines.append(f"| {b} | – | – | – | – | – | – | " + " | ".join("–" for _ in names + kc) + f" | {r['error']} |")
            continue
        X = r["X"]
        cos = np.sum(X * base["X"], axis=1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(base["X"], axis=1))
        got = picks(X, score)
        same = [f"{len(got[k] & ref[k]) / len(ref[k]):.0%}" for k in names]
        radii = [f"{coverage(base['X'], got[k]) / coverage(base['X'], ref[k]):.3f}" for k in names if k.startswith("k-center")]
        lines.append(f"| {b} | {r['ready_s']:.1f} | {r['rows_s']:.1f} | {r['rows_s'] / base['rows_s']:.2f} | {cos.min():.4f} | "
                     f"{np.percentile(cos, 1):.4f} | {np.median(cos):.4f} | " + " | ".join(same + radii) + f" | {r['load'][0]:.2f} |")
    write_result(args.name, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
