"""Do the judge scorers carry signal? (issue 4) — a measurement, not a test threshold.

    .venv/bin/python bench/judge_signal.py [--prompts 12] [--only llm_rating ...]

Data with a known quality order: AlpacaEval's prompts answered by eight models whose AlpacaEval-1
win rates are known (../shared/data/alpaca_eval). The same first N prompts for every model. Each
judge scorer — deita complexity and quality, SelectIT, LLM rating and DS2 rating, all with the bundled
SmolLM2-135M-Instruct — scores every answer; we report the Spearman correlation between each model's
mean score and its win rate (8 models), the rows/s, and how many answers could not be rated.
Results: bench/results/judge_signal.md (copied into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time

import numpy as np

from common import ROOT, spearman, write_result  # noqa: E402
AE = ROOT.parent / "shared" / "data" / "alpaca_eval"
MODELS = ["gpt4_1106_preview", "gpt4", "claude-2", "llama-2-7b-chat-hf", "oasst-sft-llama-33b", "text_davinci_003", "guanaco-7b", "alpaca-7b"]

SCORERS = [
    ("deita", {}, ["deita.complexity", "deita.quality", "deita.evol"]),
    ("selectit", {"n_prompts": 5}, ["selectit.selectit"]),
    ("llm_rating", {}, ["llm_rating.rating"]),  # defaults (since issue 8 the reply is cued with "Score:")
    ("ds2", {"answer_prefix": '{"Rarity": ', "max_tokens": 40, "max_attempts": 2}, ["ds2.overall", "ds2.class"]),
]



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--only", nargs="*", default=None, help="run only these scorers (e.g. llm_rating)")
    args = ap.parse_args()
    from curate.ingest.validate import normalise_messages
    from curate.records import message, sample_id
    from curate.scorers import ScorerContext, scorer_class

    with open(AE / "leaderboards" / "data_AlpacaEval" / "alpaca_eval_gpt4_leaderboard.csv") as f:
        win = {r[""]: float(r["win_rate"]) for r in csv.DictReader(f)}
    rows, owner = [], []
    for m in MODELS:
        outputs = json.loads((AE / "results" / m / "model_outputs.json").read_text())[: args.prompts]
        for o in outputs:
            msgs = normalise_messages([message("user", o["instruction"]), message("assistant", o["output"])])
            rows.append({"sample_id": sample_id(msgs), "messages": msgs, "format": "openai", "original": None})
            owner.append(m)
    owner = np.array(owner)
    ctx = ScorerContext(torch_threads=2)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, 2 torch threads. Data: the first {args.prompts} AlpacaEval prompts "
             f"answered by {len(MODELS)} models ({len(rows)} rows); quality order = AlpacaEval-1 win rates (GPT-4 judge). "
             "Scorer model: the bundled SmolLM2-135M-Instruct.", "",
             "| score | Spearman (8 models) | rows/s | not rated | per-model means (best → worst by win rate) |", "|---|---|---|---|---|"]
    for method, params, names in SCORERS:
        if args.only and method not in args.only:
            continue
        scorer = scorer_class(method)(method, params, ctx)
        scorer.score_records(rows[:1])  # load the model
        t0 = time.perf_counter()
        out = scorer.score_records(rows)
        secs = time.perf_counter() - t0
        for name in names:
            variant = name.split(".", 1)[1]
            v = np.array([o.values[variant] for o in out], dtype=np.float64)
            means = np.array([np.nanmean(v[owner == m]) if np.isfinite(v[owner == m]).any() else np.nan for m in MODELS])
            ok = np.isfinite(means)
            # an instruction-only score (deita complexity) is the same for every model by construction
            spread = np.nanmax(means) - np.nanmin(means) if ok.any() else 0.0
            rho = spearman(means[ok], np.array([win[m] for m in MODELS])[ok]) if ok.sum() > 2 and spread > 1e-4 else float("nan")
            failed = int((~np.isfinite(v)).sum())
            lines.append(f"| {name} | {rho:.2f} | {len(rows) / secs:.2f} | {failed}/{len(rows)} | "
                         + ", ".join("–" if not np.isfinite(x) else f"{x:.3g}" for x in means) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    write_result("judge_signal" + "".join(f"-{m}" for m in args.only or []), text)  # a partial run keeps the full table


if __name__ == "__main__":
    main()
