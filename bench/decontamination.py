"""Decontamination against AlpacaEval's 805 prompts: what each check catches and what it flags by mistake.

    .venv/bin/python bench/decontamination.py [--scale 40] [--no-embed]

The eval set is AlpacaEval (805 prompts, /work/shared/data/alpaca_eval/results/gpt4/model_outputs.json;
without /work/shared the 40 of data/eval/alpaca_eval_40.json). Training rows are:

- **constructed** from the eval prompts (each answered with alpaca-7b's answer to that prompt, so a copy
  is not a copy of the eval row's own reference answer): `verbatim`; `recased` (lower-cased, punctuation
  dropped, whitespace changed); `preamble` (one of six 8–14-word preambles, then the prompt);
  `preamble+suffix` (and a closing request); `short in sentence` (the prompts of < 8 words inside a
  sentence); `13-gram window` (13 words from the middle of a prompt of ≥ 30 words, inside other text);
  `paraphrase` (21 prompts rewritten by hand: same request, other words);
- **real pools**: data/sample (158 rows) and the instruction pools of /work/shared/data (Alpaca-GPT4,
  Cherry Alpaca, Code Alpaca 2k and 4.5k, Glaive, 40 T0 templates, Alpaca-GPT4 zh).

Each configuration is one `decontaminate` step run on a pool (`Decontaminate.select`, the step a flow
runs), with only the named checks on. `old` is the step as it was before issue 21 item 11 (main at
HEAD, loaded from git): the share of the *row's* 8-grams found in the eval prompts, ≥ 0.5, and the
embedding check on the flow's default conversation view at 0.95. Embeddings: the bundled
all-MiniLM-L6-v2, kept in a store under /tmp so a re-run embeds nothing. Timing: the text checks on
the largest pool file (Code Alpaca 4.5k), on every real pool together, and on that union repeated
`--scale` times.

Writes bench/results/decontamination.md; text after the `<!-- by eye -->` line of that file (the
hand-made review of the flagged rows) is kept.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

from common import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))
from curate.config import EmbedSpec, InputSpec  # noqa: E402
from curate.embed import build_embedder  # noqa: E402
from curate.embed.base import embed_text  # noqa: E402
from curate.ingest.eval_set import read_eval_set  # noqa: E402
from curate.records import message, prompt_text, sample_id  # noqa: E402
from curate.select import Pool, SelectContext  # noqa: E402
from curate.select.decontaminate import Decontaminate, cached_vectors  # noqa: E402

SHARED = Path("/work/shared/data")
EVAL_805 = SHARED / "alpaca_eval/results/gpt4/model_outputs.json"
ANSWERS = SHARED / "alpaca_eval/results/alpaca-7b/model_outputs.json"
STORE = Path("/tmp/curate-decontamination-bench-store")
MARK = "<!-- by eye -->"

POOLS = {
    "data/sample (all files)": sorted(str(p) for p in (ROOT / "data/sample").iterdir() if p.name != "t0_40_tasks.parquet"),
    "alpaca_en_demo (Alpaca-GPT4)": [str(SHARED / "llama_factory/alpaca_en_demo.json")],
    "cherry_alpaca_5_percent": [str(SHARED / "cherry_llm/cherry_alpaca_5_percent.json")],
    "code_alpaca_2k": [str(SHARED / "codealpaca/code_alpaca_2k.json")],
    "new_codealpaca (largest file)": [str(SHARED / "codealpaca/new_codealpaca.json")],
    "glaive_toolcall_en_demo": [str(SHARED / "llama_factory/glaive_toolcall_en_demo.json")],
    "t0 (40 templates)": sorted(glob.glob(str(SHARED / "self_instruct/t0_train_50k/data_per_template/*.jsonl"))),
    "alpaca_zh_demo": [str(SHARED / "llama_factory/alpaca_zh_demo.json")],
}

PREAMBLES = [
    "You are a helpful assistant. Please answer the following request carefully.",
    "Here is a question from one of our users that needs an answer:",
    "Read the task below and write a response that completes it.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Quick question for you today, my friend, if you have time:",
    "I was asked this in an interview last week and still wonder:",
]
SUFFIXES = ["Please answer in under 100 words.", "Explain your reasoning.", "Thanks in advance!"]

# hand-written paraphrases of AlpacaEval prompts (index into the 805): same request, other words
PARAPHRASES = {
    41: "What are some ways to cut down on how much time I spend on my smartphone?",
    97: "Does human blood ever come in a colour besides red?",
    142: "Navina's weekly budget is $30 larger than her younger sister's, and she can afford one of the online credit cards "
         "she likes. How much money does each of them have to spend?",
    143: "Order these companies from most to least consumer-friendly: Microsoft, Google, Nintendo, Sony, EA.",
    223: "For a spatial analysis project on housing and crime, what research questions could I try to answer? Any ideas?",
    256: "How serious a danger will climate change pose over the next few years, and what can we do to halt it?",
    265: "List the 100 most important categories of technology.",
    288: "In what ways can L'Hôpital's rule be applied in everyday life?",
    310: "How can Stable Diffusion be used to improve low-resolution, low-quality images, and what are its pros and cons for "
         "upscaling and image compression?",
    366: "Draw a cat using ASCII characters.",
    394: "Which of Nietzsche's philosophical ideas continue to shape today's culture?",
    414: "Come up with a plot for a graphic novel written the way Neil Stephenson would write it.",
    430: "Is the five-second rule for dropped food actually real?",
    497: "Give me a template for a LinkedIn profile summary written in the first person.",
    516: "Pick some Spotify playlists that fit the following mood, with links so they are easy to open.\n\nFeeling Good",
    523: "Suggest a few search queries related to this one.\n\nlearning french",
    597: "Please answer this question.\n\nWhat is the French for \"good evening\"?",
    722: "Come up with some names for a friendly Telegram group.",
    773: "Since life began, how many times has the Earth gone around the Sun? Explain your reasoning step by step so the reader "
         "can follow it.",
    776: "What would have happened if the Aztecs had managed to drive back the Spanish conquistadors?",
    802: "Write an engaging review of a recent science-fiction movie, covering its story, its characters and its special effects.",
}

CONFIGS = {  # name -> step params (eval_set added); "old" runs HEAD's step
    "old (row-side 8-gram ≥ 0.5)": None,
    "exact match": {"max_ngram_overlap": None, "short_prompts": False, "max_similarity": None},
    "eval-side 8-gram ≥ 0.5": {"exact_match": False, "short_prompts": False, "max_similarity": None},
    "GPT-3 13-gram collision": {"exact_match": False, "max_ngram_overlap": None, "collision_ngram": 13, "short_prompts": False,
                                "max_similarity": None},
    "short prompts (≥ 3 words)": {"exact_match": False, "max_ngram_overlap": None, "max_similarity": None},
    "short prompts (≥ 1 word)": {"exact_match": False, "max_ngram_overlap": None, "max_similarity": None, "min_short_words": 1},
    "text checks (defaults, no embedding)": {"max_similarity": None},
    "text checks + 13-gram": {"max_similarity": None, "collision_ngram": 13},
}
EMB_THRESHOLDS = [0.85, 0.9, 0.95]


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def old_module() -> types.ModuleType:
    """curate/select/decontaminate.py as committed at HEAD (the step before this change)."""
    src = subprocess.run(["git", "show", "HEAD:curate/select/decontaminate.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    mod = types.ModuleType("old_decontaminate")
    sys.modules[mod.__name__] = mod  # pydantic resolves the Params annotations through it
    exec(compile(src, "old_decontaminate.py", "exec"), mod.__dict__)
    mod.Decontaminate.Params.model_rebuild()
    return mod


def eval_set() -> tuple[InputSpec, list[str], list[str]]:
    path = EVAL_805 if EVAL_805.exists() else ROOT / "data/eval/alpaca_eval_40.json"
    spec = InputSpec(path=str(path), name="alpaca_eval")
    records, _ = read_eval_set(spec)
    prompts = [prompt_text(r["messages"]) for r in records]
    answers = [r["output"] for r in json.loads(ANSWERS.read_text())] if ANSWERS.exists() else ["(answer)"] * len(prompts)
    return spec, prompts, answers


def constructed(prompts: list[str], answers: list[str]) -> dict[str, list[tuple[str, str, int]]]:
    """case -> [(prompt, response, eval index)]"""
    rng = random.Random(0)
    cases: dict[str, list[tuple[str, str, int]]] = {k: [] for k in
                                                    ["verbatim", "recased", "preamble", "preamble+suffix", "short in sentence",
                                                     "13-gram window", "paraphrase"]}
    for j, p in enumerate(prompts):
        a = answers[j]
        cases["verbatim"].append((p, a, j))
        cases["recased"].append(("  ".join(words(p)).upper() if j % 2 else " ".join(words(p)), a, j))
        cases["preamble"].append((rng.choice(PREAMBLES) + "\n\n" + p, a, j))
        cases["preamble+suffix"].append((rng.choice(PREAMBLES) + " " + p + " " + rng.choice(SUFFIXES), a, j))
        w = p.split()
        if len(words(p)) < 8:
            cases["short in sentence"].append((f"Answer briefly, in one paragraph. {p} Keep it simple for a child.", a, j))
        if len(w) >= 30:
            mid = len(w) // 2 - 6
            cases["13-gram window"].append(("I found this text online and want your opinion on it: \"" + " ".join(w[mid : mid + 13])
                                            + "\" What do you think it means?", a, j))
    if len(prompts) == 805:
        cases["paraphrase"] = [(q, answers[j], j) for j, q in PARAPHRASES.items()]
    return {k: v for k, v in cases.items() if v}


def read_pool(files: list[str]) -> list[dict]:
    out = []
    for f in files:
        records, _ = read_eval_set(InputSpec(path=f))
        out.extend(records)
    return out


def make_pool(pairs: list[tuple[str, str]], vectors: np.ndarray | None) -> Pool:
    ids = [sample_id([message("user", p), message("assistant", r or "-")], None) for p, r in pairs]
    return Pool(rows=np.arange(len(pairs), dtype=np.int64), ids=ids, scores={}, orientation={}, embeddings=vectors,
                n_input=len(pairs), text_loader=lambda positions: [pairs[i] for i in positions])


def run(params: dict | None, pool: Pool, spec: InputSpec, ctx: SelectContext, old=None):
    t0 = time.perf_counter()
    if params is None:
        cls = old.Decontaminate
        params = {"max_similarity": None}
    else:
        cls = Decontaminate
    step = cls("decontaminate", {"eval_set": spec.model_dump(exclude_none=True), **params}, ctx)
    res = step.select(pool)
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=40, help="repeat the union of the real pools this many times for the timing row")
    ap.add_argument("--no-embed", action="store_true")
    args = ap.parse_args()
    old = old_module()
    spec, eval_prompts, answers = eval_set()
    n_eval = len(eval_prompts)
    prompt_spec = EmbedSpec(text="prompt")
    embedder = build_embedder(prompt_spec, torch_threads=2)
    conv_spec = EmbedSpec(text="conversation")
    conv = build_embedder(conv_spec, torch_threads=2)
    ctx = SelectContext(base_dir=str(ROOT), embed=prompt_spec, embed_key=embedder.key, store_dir=str(STORE), torch_threads=2)
    conv_ctx = SelectContext(base_dir=str(ROOT), embed=conv_spec, embed_key=conv.key, store_dir=str(STORE), torch_threads=2)
    lines = [f"# Decontamination vs AlpacaEval ({n_eval} prompts)", "",
             "`.venv/bin/python bench/decontamination.py` (text in the script's docstring). Detection: the share of constructed",
             "contaminated rows flagged. Real pools: rows flagged (they were not built from the eval set; which of them are",
             "true or false positives is judged by eye below).", ""]

    # --- constructed cases
    cases = constructed(eval_prompts, answers)
    all_pairs = [(p, a) for rows in cases.values() for p, a, _ in rows]
    case_of = np.concatenate([[k] * len(v) for k, v in cases.items()])
    target = np.concatenate([[j for _, _, j in v] for v in cases.values()])
    vec = None if args.no_embed else cached_vectors(embedder, str(STORE), make_pool(all_pairs, None).ids,
                                                    lambda pos: [all_pairs[i][0] for i in pos])[0]
    cpool = make_pool(all_pairs, vec)
    header = "| check | " + " | ".join(f"{k} (n={len(v)})" for k, v in cases.items()) + " |"
    table = [header, "|---|" + "---|" * len(cases)]
    right_eval: dict[str, str] = {}

    def row_of(name: str, flagged: np.ndarray, who: list | None = None) -> None:
        cells = []
        for k in cases:
            m = case_of == k
            cells.append(f"{int(flagged[m].sum())} ({flagged[m].mean():.0%})")
        table.append(f"| {name} | " + " | ".join(cells) + " |")

    for name, params in CONFIGS.items():
        res, _ = run(params, cpool, spec, ctx, old)
        row_of(name, ~res.keep)
        if params is not None:
            named = [d for d, k in zip(res.detail, res.keep) if not k]
            hits = [bool(re.search(rf"eval row {int(t)} of", d or "")) for t, k, d in zip(target, res.keep, res.detail) if not k]
            right_eval[name] = f"{sum(hits)}/{len(named)}"
    if not args.no_embed:
        res, _ = run({"exact_match": False, "max_ngram_overlap": None, "short_prompts": False, "max_similarity": min(EMB_THRESHOLDS)},
                     cpool, spec, ctx)
        sim = res.columns["eval_similarity"]
        for t in EMB_THRESHOLDS:
            row_of(f"embedding, prompt view ≥ {t}", sim >= t)
        # the old default: the flow's conversation view on both sides, through the step as it was
        conv_records = [{"messages": [message("user", p), message("assistant", a or "-")]} for p, a in all_pairs]
        cpool_conv = make_pool(all_pairs, None)
        cpool_conv.embeddings = cached_vectors(conv, str(STORE), cpool_conv.ids,
                                               lambda pos: [embed_text(conv_records[i], "conversation") for i in pos])[0]
        ostep = old.Decontaminate("decontaminate", {"eval_set": spec.model_dump(exclude_none=True), "max_ngram_overlap": None,
                                                    "max_similarity": 0.95}, conv_ctx)
        ores = ostep.select(cpool_conv)
        row_of("old embedding (conversation view ≥ 0.95)", ~ores.keep)
        dres, _ = run({}, cpool, spec, ctx)
        row_of("**new defaults** (text checks + prompt view ≥ 0.9)", ~dres.keep)
        dres13, _ = run({"collision_ngram": 13}, cpool, spec, ctx)
        row_of("new defaults + 13-gram", ~dres13.keep)
    lines += ["## Constructed contaminated rows", "", *table, "",
              "Flagged rows whose detail names the eval prompt they were built from: "
              + ", ".join(f"{k} {v}" for k, v in right_eval.items()) + ".", ""]

    # --- real pools
    pools = {name: read_pool(files) for name, files in POOLS.items() if all(Path(f).exists() for f in files) and files}
    real_header = ["| check | " + " | ".join(f"{k} ({len(v)})" for k, v in pools.items()) + " | all |",
                   "|---|" + "---|" * (len(pools) + 1)]
    pool_objs, pool_sims, flagged_rows = {}, {}, []
    for name, recs in pools.items():
        pairs = [(prompt_text(r["messages"]), "") for r in recs]
        ids = [r["sample_id"] for r in recs]
        v = None
        if not args.no_embed:
            v = cached_vectors(embedder, str(STORE), ids, lambda pos, pairs=pairs: [pairs[i][0] for i in pos])[0]
        pool = Pool(rows=np.arange(len(recs), dtype=np.int64), ids=ids, scores={}, orientation={}, embeddings=v, n_input=len(recs),
                    text_loader=lambda positions, pairs=pairs: [pairs[i] for i in positions])
        pool_objs[name] = (pool, pairs)
    counts: dict[str, list[int]] = {}
    for cname, params in CONFIGS.items():
        counts[cname] = [int((~run(params, p, spec, ctx, old)[0].keep).sum()) for p, _ in pool_objs.values()]
    if not args.no_embed:
        for name, (pool, pairs) in pool_objs.items():
            res, _ = run({"exact_match": False, "max_ngram_overlap": None, "short_prompts": False, "max_similarity": min(EMB_THRESHOLDS)},
                         pool, spec, ctx)
            pool_sims[name] = res
        for t in EMB_THRESHOLDS:
            counts[f"embedding, prompt view ≥ {t}"] = [int((r.columns["eval_similarity"] >= t).sum()) for r in pool_sims.values()]
        for label, extra in (("**new defaults** (text checks + prompt view ≥ 0.9)", {}),
                             ("new defaults + 13-gram", {"collision_ngram": 13})):
            cnt = []
            for name, (pool, pairs) in pool_objs.items():
                res, _ = run(extra, pool, spec, ctx)
                cnt.append(int((~res.keep).sum()))
                if extra:
                    for i in np.flatnonzero(~res.keep):
                        flagged_rows.append((name, int(i), res.reason[i], res.detail[i], pairs[i][0]))
            counts[label] = cnt
    for cname, cnt in counts.items():
        real_header.append(f"| {cname} | " + " | ".join(str(c) for c in cnt) + f" | {sum(cnt)} |")
    lines += ["## Real pools: rows flagged", "", *real_header, ""]

    if flagged_rows:
        lines += ["## Every real-pool row flagged by the new defaults + 13-gram", "",
                  "| pool | row | reason | detail | row prompt (start) |", "|---|---|---|---|---|"]
        for name, i, reason, detail, text in flagged_rows:
            head = " ".join(text.split())[:110].replace("|", "\\|")
            lines.append(f"| {name} | {i} | {reason} | {(detail or '').replace('|', chr(92) + '|')} | {head} |")
        lines.append("")

    # --- timing (text checks; embeddings are the embed stage's cost, cached in the store)
    union = [pr for _, pairs in pool_objs.values() for pr in pairs]
    largest = pool_objs.get("new_codealpaca (largest file)", next(iter(pool_objs.values())))[1]
    tlines = ["## Time of the text checks (no embedding)", "",
              "| pool | rows | prompt words | old (row-side 8-gram) s | text checks + 13-gram s |", "|---|---|---|---|---|"]
    for label, pairs in (("new_codealpaca (largest file)", largest), ("all real pools", union),
                         (f"all real pools × {args.scale}", union * args.scale)):
        pool = make_pool(pairs, None) if len(pairs) < 100_000 else Pool(
            rows=np.arange(len(pairs), dtype=np.int64), ids=[str(i) for i in range(len(pairs))], scores={}, orientation={},
            embeddings=None, n_input=len(pairs), text_loader=lambda positions, pairs=pairs: [pairs[i] for i in positions])
        n_words = sum(len(words(p)) for p, _ in pairs)
        t_old = run(None, pool, spec, ctx, old)[1] if len(pairs) < 100_000 else float("nan")
        t_new = run({"max_similarity": None, "collision_ngram": 13}, pool, spec, ctx)[1]
        tlines.append(f"| {label} | {len(pairs)} | {n_words} | {t_old:.2f} | {t_new:.2f} |")
    lines += tlines + ["", "Old code at the largest scale: not run (row-by-row Python; see the smaller rows for its rate).", ""]

    out = ROOT / "bench/results/decontamination.md"
    kept = ""
    if out.exists() and MARK in out.read_text():
        kept = out.read_text().split(MARK, 1)[1]
    text = "\n".join(lines) + "\n" + MARK + (kept or "\n")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
