"""IFD engine speed, measured side by side in one run (issue 3).

    .venv/bin/python bench/ifd_engine.py [--rows 200] [--threads 2]

Same model (the bundled SmolLM2-135M-Instruct), same real rows (Cherry Alpaca 5%, from
../shared/data, else data/sample), same token sequences and spans (the IFD scorer's own jobs, alpaca
template, max_length 512):

1. reference-style loop — mirrors the Cherry reference: one row at a time, two full forward passes
   per row with ``labels`` and ``output_hidden_states=True``, full-vocabulary logits at every
   position, and a Python loop over positions with a log-softmax, an NLL and one ``.item()`` each;
2. curate fp32 — the masked-CE engine (length-sorted batches, LM head only at scored positions);
3. curate bf16 — the same in bfloat16 weights (fp32 accumulation), where the CPU supports it;
4. body only — the model body over the same batches, no LM head and no loss: the ceiling.

Reports speed-ups, the max relative IFD difference (fp32 vs reference), the Spearman correlation
(bf16 vs fp32) and efficiency = IFD tokens/s ÷ body tokens/s. Writes bench/results/ifd_engine.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from common import ROOT, spearman, write_result  # noqa: E402
SHARED = ROOT.parent / "shared" / "data" / "cherry_llm" / "cherry_alpaca_5_percent.json"


def load_rows(n: int) -> list[dict]:
    from curate.ingest.formats import from_alpaca
    from curate.ingest.validate import normalise_messages
    from curate.records import sample_id

    if SHARED.exists():
        raw = json.loads(SHARED.read_text())[:n]
        source = "../shared/data/cherry_llm/cherry_alpaca_5_percent.json"
    else:
        raw = [json.loads(line) for line in (ROOT / "data/sample/cherry_alpaca.jsonl").read_text().splitlines()][:n]
        source = "data/sample/cherry_alpaca.jsonl"
    rows = []
    for r in raw:
        msgs = normalise_messages(from_alpaca(r, {})[0])
        rows.append({"sample_id": sample_id(msgs), "messages": msgs, "format": "alpaca", "original": json.dumps(r)})
    return rows, source


def reference_loop(model, jobs) -> list[float]:
    """One row at a time, two full passes, full logits everywhere, a Python loop over positions."""
    import torch

    out = []
    for row in jobs:
        losses = []
        for part in (row.cond, row.direct):
            ids = torch.tensor([part.ids])
            labels = ids.clone()
            labels[0, : part.span[0]] = -100  # the reference also asks the model for its mean loss
            with torch.no_grad():
                outputs = model(input_ids=ids, labels=labels, output_hidden_states=True)
            logits = outputs.logits[0]
            token_loss = []
            for t in range(1, len(part.ids)):
                logp = torch.log_softmax(logits[t - 1].float(), dim=-1)
                token_loss.append(torch.nn.functional.nll_loss(logp[None], torch.tensor([part.ids[t]])).item())
            a, b = part.span
            span = token_loss[a - 1 : b - 1]
            losses.append(sum(span) / len(span))
        out.append(losses[0] / losses[1])
    return out



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from curate.lm.engine import Seq
    from curate.scorers import ScorerContext, scorer_class

    torch.set_num_threads(args.threads)
    rows, source = load_rows(args.rows)
    ctx = ScorerContext(torch_threads=args.threads)
    fp32 = scorer_class("ifd")("ifd", {"runtime": "torch"}, ctx)  # the torch engine (body_only is its baseline)
    jobs = [fp32.jobs(r)[0] for r in rows]
    n_tokens = sum(len(j.cond.ids) + len(j.direct.ids) for j in jobs)
    model = fp32.backend.model
    fp32.score_records(rows[:8])  # warm-up (model load, first kernels)

    t = time.perf_counter()
    ref = reference_loop(model, jobs)
    t_ref = time.perf_counter() - t

    t = time.perf_counter()
    ours = [o.values["ifd"] for o in fp32.score_records(rows)]
    t_ours = time.perf_counter() - t
    plan = fp32.backend.last_plan

    seqs = [Seq(p.ids, [p.span]) for j in jobs for p in (j.cond, j.direct)]
    engine = fp32.backend.engine()
    t = time.perf_counter()
    engine.body_only(seqs)
    t_body = time.perf_counter() - t
    t = time.perf_counter()
    engine.score(seqs)
    t_engine = time.perf_counter() - t

    rel = np.abs(np.array(ours) - np.array(ref)) / np.abs(np.array(ref))
    lines = []
    bf16_row = None
    has_bf16 = "avx512_bf16" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False
    if has_bf16 or torch.cuda.is_available():
        bf16 = scorer_class("ifd")("ifd", {"dtype": "bfloat16", "runtime": "torch"}, ctx)
        bf16.score_records(rows[:8])
        t = time.perf_counter()
        ours_bf16 = [o.values["ifd"] for o in bf16.score_records(rows)]
        t_bf16 = time.perf_counter() - t
        bf16_row = (t_bf16, spearman(ours_bf16, ours))

    load = os.getloadavg()[0]
    lines.append(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs ({'avx512_bf16' if has_bf16 else 'no bf16 instructions'}), "
                 f"torch {torch.__version__}, {args.threads} threads, load average {load:.2f}. Model: SmolLM2-135M-Instruct "
                 f"(bundled GGUF dequantised to fp32). Rows: {len(rows)} from {source}; {n_tokens:,} tokens over both passes; "
                 f"engine plan: {plan.batches} batches, {plan.padded_tokens:,} padded / {plan.real_tokens:,} real / "
                 f"{plan.scored_tokens:,} scored tokens.")
    lines += ["", "| run | seconds | tokens/s | vs reference | check |", "|---|---|---|---|---|"]
    lines.append(f"| reference-style loop, fp32 | {t_ref:.1f} | {n_tokens / t_ref:.0f} | 1.00× | — |")
    lines.append(f"| curate IFD, fp32 | {t_ours:.1f} | {n_tokens / t_ours:.0f} | {t_ref / t_ours:.2f}× | max rel. diff {rel.max():.1e} |")
    if bf16_row:
        lines.append(f"| curate IFD, bf16 | {bf16_row[0]:.1f} | {n_tokens / bf16_row[0]:.0f} | {t_ref / bf16_row[0]:.2f}× | Spearman vs fp32 {bf16_row[1]:.4f} |")
    lines.append(f"| model body only, same batches | {t_body:.1f} | {n_tokens / t_body:.0f} | {t_ref / t_body:.2f}× | ceiling |")
    lines.append(f"| masked-CE engine alone, same batches | {t_engine:.1f} | {n_tokens / t_engine:.0f} | {t_ref / t_engine:.2f}× | "
                 f"efficiency {t_body / t_engine:.2f} of the body |")
    lines.append("")
    lines.append(f"Efficiency (IFD tokens/s ÷ body tokens/s over the same batches): engine alone {t_body / t_engine:.2f}, "
                 f"whole scorer (tokenization and bookkeeping included) {t_body / t_ours:.2f}.")
    text = "\n".join(lines) + "\n"
    write_result("ifd_engine", text)


if __name__ == "__main__":
    main()
