"""DELIFT — utility-kernel submodular selection (methods.md B5).

The utility of candidate j for target i is how much showing j as a one-shot example brings the
model's prediction of i's reference answer closer to certainty, teacher-forced through the masked-CE
engine:

- ``d(i | ctx) = ‖p − 1‖₂ / √T`` over the T target positions (i's response tokens and the final EOS),
  ``p_t`` = the model's probability of the true token;
- sequences are ``tok(prompt) + [EOS] + tok(y_i) + [EOS]`` with our wrappers (:data:`DELIFT_NO_ICL`,
  :data:`DELIFT_ICL`), no BOS, as the reference's HF path;
- ``u_ij = d(i | no example) − d(i | example j)``, min-max scaled over the computed entries to [0, 1].

Only each target's ``n_neighbors`` nearest candidates by embedding are tried (the diagonal included,
``mask_diagonal`` to drop it), so the cost is n·(k + 1) forwards, not n² — the number is recorded.
The kernel (rows = targets, columns = candidates) then drives the stage's objective with lazy greedy:
``facility_location`` (instruction tuning), ``flmi`` against a query set (task-specific: targets are
the query rows) or ``flcg`` against a private set (continual: candidates that add what the existing
data does not cover). Long examples are cut (the example's response, then its query) so the target's
query and response stay whole (E4).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from curate.lm import LMParams, Seq, load_backend
from curate.progress import stage_progress
from curate.prompts import DELIFT_ICL, DELIFT_NO_ICL
from curate.select.base import BudgetParams, Pool, Selector, StepResult, fmt
from curate.select.submodular import DenseKernel, FacilityLocation, maximize


def distance(token_logprobs: np.ndarray) -> float:
    """‖p − 1‖₂ / √T for the true-token probabilities p; 0 when T = 0."""
    if len(token_logprobs) == 0:
        return 0.0
    p = np.exp(token_logprobs.astype(np.float64))
    return float(np.linalg.norm(p - 1) / np.sqrt(len(p)))


class DeliftParams(BudgetParams, LMParams):
    stage: Literal["facility_location", "flmi", "flcg"] = "facility_location"
    query_source: str | None = Field(None, description="flmi: rows from this source are the query (target) set.")
    private_source: str | None = Field(None, description="flcg: rows from this source are the existing (private) data.")
    n_neighbors: int = Field(8, gt=0, description="Candidates tried per target (nearest by embedding).")
    mask_diagonal: bool = False
    max_length: int = Field(1024, gt=16)
    eta: float = Field(1.0, gt=0)
    nu: float = Field(1.0, ge=0)


class Delift(Selector):
    method = "delift"
    needs_embeddings = True

    class Params(DeliftParams):
        pass

    def utilities(self, texts, targets: np.ndarray, examples: list[np.ndarray], backend):
        """Raw utilities: {(target, example): u} for each target and its example rows (pool
        positions), and the number of forwards (one baseline per target plus one per pair)."""
        p = self.params
        tok = backend.tokenizer
        eos = tok.eos_token_id

        def enc(text):
            return tok(text, add_special_tokens=False)["input_ids"]

        seqs, keys = [], []
        for i, exs in zip(targets, examples):
            x_i, y_i = texts[i]
            resp = enc(y_i) + [eos]
            base_prompt = enc(DELIFT_NO_ICL.text.format(query=x_i)) + [eos]
            room = p.max_length - len(resp)
            if len(base_prompt) > room:
                continue  # the target's own query and response do not fit: no utilities for it
            seqs.append(Seq(base_prompt + resp, [(len(base_prompt), len(base_prompt) + len(resp))]))
            keys.append((int(i), -1))
            shell = len(enc(DELIFT_ICL.text.format(example_query="", example_response="", query=x_i))) + 1
            for j in exs:
                if p.mask_diagonal and j == i:
                    continue
                x_j, y_j = texts[j]
                ex_q, ex_r = enc(x_j), enc(y_j)
                over = shell + len(ex_q) + len(ex_r) - room
                if over > 0:  # cut the example: its response first, then its query
                    cut_r = min(over, len(ex_r))
                    ex_r = ex_r[: len(ex_r) - cut_r]
                    ex_q = ex_q[: max(0, len(ex_q) - (over - cut_r))]
                prompt = enc(DELIFT_ICL.text.format(example_query=tok.decode(ex_q), example_response=tok.decode(ex_r), query=x_i)) + [eos]
                prompt = prompt[: max(1, room)]
                seqs.append(Seq(prompt + resp, [(len(prompt), len(prompt) + len(resp))]))
                keys.append((int(i), int(j)))
        with stage_progress("select delift utilities", len(seqs)) as bar:
            results = backend.score(seqs, token_logprobs=True, progress=bar)
        base: dict[int, float] = {}
        icl: list[tuple[int, int, float]] = []
        for (i, j), res in zip(keys, results):
            if res.status != "ok":
                continue
            d = distance(res.token_logprobs[0])
            if j < 0:
                base[i] = d
            else:
                icl.append((i, j, d))
        return {(i, j): base[i] - d for i, j, d in icl if i in base}, len(seqs)

    @staticmethod
    def neighbours(X: np.ndarray, rows: np.ndarray, among: np.ndarray, k: int) -> list[np.ndarray]:
        import faiss

        index = faiss.IndexFlatIP(X.shape[1])
        index.add(np.ascontiguousarray(X[among]))
        _, nn = index.search(np.ascontiguousarray(X[rows]), min(k, len(among)))
        return [among[r[r >= 0]] for r in nn]

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        n = len(pool)
        src = np.array(pool.sources or [None] * n, dtype=object)
        ref_source = {"flmi": p.query_source, "flcg": p.private_source}.get(p.stage)
        if p.stage != "facility_location" and not ref_source:
            raise ValueError(f"delift stage {p.stage} needs {'query_source' if p.stage == 'flmi' else 'private_source'}")
        special = (src == ref_source) if ref_source else np.zeros(n, dtype=bool)
        if ref_source and not special.any():
            raise ValueError(f"delift: no row of the pool comes from source '{ref_source}'")
        cands = np.flatnonzero(~special)
        refs = np.flatnonzero(special)
        X = np.ascontiguousarray(pool.embeddings, dtype=np.float32)
        examples = self.neighbours(X, cands, cands, p.n_neighbors)
        if len(refs):  # utilities of the reference rows as examples for each candidate target
            examples = [np.concatenate([e, r]) for e, r in zip(examples, self.neighbours(X, cands, refs, p.n_neighbors))]
        raw, forwards = self.utilities(pool.texts(), cands, examples, load_backend(LMParams.of(p)))
        pos = {int(c): a for a, c in enumerate(cands)}
        ref_pos = {int(r): a for a, r in enumerate(refs)}
        vals = np.array(list(raw.values())) if raw else np.zeros(0)
        lo, hi = (vals.min(), vals.max()) if len(vals) else (0.0, 1.0)

        def scale(u):  # one global min-max over every computed utility
            return (u - lo) / (hi - lo) if hi > lo else 1.0

        U = np.zeros((len(cands), len(cands)), dtype=np.float32)
        R = np.zeros((len(cands), max(1, len(refs))), dtype=np.float32)
        for (i, j), u in raw.items():
            if j in pos:
                U[pos[i], pos[j]] = scale(u)
            else:
                R[pos[i], ref_pos[j]] = scale(u)
        if p.stage == "flmi":
            obj = FacilityLocation(DenseKernel(U), cap=p.eta * R.max(axis=1))
        elif p.stage == "flcg":
            obj = FacilityLocation(DenseKernel(U), initial=p.nu * R.max(axis=1))
        else:
            obj = FacilityLocation(DenseKernel(U))
        k = min(p.resolve_budget(pool), len(cands))
        res = maximize(obj, k, "lazy")
        keep = np.zeros(n, dtype=bool)
        rank = np.full(n, -1, dtype=np.int64)
        picked = cands[res.ranking]
        keep[picked] = True
        rank[picked] = np.arange(len(picked))
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        last = res.gains[-1] if len(res.gains) else float("nan")
        for i in np.flatnonzero(~keep):
            if special[i]:
                reason[i], detail[i] = ("query_set" if p.stage == "flmi" else "private_set"), f"in the {p.stage} reference set ({ref_source})"
            else:
                reason[i], detail[i] = "low_gain", f"not among the {len(picked)} picks of DELIFT {p.stage} (last gain {fmt(last)})"
        gain_col = np.full(n, np.nan)
        gain_col[picked] = res.gains
        stats = {"budget": k, "stage": p.stage, "forwards": forwards, "utilities": len(raw), "n_neighbors": p.n_neighbors,
                 "utility_range": [float(lo), float(hi)], "value": float(obj.value())}
        return StepResult(keep, rank, "not_selected", reason, detail, stats, columns={"gain": gain_col})
