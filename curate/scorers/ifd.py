"""IFD — Instruction-Following Difficulty (Cherry LLM; methods.md A1).

``IFD = L_c / L_d``: the mean CE of the response conditioned on the templated instruction, over the
mean CE of the response behind the template's assistant cue alone (``direct_prefix: header``; the
Cherry form) or bare (``bare``; Superfiltering). ``ratio: ppl`` gives ``PPL_c / PPL_d =
exp(L_c − L_d)`` instead; both select the same rows at a threshold of 1, only the ranking differs.

Range (0, ∞); orientation ``band``: IFD > 1 means the instruction does not help (a misaligned pair);
the most valuable rows have the largest IFD at or below 1 — select with a ``threshold`` step
(``max: 1``) then ``top_k``.

Multi-turn (E3, default each / history / token_weighted): one conditioned forward over the
conversation (cut at ``max_length``) scores every reply, one target span per turn; each reply also
gets its own direct pass; the conversation IFD is ``Σ nll_c / Σ n_c`` over ``Σ nll_d / Σ n_d``;
per-turn values are kept in the components. Each turn keeps ``equal_span`` truncation: both of its
passes score the same first n reply tokens. A reply whose prompt starts at or past ``max_length``
is not scored (the row is ``truncated_ok`` and ``turns_scored`` lists the turns that were); when
that is already the case for the first scored turn the row is ``skipped_too_long``.

Components per row: ``loss_cond``, ``loss_direct``, ``n_cond``, ``n_direct``, ``ppl_cond``,
``ppl_direct``, ``span_mode``, ``direct_prefix``, ``per_turn`` (IFD per scored turn) and the
truncation record.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from curate.scorers.base import Score
from curate.scorers.lossbase import LossParams, LossScorer, Part, RowSkip, TurnJob
from curate.templates import split_turns


class IFDParams(LossParams):
    ratio: Literal["loss", "ppl"] = Field("loss", description="loss: L_c / L_d (Cherry); ppl: exp(L_c − L_d) (Superfiltering).")
    direct_prefix: Literal["header", "bare"] = Field(
        "header", description="Direct pass: the template's assistant cue + response, or the response alone.")


class IFDScorer(LossScorer):
    method = "ifd"
    version = "1.1"
    outputs = {"ifd": "band"}
    Params = IFDParams

    def jobs(self, record: dict) -> list[TurnJob]:
        p = self.params
        msgs = record["messages"]
        jobs: list[TurnJob] = []
        selected = self.selected_turns(msgs)
        if p.context == "history":
            rendered = self.template.render(msgs, record)
            ids, spans = self.token_spans(rendered, rendered.replies)
            units = [(t, rendered, ids, spans[t]) for t in selected]
        else:
            units = []
            for t in selected:
                rendered = self.template.render(self.turn_messages(msgs, t), record)
                ids, spans = self.token_spans(rendered, rendered.replies)
                units.append((t, rendered, ids, spans[-1]))
        _, turn_texts = split_turns(msgs)
        header = self.template.header() if p.direct_prefix == "header" else ""
        for t, rendered, ids, (s, e) in units:
            if s >= p.max_length:  # the prompt alone fills the budget: nothing of this reply fits
                if t == selected[0]:
                    raise RowSkip("skipped_too_long", f"the prompt of turn {t} has {s} tokens, max_length={p.max_length}")
                jobs.append(TurnJob(t, Part([], (0, 0), len(ids)), None, truncated=True))  # not forwarded
                continue
            d_ids, d_start = self.direct_part(header, turn_texts[t][1], rendered.add_special_tokens)
            if p.match_reference:  # reference budgets: cond cut at max_length; direct at max_length − s + slack
                c_end = min(e, p.max_length)
                d_end = min(len(d_ids), p.max_length - s + self.reference_direct_slack[p.template])
                cond = Part(ids[:c_end], (s, c_end), len(ids))
                direct = Part(d_ids[:d_end], (max(d_start, 1), d_end), len(d_ids))
                cut = c_end < e
            else:  # equal_span: both passes score exactly the first n response tokens
                cond, direct, cut = self.equal_span(ids, (s, e), d_ids, d_start)
            jobs.append(TurnJob(t, cond, direct, truncated=cut))
        scored = [j for j in jobs if j.direct is not None]
        if not scored or all(j.cond.n == 0 for j in scored):
            raise RowSkip("empty_response", "no response token to score")
        return jobs

    def combine(self, record: dict, jobs: list[TurnJob]) -> Score:
        p = self.params
        terms = self.ratio_terms(jobs, p.ratio)
        truncated = any(j.truncated for j in jobs)
        comp: dict[str, Any] = {"span_mode": p.span_mode, "direct_prefix": p.direct_prefix, "ratio": p.ratio,
                                "turns_scored": [j.turn for j in jobs if j.direct is not None and j.cond.n], "truncated": truncated}
        if not terms.per_turn:
            return Score.failed(self.outputs, "skipped_too_long", "RowSkip", "no turn left after truncation")
        lc, ld = terms.loss_cond, terms.loss_direct
        comp.update(loss_cond=lc, loss_direct=ld, n_cond=sum(terms.n_c), n_direct=sum(terms.n_d), ppl_cond=math.exp(lc),
                    ppl_direct=math.exp(ld), per_turn=terms.per_turn)
        value = self.aggregate(terms, p.ratio)
        n_in, n_used = self.token_counts(jobs)
        if min(terms.n_c) < p.min_response_tokens:
            return Score({"ifd": math.nan}, "short_response", "RowSkip",
                         f"{min(terms.n_c)} response tokens < min_response_tokens={p.min_response_tokens}", comp, n_in, n_used)
        return Score({"ifd": value}, "truncated_ok" if truncated else "ok", components=comp, n_tokens_in=n_in, n_tokens_used=n_used)
