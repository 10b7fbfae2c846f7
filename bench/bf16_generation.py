"""Batched greedy generation with ``dtype: bf16-matmul`` vs float32 (issue 24, item 4).

    .venv/bin/python bench/bf16_generation.py [--prompts 16] [--max-tokens 64] [--threads 2] [--repeats 2]

The bundled SmolLM2-135M-Instruct through the hf backend's ``chat`` (what the judges and rewriters call), the first
``--prompts`` AlpacaEval instructions (../shared/data/alpaca_eval, else a few fixed prompts) as user messages, greedy,
at most ``--max-tokens`` new tokens, the default batching. float32 and bf16-matmul alternate, best of ``--repeats`` each,
in one process (the same loaded model: bf16-matmul changes only the CPU's matmul math). Reports new tokens per second,
the ratio, how many replies are identical to float32's and, for the others, the first differing token position. Prints
the CPU flags. Writes bench/results/bf16_generation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from common import ROOT, write_result  # noqa: E402

AE = ROOT.parent / "shared" / "data" / "alpaca_eval" / "results" / "gpt4" / "model_outputs.json"
FALLBACK = ["Write a haiku about autumn.", "Explain what a hash table is.", "Give three tips for a job interview.",
            "Summarize the plot of Hamlet in two sentences."]


def prompts(n: int) -> list[str]:
    if AE.exists():
        return [r["instruction"] for r in json.loads(AE.read_text())[:n]]
    return (FALLBACK * n)[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from curate.lm import LMParams, load_backend
    from curate.lm.base import cpu_flags

    texts = prompts(args.prompts)
    convs = [[{"role": "user", "content": t}] for t in texts]
    decoding = {"temperature": 0.0, "max_tokens": args.max_tokens}
    backends = {d: load_backend(LMParams(dtype=d, device="cpu"), args.threads) for d in ("float32", "bf16-matmul")}
    backends["float32"].chat(convs[:2], decoding)  # warm-up: model load, first kernels
    best: dict[str, float] = {}
    replies: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name, b in backends.items():
            t = time.perf_counter()
            replies[name] = b.chat(convs, decoding)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    tok = backends["float32"].tokenizer
    new = {name: sum(len(tok(r["text"] or "")["input_ids"]) for r in out) for name, out in replies.items()}
    same = sum(a["text"] == b["text"] for a, b in zip(replies["float32"], replies["bf16-matmul"]))
    first_diff = []
    for a, b in zip(replies["float32"], replies["bf16-matmul"]):
        if a["text"] != b["text"]:
            x, y = tok(a["text"] or "")["input_ids"], tok(b["text"] or "")["input_ids"]
            first_diff.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))))
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, flags: {' '.join(flags)}; {args.threads} torch threads, "
             f"load average {os.getloadavg()[0]:.2f}. {len(texts)} prompts, greedy, ≤ {args.max_tokens} new tokens, best of "
             f"{args.repeats}.", "",
             "| dtype | seconds | new tokens/s | vs float32 | replies identical to float32 |", "|---|---|---|---|---|"]
    for name in backends:
        rate = new[name] / best[name]
        lines.append(f"| {name} | {best[name]:.1f} | {rate:.1f} | {best['float32'] / best[name]:.2f}× | "
                     f"{len(texts) if name == 'float32' else same}/{len(texts)} |")
    if first_diff:
        lines += ["", f"Replies that differ first differ at new-token positions {sorted(first_diff)} (greedy decoding follows "
                      "the first near-tie the two maths break differently)."]
    text = "\n".join(lines) + "\n"
    write_result("bf16_generation", text)


if __name__ == "__main__":
    main()
