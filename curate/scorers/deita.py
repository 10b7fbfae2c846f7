"""deita complexity and quality (methods.md A6) and the EVOL score.

For each turn, independently and without history (the reference): complexity rates the user text,
quality rates the (user text, reply) pair. One forward per prompt reads the next-token logits of the
digits "1".."6" at the last position (E6b); the score is the expectation ``Σ s · softmax(z_digits)_s``
in [1, 6] (the softmax runs over the six digits only).

Two prompt formats:

- ``trained`` — the exact strings the released ``hkust-nlp/deita-complexity-scorer`` /
  ``deita-quality-scorer`` were fine-tuned on (attributed in :mod:`curate.prompts`), no chat template;
- ``chat`` — our prompts in a user message under the model's chat template, for any chat model
  (default: the bundled SmolLM2-135M-Instruct).

``auto`` picks ``trained`` for a model whose name contains "deita", else ``chat``.

Outputs per row: ``complexity`` and ``quality`` (means over turns), ``evol`` = ``Σ_t c_t · q_t``
(single-turn range [1, 36]); the per-turn values and the six raw logits per turn are in the
components. A digit the backend cannot provide gives NaN and ``fallback_needed`` (the reference's
3.0 only with ``match_reference``); it counts against ``runtime.max_error_rate``, and a shard where
more than 1% of the rows fall back gets a warning (``status_warn_share``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from curate.lm.spec import Runtime, auto_runtime
from curate.prompts import DEITA_COMPLEXITY, DEITA_COMPLEXITY_CHAT, DEITA_QUALITY, DEITA_QUALITY_CHAT
from curate.scorers.base import Score
from curate.scorers.ratingbase import PromptScorer, RatingParams, TooLong
from curate.templates import split_turns

DIGITS = ["1", "2", "3", "4", "5", "6"]


def expected_score(logits: np.ndarray) -> float:
    """Σ s · softmax(logits)_s over s = 1..6."""
    z = np.asarray(logits, dtype=np.float64)
    w = np.exp(z - z.max())
    w /= w.sum()
    return float((w * np.arange(1, len(z) + 1)).sum())


class DeitaParams(RatingParams):
    runtime: Runtime = auto_runtime()
    complexity_model: str | None = Field(None, description="Default: model (e.g. hkust-nlp/deita-complexity-scorer).")
    quality_model: str | None = Field(None, description="Default: model (e.g. hkust-nlp/deita-quality-scorer).")
    format: Literal["auto", "trained", "chat"] = "auto"


class DeitaScorer(PromptScorer):
    method = "deita"
    version = "1.0"
    outputs = {"complexity": "higher_is_better", "quality": "higher_is_better", "evol": "higher_is_better"}
    Params = DeitaParams
    batch_rows = 128
    collapse_std_floor = {"complexity": 0.05, "quality": 0.05}
    #: methods.md A6: warn when more than 1% of a shard falls back (the pipeline checks it per shard)
    status_warn_share = {"fallback_needed": 0.01}
    status_hints = {"fallback_needed": "a rating digit was not among the log-probabilities the backend returned (vllm/openai: "
                                       "the top 20): NaN, not the reference's 3.0; the hf backend reads every digit's logit"}

    def _model(self, kind: str) -> str:
        p = self.params
        return (p.complexity_model if kind == "complexity" else p.quality_model) or p.model

    def _chat(self, model: str) -> bool:
        f = self.params.format
        return f == "chat" or (f == "auto" and "deita" not in model.lower())

    def _prompt(self, kind: str, chat: bool):
        if kind == "complexity":
            return DEITA_COMPLEXITY_CHAT if chat else DEITA_COMPLEXITY
        return DEITA_QUALITY_CHAT if chat else DEITA_QUALITY

    def fingerprint(self) -> dict[str, Any]:
        models = [self._model("complexity"), self._model("quality")]
        prompts = [self._prompt(k, self._chat(self._model(k))) for k in ("complexity", "quality")]
        return self.base_fingerprint(prompts, models)

    def _rate(self, kind: str, fields_per_turn: list[dict[str, str]]):
        model = self._model(kind)
        chat = self._chat(model)
        prompt = self._prompt(kind, chat)
        ids, tail = self.digit_ids(prompt, DIGITS, chat, model)
        rendered, cut = [], []
        for f in fields_per_turn:
            try:
                r, c = self.render(prompt, f, chat, model, tail=tail)
            except TooLong:
                r, c = None, None
            rendered.append(r)
            cut.append(c)
        todo = [r for r in rendered if r is not None]
        results = iter(self.backend(model).next_token(todo, ids) if todo else [])
        return [(next(results) if r is not None else None, c) for r, c in zip(rendered, cut)]

    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        p = self.params
        per_row: list[list[tuple[str, str]]] = [split_turns(r["messages"])[1] for r in records]
        flat_c = [{"instruction": q} for turns in per_row for q, _ in turns]
        flat_q = [{"instruction": q, "output": a} for turns in per_row for q, a in turns]
        res_c = self._rate("complexity", flat_c)
        res_q = self._rate("quality", flat_q)
        out, k = [], 0
        for turns in per_row:
            rc, rq = res_c[k : k + len(turns)], res_q[k : k + len(turns)]
            k += len(turns)
            out.append(self._combine(rc, rq, p.match_reference))
        return out

    def _combine(self, rc, rq, match_reference: bool) -> Score:
        cs, qs, raw, status, cut = [], [], [], "ok", set()
        for (c, c_cut), (q, q_cut) in zip(rc, rq):
            if c is None or q is None:
                return Score.failed(self.outputs, "skipped_too_long", "TooLong", "a deita prompt does not fit max_length")
            if c.status == "error" or q.status == "error":
                bad = c if c.status == "error" else q
                return Score.failed(self.outputs, "error", bad.error_class or "error", bad.message or "scoring failed")
            cut.update(c_cut or []), cut.update(q_cut or [])
            values = []
            for r in (c, q):
                if r.status != "ok" or not np.isfinite(r.logits).all():
                    if not match_reference:
                        return Score.failed(self.outputs, "fallback_needed", "MissingDigit", "a rating digit's logit is unavailable")
                    values.append(3.0)  # the reference's fallback, reproduced only for parity runs
                else:
                    values.append(expected_score(r.logits))
            cs.append(values[0]), qs.append(values[1])
            raw.append({"complexity_logits": [float(x) for x in c.logits], "quality_logits": [float(x) for x in q.logits]})
        if cut:
            status = "truncated_ok"
        evol = float(sum(c * q for c, q in zip(cs, qs)))
        comp = {"complexity_per_turn": cs, "quality_per_turn": qs, "raw": raw, "truncated_fields": sorted(cut)}
        return Score({"complexity": float(np.mean(cs)), "quality": float(np.mean(qs)), "evol": evol}, status, components=comp)
