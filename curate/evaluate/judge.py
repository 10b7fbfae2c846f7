"""Pairwise judging with position swap, the judge's validity, and the reported rates.

Each eval row is judged twice: (A = the model's answer, B = the reference) and (A = the reference,
B = the model's answer). Two ways to get a verdict (``judge.mode``):

- ``verdict_token`` (default): the judge is asked for the verdict only (system and user prompt alike)
  and its reply is prefilled with ``[[``; the verdict is the most probable of the next tokens ``A``,
  ``B``, ``C`` (tie) — one forward per comparison through the backend's rating-token path (methods.md
  E6b), no text to parse; the three probabilities (of the whole vocabulary's distribution) are kept.
- ``generate``: the judge reasons in free text (the call engine: batched, cached) and the last
  ``[[A]]``/``[[B]]``/``[[C]]`` in its reply is the verdict; a reply without one is ``parse_failed``.

Per order the model scores 1 (its answer preferred), 0.5 (tie) or 0; a row's points are the mean over
the two orders. :func:`summarise` reports, over the rows judged in both orders:

- the judge's checks: ``first_position_rate`` (the share of decisive verdicts, A or B, that picked
  the answer shown first; 0.5 = no position bias), ``consistent`` (the share of rows whose two
  verdicts agree once the swap is undone) and, in verdict_token mode, ``verdict_mass`` (the mean
  probability the three verdict tokens hold together). :func:`validity` compares them with the
  thresholds (``judge.validity``); a judge that fails is ``valid: false`` with its ``invalid_reasons``.
- only when the judge is valid: ``win_rate`` (mean row points, ties half), ``soft_win_rate``
  (verdict_token: P(model preferred) + ½ P(tie), renormalised over A/B/C, averaged over both orders)
  and their length-controlled versions ``lc_win_rate`` / ``lc_soft_win_rate``
  (:func:`curate.evaluate.stats.length_controlled_win_rate`, on the answers' lengths in characters).
  Otherwise they are null: an always-first judge would score every row 0.5, which is no finding.
- ``se`` (standard error: of a mean for the win rates and ``consistent``, delta-method for the
  ratio ``first_position_rate``, the bootstrap standard deviation for the length-controlled rates) and
  ``ci95`` (percentile bootstrap over the judged rows, the same seeded resamples for every rate).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from curate.evaluate import stats
from curate.lm.calls import Call, CallEngine, Decoding
from curate.prompts import PAIRWISE_JUDGE, PAIRWISE_JUDGE_SYSTEM, PAIRWISE_JUDGE_SYSTEM_VERDICT, PAIRWISE_JUDGE_VERDICT

VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
PREFILL = "[["


def _prompts(mode: str):
    """(system, user) prompts: verdict_token asks for the verdict only in both; generate for reasons in both."""
    if mode == "verdict_token":
        return PAIRWISE_JUDGE_SYSTEM_VERDICT, PAIRWISE_JUDGE_VERDICT
    return PAIRWISE_JUDGE_SYSTEM, PAIRWISE_JUDGE


def judge_messages(question: str, a: str, b: str, mode: str) -> list[dict[str, str]]:
    system, user = _prompts(mode)
    return [{"role": "system", "content": system.text},
            {"role": "user", "content": user.text.format(question=question, answer_a=a, answer_b=b)}]


def prompt_refs(mode: str) -> list[dict[str, str]]:
    return [p.ref() for p in _prompts(mode)]


def verdict(text: str | None) -> str | None:
    """``A``, ``B``, ``C`` (tie) from the last verdict marker in ``text``; None when there is none."""
    found = VERDICT.findall(text or "")
    return found[-1] if found else None


def model_points(v: str | None, model_is_a: bool) -> float | None:
    if v is None:
        return None
    if v == "C":
        return 0.5
    return 1.0 if (v == "A") == model_is_a else 0.0


def judge_pairs(backend, mode: str, decoding: Decoding, items: list[tuple[str, str, str]], calls_dir=None) -> list[dict[str, Any]]:
    """One judged row per (question, model answer, reference): both orders' verdicts, points and evidence."""
    pairs = []
    for q, answer, ref in items:
        pairs.append(judge_messages(q, answer, ref, mode))
        pairs.append(judge_messages(q, ref, answer, mode))
    if mode == "verdict_token":
        results = _verdict_tokens(backend, pairs)
    else:
        replies = CallEngine(backend, calls_dir).run([Call(m, _prompts(mode)[1].ref(), decoding) for m in pairs])
        # a judgment cut by max_tokens may stop before its verdict, or mid-way through a later one: not read
        results = [{"verdict": verdict(r.text) if r.status == "ok" else None, "reply": r.text, "status": r.status} for r in replies]
    out = []
    for k in range(len(items)):
        first, second = results[2 * k], results[2 * k + 1]
        soft = [_soft(first, True), _soft(second, False)]
        out.append({"verdict_model_first": first["verdict"], "verdict_model_second": second["verdict"],
                    "soft_points": sum(soft) / 2 if None not in soft else None,
                    "points_model_first": model_points(first["verdict"], True),
                    "points_model_second": model_points(second["verdict"], False),
                    "model_first": first, "model_second": second})
    return out


