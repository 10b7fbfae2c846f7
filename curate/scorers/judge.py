"""LLM rating — a judge model grades each sample against a rubric (AlpaGasus-style; methods.md A7).

The rubric (``rubric``: an id in :data:`curate.prompts.RUBRICS`, versioned and hashed) is the system
message; the user message shows the sample — ``Instruction:`` / ``Response:`` for a single turn, the
whole conversation with ``### User:`` / ``### Assistant:`` headers otherwise (the last assistant
message is the one judged). Any backend: local ``hf`` (chat template + generate), ``vllm``, or an
``openai``-compatible endpoint (bounded concurrency, retries, a request cache).

The reply starts with ``answer_prefix``, by default the answer format's cue (``Score:`` /
``{"score": ``), so that even the bundled 135M model writes its rating where the parser looks (not
for a plain OpenAI API, which cannot continue a reply: ``server: openai``). With ``constrain`` (the
default) the reply is held to the rubric's declared shape (:data:`curate.prompts.SHAPES`) while
decoding; where the shape is enforced after the prefix by the server (vllm, openai) no cue is sent by
default; ``components.constrained`` says whether the backend enforced it.

Parsing: the rubric's declared format first (``first_line``: the first line after the prefix is the
number; ``json``: the last JSON object's ``score``), then one tolerant fallback (``score: x``). A
value outside the scale, or no value, is NaN with ``status="parse_failed"`` — the row is quarantined
and counts against ``runtime.max_error_rate`` — never −1 or a guess. The raw judge text is stored
with every score.

Truncation (methods.md E4): the prompt as the model reads it (rubric, chat template, sample, answer
prefix) must fit ``max_length`` tokens of the judge's tokenizer; the sample's texts (instruction and
response, or each message) are cut from their end, longest first, never the rubric, the labels or
the closing line — ``truncated_ok`` with ``truncated_fields``, ``n_tokens_in`` and ``n_tokens_used``;
``skipped_too_long`` when ``min_body_tokens`` per text still does not fit. (With ``backend: openai``
the count uses the local tokenizer and its chat template: an estimate of the server's.)
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import numpy as np
from pydantic import Field

from curate.lm.hf import chat_prompt_ids
from curate.prompts import RUBRIC_ACCURACY_0_5, RUBRIC_QUALITY_1_10_JSON, RUBRICS, Prompt
from curate.records import sha256_hex
from curate.scorers.base import Score
from curate.scorers.ratingbase import Fitted, PromptScorer, RatingParams, TooLong
from curate.templates import message_text, split_turns

RUBRIC_DEFAULTS = {RUBRIC_ACCURACY_0_5.id: ((0.0, 5.0), "first_line"), RUBRIC_QUALITY_1_10_JSON.id: ((1.0, 10.0), "json")}
#: the default ``answer_prefix`` per answer format: the reply starts where the rating goes
ANSWER_CUES = {"first_line": "Score:", "json": '{"score": '}
_SCORE = re.compile(r"score\"?\s*[:=]?\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)


def last_json_object(text: str) -> dict | None:
    """The last balanced ``{...}`` in ``text`` that parses as a JSON object."""
    found = None
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0 and start is not None:
                try:
                    obj = json.loads(text[start : i + 1])
                    if isinstance(obj, dict):
                        found = obj
                except json.JSONDecodeError:
                    pass
    return found


def parse_rating(text: str | None, fmt: str, lo: float, hi: float, key: str = "score", prefix: str = "") -> tuple[float | None, str]:
    """(value, parse path): the strict path of ``fmt`` (``first_line``: the whole first line after
    ``prefix`` is the number; ``json``: the last JSON object's ``key``), then one tolerant fallback — the first
    ``score: x`` (case-insensitive, ``:``/``=`` optional, markdown stars allowed). A value outside
    [lo, hi] or no value gives (None, "failed"): no other number in the text is taken as a guess."""
    if not text:
        return None, "empty"
    if fmt == "json":
        obj = last_json_object(text)
        if obj is not None and isinstance(obj.get(key), (int, float)) and lo <= float(obj[key]) <= hi:
            return float(obj[key]), "json"
    else:
        reply = text[len(prefix):] if prefix and text.startswith(prefix) else text
        first = reply.strip().splitlines()[0].strip().rstrip(".").strip("*").strip() if reply.strip() else ""
        try:
            v = float(first)
            if lo <= v <= hi:
                return v, "first_line"
        except ValueError:
            pass
    m = _SCORE.search(text)
    if m and lo <= float(m.group(1)) <= hi:
        return float(m.group(1)), "fallback:score"
    return None, "failed"


def conversation_bodies(messages: list[dict]) -> dict[str, str]:
    """Each message's text by name (``message_<i>``): the parts truncation may cut."""
    return {f"message_{i}": message_text(m) for i, m in enumerate(messages)}


def sample_bodies(messages: list[dict]) -> dict[str, str]:
    """The texts a judge reads, by name — the parts truncation may cut: ``instruction`` and
    ``response`` for one turn without a system message, else ``message_<i>`` for every message."""
    system, turns = split_turns(messages)
    if len(turns) == 1 and not system:
        return {"instruction": turns[0][0], "response": turns[0][1]}
    return conversation_bodies(messages)


def render_sample(messages: list[dict], bodies: dict[str, str] | None = None) -> str:
    """The judge's user message: ``Instruction:`` / ``Response:`` blocks for one turn, else one
    ``### Role: text`` line per message and a closing line naming the reply to judge. ``bodies``
    (default :func:`sample_bodies`) are the texts to show, e.g. after truncation."""
    bodies = sample_bodies(messages) if bodies is None else bodies
    if "instruction" in bodies:
        return f"Instruction:\n{bodies['instruction']}\n\nResponse:\n{bodies['response']}"
    lines = [f"### {m['role'].capitalize()}: {bodies[f'message_{i}']}" for i, m in enumerate(messages)]
    return "\n".join(lines) + "\n\nJudge the last assistant response."


class JudgeParams(RatingParams):
    rubric: str = Field(RUBRIC_ACCURACY_0_5.id, description=f"One of: {', '.join(RUBRICS)}.")
    scale_min: float | None = None
    scale_max: float | None = None
    answer_format: Literal["auto", "first_line", "json"] = "auto"
    temperature: float = Field(0.0, ge=0)
    answer_prefix: str | None = Field(None, description="Text that starts the model's reply, which helps small models answer in "
                                      "the format. Default: the answer format's cue ('Score:' for first_line, '{\"score\": ' for "
                                      "json) where the backend can continue a reply (hf, vllm, openai with server: vllm), else none; "
                                      "'' for none. Part of the fingerprint.")
    max_tokens: int = Field(64, gt=0)
    n_samples: int = Field(1, ge=1)
    constrain: bool = Field(True, description="Constrain the judge's reply to the rubric's declared output shape (curate.prompts.SHAPES: "
                            "the score line, or the JSON object) while decoding: hf through xgrammar, vllm's structured outputs, "
                            "an OpenAI-compatible server's response_format where it has one (else the reply is free; recorded).")


class JudgeScorer(PromptScorer):
    method = "llm_rating"
    version = "1.1"
    outputs = {"rating": "higher_is_better"}
    Params = JudgeParams
    batch_rows = 32
    collapse_std_floor = {"rating": 0.01}
    status_hints = {"parse_failed": "the judge's answers held no rating in the rubric's scale (each answer is in raw_output): "
                                    "use a larger judge (model, or backend: openai with base_url), cue the rating with answer_prefix "
                                    "(default 'Score:' / '{\"score\": '), or raise max_tokens; a known share can be allowed with "
                                    "runtime.max_error_rate"}

    def _setup(self) -> tuple[Prompt, float, float, str, str]:
        """(rubric, scale min, scale max, answer format, answer prefix) after defaults."""
        p = self.params
        if p.rubric not in RUBRICS:
            raise ValueError(f"unknown rubric '{p.rubric}' (known: {', '.join(RUBRICS)})")
        (lo, hi), fmt = RUBRIC_DEFAULTS[p.rubric]
        fmt = fmt if p.answer_format == "auto" else p.answer_format
        can_continue = p.backend != "openai" or p.server == "vllm"  # the plain OpenAI API cannot continue a reply
        # a constraint applies to what the server generates, after a prefix, except on hf (which feeds the prefix to the
        # grammar first): elsewhere the shape does the cue's work
        cue = can_continue and not (p.constrain and p.backend != "hf" and RUBRICS[p.rubric].shape is not None)
        prefix = p.answer_prefix if p.answer_prefix is not None else (ANSWER_CUES[fmt] if cue else "")
        lo = p.scale_min if p.scale_min is not None else lo
        hi = p.scale_max if p.scale_max is not None else hi
        return RUBRICS[p.rubric], lo, hi, fmt, prefix

    def decoding(self) -> dict[str, Any]:
        return {"temperature": self.params.temperature, "max_tokens": self.params.max_tokens}

    def fingerprint(self) -> dict[str, Any]:
        rubric, lo, hi, fmt, prefix = self._setup()
        fp = self.base_fingerprint([rubric])
        fp.update(rubric_hash=rubric.hash, scale=[lo, hi], answer_format=fmt, answer_prefix=prefix, decoding=self.decoding())
        if self.params.constrain and rubric.shape is not None:
            fp["shape"] = rubric.shape
        return fp

    @staticmethod
    def conversation(rubric: Prompt, messages: list[dict], bodies: dict[str, str]) -> list[dict]:
        """The chat sent to the judge: the rubric as the system message, the sample as the user's."""
        return [{"role": "system", "content": rubric.text}, {"role": "user", "content": render_sample(messages, bodies)}]

    def fitted_prompt(self, messages: list[dict]) -> Fitted:
        """The judge's prompt for one sample as the model reads it (rubric, sample, chat template,
        answer prefix), its texts cut to fit ``max_length``; raises :class:`TooLong`."""
        rubric, *_, prefix = self._setup()
        tok = self.backend().tokenizer
        return self.fit(lambda b: chat_prompt_ids(tok, self.conversation(rubric, messages, b), prefix), sample_bodies(messages))

    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        p = self.params
        rubric, lo, hi, fmt, prefix = self._setup()
        out: list[Score | None] = [None] * len(records)
        fits: dict[int, Fitted] = {}
        convs, seeds, where = [], [], []
        for r_i, rec in enumerate(records):
            try:
                fits[r_i] = self.fitted_prompt(rec["messages"])
            except TooLong as exc:
                out[r_i] = Score.failed(self.outputs, "skipped_too_long", "TooLong", str(exc))
                continue
            for s in range(p.n_samples):
                convs.append(self.conversation(rubric, rec["messages"], fits[r_i].bodies))
                seeds.append(int(sha256_hex(str(self.context.seed), self.method, rec["sample_id"], str(s))[:8], 16))
                where.append(r_i)
        shaped = {"shapes": [rubric.shape] * len(convs)} if p.constrain and rubric.shape is not None else {}
        replies = self.backend().chat(convs, self.decoding(), prefix=prefix, seeds=seeds, **shaped) if convs else []
        per_row: dict[int, list[dict]] = {r_i: [] for r_i in fits}
        for r_i, rep in zip(where, replies):
            per_row[r_i].append(rep)
        for r_i, reps in per_row.items():
            out[r_i] = fits[r_i].record(self._rate(reps, rubric, lo, hi, fmt, prefix))
        return out

    def _rate(self, reps: list[dict], rubric: Prompt, lo: float, hi: float, fmt: str, prefix: str) -> Score:
        """One row's score from its ``n_samples`` replies."""
        bad = next((r for r in reps if r["status"] != "ok"), None)
        if bad is not None:
            return Score.failed(self.outputs, "error", bad.get("error_class", "error"), bad.get("message", "judge call failed"))
        raw = "\n---\n".join(r["text"] or "" for r in reps)
        parsed = [parse_rating(r["text"], fmt, lo, hi, prefix=prefix) for r in reps]
        values = [v for v, _ in parsed if v is not None]
        comp = {"parsed": [v for v, _ in parsed], "parse_path": [path for _, path in parsed], "rubric_hash": rubric.hash}
        if any("constrained" in r for r in reps):  # asked for: whether the backend enforced the shape
            comp["constrained"] = all(bool(r.get("constrained")) for r in reps)
        if len(values) < len(reps):
            if self.params.match_reference:
                comp["raw_parsed"] = [-1 if v is None else v for v, _ in parsed]
            s = Score.failed(self.outputs, "parse_failed", "ParseError", f"no {fmt} rating in [{lo}, {hi}] in the judge's answer")
            s.components, s.raw_output = comp, raw
            return s
        if len(values) > 1:
            comp.update(mean=float(np.mean(values)), std=float(np.std(values)))
        return Score({"rating": float(np.mean(values))}, components=comp, raw_output=raw,
                     decoding=json.dumps(self.decoding(), sort_keys=True))
