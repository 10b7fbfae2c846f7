"""SelectIT — uncertainty-aware self-reflection (methods.md A4).

Each model rates (instruction, response) from 1 to 5 through the next-token probabilities of the
digits, under R rating prompts (ours, :data:`curate.prompts.SELECTIT_LINES`; the layout puts the
rating line, a blank line, ``Instruction:``, ``Response:`` and the cue ``The answer is: ``):

- token level: ``p_k`` = full-vocabulary softmax at the digits; ``P'_k = p_k / Σ p``;
  ``S_base = argmax + 1``; uncertainty ``U = (K·P'_base − 1)/(K − 1)``; ``S_token = S_base · U``
  (K = 5, so S_token ∈ [0, 5]);
- sentence level: ``S_sent = mean_r S_token / (1 + α · std_r S_token)`` (population std, α = 0.2);
- model level: ``S = Σ_i θ_i/Σθ · S_sent,i`` over models of sizes θ_i.

``match_reference`` (``formula: reference``) reproduces the reference numerics: a softmax applied to
the renormalised probabilities (``q = softmax(P')``, so ``q_max ≤ e/(e+4)``) and the fixed model
weights 7/20, 13/20, 70/90 (exactly three models). The reference reads only the first turn
(``turns: first``); rows are never shifted — a failed row is NaN with its status.

Truncation (methods.md E4; the reference has none): a prompt over ``max_length`` tokens has its
instruction and response cut from their end (the longer first), never the rating line or the cue;
the row is ``truncated_ok`` with ``truncated_fields`` (any prompt, any model), or
``skipped_too_long`` when ``min_body_tokens`` each still does not fit.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.lm.spec import Runtime, auto_runtime
from curate.prompts import SELECTIT_LAYOUT, SELECTIT_LINES
from curate.scorers.base import Score
from curate.scorers.ratingbase import PromptScorer, RatingParams, TooLong
from curate.templates import split_turns

K = 5
DIGITS = [str(d) for d in range(1, K + 1)]
REFERENCE_WEIGHTS = (7 / 20, 13 / 20, 70 / 90)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    size: float = Field(gt=0, description="Parameters in billions (θ in the model-level weights).")


def token_level(p: np.ndarray, formula: str) -> tuple[float, float, float]:
    """(S_base, U, S_token) from the K full-vocabulary digit probabilities."""
    pr = np.asarray(p, dtype=np.float64)
    pr = pr / pr.sum()
    if formula == "reference":
        pr = np.exp(pr) / np.exp(pr).sum()
    base = int(np.argmax(pr))  # first maximum on ties
    u = float((K * pr[base] - 1) / (K - 1))
    return float(base + 1), u, float((base + 1) * u)


def sentence_level(s_token: list[float], alpha: float) -> float:
    v = np.asarray(s_token, dtype=np.float64)
    return float(v.mean() / (1 + alpha * v.std()))


def model_weights(sizes: list[float], formula: str) -> list[float]:
    if formula == "reference":
        if len(sizes) != 3:
            raise ValueError("the reference weights 7/20, 13/20, 70/90 need exactly three models")
        return list(REFERENCE_WEIGHTS)
    total = sum(sizes)
    return [s / total for s in sizes]


class SelectITParams(RatingParams):
    runtime: Runtime = auto_runtime()
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(model="smollm2-135m-instruct", size=0.135)])
    n_prompts: int = Field(5, ge=1, le=len(SELECTIT_LINES), description="R rating prompts (the first R of ours).")
    alpha: float = Field(0.2, ge=0)
    formula: Literal["paper", "reference"] = "paper"
    turns: Literal["first", "each"] = "first"

    @model_validator(mode="after")
    def _reference(self):
        if self.match_reference:
            self.formula = "reference"
        return self


class SelectITScorer(PromptScorer):
    method = "selectit"
    version = "1.1"
    outputs = {"selectit": "higher_is_better"}
    Params = SelectITParams
    batch_rows = 64
    collapse_std_floor = {"selectit": 0.01}

    def fingerprint(self) -> dict[str, Any]:
        p = self.params
        fp = self.base_fingerprint([SELECTIT_LAYOUT, *SELECTIT_LINES[: p.n_prompts]], [m.model for m in p.models])
        fp["weights"] = model_weights([m.size for m in p.models], p.formula)
        return fp

    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        p = self.params
        pairs = []  # (row, turn, instruction, response)
        for r_i, rec in enumerate(records):
            turns = split_turns(rec["messages"])[1]
            for t, (q, a) in enumerate(turns[:1] if p.turns == "first" else turns):
                pairs.append((r_i, t, q, a))
        weights = model_weights([m.size for m in p.models], p.formula)
        # per model: (pair, prompt) -> the K probabilities' NextToken (absent when the prompt does not fit)
        per_model, cut = [], {}
        for spec in p.models:
            ids, tail = self.digit_ids(SELECTIT_LAYOUT, DIGITS, False, spec.model,
                                       probe={"rating": SELECTIT_LINES[0].text, "instruction": "x", "response": "x"})
            prompts, where = [], []
            for k, (_, _, q, a) in enumerate(pairs):
                for r in range(p.n_prompts):
                    try:  # the rating line is fixed; the instruction and response are cut to fit
                        toks, fields = self.render(SELECTIT_LAYOUT, {"instruction": q, "response": a}, False, spec.model, tail=tail,
                                                   fixed={"rating": SELECTIT_LINES[r].text})
                    except TooLong:
                        continue
                    prompts.append(toks)
                    where.append((k, r))
                    cut.setdefault(k, set()).update(fields)
            res = self.backend(spec.model).next_token(prompts, ids) if prompts else []
            per_model.append(dict(zip(where, res)))
        out = []
        for r_i in range(len(records)):
            ks = [k for k, pr in enumerate(pairs) if pr[0] == r_i]
            out.append(self._row(ks, per_model, weights, sorted(set().union(*(cut.get(k, set()) for k in ks)))))
        return out

    def _row(self, ks: list[int], per_model: list[dict], weights: list[float], cut: list[str]) -> Score:
        """One row's score from its pairs ``ks``; ``cut``: the fields truncated in any of its prompts."""
        p = self.params
        comp: dict[str, Any] = {"formula": p.formula, "weights": weights, "models": [], "truncated_fields": cut}
        turn_scores = []
        for k in ks:
            s_models = []
            for m_i, table in enumerate(per_model):
                results = [table.get((k, r)) for r in range(p.n_prompts)]
                if any(res is None for res in results):
                    return Score.failed(self.outputs, "skipped_too_long", "TooLong", "a SelectIT prompt does not fit max_length")
                bad = next((res for res in results if res.status != "ok"), None)
                if bad is not None:
                    return Score.failed(self.outputs, bad.status, bad.error_class or "MissingDigit",
                                        bad.message or "rating digits unavailable")
                probs = [res.probs for res in results]
                levels = [token_level(pr, p.formula) for pr in probs]
                s_token = [lv[2] for lv in levels]
                s_sent = sentence_level(s_token, p.alpha)
                s_models.append(s_sent)
                comp["models"].append({"model": p.models[m_i].model, "turn": k, "p": [[float(x) for x in pr] for pr in probs],
                                       "S_token": s_token, "S_sent": s_sent})
            turn_scores.append(float(sum(w * s for w, s in zip(weights, s_models))))
        if not turn_scores:
            return Score.failed(self.outputs, "empty_response", "NoTurn", "no (instruction, response) pair")
        comp["per_turn"] = turn_scores
        return Score({"selectit": float(np.mean(turn_scores))}, "truncated_ok" if cut else "ok", components=comp)
