"""bf16 scoring that ranks like fp32 (issue 24, item 1): where bf16's error comes from, and what it costs.

    .venv/bin/python bench/bf16_scoring.py [--rows 100] [--threads 2] [--methods superfiltering,ifd]

Same model (the bundled SmolLM2-135M-Instruct), same real rows (Cherry Alpaca 5%, from ../shared/data,
else data/sample), through curate's own scorers (Superfiltering: no template, PPL ratio, bare direct
pass; IFD: alpaca template, loss ratio), one process per (method, variant) so each peak RSS is its own:

- ``fp32`` — float32 weights and math (what ``dtype: auto`` picks on a CPU with neither avx512_bf16 nor AMX);
- ``bf16 all`` — bfloat16 weights, everything in bf16 but the log-sum-exp (the engine before issue 24);
- ``bf16 + fp32 head`` — bf16 body and final norm, the LM head in fp32 (upcast hidden states);
- ``bf16 + fp32 norm+head`` — bf16 body; the final norm and the LM head in fp32 (what ``dtype: bfloat16``
  runs; ``auto`` picks it on a bf16 GPU);
- ``bf16-matmul`` — ``dtype: bf16-matmul`` (what ``dtype: auto`` picks on a CPU with avx512_bf16 or AMX): fp32
  weights and activations, the fp32 matmuls computed by oneDNN in its bf16 math mode;
- ``openvino fp32`` — ``runtime: openvino`` (what ``runtime: auto``, the loss scorers' default, picks on a CPU with
  curate[cpu-fast] installed): the same fp32 model exported once and compiled by OpenVINO (the export happens in the
  warm-up, reported apart);
- ``fp32 weights, bf16 autocast body`` — a measurement only (not an engine mode): fp32 weights, the body
  under ``torch.autocast(bfloat16)`` (matmuls in bf16, the residual stream and norms in fp32), the head
  in fp32 outside it.

Per variant: seconds (after a warm-up on 8 rows), tokens/s, Spearman and max relative difference of the
score vs fp32, overlap of the top 50 (keep IFD < 1, then the 50 largest), peak RSS. Prints the CPU's
flags: bf16 matmuls are fastest with AMX (amx_bf16); on a CPU without it the speed column is not the AMX
answer (see the note in the results). Writes bench/results/<--name>.md (default bf16_scoring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, spearman, write_result  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
#: variant -> (dtype, the hf backend's fp32_parts, runtime)
VARIANTS = {"fp32": ("float32", "none", "torch"), "bf16 + fp32 norm+head": ("bfloat16", "norm+head", "torch"),
            "bf16 all": ("bfloat16", "none", "torch"), "bf16 + fp32 head": ("bfloat16", "head", "torch"),
            "fp32 weights, bf16 autocast body": ("float32", "autocast", "torch"), "bf16-matmul": ("bf16-matmul", "none", "torch"),
            "openvino fp32": ("float32", "none", "openvino")}


def flags() -> list[str]:
    from curate.lm.base import cpu_flags

    have = cpu_flags()
    return [f for f in FLAGS if f in have]


def worker(method: str, variant: str, n_rows: int, threads: int, out: str) -> None:
    """Score ``n_rows`` with one variant; dump scores, statuses, seconds, tokens and peak RSS to ``out``."""
    import torch

    from curate.scorers import ScorerContext, scorer_class
    from ifd_engine import load_rows

    torch.set_num_threads(threads)
    rows, source = load_rows(n_rows)
    dtype, parts, runtime = VARIANTS[variant]
    sc = scorer_class(method)(method, {"dtype": dtype, "runtime": runtime}, ScorerContext(torch_threads=threads))
    if parts == "autocast":  # a measurement, not an engine mode: the body under bf16 autocast, the head (fp32) outside it
        make = sc.backend.engine

        def engine():
            eng = make()
            body = eng.body

            def autocast_body(**kwargs):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return body(**kwargs)

            eng.body = autocast_body
            return eng

        sc.backend.engine = engine
    else:
        sc.backend.fp32_parts = parts
    tokens = sc.cost(rows)  # the scorer's own count of the tokens its passes run
    t = time.perf_counter()
    sc.score_records(rows[:8])  # warm-up: model load (and export, compile), first kernels
    warmup = time.perf_counter() - t
    t = time.perf_counter()
    scores = []
    for i in range(0, len(rows), sc.batch_rows):
        scores.extend(sc.score_records(rows[i : i + sc.batch_rows]))
    seconds = time.perf_counter() - t
    Path(out).write_text(json.dumps({
        "ifd": [s.values["ifd"] for s in scores], "status": [s.status for s in scores], "seconds": seconds, "tokens": tokens,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "source": source, "key": sc.key, "warmup": warmup,
        "dtype": sc.fingerprint()["dtype"]}))


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 50) -> int:
    """Rows in both selections of the recipe: keep IFD < 1, then the k largest."""
    def pick(v):
        order = np.argsort(-np.nan_to_num(v, nan=-np.inf), kind="stable")
        return set([i for i in order if np.isfinite(v[i]) and v[i] < 1][:k])

    return len(pick(a) & pick(b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="superfiltering,ifd")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--name", default="bf16_scoring", help="results file: bench/results/NAME.md")
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.rows, args.threads, args.worker[2])
        return
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):  # one method's variants, then the next: a partial run still compares them
            for variant in variants:
                out = os.path.join(tmp, f"{method}-{len(results)}.json")
                cmd = [sys.executable, __file__, "--rows", str(args.rows), "--threads", str(args.threads), "--worker", method, variant, out]
                subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"})
                results[method, variant] = json.loads(Path(out).read_text())
                r = results[method, variant]
                print(f"{method:15s} {variant:24s} {r['seconds']:7.1f} s  (warm-up {r['warmup']:.1f} s)  peak RSS {r['rss_mb']:.0f} MiB",
                      flush=True)
                report(results, args)  # after every run: a long benchmark leaves its partial table


def ov_version() -> str:
    try:
        import openvino

        return f"openvino {openvino.__version__}, "
    except ImportError:
        return ""


def report(results: dict[tuple[str, str], dict], args) -> None:
    import torch

    have = flags()
    amx = "amx_bf16" in have
    amx_note = "AMX: bf16 matmuls in hardware"
    no_amx_note = "NO AMX: bf16 matmuls run on AVX-512 at best, so the speed ratios here are not the AMX answer"
    first = next(iter(results.values()))
    lines = [f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, flags: {' '.join(have) or 'none'} "
             f"({amx_note if amx else no_amx_note}); "
             f"torch {torch.__version__}, {ov_version()}{args.threads} threads, load average {os.getloadavg()[0]:.2f}. Model: SmolLM2-135M-Instruct "
             f"(bundled GGUF dequantised). Rows: {args.rows} from {first['source']}. One process per run (peak RSS is its own); "
             "seconds after a warm-up on 8 rows.", ""]
    lines += ["| method | run | seconds | tokens/s | vs fp32 | Spearman vs fp32 | max rel. diff | top-50 overlap | peak RSS MiB | warm-up s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    methods = args.methods.split(",")
    for (method, variant), r in sorted(results.items(), key=lambda kv: (methods.index(kv[0][0]), list(VARIANTS).index(kv[0][1]))):
        ref = results.get((method, "fp32"))
        a = np.array(ref["ifd"], dtype=np.float64) if ref else None
        b = np.array(r["ifd"], dtype=np.float64)
        if a is not None and variant != "fp32":
            both = np.isfinite(a) & np.isfinite(b)
            rel = np.abs(a[both] - b[both]) / np.abs(a[both])
            check = f"{spearman(a[both], b[both]):.5f} | {rel.max():.2e} | {top_overlap(a, b)}/50"
        else:
            check = "— | — | —"
        speed = f"{ref['seconds'] / r['seconds']:.2f}×" if ref else "—"
        rate = r["tokens"] / r["seconds"]
        warm = f"{r['warmup']:.1f}" if "warmup" in r else "—"
        lines.append(f"| {method} | {variant} | {r['seconds']:.1f} | {rate:.0f} | {speed} | {check} | {r['rss_mb']:.0f} | {warm} |")
    lines += ["", "Warm-up: scoring the first 8 rows, untimed: loading the model (the first run of `openvino fp32` on a machine also "
              "exports and compiles its graph; later runs load the export and compile it)."]
    text = "\n".join(lines) + "\n"
    write_result(args.name, text)


if __name__ == "__main__":
    main()
