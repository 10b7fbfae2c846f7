"""The selection contract (methods.md B0).

A selection step takes a :class:`Pool` (the candidate rows, their scores and embeddings) and returns
a :class:`StepResult`: which rows it keeps, their rank, and for every row it drops the outcome
(``filtered`` for rules, ``not_selected`` for budgets) with a reason code and a sentence for the
ledger. Steps compose: each one sees only the rows the previous step kept (filter → score-first →
diversity → budget). A step is a plug-in (:mod:`curate.plugin`): one file in ``curate/select/`` plus a
line in ``SELECTORS`` (``curate/select/__init__.py``), built as ``cls(name, params, context: SelectContext)``
with validated ``Params`` and optional ``requires``.

Ties and order follow methods.md E2: stable sorts on (score in its better direction, input row
ascending); NaN never ties with a number and is never selected by a score-based step unless
``include_unscored`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from curate.plugin import Context, Plugin
from curate.records import sha256_hex

if TYPE_CHECKING:
    from curate.embed.spec import EmbedSpec


@dataclass
class Pool:
    """Candidate rows of one step, in input-row order.

    ``rows``: (n,) int64 global input rows; ``ids``: n sample_ids (a list, or a numpy array of str); ``scores``: name -> (n,) float64
    (NaN = no score); ``orientation``: name -> ``higher_is_better`` | ``lower_is_better`` | …;
    ``embeddings``: (n, d) unit vectors or None (see below); ``n_input``: every input row of the run
    (quarantined and duplicate rows included: the base of ``rate_base: input``, methods.md B0);
    ``sources`` / ``tasks``: per-row source name and task label (None when absent; lists or numpy arrays); ``texts``: a
    callable giving ``(prompt, response)`` per row of this pool, read only by steps that need the
    text (DELIFT); ``rank``: (n,) int64, the order the previous step ranked these rows in (lower
    first; input-row order for the first step), or None for a pool built outside a run (a step that
    reads it then takes input-row order).
    """

    rows: np.ndarray
    ids: list[str]
    scores: dict[str, np.ndarray]
    orientation: dict[str, str]
    embeddings: np.ndarray | None
    n_input: int
    seed: int = 0
    sources: list | None = None
    tasks: list | None = None
    text_loader: Any = None  # (row indices into the first pool) -> [(prompt, response)]
    origin: np.ndarray | None = None  # positions of these rows in the first pool
    rank: np.ndarray | None = None  # (n,) int64: the previous step's rank of each row (see above)

    def texts(self) -> list[tuple[str, str]]:
        if self.text_loader is None:
            raise ValueError("this pool has no text loader")
        return self.text_loader(self.origin if self.origin is not None else np.arange(len(self.rows)))

    def __len__(self) -> int:
        return len(self.rows)

    def embedding_rows(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions), d) embeddings of these rows of the pool: the pool's matrix itself (a memmap stays
        one, nothing copied) when ``positions`` is every row in order, else those rows."""
        positions = np.asarray(positions)
        if len(positions) == len(self) and np.array_equal(positions, np.arange(len(self))):
            return self.embeddings
        return self.embeddings[positions]

    def embedding_source(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(base matrix, positions of this pool's rows in it, or None when the pool is the whole base)."""
        return self._emb_base, self._emb_index

    def take(self, mask: np.ndarray) -> Pool:
        idx = np.flatnonzero(mask)
        index = idx if self._emb_index is None else self._emb_index[idx]
        if self._emb_base is not None and self._emb_index is None and len(idx) == len(self.rows):
            index = None  # every row, in order: still the whole base
        pool = Pool(
            rows=self.rows[idx],
            ids=self.ids[idx] if isinstance(self.ids, np.ndarray) else [self.ids[i] for i in idx],
            scores={k: v[idx] for k, v in self.scores.items()},
            orientation=self.orientation,
            embeddings=None,
            n_input=self.n_input,
            seed=self.seed,
            sources=_take(self.sources, idx),
            tasks=_take(self.tasks, idx),
            text_loader=self.text_loader,
            origin=(np.arange(len(self.rows)) if self.origin is None else self.origin)[idx],
            rank=None if self.rank is None else self.rank[idx],
        )
        pool._emb_base, pool._emb_index = self._emb_base, (None if self._emb_base is None else index)
        return pool

    def score(self, name: str) -> np.ndarray:
        if name not in self.scores:
            raise KeyError(f"no score '{name}' (available: {', '.join(sorted(self.scores)) or 'none'})")
        return self.scores[name]


def _get_embeddings(self: Pool) -> np.ndarray | None:
    if self._emb_view is None and self._emb_base is not None:
        base, index = self._emb_base, self._emb_index
        if index is None:
            self._emb_view = base if getattr(base, "dtype", None) != np.float16 else np.asarray(base, dtype=np.float32)
        else:
            self._emb_view = np.asarray(base[index], dtype=np.float32) if getattr(base, "dtype", None) == np.float16 else base[index]
    return self._emb_view


def _set_embeddings(self: Pool, value) -> None:
    """The pool's matrix as given (kept as is: small pools behave exactly as before)."""
    self._emb_base, self._emb_index, self._emb_view = value, None, None


# a property over the dataclass field: the generated __init__ assigns through the setter
Pool.embeddings = property(_get_embeddings, _set_embeddings, doc="(n, d) matrix of this pool's rows, or None.")
Pool._emb_base = Pool._emb_index = Pool._emb_view = None


def _take(values, idx: np.ndarray):
    """Rows ``idx`` of a per-row column: a numpy array (the large-pool form) or a list."""
    if values is None:
        return None
    return values[idx] if isinstance(values, np.ndarray) else [values[i] for i in idx]


@dataclass
class StepResult:
    """``keep``: (n,) bool; ``rank``: (n,) int64 order among kept rows (-1 when dropped);
    ``outcome``: what a dropped row becomes; ``reason``/``detail``: per row, None when kept;
    ``columns``: per-row values the step computed (curated classes, long-tail scores, …), written
    to the run's score table as ``<step>.<name>``."""

    keep: np.ndarray
    rank: np.ndarray
    outcome: Literal["filtered", "not_selected"]
    reason: list[str | None]
    detail: list[str | None]
    stats: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class SelectContext(Context):
    """What the run gives a step beyond its pool: ``step_index`` (its place in the flow's steps: seeds and
    messages), ``base_dir`` (relative paths in parameters resolve against it), ``embed`` (the flow's
    EmbedSpec or None) and ``embed_key`` (the store key of its vectors), ``store_dir`` and ``torch_threads``
    (None: the default). A step built outside a run gets the defaults. Its seeds come from ``Pool.seed``."""

    torch_threads: int | None = None
    step_index: int = 0
    embed: EmbedSpec | None = None
    embed_key: str | None = None


class Selector(Plugin):
    kind = "selection step"
    context_type = SelectContext
    needs_embeddings: ClassVar[bool] = False
    context: SelectContext

    @property
    def step_index(self) -> int:
        return self.context.step_index

    @property
    def base_dir(self) -> str | None:
        return self.context.base_dir

    def select(self, pool: Pool) -> StepResult:
        raise NotImplementedError

    def seed(self, pool: Pool, purpose: str = "") -> int:
        """Derived seed: hash(run seed, method, step, purpose) — independent of sharding and order."""
        return int(sha256_hex(str(pool.seed), self.method, str(self.step_index), purpose)[:15], 16)


class BudgetParams(BaseModel):
    """``budget``: an int = a count; a float in (0, 1] = a fraction of ``rate_base``."""

    model_config = ConfigDict(extra="forbid")
    budget: int | float = Field(description="Rows to keep: a count, or a fraction in (0, 1].")
    rate_base: Literal["input", "pool", "valid"] = Field(
        "input", description="What a fractional budget is a fraction of: all input rows (quarantined included), "
        "this step's rows, or its scored rows."
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_not_bool(cls, b):
        if isinstance(b, bool):
            raise ValueError(f"budget must be a number of rows (e.g. 100) or a fraction in (0, 1] (e.g. 0.25), got {b}")
        return b

    @field_validator("budget")
    @classmethod
    def _budget_in_range(cls, b):
        """Checked when the flow is read (the run would stop on it after scoring): a count ≥ 1, or a fraction in (0, 1]."""
        if isinstance(b, int) and b <= 0:
            raise ValueError(f"budget must be at least 1 row, got {b} (a fraction is written as 0.25)")
        if isinstance(b, float) and not (0 < b <= 1):
            if b > 1 and b.is_integer():
                raise ValueError(f"a fractional budget must be in (0, 1], got {b}; for a count of rows write {int(b)}")
            raise ValueError(f"a fractional budget must be in (0, 1], got {b} (a count of rows is a whole number such as 100)")
        return b

    def resolve_budget(self, pool: Pool, n_valid: int | None = None) -> int:
        b = self.budget
        if isinstance(b, bool) or b <= 0:
            raise ValueError(f"budget must be positive, got {b}")
        if isinstance(b, float):
            if b > 1:
                raise ValueError(f"a fractional budget must be in (0, 1], got {b}")
            base = {"input": pool.n_input, "pool": len(pool), "valid": len(pool) if n_valid is None else n_valid}[self.rate_base]
            return int(math.floor(b * base))
        return int(b)


def ranked_order(values: np.ndarray, rows: np.ndarray, descending: bool) -> np.ndarray:
    """Indices sorted by value in its better direction, ties by input row ascending; NaN excluded."""
    finite = np.flatnonzero(~np.isnan(values))
    key = -values[finite] if descending else values[finite]
    order = np.lexsort((rows[finite], key))
    return finite[order]


def read_ids(path: str, base_dir: str | None = None) -> list[str]:
    """sample_ids from a file: ``.txt`` (one per line, e.g. a run's selected_ids.txt), or the
    ``sample_id``/``id`` column of a ``.parquet`` or ``.jsonl`` export."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_absolute() and base_dir:
        p = Path(base_dir) / p
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file (ids of a pre-selected set)")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(p)
        col = "sample_id" if "sample_id" in t.column_names else "id"
        return t.column(col).to_pylist()
    if p.suffix in (".jsonl", ".ndjson"):
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r.get("sample_id", r.get("id")) for r in rows]
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def descending_for(orientation: str | None, override: bool | None) -> bool:
    if override is not None:
        return override
    return orientation != "lower_is_better"


def fmt(x: float) -> str:
    return "NaN" if x != x else f"{x:.6g}"
