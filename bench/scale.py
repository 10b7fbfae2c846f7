"""Growth of a flow from 100k to 1M rows on one machine: wall time and peak memory per stage.

    .venv/bin/python bench/scale.py [--sizes 100000,300000,1000000] [--work /tmp/curate-scale] [--workers 2]

For each size, real alpaca rows from ``../shared/data`` (Cherry-Alpaca, Alpaca-GPT4 demo, Code Alpaca,
AlpacaEval outputs: every distinct row) are repeated until there are that many, each copy with its own
content and id (``tests/scale_rows.py``), one row in 10,000 broken on purpose (invalid JSON, not an
object, no output, blank instruction), plus a side file of 384-d unit vectors keyed by id (a direction
per real row and seeded noise per copy: the CPU run measures everything around the models, so vectors
are "precomputed" and go in through ``inputs[].embedding``). Each size runs in its own process, as a
Prefect flow run (ephemeral server)::

    ingest (runtime.ingest_workers) → embed (precomputed) → score: heuristic
      → threshold (degenerate) → top_k 50,000 by response tokens → k-center 2,000 → ledger → export → report

A sampler thread reads the resident memory of the run's process and its ingest workers every 50 ms
(the Prefect server's own process is counted apart) and takes the peak within each stage. Prints and
writes ``bench/results/scale.md``: seconds, rows/s and peak RSS per stage and size, the growth of each
stage's time from the smallest size (linear growth = the row ratio), and the goal check (1M rows in
≤ 6 min, peak ≤ 4 GB).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SHARED = ROOT.parent / "shared" / "data"
SOURCES = ["cherry_llm/cherry_alpaca_5_percent.json", "llama_factory/alpaca_en_demo.json", "codealpaca/code_alpaca_2k.json",
           "alpaca_eval/results/gpt4_1106_preview/model_outputs.json", "alpaca_eval/results/text_davinci_003/model_outputs.json",
           "alpaca_eval/results/claude-2/model_outputs.json", "alpaca_eval/results/llama-2-7b-chat-hf/model_outputs.json"]
DIM = 384
TOP_K = 50_000
K_CENTER = 2_000


def make_pool(work: Path, n: int) -> Path:
    from scale_rows import alpaca_rows, write_scale_pool

    folder = work / f"pool-{n}"
    done = folder / "done.json"
    if done.exists():
        return folder
    base = alpaca_rows([SHARED / s for s in SOURCES])
    t0 = time.perf_counter()
    pool = write_scale_pool(folder, n, base, dim=DIM, seed=0, bad_every=10_000)
    done.write_text(json.dumps({"rows": n, "base_rows": len(base), "bad": pool.n_bad, "seconds": round(time.perf_counter() - t0, 1)}))
    return folder


def write_flow(work: Path, pool: Path, n: int, workers: int) -> Path:
    import yaml

    flow = {
        "name": f"scale-{n}", "base_dir": str(pool), "output_dir": str(work / f"out-{n}"), "store_dir": str(work / f"store-{n}"), "seed": 0,
        "inputs": [{"path": "pool-000.jsonl", "format": "alpaca", "name": "pool",
                    "embedding": {"producer": "synthetic-384", "path": "vectors.parquet", "id_field": "id"}}],
        "ingest": {"shard_size": 10_000},
        "embed": {"method": "precomputed", "model": "synthetic-384"},
        "score": [{"method": "heuristic"}],
        "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0},
                   {"method": "top_k", "score": "heuristic.response_tokens", "budget": TOP_K, "rate_base": "pool"},
                   {"method": "kcenter", "budget": K_CENTER}],
        "export": {"layouts": ["messages", "alpaca"], "file_types": ["jsonl", "parquet"]},
        "report": {"plots": True},
        "runtime": {"prefect": True, "progress": False, "ingest_workers": workers, "torch_threads": 2},
    }
    path = work / f"flow-{n}.yaml"
    path.write_text(yaml.safe_dump(flow, sort_keys=False))
    return path


class Sampler(threading.Thread):
    """RSS of this process and its children every ``every`` seconds: (time, curate bytes, prefect server bytes)."""

    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.every = every
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            own, server = self.proc.memory_info().rss, 0
            for child in self.proc.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                    if any("prefect" in part or "uvicorn" in part for part in child.cmdline()):
                        server += rss
                    else:
                        own += rss
                except Exception:  # a child that just ended
                    pass
            self.samples.append((time.perf_counter(), own, server))
            time.sleep(self.every)

    def peak(self, start: float, end: float) -> tuple[int, int]:
        inside = [(o, s) for t, o, s in self.samples if start <= t <= end] or [(0, 0)]
        return max(o for o, _ in inside), max(s for _, s in inside)


def run_one(flow: Path, result: Path) -> None:
    """In a fresh process: run the flow, sample memory, write per-stage seconds and peaks."""
    from curate.config import load_flow
    from curate.launch import run

    ends: dict[str, float] = {}

    class StageEnds(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = re.match(r"stage (\S+): ", record.getMessage())
            if m:
                ends[m.group(1)] = time.perf_counter()

    import curate.flow  # noqa: F401  (Prefect configures logging on import: add the handler after it)

    lg = logging.getLogger("curate")
    lg.handlers = [StageEnds()]  # only the stage-end lines, here (Prefect's own handlers would print every shard line)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    summary = run(load_flow(flow))
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    stages = []
    for s in summary["stages"]:
        end = ends.get(s["stage"], t0 + wall)
        own, server = sampler.peak(end - s["seconds"] - 0.05, end + 0.05)
        stages.append({"stage": s["stage"], "seconds": s["seconds"], "rows": s.get("rows"), "peak_mb": own / 2**20})
    own_peak = max(o for _, o, _ in sampler.samples)
    server_peak = max(s for _, _, s in sampler.samples)
    timeline = [(round(t - t0, 1), round(o / 2**20)) for t, o, _ in sampler.samples[::10]]  # every 0.5 s: where the peak was
    result.write_text(json.dumps({"wall": wall, "stages": stages, "peak_mb": own_peak / 2**20, "server_mb": server_peak / 2**20,
                                  "stage_ends": {k: round(v - t0, 1) for k, v in ends.items()}, "timeline": timeline,
                                  "n_input": summary["n_input"], "counts": summary.get("counts")}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--work", default="/tmp/curate-scale")
    ap.add_argument("--workers", type=int, default=2, help="runtime.ingest_workers")
    ap.add_argument("--one", nargs=2, metavar=("FLOW", "RESULT"), help=argparse.SUPPRESS)  # the per-size child process
    a = ap.parse_args()
    if a.one:
        run_one(Path(a.one[0]), Path(a.one[1]))
        return
    import shutil

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in a.sizes.split(",")]
    results = {}
    for n in sizes:
        pool = make_pool(work, n)
        for d in (f"out-{n}", f"store-{n}"):
            shutil.rmtree(work / d, ignore_errors=True)  # cold: nothing in the store
        flow = write_flow(work, pool, n, a.workers)
        res = work / f"result-{n}.json"
        subprocess.run([sys.executable, __file__, "--one", str(flow), str(res)], check=True,
                       env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
        results[n] = json.loads(res.read_text())
        print(f"{n:>9,} rows: {results[n]['wall']:.0f} s, peak {results[n]['peak_mb']:.0f} MB", flush=True)
    write_table(results, sizes, a.workers)


def write_table(results: dict[int, dict], sizes: list[int], workers: int) -> None:
    from bench.common import write_result

    first = sizes[0]
    names = [s["stage"] for s in results[first]["stages"]]
    lines = [f"Rows: real alpaca rows repeated with distinct ids and vectors (1 in 10,000 broken); `runtime.ingest_workers: {workers}`; "
             "Prefect flow run, cold store. Seconds / peak RSS (MB, the run's process and its ingest workers) per stage; "
             f"growth = time at N ÷ time at {first:,} (linear = {', '.join(f'{n / first:g}' for n in sizes[1:])}).", "",
             "| stage | " + " | ".join(f"{n:,} rows: s | MB" for n in sizes) + " | growth |",
             "|---|" + "---|---|" * len(sizes) + "---|"]
    for name in names:
        cells, secs = [], []
        for n in sizes:
            st = next((s for s in results[n]["stages"] if s["stage"] == name), None)
            secs.append(st["seconds"] if st else float("nan"))
            cells.append(f"{st['seconds']:.1f} | {st['peak_mb']:.0f}" if st else "– | –")
        growth = ", ".join(f"{s / secs[0]:.1f}×" if secs[0] > 0.05 else "–" for s in secs[1:])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {growth} |")
    for label, key in (("whole run (wall, incl. Prefect start-up)", "wall"), ("peak RSS, MB (Prefect server apart)", "peak_mb"),
                       ("Prefect server RSS, MB", "server_mb")):
        vals = [results[n][key] for n in sizes]
        lines.append(f"| **{label}** | " + " | ".join(f"{v:.0f} | " for v in vals) + " | |")
    big = sizes[-1]
    if big >= 1_000_000:
        r = results[big]
        lines += ["", f"Goal at {big:,} rows: whole run {r['wall'] / 60:.1f} min (≤ 6 min: {'yes' if r['wall'] <= 360 else 'NO'}), "
                  f"peak RSS {r['peak_mb'] / 1024:.2f} GB (≤ 4 GB: {'yes' if r['peak_mb'] <= 4096 else 'NO'}); "
                  "the run also embeds (precomputed) and runs k-center, which the goal's flow does not."]
    write_result("scale", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