def _soft(result: dict[str, Any], model_is_a: bool) -> float | None:
    """Probability-weighted points of one order (verdict_token mode): P(model preferred) + ½ P(tie),
    over the three verdict tokens."""
    p = result.get("probs")
    if not p:
        return None
    total = p["A"] + p["B"] + p["C"]
    return ((p["A"] if model_is_a else p["B"]) + 0.5 * p["C"]) / total if total > 0 else None


def _verdict_tokens(backend, conversations: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
    from curate.lm.hf import chat_prompt_ids

    tok = backend.tokenizer
    letters = ("A", "B", "C")
    candidates = []
    for letter in letters:
        ids = tok(PREFILL + letter, add_special_tokens=False)["input_ids"]
        base = tok(PREFILL, add_special_tokens=False)["input_ids"]
        if ids[: len(base)] != base or len(ids) != len(base) + 1:
            raise ValueError(f"the judge's tokenizer does not split {PREFILL + letter!r} into {PREFILL!r} + one token; "
                             "use judge.mode: generate")
        candidates.append(ids[-1])
    prompts = [chat_prompt_ids(tok, conv, PREFILL) for conv in conversations]
    out = []
    for nt in backend.next_token(prompts, candidates):
        if nt.status != "ok":
            out.append({"verdict": None, "status": nt.status, "error": nt.message})
            continue
        p = nt.probs
        out.append({"verdict": letters[int(p.argmax())], "status": "ok", "probs": {k: float(v) for k, v in zip(letters, p)}})
    return out


def verdict_mass(result: dict[str, Any]) -> float | None:
    """P(A) + P(B) + P(C) of one comparison (verdict_token mode), else None."""
    p = result.get("probs")
    return p["A"] + p["B"] + p["C"] if p else None


def validity(s: dict[str, Any], thresholds) -> list[str]:
    """The reasons a judgment set fails ``thresholds`` (:class:`curate.evaluate.spec.JudgeValidity`), in words; [] = valid."""
    reasons = []
    if not s["n_judged"]:
        return ["no row was judged in both orders"]
    fpr, lo, hi = s["first_position_rate"], 0.5 - thresholds.max_position_bias, 0.5 + thresholds.max_position_bias
    if fpr is not None and not lo <= fpr <= hi:
        reasons.append(f"position bias: {fpr:.0%} of its decisive verdicts picked the answer shown first (allowed {lo:.0%}–{hi:.0%})")
    if s["consistent"] < thresholds.min_consistent:
        reasons.append(f"inconsistent: {s['consistent']:.0%} of the rows got the same verdict after the answers were swapped "
                       f"(at least {thresholds.min_consistent:.0%} required)")
    mass = s.get("verdict_mass")
    if mass is not None and mass < thresholds.min_verdict_mass:
        reasons.append(f"verdict tokens unlikely: A, B and C held {mass:.0%} of its next-token probability on average "
                       f"(at least {thresholds.min_verdict_mass:.0%} required)")
    return reasons


RATES = ("win_rate", "soft_win_rate", "lc_win_rate", "lc_soft_win_rate")


def summarise(rows: list[dict[str, Any]], thresholds=None, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Checks, validity, rates, standard errors and intervals over judged rows (see the module
    docstring). A row may carry ``answer_chars`` / ``reference_chars`` (the two answers' lengths)
    for the length-controlled rates."""
    from curate.evaluate.spec import JudgeValidity

    thresholds = thresholds or JudgeValidity()
    both = [r for r in rows if r["points_model_first"] is not None and r["points_model_second"] is not None]
    n = len(both)
    points = np.array([(r["points_model_first"] + r["points_model_second"]) / 2 for r in both], dtype=float)
    agree = np.array([r["points_model_first"] == r["points_model_second"] for r in both], dtype=float)
    # per row: how many of its two verdicts were decisive (A or B), and how many of those picked A
    first = np.array([sum(v == "A" for v in (r["verdict_model_first"], r["verdict_model_second"])) for r in both], dtype=float)
    decisive = np.array([sum(v in ("A", "B") for v in (r["verdict_model_first"], r["verdict_model_second"])) for r in both], dtype=float)
    soft_rows = [r for r in both if r.get("soft_points") is not None]
    soft = np.array([r["soft_points"] for r in soft_rows], dtype=float)
    masses = [m for r in both for o in ("model_first", "model_second") if (m := verdict_mass(r.get(o) or {})) is not None]
    wins, losses = int((points > 0.5).sum()), int((points < 0.5).sum())
    s: dict[str, Any] = {
        "n_rows": len(rows), "n_judged": n,
        "n_parse_failed": sum(1 for r in rows for k in ("verdict_model_first", "verdict_model_second") if r[k] is None),
        "wins": wins, "ties": n - wins - losses, "losses": losses,
        "n_decisive": int(decisive.sum()),
        "first_position_rate": float(first.sum() / decisive.sum()) if decisive.sum() else None,
        "consistent": float(agree.mean()) if n else None,
        "verdict_mass": float(np.mean(masses)) if masses else None,
    }
    idx = stats.bootstrap_rows(n, n_resamples, seed)
    se: dict[str, float | None] = {"consistent": stats.sem(agree), "first_position_rate": stats.ratio_se(first, decisive)}
    ci: dict[str, list[float] | None] = {
        "consistent": stats.interval(idx, lambda i: float(agree[i].mean())),
        "first_position_rate": stats.interval(idx, lambda i: float(first[i].sum() / decisive[i].sum()) if decisive[i].sum() else None)}
    reasons = validity(s, thresholds)
    s["valid"] = not reasons
    s["invalid_reasons"] = reasons
    s["validity"] = thresholds.model_dump()
    for k in RATES:
        s[k] = se[k] = ci[k] = None
    if s["valid"]:
        s["win_rate"] = float(points.mean())
        se["win_rate"] = stats.sem(points)
        ci["win_rate"] = stats.interval(idx, lambda i: float(points[i].mean()))
        if len(soft_rows) == n and n:  # every judged row has probabilities (verdict_token mode): the same resamples
            s["soft_win_rate"] = float(soft.mean())
            se["soft_win_rate"] = stats.sem(soft)
            ci["soft_win_rate"] = stats.interval(idx, lambda i: float(soft[i].mean()))
        if all(r.get("answer_chars") is not None and r.get("reference_chars") is not None for r in both):
            lm = np.array([r["answer_chars"] for r in both], dtype=float)
            lr = np.array([r["reference_chars"] for r in both], dtype=float)
            for key, values in (("lc_win_rate", points), ("lc_soft_win_rate", soft if s["soft_win_rate"] is not None else None)):
                if values is None:
                    continue
                fit = stats.length_controlled_win_rate(values, lm, lr)
                if fit is None:
                    continue
                s[key], C = fit
                boot = [stats.length_controlled_win_rate(values[i], lm[i], lr[i], C=C) for i in idx]
                boot_rates = [b[0] if b else None for b in boot]
                ci[key] = stats.percentile_interval(boot_rates)
                defined = [b for b in boot_rates if b is not None]
                se[key] = float(np.std(defined, ddof=1)) if len(defined) >= 2 else None
    s["se"], s["ci95"] = se, ci
    s["bootstrap"] = {"n_resamples": len(idx), "seed": seed}
    return s
