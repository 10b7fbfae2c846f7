"""Cheap text statistics and degenerate-response detection. No model, ~50k rows/s.

Outputs (per row, over the whole conversation):

===================  =========================================================================
``prompt_chars``     characters of all system/user/tool text
``response_chars``   characters of all assistant text
``prompt_tokens``    tokens of the prompt side (``tokenizer``: ``regex`` = words and punctuation
                     marks, or any HF tokenizer id/dir)
``response_tokens``  tokens of the assistant side
``turns``            number of assistant messages
``repetition``       fraction of the response's word n-grams (``ngram``, default 10) that repeat an
                     earlier one (0–1); text stuck in a loop scores ~0.9, normal prose and code < 0.35
``degenerate``       1.0 when the response is degenerate, else 0.0; ``components.reasons`` says why:
                     ``no_alnum`` (no letter or digit), ``copies_prompt`` (response = prompt),
                     ``repetitive`` (repetition > ``max_repetition``), ``char_run`` (one character
                     is over half of the response)
===================  =========================================================================
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from pydantic import Field

from curate.records import prompt_text, response_text
from curate.scorers.base import Score, Scorer

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_WORD = re.compile(r"\w+", re.UNICODE)
_ALNUM = re.compile(r"[^\W_]", re.UNICODE)


def repetition_ratio(text: str, n: int = 10) -> tuple[float, int]:
    """(fraction of word n-grams that repeat an earlier one, number of n-grams)."""
    words = _WORD.findall(text.lower())
    count = len(words) - n + 1
    if count <= 0:
        return 0.0, 0
    grams = Counter(tuple(words[i : i + n]) for i in range(count))
    return (count - len(grams)) / count, count


class HeuristicScorer(Scorer):
    method = "heuristic"
    version = "1.0"
    outputs = {
        "prompt_chars": "higher_is_better",
        "response_chars": "higher_is_better",
        "prompt_tokens": "higher_is_better",
        "response_tokens": "higher_is_better",
        "turns": "higher_is_better",
        "repetition": "lower_is_better",
        "degenerate": "flag",
    }
    batch_rows = 2048
    collapse_check = False  # counts and flags are naturally concentrated (most rows have one turn)

    class Params(Scorer.Params):
        tokenizer: str = Field("regex", description="'regex' or an HF tokenizer id / local dir.")
        max_repetition: float = Field(0.5, ge=0, le=1)
        ngram: int = Field(10, ge=1, description="Word n-gram size for the repetition ratio.")
        min_ngrams: int = Field(10, ge=1, description="Repetition is judged only with at least this many n-grams.")
        max_char_share: float = Field(0.5, gt=0, le=1)
        min_chars_for_share: int = Field(20, ge=1)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tok = None

    def _count_tokens(self, texts: list[str]) -> list[int]:
        if self.params.tokenizer == "regex":
            return [len(_TOKEN.findall(t)) for t in texts]
        if self._tok is None:
            from curate.models import load_tokenizer

            self._tok = load_tokenizer(self.params.tokenizer)
        enc = self._tok(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]

    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        p = self.params
        prompts = [prompt_text(r["messages"]) for r in records]
        responses = [response_text(r["messages"]) for r in records]
        ptoks = self._count_tokens(prompts)
        rtoks = self._count_tokens(responses)
        out = []
        for rec, prompt, resp, pt, rt in zip(records, prompts, responses, ptoks, rtoks):
            rep, ngrams = repetition_ratio(resp, p.ngram)
            reasons = []
            if not _ALNUM.search(resp) and not any(m.get("tool_calls") for m in rec["messages"]):
                reasons.append("no_alnum")
            if resp.strip().lower() == prompt.strip().lower():
                reasons.append("copies_prompt")
            if ngrams >= p.min_ngrams and rep > p.max_repetition:
                reasons.append("repetitive")
            chars = [c for c in resp if not c.isspace()]
            if len(chars) >= p.min_chars_for_share:
                top = Counter(chars).most_common(1)[0][1]
                if top / len(chars) > p.max_char_share:
                    reasons.append("char_run")
            values = {
                "prompt_chars": float(len(prompt)),
                "response_chars": float(len(resp)),
                "prompt_tokens": float(pt),
                "response_tokens": float(rt),
                "turns": float(sum(m["role"] == "assistant" for m in rec["messages"])),
                "repetition": rep,
                "degenerate": 1.0 if reasons else 0.0,
            }
            out.append(Score(values, components={"reasons": reasons, "ngrams": ngrams}, n_tokens_in=pt + rt, n_tokens_used=pt + rt))
        return out

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["tokenizer_id"] = self.params.tokenizer
        return fp
