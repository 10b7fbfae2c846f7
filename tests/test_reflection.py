"""Reflection-Tuning (C1) and Selective Reflection-Tuning (C2): parser, decision tree, emission, and
small real runs with the bundled SmolLM2-135M-Instruct as teacher and student (no stand-ins)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from reflection_rows import alpaca_records

from curate.lm.calls import Call, Decoding, Reply
from curate.prompts import ALL, REFLECTION_PROMPTS
from curate.rewrite import rewriter_class
from curate.rewrite.base import RewriteContext, UnitResult
from curate.rewrite.reflection import (
    KIND_FIELDS,
    Outcome,
    Pair,
    ReflectionTuning,
    guard,
    single_turn,
)
from curate.rewrite.selective import Numbers, RowState, SelectiveReflection, decide
from curate.rewrite.tags import is_placeholder, parse_field, parse_tagged
from curate.rewrite.tokens import load_tokenizer

DATA = Path(__file__).resolve().parent / "data"
NAN = math.nan


# -- the parser on recorded real replies ----------------------------------------------------------

def recorded() -> list[dict]:
    return json.loads((DATA / "reflection_smollm2_outputs.json").read_text(encoding="utf-8"))["replies"]


#: (row, call) -> the parse of each field, read by eye from the recorded text
MISSING_BOTH = {"new_instruction": "missing", "new_answer": "missing"}
RECORDED_EXPECTED: dict[tuple[int, str], dict[str, str]] = {
    (5, "compress"): {"merged_instruction": "placeholder"},  # "[Merged Instruction] your merged instruction [End]"
    (8, "compress"): {"merged_instruction": "missing"},  # answers the instruction instead
    (12, "compress"): {"merged_instruction": "placeholder"},
    **{(row, "instruction"): MISSING_BOTH for row in (0, 1, 2, 3, 4)},  # no tags: rewrites, repetition loops
    **{(row, "response"): {"better_answer": "missing"} for row in (0, 1, 2, 3, 5, 8, 12)},  # "[Insert Instructions]" is no tag
    (4, "response"): {"better_answer": "placeholder"},  # "The answer is: [Better Answer] your better answer" (no [End])
}


def test_recorded_replies_parse_as_read_by_eye():
    replies = recorded()
    assert {r["prompt"] for r in replies} <= {p.id for p in REFLECTION_PROMPTS}
    got = {}
    for r in replies:
        kind = r["call"].split("_")[0]
        got[(r["row"], r["call"])] = {k: f.status for k, f in parse_tagged(r["text"], KIND_FIELDS[kind]).items()}
    assert got == RECORDED_EXPECTED


# -- the parser on hand-written edge cases --------------------------------------------------------

def test_a_bare_end_never_ends_a_segment():
    text = ("Analysis: too short.\n[New Instruction] Write a story whose last line is \"The End\". [End]\n"
            "[New Answer] Once upon a time... The End.\nEnd of story, Endless fun. [End]")
    p = parse_tagged(text, ("new_instruction", "new_answer"))
    assert p["new_instruction"].value == 'Write a story whose last line is "The End".'
    assert p["new_answer"].value == "Once upon a time... The End.\nEnd of story, Endless fun."


def test_a_segment_ends_at_the_next_tag_or_the_end_of_the_text():
    p = parse_tagged("[New Instruction] Explain tides.\n[New Answer] The moon pulls the oceans", ("new_instruction", "new_answer"))
    assert (p["new_instruction"].status, p["new_instruction"].value) == ("ok", "Explain tides.")
    assert (p["new_answer"].status, p["new_answer"].value) == ("ok", "The moon pulls the oceans")  # no [End]: runs to the end


def test_tags_match_case_and_spacing_and_bold_markup():
    p = parse_field("**[Better Answer]**: Paris is the capital. **[END]**", "better_answer")
    assert (p.status, p.value) == ("ok", "Paris is the capital.")
    assert parse_field("[ better  answer ]\nYes.\n[end]", "better_answer").value == "Yes."
    # a bullet list keeps its first star
    assert parse_field("[Better Answer]\n* one\n* two\n[End]", "better_answer").value == "* one\n* two"


def test_two_tags_identical_count_once_different_are_ambiguous():
    same = parse_field("[Better Answer] A [End]\n[Better Answer] A [End]", "better_answer")
    assert (same.status, same.value, same.n_segments) == ("ok", "A", 2)
    # repeats that differ only in case or spacing are one answer, not two (the first is kept)
    cased = parse_field("[Better Answer] Yes [End]\n[Better Answer] yes  [End]", "better_answer")
    assert (cased.status, cased.value) == ("ok", "Yes")
    diff = parse_field("[Better Answer] A [End]\n[Better Answer] B [End]", "better_answer")
    assert (diff.status, diff.value) == ("ambiguous", None)
    # the layout line echoed before the real answer: the placeholder is discarded, the answer kept
    echo = parse_field("[Better Answer] your better answer [End]\n[Better Answer] Rome. [End]", "better_answer")
    assert (echo.status, echo.value) == ("ok", "Rome.")


@pytest.mark.parametrize("text, status", [
    ("no tags at all", "missing"),
    ("The End. End.", "missing"),
    ("[Better Answer][End]", "empty"),
    ("[Better Answer]   \n[End]", "empty"),
    ("[Better Answer] your better answer [End]", "placeholder"),
    ("[Better Answer]\n[Your Answer]\n[End]", "placeholder"),
    ("[Better Answer] N/A [End]", "placeholder"),
    ("[Better Answer] ... [End]", "placeholder"),
    ("[Better Answer] The answer is N/A for this row, see below. [End]", "ok"),
    # real answers, not fillers
    ("[Better Answer] None. [End]", "ok"),
    ("[Better Answer] null [End]", "ok"),
    ("[Better Answer] Na [End]", "ok"),
])
def test_field_statuses(text, status):
    assert parse_field(text, "better_answer").status == status


def test_placeholders_ours_and_the_references():
    assert is_placeholder("Your new instruction here") and is_placeholder("<your answer to the new instruction>")
    assert is_placeholder("Insert the new instruction") and is_placeholder("write your answer here")
    assert not is_placeholder("Answer the question in one word.")
    assert not is_placeholder("Write an analysis.") and not is_placeholder("None.")
    # the reference tests by substring, case-sensitively, per field: "N/A" or "your answer" in the new
    # answer, "your instruction" in the new instruction, nothing in the better answer
    assert is_placeholder("Write N/A when unknown.", True, "new_answer")
    assert not is_placeholder("Write N/A when unknown.")
    assert not is_placeholder("Write n/a when unknown.", True, "new_answer")
    assert not is_placeholder("Write N/A when unknown.", True, "new_instruction")
    assert is_placeholder("Put your instruction here", True, "new_instruction")
    assert not is_placeholder("Your instruction", True, "new_instruction") and not is_placeholder("Your answer", True, "new_answer")
    assert not is_placeholder("your answer", True, "better_answer")


def test_a_list_number_left_before_the_next_tag_is_stripped():
    """The teacher numbers its steps; without "[End]" the "3." of the next step ends the new
    instruction's segment (the reference strips "\n\n3." too). Closed by "[End]", nothing is cut."""
    p = parse_tagged("2. [New Instruction] Explain how tides form.\n\n3. [New Answer] The moon pulls the oceans. [End]",
                     KIND_FIELDS["instruction"])
    assert p["new_instruction"].value == "Explain how tides form." and p["new_answer"].value == "The moon pulls the oceans."
    p = parse_tagged("[New Instruction] Explain how tides form.\n3)\n[New Answer] The moon. [End]", KIND_FIELDS["instruction"])
    assert p["new_instruction"].value == "Explain how tides form."
    kept = parse_field("[Better Answer] Steps:\n1. Mix.\n2. [End]", "better_answer")
    assert kept.value == "Steps:\n1. Mix.\n2."
    bold = parse_field("[Better Answer] **Paris** is the capital.\n\n3.", "better_answer")  # no [End]: only the number goes
    assert bold.value == "**Paris** is the capital."


