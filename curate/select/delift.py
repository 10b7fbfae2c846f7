"""DELIFT — utility-kernel submodular selection (methods.md B5).

The utility of candidate j for target i is how much showing j as a one-shot example brings the
model's prediction of i's reference answer closer to certainty, teacher-forced through the masked-CE
engine:

- ``d(i | ctx) = ‖p − 1‖₂ / √T`` over the T target positions (i's response tokens and the final EOS),
  ``p_t`` = the model's probability of the true token;
- sequences are ``tok(prompt) + [EOS] + tok(y_i) + [EOS]`` with our wrappers (:data:`DELIFT_NO_ICL`,
  :data:`DELIFT_ICL`), no BOS, as the reference's HF path;
- ``u_ij = d(i | no example) − d(i | example j)``.

**Targets that cannot be measured.** Each target's baseline (no example) runs first. A target whose
own query + response do not fit in ``max_length`` (``skipped_too_long``) or whose baseline forward
fails (``error``) has no utilities: it leaves the objective — neither represented nor a candidate —
and the ledger gives that status as its reason. A pair whose prompt cannot fit even with the example
cut to nothing, or whose forward fails, is an unmeasured entry.

**Pairs.** ``pairs: all`` measures every (target, example) pair — the dense kernel of the reference,
about n_valid · (n_valid + n_ref) + n baseline forwards. ``pairs: neighbors`` tries only each target's
``n_neighbors`` nearest rows by embedding (and as many reference rows): an approximation B5 lists as
opt-in. ``auto`` (default) is ``all`` while that costs at most ``max_dense_forwards`` forwards.

**Kernels.** The candidate kernel U (rows = targets, columns = candidates) and the reference kernel R
(rows = targets, columns = query or private rows) are min-max scaled to [0, 1] *separately*, each over
its own measured entries, as the reference builds and scales them in separate runs. An unmeasured
entry is unknown, not the worst utility: it gets the scaled value of ``u = 0`` ("the example neither
helps nor hurts", where B5 places unrelated pairs), clipped to [0, 1]. A masked diagonal
(``mask_diagonal``) is 0: a row never covers itself.

The kernel drives the stage's objective with lazy greedy: ``facility_location`` (instruction tuning),
``flmi`` against a query set (task-specific; the targets are the new rows, R's columns the query
rows) or ``flcg`` against a private set (continual: candidates that add what the existing data does
not cover). Long examples are cut (the example's response, then its query) so the target's query and
response stay whole (E4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from curate.lm import LMParams, Seq, load_backend
from curate.progress import stage_progress
from curate.prompts import DELIFT_ICL, DELIFT_NO_ICL
from curate.select.base import BudgetParams, Pool, Selector, StepResult, fmt
from curate.select.submodular import DenseKernel, FacilityLocation, maximize

#: sequences built and scored per call to the backend (bounds the memory of the dense kernel)
PAIR_BLOCK = 4096


def distance(token_logprobs: np.ndarray) -> float:
    """‖p − 1‖₂ / √T for the true-token probabilities p; 0 when T = 0."""
    if len(token_logprobs) == 0:
        return 0.0
    p = np.exp(token_logprobs.astype(np.float64))
    return float(np.linalg.norm(p - 1) / np.sqrt(len(p)))


@dataclass
class Utilities:
    """Raw utilities and what could not be measured.

    ``raw``: (target, example) → u_ij for every measured pair; ``status``: target → ``ok`` |
    ``skipped_too_long`` | ``error``, with ``detail`` for the others; ``baseline``: target → its
    no-example loss; ``forwards``: sequences scored;
    ``pairs_too_long`` / ``pairs_failed``: pairs left unmeasured."""

    raw: dict[tuple[int, int], float] = field(default_factory=dict)
    status: dict[int, str] = field(default_factory=dict)
    detail: dict[int, str] = field(default_factory=dict)
    baseline: dict[int, float] = field(default_factory=dict)
    forwards: int = 0
    pairs_too_long: int = 0
    pairs_failed: int = 0


def scaled_kernel(raw: dict[tuple[int, int], float], rows: dict[int, int], cols: dict[int, int],
                  masked: set[tuple[int, int]] = frozenset()) -> tuple[np.ndarray, dict]:
    """(len(rows) × len(cols)) float32 kernel from the raw utilities whose (target, example) are in
    ``rows`` × ``cols`` (pool position → kernel index): min-max scaled over those entries; an
    unmeasured entry gets the scaled value of u = 0, clipped to [0, 1]; ``masked`` entries are 0.
    Returns the kernel and {range: [lo, hi] of the raw values, measured, unknown, unknown_value}."""
    keys = [(i, j) for (i, j) in raw if i in rows and j in cols and (i, j) not in masked]
    u = np.array([raw[k] for k in keys], dtype=np.float64)
    lo, hi = (float(u.min()), float(u.max())) if len(u) else (0.0, 0.0)

    def scale(v):
        v = np.asarray(v, dtype=np.float64)
        return np.clip((v - lo) / (hi - lo), 0.0, 1.0) if hi > lo else (v >= lo).astype(np.float64)

    unknown_value = float(scale(0.0))
    K = np.full((len(rows), len(cols)), unknown_value, dtype=np.float32)
    if keys:
        r = np.array([rows[i] for i, _ in keys])
        c = np.array([cols[j] for _, j in keys])
        K[r, c] = scale(u)
    for i, j in masked:
        if i in rows and j in cols:
            K[rows[i], cols[j]] = 0.0
    n_masked = sum(1 for i, j in masked if i in rows and j in cols)
    info = {"range": [lo, hi], "measured": len(keys), "unknown": K.size - len(keys) - n_masked, "unknown_value": unknown_value}
    return K, info


class DeliftParams(BudgetParams, LMParams):
    stage: Literal["facility_location", "flmi", "flcg"] = "facility_location"
    query_source: str | None = Field(None, description="flmi: rows from this source are the query set.")
    private_source: str | None = Field(None, description="flcg: rows from this source are the existing (private) data.")
    pairs: Literal["auto", "all", "neighbors"] = Field(
        "auto", description="Pairs measured: all (the dense kernel), neighbors (each target's n_neighbors nearest rows by "
                            "embedding; an approximation), auto = all while it needs at most max_dense_forwards forwards.")
    max_dense_forwards: int = Field(10_000, gt=0, description="auto: the most forwards (baselines + all pairs) the dense kernel may take.")
    n_neighbors: int = Field(8, gt=0, description="pairs: neighbors — candidates (and reference rows) tried per target.")
    mask_diagonal: bool = False
    max_length: int = Field(1024, gt=16)
    eta: float = Field(1.0, gt=0)
    nu: float = Field(1.0, ge=0)


class Delift(Selector):
    method = "delift"
    needs_embeddings = True

    class Params(DeliftParams):
        pass

    # -- sequences ----------------------------------------------------------------------------------
    def _encoder(self, tok):
        return lambda text: tok(text, add_special_tokens=False)["input_ids"]

    def icl_prompt(self, tok, x_i: str, x_j: str, y_j: str, room: int) -> list[int] | None:
        """Token ids of the one-shot prompt (ending in EOS) within ``room`` tokens: the example is cut
        (its response, then its query) until it fits; None when it cannot fit even empty."""
        enc = self._encoder(tok)
        ex_q, ex_r = enc(x_j), enc(y_j)
        for _ in range(8):  # re-rendering a cut example can shift a token or two: cut again
            prompt = enc(DELIFT_ICL.text.format(example_query=tok.decode(ex_q), example_response=tok.decode(ex_r), query=x_i))
            over = len(prompt) + 1 - room
            if over <= 0:
                return prompt + [tok.eos_token_id]
            if not ex_q and not ex_r:
                return None
            cut_r = min(over, len(ex_r))
            ex_r = ex_r[: len(ex_r) - cut_r]
            ex_q = ex_q[: max(0, len(ex_q) - (over - cut_r))]
        return None

    # -- utilities ----------------------------------------------------------------------------------
    def baselines(self, texts, targets: np.ndarray, backend) -> Utilities:
        """d(i | no example) for each target, or its status (``skipped_too_long``, ``error``)."""
        p = self.params
        tok = backend.tokenizer
        enc, eos = self._encoder(tok), tok.eos_token_id
        out = Utilities()
        seqs, keys = [], []
        for i in targets:
            x_i, y_i = texts[i]
            resp = enc(y_i) + [eos]
            prompt = enc(DELIFT_NO_ICL.text.format(query=x_i)) + [eos]
            if len(prompt) + len(resp) > p.max_length:
                out.status[int(i)] = "skipped_too_long"
                out.detail[int(i)] = (f"its query and response take {len(prompt) + len(resp)} tokens in the DELIFT prompt, "
                                      f"over max_length {p.max_length}: no utility can be measured for it")
                continue
            seqs.append(Seq(prompt + resp, [(len(prompt), len(prompt) + len(resp))]))
            keys.append(int(i))
        with stage_progress("select delift baselines", len(seqs)) as bar:
            results = backend.score(seqs, token_logprobs=True, progress=bar)
        for i, res in zip(keys, results):
            if res.status == "ok":
                out.status[i] = "ok"
                out.baseline[i] = distance(res.token_logprobs[0])
            else:
                out.status[i] = "error"
                out.detail[i] = f"its baseline forward failed ({res.error_class}: {res.message}): no utility can be measured for it"
        out.forwards = len(seqs)
        return out

    def pair_utilities(self, texts, base: Utilities, examples: dict[int, np.ndarray], backend) -> Utilities:
        """u_ij = d(i | no example) − d(i | example j) for each measured target i and its examples,
        scored in blocks of :data:`PAIR_BLOCK` sequences; fills ``base`` and returns it."""
        p = self.params
        tok = backend.tokenizer
        enc, eos = self._encoder(tok), tok.eos_token_id
        pairs = [(i, int(j)) for i, exs in examples.items() for j in exs if not (p.mask_diagonal and i == j)]
        resp = {i: enc(texts[i][1]) + [eos] for i in examples}
        with stage_progress("select delift utilities", len(pairs)) as bar:
            for s in range(0, len(pairs), PAIR_BLOCK):
                seqs, keys = [], []
                for i, j in pairs[s : s + PAIR_BLOCK]:
                    prompt = self.icl_prompt(tok, texts[i][0], *texts[j], room=p.max_length - len(resp[i]))
                    if prompt is None:
                        base.pairs_too_long += 1
                        continue
                    seqs.append(Seq(prompt + resp[i], [(len(prompt), len(prompt) + len(resp[i]))]))
                    keys.append((i, j))
                for (i, j), res in zip(keys, backend.score(seqs, token_logprobs=True, progress=bar)):
                    if res.status == "ok":
                        base.raw[(i, j)] = base.baseline[i] - distance(res.token_logprobs[0])
                    else:
                        base.pairs_failed += 1
                base.forwards += len(seqs)
        return base

    def utilities(self, texts, targets: np.ndarray, examples: list[np.ndarray], backend) -> Utilities:
        """Baselines, then the pairs of every measured target with its examples (pool positions);
        an example that is itself an unmeasured target is left out."""
        u = self.baselines(texts, targets, backend)
        bad = {i for i, st in u.status.items() if st != "ok"}
        todo = {int(i): np.array([j for j in exs if int(j) not in bad]) for i, exs in zip(targets, examples) if int(i) not in bad}
        return self.pair_utilities(texts, u, todo, backend)

    @staticmethod
    def neighbours(X: np.ndarray, rows: np.ndarray, among: np.ndarray, k: int) -> list[np.ndarray]:
        import faiss

        if len(among) == 0:
            return [among for _ in rows]
        index = faiss.IndexFlatIP(X.shape[1])
        index.add(np.ascontiguousarray(X[among]))
        _, nn = index.search(np.ascontiguousarray(X[rows]), min(k, len(among)))
        return [among[r[r >= 0]] for r in nn]

    def dense_forwards(self, n_targets: int, n_refs: int) -> int:
        """Forwards of the dense kernel: a baseline per target, then every (target, example) pair."""
        pairs_per_target = n_targets - (1 if self.params.mask_diagonal else 0) + n_refs
        return n_targets * (1 + pairs_per_target)

    # -- selection ----------------------------------------------------------------------------------
    def select(self, pool: Pool) -> StepResult:
        p = self.params
        n = len(pool)
        src = np.array(pool.sources if pool.sources is not None else [None] * n, dtype=object)  # a list or a numpy array
        ref_source = {"flmi": p.query_source, "flcg": p.private_source}.get(p.stage)
        if p.stage != "facility_location" and not ref_source:
            raise ValueError(f"delift stage {p.stage} needs {'query_source' if p.stage == 'flmi' else 'private_source'}")
        special = (src == ref_source) if ref_source else np.zeros(n, dtype=bool)
        if ref_source and not special.any():
            raise ValueError(f"delift: no row of the pool comes from source '{ref_source}'")
        cands, refs = np.flatnonzero(~special), np.flatnonzero(special)
        dense = p.pairs == "all" or (p.pairs == "auto" and self.dense_forwards(len(cands), len(refs)) <= p.max_dense_forwards)

        texts, backend = pool.texts(), load_backend(LMParams.of(p))
        u = self.baselines(texts, cands, backend)
        valid = np.array([c for c in cands if u.status[int(c)] == "ok"], dtype=np.int64)
        if dense:
            examples = {int(i): np.concatenate([valid, refs]) for i in valid}
        else:
            X = np.ascontiguousarray(pool.embeddings, dtype=np.float32)
            near = zip(self.neighbours(X, valid, valid, p.n_neighbors), self.neighbours(X, valid, refs, p.n_neighbors))
            examples = {int(i): np.concatenate([c, r]) for i, (c, r) in zip(valid, near)}
        u = self.pair_utilities(texts, u, examples, backend)

        pos = {int(c): a for a, c in enumerate(valid)}
        diagonal = {(i, i) for i in pos} if p.mask_diagonal else set()
        U, u_info = scaled_kernel(u.raw, pos, pos, diagonal)
        R, r_info = scaled_kernel(u.raw, pos, {int(r): a for a, r in enumerate(refs)})
        if p.stage == "flmi":
            obj = FacilityLocation(DenseKernel(U), cap=p.eta * R.max(axis=1))
        elif p.stage == "flcg":
            obj = FacilityLocation(DenseKernel(U), initial=p.nu * R.max(axis=1))
        else:
            obj = FacilityLocation(DenseKernel(U))
        k = min(p.resolve_budget(pool), len(valid))
        res = maximize(obj, k, "lazy")

        keep = np.zeros(n, dtype=bool)
        rank = np.full(n, -1, dtype=np.int64)
        picked = valid[res.ranking]
        keep[picked] = True
        rank[picked] = np.arange(len(picked))
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        last = res.gains[-1] if len(res.gains) else float("nan")
        for i in np.flatnonzero(~keep):
            if special[i]:
                reason[i], detail[i] = (("query_set" if p.stage == "flmi" else "private_set"),
                                        f"in the {p.stage} reference set ({ref_source})")
            elif u.status[int(i)] != "ok":
                reason[i], detail[i] = u.status[int(i)], u.detail[int(i)]
            else:
                reason[i], detail[i] = "low_gain", f"not among the {len(picked)} picks of DELIFT {p.stage} (last gain {fmt(last)})"
        gain_col = np.full(n, np.nan)
        gain_col[picked] = res.gains
        statuses = list(u.status.values())
        stats = {"budget": k, "stage": p.stage, "pairs": "all" if dense else "neighbors", "forwards": u.forwards,
                 "represented": len(valid), "skipped_too_long": statuses.count("skipped_too_long"), "error": statuses.count("error"),
                 "pairs_too_long": u.pairs_too_long, "pairs_failed": u.pairs_failed, "utilities": len(u.raw),
                 "utility_range": u_info["range"], "unknown_entries": u_info["unknown"], "unknown_value": u_info["unknown_value"],
                 "value": float(obj.value())}
        if not dense:
            stats["n_neighbors"] = p.n_neighbors
        if len(refs):
            stats.update(reference_utility_range=r_info["range"], reference_unknown_entries=r_info["unknown"],
                         reference_unknown_value=r_info["unknown_value"])
        return StepResult(keep, rank, "not_selected", reason, detail, stats, columns={"gain": gain_col})
