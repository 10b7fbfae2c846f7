"""LLM rating — a judge model grades each sample against a rubric (AlpaGasus-style; methods.md A7).

The rubric (``rubric``: an id in :data:`curate.prompts.RUBRICS`, versioned and hashed) is the system
message; the user message shows the sample — ``Instruction:`` / ``Response:`` for a single turn, the
whole conversation with ``### User:`` / ``### Assistant:`` headers otherwise (the last assistant
message is the one judged). Any backend: local ``hf`` (chat template + generate), ``vllm``, or an
``openai``-compatible endpoint (bounded concurrency, retries, a request cache).

Parsing: the rubric's declared format first (``first_line``: the first line is the number; ``json``:
the last JSON object's ``score``), then one tolerant fallback (``score: x`` or the first number in
range). A value outside the scale, or no value, is NaN with ``status="parse_failed"`` — the row is
quarantined — never −1 or a guess. The raw judge text is stored with every score.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import numpy as np
from pydantic import Field

from curate.prompts import RUBRIC_ACCURACY_0_5, RUBRIC_QUALITY_1_10_JSON, RUBRICS
from curate.records import sha256_hex
from curate.scorers.base import Score
from curate.scorers.ratingbase import PromptScorer, RatingParams
from curate.templates import message_text, split_turns

RUBRIC_DEFAULTS = {RUBRIC_ACCURACY_0_5.id: ((0.0, 5.0), "first_line"), RUBRIC_QUALITY_1_10_JSON.id: ((1.0, 10.0), "json")}
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)


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


def parse_rating(text: str | None, fmt: str, lo: float, hi: float, key: str = "score") -> tuple[float | None, str]:
    """(value, parse path) — the strict path of ``fmt``, then the tolerant fallback; None when neither works."""
    if not text:
        return None, "empty"
    if fmt == "json":
        obj = last_json_object(text)
        if obj is not None and isinstance(obj.get(key), (int, float)) and lo <= float(obj[key]) <= hi:
            return float(obj[key]), "json"
    else:
        first = text.strip().splitlines()[0].strip().rstrip(".").strip("*").strip() if text.strip() else ""
        try:
            v = float(first)
            if lo <= v <= hi:
                return v, "first_line"
        except ValueError:
            pass
    m = _SCORE.search(text)
    if m and lo <= float(m.group(1)) <= hi:
        return float(m.group(1)), "fallback:score"
    for m in _NUMBER.finditer(text):
        if lo <= float(m.group(0)) <= hi:
            return float(m.group(0)), "fallback:first_number"
    return None, "failed"


def render_sample(messages: list[dict]) -> str:
    system, turns = split_turns(messages)
    if len(turns) == 1 and not system:
        return f"Instruction:\n{turns[0][0]}\n\nResponse:\n{turns[0][1]}"
    lines = [f"### System: {system}"] if system else []
    for m in messages:
        if m["role"] == "system":
            continue
        lines.append(f"### {m['role'].capitalize()}: {message_text(m)}")
    return "\n".join(lines) + "\n\nJudge the last assistant response."


class JudgeParams(RatingParams):
    rubric: str = Field(RUBRIC_ACCURACY_0_5.id, description=f"One of: {', '.join(RUBRICS)}.")
    scale_min: float | None = None
    scale_max: float | None = None
    answer_format: Literal["auto", "first_line", "json"] = "auto"
    temperature: float = Field(0.0, ge=0)
    answer_prefix: str = Field("", description="Text that starts the model's reply (e.g. 'Score:' or '{\"Rarity\":'), "
                               "which helps small models answer in the format; part of the fingerprint.")
    max_tokens: int = Field(64, gt=0)
    n_samples: int = Field(1, ge=1)
    max_sample_chars: int = Field(12000, gt=0, description="Longer samples are cut from the end of the longest message.")


class JudgeScorer(PromptScorer):
    method = "llm_rating"
    version = "1.0"
    outputs = {"rating": "higher_is_better"}
    Params = JudgeParams
    batch_rows = 32
    collapse_std_floor = {"rating": 0.01}

    def _setup(self):
        p = self.params
        if p.rubric not in RUBRICS:
            raise ValueError(f"unknown rubric '{p.rubric}' (known: {', '.join(RUBRICS)})")
        (lo, hi), fmt = RUBRIC_DEFAULTS[p.rubric]
        return RUBRICS[p.rubric], (p.scale_min if p.scale_min is not None else lo), (p.scale_max if p.scale_max is not None else hi), \
            (fmt if p.answer_format == "auto" else p.answer_format)

    def decoding(self) -> dict[str, Any]:
        return {"temperature": self.params.temperature, "max_tokens": self.params.max_tokens}

    def fingerprint(self) -> dict[str, Any]:
        rubric, lo, hi, fmt = self._setup()
        fp = self.base_fingerprint([rubric])
        fp.update(rubric_hash=rubric.hash, scale=[lo, hi], answer_format=fmt, decoding=self.decoding())
        return fp

    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        p = self.params
        rubric, lo, hi, fmt = self._setup()
        convs, seeds, where = [], [], []
        for r_i, rec in enumerate(records):
            sample = render_sample(rec["messages"])[: p.max_sample_chars]
            for s in range(p.n_samples):
                convs.append([{"role": "system", "content": rubric.text}, {"role": "user", "content": sample}])
                seeds.append(int(sha256_hex(str(self.context.seed), self.method, rec["sample_id"], str(s))[:8], 16))
                where.append(r_i)
        replies = self.backend().chat(convs, self.decoding(), prefix=self.params.answer_prefix, seeds=seeds)
        per_row: list[list[dict]] = [[] for _ in records]
        for r_i, rep in zip(where, replies):
            per_row[r_i].append(rep)
        out = []
        for r_i, reps in enumerate(per_row):
            bad = next((r for r in reps if r["status"] != "ok"), None)
            raw = "\n---\n".join(r["text"] or "" for r in reps)
            if bad is not None:
                out.append(Score.failed(self.outputs, "error", bad.get("error_class", "error"), bad.get("message", "judge call failed")))
                continue
            parsed = [parse_rating(r["text"], fmt, lo, hi) for r in reps]
            values = [v for v, _ in parsed if v is not None]
            comp = {"parsed": [v for v, _ in parsed], "parse_path": [path for _, path in parsed], "rubric_hash": rubric.hash}
            if len(values) < len(reps):
                if p.match_reference:
                    comp["raw_parsed"] = [-1 if v is None else v for v, _ in parsed]
                s = Score.failed(self.outputs, "parse_failed", "ParseError", f"no {fmt} rating in [{lo}, {hi}] in the judge's answer")
                s.components, s.raw_output = comp, raw
                out.append(s)
                continue
            if len(values) > 1:
                comp.update(mean=float(np.mean(values)), std=float(np.std(values)))
            out.append(Score({"rating": float(np.mean(values))}, components=comp, raw_output=raw,
                             decoding=json.dumps(self.decoding(), sort_keys=True)))
        return out