def test_match_reference_takes_the_first_segment_and_needs_one_better_answer():
    two = "[New Instruction] Name a fruit. [End]\n[New Instruction] Name a vegetable. [End]\n[New Answer] Apple. [End]"
    assert parse_field(two, "new_instruction").status == "ambiguous"  # ours
    ref = parse_field(two, "new_instruction", match_reference=True)
    assert (ref.status, ref.value, ref.n_segments) == ("ok", "Name a fruit.", 2)
    # the first segment decides even when a later one is real
    first = parse_field("[New Answer] N/A [End]\n[New Answer] Apple. [End]", "new_answer", match_reference=True)
    assert first.status == "placeholder"
    assert parse_field("[Better Answer] A [End]\n[Better Answer] A [End]", "better_answer", match_reference=True).status == "ambiguous"
    assert parse_field("[Better Answer] your answer [End]", "better_answer", match_reference=True).value == "your answer"


def test_the_reference_retry_rule():
    from curate.rewrite.reflection import wants_retry

    def retry(text, kind, mr):
        return wants_retry(kind, parse_tagged(text, KIND_FIELDS[kind], mr), mr)

    # instruction reflection: the reference asks again only when neither field has a non-empty segment
    assert retry("no tags", "instruction", True) and retry("[New Instruction] [End]", "instruction", True)
    assert not retry("[New Instruction] your instruction [End]", "instruction", True)  # falls back instead
    assert retry("[New Instruction] your instruction [End]", "instruction", False)  # ours: any field not ok
    assert not retry("[New Instruction] Name a fruit. [End] [New Answer] Apple. [End]", "instruction", True)
    # response reflection: when the reply has not exactly one [Better Answer] segment
    assert retry("no tags", "response", True) and retry("[Better Answer] A [End] [Better Answer] B [End]", "response", True)
    assert not retry("[Better Answer] [End]", "response", True) and retry("[Better Answer] [End]", "response", False)


def test_a_segment_cut_off_by_the_token_limit_is_never_a_value():
    from curate.rewrite.reflection import cut_off

    text = "[New Instruction] Explain tides. [End]\n[New Answer] The moon pulls"
    p = parse_tagged(text, KIND_FIELDS["instruction"], truncated=True)
    assert (p["new_instruction"].status, p["new_answer"].status) == ("ok", "truncated") and p["new_answer"].value is None
    assert parse_field("[Better Answer] Paris. [End] and then", "better_answer", truncated=True).status == "ok"
    call = Call([{"role": "user", "content": "x"}], {"id": "reflect_response_v1"}, Decoding(max_tokens=8))
    assert cut_off(Reply("t", "truncated", "k", n_tokens=8, finish_reason="length"), call)
    assert not cut_off(Reply("t", "ok", "k", n_tokens=8, finish_reason="stop"), call)
    assert cut_off(Reply("t", "ok", "k", n_tokens=8), call) and not cut_off(Reply("t", "ok", "k", n_tokens=7), call)  # no finish reason


