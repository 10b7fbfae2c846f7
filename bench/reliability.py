"""The reliability tests at benchmark size: tests/test_reliability.py with ``CURATE_SCALE_ROWS`` rows.

    .venv/bin/python bench/reliability.py [--rows 1000000]

CI runs those tests at 100,000 rows; this runs the same file (kill -9 at five seeded points then
resume, a disk that fills during export, damaged store entries, bad rows scattered through the input)
at ``--rows`` and records which stage each kill hit, each test's outcome and time, and the wall time,
in bench/results/reliability.md. The tests themselves assert the outcomes (byte-identical output after
resume, at most one shard recomputed per killed stage, the previous export intact, counts reconciled).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time

from common import ROOT, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("-k", dest="select", default=None, help="only the tests pytest's -k expression selects")
    ap.add_argument("--out", default="reliability", help="results file name under bench/results (without .md)")
    args = ap.parse_args()
    env = {**os.environ, "CURATE_SCALE_ROWS": str(args.rows)}
    cmd = [sys.executable, "-m", "pytest", "tests/test_reliability.py", "-s", "-q", "-rA", "--durations=0", "-p", "no:cacheprovider",
           "-o", "timeout=7200", *(["-k", args.select] if args.select else [])]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = res.stdout + res.stderr
    kills = re.findall(r"^seed (\d+): aimed at (\S+), killed in (\S+)", out, re.M)
    outcome = {m[1].split("::")[-1]: m[0] for m in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", out, re.M)}
    secs: dict[str, float] = {}
    for s, phase, test in re.findall(r"^([\d.]+)s (setup|call|teardown)\s+(\S+)", out, re.M):
        name = test.split("::")[-1]
        secs[name] = secs.get(name, 0.0) + float(s)
    lines = [f"# Reliability at {args.rows:,} rows (`bench/reliability.py`)", "",
             f"{platform.machine()}, {os.cpu_count()} CPUs; tests/test_reliability.py with CURATE_SCALE_ROWS={args.rows}; "
             f"pytest exit status {res.returncode}; wall {wall / 60:.1f} min (the pool is written and the uninterrupted "
             "reference run made once, in the first test's setup).", "",
             "| test | outcome | seconds (setup + call) |", "|---|---|---:|"]
    lines += [f"| {name} | {outcome.get(name, '?')} | {secs.get(name, 0.0):.0f} |" for name in sorted(set(outcome) | set(secs))]
    lines += ["", "Kills, in order (a kill that lands past its target stage is checked like any other, then the seed tries earlier):", "",
              "| seed | aimed at | killed in |", "|---:|---|---|"] + [f"| {s} | {a} | {k} |" for s, a, k in kills]
    if res.returncode:
        lines += ["", "```", out[-4000:], "```"]
    write_result(args.out, "\n".join(lines) + "\n")
    sys.exit(res.returncode)


if __name__ == "__main__":
    main()
