"""Decontaminate: filter rows too close to an evaluation set.

The eval set is an input like any other (``eval_set:`` takes the keys of an ``inputs:`` entry —
``path``, ``format``, ``fields``, ``json_field``, ``limit`` …) and is read by the ingest code
(:func:`curate.ingest.read.read_input`: the same readers, layout converters and conversation
rules); eval rows that break the rules are not used and are counted in the stats.

Text is compared as *prompts*: every non-assistant message (:func:`curate.records.prompt_text`) of a
training row and of an eval row. Both are normalised the same way: lower-cased and split into words
at every character that is not a word character (polars' regex ``\\w+``: letters, marks, digits,
connector punctuation), so case, whitespace and punctuation never matter. Five checks, each turned
off with ``false`` / ``null``; a row is ``filtered`` by the first that flags it, in this order:

- **Exact match** (``exact_match``, default on): the row's normalised prompt equals an eval
  prompt's. Reason ``eval_exact_match``.
- **Eval-side n-gram overlap** (``max_ngram_overlap``, default 0.5, ``ngram`` words, default 8): for
  each eval prompt, the share of its distinct word n-grams that occur in the row's prompt; the row's
  value is the largest share over the eval prompts (open-instruct scores the eval side the same way,
  counting the eval prompt's *tokens* covered by matching n-grams instead of its n-grams). An eval
  prompt copied into a training row behind any preamble scores 1. Reason ``eval_ngram_overlap``.
- **N-gram collision** (``collision_ngram``, default null; 13 is the GPT-3 paper's rule): a row
  sharing any one word ``collision_ngram``-gram with an eval prompt is flagged. Reason
  ``eval_ngram_collision``.
- **Short eval prompts** (``short_prompts``, default on): an eval prompt with fewer than ``ngram``
  words has no n-gram; it flags a row whose normalised prompt contains it as a run of whole words
  (a normalised substring at word boundaries), when it has at least ``min_short_words`` words
  (default 3; shorter ones — "Write test" — are left to the exact-match check). Reason
  ``eval_short_prompt_substring``.
- **Embedding similarity** (``max_similarity``, default 0.9): the largest cosine between the row and
  an eval row, with the flow's embedder model. ``embed_view: prompt`` (default) embeds the prompt of
  both sides (the flow's own vectors are reused when ``embed.text`` is already ``prompt``; otherwise
  the pool rows' prompts are embedded once and kept in the store under that view's key);
  ``embed_view: flow`` uses the flow's vectors and text view on both sides as they are. Rows are
  compared in blocks of ``block`` rows (one matrix product per block). Reason
  ``eval_embedding_similarity``.

Every detail gives the measured value, the threshold and the eval row that matched (source, row
index, line and the start of its prompt). N-grams are hashed, not compared as strings: each word
gets polars' 64-bit hash and an n-gram the polynomial of its words' hashes modulo 2**64, computed for
every position of the pool at once with numpy (``n`` array passes); pool n-grams are looked up in the
sorted eval hashes and the (row, eval row) pairs counted with ``np.unique``, so the cost grows with
the pool's words, not with rows × eval rows. A hash collision could count an n-gram as shared that
is not; at 64 bits this is negligible at these sizes. Per-row values go to the score table as
``<step>.ngram_overlap``, ``<step>.eval_similarity`` and, with ``collision_ngram``,
``<step>.ngram_collisions``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import Field

from curate.config import InputSpec
from curate.records import prompt_text, sha256_hex
from curate.select.base import Pool, Selector, StepResult, fmt

WORD = r"\w+"
BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial's base modulo 2**64
CHUNK_ROWS = 250_000  # pool rows tokenised at once by the text checks


def _word_lists(texts: list[str]) -> pl.Series:
    return pl.Series("t", texts, dtype=pl.String).fill_null("").str.to_lowercase().str.extract_all(WORD)


def words(text: str) -> list[str]:
    """Lower-cased words: runs of word characters (everything else separates)."""
    return _word_lists([text])[0].to_list()


def normalise(texts: list[str]) -> list[str]:
    """Each text as its words joined by one space (case, whitespace and punctuation removed)."""
    return _word_lists(texts).list.join(" ").to_list()


class Tokens:
    """Every text's words as 64-bit hashes in one flat array: ``flat``, ``starts`` (n+1 offsets)."""

    def __init__(self, texts: list[str]):
        lists = _word_lists(texts)
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
        flat = lists.explode().drop_nulls()
        self.flat = flat.hash(seed=0).to_numpy().astype(np.uint64) if len(flat) else np.zeros(0, np.uint64)
        assert len(self.flat) == int(lengths.sum())
        self.lengths = lengths
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.normalised = lists.list.join(" ")
        self.text_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)  # the text of each word
        self.left = self.starts[self.text_of + 1] - np.arange(len(self.flat), dtype=np.int64)  # words from here to its text's end
        self._last: tuple[int, np.ndarray] = (1, self.flat)  # the last window hashes computed: extended, not recomputed

    def windows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(text index, hash) of every run of ``k`` consecutive words inside one text."""
        n_tok = len(self.flat)
        if n_tok < k:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        k0, h0 = self._last if self._last[0] <= k else (1, self.flat)
        h = h0[: n_tok - k + 1].copy()
        for t in range(k0, k):
            h *= BASE
            h += self.flat[t : n_tok - k + 1 + t]
        self._last = (k, h)
        ok = self.left[: n_tok - k + 1] >= k
        return self.text_of[: n_tok - k + 1][ok], h[ok]


def _member(sorted_values: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whether each of ``x`` is in ``sorted_values``, its first position there when it is)."""
    hit, pos = np.zeros(len(x), dtype=bool), np.zeros(len(x), dtype=np.int64)
    if not len(sorted_values) or not len(x):
        return hit, pos
    table = np.zeros(1 << 22, dtype=bool)  # a first look by the top 22 bits: most of x is ruled out without a search
    table[sorted_values >> np.uint64(42)] = True
    maybe = np.flatnonzero(table[x >> np.uint64(42)])
    found = np.searchsorted(sorted_values, x[maybe])
    ok = sorted_values[np.minimum(found, len(sorted_values) - 1)] == x[maybe]
    hit[maybe[ok]], pos[maybe[ok]] = True, found[ok]
    return hit, pos


