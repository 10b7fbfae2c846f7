"""Selective Reflection-Tuning (methods.md C2): the student decides which teacher rewrites to keep.

Variants of a row: ``ori = (Q0, A0)``; ``Q = (Q′, A′)`` (instruction reflection on ori);
``A = (Q0, A*)`` (response reflection on ori); ``QA = (Q′, A″)`` (response reflection on Q). The
teacher calls are those of Reflection-Tuning (:mod:`curate.rewrite.reflection`: same prompts,
parser, retry, length guard and input policy). The student scores each variant with the existing
IFD and r-IFD scorers (:mod:`curate.scorers.ifd`, :mod:`curate.scorers.rifd`), run in-process on the
variant rows; defaults are the reference settings (Vicuna template, ``max_length`` 2048, PPL ratios,
IFD's direct pass on the bare response) with the bundled SmolLM2-135M-Instruct on the ``hf`` backend.

The decision tree is the reference's (:func:`decide`)::

    if IFD(Q) > IFD(ori):                 # Q′ is harder for the student: accept it
        if rIFD(QA) < rIFD(Q):            #   A″ is easier to connect to Q′: accept it
            emit QA iff rIFD(QA) < 1 and IFD(QA) < 1
        else: Q is counted, not emitted
    else:                                 # reject Q′
        if rIFD(A) < rIFD(ori):
            emit A iff rIFD(A) < 1 and IFD(A) < 1
        else: ori is counted, not emitted

A NaN in any quantity a comparison on the path reads (both gate values are always read) makes the
row ``undecidable``: nothing is emitted. ``emit_unimproved`` decides what a row whose tree emits
nothing (a "counted, not emitted" leaf, a failed gate, or an A″/A* that did not parse) becomes:
``none`` (the reference: nothing; the row is dropped, reason ``unimproved``, or ``parse_failed``),
``ori`` (the original passes through, reason ``unimproved``) or ``Q`` (on the Q′ side of the tree the
Q variant is emitted; on the other side nothing). The offered variant must pass the gates the
reference applies to the Q and ori rows it counts: IFD < 1 and r-IFD < 1 (a NaN fails); its r-IFD
is scored when the tree did not need it (``ori`` on the Q′ side, or after an A″/A* that did not
parse). A row whose variant fails the gates is dropped as with ``none``; the rationale records
``unimproved_gate`` (passed | failed | undecidable).

**Early branching** (exact): phase 1 runs instruction reflection and scores IFD(ori) and IFD(Q); the
one response reflection a row still needs is then made on Q (when IFD(Q) > IFD(ori)) or on ori
(otherwise), and only that side's r-IFD / IFD passes run. So a row costs two teacher calls (plus a
merge call under ``input_policy: compress`` and a retry per reply that does not parse) instead of
the reference's three, and the numbers of the other side are never computed (NaN in the rationale).
A Q′ that does not parse after its retry, or whose reply was cut off by its token limit, is no Q
variant: the row takes the "reject Q′" side, which is where the reference's per-field fallback
(Q′ := Q0, A′ := A0, so IFD(Q) = IFD(ori)) sends it too. A teacher call that fails (``error``) or is
refused by a cap (``budget_exhausted``), and a response reflection cut off by its token limit
(``truncated``: never parsed), stop the row with that reason, and so does a Q variant that the
length guard of its response reflection refuses (``skipped_too_long``).

**Rationale.** Every decided or undecidable row records the leaf (``branch``: ``QA``, ``Q_kept``,
``QA_gate_failed``, ``QA_parse_failed``, ``A``, ``ori_kept``, ``A_gate_failed``, ``A_parse_failed``,
``undecidable``; or ``error``, ``budget_exhausted``, ``truncated``, ``skipped_too_long``), the eight
numbers (IFD and r-IFD of ori, A, Q, QA; JSON ``null`` = NaN: not computed, or the scorer's status
was not ok) with each variant's scorer status, and the teacher
statuses — in the generation record of an emitted row and in the disposition ``detail`` (JSON) of
every other row. Emitted rows have origin ``selective_reflection:QA`` / ``:A`` / ``:Q`` and the original
row as their parent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, Field

from curate.lm.spec import LMParams
from curate.rewrite.base import UnitResult
from curate.rewrite.reflection import (
    Job,
    Outcome,
    Pair,
    ReflectionBase,
    ReflectionCommon,
    count,
    guard,
    reflect,
    user_assistant,
)

VARIANTS = ("ori", "A", "Q", "QA")
NAN = math.nan
#: teacher statuses that stop a row with that reason (a truncated response reflection is no parse failure)
STOPS = ("error", "budget_exhausted", "truncated")
#: the leaves where the tree emits nothing
NO_EMIT = ("Q_kept", "QA_gate_failed", "QA_parse_failed", "ori_kept", "A_gate_failed", "A_parse_failed")


class StudentParams(LMParams):
    """The student model and how it scores (the IFD and r-IFD scorers' parameters)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    template: Literal["alpaca", "wiz", "vicuna", "none", "chat"] = Field("vicuna",
                                                                         description="Template of both scorers (reference: vicuna).")
    max_length: int = Field(2048, gt=1, description="Tokens per scored sequence (reference: 2048).")
    ratio: Literal["ppl", "loss"] = Field("ppl", description="PPL ratios (reference) or loss ratios.")
    direct_prefix: Literal["bare", "header"] = Field("bare",
                                                     description="IFD's direct pass: the bare response (reference) or behind the cue.")


