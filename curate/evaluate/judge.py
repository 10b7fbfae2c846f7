"""Pairwise judging with position swap.

Each eval row is judged twice: (A = the model's answer, B = the reference) and (A = the reference,
B = the model's answer). Two ways to get a verdict (``judge.mode``):

- ``verdict_token`` (default): the judge is asked for the verdict only and its reply is prefilled
  with ``[[``; the verdict is the most probable of the next tokens ``A``, ``B``, ``C`` (tie) — one
  forward per comparison through the backend's rating-token path (methods.md E6b), no text to
  parse, so a small local judge always gives a verdict; the three probabilities are kept.
- ``generate``: the judge reasons in free text (the call engine: batched, cached) and the last
  ``[[A]]``/``[[B]]``/``[[C]]`` in its reply is the verdict; a reply without one is ``parse_failed``.

Per order the model scores 1 (its answer preferred), 0.5 (tie) or 0; a row's score is the mean over
the two orders, so a judge that always picks the first position scores every row 0.5 (the bias
cancels). In ``verdict_token`` mode ``soft_win_rate`` averages the probability-weighted points
(P(model preferred) + ½ P(tie), both orders) instead: it keeps the preference a position-biased
judge still shows. ``win_rate`` = the mean row score over rows with both orders judged (ties count half);
``consistent`` = the share of those rows whose two verdicts agree once the swap is undone;
``first_position_rate`` = the share of verdicts that picked answer A (0.5 = no position bias).
"""

from __future__ import annotations

import re
from typing import Any

from curate.lm.calls import Call, CallEngine, Decoding
from curate.prompts import PAIRWISE_JUDGE, PAIRWISE_JUDGE_SYSTEM, PAIRWISE_JUDGE_SYSTEM_VERDICT

VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
PREFILL = "[["


def judge_messages(question: str, a: str, b: str, mode: str) -> list[dict[str, str]]:
    system = PAIRWISE_JUDGE_SYSTEM_VERDICT if mode == "verdict_token" else PAIRWISE_JUDGE_SYSTEM
    return [{"role": "system", "content": system.text},
            {"role": "user", "content": PAIRWISE_JUDGE.text.format(question=question, answer_a=a, answer_b=b)}]


def prompt_refs(mode: str) -> list[dict[str, str]]:
    system = PAIRWISE_JUDGE_SYSTEM_VERDICT if mode == "verdict_token" else PAIRWISE_JUDGE_SYSTEM
    return [system.ref(), PAIRWISE_JUDGE.ref()]


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
        replies = CallEngine(backend, calls_dir).run([Call(m, PAIRWISE_JUDGE.ref(), decoding) for m in pairs])
        # a judgment cut by max_tokens may stop before its verdict, or mid-way through a later one: not read
        results = [{"verdict": verdict(r.text) if r.status == "ok" else None, "reply": r.text, "status": r.status} for r in replies]
    out = []
    for k in range(len(items)):
        first, second = results[2 * k], results[2 * k + 1]
        soft = [_soft(first, True), _soft(second, False)]
        out.append({"verdict_model_first": first["verdict"], "verdict_model_second": second["verdict"],
                    "soft_points": sum(soft) / 2 if None not in soft else None,
                    "points_model_first": model_points(first["verdict"], True), "points_model_second": model_points(second["verdict"], False),
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
            raise ValueError(f"the judge's tokenizer does not split {PREFILL + letter!r} into {PREFILL!r} + one token; use judge.mode: generate")
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


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Win rate and bias statistics over judged rows (see the module docstring)."""
    both = [r for r in rows if r["points_model_first"] is not None and r["points_model_second"] is not None]
    verdicts = [v for r in rows for v in (r["verdict_model_first"], r["verdict_model_second"]) if v is not None]
    row_points = [(r["points_model_first"] + r["points_model_second"]) / 2 for r in both]
    wins = sum(1 for p in row_points if p > 0.5)
    losses = sum(1 for p in row_points if p < 0.5)
    return {
        "n_rows": len(rows),
        "n_judged": len(both),
        "n_parse_failed": sum(1 for r in rows for k in ("verdict_model_first", "verdict_model_second") if r[k] is None),
        "win_rate": sum(row_points) / len(both) if both else None,
        "wins": wins, "ties": len(both) - wins - losses, "losses": losses,
        "consistent": sum(1 for r in both if r["points_model_first"] == r["points_model_second"]) / len(both) if both else None,
        "first_position_rate": sum(1 for v in verdicts if v == "A") / len(verdicts) if verdicts else None,
        "soft_win_rate": sum(soft) / len(soft) if (soft := [r["soft_points"] for r in rows if r.get("soft_points") is not None]) else None,
    }
