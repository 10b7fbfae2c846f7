"""Constrained decoding on the bundled SmolLM2-135M-Instruct (hf backend, xgrammar): parse rates and cost.

Three measurements, written to ``bench/results/constrained_decoding.md``:

1. **Parse rate** of the replies to the recorded prompts, without constraints (the replies recorded in
   ``tests/data/reflection_smollm2_outputs.json`` and ``tests/data/aide_smollm2_replies.json``, parsed
   again) and with them (the same prompts generated again with ``constrain``: for Reflection the
   recorder's procedure on the same rows, ``mode: both``, ``input_policy: compress``). A reply counts as
   parsed when it is complete (not cut by ``max_tokens``) and the parser of its call reads every field.
2. **DS2 ratings**: the rating prompt on rows of ``data/sample/alpaca_gpt4_en.json`` with the settings of
   ``flows/ds2.yaml`` (answer prefix ``{"Rarity": ``, 48 new tokens, the reference's sampling), one
   attempt per row, with and without the constraint: the share with a parseable JSON object.
3. **Cost per generated token**: Reflection's two prompts on two sample rows, one at a time (no batching
   effects), greedy, constrained and free in turn, ``--reps`` times: decode seconds per token (the time of
   ``--tokens`` new tokens minus that of one, the prefill) in wall time and in this process's CPU time
   (steadier on a shared machine), the ratios of the medians, and the grammar mask's CPU time per step.

Run from the repository root: ``.venv/bin/python bench/constrained_decoding.py`` (``--help``: sizes and
parts to skip). The numbers in ``docs/benchmarks.md`` came from a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reflection_rows import alpaca_records  # noqa: E402

from curate import prompts as P  # noqa: E402
from curate.lm import hf as hf_mod  # noqa: E402
from curate.lm.hf import HFBackend  # noqa: E402
from curate.lm.spec import LMParams  # noqa: E402
from curate.rewrite import tags  # noqa: E402
from curate.rewrite.reflection import KIND_FIELDS  # noqa: E402
from curate.rewrite.tags import parse_tagged  # noqa: E402

DATA = ROOT / "tests" / "data"


def reflection_parsed(kind: str, text: str | None) -> bool:
    return text is not None and all(f.status == "ok" for f in parse_tagged(text, KIND_FIELDS[kind]).values())


def aide_parsed(prompt_id: str, text: str | None, fields: dict) -> bool:
    """Whether AIDE's parser for this prompt reads what it needs from the reply."""
    if text is None:
        return False
    if prompt_id == "aide_topic":
        return tags.parse_attributes(text, 3)[2].startswith("ok")
    if prompt_id == "aide_kg_expand":
        return bool(tags.parse_triples(text, [], int(fields.get("n", 2))))
    if prompt_id.startswith("aide_rewrite"):
        return tags.parse_tag(text, "Rewritten Prompt")[0] is not None
    if prompt_id.startswith("aide_create"):
        return tags.parse_tag(text, "Created Prompt")[0] is not None
    if prompt_id == "aide_answer_multi":
        body = tags.parse_tag(text, "Choices")[0]
        opts = tags.parse_choices(body or "")
        return sum(c for _, c in opts) == 1 and len(opts) >= 2
    if prompt_id == "aide_answer_binary":
        return tags.parse_yes_no(text, "Choices")[0] is not None
    if prompt_id == "aide_answer_free":
        return tags.parse_tag(text, "Choices")[0] is not None
    if prompt_id.startswith("aide_grade"):
        return tags.parse_grade(text)[0] is not None
    if prompt_id == "aide_improve":
        return tags.parse_tag(text, "Improved Prompt")[0] is not None
    if prompt_id == "aide_check_choices":
        return tags.parse_yes_no(text, "Response")[0] is not None
    raise ValueError(prompt_id)


def fill(prompt: P.Prompt, fields: dict) -> str:
    """The prompt's text with the recorded fields (a field the prompt gained since is empty)."""
    names = {n for _, n, _, _ in string.Formatter().parse(prompt.text) if n}
    return prompt.text.format(**{n: fields.get(n, "") for n in names})


def complete(o: dict) -> bool:
    return o.get("status", "ok") == "ok" and o.get("finish_reason") != "length"


