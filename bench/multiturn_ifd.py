"""Multi-turn IFD before/after, in one run (issue 8, item 11): one forward per turn vs one per conversation.

    .venv/bin/python bench/multiturn_ifd.py [--before REV] [--methods superfiltering,ifd] [--repeats 1] [--threads 1]

Rows: the multi-turn rows (two or more replies) among the inputs of the default flow
(``flows/select.yaml``: the ShareGPT conversations and the Glaive tool-call rows), read as the flow
reads them. Scorers: the default flow's step for ``superfiltering`` (SmolLM2-135M, max_length 1024),
and ``ifd`` with its defaults (alpaca template, max_length 512).

- **before**: the scorer of revision ``--before`` (default: the last one with a conditioned forward
  per turn, each over the conversation up to that reply), extracted with ``git archive`` into a
  temporary directory;
- **after**: the scorer of this working tree (one conditioned forward per conversation, one target
  span per reply).

Each is timed in its own worker process (model load and a one-row warm-up excluded), alternating
before/after for ``--repeats`` rounds (minimum kept). Figures: tokens the engine forwarded (real, and
padded to batch width), wall seconds and process CPU seconds (the steadier figure on a shared
machine), and the max relative difference of every per-turn IFD and row IFD between the two.
Writes bench/results/multiturn_ifd.md.
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

import numpy as np

from common import ROOT, write_result  # noqa: E402

MULTI_TURN_INPUTS = ("glaive_toolcall", "sharegpt")
#: the last revision that scored each turn with its own conditioned forward
BEFORE = "9051d0b"


def flow_rows_and_params(method: str) -> tuple[list[dict], dict]:
    """The default flow's multi-turn rows and its score step's parameters for ``method`` ({} if none)."""
    import pyarrow.parquet as pq

    from curate.config import load_flow
    from curate.records import turns
    from curate.ingest.read import read_input

    spec = load_flow(ROOT / "flows/select.yaml")
    rows = []
    for i, inp in enumerate(spec.inputs):
        if inp.name in MULTI_TURN_INPUTS:
            ref = read_input(inp, i, str(ROOT), tempfile.mkdtemp(), spec.ingest)
            rows += [r for r in pq.read_table(ref.records_path).to_pylist() if len(turns(r["messages"])) >= 2]
    step = next((s for s in spec.score if s.method == method), None)
    return rows, (dict(step.params) if step else {})


def worker(method: str, threads: int, out: str) -> None:
    """Score the rows with the importable curate; write timings, plan and values to ``out``."""
    import curate
    from curate.scorers import ScorerContext, scorer_class

    rows, params = flow_rows_and_params(method)
    if "runtime" in scorer_class(method).Params.model_fields:  # the torch engine, as in the versions it is compared with
        params = {**params, "runtime": "torch"}
    sc = scorer_class(method)(method, params, ScorerContext(torch_threads=threads))
    sc.score_records(rows[:1])  # model load, first kernels
    t, c = time.perf_counter(), time.process_time()
    res = sc.score_records(rows)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    plan = sc.backend.last_plan
    p = sc.params
    result = {"curate": curate.__file__, "wall": wall, "cpu": cpu, "real": plan.real_tokens, "padded": plan.padded_tokens,
                "batches": plan.batches, "rows": len(rows), "turns": sum(len(sc.selected_turns(r["messages"])) for r in rows),
                "setup": f"template {p.template}, max_length {p.max_length}, {p.turns}/{p.context}/{p.aggregate}",
                "status": [r.status for r in res], "value": [r.values[next(iter(sc.outputs))] for r in res],
                "per_turn": [(r.components or {}).get("per_turn", []) for r in res]}
    with open(out, "w") as f:
        json.dump(result, f)


def run_worker(tree: str | None, method: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if tree:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, "--worker", f.name, "--methods", method, "--threads", str(threads)],
                       env=env, check=True, cwd=ROOT / "bench")
        return json.load(open(f.name))


def max_rel(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    assert (ok == (np.isfinite(a) | np.isfinite(b))).all(), "a row is scored in one form and not the other"
    return float(np.max(np.abs(a[ok] - b[ok]) / np.abs(b[ok]))) if ok.any() else 0.0


def compare(method: str, before: dict, after: dict) -> tuple[float, int]:
    """(max relative difference over row values and every per-turn value, turns compared)."""
    assert before["status"] == after["status"], (method, before["status"], after["status"])
    rel = max_rel(after["value"], before["value"])
    n = 0
    for pb, pa in zip(before["per_turn"], after["per_turn"]):
        assert len(pb) == len(pa), (method, pb, pa)
        if pa:
            rel, n = max(rel, max_rel(pa, pb)), n + len(pa)
    return rel, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=BEFORE)
    ap.add_argument("--methods", default="superfiltering,ifd")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.methods, args.threads, args.worker)

    old_tree = tempfile.mkdtemp(prefix="curate-before-")
    archive = subprocess.run(["git", "archive", args.before, "curate"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", old_tree], input=archive, check=True)
    lines = []
    for method in args.methods.split(","):
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both forms
            runs["before"].append(run_worker(old_tree, method, args.threads))
            runs["after"].append(run_worker(None, method, args.threads))
        b, a = runs["before"][0], runs["after"][0]
        assert b["curate"].startswith(old_tree) and not a["curate"].startswith(old_tree)
        rel, n_turns = compare(method, b, a)
        wall = {k: min(r["wall"] for r in v) for k, v in runs.items()}
        cpu = {k: min(r["cpu"] for r in v) for k, v in runs.items()}
        if not lines:
            lines += [
                f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), load average "
                f"{os.getloadavg()[0]:.2f}. Model: SmolLM2-135M-Instruct fp32. Rows: the {a['rows']} multi-turn rows of the "
                f"default flow's inputs ({', '.join(MULTI_TURN_INPUTS)}). Before = revision {args.before} (a conditioned "
                f"forward per turn); after = this tree (one per conversation). Seconds: min of {args.repeats} alternating "
                "round(s), model load excluded.", "",
                "| scorer | form | turns | tokens forwarded (padded) | wall s | CPU s | tokens | wall | CPU | max rel. diff |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        label = f"`{method}` ({a['setup']}; {sum(s == 'truncated_ok' for s in a['status'])} rows cut)"
        lines.append(f"| {label} | before | {b['turns']} | {b['real']:,} ({b['padded']:,}) | {wall['before']:.1f} | {cpu['before']:.1f} "
                     "| 1.00× | 1.00× | 1.00× | — |")
        lines.append(f"| | after | {a['turns']} | {a['real']:,} ({a['padded']:,}) | {wall['after']:.1f} | {cpu['after']:.1f} | "
                     f"{a['real'] / b['real']:.2f}× | {wall['after'] / wall['before']:.2f}× | {cpu['after'] / cpu['before']:.2f}× | "
                     f"{rel:.1e} over {n_turns} turns |")
    write_result("multiturn_ifd", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
