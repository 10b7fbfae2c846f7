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