def test_instruction_reflection_needs_both_fields():
    p = parse_tagged("[New Instruction] Compare two sorting algorithms. [End]\n[New Answer] your answer to the new instruction [End]",
                     KIND_FIELDS["instruction"])
    assert p["new_instruction"].status == "ok" and p["new_answer"].status == "placeholder"



def _reply(text: str) -> tuple[str, Call, Reply]:
    return ("instruction", Call([{"role": "user", "content": "x"}], {"id": "reflect_instruction_v1"}, Decoding(max_tokens=8)),
            Reply(text, "ok", "k" * 64, 10, 8))


def test_reference_fallback_and_an_unchanged_instruction(tmp_path):
    from curate.rewrite.reflection import Job, _failed

    (rec,) = alpaca_records((3,))
    pair, _ = single_turn(rec)
    job = Job(pair.sample_id, "instruction", pair.instruction, "", pair.answer,
              fallback={"new_instruction": pair.user, "new_answer": pair.answer})
    text = "[New Instruction] your new instruction [End]\n[New Answer] Brunchfast: breakfast and brunch. [End]"
    parsed = parse_tagged(text, KIND_FIELDS["instruction"])
    assert not _failed(job, [_reply(text)], parsed, False, "after one retry").ok  # ours: parse_failed, nothing emitted
    fb = _failed(job, [_reply(text)], parsed, True, "after one retry")  # the reference: per-field fallback
    assert (fb.status, fb.fell_back) == ("fallback", ("new_instruction",))
    step = ReflectionTuning("r", {"mode": "instruction", "match_reference": True}, _context(tmp_path))
    out = UnitResult()
    step._emit(pair, {"instruction": fb}, None, out, {})
    (d,) = out.derived  # the reference's quirk: the old instruction with the new answer
    assert [m["content"] for m in d.messages] == [pair.user, "Brunchfast: breakfast and brunch."]
    assert d.generation["fell_back"] == ["new_instruction"]
    from curate.rewrite.reflection import parse_reply

    same = parse_reply(job, f"[New Instruction] {pair.instruction.upper()}  [End] [New Answer] Brunchfast. [End]")
    assert same["new_instruction"].status == "unchanged" and same["new_answer"].status == "ok"
    both = _failed(job, [_reply("no tags")], parse_tagged("no tags", KIND_FIELDS["instruction"]), True, "after one retry")
    out = UnitResult()
    step._emit(pair, {"instruction": both}, None, out, {})
    assert not out.derived and out.dispositions[pair.sample_id][:2] == ("passthrough", "fallback_unchanged")

def test_a_new_instruction_with_the_old_answer_is_no_pair_and_a_repeated_better_answer_no_row(tmp_path):
    from curate.rewrite.reflection import Job, parse_reply

    (rec,) = alpaca_records((3,))
    pair, _ = single_turn(rec)
    job = Job(pair.sample_id, "instruction", pair.instruction, "", pair.answer,
              fallback={"new_instruction": pair.user, "new_answer": pair.answer})
    old_answer = parse_reply(job, f"[New Instruction] Plan a brunch for twelve. [End] [New Answer] {pair.answer} [End]")
    assert old_answer["new_instruction"].status == "ok" and old_answer["new_answer"].status == "unchanged"
    step = ReflectionTuning("r", {"mode": "response"}, _context(tmp_path))
    out = UnitResult()
    step._emit(pair, {"response": Outcome("ok", {"better_answer": pair.answer})}, None, out, {})
    assert not out.derived and out.dispositions[pair.sample_id][:2] == ("passthrough", "unchanged")


# -- rows and the length guard --------------------------------------------------------------------

def test_single_turn_rows_and_the_input_split():
    with_input, plain = alpaca_records((5, 0))
    pair, why = single_turn(with_input)
    assert why is None and pair.input == "Side 1 = 4\nSide 2 = 6\nSide 3 = 8" and pair.user == with_input["messages"][0]["content"]
    assert single_turn(plain)[0].input == ""
    multi = {**plain, "messages": plain["messages"] * 2}
    system = {**plain, "messages": [{"role": "system", "content": "Be brief.", "tool_calls": None}] + plain["messages"]}
    tool = {**plain, "tools": "[]"}
    assert [single_turn(r)[1] for r in (multi, system, tool)] == ["multiturn", "system", "tool_use"]


def test_length_guard_counts_student_tokens_and_cuts_the_answer_tail():
    tok = load_tokenizer("smollm2-135m-instruct")
    (rec,) = alpaca_records((0,))
    pair, _ = single_turn(rec)
    n_q = len(tok(pair.instruction, add_special_tokens=False)["input_ids"])
    n_a = len(tok(pair.answer, add_special_tokens=False)["input_ids"])
    same, _ = guard(pair, tok, n_q + n_a, 32)
    assert same.answer_shown == pair.answer and not same.guard["truncated"]
    cut, _ = guard(pair, tok, n_q + 100, 32)
    assert pair.answer.startswith(cut.answer_shown) and cut.guard["answer_tokens_shown"] == 100
    assert len(tok(cut.answer_shown, add_special_tokens=False)["input_ids"]) == 100
    none, detail = guard(pair, tok, n_q + 10, 32)
    assert none is None and "min_answer_tokens 32" in detail


# -- the C2 decision tree -------------------------------------------------------------------------

def numbers(ifd=(NAN, NAN, NAN, NAN), rifd=(NAN, NAN, NAN, NAN)) -> Numbers:
    """Numbers for (ori, A, Q, QA)."""
    return Numbers(dict(zip(("ori", "A", "Q", "QA"), ifd)), dict(zip(("ori", "A", "Q", "QA"), rifd)))


