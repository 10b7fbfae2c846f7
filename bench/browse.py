"""`curate browse` at scale: how long one page of 50 rows takes from the JSON API on a large run.

    .venv/bin/python bench/browse.py [--rows 1000000] [--work /tmp/curate-browse] [--repeat 3]

Builds (once; reused when ``<work>/out-<rows>/run.json`` exists) a run of ``--rows`` rows cheaply:
real alpaca rows from ``../shared/data`` repeated with distinct content (``tests/scale_rows.py``, as
``bench/scale.py`` makes them; one row in 10,000 broken on purpose, so some are quarantined), the
heuristic scorer, a threshold on ``heuristic.degenerate``, a top-k of 5% by response tokens and a
threshold on response tokens after it — no embedding, no model, no Prefect (``runtime.prefect:
false``). Then starts ``curate browse``'s server (:func:`curate.view.browse.serve_browser`) on a free
127.0.0.1 port and times ``GET /api/rows`` (a page of 50 rows with their text, scores, outcome,
reason and the count of matching rows) for:

- no filter (page 1, by row);
- an outcome filter (``not_selected``);
- a score range and a sort by that score (``heuristic.response_tokens`` in [50, 400], descending);
- a text search (``q=python``: a case-insensitive substring of prompt or response; first call = a
  match over every row's text in the browser's text index, later pages from the cached matches);
- the last page (no filter, by row);
- the same new search without the text index (a browser made with ``index_max_bytes=0``, as a run
  over :data:`curate.view.browse.INDEX_MAX_BYTES` is: a scan of every row's text in the files;
  called directly, not over HTTP).

The browser builds its text index in a background thread after the first page it answers (here:
started by ``wait_index`` right after ``/api/meta``); the timings begin once it is built (its size and
build time are printed: a page asked for during the build shares the CPU with it).

Each query runs ``--repeat`` times: the first call (``cold``: a fresh query, nothing cached but what
the operating system keeps of the files) and the best of the rest (``warm``). Prints the CPU's
vector-instruction flags (avx2, avx512*, amx* from ``/proc/cpuinfo``), the load average, and the peak
resident memory of this process (the server runs in it; the run is built in a process of its own),
and writes ``bench/results/browse-<rows>.md``.
The goal: every page under 1 s at 1M rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from scale import SHARED, SOURCES  # noqa: E402  (the rows bench/scale.py makes its million from)


def build_run(work: Path, n: int) -> Path:
    """The output folder of an ``n``-row run (made once, reused)."""
    import yaml

    out = work / f"out-{n}"
    if (out / "run.json").is_file():
        return out
    from scale_rows import alpaca_rows, write_scale_pool

    pool = work / f"pool-{n}"
    if not (pool / "done.json").is_file():
        t0 = time.perf_counter()
        write_scale_pool(pool, n, alpaca_rows([SHARED / s for s in SOURCES]), dim=None, seed=0, bad_every=10_000)
        (pool / "done.json").write_text(json.dumps({"rows": n, "seconds": round(time.perf_counter() - t0, 1)}))
    flow = {
        "name": f"browse-{n}", "base_dir": str(pool), "output_dir": str(out), "store_dir": str(work / f"store-{n}"), "seed": 0,
        "inputs": [{"path": "pool-000.jsonl", "format": "alpaca", "name": "pool"}],
        "ingest": {"shard_size": 10_000},
        "score": [{"method": "heuristic"}],
        "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0},
                   {"method": "top_k", "score": "heuristic.response_tokens", "budget": 0.05},
                   {"method": "threshold", "score": "heuristic.response_tokens", "max": 2000}],
        "export": {"layouts": ["messages"], "file_types": ["parquet"]},
        "report": {"plots": False, "sample_rows": 0},
        "runtime": {"prefect": False, "progress": False, "torch_threads": 2},
    }
    path = work / f"flow-{n}.yaml"
    path.write_text(yaml.safe_dump(flow, sort_keys=False))
    from curate.config import load_flow
    from curate.pipeline import execute

    t0 = time.perf_counter()
    execute(load_flow(path))
    print(f"built the {n:,}-row run in {time.perf_counter() - t0:.0f} s: {out}", flush=True)
    return out


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    vec = sorted(f for f in set(flags) if f == "avx2" or f.startswith("avx512") or f.startswith("amx"))
    return f"{model}; {os.cpu_count()} CPUs; {' '.join(vec) or 'no avx2/avx512/amx'}"


QUERIES = [
    ("no filter, page 1", {}),
    ("outcome not_selected", {"outcome": "not_selected"}),
    ("response_tokens in [50, 400], sorted desc", {"score": "heuristic.response_tokens", "min": "50", "max": "400",
                                                    "sort": "heuristic.response_tokens", "order": "desc"}),
    ("search 'python'", {"q": "python"}),
    ("search 'python', page 3", {"q": "python", "page": "3"}),
    ("last page", {"page": "last"}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/curate-browse"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        build_run(args.work, args.rows)
        return
    out = args.work / f"out-{args.rows}"
    if not (out / "run.json").is_file():  # built in a process of its own: the peak RSS below is the browsing alone
        subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--work", str(args.work), "--build-only"], check=True)

    from urllib.parse import urlencode

    from curate.view.browse import serve_browser

    from curate.view.browse import Browser

    t0 = time.perf_counter()
    server = serve_browser(out)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    get = lambda path: json.loads(urllib.request.urlopen(base + path, timeout=600).read())  # noqa: E731
    meta = get("/api/meta")
    server.browser.wait_index()
    index = f"text index: {server.browser.index_note} (ready {time.perf_counter() - t0:.1f} s after the server started)"
    print(f"run: {out} ({meta['n_rows']:,} rows; {', '.join(f'{k} {v:,}' for k, v in meta['outcomes'].items())})")
    print(f"CPU: {cpu_flags()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(index)
    lines = [f"`curate browse` API, {meta['n_rows']:,}-row run; CPU: {cpu_flags()}; load average at start "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {index}.", "",
             "| page of 50 | matching rows | first call, s | best of the rest, s |", "|---|---|---|---|"]
    worst = 0.0
    for label, params in QUERIES:
        times, total = [], 0
        for i in range(args.repeat):
            if i == 0 and "page" not in params or params.get("page") == "last":
                server.browser.clear_cache()  # a fresh query: nothing cached (a paged search keeps its first page's matches)
            if params.get("page") == "last":
                first = get("/api/rows?" + urlencode({**params, "page": 1}))
                params = {**params, "page": str(first["pages"])}
            t0 = time.perf_counter()
            got = get("/api/rows?" + urlencode(params))
            times.append(time.perf_counter() - t0)
            total = got["total"]
            assert len(got["rows"]) == min(50, max(0, total - 50 * (got["page"] - 1))), (label, len(got["rows"]))
        rest = min(times[1:]) if len(times) > 1 else times[0]
        worst = max(worst, times[0])
        print(f"{label:45s} {total:>9,} rows  first {times[0]:6.3f} s  best of the rest {rest:6.3f} s", flush=True)
        lines.append(f"| {label} | {total:,} | {times[0]:.3f} | {rest:.3f} |")
    server.shutdown()
    label, q = "search 'python', no text index (files scanned)", "python"
    plain = Browser(out, index_max_bytes=0)
    plain.wait_index()
    times = []
    for _ in range(args.repeat):
        plain.clear_cache()
        t0 = time.perf_counter()
        got = plain.rows({"q": [q]})
        times.append(time.perf_counter() - t0)
    rest = min(times[1:]) if len(times) > 1 else times[0]
    print(f"{label:45s} {got['total']:>9,} rows  first {times[0]:6.3f} s  best of the rest {rest:6.3f} s (each a new search)", flush=True)
    lines.append(f"| {label}; every call a new search | {got['total']:,} | {times[0]:.3f} | {rest:.3f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB; slowest first call {worst:.3f} s (goal < 1 s at 1M rows; without the index aside)")
    lines += ["", f"Peak RSS of the process (server and its text index included): {peak:.0f} MB; slowest first call {worst:.3f} s "
              "(goal: < 1 s at 1M rows; the search without the index aside)."]
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"browse-{args.rows}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
