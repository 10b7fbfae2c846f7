"""Generation engine speed (issue 10): batched hf generation and concurrent openai requests.

    .venv/bin/python bench/generation.py [--prompts 32] [--max-tokens 64] [--repeats 1] [--replicas 1,2]

Prompts: the first AlpacaEval instructions (../shared/data/alpaca_eval, gpt4 outputs file), as user
messages; the bundled SmolLM2-135M-Instruct, fp32, greedy, ``--max-tokens`` new tokens at most.
Every call goes through :class:`curate.lm.calls.CallEngine` without a cache (the path the LLM
rewriters use).

(a) **hf**: one prompt at a time (``max_tokens_per_batch: 1``) vs batched (the default budget:
    left-padded batches sorted by length). Off and on alternate, best of ``--repeats`` each.
(b) **openai**: the stand-in OpenAI-compatible server of the tests (tests/lm_server.py) serving the
    same model in this process, with **dynamic batching** as vLLM's server does it (requests that
    arrive together are generated in one left-padded ``generate`` call, up to 8 rows): sequential
    requests (``concurrency: 1``: the server only ever sees one) vs 8 in flight. One case per
    ``--replicas`` count (default 1 and 2): with 2 the server runs two copies of the model, each with
    its own worker thread taking requests from one queue and batching what it takes, as a
    deployment with several replicas does. Sequential requests then keep one replica (one core with
    one torch thread) busy at a time, while 8 in flight keep both busy: that case measures what a
    client gains from concurrency against a replicated server, not a faster model.

(c) ``--ceiling``: what batching can give at all on this machine: ``generate`` on 1, 8 and 16
    copies of one prompt, exactly 64 new tokens each (no padding, no early end), CPU seconds.

New tokens per second of wall time and per CPU second of this process (the server runs in it),
and whether the greedy texts are identical both ways. Torch threads: ``--threads`` (default 1, so
CPU seconds stay meaningful on a shared machine). Results: bench/results/generation.md (copied into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from common import ROOT, write_result  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
AE = ROOT.parent / "shared" / "data" / "alpaca_eval" / "results" / "gpt4" / "model_outputs.json"


def timed(engine, calls) -> tuple[float, float, list]:
    t0, c0 = time.perf_counter(), time.process_time()
    replies = engine.run(calls)
    return time.perf_counter() - t0, time.process_time() - c0, replies


def ceiling(threads: int) -> str:
    """Part (c): new tokens per CPU second of ``generate`` at batch 1, 8 and 16 (same prompt, 64 tokens each)."""
    import torch

    from curate.lm import LMParams, load_backend
    from curate.lm.hf import chat_prompt_ids

    b = load_backend(LMParams(), threads)
    ids = chat_prompt_ids(b.tokenizer, [{"role": "user", "content": "Write a short story about a lighthouse keeper and the sea."}])

    def run(n: int) -> float:
        x = torch.tensor([ids] * n)
        c = time.process_time()
        with torch.inference_mode():
            b.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             pad_token_id=b._pad_id())
        return time.process_time() - c

    run(1)
    rate = {n: n * 64 / min(run(n) for _ in range(2)) for n in (1, 8, 16)}
    return (f"Ceiling (`--ceiling`, {threads} torch thread(s)): `generate` on one prompt ({len(ids)} tokens) × 1 / 8 / 16 rows, 64 new "
            f"tokens each: {rate[1]:.1f} / {rate[8]:.1f} / {rate[16]:.1f} new tokens per CPU second — batch 8 is "
            f"{rate[8] / rate[1]:.2f}× batch 1, batch 16 {rate[16] / rate[1]:.2f}×.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--replicas", default="1,2", help="comma-separated replica counts of the stand-in server, one openai case each")
    ap.add_argument("--ceiling", action="store_true", help="only part (c); prints its line")
    args = ap.parse_args()
    if args.ceiling:
        print(ceiling(args.threads))
        return

    from lm_server import LocalCompletionsServer

    from curate.lm import LMParams, load_backend
    from curate.lm.calls import Call, CallEngine, Decoding
    from curate.lm.hf import chat_prompt_ids, greedy_batches
    from curate.models import set_torch_threads

    set_torch_threads(args.threads)
    questions = [o["instruction"] for o in json.loads(AE.read_text())[: args.prompts]]
    decoding = Decoding(max_tokens=args.max_tokens)
    calls = [Call([{"role": "user", "content": q}], {"id": "bench", "version": "1", "hash": "-"}, decoding) for q in questions]
    alone = load_backend(LMParams(max_tokens_per_batch=1), args.threads)
    batched = load_backend(LMParams(), args.threads)
    batched.chat([calls[0].messages], {"max_tokens": 2})  # load the model once, before timing
    n_prompt = [len(chat_prompt_ids(alone.tokenizer, c.messages)) for c in calls]
    load0 = os.getloadavg()[0]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), load average {load0:.2f} at the "
             f"start. Prompts: the first {len(calls)} AlpacaEval instructions ({min(n_prompt)}–{max(n_prompt)} prompt tokens with the "
             f"chat template). Model: the bundled SmolLM2-135M-Instruct, fp32, greedy, at most {args.max_tokens} new tokens. "
             "Tokens/s: new tokens per wall second / per CPU second of this process (the stand-in server runs in it).", "",
             "| case | one at a time: tok/s (wall / CPU) | batched or concurrent: tok/s (wall / CPU) | speed-up (wall / CPU) | same texts |",
             "|---|---|---|---|---|"]

    def row(name, off, on):
        (w0, c0, r0), (w1, c1, r1) = off, on
        tok0, tok1 = sum(r.n_tokens for r in r0), sum(r.n_tokens for r in r1)
        assert all(r.status == "ok" for r in r0 + r1), [r.error for r in r0 + r1 if r.status != "ok"]
        same = sum(a.text == b.text for a, b in zip(r0, r1))
        lines.append(f"| {name} | {tok0 / w0:.1f} / {tok0 / c0:.1f} | {tok1 / w1:.1f} / {tok1 / c1:.1f} | "
                     f"{(tok1 / w1) / (tok0 / w0):.2f}× / {(tok1 / c1) / (tok0 / c0):.2f}× | {same}/{len(r0)} |")
        print(lines[-1], flush=True)
        return [(i, a.text, b.text) for i, (a, b) in enumerate(zip(r0, r1)) if a.text != b.text]

    # (a) hf: alone vs batched, alternating, best of repeats (by wall time)
    best: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for mode, backend in (("alone", alone), ("batched", batched)):
            res = timed(CallEngine(backend), calls)
            if mode not in best or res[0] < best[mode][0]:
                best[mode] = res
    batches = len(greedy_batches(n_prompt, batched.token_budget))
    hf_alone = best["alone"][2]
    lines_after: list[str] = []
    diff_hf = row(f"hf, {len(calls)} prompts ({batches} batches under {batched.token_budget} padded tokens)", best["alone"], best["batched"])

    # (b) openai: sequential vs in flight, against the stand-in server with dynamic batching (and replicas)
    diffs = [("hf", diff_hf)]
    for n_rep in (int(x) for x in args.replicas.split(",")):
        with LocalCompletionsServer(batched.model, tokenizer=batched.tokenizer, max_batch=args.in_flight, replicas=n_rep) as server:
            def api(concurrency):
                return load_backend(LMParams(backend="openai", base_url=server.base_url, served_name="local-smollm2", concurrency=concurrency))

            best = {}
            sizes, served = {}, {}
            for _ in range(args.repeats):
                for mode, conc in (("sequential", 1), ("concurrent", args.in_flight)):
                    n0 = len(server.batches)
                    res = timed(CallEngine(api(conc)), calls)
                    sizes[mode], served[mode] = server.batches[n0:], server.batch_replicas[n0:]
                    if mode not in best or res[0] < best[mode][0]:
                        best[mode] = res
        conc = sizes["concurrent"]
        if n_rep == 1:
            name = (f"openai, 1 replica, {args.in_flight} in flight vs sequential (server batches of {min(conc)}–{max(conc)} rows, "
                    f"mean {sum(conc) / len(conc):.1f})")
        else:
            per = ", ".join(f"replica {r}: {served['concurrent'].count(r)} batches, {sum(b for b, s in zip(conc, served['concurrent']) if s == r)} rows"
                            for r in range(n_rep))
            name = (f"openai, {n_rep} replicas ({args.threads} torch thread(s) each), {args.in_flight} in flight vs sequential — "
                    f"sequential keeps one replica busy at a time, {args.in_flight} in flight all {n_rep} (server batches of "
                    f"{min(conc)}–{max(conc)} rows, mean {sum(conc) / len(conc):.1f}; {per})")
        diffs.append((f"openai {n_rep} replica(s)", row(name, best["sequential"], best["concurrent"])))
        lines_after.append(f"hf one at a time and the {n_rep}-replica server give the same text on "
                           f"{sum(a.text == b.text for a, b in zip(hf_alone, best['sequential'][2]))}/{len(calls)} prompts sequentially, "
                           f"{sum(a.text == b.text for a, b in zip(hf_alone, best['concurrent'][2]))}/{len(calls)} with "
                           f"{args.in_flight} in flight.")
    lines.append("")
    lines.extend(lines_after)
    for name, diff in diffs:
        for i, a, b in diff:
            lines.append(f"- {name}: prompt {i} differs. one at a time: {a[:160]!r} … batched/concurrent: {b[:160]!r} …")
    lines.append(f"\nLoad average {os.getloadavg()[0]:.2f} at the end.")
    write_result("generation", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
