"""MinHash near-duplicate removal (`minhash_dedup`, issue 22 item 12): speed, memory, recall of injected
near-copies and false positives, on N rows built from real text.

    .venv/bin/python bench/minhash.py [--rows 1000000] [--dup-rate 0.05] [--threads 2] [--datasketch 20000]

Rows (conversation view: prompt, blank line, response):

- **real rows**: data/sample and the instruction pools of /work/shared/data (Alpaca-GPT4, Cherry
  Alpaca, Code Alpaca 2k and 4.5k, Glaive, the 40 T0 templates, Alpaca-GPT4 zh, self-instruct's
  user-oriented set …), exact copies (same normalised text) removed;
- **mosaic rows** to reach N: 3–8 sentences drawn at random from all the real rows' sentences
  (realistic words; two mosaics share a sentence now and then, a 5-gram Jaccard far below 0.8);
- **injected near-copies**, a share `--dup-rate` of N, at the end: a copy of a random real or
  mosaic row of at least 40 words, made one of three ways — `recased` (upper/lower case and
  whitespace changed: Jaccard 1 after normalisation), `words changed` (one word in 60 replaced by a
  random word), `sentence appended` (a random sentence added). Each copy's true Jaccard with its
  source is computed exactly on word 5-gram sets.

Rows are generated on demand from their index (the step's text loader builds each chunk), so the
texts of all N rows are never in memory at once, as in a run, where the loader reads the record
sets chunk by chunk; the time spent generating text is measured and reported apart.

Recall: the share of injected copies with true Jaccard ≥ the threshold that the step filtered
(by band of true Jaccard). False positives: filtered rows whose true Jaccard with the kept row
their detail names is below the threshold (computed exactly for every filtered row that is not an
injected copy, and for every injected copy). `--datasketch M` also times datasketch 2.x
(MinHash.update_batch + MinHashLSH insert/query, its defaults: SHA-1 32-bit shingle hashes, the
same threshold, permutations and (b, r); a row is dropped when a candidate among the rows kept
before it has an estimated Jaccard >= the threshold: keep-first, no clusters) on the first M rows
against this step on the same rows (datasketch imported from its install, or from PYTHONPATH; the
shingles for datasketch are made in Python, as its users do).
"""

from __future__ import annotations

import argparse
import glob
import random
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))
from curate.config import InputSpec  # noqa: E402
from curate.ingest.eval_set import read_eval_set  # noqa: E402
from curate.records import prompt_text, response_text  # noqa: E402
from curate.select import Pool, selector_class  # noqa: E402

SHARED = Path("/work/shared/data")
FILES = [
    *sorted(str(p) for p in (ROOT / "data/sample").iterdir() if p.name != "t0_40_tasks.parquet"),
    str(SHARED / "llama_factory/alpaca_en_demo.json"),
    str(SHARED / "llama_factory/alpaca_zh_demo.json"),
    str(SHARED / "llama_factory/glaive_toolcall_en_demo.json"),
    str(SHARED / "cherry_llm/cherry_alpaca_5_percent.json"),
    str(SHARED / "codealpaca/code_alpaca_2k.json"),
    str(SHARED / "codealpaca/new_codealpaca.json"),
    *sorted(glob.glob(str(SHARED / "self_instruct/t0_train_50k/data_per_template/*.jsonl"))),
]
WORD = re.compile(r"\w+")
SENT = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return "unknown"
    keep = [f for f in flags if f in ("avx2", "avx512f", "avx512dq", "avx512bw", "avx512vl", "amx_tile", "amx_bf16", "amx_int8")]
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{model}; {' '.join(keep) or 'no avx2/avx512/amx'}"


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shingles(text: str, k: int = 5) -> set:
    w = WORD.findall(text.lower())
    if len(w) < k:
        return {tuple(w)} if w else set()
    return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)}


def jaccard(a: str, b: str, k: int = 5) -> float:
    A, B = shingles(a, k), shingles(b, k)
    return len(A & B) / len(A | B) if A | B else 0.0