def reflection_rates(threads: int, max_tokens: int, rows: tuple[int, ...]) -> dict:
    from curate.rewrite.base import RewriteContext, UnitResult
    from curate.rewrite.reflection import Job, ReflectionTuning, reflect

    recorded = json.loads((DATA / "reflection_smollm2_outputs.json").read_text(encoding="utf-8"))
    free = [reflection_parsed(r["call"], r["text"]) for r in recorded["replies"] if r["row"] in rows]
    records = alpaca_records(rows)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        step = ReflectionTuning("reflection", {"mode": "both", "input_policy": "compress", "parse_retry": False,
                                               "decoding": {"max_tokens": max_tokens, "constrain": True}},
                                RewriteContext(seed=0, torch_threads=threads, store_dir=store))
        pairs = step.prepare(records, UnitResult())
        merged = step.compress(pairs)
        _, jobs, _ = step.instruction_jobs(pairs, merged)
        outcomes = list(merged.values()) + reflect(step, jobs)
        outcomes += reflect(step, [Job(x.sample_id, "response", x.instruction, x.input, x.answer_shown) for x in pairs])
    seconds = time.perf_counter() - t0
    shaped = [r.status == "ok" and reflection_parsed(name, r.text) for o in outcomes for name, _, r in o.exchanges]
    return {"recorded": (sum(free), len(free), recorded["decoding"]["max_tokens"]), "constrained": (sum(shaped), len(shaped), max_tokens),
            "seconds": seconds}


def aide_rates(backend: HFBackend, max_tokens: int, first: int = 0) -> dict:
    recorded = json.loads((DATA / "aide_smollm2_replies.json").read_text(encoding="utf-8"))
    recorded = recorded[:first] if first else recorded
    free = [aide_parsed(r["prompt"], r["text"], r["fields"]) for r in recorded]
    convs = [[{"role": "user", "content": fill(P.ALL[r["prompt"]], r["fields"])}] for r in recorded]
    shapes = [P.ALL[r["prompt"]].shape for r in recorded]
    t0 = time.perf_counter()
    out = backend.chat(convs, {"temperature": 0.0, "max_tokens": max_tokens}, shapes=shapes)
    seconds = time.perf_counter() - t0
    shaped = [complete(o) and aide_parsed(r["prompt"], o["text"], r["fields"]) for r, o in zip(recorded, out)]
    per = {}
    for r, a, b in zip(recorded, free, shaped):
        c = per.setdefault(r["prompt"], [0, 0, 0])
        c[0] += a
        c[1] += b
        c[2] += 1
    return {"recorded": (sum(free), len(free), recorded[0]["decoding"]["max_tokens"]),
            "constrained": (sum(shaped), len(shaped), max_tokens),
            "per_prompt": per, "seconds": seconds}


def ds2_rates(backend: HFBackend, n_rows: int) -> dict:
    from curate.scorers.ds2 import DS2Params, parse_ds2, rating_conversation

    p = DS2Params()
    decoding = {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "max_tokens": 48}
    prefix = '{"Rarity": '
    convs = [rating_conversation(r["messages"]) for r in alpaca_records(tuple(range(n_rows)))]
    seeds = list(range(len(convs)))
    res = {}
    for label, shapes in (("free", None), ("constrained", [P.DS2_USER.shape] * len(convs))):
        t0 = time.perf_counter()
        out = backend.chat(convs, decoding, seeds=seeds, prefix=prefix, shapes=shapes)
        res[label] = (sum(parse_ds2(o["text"]) is not None for o in out), len(out), time.perf_counter() - t0)
    return res


def cost(backend: HFBackend, tokens: int, reps: int) -> dict:
    """Decode seconds per generated token, free vs constrained: for each prompt, the time of ``tokens``
    new tokens minus the time of one (the prompt's prefill), over ``tokens - 1``. The prompts are
    Reflection's on two sample rows, whose layout (and SmolLM2's free text) runs past ``tokens``, so both
    modes generate the same number of tokens. Also the grammar mask's own time per decoding step."""
    from curate.rewrite.reflection import INSTRUCTION, RESPONSE

    cases = []
    for r in alpaca_records((1, 3)):
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        cases.append((INSTRUCTION.messages(instruction=user, input="", answer=answer), INSTRUCTION.shape))
        cases.append((RESPONSE.messages(instruction=user, input="", answer=answer), RESPONSE.shape))
    backend.chat([cases[0][0]], {"temperature": 0.0, "max_tokens": 2}, shapes=[cases[0][1]])  # warm up: model, compiler
    backend.constraints([s for _, s in cases])
    mask_time = [0.0, 0]
    original = hf_mod.GrammarMask.__call__

    def timed(self, input_ids, scores):
        t = time.process_time()
        try:
            return original(self, input_ids, scores)
        finally:
            mask_time[0] += time.process_time() - t
            mask_time[1] += 1

    def run(conv, shape, n):
        t, c = time.perf_counter(), time.process_time()
        (o,) = backend.chat([conv], {"temperature": 0.0, "max_tokens": n}, shapes=None if shape is None else [shape])
        return time.perf_counter() - t, time.process_time() - c, o["n_tokens"]

    per = {"free": [], "constrained": []}
    cpu = {"free": [], "constrained": []}
    hf_mod.GrammarMask.__call__ = timed
    try:
        for _ in range(reps):
            for label in ("free", "constrained"):
                secs = cpus = toks = 0.0
                for conv, shape in cases:
                    shape = shape if label == "constrained" else None
                    w1, c1, _ = run(conv, shape, 1)
                    wn, cn, n = run(conv, shape, tokens)
                    secs, cpus, toks = secs + wn - w1, cpus + cn - c1, toks + n - 1
                per[label].append(secs / max(toks, 1))
                cpu[label].append(cpus / max(toks, 1))
    finally:
        hf_mod.GrammarMask.__call__ = original
    free, con = statistics.median(per["free"]), statistics.median(per["constrained"])
    cfree, ccon = statistics.median(cpu["free"]), statistics.median(cpu["constrained"])
    return {"free_ms": 1000 * free, "constrained_ms": 1000 * con, "ratio": con / free, "cpu_free_ms": 1000 * cfree,
            "cpu_constrained_ms": 1000 * ccon, "cpu_ratio": ccon / cfree, "mask_ms": 1000 * mask_time[0] / max(mask_time[1], 1),
            "runs": per, "cpu_runs": cpu, "prompts": len(cases), "tokens": tokens, "reps": reps}


