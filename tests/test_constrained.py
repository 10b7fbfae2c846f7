"""Constrained decoding (``decoding.constrain``): each prompt that expects tags or a score declares its
output shape (curate.prompts.SHAPES), and the backends enforce it — hf through xgrammar on the real
bundled SmolLM2, the openai backend through ``response_format`` / vLLM's ``structured_outputs`` (checked
on the request bodies the local stand-in server receives), vllm through its sampling parameters (vLLM
cannot be installed here: only the parameters are built)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from curate import prompts as P
from curate.errors import CurateError
from curate.lm import LMParams, load_backend
from curate.lm.calls import Call, CallEngine, Decoding
from curate.rewrite import tags
from curate.rewrite.reflection import INSTRUCTION, KIND_FIELDS
from curate.rewrite.tags import parse_tagged

pytest.importorskip("xgrammar", reason="the constrained extra (pip install 'curate[constrained]')")

GRADE = [{"role": "user", "content": P.AIDE_GRADE_RELEVANCE.text.format(
    use_case="Python code generation", original="Write a Python function to calculate the factorial of a given number.",
    instruction="Write a Python function that returns the factorial of n without recursion.")}]
DS2 = [{"role": "system", "content": P.DS2_SYSTEM.text},
       {"role": "user", "content": P.DS2_USER.text.format(conversation="### user: Name three primary colors.\n"
                                                                       "### assistant: Red, blue and yellow.\n")}]
DS2_KEYS = ("Rarity", "Complexity", "Informativeness", "Overall rating")


def full(shape: dict, text: str | None) -> bool:
    return text is not None and re.fullmatch(shape["pattern"], text, re.S) is not None


def ds2_ok(text: str | None) -> bool:
    try:
        obj = json.loads(text or "")
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and list(obj) == list(DS2_KEYS) and all(isinstance(obj[k], int) and 1 <= obj[k] <= 10 for k in DS2_KEYS)


@pytest.fixture(scope="module")
def hf():
    return load_backend(LMParams(), torch_threads=2)


# -- the shapes are the parsers' layouts ------------------------------------------------------------

def test_shapes_accept_what_the_parsers_read():
    """A reply in each regex shape parses; the shapes are bounded and every prompt with tags has one."""
    body = "Write a function that sorts a list of numbers and returns it."
    replies = {
        P.REFLECT_INSTRUCTION: f"Analysis: too easy.\n[New Instruction] {body} [End]\n[New Answer] Use sorted(xs):\n1, 2, 3. [End]",
        P.REFLECT_RESPONSE: "Analysis: vague.\n[Better Answer] A longer, exact answer. [End]",
        P.REFLECT_COMPRESS: f"[Merged Instruction] {body} [End]",
    }
    for prompt, text in replies.items():
        assert full(prompt.shape, text), prompt.id
        kind = {"reflect_instruction_v1": "instruction", "reflect_response_v1": "response", "reflect_compress_v1": "compress"}[prompt.id]
        assert all(f.status == "ok" for f in parse_tagged(text, KIND_FIELDS[kind]).values())
    assert not full(P.REFLECT_INSTRUCTION.shape, replies[P.REFLECT_INSTRUCTION].replace("1, 2, 3.", "[End] more"))  # no early tag
    assert INSTRUCTION.shape == P.REFLECT_INSTRUCTION.shape
    topic = "<Topic>sorting</Topic>\n<Related knowledge>lists, keys, stability</Related knowledge>"
    assert full(P.AIDE_TOPIC.shape, topic) and tags.parse_attributes(topic, 3)[2] == "ok"
    assert full(P.AIDE_GRADE_DIVERSITY.shape, "<Score>7</Score>") and not full(P.AIDE_GRADE_DIVERSITY.shape, "<Score>11</Score>")
    multi = "7 * 6 = 42.\n<Choices>\nCorrect: 42\nIncorrect: 36\nIncorrect: 48\nIncorrect: 13\n</Choices>"
    assert full(P.AIDE_ANSWER_MULTI.shape, multi) and len(tags.parse_choices(tags.parse_tag(multi, "Choices")[0])) == 4
    assert full(P.AIDE_ANSWER_FREE.shape, "<Choices>def f(x):\n    return x < 3 and x > 1</Choices>")  # "<" in code
    check = "It is 42, which is listed.\n<Response>Yes</Response>"
    assert full(P.AIDE_CHECK_CHOICES.shape, check) and tags.parse_yes_no(check, "Response") == (True, "ok")
    triples = '["sorting", "uses", "comparison"]\n["sorting", "needs", "order"]'
    assert full(P.AIDE_KG_EXPAND.shape, triples) and tags.parse_triples(triples, [], 2) == ["comparison", "order"]
    binary = P.with_response(P.AIDE_REWRITE_REASONING.shape)
    assert full(binary, "<Rewritten Prompt>Is 9 prime?</Rewritten Prompt>\n<Response>Nine is a square.</Response>")
    assert not full(binary, "<Rewritten Prompt>Is 9 prime?</Rewritten Prompt>\n<Response>No</Response>")  # a reply, not a label
    free = [k for k, v in P.SHAPES.items() if v["type"] == "regex" and re.search(r"(?<!\\)[*+]", v["pattern"])]
    assert free == [P.RUBRIC_ACCURACY_0_5.id]  # only the judge's explanation after its score line is unbounded
    asks_tags = [p.id for p in P.ALL.values() if re.search(r"<(Topic|Score|Choices|Response|Improved Prompt|Created Prompt|"
                                                          r"Rewritten Prompt)>|\[(New|Better|Merged) ", p.text)]
    assert asks_tags and all(P.ALL[i].shape is not None for i in asks_tags if not i.startswith("aide_example")
                             and i not in ("aide_response_form",)), [i for i in asks_tags if P.ALL[i].shape is None]


def test_rewriter_calls_carry_the_prompt_shape():
    from curate.rewrite.base import RewriteContext
    from curate.rewrite.reflection import ReflectionTuning

    step = ReflectionTuning("reflection", {"decoding": {"constrain": True}}, RewriteContext())
    call = step.call(INSTRUCTION, INSTRUCTION.messages(instruction="Sort a list.", input="", answer="sorted(xs)"))
    assert call.shape == P.REFLECT_INSTRUCTION.shape and call.decoding.constrain
    assert step.call(P.AIDE_TOPIC, GRADE, shape={"type": "regex", "pattern": "x"}).shape == {"type": "regex", "pattern": "x"}


# -- hf: xgrammar on the real model ------------------------------------------------------------------

def test_hf_constrained_reply_has_the_shape_where_the_free_one_does_not(hf):
    """The same greedy prompt free and constrained, in one batch: the free row beside the constrained one is untouched."""
    d = {"temperature": 0.0, "max_tokens": 12}
    shape = P.AIDE_GRADE_RELEVANCE.shape
    (free,) = hf.chat([GRADE], d)
    assert not full(shape, free["text"]) and tags.parse_grade(free["text"])[0] is None
    con, other = hf.chat([GRADE, GRADE], d, shapes=[shape, None])
    assert full(shape, con["text"]) and con["constrained"] is True and con["finish_reason"] == "stop"
    assert tags.parse_grade(con["text"])[1] == "ok"
    assert other["text"] == free["text"] and other["constrained"] is None


def test_hf_prefix_is_the_start_of_the_shape(hf):
    """DS2's answer prefix '{"Rarity": ' is fed to the JSON grammar first; a prefix that cannot start the shape is refused."""
    d = {"temperature": 1.2, "top_p": 0.9, "top_k": 50, "max_tokens": 32}
    (out,) = hf.chat([DS2], d, seeds=[1], prefix='{"Rarity": ', shapes=[P.DS2_USER.shape])
    assert ds2_ok(out["text"]) and out["finish_reason"] == "stop", out
    with pytest.raises(CurateError, match="cannot start a reply"):
        hf.chat([DS2], d, seeds=[1], prefix="Rating:", shapes=[P.DS2_USER.shape])


def test_engine_sends_shapes_only_when_constrained(hf, tmp_path):
    engine = CallEngine(hf, tmp_path / "calls")
    ref = P.AIDE_GRADE_RELEVANCE.ref()
    on, off = Decoding(max_tokens=12, constrain=True), Decoding(max_tokens=12)
    shape = P.AIDE_GRADE_RELEVANCE.shape
    r_on, r_off = engine.run([Call(GRADE, ref, on, shape=shape), Call(GRADE, ref, off, shape=shape)])
    assert r_on.status == "ok" and full(shape, r_on.text) and r_on.constrained is True
    assert not full(shape, r_off.text) and r_off.constrained is None
    assert r_on.key != r_off.key


# -- vllm: the sampling parameters -------------------------------------------------------------------

def test_vllm_structured_output_params():
    from curate.lm.shapes import sampling_constraint, structured_outputs

    assert structured_outputs(P.AIDE_GRADE_RELEVANCE.shape) == {"regex": P.AIDE_GRADE_RELEVANCE.shape["pattern"]}
    assert structured_outputs(P.DS2_USER.shape) == {"json": P.DS2_USER.shape["schema"]}
    assert structured_outputs(None) is None

    class Params:  # a stand-in for vllm.sampling_params' classes (same keyword arguments)
        def __init__(self, **kw):
            self.kw = kw

    new = sampling_constraint(SimpleNamespace(StructuredOutputsParams=Params), P.DS2_USER.shape)  # vLLM >= 0.10.2
    assert list(new) == ["structured_outputs"] and new["structured_outputs"].kw == {"json": P.DS2_USER.shape["schema"]}
    old = sampling_constraint(SimpleNamespace(GuidedDecodingParams=Params), P.AIDE_GRADE_RELEVANCE.shape)  # older vLLM
    assert list(old) == ["guided_decoding"] and old["guided_decoding"].kw == {"regex": P.AIDE_GRADE_RELEVANCE.shape["pattern"]}
    with pytest.raises(CurateError, match="structured outputs"):
        sampling_constraint(SimpleNamespace(), P.DS2_USER.shape)


# -- openai: response_format where the server has it ------------------------------------------------

def test_openai_sends_response_format_only_where_supported(hf):
    from lm_server import LocalCompletionsServer

    d = {"temperature": 0.0, "max_tokens": 8}
    grade, ds2 = P.AIDE_GRADE_RELEVANCE.shape, P.DS2_USER.shape
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, strict=True) as server:  # a hosted API's field checks
        api = load_backend(LMParams(backend="openai", base_url=server.base_url, served_name="local-smollm2"))
        out = api.chat([DS2, GRADE, GRADE], d, shapes=[ds2, grade, None])
        by_text = {json.dumps(b["messages"]): b for b in server.bodies}
        b_ds2, b_grade = by_text[json.dumps(DS2)], by_text[json.dumps(GRADE)]
        fmt = b_ds2["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        # the hosted API's strict subset: no numeric bounds (the parser checks the range)
        assert fmt["json_schema"]["schema"]["properties"]["Rarity"] == {"type": "integer"}
        assert "response_format" not in b_grade and "structured_outputs" not in b_grade  # no regex on the OpenAI API
        assert out[1]["constrained"] is False and out[2]["constrained"] is None
        # the stand-in does not enforce the format: a reply without the shape is not recorded as constrained
        assert out[0]["constrained"] is ds2_ok(out[0]["text"])
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer) as server:
        api = load_backend(LMParams(backend="openai", base_url=server.base_url, served_name="local-smollm2", server="vllm"))
        api.chat([GRADE, DS2], d, shapes=[grade, ds2])
        by_text = {json.dumps(b["messages"]): b for b in server.bodies}
        assert by_text[json.dumps(GRADE)]["structured_outputs"] == {"regex": grade["pattern"]}
        assert by_text[json.dumps(DS2)]["response_format"]["json_schema"]["schema"] == ds2["schema"]  # vLLM takes the bounds
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, strict=True) as server:  # a server refusing the field
        api = load_backend(LMParams(backend="openai", base_url=server.base_url, served_name="local-smollm2", server="vllm"))
        (r,) = api.chat([GRADE], d, shapes=[grade])
        assert r["status"] == "ok" and r["constrained"] is False
        assert [("structured_outputs" in b, s) for b, s in zip(server.bodies, server.statuses)] == [(True, 400), (False, 200)]


# -- the judges ------------------------------------------------------------------------------------

def test_judge_without_its_cue_rates_when_constrained(hf):
    """Without the 'Score:' cue SmolLM2 writes prose (tests/test_judges.py); the rubric's shape makes it rate."""
    from reflection_rows import alpaca_records

    from curate.scorers import ScorerContext, scorer_class

    records = alpaca_records((1, 3))
    judge = scorer_class("llm_rating")("llm_rating", {"max_tokens": 12, "answer_prefix": ""}, ScorerContext(torch_threads=2))
    assert judge.fingerprint()["shape"] == P.RUBRIC_ACCURACY_0_5.shape
    out = judge.score_records(records)
    assert all(o.status == "ok" and 0 <= o.values["rating"] <= 5 and o.components["constrained"] for o in out), out
    assert all(o.raw_output.startswith("Score: ") for o in out)
    free = scorer_class("llm_rating")("llm_rating", {"constrain": False}, ScorerContext(torch_threads=2))
    assert "shape" not in free.fingerprint() and free.fingerprint() != judge.fingerprint()
