"""r-IFD — reverse IFD (Selective Reflection-Tuning; methods.md A3).

How well the response determines its instruction: ``r-IFD = PPL(Q | R(A)) / PPL(Q)``, where ``Q`` is
the user text of the turn, ``R(A)`` our reverse prompt (``curate.prompts.RIFD_REVERSE``: "here is a
reply — which instruction was it written for?") placed in the instruction slot of the template
(Vicuna by default), and ``Q`` is scored right after the assistant cue. The direct pass scores ``Q``
on its own. Low r-IFD = the reply makes its instruction easy to infer (a consistent pair); the C2
gates need r-IFD < 1. ``ratio: loss`` gives the loss ratio instead.

Multi-turn: each scored turn's reply reverses to that turn's user text (context none);
token-weighted aggregate. ``q_join``: instruction and input of alpaca rows are joined by ``"\\n"``
(``match_reference`` joins them with nothing, as the reference does).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from curate.prompts import RIFD_REVERSE
from curate.records import message
from curate.scorers.base import Score
from curate.scorers.lossbase import LossParams, LossScorer, RowSkip, TurnJob
from curate.templates import split_turns


class RIFDParams(LossParams):
    template: Literal["alpaca", "wiz", "vicuna", "none", "chat"] = "vicuna"
    max_length: int = Field(2048, gt=1)
    ratio: Literal["loss", "ppl"] = "ppl"
    context: Literal["history", "none"] = "none"


class RIFDScorer(LossScorer):
    method = "rifd"
    version = "1.0"
    outputs = {"rifd": "lower_is_better"}
    Params = RIFDParams

    def fingerprint(self):
        fp = super().fingerprint()
        fp["prompt"] = RIFD_REVERSE.ref()
        return fp

    def question(self, record: dict, user_text: str, single: bool) -> str:
        if single and record.get("format") == "alpaca" and record.get("original"):
            orig = json.loads(record["original"])
            ins, inp = (orig.get("instruction") or "").strip(), (orig.get("input") or "").strip()
            if ins:
                return ins + ("" if self.params.match_reference else "\n") + inp if inp else ins
        return user_text

    def jobs(self, record: dict) -> list[TurnJob]:
        p = self.params
        system, turns = split_turns(record["messages"])
        jobs = []
        for t in self.selected_turns(record["messages"]):
            user_text, reply = turns[t]
            q = self.question(record, user_text, len(turns) == 1)
            if not q.strip():
                continue
            msgs = ([message("system", system)] if system else []) + [message("user", RIFD_REVERSE.text.format(response=reply)),
                                                                      message("assistant", q)]
            rendered = self.template.render(msgs)
            ids, spans = self.token_spans(rendered, rendered.replies)
            s, e = spans[-1]
            d_ids, d_start = self.direct_part("", q, rendered.add_special_tokens)
            if s >= p.max_length:
                raise RowSkip("skipped_too_long", f"the reverse prompt of turn {t} has {s} tokens, max_length={p.max_length}")
            cond, direct, cut = self.equal_span(ids, (s, e), d_ids, d_start)
            jobs.append(TurnJob(t, cond, direct, truncated=cut))
        if not jobs or all(j.direct.n == 0 for j in jobs):
            raise RowSkip("empty_response", "no instruction token to score")
        return jobs

    def combine(self, record: dict, jobs: list[TurnJob]) -> Score:
        p = self.params
        terms = self.ratio_terms(jobs, p.ratio)
        comp = {"loss_q_cond": terms.loss_cond, "loss_q_direct": terms.loss_direct, "n_q_cond": sum(terms.n_c),
                "n_q_direct": sum(terms.n_d), "ratio": p.ratio, "per_turn": terms.per_turn}
        truncated = any(j.truncated for j in jobs)
        n_in, n_used = self.token_counts(jobs)
        value = self.aggregate(terms, p.ratio)
        return Score({"rifd": value}, "truncated_ok" if truncated else "ok", components=comp, n_tokens_in=n_in, n_tokens_used=n_used)
