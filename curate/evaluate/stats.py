"""Standard errors, bootstrap intervals and AlpacaEval 2's length-controlled win rate.

Everything here is plain numpy and deterministic: the same values and seed give the same numbers.

- :func:`sem`: the standard error of a mean (sample standard deviation, ``ddof=1``, over √n), as
  AlpacaEval reports ``standard_error``.
- :func:`ratio_se`: the linearised (delta-method) standard error of a ratio of sums, Σa / Σb (the
  token-weighted held-out loss, the share of decisive verdicts that picked position A); with every
  ``b`` = 1 it is :func:`sem`.
- :func:`bootstrap_rows`: ``n_resamples`` resamples of ``n`` row indices drawn with replacement from
  ``numpy.random.default_rng(seed)``. Every metric of one evaluation is computed on the same
  resamples, so the intervals are paired across metrics; an evaluation of another model on the same
  rows with the same seed draws the same resamples.
- :func:`percentile_interval`: the 2.5th and 97.5th percentiles of the resampled statistic (resamples
  where it is undefined are left out).
- :func:`length_controlled_win_rate`: the length-controlled win rate of Dubois et al. (2024),
  "Length-Controlled AlpacaEval", as the ``alpaca_eval`` package fits it (see the function).
- :func:`seed_row_bootstrap` / :func:`paired_difference`: a metric measured on the same eval rows
  under several training seeds (``curate compare``): its mean over the seeds and a 95% percentile
  bootstrap interval that resamples the eval rows and the seeds, each with replacement; for two
  arms, the interval of their difference with the same rows and seeds drawn for both (paired).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

#: the grid of inverse L1 strengths AlpacaEval's cross-validated fit searches (scikit-learn's default)
LC_CS = np.logspace(-4, 4, 10)
LC_FOLDS = 5


def sem(values: Sequence[float]) -> float | None:
    """Standard error of the mean (ddof=1); None below two values."""
    x = np.asarray(values, dtype=float)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) >= 2 else None


def ratio_se(num: Sequence[float], den: Sequence[float]) -> float | None:
    """Delta-method standard error of Σnum / Σden over rows (None below two rows or when Σden is 0)."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    n = len(a)
    if n < 2 or b.sum() == 0:
        return None
    r = a.sum() / b.sum()
    return float(math.sqrt(n / (n - 1) * float(np.sum((a - r * b) ** 2))) / b.sum())