class SelectiveParams(ReflectionCommon):
    student: StudentParams = Field(default_factory=StudentParams, description="The student that scores the variants.")
    emit_unimproved: Literal["none", "ori", "Q"] = Field(
        "none", description="What a row whose tree emits nothing becomes: nothing (reference), its original, or its Q "
                            "variant; the original or Q only if it passes IFD < 1 and r-IFD < 1 (the reference's gates).")


# -- the decision tree ----------------------------------------------------------------------------

@dataclass
class Numbers:
    """IFD and r-IFD per variant (NaN: not computed or not ok)."""

    ifd: dict[str, float] = field(default_factory=lambda: dict.fromkeys(VARIANTS, NAN))
    rifd: dict[str, float] = field(default_factory=lambda: dict.fromkeys(VARIANTS, NAN))

    def record(self) -> dict[str, dict[str, float | None]]:
        def clean(d):
            return {k: (None if math.isnan(v) else v) for k, v in d.items()}

        return {"ifd": clean(self.ifd), "rifd": clean(self.rifd)}


def _nan(*xs: float) -> bool:
    return any(math.isnan(x) for x in xs)


def first_branch(n: Numbers, have_q: bool) -> str:
    """``Q`` (accept Q′), ``ori`` (reject Q′) or ``undecidable``. No Q variant (Q′ did not parse): ``ori``
    (nothing is compared)."""
    if not have_q:
        return "ori"
    if _nan(n.ifd["Q"], n.ifd["ori"]):
        return "undecidable"
    return "Q" if n.ifd["Q"] > n.ifd["ori"] else "ori"


def second_branch(side: str, n: Numbers) -> str:
    """The leaf on ``side`` (``Q`` or ``ori``) once its response variant is scored."""
    base, new = ("Q", "QA") if side == "Q" else ("ori", "A")
    if _nan(n.rifd[new], n.rifd[base]):
        return "undecidable"
    if not n.rifd[new] < n.rifd[base]:
        return "Q_kept" if side == "Q" else "ori_kept"
    if _nan(n.rifd[new], n.ifd[new]):
        return "undecidable"
    if n.rifd[new] < 1 and n.ifd[new] < 1:
        return new
    return f"{new}_gate_failed"


def decide(n: Numbers, have_q: bool = True) -> str:
    """The reference tree on all numbers at once (the step computes the same in two phases)."""
    side = first_branch(n, have_q)
    return side if side == "undecidable" else second_branch(side, n)


# -- the rewriter ---------------------------------------------------------------------------------

