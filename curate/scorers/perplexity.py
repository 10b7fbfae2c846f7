"""LM perplexity (methods.md A8): ``PPL = exp(L)`` over a span under a causal LM, one pass.

``span: response`` (default) scores the replies conditioned on the rendered prompt (the model's chat
template by default; multi-turn: every reply, token-weighted, all from one forward over the
conversation cut at ``max_length``; replies past it are not scored and the row is
``truncated_ok``); ``span: whole`` scores every token of the rendered conversation after the first.
Outputs ``ppl`` and ``loss`` (nats/token). Low perplexity = fluent or familiar text; whether to keep
low, high or a band is a selection policy (threshold / top_k with ``descending``).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from curate.scorers.base import Score
from curate.scorers.lossbase import LossParams, LossScorer, Part, RowSkip, TurnJob


class PerplexityParams(LossParams):
    template: Literal["alpaca", "wiz", "vicuna", "none", "chat"] = "chat"
    span: Literal["response", "whole"] = "response"
    max_length: int = Field(1024, gt=1)


class PerplexityScorer(LossScorer):
    method = "perplexity"
    version = "1.1"
    outputs = {"ppl": "lower_is_better", "loss": "lower_is_better"}
    Params = PerplexityParams

    def jobs(self, record: dict) -> list[TurnJob]:
        p = self.params
        msgs = record["messages"]
        rendered = self.template.render(msgs, record)
        ids, spans = self.token_spans(rendered, rendered.replies)
        L = p.max_length
        if p.span == "whole":
            end = min(len(ids), L)
            return [TurnJob(0, Part(ids[:end], (1, end), len(ids)), truncated=end < len(ids))]
        jobs = []
        for t in self.selected_turns(msgs):
            s, e = spans[t]
            if s >= L:
                if not jobs:
                    raise RowSkip("skipped_too_long", f"the prompt of turn {t} has {s} tokens, max_length={L}")
                jobs.append(TurnJob(t, Part([], (0, 0), len(ids)), truncated=True))  # past max_length: not scored
                continue
            end = min(e, L)
            jobs.append(TurnJob(t, Part(ids[:end], (s, end), len(ids)), truncated=end < e))
        if not jobs or all(j.cond.n == 0 for j in jobs):
            raise RowSkip("empty_response", "no response token to score")
        return jobs

    def combine(self, record: dict, jobs: list[TurnJob]) -> Score:
        nll = sum(j.result["cond"][0] for j in jobs if j.cond.n)
        n = sum(j.cond.n for j in jobs)
        loss = nll / n
        truncated = any(j.truncated for j in jobs)
        comp = {"span": self.params.span, "n_tokens": n, "per_turn": [j.result["cond"][0] / j.cond.n for j in jobs if j.cond.n]}
        n_in, n_used = self.token_counts(jobs)
        return Score({"ppl": math.exp(loss), "loss": loss}, "truncated_ok" if truncated else "ok", components=comp,
                     n_tokens_in=n_in, n_tokens_used=n_used)
