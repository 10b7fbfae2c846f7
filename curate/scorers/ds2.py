"""DS2 rating (methods.md A5, step 1): an LLM rates each conversation's Rarity, Complexity,
Informativeness and Overall value from 1 to 10 in a JSON object; the overall rating is compressed to
six classes (≤ 4 → 0, 5 → 1, …, ≥ 9 → 5).

Decoding keeps the reference's sampling (temperature 1.2, top_p 0.9, top_k 50, 128 new tokens): the
rating noise is part of the method, and the curation step (the ``ds2`` selection step, B6) models it.
Each row's seed is derived from the run seed and its sample_id, so ratings do not depend on sharding
or batch order. An answer without a parsable JSON object is regenerated (new seed) up to
``max_attempts`` times; after that the row is ``parse_failed`` (quarantined; the reference's class
0 only with ``match_reference``). With ``constrain`` (the default) the reply is held to the JSON object
of the four ratings while decoding (DS2_USER's shape; see :mod:`curate.lm.shapes`). The prompts are ours
(:mod:`curate.prompts`); the conversation is
rendered as ``### {role}: {content}`` lines.

Truncation (methods.md E4): the prompt as the model reads it (both prompts, the chat template, the
assistant header and the answer prefix) must fit ``max_length`` tokens; the messages' texts are cut
from their end, longest first (``truncated_ok``, ``truncated_fields``), never the prompts' own text;
``skipped_too_long`` when ``min_body_tokens`` per message still does not fit. (The reference instead
cuts the whole prompt at 2048 tokens from the right, losing the assistant header; not reproduced.)
With ``backend: openai`` the count uses the local tokenizer and its chat template: an estimate of the
server's.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from curate.lm.hf import chat_prompt_ids
from curate.prompts import DS2_SYSTEM, DS2_USER
from curate.records import sha256_hex
from curate.scorers.base import Score
from curate.scorers.judge import conversation_bodies, last_json_object
from curate.scorers.ratingbase import Fitted, PromptScorer, RatingParams, TooLong

KEYS = ("Rarity", "Complexity", "Informativeness", "Overall rating")


def compress(overall: int) -> int:
    """DS2 ``score_compress``: clamp to [4, 9], subtract 4 → class 0..5."""
    return int(min(max(overall, 4), 9) - 4)


def parse_ds2(text: str | None) -> dict[str, int] | None:
    obj = last_json_object(text or "")
    if obj is None:
        return None
    try:
        vals = {k: int(obj[k]) for k in KEYS}
    except (KeyError, TypeError, ValueError):
        return None
    return vals if all(1 <= v <= 10 for v in vals.values()) else None


def render_conversation(messages: list[dict], bodies: dict[str, str] | None = None) -> str:
    """``### {role}: {text}\\n`` per message; ``bodies`` (default: the messages' own texts) are the
    texts to show, e.g. after truncation."""
    bodies = conversation_bodies(messages) if bodies is None else bodies
    return "".join(f"### {m['role']}: {bodies[f'message_{i}']}\n" for i, m in enumerate(messages))


def rating_conversation(messages: list[dict], bodies: dict[str, str] | None = None) -> list[dict]:
    """The chat sent to the rater: our system prompt, then the sample under our user prompt."""
    return [{"role": "system", "content": DS2_SYSTEM.text},
            {"role": "user", "content": DS2_USER.text.format(conversation=render_conversation(messages, bodies))}]


class DS2Params(RatingParams):
    temperature: float = Field(1.2, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    answer_prefix: str = Field("", description="Text that starts the model's reply (e.g. 'Score:' or '{\"Rarity\":'), "
                               "which helps small models answer in the format; part of the fingerprint.")
    max_tokens: int = Field(128, gt=0)
    max_attempts: int = Field(3, ge=1, description="Generations per row before parse_failed.")
    constrain: bool = Field(True, description="Constrain the reply to the JSON object of the four ratings (DS2_USER's declared "
                            "shape) while decoding: hf through xgrammar (an answer_prefix must be the start of that object), "
                            "vllm's structured outputs, an OpenAI-compatible server's response_format where it has one.")


class DS2RatingScorer(PromptScorer):
    method = "ds2"
    version = "1.1"
    outputs = {"class": "higher_is_better", "overall": "higher_is_better", "rarity": "higher_is_better",
               "complexity": "higher_is_better", "informativeness": "higher_is_better"}
    Params = DS2Params
    batch_rows = 32
    collapse_std_floor = {"class": 0.05}
    status_hints = {"parse_failed": "no JSON object with the four ratings after max_attempts generations: set answer_prefix "
                                    "'{\"Rarity\": ', raise max_tokens or max_attempts, or use a larger rater; each answer is in "
                                    "raw_output"}

    def decoding(self) -> dict[str, Any]:
        p = self.params
        return {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "max_tokens": p.max_tokens}

    def fingerprint(self) -> dict[str, Any]:
        fp = self.base_fingerprint([DS2_SYSTEM, DS2_USER])
        fp["decoding"] = self.decoding()
        if self.params.constrain:
            fp["shape"] = DS2_USER.shape
        return fp

    def fitted_prompt(self, messages: list[dict]) -> Fitted:
        """The rating prompt for one sample as the model reads it (both prompts, chat template, answer
        prefix), the messages' texts cut to fit ``max_length``; raises :class:`TooLong`."""
        tok = self.backend().tokenizer
        prefix = self.params.answer_prefix
        return self.fit(lambda b: chat_prompt_ids(tok, rating_conversation(messages, b), prefix), conversation_bodies(messages))

    def seed_for(self, sample_id: str, attempt: int) -> int:
        return int(sha256_hex(str(self.context.seed), self.method, sample_id, str(attempt))[:8], 16)

    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        p = self.params
        fits: dict[int, Fitted] = {}
        skipped: dict[int, str] = {}
        for i, rec in enumerate(records):
            try:
                fits[i] = self.fitted_prompt(rec["messages"])
            except TooLong as exc:
                skipped[i] = str(exc)
        texts: dict[int, list[str]] = {i: [] for i in fits}
        parsed: dict[int, dict[str, int] | None] = {i: None for i in fits}
        errors: dict[int, dict] = {}
        pending = list(fits)
        for attempt in range(p.max_attempts):
            if not pending:
                break
            convs = [rating_conversation(records[i]["messages"], fits[i].bodies) for i in pending]
            shaped = {"shapes": [DS2_USER.shape] * len(convs)} if p.constrain else {}
            replies = self.backend().chat(convs, self.decoding(), prefix=self.params.answer_prefix,
                                          seeds=[self.seed_for(records[i]["sample_id"], attempt) for i in pending], **shaped)
            still = []
            for i, rep in zip(pending, replies):
                if rep["status"] != "ok":
                    errors[i] = rep
                    continue
                texts[i].append(rep["text"])
                parsed[i] = parse_ds2(rep["text"])
                if parsed[i] is None:
                    still.append(i)
            pending = still
        return [Score.failed(self.outputs, "skipped_too_long", "TooLong", skipped[i]) if i in skipped
                else fits[i].record(self._row(rec, texts[i], parsed[i], errors.get(i))) for i, rec in enumerate(records)]

    def _row(self, rec: dict[str, Any], texts: list[str], vals: dict[str, int] | None, error: dict | None) -> Score:
        """One row's score from its attempts' texts, the parsed ratings (None: none parsed) or the call error."""
        p = self.params
        raw = "\n---\n".join(t or "" for t in texts)
        if error is not None:
            return Score.failed(self.outputs, "error", error.get("error_class", "error"), error.get("message", "rating call failed"))
        comp = {"attempts": len(texts), "seed": self.seed_for(rec["sample_id"], len(texts) - 1)}
        if vals is None:
            if p.match_reference:  # the reference's [0, 0, 0, 0] → class 0
                return Score({"class": 0.0, "overall": 0.0, "rarity": 0.0, "complexity": 0.0, "informativeness": 0.0},
                             components={**comp, "parse": "failed→0 (match_reference)"}, raw_output=raw)
            s = Score.failed(self.outputs, "parse_failed", "ParseError", "no JSON object with the four integer ratings")
            s.components, s.raw_output = comp, raw
            return s
        values = {"class": float(compress(vals["Overall rating"])), "overall": float(vals["Overall rating"]),
                  "rarity": float(vals["Rarity"]), "complexity": float(vals["Complexity"]),
                  "informativeness": float(vals["Informativeness"])}
        return Score(values, components={**comp, "ratings": vals}, raw_output=raw, decoding=json.dumps(self.decoding(), sort_keys=True),
                     seed=comp["seed"])
