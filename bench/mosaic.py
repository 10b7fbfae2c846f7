"""Mosaic-IT speed: tokenize each row once vs re-tokenize every growing prefix (issue 9).

    .venv/bin/python bench/mosaic.py [--rows 20000]

Rows: Code Alpaca from ../shared/data/codealpaca (code_alpaca_2k.json + new_codealpaca.json, 6.5k
rows) repeated with distinct sample_ids up to ``--rows``. Defaults of methods.md C3: 4 epochs,
uniform chunks of up to 10 rows, cap 2000 tokens, SmolLM2's tokenizer. For each way of counting
(the target chat template + margin, our default; the raw instruction+response count of the
reference) three runs:

1. a loop written like the reference (mosaic_main.py): every prefix rendered and tokenized again
   through the tokenizer's public API (``apply_chat_template(tokenize=True)`` / ``tokenize``);
2. ``MosaicIT.run(records, every_prefix=True)``: the same prefix loop with our counter;
3. ``MosaicIT.run(records)``: row texts tokenized once, estimates, one exact count per mosaic
   (three runs spread over the other two; the median is reported);
4. the same with the tokenizers library allowed its threads (the batched final counts run on every
   core; reported as a wall-clock ratio, since it uses more than one core by design).

All must give the same rows (asserted). One tokenizer thread for runs 1–3
(TOKENIZERS_PARALLELISM=false), so CPU seconds measure the work whatever else runs on the machine;
their ratios use them. Results: bench/results/mosaic.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"

from common import ROOT, write_result  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "codealpaca"


def load_rows(n: int) -> list[dict]:
    """Code Alpaca as canonical records, repeated with distinct ids up to n rows."""
    from curate.errors import RecordError
    from curate.ingest.formats import from_alpaca
    from curate.ingest.validate import normalise_messages, validate_messages
    from curate.records import sample_id, sha256_hex

    base = []
    for name in ("code_alpaca_2k.json", "new_codealpaca.json"):
        for row in json.loads((DATA / name).read_text()):
            try:
                msgs = normalise_messages(from_alpaca(row, {})[0])
                validate_messages(msgs)
            except RecordError:
                continue
            base.append({"sample_id": sample_id(msgs), "messages": msgs})
    return [{"sample_id": sha256_hex(r["sample_id"], str(k // len(base))), "messages": r["messages"]}
            for k, r in ((k, base[k % len(base)]) for k in range(n))]


def reference_loop(records: list[dict], p, tokenizer) -> list[tuple]:
    """The reference's loop: for every prefix draw, render, tokenize the whole text, compare."""
    from curate.rewrite.mosaic import chunk_size, draw, epoch_seed, render

    ids = [r["sample_id"] for r in records]
    texts = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]

    def join(pieces, chunk):
        return "".join(x if isinstance(x, str) else texts[chunk[x // 2]][x % 2] for x in pieces)

    def n_tokens(instruction, response):
        if p.count_with == "raw":
            return len(tokenizer.tokenize(instruction + response))
        pair = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        return len(tokenizer.apply_chat_template(pair, tokenize=True, return_dict=True)["input_ids"])

    out = []
    base = sorted(range(len(ids)), key=lambda g: (ids[g], g))
    for epoch in range(p.epochs):
        rng = random.Random(epoch_seed(p.seed, epoch))
        order = list(base)
        rng.shuffle(order)
        i = 0
        while i < len(order):
            chunk = order[i:i + chunk_size(rng, p.chunk, p.max_count, len(order) - i)]
            kept = None
            for m in range(1, len(chunk) + 1):
                d = draw(rng, m, p)
                r = render(d, [texts[g][0] for g in chunk[:m]], p.alpha_sort == "casefold", p.match_reference)
                instruction, response = join(r.instruction, chunk), join(r.response, chunk)
                if n_tokens(instruction, response) > p.budget:
                    break
                kept = (epoch, instruction, response, m, tuple(ids[g] for g in chunk[:m]))
            if kept is None:
                i += 1
            else:
                out.append(kept)
                i += kept[3]
    return out


def as_tuples(result) -> list[tuple]:
    return [(r.epoch, r.instruction, r.response, r.count, tuple(r.parents)) for r in result.rows]


def timed(fn, *a, **k):
    """(result, (wall seconds, CPU seconds of this process))."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    return out, (time.perf_counter() - t, time.process_time() - c)


def main() -> None:
    from curate.rewrite.mosaic import MosaicIT
    from curate.rewrite.tokens import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args()
    records = load_rows(args.rows)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, one tokenizer thread. Rows: {len(records):,} "
             "(Code Alpaca, 6.5k rows repeated with distinct ids). Mosaic-IT defaults: 4 epochs, uniform chunks ≤ 10, "
             "cap 2000 tokens, SmolLM2-135M-Instruct tokenizer. Ratios are of CPU seconds (single-threaded runs: "
             "robust to the other work on this shared machine); wall seconds beside them.", "",
             "| counting | run | CPU s | wall s | speed-up (CPU) | whole-mosaic tokenizations | tokens tokenized | same rows |",
             "|---|---|---|---|---|---|---|---|"]
    for count_with in ("template", "raw"):
        mosaic = MosaicIT({"count_with": count_with}, tokenizer=tokenizer)
        p = mosaic.params
        # ours is short against the other two: run it before, between and after them and keep the
        # median, so that it sees the same machine load
        fast, t1 = timed(mosaic.run, records)
        ref, t_ref = timed(reference_loop, records, p, tokenizer)
        _, t2 = timed(mosaic.run, records)
        slow, t_slow = timed(mosaic.run, records, every_prefix=True)
        _, t3 = timed(mosaic.run, records)
        t_fast = sorted((t1, t2, t3), key=lambda t: t[1])[1]
        # the final exact counts are batched (VERIFY_WINDOW mosaics a call): with the tokenizers
        # library allowed its threads, a batch runs on every core; the prefix loops cannot batch
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        par, t_par = timed(mosaic.run, records)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        same_slow, same_fast = as_tuples(slow) == ref, as_tuples(fast) == ref
        label = "chat template + 16" if count_with == "template" else "raw (reference)"
        tok_slow, tok_fast = slow.stats["n_tokens_tokenized"], fast.stats["n_tokens_tokenized"]
        lines += [f"| {label} | reference-style loop (public tokenizer API per prefix) | {t_ref[1]:.1f} | {t_ref[0]:.1f} | 1.00× | "
                  f"{slow.stats['n_prefixes']:,} | {tok_slow:,} | — |",
                  f"| {label} | prefix loop, our counter (`every_prefix=True`) | {t_slow[1]:.1f} | {t_slow[0]:.1f} | "
                  f"{t_ref[1] / t_slow[1]:.2f}× | {slow.stats['n_exact_counts']:,} | {tok_slow:,} | {same_slow} |",
                  f"| {label} | ours (each row once + estimates; median of 3 runs) | {t_fast[1]:.1f} | {t_fast[0]:.1f} | "
                  f"**{t_ref[1] / t_fast[1]:.1f}×** | {fast.stats['n_exact_counts']:,} | {tok_fast:,} ({tok_slow / tok_fast:.1f}× fewer) | {same_fast} |"]
        lines.append(f"| {label} | ours, tokenizer threads on ({os.cpu_count()} cores; wall-clock ratio) | {t_par[1]:.1f} | {t_par[0]:.1f} | "
                     f"**{t_ref[0] / t_par[0]:.1f}× wall** | {par.stats['n_exact_counts']:,} | {par.stats['n_tokens_tokenized']:,} | "
                     f"{as_tuples(par) == ref} |")
        print("\n".join(lines[-4:]), flush=True)
        assert same_slow and same_fast and as_tuples(par) == ref, f"{count_with}: outputs differ"
        st = fast.stats
        final = sum(r.n_tokens for r in fast.rows)  # the one exact count per accepted mosaic
        lines.append(f"| {label} | (output) | {st['n_rows']:,} mosaics = {st['n_mosaics_per_epoch']} per epoch, "
                     f"{st['n_overlong']} over-length, {st['n_estimate_fallbacks']} estimate fallbacks; "
                     f"{final / tok_fast:.0%} of ours' tokens are the final count of each mosaic | | | | | |")
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.2f} (a machine shared with other work).")
    write_result("mosaic", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