@pytest.mark.parametrize("ifd, rifd, branch", [
    # Q side: IFD(Q) > IFD(ori)
    ((0.5, NAN, 0.8, 0.7), (NAN, NAN, 0.9, 0.6), "QA"),
    ((0.5, NAN, 0.8, 1.2), (NAN, NAN, 0.9, 0.6), "QA_gate_failed"),  # IFD(QA) >= 1
    ((0.5, NAN, 0.8, 0.7), (NAN, NAN, 1.3, 1.1), "QA_gate_failed"),  # rIFD(QA) >= 1
    ((0.5, NAN, 0.8, 0.7), (NAN, NAN, 0.6, 0.6), "Q_kept"),  # rIFD(QA) not below rIFD(Q)
    ((0.5, NAN, 0.8, 0.7), (NAN, NAN, 0.6, 0.9), "Q_kept"),
    # ori side: IFD(Q) <= IFD(ori)
    ((0.8, 0.7, 0.8, NAN), (0.9, 0.5, NAN, NAN), "A"),  # equal IFD rejects Q'
    ((0.8, 0.7, 0.3, NAN), (0.9, 0.5, NAN, NAN), "A"),
    ((0.8, 1.0, 0.3, NAN), (0.9, 0.5, NAN, NAN), "A_gate_failed"),  # IFD(A) = 1 is not < 1
    ((0.8, 0.7, 0.3, NAN), (0.9, 0.95, NAN, NAN), "ori_kept"),
    ((0.8, 0.7, 0.3, NAN), (0.9, 0.9, NAN, NAN), "ori_kept"),
    # kept leaves whose Q / ori fails the reference's gates (emit_unimproved emits nothing there)
    ((0.5, NAN, 1.2, 0.7), (0.6, NAN, 0.6, 0.9), "Q_kept"),  # IFD(Q) >= 1 (ori passes its gates)
    ((0.5, NAN, 0.8, 0.7), (1.2, NAN, 1.1, 1.1), "Q_kept"),  # rIFD(Q) >= 1, rIFD(ori) >= 1
    ((0.8, 0.7, 0.3, NAN), (1.1, 1.2, NAN, NAN), "ori_kept"),  # rIFD(ori) >= 1
    ((1.0, 0.7, 0.3, NAN), (0.9, 0.95, NAN, NAN), "ori_kept"),  # IFD(ori) = 1 is not < 1
    # NaN in any compared quantity, on every path
    ((NAN, 0.7, 0.8, 0.7), (0.9, 0.5, 0.9, 0.6), "undecidable"),  # IFD(ori)
    ((0.5, 0.7, NAN, 0.7), (0.9, 0.5, 0.9, 0.6), "undecidable"),  # IFD(Q)
    ((0.5, NAN, 0.8, 0.7), (NAN, NAN, NAN, 0.6), "undecidable"),  # rIFD(Q)
    ((0.5, NAN, 0.8, 0.7), (NAN, NAN, 0.9, NAN), "undecidable"),  # rIFD(QA)
    ((0.5, NAN, 0.8, NAN), (NAN, NAN, 0.9, 0.6), "undecidable"),  # IFD(QA), read by the gate
    ((0.8, 0.7, 0.3, NAN), (NAN, 0.5, NAN, NAN), "undecidable"),  # rIFD(ori)
    ((0.8, 0.7, 0.3, NAN), (0.9, NAN, NAN, NAN), "undecidable"),  # rIFD(A)
    ((0.8, NAN, 0.3, NAN), (0.9, 0.5, NAN, NAN), "undecidable"),  # IFD(A), read by the gate
])
def test_decision_tree(ifd, rifd, branch, tmp_path):
    n = numbers(ifd, rifd)
    assert decide(n) == branch
    # what each emit_unimproved makes of the leaf: the tree's QA / A row; where the tree emits nothing,
    # the offered row (Q on the Q' side only, or ori) only if it passes the gates the reference applies
    # to the Q and ori rows it counts (get_select_data.py: IFD < 1 and r-IFD < 1; a NaN fails them)
    side = None if branch == "undecidable" else "Q" if branch.startswith("Q") else "ori"
    for emit in ("none", "Q", "ori"):
        step = SelectiveReflection("sr", {"emit_unimproved": emit}, RewriteContext(store_dir=str(tmp_path)))
        out = UnitResult()
        step._emit(_state(branch, side, n), out, {})
        if branch in ("QA", "A"):
            expected = branch
        elif branch == "undecidable" or emit == "none" or (emit == "Q" and side != "Q"):
            expected = None
        else:
            expected = emit if n.ifd[emit] < 1 and n.rifd[emit] < 1 else None
        got = out.derived[0].variant if out.derived else "ori" if out.dispositions["s1"][0] == "passthrough" else None
        assert got == expected, emit


def test_numbers_off_the_path_are_not_read_and_a_missing_q_takes_the_ori_side():
    # Q_kept: IFD(QA) is never compared, so its NaN does not matter; the A side is never computed
    assert decide(numbers((0.5, NAN, 0.8, NAN), (NAN, NAN, 0.6, 0.9))) == "Q_kept"
    # no Q variant (Q' did not parse): the ori side, as the reference's fallback (Q = ori) gives
    assert decide(numbers((NAN, 0.7, NAN, NAN), (0.9, 0.5, NAN, NAN)), have_q=False) == "A"
    assert numbers().record()["ifd"] == {"ori": None, "A": None, "Q": None, "QA": None}