@dataclass
class RowState:
    pair: Pair
    instruction: Outcome | None = None
    response: Outcome | None = None
    side: str | None = None
    branch: str | None = None
    numbers: Numbers = field(default_factory=Numbers)
    statuses: dict[str, dict[str, str]] = field(default_factory=dict)
    guard_detail: str | None = None
    unimproved_gate: str | None = None  # emit_unimproved: passed | failed | undecidable (the offered variant's gates)

    @property
    def q(self) -> tuple[str, str] | None:
        o = self.instruction
        return (o.values["new_instruction"], o.values["new_answer"]) if o is not None and o.ok else None

    def rationale(self) -> dict[str, Any]:
        teacher = {k: o.status for k, o in (("instruction", self.instruction), ("response", self.response)) if o is not None}
        out = {"branch": self.branch, "side": self.side, **self.numbers.record(), "scorer_status": self.statuses, "teacher": teacher}
        if self.unimproved_gate is not None:
            out["unimproved_gate"] = self.unimproved_gate
        return out


class SelectiveReflection(ReflectionBase):
    """The ``selective_reflection`` rewrite step (methods.md C2; see the module docstring)."""

    method = "selective_reflection"
    # 1.1: an A′ equal to the row's answer is unchanged (no Q variant); 1.2: the parser and reply budget of
    # reflection 1.2, truncated replies, emit_unimproved gated by IFD < 1 and r-IFD < 1
    version = "1.2"
    Params = SelectiveParams

    def __init__(self, name, params=None, context=None):
        super().__init__(name, params, context)
        self._scorers = None

    def guard_tokenizer_name(self) -> str:
        s = self.params.student
        return s.tokenizer or s.model

    # -- the student ------------------------------------------------------------------------------
    @property
    def scorers(self):
        """(IFD scorer, r-IFD scorer) with the student's settings."""
        if self._scorers is None:
            from curate.scorers.base import ScorerContext
            from curate.scorers.ifd import IFDScorer
            from curate.scorers.rifd import RIFDScorer

            s = self.params.student
            lm = LMParams.of(s).model_dump()
            common = {**lm, "template": s.template, "max_length": s.max_length}
            ctx = ScorerContext(torch_threads=self.context.torch_threads, seed=self.context.seed)
            self._scorers = (IFDScorer("student_ifd", {**common, "ratio": s.ratio, "direct_prefix": s.direct_prefix}, ctx),
                             RIFDScorer("student_rifd", {**common, "ratio": s.ratio}, ctx))
        return self._scorers

    def fingerprint(self) -> dict[str, Any]:
        ifd, rifd = self.scorers
        return {**super().fingerprint(), "student": {"ifd": ifd.keyed_fingerprint(), "rifd": rifd.keyed_fingerprint()}}

    def plan_calls(self, n_records: int) -> int:
        """Most calls: per row, instruction reflection and one response reflection (+ the merge
        under compress), each with its retry."""
        per = 2 + (1 if self.params.input_policy == "compress" else 0)
        return n_records * per * (2 if self.params.parse_retry else 1)

    def score(self, which: str, items: list[tuple[RowState, str, list[dict[str, Any]]]]) -> None:
        """Score (row, variant, messages) items with the ``ifd`` or ``rifd`` scorer into the rows' numbers."""
        if not items:
            return
        ifd, rifd = self.scorers
        scorer = ifd if which == "ifd" else rifd
        # identical variants (a fallback Q or A* equal to ori under match_reference) are scored once,
        # so they compare equal exactly, not up to batch numerics
        keys = [json.dumps(msgs, sort_keys=True) for _, _, msgs in items]
        unique: dict[str, list[dict[str, Any]]] = {}
        for key, (_, _, msgs) in zip(keys, items):
            unique.setdefault(key, msgs)
        records = [{"sample_id": f"variant-{i}", "messages": msgs, "format": "derived", "original": None, "tools": None}
                   for i, msgs in enumerate(unique.values())]
        by_key = dict(zip(unique, scorer.score_records(records)))
        for key, (st, variant, _) in zip(keys, items):
            sc = by_key[key]
            ok = sc.status in ("ok", "truncated_ok")
            getattr(st.numbers, which)[variant] = float(sc.values[which]) if ok else NAN
            st.statuses.setdefault(variant, {})[which] = sc.status

    # -- the unit ---------------------------------------------------------------------------------
    def run_unit(self, unit: str, records: list[dict[str, Any]]) -> UnitResult:
        out = UnitResult()
        pairs, stats = self.begin(unit, records, out)
        states = {x.sample_id: RowState(x) for x in pairs}

        # phase 1: Q′ (after the merge under compress), then IFD(ori) and IFD(Q)
        merged = self.compress(pairs)
        kept, jobs, failed = self.instruction_jobs(pairs, merged)
        for sid, o in failed.items():
            states[sid].instruction = o
        for x, o in zip(kept, reflect(self, jobs)):
            if x.sample_id in merged:
                o.exchanges = list(merged[x.sample_id].exchanges) + o.exchanges
            states[x.sample_id].instruction = o
        live = []
        for st in states.values():
            o = st.instruction
            count(stats, "instruction", o.status)
            if o.status in ("error", "budget_exhausted"):  # a truncated Q′ is no Q variant, as one that does not parse
                st.branch = o.status
            else:
                live.append(st)
        self.score("ifd", [(st, "ori", user_assistant(st.pair.user, st.pair.answer)) for st in live]
                   + [(st, "Q", user_assistant(*st.q)) for st in live if st.q is not None])
        for st in live:
            st.side = first_branch(st.numbers, st.q is not None)
            if st.side == "undecidable":
                st.branch = "undecidable"

        # phase 2: the one response reflection each decided row needs, then that side's numbers
        todo, rjobs = [], []
        for st in live:
            if st.branch is not None:
                continue
            x = st.pair
            if st.side == "Q":  # the length guard again, on what this call shows: Q′ and A′
                q_ins, q_ans = st.q
                shown, why = guard(Pair(x.sample_id, q_ins, q_ins, "", q_ans, q_ans), self.guard_tokenizer, self.params.max_length,
                                   self.params.min_answer_tokens)
                if shown is None:
                    st.branch, st.guard_detail = "skipped_too_long", f"the Q variant: {why}"
                    continue
                rjobs.append(Job(x.sample_id, "response", q_ins, "", shown.answer_shown, fallback={"better_answer": q_ans}))
            else:
                rjobs.append(Job(x.sample_id, "response", x.instruction, x.input, x.answer_shown, fallback={"better_answer": x.answer}))
            todo.append(st)
        for st, o in zip(todo, reflect(self, rjobs)):
            st.response = o
            count(stats, "response", o.status)
            if o.status in STOPS:
                st.branch = o.status
            elif not o.ok:
                st.branch = "QA_parse_failed" if st.side == "Q" else "A_parse_failed"
        scored = [st for st in todo if st.branch is None]
        rifd_items, ifd_items = [], []
        for st in scored:
            better = st.response.values["better_answer"]
            if st.side == "Q":
                rifd_items += [(st, "Q", user_assistant(*st.q)), (st, "QA", user_assistant(st.q[0], better))]
                ifd_items.append((st, "QA", user_assistant(st.q[0], better)))
            else:
                rifd_items += [(st, "ori", user_assistant(st.pair.user, st.pair.answer)), (st, "A", user_assistant(st.pair.user, better))]
                ifd_items.append((st, "A", user_assistant(st.pair.user, better)))
        self.score("rifd", rifd_items)
        self.score("ifd", ifd_items)
        for st in scored:
            st.branch = second_branch(st.side, st.numbers)

        self.score_unimproved(list(states.values()))

        for st in states.values():
            count(stats, "branch", st.branch)
            self._emit(st, out, stats)
        stats["calls"] = self.budget_stats()
        out.stats = stats
        return out

    def _emit(self, st: RowState, out: UnitResult, stats: dict[str, Any]) -> None:
        x = st.pair
        variant = self.unimproved_variant(st)
        if variant is not None:  # the reference's gates on the Q / ori leaves it counts: IFD < 1 and r-IFD < 1
            i, r = st.numbers.ifd[variant], st.numbers.rifd[variant]
            st.unimproved_gate = "undecidable" if _nan(i, r) else "passed" if i < 1 and r < 1 else "failed"
        detail = json.dumps(st.rationale(), sort_keys=True)
        if st.branch in STOPS:
            o = st.response if st.response is not None and st.response.status == st.branch else st.instruction
            out.dispositions[x.sample_id] = ("dropped", st.branch, f"{o.detail}; rationale {detail}")
            return
        if st.branch == "skipped_too_long":
            out.dispositions[x.sample_id] = ("dropped", "skipped_too_long", f"{st.guard_detail}; rationale {detail}")
            return
        if st.branch == "undecidable":
            out.dispositions[x.sample_id] = ("dropped", "undecidable", detail)
            return
        if st.branch in ("QA", "A"):
            q, a = (st.q[0], st.response.values["better_answer"]) if st.branch == "QA" else (x.user, st.response.values["better_answer"])
            self._derive(st, st.branch, q, a, out, stats)
            return
        # the tree emits nothing: Q_kept, QA_gate_failed, QA_parse_failed, ori_kept, A_gate_failed, A_parse_failed
        parse_failed = st.branch.endswith("_parse_failed")
        if variant is not None and st.unimproved_gate == "passed":
            if variant == "Q":
                self._derive(st, "Q", *st.q, out, stats)
                return
            out.dispositions[x.sample_id] = ("passthrough", "unimproved", detail)
            count(stats, "emitted", "ori")
            return
        if variant is not None:
            count(stats, "unimproved_gate", st.unimproved_gate)
        out.dispositions[x.sample_id] = ("dropped", "parse_failed" if parse_failed else "unimproved", detail)

    def unimproved_variant(self, st: RowState) -> str | None:
        """The variant ``emit_unimproved`` offers for a row whose tree emits nothing: ``Q`` (on the Q′
        side only) or ``ori``; None for the other rows and with ``none``."""
        e = self.params.emit_unimproved
        if st.branch not in NO_EMIT or e == "none" or (e == "Q" and st.side != "Q"):
            return None
        return e

    def score_unimproved(self, states: list[RowState]) -> None:
        """``emit_unimproved``: the variant a row falls back to must pass the reference's gates, so
        score the r-IFD the tree did not need (Q after ``QA_parse_failed``; ori on the Q′ side or
        after ``A_parse_failed``)."""
        self.score("rifd", [(st, v, self._variant_messages(st, v)) for st in states
                            if (v := self.unimproved_variant(st)) is not None and "rifd" not in st.statuses.get(v, {})])

    @staticmethod
    def _variant_messages(st: RowState, variant: str) -> list[dict[str, Any]]:
        return user_assistant(*st.q) if variant == "Q" else user_assistant(st.pair.user, st.pair.answer)

    def _derive(self, st: RowState, variant: str, q: str, a: str, out: UnitResult, stats: dict[str, Any]) -> None:
        p, x = self.params, st.pair
        exchanges = list(st.instruction.exchanges) + (list(st.response.exchanges) if st.response is not None else [])
        parse = {"instruction": {"status": st.instruction.status, **st.instruction.parse}}
        if st.response is not None:
            parse["response"] = {"status": st.response.status, **st.response.parse}
        generation = self.generation(exchanges, variant=variant, rationale=st.rationale(), parse=parse,
                                     input_policy=p.input_policy if x.input else None, length_guard=x.guard,
                                     match_reference=p.match_reference, emit_unimproved=p.emit_unimproved)
        original = {"instruction": x.instruction if variant == "A" else q, "input": x.input if variant == "A" else "", "output": a}
        out.derive(user_assistant(q, a), [x.sample_id], variant, generation, original=original)
        count(stats, "emitted", variant)

