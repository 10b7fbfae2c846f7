"""DS2 score curation and selection (methods.md A5 step 2 and B6).

LLM ratings are noisy labels. With the embeddings of the pool:

1. **HOC** — estimate the rating noise: over seeded rounds, sample rows, find each sampled row's two
   nearest neighbours (exact cosine, FAISS) and count label triples (self, 1st, 2nd); fit a clean
   prior ``p`` and a transition matrix ``T[a, b] = P(observed b | clean a)`` so that the predicted
   first-, second- and third-order consensus matches the counts (Adam, Frobenius norms, the best
   iterate after step 5).
2. **SimiFeat-rank** — over seeded epochs, score each sampled row's suspicion from its k
   neighbours' similarity-weighted votes and flag, per class, the most suspicious ``r_c`` share
   (``r_c`` from ``T`` and ``p``); a row flagged in most of the epochs that sampled it, whose suggested
   class (the neighbours' vote) wins with confidence ≥ ``confidence``, is corrected to it.
3. **Long-tail score** — ``lt = tanh(x/2)``, x = mean cosine distance to the k nearest other rows
   (higher = rarer; range [0, 0.7616]).
4. **Selection** — fill the budget from class 5 down; the class that overflows is ordered by the
   long-tail score (ties: input row).

Everything is seeded from the run seed (the reference is not). By default the pool is used once,
distances are fp32 and a row's neighbours exclude itself. ``match_reference: true`` reproduces the
reference's numerics (methods.md A5): the working set is the pool twice (rows 0..N−1, then copies
N..2N−1; HOC and SimiFeat run on all 2N, the first N keep their results), cosine distances are
computed and ranked in fp16, and the long-tail score is the mean of the k smallest distances *with*
the row itself (and its copy) among them, rounded to 4 decimals. The step's stats record the working
set size and the nearest-neighbour label agreement (which the copies inflate). Outputs per row: the
curated class, the confidence, whether it was flagged and corrected, and the long-tail score
(columns ``<step>.class_curated`` …).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field

from curate.select.base import BudgetParams, Pool, Selector, StepResult, fmt

K_CLASSES = 6


def _nearest_fp32(X: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distances, indices) of the kk nearest rows (self included), exact fp32 search (FAISS)."""
    import faiss

    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    sim, idx = index.search(X, kk)
    return 1.0 - sim, idx