# -- C2 emission per leaf and emit_unimproved -----------------------------------------------------

def _outcome(kind: str, values: dict[str, str] | None, status: str = "ok") -> Outcome:
    call = Call([{"role": "user", "content": "x"}], {"id": f"reflect_{kind}_v1"}, Decoding(max_tokens=8))
    return Outcome(status, values or {}, [(kind, call, Reply("raw", "ok", "k" * 64, 10, 8))], {"f": {"status": status}})


def _state(branch: str, side: str | None, n: Numbers | None = None) -> RowState:
    pair = Pair("s1", "Name a fruit.", "Name a fruit.", "", "Apple.", "Apple.", {"n_tokens": 7, "truncated": False})
    n = n or numbers((0.5, NAN, 0.8, 0.7), (0.7, NAN, 0.9, 0.6))
    st = RowState(pair, _outcome("instruction", {"new_instruction": "Name three tropical fruits.", "new_answer": "Mango."}),
                  _outcome("response", {"better_answer": "Mango, papaya, guava."}), side, branch, n)
    for variant in ("ori", "Q", "QA"):
        for which in ("ifd", "rifd"):
            if not math.isnan(getattr(n, which)[variant]):
                st.statuses.setdefault(variant, {})[which] = "ok"
    return st


@pytest.mark.parametrize("branch, side, emit, expected", [
    ("QA", "Q", "none", ("derived", "QA", ("Name three tropical fruits.", "Mango, papaya, guava."))),
    ("A", "ori", "none", ("derived", "A", ("Name a fruit.", "Mango, papaya, guava."))),
    ("Q_kept", "Q", "none", ("dropped", "unimproved")),
    ("Q_kept", "Q", "Q", ("derived", "Q", ("Name three tropical fruits.", "Mango."))),
    ("Q_kept", "Q", "ori", ("passthrough", "unimproved")),
    ("QA_gate_failed", "Q", "Q", ("derived", "Q", ("Name three tropical fruits.", "Mango."))),
    ("QA_parse_failed", "Q", "none", ("dropped", "parse_failed")),
    ("ori_kept", "ori", "Q", ("dropped", "unimproved")),
    ("ori_kept", "ori", "ori", ("passthrough", "unimproved")),
    ("A_gate_failed", "ori", "none", ("dropped", "unimproved")),
    ("A_parse_failed", "ori", "ori", ("passthrough", "unimproved")),
    ("undecidable", None, "ori", ("dropped", "undecidable")),
    ("undecidable", None, "Q", ("dropped", "undecidable")),
])
def test_each_leaf_emits_what_it_should(branch, side, emit, expected, tmp_path):
    step = SelectiveReflection("sr", {"emit_unimproved": emit}, RewriteContext(store_dir=str(tmp_path)))
    out, stats = UnitResult(), {}
    step._emit(_state(branch, side), out, stats)
    if expected[0] == "derived":
        (d,) = out.derived
        assert (d.variant, d.parents, (d.messages[0]["content"], d.messages[1]["content"])) == (expected[1], ["s1"], expected[2])
        assert out.dispositions["s1"][0] == "used"
        g = d.generation
        assert g["rationale"]["branch"] == branch and g["rationale"]["ifd"]["Q"] == 0.8 and g["rationale"]["rifd"]["A"] is None
        assert set(g["calls"]) == {"instruction", "response"} and g["calls"]["instruction"]["prompt"]["id"] == "reflect_instruction_v1"
        json.dumps(g, allow_nan=False)  # the record is plain JSON (NaN written as null)
    else:
        assert not out.derived
        what, reason, detail = out.dispositions["s1"]
        assert (what, reason) == expected and json.loads(detail)["branch"] == branch


def test_emit_unimproved_never_emits_a_q_whose_r_ifd_was_not_computed(tmp_path):
    """A QA_parse_failed leaf: A'' did not parse, so the tree never scored rIFD(Q). The step scores it
    (the real student) before the gate; a Q whose r-IFD is still NaN is never emitted."""
    n = numbers((0.5, NAN, 0.8, NAN), (0.7, NAN, NAN, NAN))
    step = SelectiveReflection("sr", {"emit_unimproved": "Q", "student": {"max_length": 256}}, _context(tmp_path))
    out = UnitResult()
    step._emit(_state("QA_parse_failed", "Q", n), out, {})
    assert not out.derived and out.dispositions["s1"][:2] == ("dropped", "parse_failed")
    assert json.loads(out.dispositions["s1"][2])["unimproved_gate"] == "undecidable"
    st = _state("QA_parse_failed", "Q", numbers((0.5, NAN, 0.8, NAN), (0.7, NAN, NAN, NAN)))
    step.score_unimproved([st])
    assert st.statuses["Q"]["rifd"] == "ok" and 0 < st.numbers.rifd["Q"]
    out = UnitResult()
    step._emit(st, out, {})
    gate = st.numbers.rifd["Q"] < 1  # IFD(Q) = 0.8
    assert [d.variant for d in out.derived] == (["Q"] if gate else [])
    assert st.unimproved_gate == ("passed" if gate else "failed")


# -- prompts and the registry ---------------------------------------------------------------------

def test_prompts_are_registered_with_ids_versions_and_hashes():
    for p in REFLECTION_PROMPTS:
        assert ALL[p.id] is p and p.version and len(p.hash) == 64 and p.source == "curate"
    assert rewriter_class("reflection") is ReflectionTuning and rewriter_class("selective_reflection") is SelectiveReflection
    step = ReflectionTuning("r", {"mode": "both", "input_policy": "compress"})
    assert step.plan_calls(10) == 10 * 3 * 2
    assert SelectiveReflection("s", {"parse_retry": False}).plan_calls(10) == 20



