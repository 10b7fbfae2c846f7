"""Wall time of the default flow on this machine, measured as a user runs it.

    .venv/bin/python bench/default_flow.py

Each run is a fresh `curate run flows/select.yaml` process (model loading included) with its own
output and store folders under a temp dir:

- cold store, Prefect (ephemeral server): everything is computed, the bundled GGUF de-quantised
  into a fresh model cache (a new user's first run);
- warm store, Prefect: the same flow again — nothing is scored or embedded;
- new budget, Prefect: `--set select.4.budget=20` — re-selects without scoring;
- cold store, in-process (`--no-prefect`): the Prefect overhead by difference.

Results: a markdown table on stdout and in bench/results/default_flow.md (copied into
docs/benchmarks.md). Goal (issue 9): a cold run in ≤ 2 minutes on the developers' machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_result  # noqa: E402
CURATE = [sys.executable, "-m", "curate"]


def timed(args: list[str], env: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run(CURATE + args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
    return wall, json.loads((Path(out) / "run.json").read_text())


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    # a fresh model cache too: the first case de-quantises the bundled GGUF, as a new user's first run does
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "CURATE_CACHE_DIR": str(tmp / "cache"), "CURATE_NO_PROGRESS": "1",
           "HF_HUB_OFFLINE": "1"}
    flow = "flows/select.yaml"
    rows = []

    def case(label, store, out, *extra):
        args = ["run", flow, "--set", f"store_dir={tmp / store}", "--set", f"output_dir={tmp / out}", *extra]
        wall, summary = timed(args, env)
        stages = {s["stage"]: s for s in summary["stages"]}
        rows.append({"case": label, "wall_s": wall, "inside_flow_s": summary["seconds"],
                     "embed_s": stages.get("embed", {}).get("seconds", 0.0),
                     "score_s": sum(s.get("seconds", 0.0) for k, s in stages.items() if k.startswith("score")), "embedded": stages.get("embed", {}).get("computed_rows", 0),
                     "selected": summary["counts"]["selected"], "executor": summary["executor"]})

    case("cold store, Prefect", "store-a", "out-a")
    case("warm store, Prefect", "store-a", "out-a")
    case("new budget (20), Prefect", "store-a", "out-b", "--set", "select.4.budget=20")
    case("cold store, --no-prefect", "store-c", "out-c", "--no-prefect")

    load = os.getloadavg()
    import torch

    head = (f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__} "
            f"(2 intra-op threads), load average {load[0]:.2f} at the end. Input: the default flow's 158 rows of data/sample.")
    lines = [head, "", "| case | wall s (process) | s inside the flow | score s | embed s | rows embedded | selected |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['wall_s']:.1f} | {r['inside_flow_s']:.1f} | {r['score_s']:.1f} | {r['embed_s']:.1f} | {r['embedded']} | {r['selected']} |")
    text = "\n".join(lines) + "\n"
    write_result("default_flow", text)


if __name__ == "__main__":
    main()