def _nearest_fp16(X: np.ndarray, kk: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_nearest_fp32` with ``1 − cos`` computed and ranked in fp16 (the reference's CUDA
    kNN), in blocks of rows; distances are returned exactly as the fp16 values."""
    import torch

    E = torch.from_numpy(X).half()
    dists, idxs = [], []
    for s in range(0, len(E), block):
        d = 1 - E[s : s + block] @ E.T
        v, i = torch.topk(d, kk, dim=1, largest=False, sorted=True)
        dists.append(v.float().numpy())
        idxs.append(i.numpy())
    return np.concatenate(dists), np.concatenate(idxs)


def knn(X: np.ndarray, k: int, exclude_self: bool = True, fp16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distances 1 − cos, indices) of each row's k nearest rows among ``X`` (unit vectors),
    nearest first: (n, k) float and int arrays. ``fp16``: distances computed and ranked in fp16."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    kk = min(len(X), k + (1 if exclude_self else 0))
    d, idx = (_nearest_fp16 if fp16 else _nearest_fp32)(X, kk)
    if exclude_self:  # drop the row itself (ties with an exact duplicate: drop the first occurrence of self)
        rows = np.arange(len(X))[:, None]
        is_self = idx == rows
        first_self = np.where(is_self.any(1), is_self.argmax(1), kk - 1)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(len(X)), first_self] = False
        d = d[keep].reshape(len(X), kk - 1)
        idx = idx[keep].reshape(len(X), kk - 1)
    return np.clip(d, 0.0, 2.0), idx


def consensus(X: np.ndarray, y: np.ndarray, rounds: int, rng: np.random.Generator, cap: int = 50_000, fp16: bool = False) -> tuple:
    """Average first/second/third-order label agreement of (self, 1st NN, 2nd NN) over sampled rounds:
    c1 (K,), c2 (K, K), c3 (K, K, K) frequencies."""
    n = len(y)
    m = max(3, min(cap, int(0.9 * n)))
    c1, c2, c3 = np.zeros(K_CLASSES), np.zeros((K_CLASSES,) * 2), np.zeros((K_CLASSES,) * 3)
    for _ in range(rounds):
        idx = np.sort(rng.choice(n, size=min(m, n), replace=False))
        _, nn = knn(X[idx], 2, fp16=fp16)
        a, b, c = y[idx], y[idx][nn[:, 0]], y[idx][nn[:, 1]]
        np.add.at(c1, a, 1)
        np.add.at(c2, (a, b), 1)
        np.add.at(c3, (a, b, c), 1)
    total = rounds * min(m, n)
    return c1 / total, c2 / total, c3 / total


def fit_transition(c1, c2, c3, steps: int = 1501, lr: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """HOC: (T, p) minimising Σ_j ‖c_j − ĉ_j‖_F (Frobenius norms, not squared)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    K = len(c1)
    t_logits = (5 * torch.eye(K, dtype=torch.float64) - 1).requires_grad_(True)
    pi = (torch.full((K,), 1 / K, dtype=torch.float64) + torch.rand(K, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    C1, C2, C3 = (torch.as_tensor(c, dtype=torch.float64) for c in (c1, c2, c3))
    opt = torch.optim.Adam([t_logits, pi], lr=lr)
    best = (float("inf"), None, None)
    for step in range(steps):
        T = torch.softmax(t_logits, dim=1)
        p = torch.softmax(pi, dim=0)
        h1 = p @ T
        h2 = torch.einsum("a,ab,ac->bc", p, T, T)
        h3 = torch.einsum("a,ab,ac,ad->bcd", p, T, T, T)
        loss = torch.linalg.norm(C1 - h1) + torch.linalg.norm(C2 - h2) + torch.linalg.norm((C3 - h3).reshape(-1))
        if step > 5 and loss.item() < best[0]:
            best = (loss.item(), T.detach().numpy().copy(), p.detach().numpy().copy())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best[1], best[2]


@dataclass
class Curation:
    curated: np.ndarray  # (n,) int
    confidence: np.ndarray  # (n,) float
    flagged: np.ndarray  # (n,) bool: a detected error
    noise_rate: np.ndarray  # (K,)


def simifeat(X: np.ndarray, y: np.ndarray, T: np.ndarray, p: np.ndarray, epochs: int, k: int, rng: np.random.Generator,
             confidence: float = 0.5, cap: int = 50_000, fp16: bool = False) -> Curation:
    n = len(y)
    prior_obs = np.bincount(y, minlength=K_CLASSES) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        clean = np.where(prior_obs > 0, np.diag(T) * p / prior_obs, 1.0)
    r = 1.0 - np.minimum(clean, 1.0)
    r = np.where(r <= 0, 0.05, np.where(r >= 1, 0.95, r))
    flagged_count = np.zeros(n)
    sampled = np.zeros(n)
    votes_count = np.zeros((n, K_CLASSES))
    m = max(k + 2, min(cap, int(0.9 * n)))
    for _ in range(epochs):
        idx = np.sort(rng.choice(n, size=min(m, n), replace=False))
        d, nn = knn(X[idx], k - 1, fp16=fp16)  # k − 1 others + self
        self_d = np.clip(2 * d[:, 0] - d[:, 1], 0.0, 2.0)[:, None]
        dist = np.concatenate([self_d, d], axis=1)
        labels = np.concatenate([y[idx][:, None], y[idx][nn]], axis=1)
        v = np.zeros((len(idx), K_CLASSES))
        np.add.at(v, (np.repeat(np.arange(len(idx)), labels.shape[1]), labels.reshape(-1)), (1 - dist).reshape(-1))
        vn = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        yi = y[idx]
        susp = -np.log(vn[np.arange(len(idx)), yi] + 1e-8)
        sampled[idx] += 1
        for c in range(K_CLASSES):
            members = np.flatnonzero(yi == c)
            if not len(members):
                continue
            cut = np.percentile(susp[members], 100 * (1 - r[c]))
            flagged_count[idx[members[susp[members] >= cut]]] += 1
        votes_count[idx, np.argmax(v, axis=1)] += 1
    noisy_avg = (flagged_count + 1) / (sampled + 2)
    error = np.round(noisy_avg) == 1  # round half to even, as the reference: 0.5 is not an error
    probs = (votes_count + 1) / (votes_count.sum(1, keepdims=True) + K_CLASSES)
    probs[np.arange(n), y] = -1
    suggestion = probs.argmax(1)
    conf = probs.max(1) * noisy_avg
    curated = y.copy()
    change = error & (conf >= confidence)
    curated[change] = suggestion[change]
    return Curation(curated, np.where(error, conf, 0.0), error, r)


def long_tail(X: np.ndarray, k: int = 10, match_reference: bool = False) -> np.ndarray:
    """(n,) tanh(x/2), x = mean cosine distance to the k nearest other rows (higher = rarer).

    ``match_reference``: the reference's ``get_lr_score`` on its duplicated set — X twice, fp16
    distances, the k smallest *including* the row itself and its copy, rounded to 4 decimals; so
    x = (2/k)·Σ of the (k−2)/2 nearest distinct distances for an even k (0.8 × their mean for k = 10)."""
    if not match_reference:
        d, _ = knn(X, k)
        return np.tanh(d.mean(axis=1) / 2)
    d, _ = knn(np.concatenate([X, X]), k, exclude_self=False, fp16=True)
    return np.round(np.tanh(d[: len(X)].astype(np.float64).mean(axis=1) / 2), 4)


class DS2Select(Selector):
    method = "ds2"
    needs_embeddings = True

    class Params(BudgetParams):
        score: str = Field("ds2.class", description="The rating class 0..5 (the ds2 scorer's class output).")
        k: int = Field(10, ge=2, description="Neighbours for SimiFeat votes and the long-tail score.")
        hoc_rounds: int = Field(50, ge=1)
        hoc_steps: int = Field(1501, ge=10)
        epochs: int = Field(51, ge=1, description="SimiFeat-rank epochs.")
        confidence: float = Field(0.5, ge=0, le=1)
        curate: bool = Field(True, description="Correct confidently mis-rated rows before selecting.")
        match_reference: bool = Field(False, description="Reference numerics: the pool duplicated for curation and the "
                                      "long-tail score, fp16 distances, long-tail rounded to 4 decimals.")

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        y_raw = pool.score(p.score)
        n = len(pool)
        finite = np.isfinite(y_raw)
        y = np.where(finite, y_raw, 0).astype(np.int64)
        X = pool.embeddings
        stats: dict = {}
        curated = y.copy()
        conf = np.zeros(n)
        flagged = np.zeros(n, dtype=bool)
        if p.curate and finite.sum() > p.k + 2:
            rows = np.flatnonzero(finite)
            Xw, yw = X[rows], y[rows]
            if p.match_reference:  # the reference's working set: every row, then every row again
                Xw, yw = np.concatenate([Xw, Xw]), np.concatenate([yw, yw])
            rng = np.random.default_rng(self.seed(pool, "hoc"))
            c1, c2, c3 = consensus(Xw, yw, p.hoc_rounds, rng, fp16=p.match_reference)
            T, prior = fit_transition(c1, c2, c3, p.hoc_steps, seed=self.seed(pool, "hoc-init") % (2**31))
            cur = simifeat(Xw, yw, T, prior, p.epochs, p.k, np.random.default_rng(self.seed(pool, "simifeat")), p.confidence,
                           fp16=p.match_reference)
            m = len(rows)  # the original rows come first in the working set
            curated[rows], conf[rows], flagged[rows] = cur.curated[:m], cur.confidence[:m], cur.flagged[:m]
            stats.update(transition=[[round(float(v), 4) for v in row] for row in T], clean_prior=[round(float(v), 4) for v in prior],
                         noise_rate=[round(float(v), 4) for v in cur.noise_rate], flagged=int(flagged.sum()),
                         corrected=int((curated[rows] != y[rows]).sum()), working_rows=len(yw),
                         neighbour_agreement=round(float(np.trace(c2)), 4))
        lt = long_tail(X, p.k, p.match_reference)
        k = min(p.resolve_budget(pool, n_valid=int(finite.sum())), int(finite.sum()))
        cls = np.where(finite, curated, -1)
        order = np.lexsort((pool.rows, -lt, -cls))  # class desc, long-tail desc, row asc
        order = order[finite[order]]
        keep = np.zeros(n, dtype=bool)
        keep[order[:k]] = True
        rank = np.full(n, -1, dtype=np.int64)
        rank[order[:k]] = np.arange(k)
        cutoff_class = int(cls[order[k - 1]]) if k else None
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        for pos, i in enumerate(order[k:], start=k):
            reason[i] = "beyond_budget"
            was = f" (rated {y[i]}, curated with confidence {conf[i]:.2f})" if curated[i] != y[i] else ""
            detail[i] = f"class {cls[i]}{was}, long-tail {fmt(lt[i])}: rank {pos + 1}; budget {k} filled down to class {cutoff_class}"
        for i in np.flatnonzero(~finite):
            reason[i], detail[i] = "unscored", f"{p.score} is NaN (no rating)"
        stats.update(budget=k, match_reference=p.match_reference, cutoff_class=cutoff_class,
                     classes_before=np.bincount(y[finite], minlength=6).tolist(),
                     classes_after=np.bincount(curated[finite], minlength=6).tolist())
        cols = {"class_rated": np.where(finite, y, np.nan), "class_curated": np.where(finite, curated, np.nan),
                "confidence": conf, "flagged": flagged.astype(float), "long_tail": lt}
        return StepResult(keep, rank, "not_selected", reason, detail, stats, columns=cols)