@pytest.mark.parametrize("cls", [ReflectionTuning, SelectiveReflection])
def test_dispositions_without_a_model_call_caps_policies_and_passthrough(cls, tmp_path):
    """max_calls 0: every call is refused before it is made (nothing is loaded but the tokenizer);
    other rows get their passthrough or skip reason before any call."""
    plain, with_input = alpaca_records((0, 5))
    multi = {**plain, "sample_id": "multi", "messages": plain["messages"] * 2}
    step = cls("r", {"budget": {"max_calls": 0}, "input_policy": "skip"}, _context(tmp_path))
    records = [plain, with_input, multi]
    out = step.run_unit(step.units(len(records))[0], records)
    assert out.dispositions["multi"][:2] == ("passthrough", "multiturn")
    assert out.dispositions[with_input["sample_id"]][:2] == ("dropped", "skipped_input")
    assert out.dispositions[plain["sample_id"]][:2] == ("dropped", "budget_exhausted")
    assert not out.derived and step.engine.spent.made == 0 and step.engine.spent.refused >= 1
    assert out.stats["passthrough"] == {"multiturn": 1}

# -- small real runs (SmolLM2 teacher and student, torch threads 1) -------------------------------

def _context(store: Path) -> RewriteContext:
    return RewriteContext(seed=0, torch_threads=1, store_dir=str(store))


#: a row that makes the 135M teacher answer in the tag layout (it copies the line): a real parse, no stand-in
PRIMED = {"instruction": "Copy this line exactly: [Better Answer] Paris is the capital of France. [End]", "input": "", "output": "Paris."}


