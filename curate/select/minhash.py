"""Near-duplicate removal on text: MinHash signatures, LSH banding, verified pairs, connected clusters.

Each row's text (``field``: ``conversation`` = prompt and response, ``prompt`` or ``response``, as
:func:`curate.records.prompt_text` / ``response_text`` give them) is normalised as the decontaminate
step does — lower-cased and split into words at every character that is not a word character
(polars' ``\\w+``), so case, whitespace and punctuation never matter — and cut into *shingles*: runs
of ``ngram`` consecutive words (``unit: word``, default 5), or of ``ngram`` characters of the
normalised text (``unit: char``: words joined by one space; for text without spaces between words,
such as Chinese, where a "word" is a whole clause). A row with fewer than ``ngram`` tokens but at
least one has one shingle, its whole text; a row with none (empty text) is never compared.

**Signatures.** A shingle is hashed to 32 bits (polars' 64-bit hash of each token, the polynomial
of the window's token hashes modulo 2**64, its top 32 bits). Permutation ``i`` of ``num_perm`` is
the multiply-add-shift hash ``h_i(x) = ((a_i·x + b_i) mod 2**64) >> 32`` with ``a_i`` (odd) and ``b_i``
seeded 64-bit numbers — a strongly universal family for 32-bit keys (Dietzfelbinger 1996); datasketch
uses ``(a·x + b) mod (2**61 − 1)`` truncated to 32 bits, which numpy cannot compute without
overflow. A row's signature is the minimum of each ``h_i`` over its shingles: ``(rows, num_perm)``
uint32. The estimated Jaccard similarity of two rows is the share of positions where their signatures
agree. Computed in numpy with the permutations as the leading axis (a ``(num_perm, 4096)`` block of
hashes per pass, ``np.minimum.reduceat`` over each row's shingles), on ``threads`` threads (numpy
releases the GIL), text read and tokenised ``chunk_rows`` rows at a time: memory is the signature
matrix (1M rows × 128 × 4 bytes = 512 MB) plus one chunk.

**LSH banding.** The signature is cut into ``bands`` bands of ``rows`` values; two rows whose values
agree in a whole band are a *candidate pair*. Unless both are given, ``(bands, rows)`` minimise
``fp_weight·FP + fn_weight·FN`` over ``bands × rows ≤ num_perm``, with ``FP = ∫₀ᵗ 1 − (1 − s^r)^b ds``
and ``FN = ∫ₜ¹ (1 − s^r)^b ds`` (t = ``threshold``; datasketch's ``MinHashLSH`` rule). The default
weights are 0.1 / 0.9, not datasketch's 0.5 / 0.5: every candidate is verified, so a false positive
costs one signature comparison while a false negative is a near-copy left in. For t 0.8 and 128
permutations that is 14 bands of 9 (a pair of Jaccard 0.8 becomes a candidate with probability
0.87; datasketch's weights give 9 bands of 13 and 0.40). A band's values are
hashed to 64 bits and rows sorted by that key, so the cost grows with rows × bands, never rows².
Inside a bucket every pair is a candidate when it holds at most ``max_bucket`` rows; a larger bucket
(a flood of copies) pairs each member with the bucket's first row in keep order and with the member
before it (``large_buckets`` in the stats).

**Verification and clusters.** A candidate pair is a near-duplicate only when its estimated Jaccard
is ≥ ``threshold``; verified pairs are joined into clusters (connected components: the partition a
union-find over the pairs gives). Clusters are transitive: A ~ B and B ~ C put A and C together
even when A and C differ more. In each cluster the first row in keep order is kept — the pool's rank
(the previous step's ranking; input order for the first step), or input order for a pool with no
rank — and every other row is ``filtered`` with reason ``near_duplicate`` and a detail naming the
kept row (input row and sample_id), its estimated Jaccard with it, the cluster size and, when that
estimate is below the threshold, the row that linked it. Kept rows keep the incoming order (a
filter, not a ranking). Per-row values go to the score table: ``<step>.cluster_size`` (1 for a row
with no near-copy, NaN for one with no shingle) and ``<step>.jaccard_to_kept`` (dropped rows only).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from curate.select.base import Pool, Selector, StepResult, fmt

WORD = r"\w+"
BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial's base modulo 2**64 (decontaminate's)
BLOCK = 4096  # shingles per pass of the hash block (num_perm × BLOCK uint64: 4 MB at 128)
UNIT_SHINGLES = 1 << 16  # shingles per thread work unit


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """``(bands, rows)`` minimising ``fp_weight·FP + fn_weight·FN`` over ``bands × rows ≤ num_perm``, where a
    pair of Jaccard s is a candidate with probability ``1 − (1 − s^r)^b``: FP integrates that over
    [0, threshold], FN its complement over [threshold, 1] (datasketch's MinHashLSH rule; trapezoids
    on 2,001 points instead of scipy's quad)."""
    lo, hi = np.linspace(0.0, threshold, 2001), np.linspace(threshold, 1.0, 2001)
    best, best_err = (1, 1), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo**r) ** b, lo)
            fn = np.trapezoid((1 - hi**r) ** b, hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err - 1e-15:
                best, best_err = (b, r), err
    return best


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """Probability that a pair of Jaccard ``s`` shares at least one band."""
    return float(1 - (1 - s**rows) ** bands)


def _tokens(texts: list[str], unit: str) -> pl.Series:
    words = pl.Series("t", texts, dtype=pl.String).fill_null("").str.to_lowercase().str.extract_all(WORD)
    if unit == "word":
        return words
    joined = words.list.join(" ")
    return joined.str.split("").list.eval(pl.element().filter(pl.element() != ""))


def shingle_hashes(texts: list[str], ngram: int, unit: str = "word") -> tuple[np.ndarray, np.ndarray]:
    """(owner text of each shingle, its 32-bit hash as uint64), grouped by text in order. A text with
    1 … ``ngram − 1`` tokens has one shingle (all of them); an empty one has none."""
    lists = _tokens(texts, unit)
    lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat_s = lists.explode().drop_nulls()
    flat = flat_s.hash(seed=0).to_numpy().astype(np.uint64) if len(flat_s) else np.zeros(0, np.uint64)
    del flat_s, lists
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tok = len(flat)
    owners, hashes = [], []
    if n_tok >= ngram:  # every full window inside one text
        text_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        m = n_tok - ngram + 1
        h = flat[:m].copy()
        for t in range(1, ngram):
            h *= BASE
            h += flat[t : m + t]
        ok = (starts[text_of[:m] + 1] - np.arange(m)) >= ngram
        owners.append(text_of[:m][ok])
        hashes.append(h[ok])
        del text_of
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    if len(short):  # the whole text as one shingle, the same polynomial
        h = np.zeros(len(short), np.uint64)
        for t in range(int(lengths[short].max())):
            live = lengths[short] > t
            h[live] = h[live] * BASE + flat[starts[short[live]] + t]
        owners.append(short)
        hashes.append(h)
    if not owners:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    owner, h = np.concatenate(owners), np.concatenate(hashes)
    if len(short):
        order = np.argsort(owner, kind="stable")
        owner, h = owner[order], h[order]
    return owner, h >> np.uint64(32)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): ``num_perm`` seeded 64-bit multipliers (odd) and offsets."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
    b = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)
    return a, b


