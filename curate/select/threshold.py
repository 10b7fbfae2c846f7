"""Threshold filter: keep rows whose score lies within [min, max] (bounds optional, each inclusive
unless ``*_inclusive: false``). Dropped rows are *filtered* with the rule and the value."""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from curate.select.base import Pool, Selector, StepResult, fmt


class ThresholdFilter(Selector):
    method = "threshold"

    class Params(Selector.Params):
        score: str = Field(description="<scorer>.<output>, e.g. heuristic.response_tokens")
        min: float | None = None
        max: float | None = None
        min_inclusive: bool = True
        max_inclusive: bool = True
        include_unscored: bool = Field(False, description="Keep rows whose score is NaN.")

        @model_validator(mode="after")
        def _bounds(self):
            if self.min is None and self.max is None:
                raise ValueError("give 'min', 'max' or both")
            if self.min is not None and self.max is not None and self.min > self.max:
                raise ValueError(f"min ({self.min}) is above max ({self.max})")
            return self

    def select(self, pool: Pool) -> StepResult:
        p = self.params
        v = pool.score(p.score)
        n = len(v)
        keep = np.ones(n, dtype=bool)
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        nan = np.isnan(v)
        with np.errstate(invalid="ignore"):
            low = np.zeros(n, bool) if p.min is None else (v < p.min if p.min_inclusive else v <= p.min)
            high = np.zeros(n, bool) if p.max is None else (v > p.max if p.max_inclusive else v >= p.max)
        for i in np.flatnonzero(nan | low | high):
            keep[i] = False
            if nan[i]:
                if p.include_unscored:
                    keep[i] = True
                    continue
                reason[i], detail[i] = "unscored", f"{p.score} is NaN (no valid score)"
            elif low[i]:
                op = "<" if p.min_inclusive else "<="
                reason[i], detail[i] = "below_min", f"{p.score} = {fmt(v[i])} {op} min {fmt(p.min)}"
            else:
                op = ">" if p.max_inclusive else ">="
                reason[i], detail[i] = "above_max", f"{p.score} = {fmt(v[i])} {op} max {fmt(p.max)}"
        rank = np.full(n, -1, dtype=np.int64)
        rank[keep] = np.arange(int(keep.sum()))
        stats = {"min": p.min, "max": p.max, "kept": int(keep.sum()), "dropped": int(n - keep.sum())}
        return StepResult(keep, rank, "filtered", reason, detail, stats)