def _distinct(owner: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (owner, hash) pairs, sorted by hash then owner."""
    order = np.lexsort((owner, h))
    owner, h = owner[order], h[order]
    keep = np.ones(len(h), dtype=bool)
    keep[1:] = (h[1:] != h[:-1]) | (owner[1:] != owner[:-1])
    return owner[keep], h[keep]


def _best_per_row(rows: np.ndarray, evals: np.ndarray, value: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row: the largest value over its (row, eval) pairs, that eval (the lowest on ties) and the
    pair's index (−1 / NaN where the row has no pair)."""
    best = np.full(n_rows, np.nan)
    who = np.full(n_rows, -1, dtype=np.int64)
    at = np.full(n_rows, -1, dtype=np.int64)
    if len(rows):
        order = np.lexsort((evals, -value, rows))
        first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
        best[rows[first]], who[rows[first]], at[rows[first]] = value[first], evals[first], first
    return best, who, at


class EvalNgrams:
    """The eval prompts' distinct word n-grams, hashed once; ``match(pool tokens)`` scores the pool from the eval side."""

    def __init__(self, eval_tokens: Tokens, n: int):
        self.n = n
        owner, h = eval_tokens.windows(n)
        self.owner, self.h = _distinct(owner, h)  # sorted by hash
        self.total = np.bincount(self.owner, minlength=len(eval_tokens.lengths))  # distinct n-grams per eval prompt

    def match(self, pool: Tokens) -> dict[str, np.ndarray]:
        """Per pool row: ``share`` (largest share of one eval prompt's distinct n-grams found in the row; 0
        when none), ``shared`` and ``total`` (that eval prompt's counts), ``eval`` (its index, −1 when no
        n-gram is shared; ties go to the lowest index) and ``collisions`` (distinct n-grams of the row in
        any eval prompt)."""
        n_rows = len(pool.lengths)
        rows, h = pool.windows(self.n)
        hit = _member(self.h, h)[0]
        rows, h = _distinct(rows[hit], h[hit])
        collisions = np.bincount(rows, minlength=n_rows)
        lo, hi = np.searchsorted(self.h, h, "left"), np.searchsorted(self.h, h, "right")
        reps = hi - lo
        pair_row = np.repeat(rows, reps)
        idx = np.repeat(lo - np.cumsum(np.r_[0, reps[:-1]]), reps) + np.arange(int(reps.sum()))
        pair_eval = self.owner[idx]
        m = max(len(self.total), 1)
        keys, counts = np.unique(pair_row * m + pair_eval, return_counts=True)
        p_row, p_eval = keys // m, keys % m
        share = counts / self.total[p_eval]
        best, who, at = _best_per_row(p_row, p_eval, share, n_rows)
        shared = np.zeros(n_rows, dtype=np.int64)
        total = np.zeros(n_rows, dtype=np.int64)
        found = at >= 0
        shared[found], total[found] = counts[at[found]], self.total[who[found]]
        return {"share": np.where(found, best, 0.0), "eval": who, "shared": shared, "total": total, "collisions": collisions}


def short_prompt_matches(eval_tokens: Tokens, pool: Tokens, n: int, min_words: int) -> np.ndarray:
    """Per pool row: the index of an eval prompt of ``min_words``…``n − 1`` words that occurs in the row's
    prompt as a run of whole words (the longest such prompt, then the lowest index), or −1."""
    out = np.full(len(pool.lengths), -1, dtype=np.int64)
    lengths = eval_tokens.lengths
    for k in sorted({int(x) for x in lengths if min_words <= x < n}):  # ascending: the pool's window hashes are extended
        owner, h = eval_tokens.windows(k)
        short = lengths[owner] == k  # a k-word eval prompt's one window is the whole prompt
        owner, h = _distinct(owner[short], h[short])
        first = np.r_[True, h[1:] != h[:-1]] if len(h) else np.zeros(0, dtype=bool)
        owner, h = owner[first], h[first]  # lowest eval index per hash
        rows, rh = pool.windows(k)
        hit, pos = _member(h, rh)
        rows, who = rows[hit], owner[pos[hit]]
        order = np.lexsort((who, rows))
        rows, who = rows[order], who[order]
        first_row = np.r_[True, rows[1:] != rows[:-1]] if len(rows) else np.zeros(0, dtype=bool)
        rows, who = rows[first_row], who[first_row]
        out[rows] = who  # a longer eval prompt replaces a shorter one
    return out


def exact_matches(eval_tokens: Tokens, pool: Tokens) -> np.ndarray:
    """Per pool row: the lowest index of an eval prompt with the same normalised text (non-empty), or −1."""
    ev = pl.DataFrame({"norm": eval_tokens.normalised, "eval": np.arange(len(eval_tokens.lengths), dtype=np.int64)})
    ev = ev.filter(pl.col("norm") != "").group_by("norm").agg(pl.col("eval").min())
    rows = pl.DataFrame({"norm": pool.normalised, "row": np.arange(len(pool.lengths), dtype=np.int64)})
    joined = rows.join(ev, on="norm", how="left").sort("row")
    return joined["eval"].fill_null(-1).to_numpy().astype(np.int64)


def max_cosine(X: np.ndarray, E: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each row of X: the largest cosine to a row of E and its index (rows re-normalised; blocked)."""

    def unit(A: np.ndarray) -> np.ndarray:
        A = np.asarray(A, dtype=np.float32)
        norms = np.linalg.norm(A, axis=1, keepdims=True)
        return A / np.where(norms > 0, norms, 1.0)

    E = unit(E)
    best = np.empty(len(X), dtype=np.float64)
    who = np.empty(len(X), dtype=np.int64)
    for start in range(0, len(X), block):
        S = unit(X[start : start + block]) @ E.T
        idx = S.argmax(axis=1)
        who[start : start + block] = idx
        best[start : start + block] = S[np.arange(len(idx)), idx]
    return best, who


def cached_vectors(embedder, store_dir: str | None, ids: list[str], texts) -> tuple[np.ndarray, int]:
    """(vectors of ``ids`` from the store collection of ``embedder``; how many were computed now). ``texts(positions)``
    gives the texts of the rows not stored yet; they are embedded and written there."""
    from curate.store import Store, embedding_table

    ids = [str(s) for s in ids]
    vectors: dict[str, np.ndarray] = {}
    collection = Store(store_dir).embeddings(embedder.key) if store_dir else None
    if collection is not None and ids:
        table = collection.read(ids)
        if table is not None and table.num_rows:
            ok = np.asarray(table.column("status").to_pylist()) == "ok"
            flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            mat = np.asarray(flat, dtype=np.float32).reshape(table.num_rows, -1)
            for sid, good, vec in zip(table.column("sample_id").to_pylist(), ok, mat):
                if good:
                    vectors[sid] = vec
    todo: dict[str, int] = {}  # the first position of each sample_id not stored yet
    for i, sid in enumerate(ids):
        if sid not in vectors and sid not in todo:
            todo[sid] = i
    if todo:
        new = np.asarray(embedder.embed(texts(list(todo.values()))), dtype=np.float32)
        vectors.update(zip(todo, new))
        if collection is not None:
            collection.describe(embedder.fingerprint())
            collection.write(embedding_table(list(todo), new, ["ok"] * len(todo), embedder.spec.storage))
    dim = next(iter(vectors.values())).shape[0] if vectors else 0
    return (np.stack([vectors[s] for s in ids]) if ids else np.zeros((0, dim), np.float32)), len(todo)


class Decontaminate(Selector):
    method = "decontaminate"
    needs_embeddings = True

    class Params(Selector.Params):
        eval_set: InputSpec = Field(
            description="The evaluation set: the keys of an inputs: entry (path relative to base_dir, format, fields …).")
        exact_match: bool = Field(True, description="Filter a row whose normalised prompt equals an eval prompt's.")
        ngram: int = Field(
            8, gt=0, description="Words per n-gram of the overlap check; eval prompts shorter than this go to the short-prompt check.")
        max_ngram_overlap: float | None = Field(
            0.5, ge=0, le=1,
            description="Filter a row holding at least this share of one eval prompt's distinct n-grams; null = no overlap check.")
        collision_ngram: int | None = Field(
            None, gt=0, description="Filter a row sharing any one word n-gram of this length with an eval prompt (GPT-3: 13); null = off.")
        short_prompts: bool = Field(
            True, description="Filter a row whose normalised prompt contains an eval prompt shorter than ngram words.")
        min_short_words: int = Field(3, gt=0, description="Eval prompts with fewer words are not substring-matched (only exact-matched).")
        max_similarity: float | None = Field(
            0.9, ge=-1, le=1, description="Filter a row whose cosine to an eval row is at least this; null = no embedding check "
            "(the flow still needs an embed: section).")
        embed_view: Literal["prompt", "flow"] = Field(
            "prompt",
            description="prompt: embed the prompts of both sides with the flow's model; flow: the flow's vectors and text view as is.")
        block: int = Field(4096, gt=0, description="Rows per matrix product.")

    def load_eval(self) -> tuple[list[dict[str, Any]], int]:
        """(the eval set's valid records, in file order; how many rows broke the conversation rules)."""
        from curate.ingest.eval_set import read_eval_set

        return read_eval_set(self.params.eval_set, self.base_dir or ".")

    def embedder(self, view: str | None = None):
        """The flow's embedder, with its text view replaced by ``view`` when given."""
        from curate.embed import build_embedder

        spec = self.context.embed
        if spec is None:
            raise RuntimeError("decontaminate: needs the flow's embedder (an 'embed:' section), even with max_similarity: null")
        if view is not None and spec.text != view:
            spec = spec.model_copy(update={"text": view})
        return build_embedder(spec, self.context.torch_threads)

    def eval_embeddings(self, records: list[dict[str, Any]], embedder=None) -> tuple[np.ndarray, int]:
        """(eval vectors from ``embedder`` (default: the flow's), how many were computed now); cached in the store."""
        from curate.embed.base import embed_text

        embedder = embedder or self.embedder()
        if embedder.spec.text == self.context.embed.text:
            key = self.context.embed_key or embedder.key
            if key != embedder.key:
                raise RuntimeError(f"decontaminate: the run's embedder key {key[:12]} differs from its embed spec's {embedder.key[:12]}")
        return cached_vectors(embedder, self.context.store_dir, [r["sample_id"] for r in records],
                              lambda pos: [embed_text(records[i], embedder.spec.text) for i in pos])

    def similarity(self, pool: Pool, records: list[dict[str, Any]], prompts: list[str] | None) -> tuple[np.ndarray, np.ndarray, dict]:
        """(largest cosine per row, the eval row, stats) in the configured view."""
        p = self.params
        if p.embed_view == "flow" or self.context.embed.text == "prompt":
            E, computed = self.eval_embeddings(records)
            X, pool_now = pool.embeddings, 0
        else:
            embedder = self.embedder("prompt")
            E, computed = self.eval_embeddings(records, embedder)
            prompts = prompts if prompts is not None else [t[0] for t in pool.texts()]
            X, pool_now = cached_vectors(embedder, self.context.store_dir, list(pool.ids), lambda pos: [prompts[i] for i in pos])
        best, who = max_cosine(X, E, p.block)
        return best, who, {"eval_embedded_now": computed, "pool_prompts_embedded_now": pool_now}

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        n = len(pool)
        records, n_bad = self.load_eval()
        eval_prompts = [prompt_text(r["messages"]) for r in records]

        def name(j: int) -> str:
            r = records[j]
            line = f", line {r['source_line']}" if r.get("source_line") is not None else ""
            head = " ".join(eval_prompts[j].split())
            head = head if len(head) <= 60 else head[:60] + "…"
            return f"eval row {r['source_index']} of {r['source']}{line} ({head!r})"

        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n

        def flag(i: int, why: str, text: str) -> None:
            if reason[i] is None:
                reason[i], detail[i] = why, text

        overlap = np.full(n, np.nan)
        sim = np.full(n, np.nan)
        columns: dict[str, np.ndarray] = {}
        ev = Tokens(eval_prompts)
        short = (ev.lengths < p.ngram) & (ev.lengths > 0)
        stats_extra: dict[str, Any] = {"eval_embedded_now": 0, "pool_prompts_embedded_now": 0}
        prompts = None
        text_checks = p.exact_match or p.max_ngram_overlap is not None or p.collision_ngram is not None or p.short_prompts
        if n and text_checks:
            prompts = [t[0] for t in pool.texts()]
            exact = np.full(n, -1, dtype=np.int64)
            short_hit = np.full(n, -1, dtype=np.int64)
            grams = EvalNgrams(ev, p.ngram) if p.max_ngram_overlap is not None else None
            coll = EvalNgrams(ev, p.collision_ngram) if p.collision_ngram is not None else None
            m = {k: np.zeros(n, dtype=np.float64 if k == "share" else np.int64) for k in ("share", "eval", "shared", "total", "collisions")}
            c = {k: np.zeros(n, dtype=np.float64 if k == "share" else np.int64) for k in m}
            for lo in range(0, n, CHUNK_ROWS):  # bounded memory: the word arrays of one chunk at a time
                hi = min(n, lo + CHUNK_ROWS)
                tok = Tokens(prompts[lo:hi])
                if p.exact_match:
                    exact[lo:hi] = exact_matches(ev, tok)
                if p.short_prompts:  # window lengths below ngram first: the hashes are extended to ngram, then collision_ngram
                    short_hit[lo:hi] = short_prompt_matches(ev, tok, p.ngram, p.min_short_words)
                for checker, out in ((grams, m), (coll, c)):
                    if checker is not None:
                        for key, values in checker.match(tok).items():
                            out[key][lo:hi] = values
            for i in np.flatnonzero(exact >= 0):
                flag(int(i), "eval_exact_match", f"normalised prompt equals {name(int(exact[i]))}")
            if grams is not None:
                overlap[:] = m["share"]
                for i in np.flatnonzero((m["eval"] >= 0) & (m["share"] >= p.max_ngram_overlap)):
                    flag(int(i), "eval_ngram_overlap",
                         f"{p.ngram}-gram overlap {fmt(m['share'][i])} ({m['shared'][i]}/{m['total'][i]} "
                         f"of the eval prompt's {p.ngram}-grams "
                         f"in this row) >= {p.max_ngram_overlap} with {name(int(m['eval'][i]))}")
            if coll is not None:
                columns["ngram_collisions"] = c["collisions"].astype(np.float64)
                for i in np.flatnonzero(c["collisions"] > 0):
                    flag(int(i), "eval_ngram_collision",
                         f"{c['collisions'][i]} {p.collision_ngram}-gram(s) shared with eval prompts "
                         f"({c['shared'][i]} with {name(int(c['eval'][i]))})")
            for i in np.flatnonzero(short_hit >= 0):
                j = int(short_hit[i])
                flag(int(i), "eval_short_prompt_substring",
                     f"prompt contains the {int(ev.lengths[j])}-word {name(j)} (shorter than {p.ngram} words)")
        if p.max_similarity is not None and n:
            best_sim, who, stats_extra = self.similarity(pool, records, prompts)
            sim[:] = best_sim
            for i in np.flatnonzero(best_sim >= p.max_similarity):
                flag(int(i), "eval_embedding_similarity",
                     f"cosine similarity {fmt(best_sim[i])} >= {p.max_similarity} ({p.embed_view} view) to {name(int(who[i]))}")
        keep = np.array([r is None for r in reason], dtype=bool)
        rank = np.full(n, -1, dtype=np.int64)
        rank[keep] = np.arange(int(keep.sum()))
        reasons = ("eval_exact_match", "eval_ngram_overlap", "eval_ngram_collision", "eval_short_prompt_substring",
                   "eval_embedding_similarity")
        stats = {
            "checked": n,
            "kept": int(keep.sum()),
            **{f"filtered_{r}": sum(x == r for x in reason) for r in reasons},
            "exact_match": p.exact_match,
            "ngram": p.ngram,
            "max_ngram_overlap": p.max_ngram_overlap,
            "collision_ngram": p.collision_ngram,
            "short_prompts": p.short_prompts,
            "min_short_words": p.min_short_words,
            "max_similarity": p.max_similarity,
            "embed_view": p.embed_view,
            "eval_rows": len(records),
            "eval_rows_invalid": n_bad,
            "eval_short_prompts": int(short.sum()),
            "eval_short_prompts_substring_matched": int((short & (ev.lengths >= p.min_short_words)).sum()) if p.short_prompts else 0,
            "eval_sha256": sha256_hex(*(r["sample_id"] for r in records)),
            **stats_extra,
        }
        columns = {"ngram_overlap": overlap, "eval_similarity": sim, **columns}
        return StepResult(keep, rank, "filtered", reason, detail, stats, columns=columns)