def cpu_flags() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "fma", "sse4", "amx"))]
    return f"{model}; {info.count('processor')} logical CPUs; flags: {' '.join(sorted(set(keep)))}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20, help="DS2 rows")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--aide-prompts", type=int, default=0, help="the first N recorded AIDE prompts (0: all)")
    ap.add_argument("--reflection-rows", default="0,1,2,3,4,5,8,12", help="the recorded rows to reflect on")
    ap.add_argument("--aide-tokens", type=int, default=256)
    ap.add_argument("--reflection-tokens", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "constrained_decoding.md"))
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: reflection,aide,ds2,cost")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    backend = HFBackend(LMParams(), torch_threads=a.threads)
    import xgrammar

    res = {"machine": cpu_flags(), "xgrammar": getattr(xgrammar, "__version__", None) or _version("xgrammar")}
    if "cost" not in skip:
        res["cost"] = cost(backend, a.tokens, a.reps)
        print("cost", res["cost"], flush=True)
    if "aide" not in skip:
        res["aide"] = aide_rates(backend, a.aide_tokens, a.aide_prompts)
        print("aide", res["aide"], flush=True)
    if "ds2" not in skip:
        res["ds2"] = ds2_rates(backend, a.rows)
        print("ds2", res["ds2"], flush=True)
    if "reflection" not in skip:
        res["reflection"] = reflection_rates(a.threads, a.reflection_tokens, tuple(int(x) for x in a.reflection_rows.split(",")))
        print("reflection", res["reflection"], flush=True)
    Path(a.out).write_text(report(res), encoding="utf-8")
    Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(f"-> {a.out}")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def pct(t: tuple) -> str:
    return f"{t[0]}/{t[1]} ({100 * t[0] / t[1]:.0f}%)"


def report(res: dict) -> str:
    lines = ["# Constrained decoding (bench/constrained_decoding.py)", "",
             f"SmolLM2-135M-Instruct, hf backend on CPU, xgrammar {res['xgrammar']}. Machine: {res['machine']}.", ""]
    if "reflection" in res or "aide" in res:
        lines += ["## Parse rate on the recorded prompts", "",
                  "| prompts | free (recorded replies) | constrained |", "|---|---|---|"]
        for key, name in (("reflection", "Reflection (C1) calls"), ("aide", "AIDE (C4) calls")):
            if key in res:
                r = res[key]
                lines.append(f"| {name} | {pct(r['recorded'])}, max_tokens {r['recorded'][2]} | {pct(r['constrained'])}, "
                             f"max_tokens {r['constrained'][2]} ({r['seconds']:.0f} s) |")
        if "aide" in res:
            lines += ["", "AIDE per prompt (free / constrained / calls): " + "; ".join(
                f"{k} {v[0]}/{v[1]}/{v[2]}" for k, v in sorted(res["aide"]["per_prompt"].items()))]
        lines.append("")
    if "ds2" in res:
        d = res["ds2"]
        lines += ["## DS2 ratings (flows/ds2.yaml settings, one attempt per row)", "",
                  "| | parseable JSON | seconds |", "|---|---|---|",
                  f"| free | {pct(d['free'][:2])} | {d['free'][2]:.0f} |",
                  f"| constrained | {pct(d['constrained'][:2])} | {d['constrained'][2]:.0f} |", ""]
    if "cost" in res:
        c = res["cost"]
        lines += ["## Cost per generated token", "",
                  f"{c['prompts']} prompts one at a time, greedy, {c['tokens']} new tokens less the prefill's one, {c['reps']} "
                  "alternating repetitions (median of each):", "",
                  "| decode, per generated token | wall ms | CPU ms (this process) |", "|---|---|---|",
                  f"| free | {c['free_ms']:.1f} | {c['cpu_free_ms']:.1f} |",
                  f"| constrained | {c['constrained_ms']:.1f} | {c['cpu_constrained_ms']:.1f} |",
                  f"| ratio | {c['ratio']:.2f}x | {c['cpu_ratio']:.2f}x |",
                  f"| the grammar mask alone (CPU, per step) | | {c['mask_ms']:.2f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