class Corpus:
    """Row i's text from its index: real rows, then mosaics, then injected copies (the last n_copies)."""

    def __init__(self, n: int, dup_rate: float, seed: int = 0):
        real: list[str] = []
        seen = set()
        for f in FILES:
            if not Path(f).exists():
                continue
            records, _ = read_eval_set(InputSpec(path=f))
            for r in records:
                t = f"{prompt_text(r['messages'])}\n\n{response_text(r['messages'])}"
                key = " ".join(WORD.findall(t.lower()))
                if key and key not in seen:
                    seen.add(key)
                    real.append(t)
        self.real = real
        self.sentences = [s.strip() for t in real for s in SENT.split(t) if len(s.split()) >= 4]
        self.vocab = sorted({w for s in self.sentences[:20000] for w in s.split() if w.isalpha()})
        self.n = n
        self.n_copies = int(round(n * dup_rate))
        self.n_base = n - self.n_copies
        self.seed = seed
        rng = random.Random(seed)
        self.kinds = ["recased", "words changed", "sentence appended"]
        # sources: base rows of at least 40 words, drawn until enough (rejection on the generated text)
        self.src = np.zeros(self.n_copies, dtype=np.int64)
        self.kind = np.zeros(self.n_copies, dtype=np.int64)
        for c in range(self.n_copies):
            while True:
                s = rng.randrange(self.n_base)
                if len(self.base(s).split()) >= 40:
                    break
            self.src[c], self.kind[c] = s, c % 3

    def base(self, i: int) -> str:
        if i < len(self.real):
            return self.real[i]
        rng = random.Random(self.seed * 1_000_003 + i)
        k = rng.randint(3, 8)
        return " ".join(self.sentences[rng.randrange(len(self.sentences))] for _ in range(k))

    def copy(self, c: int) -> str:
        text = self.base(int(self.src[c]))
        rng = random.Random(self.seed * 7_000_003 + c)
        kind = self.kind[c]
        if kind == 0:
            return "  ".join(w.upper() if rng.random() < 0.3 else w.lower() for w in text.split())
        if kind == 1:
            words = text.split(" ")
            for _ in range(max(1, len(words) // 60)):
                words[rng.randrange(len(words))] = rng.choice(self.vocab)
            return " ".join(words)
        return text + " " + self.sentences[rng.randrange(len(self.sentences))]

    def text(self, i: int) -> str:
        return self.base(i) if i < self.n_base else self.copy(i - self.n_base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dup-rate", type=float, default=0.05)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--datasketch", type=int, default=0, help="also time datasketch on the first M rows")
    ap.add_argument("--set", action="append", default=[], help="extra step parameter KEY=VALUE (YAML value)")
    args = ap.parse_args()
    import yaml

    print(f"CPU: {cpu_flags()}")
    t0 = time.perf_counter()
    corpus = Corpus(args.rows, args.dup_rate, args.seed)
    print(f"corpus: {len(corpus.real)} distinct real rows, {len(corpus.sentences)} sentences, {corpus.n_base} base rows, "
          f"{corpus.n_copies} injected copies; built in {time.perf_counter() - t0:.1f} s")
    gen_time = [0.0]

    def loader(positions):
        t = time.perf_counter()
        out = [(corpus.text(int(i)), "") for i in positions]
        gen_time[0] += time.perf_counter() - t
        return out

    n = args.rows
    ids = np.array([f"r{i:07d}" for i in range(n)])
    pool = Pool(rows=np.arange(n, dtype=np.int64), ids=ids, scores={}, orientation={}, embeddings=None, n_input=n, text_loader=loader)
    params = {"threshold": args.threshold, "num_perm": args.num_perm, "threads": args.threads, "seed": args.seed,
              "field": "prompt"}  # the generated text is the whole conversation, in the prompt slot
    for kv in args.set:
        k, v = kv.split("=", 1)
        params[k] = yaml.safe_load(v)
    step = selector_class("minhash_dedup")("minhash_dedup", params)
    rss0 = rss_now_mb()
    t = time.perf_counter()
    res = step.select(pool)
    wall = time.perf_counter() - t
    step_s = wall - gen_time[0]
    print(f"step: {wall:.1f} s wall, of which {gen_time[0]:.1f} s generating text -> {n / wall:,.0f} rows/s with text generation, "
          f"{n / step_s:,.0f} rows/s without")
    print(f"RSS before the step {rss0:,.0f} MB, peak RSS of the process {peak_rss_mb():,.0f} MB")
    st = res.stats
    print({k: st[k] for k in ("kept", "filtered_near_duplicate", "clusters", "largest_cluster", "candidate_pairs", "verified_pairs",
                              "bands", "rows", "shingles", "rows_without_shingles")})

    # recall of the injected copies, by true Jaccard band
    true_j = np.array([jaccard(corpus.copy(c), corpus.base(int(corpus.src[c]))) for c in range(corpus.n_copies)])
    caught = ~res.keep[corpus.n_base:]
    print("injected copies (true word-5-gram Jaccard with their source):")
    for name, lo, hi in (("J = 1", 1.0, 1.01), ("0.9 <= J < 1", 0.9, 1.0), ("0.85 <= J < 0.9", 0.85, 0.9),
                         ("0.8 <= J < 0.85", 0.8, 0.85), ("0.7 <= J < 0.8", 0.7, 0.8), ("J < 0.7", -1, 0.7)):
        m = (true_j >= lo) & (true_j < hi)
        if m.any():
            print(f"  {name:>16}: {int(m.sum()):6d} copies, filtered {caught[m].mean():.3f}")
    for k, kind in enumerate(corpus.kinds):
        m = corpus.kind == k
        if m.any():
            print(f"  {kind:>16}: {int(m.sum()):6d} copies, median J {np.median(true_j[m]):.3f}, filtered {caught[m].mean():.3f}")
    should = true_j >= args.threshold
    print(f"recall (copies with J >= {args.threshold}): {caught[should].mean() if should.any() else float('nan'):.4f} "
          f"({int(caught[should].sum())}/{int(should.sum())})")

    # false positives: filtered rows whose true Jaccard with their kept row is below the threshold
    kept_of = re.compile(r"near-duplicate of row (\d+)")
    through = re.compile(r"joined through row (\d+)")
    dropped = np.flatnonzero(~res.keep)
    fp_base = fp_copy = real_dup = 0
    examples, fp_j = [], []
    for d in dropped:
        k = int(kept_of.match(res.detail[d]).group(1))
        tj = jaccard(corpus.text(int(d)), corpus.text(k))
        link = through.search(res.detail[d])
        if link:  # joined to its cluster through another row: the pair that was verified
            tj = max(tj, jaccard(corpus.text(int(d)), corpus.text(int(link.group(1)))))
        if d >= corpus.n_base:  # an injected copy is right when it is a near-copy of its source
            tj = max(tj, true_j[d - corpus.n_base])
        if tj < args.threshold:
            fp_j.append(tj)
            if d < corpus.n_base:
                fp_base += 1
            else:
                fp_copy += 1
            if len(examples) < 5:
                examples.append((int(d), k, round(tj, 3)))
        elif d < corpus.n_base:
            real_dup += 1
    print(f"filtered rows: {len(dropped)}; base rows filtered with true J >= {args.threshold} to their kept row or the row "
          f"that linked them (near-copies already in the data): {real_dup}; below the threshold with both (false positives): "
          f"{fp_base} base rows, {fp_copy} injected copies (J < threshold with their source too)"
          f"{f', true J {min(fp_j):.3f}-{max(fp_j):.3f}' if fp_j else ''}; precision {1 - len(fp_j) / max(len(dropped), 1):.4f}"
          f"{'; e.g. (row, kept, J) ' + str(examples) if examples else ''}")

    if args.datasketch:
        m = min(args.datasketch, n)
        bench_datasketch(corpus, m, args, step)


def bench_datasketch(corpus: Corpus, m: int, args, step) -> None:
    from datasketch import MinHash, MinHashLSH

    texts = [corpus.text(i) for i in range(m)]
    sub = Pool(rows=np.arange(m, dtype=np.int64), ids=[f"r{i}" for i in range(m)], scores={}, orientation={}, embeddings=None,
               n_input=m, text_loader=lambda pos: [(texts[i], "") for i in pos])
    t = time.perf_counter()
    ours = step.select(sub)
    ours_s = time.perf_counter() - t
    bands, rows = step.band_layout()
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm, params=(bands, rows))
    drop = np.zeros(m, dtype=bool)
    kept: dict[str, MinHash] = {}
    for i, text in enumerate(texts):
        mh = MinHash(num_perm=args.num_perm, seed=1)
        mh.update_batch([" ".join(s).encode() for s in shingles(text)])
        # the usual datasketch loop, with the same verification: dropped when an earlier kept row's estimate is >= threshold
        if any(mh.jaccard(kept[key]) >= args.threshold for key in lsh.query(mh)):
            drop[i] = True
        else:
            lsh.insert(str(i), mh)
            kept[str(i)] = mh
    ds_s = time.perf_counter() - t
    print(f"datasketch 2.x vs minhash_dedup on the first {m} rows ({bands} bands x {rows} rows, {args.num_perm} permutations):")
    print(f"  datasketch: {ds_s:.1f} s = {m / ds_s:,.0f} rows/s, dropped {int(drop.sum())}")
    print(f"  minhash_dedup: {ours_s:.2f} s = {m / ours_s:,.0f} rows/s, dropped {int((~ours.keep).sum())}; "
          f"both dropped {int((drop & ~ours.keep).sum())}")


if __name__ == "__main__":
    main()
