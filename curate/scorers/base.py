"""The scorer contract.

A scorer turns records into one or more named scores (its *outputs*). It is a plug-in
(:mod:`curate.plugin`): one file in ``curate/scorers/`` plus one line in ``SCORERS``
(``curate/scorers/__init__.py``), built as ``cls(name, params, context: ScorerContext)``::

    class LengthScorer(Scorer):
        method = "length"
        version = "1.0"
        outputs = {"chars": "higher_is_better"}

        class Params(Scorer.Params):
            strip: bool = True

        def score_batch(self, records):
            return [Score({"chars": float(len(response_text(r["messages"])))}) for r in records]

Optional dependencies go in ``requires = (("module", "pip install …"),)`` (checked once per class).

The fingerprint (method, version, parameters, model id/revision, template id) is hashed into the
``scorer_key`` under which results are stored: anything that changes a score changes the key, and a
key already in the store is never recomputed.

Failure policy: if ``score_batch`` raises, the batch is retried one row at a time; a row that still
raises gets NaN for every output with ``status="error"`` and the exception class — no other row
moves, nothing is substituted.

Columnar fast path (optional): a scorer may also implement ``score_table(table) -> ScoreColumns``,
taking a chunk of a shard as Arrow rows (the columns in ``table_columns``, ``messages`` as
``list<struct>``) and returning one array per output. The score stage then never turns the shard into
Python dicts. ``score_columns`` applies the same failure policy: if ``score_table`` raises, that chunk
goes through ``score_records`` (row-by-row isolation). A subclass that overrides ``score_batch`` below
the class that defines ``score_table`` is scored through ``score_batch`` (see :attr:`Scorer.columnar`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from curate.plugin import Context, Plugin
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
class ScoreColumns:
    """A chunk's results, column by column (the columnar counterpart of a list of :class:`Score`).

    ``values``: output -> float64 array (one value per row; may be a pyarrow array with nulls).
    Every other field is None (all rows null, or ``"ok"`` for ``status``) or an array of one entry
    per row: ``status``/``error_class``/``message``/``components`` (JSON text)/``raw_output``/
    ``decoding`` strings, ``n_tokens_in``/``n_tokens_used``/``seed`` integers.
    """

    values: dict[str, Any]
    status: Any = None
    error_class: Any = None
    message: Any = None
    components: Any = None
    n_tokens_in: Any = None
    n_tokens_used: Any = None
    raw_output: Any = None
    decoding: Any = None
    seed: Any = None

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    def column(self, name: str, type_: pa.DataType, n: int) -> pa.Array:
        """One per-row field as an Arrow array of ``n`` entries (nulls when unset; ``status``: "ok")."""
        v = getattr(self, name)
        if v is None:
            return pa.array(["ok"] * n, pa.string()) if name == "status" else pa.nulls(n, type_)
        arr = v if isinstance(v, pa.Array | pa.ChunkedArray) else pa.array(v, type_)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if len(arr) != n:
            raise RuntimeError(f"{name}: {len(arr)} values for {n} rows")
        return arr.cast(type_)

    def value_array(self, output: str, n: int) -> pa.Array:
        v = self.values.get(output)
        if v is None:
            return pa.array(np.full(n, np.nan))
        arr = v if isinstance(v, pa.Array | pa.ChunkedArray) else pa.array(np.asarray(v, dtype=np.float64))
        if len(arr) != n:
            raise RuntimeError(f"{output}: {len(arr)} values for {n} rows")
        return arr.cast(pa.float64())

    @classmethod
    def from_scores(cls, scores: list[Score], outputs) -> ScoreColumns:
        """The columns of per-row results (``components`` as JSON text, as the store keeps it)."""
        import json

        def comp(c):
            return json.dumps(c, ensure_ascii=False, sort_keys=True, default=float) if c else None

        return cls(
            values={o: pa.array([s.values.get(o, math.nan) for s in scores], pa.float64()) for o in outputs},
            status=[s.status for s in scores],
            error_class=[s.error_class for s in scores],
            message=[s.message for s in scores],
            components=[comp(s.components) for s in scores],
            n_tokens_in=[s.n_tokens_in for s in scores],
            n_tokens_used=[s.n_tokens_used for s in scores],
            raw_output=[s.raw_output for s in scores],
            decoding=[s.decoding for s in scores],
            seed=[s.seed for s in scores],
        )

    def to_scores(self, outputs) -> list[Score]:
        """Per-row :class:`Score` objects (for callers of ``score_batch``); components parsed back from JSON."""
        import json

        n = len(self)
        vals = {o: self.value_array(o, n).to_pylist() for o in outputs}
        cols = {f: self.column(f, t, n).to_pylist() for f, t in (
            ("status", pa.string()), ("error_class", pa.string()), ("message", pa.string()), ("components", pa.string()),
            ("n_tokens_in", pa.int64()), ("n_tokens_used", pa.int64()), ("raw_output", pa.string()), ("decoding", pa.string()),
            ("seed", pa.int64()))}
        return [
            Score({o: vals[o][i] for o in outputs}, status=cols["status"][i], error_class=cols["error_class"][i],
                  message=cols["message"][i],
                  components=None if cols["components"][i] is None else json.loads(cols["components"][i]),
                  n_tokens_in=cols["n_tokens_in"][i], n_tokens_used=cols["n_tokens_used"][i], raw_output=cols["raw_output"][i],
                  decoding=cols["decoding"][i], seed=cols["seed"][i])
            for i in range(n)
        ]


@dataclass
class ScorerContext(Context):
    """What a scorer may need from the run: ``torch_threads``, ``seed``, and in ``extra`` the
    ``request_cache`` folder of API scorers (a model's ``device`` is one of
    its parameters, not context)."""


class Scorer(Plugin):
    kind = "scorer"
    context_type = ScorerContext
    outputs: ClassVar[dict[str, Orientation]] = {}
    #: Rows per call of ``score_batch``.
    batch_rows: ClassVar[int] = 256
    #: Rows per call of ``score_table`` (columnar scorers only) and the columns it reads.
    table_rows: ClassVar[int] = 4096
    table_columns: ClassVar[tuple[str, ...]] = ("sample_id", "messages")
    #: Warn when a shard's scores collapse (methods.md E5); off for plain statistics such as counts.
    collapse_check: ClassVar[bool] = True
    context: ScorerContext

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

    score_table: ClassVar[Any] = None  # optional: ``def score_table(self, table: pa.Table) -> ScoreColumns``

    @property
    def columnar(self) -> bool:
        """True when ``score_table`` is implemented by this class or by a subclass of the class that
        defines ``score_batch`` (a subclass that overrides only ``score_batch`` keeps the row path)."""
        mro = type(self).__mro__
        table_owner = next((c for c in mro if "score_table" in vars(c)), Scorer)
        batch_owner = next((c for c in mro if "score_batch" in vars(c)), Scorer)
        return table_owner is not Scorer and issubclass(table_owner, batch_owner)

    def score_columns(self, table: pa.Table) -> ScoreColumns:
        """``score_table`` with the failure policy: if it raises (or returns the wrong number of rows),
        this chunk is scored by ``score_records`` (one row at a time where needed)."""
        n = table.num_rows
        try:
            out = self.score_table(table)
            for o in self.outputs:
                out.value_array(o, n)  # checks the length
            return out
        except Exception as exc:  # the row path isolates the failing rows; say that the fast path failed
            import logging

            logging.getLogger("curate").warning("%s: the columnar path failed on %d rows (%s: %s); they are scored row by row",
                                                self.name, n, type(exc).__name__, exc)
            return ScoreColumns.from_scores(self.score_records(table.to_pylist()), self.outputs)

    def score_records(self, records: list[dict[str, Any]]) -> list[Score]:
        """``score_batch`` with the failure policy applied (per-row isolation). A :class:`~curate.errors.CurateError` is not a
        row's failure but the step's (a missing package, a model or setting the backend refuses): it is raised, so the
        step stops with its message instead of storing it on every row."""
        from curate.errors import CurateError

        try:
            out = self.score_batch(records)
            if len(out) != len(records):
                raise RuntimeError(f"{self.method} returned {len(out)} scores for {len(records)} rows")
            return out
        except CurateError:
            raise
        except Exception:
            if len(records) == 1:
                return [self._failed(records[0])]
        results = []
        for rec in records:
            try:
                (one,) = self.score_batch([rec])
            except CurateError:
                raise
            except Exception:
                one = self._failed(rec)
            results.append(one)
        return results

    def _failed(self, record) -> Score:
        import sys

        exc = sys.exc_info()[1]
        return Score.failed(self.outputs, "error", type(exc).__name__, str(exc)[:500])
