"""AIDE (methods.md C4): tag parsing on real SmolLM2 replies and hand-written cases, persona choice,
near-duplicate pruning, multiple-choice sanitising, binary questions with their reply, the sampled
redo loops, the answer check's token room and truncated replies, fair breadth-first allocation under
the node cap, tree-size bounds (arithmetic and a real run), and a real end-to-end run whose second
run makes no model call.

The recorded replies (tests/data/aide_smollm2_replies.json) were made once with
``.venv/bin/python tests/data/record_aide_smollm2.py``: every AIDE prompt, filled for two Code Alpaca
instructions, sent through curate's call engine to the bundled SmolLM2-135M-Instruct (greedy, 96 tokens).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from curate import prompts as P
from curate.records import canonical_json, sample_id
from curate.rewrite import RewriteContext, rewriter_class
from curate.rewrite.aide import (
    DIRECTIONS,
    AIDEStep,
    Child,
    ChildSpec,
    Node,
    allocate,
    choose_personas,
    greedy_dedup,
)
from curate.rewrite.aide_units import join_reply, speaker_1
from curate.rewrite.tags import (
    parse_attributes,
    parse_choices,
    parse_grade,
    parse_tag,
    parse_triples,
    parse_yes_no,
)

ROOT = Path(__file__).resolve().parents[1]
REPLIES = json.loads((Path(__file__).resolve().parent / "data" / "aide_smollm2_replies.json").read_text(encoding="utf-8"))
TINY = dict(use_case="Python code generation", choice_type="free_form", r_depth=1, d_depth=1, max_attributes=1, directions=["reasoning"],
            ex_kg=False, personas=str(ROOT / "data" / "personas.txt"), persona_k=1, max_reflection_relevance=1,
            max_reflection_diversity=1, max_choice_checks_relevance=1, max_choice_checks_diversity=1, max_nodes_per_seed=2,
            decoding={"max_tokens": 48})


def record(q: str, a: str) -> dict:
    msgs = [{"role": "user", "content": q, "tool_calls": None}, {"role": "assistant", "content": a, "tool_calls": None}]
    return {"sample_id": sample_id(msgs), "messages": msgs, "tools": None}


def step(params: dict, store: Path | None = None) -> AIDEStep:
    return AIDEStep("aide", params, RewriteContext(seed=0, torch_threads=1, base_dir=str(ROOT), store_dir=str(store) if store else None))


# -- parsing ----------------------------------------------------------------------------------------

def test_tag_parser_last_match_wins_and_lowercase_fallback():
    assert parse_tag("<Topic>a</Topic> then <Topic> b </Topic>", "Topic") == ("b", "ok")
    assert parse_tag("<topic>low</topic>", "Topic") == ("low", "ok_lowercase")
    # the capitalised tag is used whenever it is there, even before a lowercase one (the reference's order)
    assert parse_tag("<Topic>cap</Topic> <topic>low</topic>", "Topic") == ("cap", "ok")
    assert parse_tag("<Rewritten Prompt>line 1\nline 2</Rewritten Prompt>", "Rewritten Prompt") == ("line 1\nline 2", "ok")
    assert parse_tag("<Topic>open only", "Topic") == (None, "missing_tag")
    assert parse_tag("<TOPIC>x</TOPIC>", "Topic") == (None, "missing_tag")  # only the exact and the lowercase forms
    assert parse_tag("<Topic>  </Topic>", "Topic") == (None, "empty")
    assert parse_tag(None, "Topic") == (None, "missing_tag")


def test_attribute_triple_choice_grade_and_yes_no_parsers():
    text = "<Topic>old</Topic><Related knowledge>x</Related knowledge>\n<Topic>sorting</Topic>\n" \
           "<Related knowledge> keys, lists ,Keys, , stability, heaps</Related knowledge>"
    assert parse_attributes(text, 3) == ("sorting", ["keys", "lists", "stability"], "ok")
    assert parse_attributes("<topic>t</topic><related knowledge>a</related knowledge>", 3) == ("t", ["a"], "ok_lowercase")
    assert parse_attributes("<Topic>t</Topic>", 3) == ("t", [], "attributes_missing_tag")
    assert parse_attributes("no tags", 3) == (None, [], "topic_missing_tag")
    lines = '["sorting", "has", "keys"]\n["sorting", "uses", "merge sort"]\nnoise\n[\'sorting\', \'needs\', \'Keys\']\n["a", "b", "heaps"]'
    assert parse_triples(lines, ["keys"], 2) == ["merge sort", "heaps"]
    assert parse_choices("A) Correct: 42\n- Incorrect: 36\n(C) incorrect. B) 48\nnot an option\nINCORRECT - 13") == [
        ("42", 1), ("36", 0), ("48", 0), ("13", 0)]
    assert parse_grade("<Score>7</Score> and later <Score> 9/10 </Score>") == (9, "ok")
    assert parse_grade("<Score>11</Score>") == (None, "grade_out_of_range")
    assert parse_grade("<Score>high</Score>") == (None, "grade_not_a_number")
    assert parse_yes_no("<Response> Yes, it is.</Response>", "Response") == (True, "ok")
    assert parse_yes_no("<response>no</response>", "Response") == (False, "ok")
    assert parse_yes_no("<Response>Maybe yes</Response>", "Response") == (None, "not_yes_no")


def test_binary_layouts_join_the_question_and_its_reply_and_the_speakers_question_is_recovered():
    q, r = "Do you like that theory?", "I find social ties a strong motive."
    assert join_reply(q, r, "append") == "Do you like that theory?\nI find social ties a strong motive."
    both = join_reply(q, r, "speakers")
    assert both == "Speaker 1: 'Do you like that theory?' Speaker 2: 'I find social ties a strong motive.'"
    assert speaker_1(both) == q and speaker_1(" " + both + "\n") == q
    # quotes inside the question are kept (the last "' Speaker 2: '" splits)
    assert speaker_1(join_reply("Is it 'fair'?", "Maybe so, I think.", "speakers")) == "Is it 'fair'?"
    # an improved text no longer in the layout: no question part
    assert speaker_1("Do you like that theory, given the evidence?") is None
    assert speaker_1("Speaker 1: '' Speaker 2: 'hm, well then'") is None


def test_parsers_on_recorded_smollm2_replies_give_statuses_not_values():
    by_prompt: dict[str, list[str]] = {}
    for r in REPLIES:
        assert r["model"] == "smollm2-135m-instruct" and r["text"]
        by_prompt.setdefault(r["prompt"], []).append(r["text"])
    assert len(REPLIES) == 22 and len(by_prompt) == 11
    tags = {"aide_topic": "Topic", "aide_rewrite_constraint": "Rewritten Prompt", "aide_create_persona": "Created Prompt",
            "aide_answer_multi": "Choices", "aide_answer_binary": "Choices", "aide_answer_free": "Choices", "aide_improve": "Improved Prompt",
            "aide_check_choices": "Response"}
    # the 135M model writes none of the tags: every parse is a counted miss, never a guessed value
    for prompt, tag in tags.items():
        assert [parse_tag(t, tag) for t in by_prompt[prompt]] == [(None, "missing_tag")] * 2, prompt
    assert [parse_attributes(t, 3)[2] for t in by_prompt["aide_topic"]] == ["topic_missing_tag"] * 2
    # "The new instruction is 10." holds a number, but not in <Score>: no grade (the reference would read 0)
    assert any("10" in t for t in by_prompt["aide_grade_relevance"])
    assert [parse_grade(t) for t in by_prompt["aide_grade_relevance"] + by_prompt["aide_grade_diversity"]] == [(None, "grade_missing_tag")] * 4
    # "The answer is Yes." outside <Response> is not a Yes
    assert any("Yes" in t for t in by_prompt["aide_check_choices"])
    assert [parse_yes_no(t, "Response")[0] for t in by_prompt["aide_check_choices"]] == [None, None]
    # bracketed lists without quoted items are not triples; numbered lines are not options
    assert [parse_triples(t, [], 2) for t in by_prompt["aide_kg_expand"]] == [[], []]
    assert all(parse_choices(t) == [] for t in by_prompt["aide_answer_multi"])
    # the same texts with a tag appended parse to exactly the tag's content (last match)
    t = by_prompt["aide_topic"][0]
    assert parse_attributes(t + "\n<Topic>factorial</Topic><Related knowledge>loops, recursion</Related knowledge>", 3) == (
        "factorial", ["loops", "recursion"], "ok")


# -- personas, dedup, sanitising ------------------------------------------------------------------

def test_persona_choice_is_top_k_by_similarity_with_ties_to_the_lowest_index():
    sims = np.array([0.2, 0.9, 0.5, 0.9, 0.31, 0.5, 0.3, 0.95])
    assert choose_personas(sims, 3, 0.3) == [7, 1, 3]
    assert choose_personas(sims, 5, 0.3) == [7, 1, 3, 2, 5]
    assert choose_personas(sims, 10, 0.3) == [7, 1, 3, 2, 5, 4]  # 0.3 itself is not above the threshold
    assert choose_personas(sims, 2, 0.99) == []
    assert choose_personas(np.full(4, 0.5), 2, 0.0) == [0, 1]


def test_persona_similarities_are_cached_by_use_case_file_and_embedder(tmp_path):
    s = step({**TINY, "persona_k": 2}, tmp_path)
    names, sims = s.persona_similarities()
    assert len(names) == 42 and sims.shape == (42,)
    top = choose_personas(sims, 2, 0.3)
    assert all("Python" in names[i] or "program" in names[i] for i in top), [names[i] for i in top]
    files = list((tmp_path / "aide" / "personas").glob("*.json"))
    assert len(files) == 1
    again = step({**TINY, "persona_k": 2}, tmp_path)
    again._embedder = s.embedder
    calls = Counter()
    real = s.embedder.embed
    s.embedder.embed = lambda texts: (calls.update(["embed"]), real(texts))[1]
    assert np.array_equal(again.persona_similarities()[1], sims) and calls["embed"] == 0  # read from the cache
    other = step({**TINY, "use_case": "healthy cooking"}, tmp_path)
    other._embedder = s.embedder
    o_names, o_sims = other.persona_similarities()
    assert calls["embed"] == 1 and len(list((tmp_path / "aide" / "personas").glob("*.json"))) == 2
    assert "chef" in o_names[choose_personas(o_sims, 1, 0.3)[0]]


def test_greedy_dedup_drops_rows_similar_to_fixed_or_earlier_kept_rows():
    X = np.array([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0], [0, 0.999, 0.0447], [0, 0, 1]], dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    kept, dropped = greedy_dedup(X, 1, 0.95)  # row 0 is a seed
    assert kept == [2, 4] and set(dropped) == {1, 3} and dropped[1][0] == 0 and dropped[3][0] == 2
    assert greedy_dedup(X, 0, 0.9999)[0] == [0, 1, 2, 3, 4]


def test_dedup_with_the_flows_embedder_on_real_text(tmp_path):
    s = step(TINY, tmp_path)
    texts = ["Write a Python function that returns the factorial of n.", "Write a Python function which returns the factorial of n.",
             "Plan a three-day trip to Rome on a small budget."]
    kept, dropped = greedy_dedup(s.embed_texts(texts), 1, 0.95)
    assert kept == [2] and dropped[1][0] == 0 and dropped[1][1] > 0.95


def _child(step_: AIDEStep, answer, text="Which number is 6 * 7?") -> Child:
    node = Node(0, "0", 1, "seed", topic="t", seed_sid="s")
    return Child(ChildSpec(node, 3, "relevance", direction="reasoning", skill="x"), text=text, answer=answer)


def test_multiple_choice_sanitising():
    s = step({**TINY, "choice_type": "multi_choice", "num_target_scores": 3})
    opts = [("42", 1), ("36", 0), ("48", 0), ("36", 0), ("13", 0)]
    msgs, original = s.render(_child(s, opts))
    assert original["instruction"] == "Which number is 6 * 7?"
    assert sorted(original["target_scores"].values()) == [0, 0, 1] and original["target_scores"]["42"] == 1
    shown = msgs[0]["content"].split("\n\n", 1)[1].splitlines()
    assert [ln[:3] for ln in shown] == ["A. ", "B. ", "C. "]
    letter = "ABC"[[ln[3:] for ln in shown].index("42")]
    assert msgs[1]["content"] == f"{letter}. 42"
    assert s.render(_child(s, opts)) == (msgs, original)  # seeded: the same draw every time
    two = _child(s, [("42", 1), ("41", 1), ("36", 0), ("48", 0)])
    assert s.render(two) == "choices_invalid" and two.detail == "2 correct options"
    few = _child(s, [("42", 1), ("36", 0), ("36", 0)])
    assert s.render(few) == "too_few_choices"
    free = step(TINY)
    assert free.render(_child(free, "42")) == ([{"role": "user", "content": "Which number is 6 * 7?"}, {"role": "assistant", "content": "42"}],
                                               {"instruction": "Which number is 6 * 7?", "answer": "42"})


# -- prompts: the node's own text, residual connection --------------------------------------------

def _first_prompt(s: AIDEStep, spec: ChildSpec, seed_text: str) -> str:
    return next(s.grow(spec, seed_text))[0].messages[0]["content"]


@pytest.mark.parametrize("match_reference", [False, True])
def test_rewrites_use_the_current_node_and_the_residual_connection(match_reference):
    s = step({**TINY, "match_reference": match_reference, "sk_conn": 1})
    seed_text = "SEED: write a factorial function."
    first = Node(0, "0", 1, seed_text, topic="factorial", seed_sid="s")
    second = Node(0, "0.1", 2, "NODE: write a recursive factorial function.", parent=first, topic="recursion", seed_sid="s")
    for d in ("reasoning", "concrete", "constraint"):
        p1 = _first_prompt(s, ChildSpec(first, 0, "relevance", direction=d, skill="loops"), seed_text)
        assert "Keep the new instruction close" not in p1  # layer 1 is not past sk_conn
        p2 = _first_prompt(s, ChildSpec(second, 0, "relevance", direction=d, skill="loops"), seed_text)
        assert p2.endswith("Instruction: NODE: write a recursive factorial function.") and '"recursion"' in p2
        assert ("Keep the new instruction close to this original one: SEED" in p2) == (d == "reasoning" or not match_reference)
    div = _first_prompt(s, ChildSpec(second, 0, "diversity", persona="A chef."), seed_text)
    assert div.endswith("Instruction: NODE: write a recursive factorial function.") and "A chef." in div and "SEED" not in div


def _scripted(gen, replies: dict[str, str | list[str]]) -> list:
    """Drive a child's generator with hand-written replies, keyed by prompt id (the bundled 135M model
    never writes AIDE's tags, so it cannot reach the grade and check loops); a list gives one reply per
    call of that prompt, in order; a text is an ``ok`` reply, a :class:`Reply` is sent as it is. A call
    of a prompt with no reply fails the test. Returns the calls made and the child."""
    from curate.lm.calls import Reply

    queues = {k: list(v) for k, v in replies.items() if isinstance(v, list)}

    def reply(c) -> Reply:
        pid = c.prompt["id"]
        r = queues[pid].pop(0) if pid in queues else replies[pid]
        return r if isinstance(r, Reply) else Reply(r, "ok", "k" * 64)

    made = []
    try:
        calls = next(gen)
        while True:
            made += calls
            calls = gen.send([reply(c) for c in calls])
    except StopIteration as stop:
        return made, stop.value


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_failed_choice_check_redoes_the_answer_only_when_the_teacher_samples(temperature):
    """Greedy: the redone answer would repeat the first (same prompt, same reply), so one failed check
    is final. Sampled: each redo and check is a new draw — its own seed, so its own cache entry."""
    s = step({**TINY, "max_choice_checks_relevance": 3, "decoding": {"max_tokens": 48, "temperature": temperature}})
    seed_node = Node(0, "0", 1, "Write a factorial function.", topic="factorial", seed_sid="s")
    replies = {"aide_rewrite_reasoning": "<Rewritten Prompt>Write a factorial function without recursion.</Rewritten Prompt>",
               "aide_answer_free": "<Choices>def f(n): ...</Choices>", "aide_grade_relevance": "<Score>8</Score>",
               "aide_check_choices": "<Response>No</Response>"}
    made, child = _scripted(s.grow(ChildSpec(seed_node, 0, "relevance", direction="reasoning", skill="loops"), seed_node.text), replies)
    assert child.reject == "answer_not_in_choices"
    names = [name for name, _, _ in child.exchanges]
    if temperature == 0:
        assert names == ["rewrite", "answer", "grade_1", "check_1"]
        assert all(c.seed is None for c in made)
    else:
        assert names == ["rewrite", "answer", "grade_1", "check_1", "check_1_answer", "check_2", "check_2_answer", "check_3"]
        assert len({s.engine.key(c) for c in made}) == len(made)  # the redone answers and checks are not cache hits


def test_grading_stops_when_an_unchanged_text_would_be_graded_again_greedy():
    s = step({**TINY, "max_reflection_relevance": 4, "decoding": {"max_tokens": 48, "temperature": 0}})
    seed_node = Node(0, "0", 1, "Write a factorial function.", topic="factorial", seed_sid="s")
    text = "Write a factorial function without recursion."
    replies = {"aide_rewrite_reasoning": f"<Rewritten Prompt>{text}</Rewritten Prompt>", "aide_answer_free": "<Choices>x</Choices>",
               "aide_grade_relevance": "<Score>2</Score>", "aide_improve": f"<Improved Prompt>{text}</Improved Prompt>"}
    _, child = _scripted(s.grow(ChildSpec(seed_node, 0, "relevance", direction="reasoning", skill="loops"), seed_node.text), replies)
    assert [name for name, _, _ in child.exchanges] == ["rewrite", "answer", "grade_1", "improve_1"]
    assert (child.reject, child.grades) == ("reflection_rejected", [2])


def test_the_default_teacher_samples_as_the_reference_so_redos_are_new_draws():
    """The reference samples (temperature 1, top_p 0.95): by default, and when a flow names only some
    decoding keys, the grade/improve loop and the answer-in-choices loop run to their limits with a
    new seed per call — the redo loops are not no-ops."""
    assert step({"use_case": "code"}).params.decoding.model_dump(include={"temperature", "top_p", "max_tokens"}) == {
        "temperature": 1.0, "top_p": 0.95, "max_tokens": 2048}
    s = step({**TINY, "max_reflection_relevance": 3, "max_choice_checks_relevance": 2})  # TINY names only max_tokens
    assert (s.params.decoding.temperature, s.params.decoding.top_p, s.params.decoding.max_tokens) == (1.0, 0.95, 48) and s.sampled
    seed_node = Node(0, "0", 1, "Write a factorial function.", topic="factorial", seed_sid="s")
    text = "Write a factorial function without recursion."
    replies = {"aide_rewrite_reasoning": f"<Rewritten Prompt>{text}</Rewritten Prompt>", "aide_answer_free": "<Choices>x</Choices>",
               "aide_grade_relevance": ["<Score>2</Score>", "<Score>3</Score>", "<Score>7</Score>"],
               "aide_improve": f"<Improved Prompt>{text}</Improved Prompt>", "aide_check_choices": "<Response>No</Response>"}
    made, child = _scripted(s.grow(ChildSpec(seed_node, 0, "relevance", direction="reasoning", skill="loops"), seed_node.text), replies)
    assert [name for name, _, _ in child.exchanges] == ["rewrite", "answer", "grade_1", "improve_1", "grade_2", "improve_2", "grade_3",
                                                        "check_1", "check_1_answer", "check_2"]
    assert (child.reject, child.grades) == ("answer_not_in_choices", [2, 3, 7])
    assert all(c.seed is not None and c.decoding.temperature == 1.0 for c in made)
    assert len({c.seed for c in made}) == len({s.engine.key(c) for c in made}) == len(made)


def test_the_answer_check_gets_room_to_work_the_answer_out_and_a_truncated_reply_is_a_failed_call():
    """The check prompt asks to work the answer out before Yes/No: its call gets the whole
    decoding.max_tokens (judge_max_tokens caps grade calls only). A reply that hit the token limit
    (status truncated) is never parsed — here its partial text even holds a <Response>Yes — and the
    child fails with reason truncated."""
    from curate.lm.calls import Reply

    s = step({**TINY, "judge_max_tokens": 16, "decoding": {"max_tokens": 300}})
    seed_node = Node(0, "0", 1, "Write a factorial function.", topic="factorial", seed_sid="s")
    cut = Reply("5! = 120, and 120 is the first choice, so <Response>Yes</Response> ... and for 0! we", "truncated", "k" * 64)
    replies = {"aide_rewrite_reasoning": "<Rewritten Prompt>Write a factorial function without recursion.</Rewritten Prompt>",
               "aide_answer_free": "<Choices>def f(n): ...</Choices>", "aide_grade_relevance": "<Score>8</Score>",
               "aide_check_choices": cut}
    made, child = _scripted(s.grow(ChildSpec(seed_node, 0, "relevance", direction="reasoning", skill="loops"), seed_node.text), replies)
    tokens = {c.prompt["id"]: c.decoding.max_tokens for c in made}
    assert tokens == {"aide_rewrite_reasoning": 300, "aide_answer_free": 300, "aide_grade_relevance": 16, "aide_check_choices": 300}
    assert child.reject == "truncated" and [name for name, _, _ in child.exchanges][-1] == "check_1"
    assert not any(x.startswith("check_1:") for x in child.statuses)  # not parsed
    assert step(TINY).params.judge_max_tokens is None  # by default grades get the whole budget too
    # a truncated analysis: the node fails with that reason, its partial tags unread
    node = Node(0, "0", 1, "Write a factorial function.", seed_sid="s")
    gen = s.analyse(node, True)
    next(gen)
    with pytest.raises(StopIteration) as stop:
        gen.send([Reply("<Topic>factorial</Topic><Related knowledge>loops, rec", "truncated", "k" * 64)])
    assert stop.value.value == "truncated" and (node.topic, node.status) == (None, "truncated")


# -- binary tasks: the <Response> is a reply inside the instruction; the label comes from the answer call ----

BINARY = {**TINY, "use_case": "yes/no questions about numbers", "choice_type": "binary", "personas": None}
PRIME = Node(0, "0", 1, "Is 17 a prime number?", topic="primes", seed_sid="s")
REWRITE_91 = ("<Rewritten Prompt>Is 91, the number of days in a quarter, prime?</Rewritten Prompt>\n"
              "<Response>Yes</Response>\nOn second thought:\n<Response>Seven times thirteen is ninety-one.</Response>")


@pytest.mark.parametrize("layout,text,answer_prompt", [
    ("append", "Is 91, the number of days in a quarter, prime?\nSeven times thirteen is ninety-one.", "aide_answer_binary"),
    ("speakers", "Speaker 1: 'Is 91, the number of days in a quarter, prime?' Speaker 2: 'Seven times thirteen is ninety-one.'",
     "aide_answer_binary_speakers")])
def test_a_binary_rewrite_writes_a_reply_that_joins_the_instruction_and_the_answer_call_labels_it(layout, text, answer_prompt):
    """methods.md C4 2a/2c, the reference's call_relevance_synthesis → generate_binary_choice: the
    rewrite's <Response> (last match) is a reply inside the question; Yes/No comes from an answer call
    on the joined text, never from the rewrite."""
    s = step(BINARY if layout == "append" else {**BINARY, "binary_layout": layout})  # append: the default
    replies = {"aide_rewrite_concrete": REWRITE_91, answer_prompt: "Seven divides it, so it is not prime.\n<Choices>No</Choices>",
               "aide_grade_relevance": "<Score>8</Score>"}
    made, child = _scripted(s.grow(ChildSpec(PRIME, 1, "relevance", direction="concrete", skill="divisors"), PRIME.text), replies)
    asked = made[0].messages[0]["content"]
    assert made[0].prompt["id"] == "aide_rewrite_concrete"
    assert "a reply of more than two words" in asked and "<Response>My train leaves at seven tomorrow morning.</Response>" in asked
    assert child.reject is None and [name for name, _, _ in child.exchanges] == ["rewrite", "answer", "grade_1"]
    assert made[1].prompt["id"] == answer_prompt and made[1].messages[0]["content"].endswith(text)
    assert (child.text, child.answer, child.answer_call) == (text, "No", "answer")
    assert "response:ok" in child.statuses
    assert s.render(child) == ([{"role": "user", "content": text}, {"role": "assistant", "content": "No"}],
                               {"instruction": text, "answer": "No"})
    # the next hop rewrites the joined text (append) or Speaker 1's question (speakers), as the reference
    assert s.next_text(child.text) == (text if layout == "append" else "Is 91, the number of days in a quarter, prime?")
    # the other answer forms do not ask for a reply: their filled rewrite prompt is the version-1 text
    free = _first_prompt(step(TINY), ChildSpec(PRIME, 1, "relevance", direction="concrete", skill="divisors"), PRIME.text)
    assert "<Response>" not in free and "</Rewritten Prompt>.\n\nExample\n" in free


@pytest.mark.parametrize("reply,status", [("no response tag, the answer is Yes", "missing_tag"), ("<Response> </Response>", "empty")])
def test_a_binary_rewrite_without_a_reply_is_rejected_not_answered(reply, status):
    s = step(BINARY)
    replies = {"aide_rewrite_reasoning": f"<Rewritten Prompt>Is 97 prime?</Rewritten Prompt> {reply}"}
    _, child = _scripted(s.grow(ChildSpec(PRIME, 0, "relevance", direction="reasoning", skill="divisors"), PRIME.text), replies)
    assert (child.reject, child.detail, child.answer) == ("response_parse_failed", status, None)
    assert [name for name, _, _ in child.exchanges] == ["rewrite"] and child.statuses == ["rewrite:ok", f"response:{status}"]


def test_a_changed_binary_text_is_answered_again_and_diversity_children_also_write_a_reply():
    s = step({**BINARY, "max_reflection_relevance": 2})
    replies = {"aide_rewrite_reasoning": "<Rewritten Prompt>Is 97 prime?</Rewritten Prompt><Response>I only know 1 and 97 divide it."
                                         "</Response>",
               "aide_answer_binary": ["<Choices>Yes</Choices>", "<Choices>No</Choices>"],
               "aide_grade_relevance": ["<Score>2</Score>", "<Score>9</Score>"],
               "aide_improve": "<Improved Prompt>Is 91 prime? Seven divides it.</Improved Prompt>"}
    _, child = _scripted(s.grow(ChildSpec(PRIME, 0, "relevance", direction="reasoning", skill="divisors"), PRIME.text), replies)
    assert [name for name, _, _ in child.exchanges] == ["rewrite", "answer", "grade_1", "improve_1", "improve_1_answer", "grade_2"]
    assert (child.reject, child.text, child.answer, child.answer_call, child.grades) == (
        None, "Is 91 prime? Seven divides it.", "No", "improve_1_answer", [2, 9])
    replies = {"aide_create": "<Created Prompt>Is every cube odd?</Created Prompt><Response>Eight is a cube, you know.</Response>",
               "aide_answer_binary": "<Choices>No</Choices>", "aide_grade_diversity": "<Score>7</Score>"}
    made, child = _scripted(s.grow(ChildSpec(PRIME, 3, "diversity"), PRIME.text), replies)
    assert made[0].prompt == P.AIDE_CREATE.ref() and "a reply of more than two words" in made[0].messages[0]["content"]
    assert [name for name, _, _ in child.exchanges] == ["rewrite", "answer", "grade_1"]
    assert (child.text, child.answer, child.answer_call) == ("Is every cube odd?\nEight is a cube, you know.", "No", "answer")


def test_binary_rewrites_in_a_run_count_a_missing_reply_and_record_where_the_answer_came_from(tmp_path):
    """A whole (scripted) run: of two binary relevance children one has a <Response> and becomes a row
    whose instruction holds that reply and whose label is the answer call's; the other has none and is
    counted as response_parse_failed."""
    from curate.lm.calls import Reply

    s = step({**BINARY, "max_attributes": 2, "d_depth": 0, "directions": ["concrete"]}, tmp_path)

    def ask(calls):
        out = []
        for c in calls:
            pid, text = c.prompt["id"], c.messages[0]["content"]
            if pid == "aide_topic":
                r = "<Topic>primes</Topic><Related knowledge>divisors, squares</Related knowledge>"
            elif pid == "aide_rewrite_concrete" and '"divisors"' in text:
                r = ("<Rewritten Prompt>Is 91, the number of days in a quarter of a year, a prime number?</Rewritten Prompt>"
                     "<Response>Seven times thirteen gives it.</Response>")
            elif pid == "aide_rewrite_concrete":
                r = "<Rewritten Prompt>Is the square of a whole number ever prime?</Rewritten Prompt> Answer: No"
            elif pid == "aide_answer_binary":
                assert text.endswith("a prime number?\nSeven times thirteen gives it."), text
                r = "<Choices>No</Choices>"
            else:
                assert pid == "aide_grade_relevance", pid
                r = "<Score>8</Score>"
            out.append(Reply(r, "ok", "k" * 64))
        return out

    s.ask = ask
    seed = record("Is 17 a prime number?", "Yes")
    res = s.run_unit("all", [seed])
    st = res.stats
    assert st["rejected"] == {"response_parse_failed": 1} and st["accepted"] == 1
    assert st["statuses"]["response:ok"] == 1 and st["statuses"]["response:missing_tag"] == 1
    (row,) = res.derived
    assert row.messages[0]["content"].endswith("a prime number?\nSeven times thirteen gives it.")
    assert row.messages[1]["content"] == "No" and row.variant == "relevance:concrete"
    assert row.generation["answer_call"] == "answer" and set(row.generation["calls"]) == {"topic", "rewrite", "answer", "grade_1"}
    assert res.dispositions[seed["sample_id"]][0] == "used"


# -- tree-size bounds ---------------------------------------------------------------------------

CONFIGS = [
    dict(r_depth=2, d_depth=2, max_attributes=3, num_triples=2, ex_kg=True, persona_k=5, max_nodes_per_seed=None),
    dict(r_depth=2, d_depth=1, max_attributes=2, num_triples=0, ex_kg=False, persona_k=2, max_nodes_per_seed=None),
    dict(r_depth=3, d_depth=0, max_attributes=2, num_triples=1, ex_kg=True, persona_k=0, max_nodes_per_seed=40),
    dict(r_depth=1, d_depth=3, max_attributes=1, num_triples=0, ex_kg=False, persona_k=3, max_nodes_per_seed=25),
    dict(r_depth=2, d_depth=2, max_attributes=3, num_triples=2, ex_kg=True, persona_k=5, max_nodes_per_seed=50),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_breadth_first_allocation_matches_the_bound_and_never_passes_the_node_cap(cfg):
    """Grow the largest tree (every node analysed with the most attributes, every child accepted)
    with the step's own allocation: its children and analysed nodes equal tree_bound, and no seed
    gets more children than max_nodes_per_seed."""
    s = step({**TINY, **cfg, "personas": "data/personas.txt" if cfg["persona_k"] else None})
    p = s.params
    n_attr = p.max_attributes + (p.num_triples if p.ex_kg else 0)
    personas = [f"persona {i}" for i in range(p.persona_k)]
    issued: Counter = Counter()
    frontier = [Node(i, "0", 1, f"seed {i}", seed_sid=str(i)) for i in range(3)]
    analysed, rel, div, layer = 0, 0, 0, 1
    while frontier and layer <= max(p.r_depth, p.d_depth):
        want_rel, want_div = layer <= p.r_depth, layer <= p.d_depth and (not p.personas or bool(personas))
        for n in frontier:
            n.topic, n.attributes = "t", [f"a{j}" for j in range(n_attr)]
        analysed += len(frontier)
        specs, _ = allocate(frontier, want_rel, want_div, p.directions, personas if p.personas else [], p.max_nodes_per_seed, issued)
        rel += sum(x.kind == "relevance" for x in specs)
        div += sum(x.kind == "diversity" for x in specs)
        frontier = [Node(x.parent.seed, f"{x.parent.path}.{x.slot}", layer + 1, "c", parent=x.parent, seed_sid=x.parent.seed_sid) for x in specs]
        assert len({(x.parent.seed, x.parent.path, x.slot) for x in specs}) == len(specs)  # node ids are unique
        layer += 1
    b = s.tree_bound()
    M = p.max_nodes_per_seed
    assert max(issued.values()) <= (M if M is not None else 10**9)
    assert (rel + div) == 3 * b["children"]
    if M is None:
        assert (rel, div, analysed) == (3 * b["relevance_children"], 3 * b["diversity_children"], 3 * b["analysed"])
    else:
        assert analysed <= 3 * b["analysed"]


def test_children_are_dealt_breadth_first_and_fairly_under_the_node_cap():
    """The default tree (5 attributes x 3 directions + 1 created prompt = 16 children a node, cap 50):
    the seed issues its 16, and the 34 left are shared by all 16 level-2 nodes — 3 for the first two,
    2 for the rest — instead of the first nodes taking them all. A node's first children differ in
    attribute and direction; without a cap every child is issued (methods.md C4: every node expanded)."""
    attrs = [f"a{i}" for i in range(5)]
    seed = Node(0, "0", 1, "seed", topic="t", attributes=attrs, seed_sid="s")
    other = Node(1, "0", 1, "other seed", topic="t", attributes=attrs[:1], seed_sid="o")
    issued: Counter = Counter()
    specs, capped = allocate([seed, other], True, True, DIRECTIONS, [], 50, issued)
    assert [x.slot for x in specs if x.parent is seed] == list(range(16)) and not capped and issued == Counter({0: 16, 1: 4})
    level2 = [Node(0, f"0.{x.slot}", 2, "c", parent=seed, topic="t", attributes=attrs, seed_sid="s") for x in specs if x.parent is seed]
    specs2, capped2 = allocate(level2, True, True, DIRECTIONS, [], 50, issued)
    per_node = Counter(x.parent.path for x in specs2)
    assert [per_node[n.path] for n in level2] == [3, 3] + [2] * 14
    assert capped2 == Counter({0: 16 * 16 - 34}) and issued[0] == 50
    order = [(level2.index(x.parent), x.slot) for x in specs2]
    assert order == sorted(order)  # in tree order: node, then slot
    first = [(x.skill, x.direction) for x in specs2 if x.parent is level2[0]]
    assert first == [("a0", "reasoning"), ("a1", "concrete"), ("a2", "constraint")]
    # the nodes start at different groups, so the level mixes attributes, and the created prompt (group 6) appears
    assert [(x.kind, x.skill, x.direction) for x in specs2 if x.parent is level2[5]] == [
        ("relevance", "a0", "reasoning"), ("diversity", None, None)]
    assert len({x.skill for x in specs2 if x.kind == "relevance"}) == 5
    # a full cap leaves a level with nothing; no cap: everything
    assert allocate(level2, True, True, DIRECTIONS, [], 50, issued)[0] == []
    assert len(allocate(level2, True, True, DIRECTIONS, [], None, Counter())[0]) == 16 * 16


def test_plan_calls_arithmetic():
    # defaults: 5 attributes (3 + 2 KG) x 3 directions = 15 relevance + 1 created prompt per node, depth 2, cap 50
    s = step({"use_case": "code"})
    assert s.child_costs() == (3 * 5 + 2 * 5 + 1, 3 * 20 + 2 * 20 + 1) == (26, 101)
    b = s.tree_bound()
    assert (b["relevance_children"], b["diversity_children"]) == (15 + 16 * 15, 1 + 16 * 1)
    assert b["analysed"] == b["kg_calls"] == 17
    # the cap goes to the dearest children first: 17 diversity (101 calls each), then 33 relevance (26 each)
    assert b["calls"] == 17 + 17 + 17 * 101 + 33 * 26 == 2609 and s.plan_calls(6) == 6 * 2609
    assert step({"use_case": "code", "budget": {"max_calls": 1000}}).plan_calls(6) == 1000
    # no reflection: rewrite + answer per child
    s = step({"use_case": "code", "reflection": False, "max_nodes_per_seed": None, "r_depth": 1, "d_depth": 1, "ex_kg": False})
    assert s.child_costs() == (2, 2) and s.tree_bound()["calls"] == 1 + 2 * (9 + 1)
    # binary: no choice checks; every child's label comes from an answer call
    s = step({"use_case": "code", "choice_type": "binary", "max_reflection_relevance": 2, "max_reflection_diversity": 1})
    assert s.child_costs() == (3 * 2 + 2, 3 * 1 + 2)
    assert step({"use_case": "code", "choice_type": "binary", "reflection": False}).child_costs() == (2, 2)
    # the flow's tiny tree: 1 analysis + 2 children x (3*1 + 2*1 + 1) calls
    assert step(TINY).tree_bound()["calls"] == 1 + 2 * 6 == 13


# -- real runs with the bundled SmolLM2 ---------------------------------------------------------

@pytest.mark.slow
def test_real_level_of_children_is_batched_capped_and_counted(tmp_path):
    """One level of children of hand-made parent nodes (topic and attributes as data), grown by the
    real model: the node cap holds, every child is rejected with a reason, the calls per seed stay
    within the per-child cost, and the whole level was asked for in rounds of one batch each."""
    s = step({**TINY, "max_attributes": 2, "directions": ["reasoning", "constraint"], "max_nodes_per_seed": 3}, tmp_path)
    seeds = [Node(i, "0", 1, t, topic=topic, attributes=["loops", "recursion"], seed_sid=str(i))
             for i, (t, topic) in enumerate([("Write a Python function to calculate the factorial of a given number.", "factorial"),
                                             ("What are the distinct values in [3, 9, 3, 5]?", "sets")])]
    issued: Counter = Counter()
    specs, capped = allocate(seeds, True, True, s.params.directions, ["A chef."], 3, issued)
    assert len(specs) == 6 and capped == Counter({0: 2, 1: 2}) and issued == Counter({0: 3, 1: 3})
    per_seed: Counter = Counter()
    asked = []
    real_ask = s.ask
    s.ask = lambda calls: (asked.append(len(calls)), real_ask(calls))[1]
    children = s.drive([s.grow(x, seeds[x.parent.seed].text) for x in specs], [x.parent.seed for x in specs], per_seed)
    assert all(ch.reject for ch in children)
    reasons = Counter(ch.reject for ch in children)
    assert set(reasons) <= {"truncated", "rewrite_parse_failed", "answer_parse_failed", "reflection_rejected", "grade_parse_failed",
                            "answer_not_in_choices"}
    c_rel, c_div = s.child_costs()
    assert all(per_seed[i] <= 2 * c_rel + c_div for i in (0, 1))
    assert asked[0] == 6 and sum(asked) == sum(per_seed.values()) == s.engine.spent.calls


@pytest.mark.slow
def test_end_to_end_on_one_seed_then_the_rerun_makes_no_model_call(tmp_path):
    """A whole run with the real model for every child call; only the seed's analysis is given as data
    (SmolLM2-135M never writes <Topic>). With 8 new tokens no rewrite can close its tag: each of the
    two children of TINY's tree ends as ``truncated`` — the reply hit the limit and is not parsed —
    or, had the model stopped first, ``rewrite_parse_failed``; never a generic call failure. Every
    model call is sampled as the reference (temperature 1, top_p 0.95) with its own seed. The rerun
    reads everything from the call cache."""
    from curate.lm.calls import Reply

    seed = record("Write a Python function to calculate the factorial of a given number.",
                  "def factorial(n):\n    f = 1\n    for i in range(1, n + 1):\n        f *= i\n    return f")
    multi = {"sample_id": "m", "tools": None, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                                            {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]}
    params = {**TINY, "decoding": {"max_tokens": 8}}
    analysis = Reply("<Topic>factorial</Topic><Related knowledge>loops, recursion</Related knowledge>", "ok", "t" * 64)

    def run(s: AIDEStep, seen: list):
        real = s.ask

        def ask(calls):
            model = [c for c in calls if c.prompt["id"] != "aide_topic"]
            got = iter(real(model) if model else [])
            out = [analysis if c.prompt["id"] == "aide_topic" else next(got) for c in calls]
            seen.extend((c, r) for c, r in zip(calls, out) if c.prompt["id"] != "aide_topic")
            return out

        s.ask = ask
        return s.run_unit("all", [seed, multi])

    first, seen = step(params, tmp_path / "store"), []
    a = run(first, seen)
    st = a.stats
    assert st["seeds"] == 1 and st["not_single_turn"] == 1 and st["analysis"] == {"ok": 1}
    assert st["issued"] == 2 and st["levels"][0]["issued"] == 2  # one relevance (1 attribute x 1 direction), one persona child
    assert sorted(c.prompt["id"] for c, _ in seen) == ["aide_create_persona", "aide_rewrite_reasoning"]
    assert all(c.decoding.temperature == 1.0 and c.decoding.top_p == 0.95 and c.seed is not None for c, _ in seen)
    assert len({c.seed for c, _ in seen}) == 2 and first.engine.spent.made == 2
    n_cut = sum(r.status == "truncated" for _, r in seen)
    assert n_cut >= 1 and st["rejected"] == {k: v for k, v in {"truncated": n_cut, "rewrite_parse_failed": 2 - n_cut}.items() if v}
    assert a.derived == [] and a.dispositions["m"][:2] == ("passthrough", "not_single_turn")
    assert a.dispositions[seed["sample_id"]] == ("passthrough", "no_accepted_children",
                                                 f"children rejected: {canonical_json(st['rejected'])}")
    assert st["max_calls_per_seed"] <= st["bound"]["calls"] and first.engine.spent.calls <= first.plan_calls(1)
    again, seen_again = step(params, tmp_path / "store"), []
    b = run(again, seen_again)
    assert again.engine.spent.made == 0 and again.engine.spent.cache_hits == 2
    assert [r.text for _, r in seen_again] == [r.text for _, r in seen]
    assert b.dispositions == a.dispositions
    assert {k: v for k, v in b.stats.items() if k != "budget"} == {k: v for k, v in st.items() if k != "budget"}
