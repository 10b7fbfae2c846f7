"""Language identification with Lingua (``lingua-language-detector``: its n-gram models ship inside the
wheel, so nothing downloads; ``pip install 'curate[lang]'``).

Outputs (per row, over the text of ``field``, its first ``max_chars`` characters):

==============  ======================================================================================
``lang``        1.0 when the most likely language is one of ``languages``, else 0.0 (a flag: keep the
                rows in your languages with ``{method: threshold, score: lang.lang, min: 1}``)
``lang_score``  Lingua's confidence (0–1) that the text is in one of ``languages``: the sum of its
                confidence values for them (relative to the other ``candidates``)
==============  ======================================================================================

``components`` holds the detected language (``"lang": "de"``, ISO 639-1) and its confidence, so the
ledger, ``curate show`` and the report can say which language a dropped row was in. Text with no
letter (numbers, symbols), or that Lingua attributes to no language, gets NaN
with the status ``undecidable`` (a threshold step drops it as ``unscored`` unless ``include_unscored: true``).

Accuracy: ``high`` (default; Lingua's full models, ~1.3 GB in memory once loaded, ~30 s to load, on the
developers' 2-core box about 190 rows/s of 1,000 characters) or ``low`` (trigram models only: faster and
smaller, wrong more often on short text — "How do I sort a list in Python?" came out German). Naming the
``candidates`` (e.g. ``[en, de, fr, es]``) is faster and more accurate than telling apart all 75.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from curate.records import prompt_text, response_text
from curate.scorers.base import Score, Scorer


def _all_text(messages: list[dict[str, Any]]) -> str:
    """Every message's text, joined by blank lines (no role labels: they would read as English)."""
    return "\n\n".join(m["content"] for m in messages if m["content"])


FIELDS = {"conversation": _all_text, "prompt": prompt_text, "response": response_text}


class LangScorer(Scorer):
    method = "lang"
    version = "1.0"
    outputs = {"lang": "flag", "lang_score": "higher_is_better"}
    requires = (("lingua", "pip install 'curate[lang]'  (lingua-language-detector: its models are inside the wheel)"),)
    batch_rows = 1024
    collapse_check = False  # most pools are one language: a collapsed flag is the expected result

    class Params(Scorer.Params):
        languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1,
                                     description="ISO 639-1 codes of the languages wanted (lang = 1 when the text is in one).")
        candidates: list[str] | None = Field(None, description="ISO 639-1 codes Lingua tells apart; null: all it knows (75). "
                                             "Must include every code in languages.")
        field: Literal["conversation", "prompt", "response"] = Field("conversation", description="The text identified.")
        max_chars: int = Field(1000, gt=0, description="Characters of the text read (its start): more is slower, rarely surer.")
        accuracy: Literal["high", "low"] = "high"

        @field_validator("languages", "candidates")
        @classmethod
        def _lower(cls, v):
            return None if v is None else [c.strip().lower() for c in v]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import lingua

        from curate.errors import ConfigError

        p = self.params  # checked when the scorer is built, before any row: raised in score_batch it would only fail rows
        by_code = {lang.iso_code_639_1.name.lower(): lang for lang in lingua.Language.all()}
        unknown = sorted(c for c in set(p.languages) | set(p.candidates or []) if c not in by_code)
        if unknown:
            raise ConfigError(f"scorer '{self.name}': unknown language code {', '.join(unknown)} (Lingua knows the ISO 639-1 "
                              f"codes {', '.join(sorted(by_code))})")
        if p.candidates is not None and not set(p.languages) <= set(p.candidates):
            raise ConfigError(f"scorer '{self.name}': candidates must include every code in languages ({', '.join(p.languages)})")
        codes = p.candidates or sorted(by_code)
        if len(codes) < 2:
            raise ConfigError(f"scorer '{self.name}': name at least two candidates (one language cannot be told apart from nothing)")
        self._languages = [by_code[c] for c in codes]
        self._codes: dict[Any, str] = {by_code[c]: c for c in codes}
        self._detector = None

    def _build(self):
        import lingua

        builder = lingua.LanguageDetectorBuilder.from_languages(*self._languages)
        if self.params.accuracy == "low":
            builder = builder.with_low_accuracy_mode()
        self._detector = builder.build()

    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        if self._detector is None:
            self._build()
        p = self.params
        texts = [FIELDS[p.field](r["messages"])[: p.max_chars] for r in records]
        confidences = self._detector.compute_language_confidence_values_in_parallel(texts)
        wanted = set(p.languages)
        out = []
        for text, values in zip(texts, confidences):
            top = values[0] if values and values[0].value > 0 and any(ch.isalpha() for ch in text) else None
            if top is None:  # no letter, or Lingua names no language
                out.append(Score({"lang": math.nan, "lang_score": math.nan}, status="undecidable", components={"lang": None}))
                continue
            code = self._codes[top.language]
            share = sum(v.value for v in values if self._codes[v.language] in wanted)
            out.append(Score({"lang": float(code in wanted), "lang_score": float(share)},
                             components={"lang": code, "confidence": round(float(top.value), 4)}))
        return out

    def fingerprint(self) -> dict[str, Any]:
        import importlib.metadata

        fp = super().fingerprint()
        fp["lingua_version"] = importlib.metadata.version("lingua-language-detector")
        return fp
