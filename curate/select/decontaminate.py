"""Decontaminate: filter rows too close to an evaluation set.

The eval set is an input like any other (``eval_set:`` takes the keys of an ``inputs:`` entry —
``path``, ``format``, ``fields``, ``json_field``, ``limit`` …) and is read by the ingest code
(:func:`curate.stages.ingest.read_input`: the same readers, layout converters and conversation
rules); eval rows that break the rules are not used and are counted in the stats. Two checks, each
with its own threshold (``None`` turns a check off):

- **Word n-gram overlap** (``max_ngram_overlap``, default 0.5): a row's prompt (every non-assistant
  message, :func:`curate.records.prompt_text`) is lower-cased and split into words at every
  character that is not a letter, digit or underscore (punctuation and whitespace are dropped); its
  overlap is the share of its distinct word ``n``-grams (``ngram``, default 8) that occur in some
  eval prompt. The eval side is one set of 64-bit hashes (BLAKE2b) of every eval prompt's n-grams,
  built once per step, plus a map from each hash to the eval rows holding it so that the detail can
  name the eval row sharing most of the row's n-grams. A prompt with fewer than ``n`` words has no
  n-gram: its overlap is 0 (counted as ``too_short_for_ngrams``; only the embedding check can
  catch it). A hash collision could count an n-gram as shared that is not; at 64 bits this is
  negligible at eval-set sizes.
- **Embedding similarity** (``max_similarity``, default 0.95): the largest cosine between a row's
  embedding (the flow's embed stage, ``pool.embeddings``) and the eval rows' embeddings, made by the
  flow's own embedder with its own text view (``embed.text``: with ``prompt`` both sides are
  prompts; with the default ``conversation`` both sides are whole conversations, the eval row's
  reference answer included). Eval vectors are read from the store's collection of that embedder
  (keyed by sample_id, like every other row's vector) and only the missing ones are computed and
  written there, so a re-run embeds nothing. Both sides are re-normalised before the product;
  rows are compared in blocks of ``block`` rows (one matrix product per block, numpy).

A row at or above a threshold is ``filtered``: reason ``eval_ngram_overlap`` (checked first) or
``eval_embedding_similarity``; the detail gives the measured value, the threshold and the closest
eval row (source, row index, line and the start of its prompt). Per-row values are written to the
score table as ``<step>.ngram_overlap`` and ``<step>.eval_similarity``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
from pydantic import Field

from curate.config import InputSpec
from curate.records import prompt_text, sha256_hex
from curate.select.base import Pool, Selector, StepResult, fmt

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters, digits and underscores (everything else separates)."""
    return WORD.findall(text.lower())


def ngram_hashes(text: str, n: int) -> set[int]:
    """64-bit hashes of the distinct word n-grams of ``text`` (empty when it has fewer than n words)."""
    w = words(text)
    out = set()
    for i in range(len(w) - n + 1):
        h = hashlib.blake2b(" ".join(w[i : i + n]).encode("utf-8"), digest_size=8).digest()
        out.add(int.from_bytes(h, "little"))
    return out


class EvalNgrams:
    """The eval prompts' n-gram hashes, built once; ``overlap(text)`` -> (share, shared, total, best eval row or −1)."""

    def __init__(self, prompts: list[str], n: int):
        self.n = n
        self.where: dict[int, list[int]] = {}
        for j, p in enumerate(prompts):
            for h in ngram_hashes(p, n):
                self.where.setdefault(h, []).append(j)

    def overlap(self, text: str) -> tuple[float, int, int, int]:
        grams = ngram_hashes(text, self.n)
        if not grams:
            return 0.0, 0, 0, -1
        counts: dict[int, int] = {}
        shared = 0
        for h in grams:
            holders = self.where.get(h)
            if holders:
                shared += 1
                for j in holders:
                    counts[j] = counts.get(j, 0) + 1
        best = min(counts, key=lambda j: (-counts[j], j)) if counts else -1
        return shared / len(grams), shared, len(grams), best


