"""The scorer contract.

A scorer turns records into one or more named scores (its *outputs*). Each scorer is one file in
``curate/scorers/`` plus one line in the registry (``curate/scorers/__init__.py``)::

    class LengthScorer(Scorer):
        method = "length"
        version = "1.0"
        outputs = {"chars": "higher_is_better"}

        class Params(Scorer.Params):
            strip: bool = True

        def score_batch(self, records):
            return [Score({"chars": float(len(response_text(r["messages"])))}) for r in records]

The fingerprint (method, version, parameters, model id/revision, template id) is hashed into the
``scorer_key`` under which results are stored: anything that changes a score changes the key, and a
key already in the store is never recomputed.

Failure policy: if ``score_batch`` raises, the batch is retried one row at a time; a row that still
raises gets NaN for every output with ``status="error"`` and the exception class — no other row
moves, nothing is substituted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from curate.records import canonical_json, sha256_hex

Orientation = Literal["higher_is_better", "lower_is_better", "band", "flag"]

STATUSES = (
    "ok",
    "truncated_ok",
    "skipped_too_long",
    "empty_response",
    "short_response",
    "parse_failed",
    "fallback_needed",
    "undecidable",
    "error",
)


@dataclass
class Score:
    """One row's result: a value per output (NaN when not ok), a status, and the raw components."""

    values: dict[str, float]
    status: str = "ok"
    error_class: str | None = None
    message: str | None = None
    components: dict[str, Any] | None = None
    n_tokens_in: int | None = None
    n_tokens_used: int | None = None
    raw_output: str | None = None  # generative scorers: the model's text
    decoding: str | None = None  # JSON of the decoding parameters
    seed: int | None = None

    @classmethod
    def failed(cls, outputs, status: str, error_class: str, message: str) -> Score:
        return cls({o: math.nan for o in outputs}, status=status, error_class=error_class, message=message)


@dataclass
class ScorerContext:
    """What a scorer may need from the run: thread count, device, seed."""

    torch_threads: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Scorer:
    method: ClassVar[str]
    version: ClassVar[str] = "1.0"
    outputs: ClassVar[dict[str, Orientation]] = {}
    #: Optional dependencies: (module, pip install line).
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: Rows per call of ``score_batch``.
    batch_rows: ClassVar[int] = 256
    #: Warn when a shard's scores collapse (methods.md E5); off for plain statistics such as counts.
    collapse_check: ClassVar[bool] = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, name: str, params: dict[str, Any] | BaseModel | None = None, context: ScorerContext | None = None):
        from curate.errors import require

        for module, install in self.requires:
            require(module, f"scorer '{self.method}'", install)
        self.name = name
        self.params = params if isinstance(params, BaseModel) else self.Params.model_validate(params or {})
        self.context = context or ScorerContext()

    # -- identity ---------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the scores. Subclasses with models add model id, revision, template."""
        return {
            "method": self.method,
            "scorer_version": self.version,
            "params": self.params.model_dump(mode="json"),
        }

    @property
    def key(self) -> str:
        return sha256_hex(canonical_json(self.fingerprint()))

    # -- work -------------------------------------------------------------------------------------
    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        """Score records (canonical dicts); return one Score per record, in order."""
        raise NotImplementedError

    def score_records(self, records: list[dict[str, Any]]) -> list[Score]:
        """``score_batch`` with the failure policy applied (per-row isolation)."""
        try:
            out = self.score_batch(records)
            if len(out) != len(records):
                raise RuntimeError(f"{self.method} returned {len(out)} scores for {len(records)} rows")
            return out
        except Exception:
            if len(records) == 1:
                return [self._failed(records[0])]
        results = []
        for rec in records:
            try:
                (one,) = self.score_batch([rec])
            except Exception:
                one = self._failed(rec)
            results.append(one)
        return results

    def _failed(self, record) -> Score:
        import sys

        exc = sys.exc_info()[1]
        return Score.failed(self.outputs, "error", type(exc).__name__, str(exc)[:500])