def _unit_signatures(x: np.ndarray, starts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signatures (len(starts) − 1, K) uint32 of the texts whose shingles are ``x[starts[j]:starts[j+1]]``
    (every text has at least one)."""
    k, m = len(a), len(starts) - 1
    sig = np.full((m, k), np.iinfo(np.uint64).max, dtype=np.uint64)
    buf = np.empty((k, BLOCK), dtype=np.uint64)
    total = int(starts[-1])
    for lo in range(0, total, BLOCK):
        hi = min(total, lo + BLOCK)
        blk = buf[:, : hi - lo]
        np.multiply(a[:, None], x[None, lo:hi], out=blk)
        np.add(blk, b[:, None], out=blk)
        r0 = int(np.searchsorted(starts, lo, "right")) - 1  # the text holding shingle lo
        r1 = int(np.searchsorted(starts, hi, "left"))  # texts starting before hi: r0 … r1 − 1
        seg = np.maximum(starts[r0:r1] - lo, 0)
        mins = np.minimum.reduceat(blk, seg, axis=1)  # (K, r1 − r0)
        np.minimum(sig[r0:r1], mins.T, out=sig[r0:r1])
    return (sig >> np.uint64(32)).astype(np.uint32)


def signatures(owner: np.ndarray, x: np.ndarray, n_texts: int, a: np.ndarray, b: np.ndarray, threads: int = 1) -> np.ndarray:
    """(n_texts, K) uint32 MinHash signatures from shingle hashes grouped by owner (rows with no shingle:
    all ones, never compared). Work units of whole texts run on ``threads`` threads."""
    k = len(a)
    out = np.full((n_texts, k), np.iinfo(np.uint32).max, dtype=np.uint32)
    if not len(x):
        return out
    counts = np.bincount(owner, minlength=n_texts)
    has = np.flatnonzero(counts)
    starts = np.concatenate([[0], np.cumsum(counts[has])]).astype(np.int64)
    # work units: runs of whole texts of about UNIT_SHINGLES shingles
    cuts = np.unique(np.searchsorted(starts, np.arange(0, int(starts[-1]), UNIT_SHINGLES), "right") - 1)
    bounds = list(zip(cuts.tolist(), [*cuts[1:].tolist(), len(has)]))

    def work(bound):
        t0, t1 = bound
        s = starts[t0 : t1 + 1]
        out[has[t0:t1]] = _unit_signatures(x[s[0] : s[-1]], s - s[0], a, b)

    if threads > 1 and len(bounds) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, bounds))
    else:
        for bound in bounds:
            work(bound)
    return out


def _bucket_pairs(order: np.ndarray, key_sorted: np.ndarray, max_bucket: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidate pairs (i, j) inside runs of equal keys (``order``: rows sorted by key, then keep order):
    every pair in a run of at most ``max_bucket`` rows; in a larger one each row with the run's first and
    with the row before it. Returns (i, j, number of large runs)."""
    n = len(order)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    brk = np.flatnonzero(key_sorted[1:] != key_sorted[:-1]) + 1
    run_start = np.concatenate([[0], brk])
    run_len = np.diff(np.concatenate([run_start, [n]]))
    multi = run_len >= 2
    run_start, run_len = run_start[multi], run_len[multi]
    ii, jj = [], []
    small = run_len <= max_bucket
    for s in np.unique(run_len[small]):
        st = run_start[small & (run_len == s)]
        p, q = np.triu_indices(int(s), 1)
        ii.append(order[(st[:, None] + p[None, :]).ravel()])
        jj.append(order[(st[:, None] + q[None, :]).ravel()])
    big = np.flatnonzero(~small)
    for r in big:
        st, s = int(run_start[r]), int(run_len[r])
        members = order[st : st + s]
        ii += [np.full(s - 1, members[0]), members[1:-1]]
        jj += [members[1:], members[2:]]
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), len(big)
    return np.concatenate(ii), np.concatenate(jj), len(big)