@pytest.mark.slow
def test_reflection_flow_lineage_dispositions_and_no_second_call(tmp_path):
    import pyarrow.parquet as pq

    from conftest import write_flow
    from curate.config import load_flow
    from curate.pipeline import execute

    rows = [PRIMED, json.loads(alpaca_records((3,))[0]["original"])]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    step = {"method": "reflection", "mode": "both", "decoding": {"max_tokens": 24}}
    flow = write_flow(tmp_path, name="reflection-test", inputs=[{"path": "rows.json"}], score=[{"method": "heuristic"}],
                      rewrite={"steps": [step], "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0}]},
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                      runtime={"torch_threads": 1})
    s = execute(load_flow(flow))
    out = Path(s["output_dir"])
    disp = {d["row"]: d for d in pq.read_table(out / "rewrite" / "reflection" / "dispositions.parquet").to_pylist()}
    # the primed row: its response reflection parsed -> one derived row; its instruction reflection did not
    assert disp[0]["disposition"] == "used" and disp[0]["n_derived"] == 1
    # the other row: both replies run into max_tokens -> truncated (never parsed, never asked again),
    # dropped with that reason; the detail names both operations
    assert (disp[1]["disposition"], disp[1]["reason"]) == ("dropped", "truncated")
    assert "instruction: the reply reached max_tokens (24)" in disp[1]["detail"]
    assert "response: the reply reached max_tokens (24)" in disp[1]["detail"]
    (lin,) = pq.read_table(out / "lineage.parquet").to_pylist()
    assert lin["origin"] == "reflection:response" and lin["parent_rows"] == [0]
    g = json.loads(lin["generation"])
    # the reply ended by itself (end of sequence, 16 of its 24 tokens) without an [End]: the last segment
    # of a complete reply runs to the end of the text. A reply cut off by max_tokens is never parsed
    # (test_a_reply_cut_off_by_max_tokens_is_truncated_never_parsed)
    call = g["calls"]["response"]
    assert call["text"] == "The answer is: [Better Answer] Paris is the capital of France."
    assert (call["status"], call["finish_reason"]) == ("ok", "stop") and call["n_tokens"] < 24
    assert g["parse"]["better_answer"]["status"] == "ok" and g["calls"]["response"]["prompt"]["id"] == "reflect_response_v1"
    ledger = {r["row"]: r for r in pq.read_table(out / "ledger.parquet").to_pylist()}
    assert (ledger[1]["outcome"], ledger[1]["reason"]) == ("filtered", "truncated")
    exported = [json.loads(x) for x in (out / "export").rglob("*messages*.jsonl").__next__().read_text().splitlines()]
    assert [m["content"] for m in exported[0]["messages"]] == [PRIMED["instruction"], "Paris is the capital of France."]
    # a second run over the same store makes no model call: both (truncated) replies of row 1 are cached
    again = ReflectionTuning("reflection", {k: v for k, v in step.items() if k != "method"}, _context(tmp_path / "store"))
    records = alpaca_records((3,))
    result = again.run_unit("rows-0-1", records)
    assert again.engine.spent.made == 0 and again.engine.spent.cache_hits == 2
    assert result.dispositions[records[0]["sample_id"]][:2] == ("dropped", "truncated")


def test_reply_budget_is_what_the_context_leaves_up_to_2048(tmp_path):
    """The reference's max_tokens = min(2048, 4050 - the longest prompt of the batch) (methods.md C1):
    2048 by default, lowered by the context the batch's longest prompt leaves."""
    from curate.rewrite.reflection import Job

    rows = [single_turn(r)[0] for r in alpaca_records((0, 3))]
    jobs = [Job(x.sample_id, kind, x.instruction, "", x.answer) for x in rows for kind in ("instruction", "response")]
    step = ReflectionTuning("r", {"decoding": {"temperature": 0}}, _context(tmp_path))
    assert step.params.decoding.max_tokens == 2048 and step.reply_context() == 8192  # SmolLM2's max_position_embeddings
    calls = [step.call(j.prompt(), j.messages()) for j in jobs]
    n_prompt = [step.engine.prompt_tokens(c) for c in calls]
    assert max(n_prompt) < 8192 - 2048 and [c.decoding.max_tokens for c in step.fit_replies(calls)] == [2048] * 4
    ref = ReflectionTuning("r", {"context_tokens": 4050}, _context(tmp_path))
    assert {c.decoding.max_tokens for c in ref.fit_replies(calls)} == {min(2048, 4050 - max(n_prompt))}
    tight = ReflectionTuning("r", {"context_tokens": max(n_prompt) + 100, "decoding": {"max_tokens": 300}}, _context(tmp_path))
    fitted = tight.fit_replies(calls)
    assert [c.decoding.max_tokens for c in fitted] == [100] * 4  # one budget for the batch: its longest prompt's
    assert [c.decoding.temperature for c in fitted] == [0.0] * 4 and [c.messages for c in fitted] == [c.messages for c in calls]


@pytest.mark.slow
def test_a_reply_cut_off_by_max_tokens_is_truncated_never_parsed(tmp_path):
    """The primed row's reply, cut at 12 tokens inside its [Better Answer] segment: the operation is
    truncated (not parse_failed, not a better answer), it is not asked again, and the row is dropped
    with reason truncated."""
    from curate.rewrite.reflection import Job, reflect

    rec = _primed_record()
    x, _ = single_turn(rec)
    step = ReflectionTuning("r", {"mode": "response", "decoding": {"max_tokens": 12}}, _context(tmp_path))
    (o,) = reflect(step, [Job(x.sample_id, "response", x.instruction, "", x.answer, fallback={"better_answer": x.answer})])
    (_, call, reply), = o.exchanges  # no retry
    assert (reply.status, reply.finish_reason, reply.n_tokens) == ("truncated", "length", 12)
    assert reply.text.startswith("The answer is: [Better Answer] Paris")  # kept for the record
    assert (o.status, o.values, o.parse["better_answer"]["status"]) == ("truncated", {}, "truncated")
    again = ReflectionTuning("r", {"mode": "response", "decoding": {"max_tokens": 12}}, _context(tmp_path))
    out = again.run_unit("rows-0-1", [rec])
    assert not out.derived and out.dispositions[x.sample_id][:2] == ("dropped", "truncated")
    assert "max_tokens (12)" in out.dispositions[x.sample_id][2] and out.stats["response"] == {"truncated": 1}
    assert again.engine.spent.made == 0 and again.engine.spent.cache_hits == 1  # a truncated reply is cached, not asked again


def _record(row: dict) -> dict:
    """An alpaca row as the ingest stage makes it."""
    from curate.ingest.formats import CONVERTERS
    from curate.ingest.validate import normalise_messages
    from curate.records import sample_id

    messages = normalise_messages(CONVERTERS["alpaca"](row, {})[0])
    return {"sample_id": sample_id(messages, None), "messages": messages, "tools": None, "format": "alpaca", "original": json.dumps(row)}


def _primed_record() -> dict:
    return _record(PRIMED)


@pytest.mark.slow
def test_selective_reflection_real_run_rationale_and_cache(tmp_path):
    records = [_primed_record()] + alpaca_records((1, 3))
    params = {"decoding": {"max_tokens": 24}, "parse_retry": False, "student": {"max_length": 256}}
    step = SelectiveReflection("selective_reflection", params, _context(tmp_path))
    (unit,) = step.units(len(records))
    out = step.run_unit(unit, records)
    assert set(out.dispositions) == {r["sample_id"] for r in records}
    rationales = {}
    for d in out.derived:
        rationales[d.parents[0]] = d.generation["rationale"]
    for sid, (what, reason, detail) in out.dispositions.items():
        if what != "used":
            rationales[sid] = json.loads(detail.split("; rationale ")[-1])
    for r in rationales.values():
        # IFD(ori) is always computed by the student; the side not taken never is (early branching)
        assert isinstance(r["ifd"]["ori"], float) and r["ifd"]["ori"] > 0
        assert all(r["ifd"][v] is None and r["rifd"][v] is None for v in (("Q", "QA") if r["side"] == "ori" else ("A",)))
        if r["branch"] not in ("A_parse_failed", "QA_parse_failed", "truncated"):  # the leaf is the tree's on the recorded numbers
            n = Numbers({k: NAN if v is None else v for k, v in r["ifd"].items()}, {k: NAN if v is None else v for k, v in r["rifd"].items()})
            assert decide(n, have_q=r["teacher"]["instruction"] == "ok") == r["branch"]
    # the primed row: no Q' (the 135M teacher does not follow the instruction prompt: its reply runs into
    # max_tokens, truncated, which is no Q variant), A* parsed; the student finds A* better connected than
    # "Paris." and both gates pass -> the A variant is emitted
    primed = rationales[records[0]["sample_id"]]
    assert (primed["branch"], primed["side"], primed["teacher"]) == ("A", "ori", {"instruction": "truncated", "response": "ok"})
    assert primed["rifd"]["A"] < primed["rifd"]["ori"] and primed["rifd"]["A"] < 1 and primed["ifd"]["A"] < 1
    (d,) = out.derived
    assert (d.variant, d.parents, d.messages[1]["content"]) == ("A", [records[0]["sample_id"]], "Paris is the capital of France.")
    assert d.messages[0]["content"] == records[0]["messages"][0]["content"]  # the original instruction, never a new one
    assert out.stats["branch"] == {"A": 1, "A_parse_failed": 1, "truncated": 1} and out.stats["emitted"] == {"A": 1}
    assert out.stats["instruction"] == {"truncated": 3} and out.stats["response"] == {"ok": 1, "parse_failed": 1, "truncated": 1}
    truncated = [d for d in out.dispositions.values() if d[1] == "truncated"]
    assert len(truncated) == 1 and truncated[0][0] == "dropped" and truncated[0][2].startswith("response: the reply reached max_tokens")
    # two teacher calls per row (instruction reflection, then the one response reflection the branch needs)
    assert step.engine.spent.made == 6
    again = SelectiveReflection("selective_reflection", params, _context(tmp_path))
    out2 = again.run_unit(unit, records)
    assert again.engine.spent.made == 0 and again.engine.spent.cache_hits == 6 and out2.dispositions == out.dispositions


#: an instruction reflection the 135M teacher answers with the layout's filler in both tags
#: ("[New Instruction] Your answer to the new instruction [End]\n[New Answer] Your answer to the new instruction [End]")
TAGGED = "[New Instruction] Name the capital of Italy. [End]\n[New Answer] Rome is the capital of Italy. [End]"


@pytest.mark.slow
def test_match_reference_real_runs_q_side_and_instruction_success(tmp_path):
    """Real replies of the 135M teacher under match_reference. Its filler "Your answer to the new
    instruction" passes the reference's case-sensitive tests ("your instruction" in Q', "your answer"
    / "N/A" in A'), so — as the reference would — it is taken as Q' (and as A'). C2: the second row's
    Q = (that Q', A0) is harder for the student than ori, so the row takes the Q' side of the tree in
    run_unit; A'' falls back to A' (no [Better Answer] segment), rIFD(QA) = rIFD(Q): Q_kept, and
    emit_unimproved Q emits Q since it passes IFD < 1 and r-IFD < 1. The first row's response
    reflection is cut off by max_tokens: truncated. C1 on the first row: the instruction reflection
    (the same cached reply) gives a (Q', A') row end to end; ours calls the filler a placeholder."""
    records = [_record({"instruction": TAGGED, "input": "", "output": TAGGED}),
               _record({"instruction": "Name the capital of Italy.", "input": "", "output": TAGGED})]
    params = {"decoding": {"max_tokens": 40}, "parse_retry": False, "student": {"max_length": 256}, "match_reference": True,
              "emit_unimproved": "Q"}
    step = SelectiveReflection("selective_reflection", params, _context(tmp_path))
    out = step.run_unit("rows-0-2", records)
    first, second = (r["sample_id"] for r in records)
    (d,) = out.derived
    r = d.generation["rationale"]
    assert (d.variant, d.parents, r["branch"], r["side"], r["unimproved_gate"]) == ("Q", [second], "Q_kept", "Q", "passed")
    assert r["teacher"] == {"instruction": "fallback", "response": "fallback"}
    assert [m["content"] for m in d.messages] == ["Your answer to the new instruction", TAGGED]
    assert r["ifd"]["Q"] > r["ifd"]["ori"] and r["rifd"]["QA"] == r["rifd"]["Q"] < 1 and r["ifd"]["Q"] < 1
    n = Numbers({k: NAN if v is None else v for k, v in r["ifd"].items()}, {k: NAN if v is None else v for k, v in r["rifd"].items()})
    assert decide(n) == "Q_kept" and r["ifd"]["A"] is None and r["rifd"]["ori"] is None  # the ori side is never scored
    what, reason, detail = out.dispositions[first]
    assert (what, reason) == ("dropped", "truncated") and json.loads(detail.split("; rationale ")[1])["teacher"]["response"] == "truncated"
    assert out.stats["branch"] == {"Q_kept": 1, "truncated": 1} and out.stats["emitted"] == {"Q": 1}
    assert step.engine.spent.made == 4

    ref = ReflectionTuning("reflection", {"mode": "instruction", "decoding": {"max_tokens": 40}, "parse_retry": False,
                                          "match_reference": True}, _context(tmp_path))
    res = ref.run_unit("rows-0-1", records[:1])
    (c1,) = res.derived
    assert ref.engine.spent.made == 0 and ref.engine.spent.cache_hits == 1  # the reply of the C2 run
    assert (c1.variant, c1.parents, c1.generation["parse_status"]) == ("instruction", [first], "ok")
    assert [m["content"] for m in c1.messages] == ["Your answer to the new instruction"] * 2
    assert c1.generation["calls"]["instruction"]["finish_reason"] == "stop"
    ours = ReflectionTuning("reflection", {"mode": "instruction", "decoding": {"max_tokens": 40}, "parse_retry": False},
                            _context(tmp_path))
    res = ours.run_unit("rows-0-1", records[:1])
    assert not res.derived and res.dispositions[first][:2] == ("dropped", "parse_failed")
    assert "new_instruction placeholder" in res.dispositions[first][2]


def test_a_store_read_for_an_empty_pool_is_empty(tmp_path):
    """A rewrite that drops every row leaves select-2 an empty pool: reading its scores gives nothing
    (it raised an ArrowTypeError when the empty id list had no type)."""
    import pyarrow as pa

    from curate.store import Store

    col = Store(tmp_path).scores("k")
    col.write(pa.table({"sample_id": ["a"], "score": [1.0]}))
    assert col.read([]) is None and col.read(["a"]).num_rows == 1