def max_cosine(X: np.ndarray, E: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each row of X: the largest cosine to a row of E and its index (rows re-normalised; blocked)."""

    def unit(A: np.ndarray) -> np.ndarray:
        A = np.asarray(A, dtype=np.float32)
        norms = np.linalg.norm(A, axis=1, keepdims=True)
        return A / np.where(norms > 0, norms, 1.0)

    X, E = unit(X), unit(E)
    best = np.empty(len(X), dtype=np.float64)
    who = np.empty(len(X), dtype=np.int64)
    for start in range(0, len(X), block):
        S = X[start : start + block] @ E.T
        idx = S.argmax(axis=1)
        who[start : start + block] = idx
        best[start : start + block] = S[np.arange(len(idx)), idx]
    return best, who


class Decontaminate(Selector):
    method = "decontaminate"
    needs_embeddings = True

    class Params(Selector.Params):
        eval_set: InputSpec = Field(description="The evaluation set: the keys of an inputs: entry (path relative to base_dir, format, fields …).")
        ngram: int = Field(8, gt=0, description="Words per n-gram.")
        max_ngram_overlap: float | None = Field(0.5, ge=0, le=1, description="Filter a row whose prompt n-gram overlap is at least this; null = no n-gram check.")
        max_similarity: float | None = Field(0.95, ge=-1, le=1, description="Filter a row whose cosine to an eval row is at least this; null = no embedding check (the flow still needs an embed: section).")
        block: int = Field(4096, gt=0, description="Rows per matrix product.")

    def load_eval(self) -> tuple[list[dict[str, Any]], int]:
        """(the eval set's valid records, in file order; how many rows broke the conversation rules)."""
        from curate.ingest.eval_set import read_eval_set

        return read_eval_set(self.params.eval_set, self.base_dir or ".")

    def eval_embeddings(self, records: list[dict[str, Any]]) -> tuple[np.ndarray, int]:
        """(eval vectors from the flow's embedder, how many were computed now); cached in the store."""
        from curate.embed import build_embedder
        from curate.stages.embed import embedding_table
        from curate.store import Store

        spec = self.context.get("embed")
        if spec is None:
            raise RuntimeError("decontaminate: needs the flow's embedder (an 'embed:' section), even with max_similarity: null")
        embedder = build_embedder(spec, self.context.get("torch_threads"))
        store_dir, key = self.context.get("store_dir"), self.context.get("embed_key") or embedder.key
        if key != embedder.key:
            raise RuntimeError(f"decontaminate: the run's embedder key {key[:12]} differs from its embed spec's {embedder.key[:12]}")
        ids = [r["sample_id"] for r in records]
        vectors: dict[str, np.ndarray] = {}
        collection = Store(store_dir).embeddings(key) if store_dir else None
        if collection is not None:
            table = collection.read(ids)
            if table is not None:
                for sid, st, vec in zip(table.column("sample_id").to_pylist(), table.column("status").to_pylist(), table.column("vector").to_pylist()):
                    if st == "ok":
                        vectors[sid] = np.asarray(vec, dtype=np.float32)
        todo: dict[str, dict[str, Any]] = {}  # the first eval row of each sample_id not stored yet
        for r in records:
            if r["sample_id"] not in vectors:
                todo.setdefault(r["sample_id"], r)
        if todo:
            new = np.asarray(embedder.embed_records(list(todo.values())))
            new_ids = list(todo)
            vectors.update(zip(new_ids, new))
            if collection is not None:
                collection.describe(embedder.fingerprint())
                collection.write(embedding_table(new_ids, new, ["ok"] * len(new_ids)))
        return np.stack([vectors[s] for s in ids]), len(todo)

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

        overlap = np.full(n, np.nan)
        sim = np.full(n, np.nan)
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        too_short = 0
        if p.max_ngram_overlap is not None and n:
            grams = EvalNgrams(eval_prompts, p.ngram)
            for i, (prompt, _) in enumerate(pool.texts()):
                share, shared, total, best = grams.overlap(prompt)
                overlap[i] = share
                too_short += total == 0
                if total and share >= p.max_ngram_overlap:
                    reason[i] = "eval_ngram_overlap"
                    detail[i] = (f"{p.ngram}-gram overlap {fmt(share)} ({shared}/{total} of the prompt's {p.ngram}-grams) "
                                 f">= {p.max_ngram_overlap}; most shared with {name(best)}")
        computed = 0
        if p.max_similarity is not None and n:
            E, computed = self.eval_embeddings(records)
            best_sim, who = max_cosine(pool.embeddings, E, p.block)
            sim[:] = best_sim
            for i in np.flatnonzero(best_sim >= p.max_similarity):
                if reason[i] is None:
                    reason[i] = "eval_embedding_similarity"
                    detail[i] = f"cosine similarity {fmt(best_sim[i])} >= {p.max_similarity} to {name(int(who[i]))}"
        keep = np.array([r is None for r in reason], dtype=bool)
        rank = np.full(n, -1, dtype=np.int64)
        rank[keep] = np.arange(int(keep.sum()))
        stats = {
            "checked": n,
            "kept": int(keep.sum()),
            "filtered_eval_ngram_overlap": sum(r == "eval_ngram_overlap" for r in reason),
            "filtered_eval_embedding_similarity": sum(r == "eval_embedding_similarity" for r in reason),
            "ngram": p.ngram,
            "max_ngram_overlap": p.max_ngram_overlap,
            "max_similarity": p.max_similarity,
            "too_short_for_ngrams": int(too_short),
            "eval_rows": len(records),
            "eval_rows_invalid": n_bad,
            "eval_sha256": sha256_hex(*(r["sample_id"] for r in records)),
            "eval_embedded_now": computed,
        }
        return StepResult(keep, rank, "filtered", reason, detail, stats, columns={"ngram_overlap": overlap, "eval_similarity": sim})