def candidate_pairs(sig: np.ndarray, valid: np.ndarray, pos: np.ndarray, bands: int, rows: int,
                    max_bucket: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct candidate pairs (i < j in keep order ``pos``) of rows sharing a band; rows not ``valid``
    take no part."""
    idx = np.flatnonzero(valid)
    keys_all = []
    large = 0
    n = len(sig)
    for band in range(bands):
        cols = sig[idx, band * rows : (band + 1) * rows].astype(np.uint64)
        key = np.full(len(idx), np.uint64(band + 1), dtype=np.uint64)
        for c in range(rows):
            key *= BASE
            key += cols[:, c] + np.uint64(1)
        order = np.lexsort((pos[idx], key))
        i, j, big = _bucket_pairs(idx[order], key[order], max_bucket)
        large += big
        first = np.where(pos[i] <= pos[j], i, j)
        second = np.where(pos[i] <= pos[j], j, i)
        keys_all.append(first.astype(np.int64) * n + second)
    if not keys_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    pairs = np.unique(np.concatenate(keys_all))
    return pairs // n, pairs % n, large


def estimated_jaccard(sig: np.ndarray, i: np.ndarray, j: np.ndarray, block: int = 65536) -> np.ndarray:
    """Share of equal signature positions of each pair (i[k], j[k])."""
    out = np.empty(len(i), dtype=np.float64)
    for lo in range(0, len(i), block):
        out[lo : lo + block] = (sig[i[lo : lo + block]] == sig[j[lo : lo + block]]).mean(axis=1)
    return out


def clusters(n: int, i: np.ndarray, j: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """For each row, the row kept for its cluster (the lowest ``pos`` of its connected component over the
    edges (i, j)); a row with no edge is its own."""
    keeper = np.arange(n, dtype=np.int64)
    if not len(i):
        return keeper
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    _, label = connected_components(graph, directed=False)
    order = np.lexsort((pos, label))  # by component, then keep order
    first = np.r_[True, label[order][1:] != label[order][:-1]]
    head = np.empty(label.max() + 1, dtype=np.int64)
    head[label[order][first]] = order[first]
    return head[label]


class MinHashDedup(Selector):
    method = "minhash_dedup"

    class Params(Selector.Params):
        threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity (estimated) at or above which two rows are near-copies.")
        field: Literal["conversation", "prompt", "response"] = Field(
            "conversation", description="The text compared: prompt and response, the prompt (non-assistant turns) or the response.")
        unit: Literal["word", "char"] = Field("word", description="Shingles of words (after normalisation) or of characters.")
        ngram: int = Field(5, gt=0, description="Tokens per shingle (5 words; unit: char: 5 for Chinese, 10–24 for alphabetic text).")
        num_perm: int = Field(128, gt=0, le=1024, description="MinHash permutations: the signature's length.")
        bands: int | None = Field(None, gt=0, description="LSH bands; with rows, or both derived from threshold and num_perm.")
        rows: int | None = Field(None, gt=0, description="Signature values per band.")
        fp_weight: float = Field(
            0.1, ge=0, le=1, description="Weight of false positives when bands/rows are derived (verification removes them).")
        fn_weight: float = Field(0.9, ge=0, le=1, description="Weight of false negatives when bands/rows are derived.")
        seed: int | None = Field(None, description="Seed of the permutations; null = derived from the run's seed.")
        max_bucket: int = Field(64, gt=1, description="LSH buckets up to this size give every pair as a candidate; larger: a chain.")
        threads: int = Field(2, gt=0, description="Threads computing signatures.")
        chunk_rows: int = Field(50_000, gt=0, description="Rows read and tokenised at once (bounds memory).")

        @model_validator(mode="after")
        def _bands(self):
            if (self.bands is None) != (self.rows is None):
                raise ValueError("give both 'bands' and 'rows', or neither (then both are derived from threshold and num_perm)")
            if self.bands is not None and self.bands * self.rows > self.num_perm:
                raise ValueError(f"bands × rows ({self.bands} × {self.rows}) exceeds num_perm ({self.num_perm})")
            return self

    def band_layout(self) -> tuple[int, int]:
        p = self.params
        if p.bands is not None:
            return p.bands, p.rows
        return optimal_bands(p.threshold, p.num_perm, p.fp_weight, p.fn_weight)

    def _texts(self, pool: Pool, lo: int, hi: int) -> list[str]:
        if pool.text_loader is None:
            raise ValueError("minhash_dedup: the pool has no text loader")
        origin = pool.origin if pool.origin is not None else np.arange(len(pool))
        pairs = pool.text_loader(origin[lo:hi])
        f = self.params.field
        if f == "prompt":
            return [p or "" for p, _ in pairs]
        if f == "response":
            return [r or "" for _, r in pairs]
        return [f"{p or ''}\n\n{r or ''}" for p, r in pairs]

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        n = len(pool)
        bands, rows = self.band_layout()
        seed = p.seed if p.seed is not None else self.seed(pool, "permutations")
        a, b = permutations(p.num_perm, seed)
        # keep order: the pool's rank (lower first), else input order
        by_rank = pool.rank is not None
        order = np.argsort(pool.rank, kind="stable") if by_rank else np.arange(n)
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)

        sig = np.empty((n, p.num_perm), dtype=np.uint32)
        valid = np.zeros(n, dtype=bool)
        n_shingles = 0
        for lo in range(0, n, p.chunk_rows):
            hi = min(n, lo + p.chunk_rows)
            owner, x = shingle_hashes(self._texts(pool, lo, hi), p.ngram, p.unit)
            n_shingles += len(x)
            sig[lo:hi] = signatures(owner, x, hi - lo, a, b, p.threads)
            valid[lo + np.unique(owner)] = True
            del owner, x

        ci, cj, large = candidate_pairs(sig, valid, pos, bands, rows, p.max_bucket)
        est = estimated_jaccard(sig, ci, cj)
        ok = est >= p.threshold
        vi, vj, vest = ci[ok], cj[ok], est[ok]
        keeper = clusters(n, vi, vj, pos)
        size = np.bincount(keeper, minlength=n)[keeper]
        keep = keeper == np.arange(n)
        dropped = np.flatnonzero(~keep)
        j_kept = estimated_jaccard(sig, dropped, keeper[dropped])

        # each dropped row's strongest verified link (for rows joined through another row)
        link = np.full(n, -1, dtype=np.int64)
        link_j = np.zeros(n)
        if len(vi):
            ends = np.concatenate([vi, vj])
            other = np.concatenate([vj, vi])
            e = np.concatenate([vest, vest])
            o = np.lexsort((pos[other], -e, ends))
            first = np.r_[True, ends[o][1:] != ends[o][:-1]]
            link[ends[o][first]], link_j[ends[o][first]] = other[o][first], e[o][first]

        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        what = f"{p.field} {p.unit} {p.ngram}-grams, {p.num_perm} permutations"
        for d, jk in zip(dropped.tolist(), j_kept.tolist()):
            k = int(keeper[d])
            text = (f"near-duplicate of row {int(pool.rows[k])} (sample_id {str(pool.ids[k])[:12]}…, kept: first in "
                    f"{'rank' if by_rank else 'input'} order of a cluster of {int(size[d])}): estimated Jaccard {fmt(round(jk, 4))}")
            if jk >= p.threshold:
                text += f" >= {p.threshold} ({what})"
            else:
                ln = int(link[d])
                text += (f" with it ({what}); joined through row {int(pool.rows[ln])} "
                         f"(estimated Jaccard {fmt(round(float(link_j[d]), 4))} >= {p.threshold})")
            reason[d], detail[d] = "near_duplicate", text

        rank = np.full(n, -1, dtype=np.int64)
        kept_idx = np.flatnonzero(keep)
        rank[kept_idx[np.argsort(pos[kept_idx], kind="stable")]] = np.arange(len(kept_idx))
        heads = np.flatnonzero(keep & (size > 1))
        sizes, counts = np.unique(size[heads], return_counts=True)
        cluster_size = np.where(valid, size, np.nan).astype(np.float64)
        jaccard_to_kept = np.full(n, np.nan)
        jaccard_to_kept[dropped] = j_kept
        stats = {
            "checked": n,
            "kept": int(keep.sum()),
            "filtered_near_duplicate": int(len(dropped)),
            "rows_without_shingles": int(n - valid.sum()),
            "clusters": int(len(heads)),
            "rows_in_clusters": int(size[size > 1].shape[0]),
            "largest_cluster": int(size.max()) if n else 0,
            "cluster_sizes": {str(int(s)): int(c) for s, c in zip(sizes, counts)},
            "candidate_pairs": int(len(ci)),
            "verified_pairs": int(len(vi)),
            "large_buckets": int(large),
            "shingles": int(n_shingles),
            "threshold": p.threshold,
            "field": p.field,
            "unit": p.unit,
            "ngram": p.ngram,
            "num_perm": p.num_perm,
            "bands": bands,
            "rows": rows,
            "candidate_probability_at_threshold": round(candidate_probability(p.threshold, bands, rows), 4),
            "seed": int(seed),
            "keep_order": "rank" if by_rank else "input",
            "polars": pl.__version__,  # the token hashes are polars': stable within one polars version
        }
        return StepResult(keep, rank, "filtered", reason, detail, stats,
                          columns={"cluster_size": cluster_size, "jaccard_to_kept": jaccard_to_kept})