def bootstrap_rows(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n)`` row indices drawn with replacement (numpy's default generator, ``seed``)."""
    if n == 0 or n_resamples == 0:
        return np.zeros((0, n), dtype=np.int64)
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def percentile_interval(values: Sequence[float | None]) -> list[float] | None:
    """[2.5th, 97.5th] percentile of the defined values; None when fewer than two are defined."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) < 2:
        return None
    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]


def interval(idx: np.ndarray, stat: Callable[[np.ndarray], float | None]) -> list[float] | None:
    """The 95% percentile interval of ``stat`` (a function of a row-index array) over the resamples."""
    if len(idx) == 0:
        return None
    return percentile_interval([stat(i) for i in idx])


# -- several seeds on the same eval rows (curate compare) ------------------------------------------


def seed_row_weights(n_seeds: int, n_rows: int, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n_resamples, n_seeds)`` and ``(n_resamples, n_rows)`` counts: how often each seed and each
    eval row is drawn in each resample (``n_seeds`` seeds and ``n_rows`` rows drawn with replacement,
    from ``numpy.random.default_rng(seed)``; rows first, then seeds). Empty when either is 0."""
    if n_seeds == 0 or n_rows == 0 or n_resamples == 0:
        return np.zeros((0, n_seeds)), np.zeros((0, n_rows))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_rows, size=(n_resamples, n_rows))
    seeds = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))

    def counts(idx: np.ndarray, n: int) -> np.ndarray:
        flat = idx + (np.arange(n_resamples) * n)[:, None]
        return np.bincount(flat.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(float)

    return counts(seeds, n_seeds), counts(rows, n_rows)


def _seed_ratios(num: np.ndarray, den: np.ndarray, row_w: np.ndarray) -> np.ndarray:
    """``(n_resamples, n_seeds)``: per resample and seed, Σ w·num / Σ w·den over the rows (NaN where Σ w·den is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (row_w @ num.T) / (row_w @ den.T)
    return np.where(np.isfinite(r), r, np.nan)


def _seed_mean(per_seed: np.ndarray, seed_w: np.ndarray) -> np.ndarray:
    """Mean over the drawn seeds (each counted as often as it was drawn)."""
    safe = np.where(seed_w > 0, per_seed, 0.0)
    undefined = ((seed_w > 0) & np.isnan(per_seed)).any(axis=1)
    out = (safe * seed_w).sum(axis=1) / seed_w.sum(axis=1)
    return np.where(undefined, np.nan, out)


def _check(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    num, den = np.atleast_2d(np.asarray(num, dtype=float)), np.atleast_2d(np.asarray(den, dtype=float))
    if num.shape != den.shape:
        raise ValueError(f"num and den differ in shape: {num.shape} vs {den.shape}")
    return num, den


def seed_row_bootstrap(num, den, n_resamples: int, seed: int) -> dict:
    """A ratio-of-sums metric measured under several seeds on the same rows.

    ``num``, ``den``: ``(n_seeds, n_rows)``; the metric under seed s is Σ_i num[s, i] / Σ_i den[s, i]
    (the token-weighted loss: num = a row's nats, den = its tokens; a mean of points: den = 1).
    Returns ``value`` (its mean over the seeds), ``per_seed`` and ``ci95``: the 2.5th and 97.5th
    percentiles of that mean over ``n_resamples`` resamples, each drawing the rows and the seeds with
    replacement (:func:`seed_row_weights`; None below two defined resamples). With one seed it is the
    plain row bootstrap."""
    num, den = _check(num, den)
    k, n = num.shape
    per_seed = _seed_ratios(num, den, np.ones((1, n)))[0] if n else np.full(k, np.nan)
    seed_w, row_w = seed_row_weights(k, n, n_resamples, seed)
    ci = percentile_interval(_seed_mean(_seed_ratios(num, den, row_w), seed_w).tolist()) if len(row_w) else None
    value = float(per_seed.mean()) if k and not np.isnan(per_seed).any() else None
    return {"value": value, "per_seed": [None if math.isnan(x) else float(x) for x in per_seed], "ci95": ci,
            "n_rows": n, "n_seeds": k, "n_resamples": len(row_w), "seed": seed}


def paired_difference(a_num, a_den, b_num, b_den, n_resamples: int, seed: int) -> dict:
    """Arm a minus arm b, paired: the same ``(n_seeds, n_rows)`` layout for both (row i and seed s of a
    measured on the same eval row and with the same training seed as those of b). ``difference``:
    the mean over seeds of (a's metric − b's metric) under each seed (the metric as in
    :func:`seed_row_bootstrap`); ``ci95``: its 95% percentile interval over resamples that draw the
    same rows and seeds for both arms; ``excludes_zero``: whether that interval lies wholly above or
    below 0 (False without an interval)."""
    a_num, a_den = _check(a_num, a_den)
    b_num, b_den = _check(b_num, b_den)
    if a_num.shape != b_num.shape:
        raise ValueError(f"the arms differ in shape: {a_num.shape} vs {b_num.shape}")
    k, n = a_num.shape
    ones = np.ones((1, n))
    point = (_seed_ratios(a_num, a_den, ones) - _seed_ratios(b_num, b_den, ones))[0] if n else np.full(k, np.nan)
    seed_w, row_w = seed_row_weights(k, n, n_resamples, seed)
    ci = None
    if len(row_w):
        diffs = _seed_ratios(a_num, a_den, row_w) - _seed_ratios(b_num, b_den, row_w)
        ci = percentile_interval(_seed_mean(diffs, seed_w).tolist())
    value = float(point.mean()) if k and not np.isnan(point).any() else None
    return {"difference": value, "per_seed": [None if math.isnan(x) else float(x) for x in point], "ci95": ci,
            "excludes_zero": bool(ci is not None and (ci[0] > 0 or ci[1] < 0)),
            "n_rows": n, "n_seeds": k, "n_resamples": len(row_w), "seed": seed}


# -- length-controlled win rate -----------------------------------------------------------------------


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _soft_cross_entropy(p: np.ndarray, z: np.ndarray) -> float:
    """Σ −[p log σ(z) + (1 − p) log(1 − σ(z))], computed stably."""
    return float(np.sum(p * np.logaddexp(0.0, -z) + (1 - p) * np.logaddexp(0.0, z)))


def fit_l1_logistic(X: np.ndarray, p: np.ndarray, C: float, tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """Weights minimising ‖w‖₁ + C · Σ soft cross-entropy(p, σ(X w)), no intercept (a constant column
    in ``X`` plays that part and is penalised like the others, as in AlpacaEval's fit). Proximal
    Newton: each step minimises the penalty plus the smooth part's second-order model (coordinate
    descent, to convergence), then backtracks until the objective decreases enough; it stops when a
    step moves no weight by more than ``tol``, so the optimum does not depend on a solver's loose
    tolerance."""
    m = X.shape[1]
    w = np.zeros(m)

    def objective(v: np.ndarray) -> float:
        return C * _soft_cross_entropy(p, X @ v) + float(np.abs(v).sum())

    f = objective(w)
    for _ in range(max_iter):
        s = _sigmoid(X @ w)
        g = C * (X.T @ (s - p))
        H = C * (X.T * (s * (1 - s))) @ X + 1e-12 * np.eye(m)
        u = w.copy()
        for _ in range(1000):  # coordinate descent on the quadratic model + ‖u‖₁
            moved = 0.0
            for j in range(m):
                c = g[j] + float(H[j] @ (u - w)) - H[j, j] * (u[j] - w[j])
                z = w[j] - c / H[j, j]
                new = math.copysign(max(abs(z) - 1.0 / H[j, j], 0.0), z)
                moved = max(moved, abs(new - u[j]))
                u[j] = new
            if moved <= 1e-15 * max(1.0, float(np.abs(u).max())):
                break
        d = u - w
        decrease = float(g @ d) + float(np.abs(u).sum()) - float(np.abs(w).sum())  # ≤ 0: the model's predicted change
        if float(np.abs(d).max()) <= tol * max(1.0, float(np.abs(w).max())) or decrease > -1e-14 * max(1.0, f):
            break
        a = 1.0
        while True:
            cand = w + a * d
            fc = objective(cand)
            if fc <= f + 1e-4 * a * decrease or a < 1e-10:
                break
            a /= 2
        if fc > f:
            break
        w, f = cand, fc
    return w


def _lc_design(len_model: Sequence[float], len_ref: Sequence[float]) -> np.ndarray | None:
    d = np.asarray(len_ref, dtype=float) - np.asarray(len_model, dtype=float)
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    if not sd > 0:
        return None
    return np.column_stack([np.tanh(d / sd), np.ones_like(d)])


def lc_strength(X: np.ndarray, p: np.ndarray) -> float:
    """The C of :data:`LC_CS` with the lowest held-out soft cross-entropy (mean over the folds' means)
    in 5-fold cross-validation, rows dealt into folds from the last row on (row i in fold
    (n − 1 − i) mod 5: the folds scikit-learn's GroupKFold makes with one group per row)."""
    n = len(p)
    fold = (n - 1 - np.arange(n)) % LC_FOLDS
    losses = []
    for C in LC_CS:
        total = 0.0
        for k in range(LC_FOLDS):
            train, test = fold != k, fold == k
            w = fit_l1_logistic(X[train], p[train], float(C))
            q = np.clip(_sigmoid(X[test] @ w), 1e-15, 1 - 1e-15)
            total += float(-np.mean(p[test] * np.log(q) + (1 - p[test]) * np.log(1 - q)))
        losses.append(total / LC_FOLDS)
    return float(LC_CS[int(np.argmin(losses))])


def length_controlled_win_rate(points: Sequence[float], len_model: Sequence[float], len_ref: Sequence[float],
                               C: float | None = None) -> tuple[float, float] | None:
    """AlpacaEval 2's length-controlled win rate and the C it was fitted with; None below 5 rows or
    when every length difference is the same.

    The GLM: P(model preferred) = σ(θ + φ · tanh(Δ / sd(Δ))), Δ = reference length − model length in
    characters, fitted to the preferences ``points`` ∈ [0, 1] (ties ½; soft labels: each row counts as
    a win with weight p and a loss with weight 1 − p) with an L1 penalty whose strength is chosen
    by :func:`lc_strength` (or given as ``C``). The length-controlled win rate is the prediction at
    Δ = 0, σ(θ). This is the ``length_controlled_minimal`` GLM of the ``alpaca_eval`` package: its
    default ``length_controlled_v1`` adds an instruction-difficulty term estimated from the
    leaderboard's models on AlpacaEval's 805 prompts, which one model on another eval set cannot
    supply. tests/test_judge_validity.py checks the numbers against the package's on its own
    annotations."""
    p = np.asarray(points, dtype=float)
    if len(p) < LC_FOLDS:
        return None
    X = _lc_design(len_model, len_ref)
    if X is None:
        return None
    C = lc_strength(X, p) if C is None else C
    w = fit_l1_logistic(X, p, C)
    return float(_sigmoid(w[1])), C
