"""Generative judges on CPU: rows/s with greedy batching off and on, in one run (issue 8, item 12).

    .venv/bin/python bench/judge_throughput.py [--rows 16] [--repeats 2]

Rows: the first AlpacaEval prompts answered by two models of different quality
(../shared/data/alpaca_eval), as the judges see real data. Each case is a fresh scorer on the
bundled SmolLM2-135M-Instruct (the model itself is loaded once, before timing); "off" sets
``max_tokens_per_batch: 1`` — every prompt alone, which is how the hf backend generated before —
and "on" is the default budget (greedy rows in left-padded batches). Off and on alternate, and each
case keeps its best of ``--repeats`` runs, so load from other processes biases neither side; wall
and process CPU seconds are both reported (one torch thread by default, so CPU seconds stay
meaningful when other processes share the cores). The texts of both must be identical. DS2 with its
default sampling (temperature 1.2) runs one row at a time either way (per-row seeds), so its ratio
shows the measurement noise; DS2 at temperature 0 shows what batching gives it.
Results: bench/results/judge_throughput.md (copied into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from common import ROOT, write_result  # noqa: E402

AE = ROOT.parent / "shared" / "data" / "alpaca_eval" / "results"
MODELS = ["gpt4", "alpaca-7b"]
CASES = [
    ("llm_rating (defaults)", "llm_rating", {}),
    ("ds2 (defaults: sampled)", "ds2", {"answer_prefix": '{"Rarity": ', "max_tokens": 48, "max_attempts": 1}),
    ("ds2, temperature 0", "ds2", {"answer_prefix": '{"Rarity": ', "max_tokens": 48, "max_attempts": 1, "temperature": 0.0}),
]


def load_rows(n: int) -> list[dict]:
    from curate.ingest.validate import normalise_messages
    from curate.records import message, sample_id

    rows = []
    for m in MODELS:
        for o in json.loads((AE / m / "model_outputs.json").read_text())[: n // len(MODELS)]:
            msgs = normalise_messages([message("user", o["instruction"]), message("assistant", o["output"])])
            rows.append({"sample_id": sample_id(msgs), "messages": msgs, "format": "openai", "original": None})
    return rows


def timed(method: str, params: dict, rows: list[dict], threads: int) -> tuple[float, float, list]:
    """(wall seconds, process CPU seconds, scores) of one fresh scorer over ``rows``."""
    from curate.scorers import ScorerContext, scorer_class

    scorer = scorer_class(method)(method, params, ScorerContext(torch_threads=threads))
    t0, c0 = time.perf_counter(), time.process_time()
    out = scorer.score_records(rows)
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", type=int, nargs="*", default=None, help="indices into CASES (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds stay meaningful on a shared machine)")
    args = ap.parse_args()
    rows = load_rows(args.rows)
    timed("llm_rating", {"max_tokens": 2}, rows[:1], args.threads)  # load the model once
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), load average "
             f"{os.getloadavg()[0]:.2f} at the start. Rows: {len(rows)} AlpacaEval answers ({', '.join(MODELS)}). Model: the bundled "
             f"SmolLM2-135M-Instruct, fp32. Best of {args.repeats} alternating runs per case; rows/s per wall second and per CPU "
             "second (process time, the steadier figure on a shared machine).", "",
             "| scorer | off rows/s (wall / CPU) | on rows/s (wall / CPU) | speed-up (wall / CPU) | same texts | not rated (on) |",
             "|---|---|---|---|---|---|"]
    for name, method, params in [CASES[i] for i in args.cases] if args.cases else CASES:
        wall, cpu, outs = {"off": float("inf"), "on": float("inf")}, {"off": float("inf"), "on": float("inf")}, {}
        for _ in range(args.repeats):
            for mode, extra in (("off", {"max_tokens_per_batch": 1}), ("on", {})):
                w, c, outs[mode] = timed(method, {**params, **extra}, rows, args.threads)
                wall[mode], cpu[mode] = min(wall[mode], w), min(cpu[mode], c)
        same = [o.raw_output for o in outs["off"]] == [o.raw_output for o in outs["on"]]
        unrated = sum(o.status not in ("ok", "truncated_ok") for o in outs["on"])
        n = len(rows)
        lines.append(f"| {name} | {n / wall['off']:.2f} / {n / cpu['off']:.2f} | {n / wall['on']:.2f} / {n / cpu['on']:.2f} | "
                     f"{wall['off'] / wall['on']:.2f}× / {cpu['off'] / cpu['on']:.2f}× | {same} | {unrated}/{n} |")
        print(lines[-1], flush=True)
    lines.append(f"\nLoad average {os.getloadavg()[0]:.2f} at the end.")
    write_result("judge_throughput", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
