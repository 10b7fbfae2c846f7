"""AIDE's model calls (:mod:`curate.rewrite.aide`), one unit per call kind. Each unit pairs the prompt
it fills (``format_input``, giving the :class:`~curate.lm.calls.Call`) with the parse of its reply
(``format_output``), as distilabel's tasks pair ``format_input`` with ``format_output``:

- :data:`TOPIC` (call ``topic``) — a node's ``<Topic>`` and ``<Related knowledge>``;
- :data:`KG_EXPAND` (``kg``) — more attributes of a node, from ``[topic, relation, concept]`` triples;
- :data:`RELEVANCE_HOP` / :data:`DIVERSITY_HOP` (``rewrite``) — a child's instruction: the node's
  text rewritten along a direction and a skill (``<Rewritten Prompt>``) or a new one, in a persona's
  voice (``<Created Prompt>``); binary tasks: with a ``<Response>``, joined to it by ``binary_layout``;
- :data:`ANSWER` (``answer``, ``<improve call>_answer``, ``check_<k>_answer``) — the child's answer
  in ``<Choices>``;
- :data:`IMPROVE` (``shorten``, ``improve_<k>``) — the child's ``<Improved Prompt>``;
- :data:`GRADE_RELEVANCE` / :data:`GRADE_DIVERSITY` (``grade_<k>``) — a ``<Score>`` of 1–10,
  accepted when > :data:`ACCEPT_ABOVE`;
- :data:`CHECK` (``check_<k>``) — whether the answer is among the choices (``<Response>`` Yes/No).

``format_input(step, target, name, …)`` builds the call named ``name`` for ``target`` (a
:class:`~curate.rewrite.aide.Node` for the analysis units, else a :class:`~curate.rewrite.aide.Child`).
Its place ``<seed sample_id>/<node path>[.<slot>]/<name>`` gives the call its seed and cache entry
(:meth:`~curate.rewrite.aide.AIDEStep.ask_one`), so the names are part of a run's identity.
``format_output(step, target, name, reply)`` is given only an ``ok`` reply (a failed or truncated one
is never parsed: :meth:`~curate.rewrite.aide.AIDEStep.run_call`); it writes what it parsed into the
target (on a child also the parse status, ``<name>:<status>``) and returns the value named in its
docstring. The order of the calls is :meth:`~curate.rewrite.aide.AIDEStep.grow`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from curate import prompts as P
from curate.lm.calls import Call, Reply
from curate.rewrite.tags import parse_attributes, parse_choices, parse_grade, parse_tag, parse_triples, parse_yes_no, yes_no

if TYPE_CHECKING:
    from curate.rewrite.aide import AIDEStep, Child, ChildSpec, Node

REWRITE_PROMPTS = {"reasoning": P.AIDE_REWRITE_REASONING, "concrete": P.AIDE_REWRITE_CONCRETE, "constraint": P.AIDE_REWRITE_CONSTRAINT}
ANSWER_PROMPTS = {"multi_choice": P.AIDE_ANSWER_MULTI, "binary": P.AIDE_ANSWER_BINARY, "free_form": P.AIDE_ANSWER_FREE}
ACCEPT_ABOVE = 4  # a grade is an acceptance when > 4 (methods.md C4 step 4)


# -- binary layout --------------------------------------------------------------------------------

def join_reply(question: str, reply: str, layout: str) -> str:
    """The instruction of a binary child: its question and the reply written to it (``binary_layout``)."""
    if layout == "speakers":
        return f"Speaker 1: '{question}' Speaker 2: '{reply}'"
    return f"{question}\n{reply}"


_SPEAKERS = re.compile(r"Speaker 1: '(.*)' Speaker 2: '.*'", re.S)


def speaker_1(text: str) -> str | None:
    """Speaker 1's question in a ``speakers`` instruction; None when the text is not in that layout."""
    m = _SPEAKERS.fullmatch(text.strip())
    return m.group(1).strip() if m and m.group(1).strip() else None


# -- the units ------------------------------------------------------------------------------------

class CallUnit:
    """One kind of AIDE call: :meth:`format_input` builds it, :meth:`format_output` parses its ``ok`` reply."""

    def format_input(self, step: AIDEStep, target: Any, name: str, *args: Any) -> Call:
        raise NotImplementedError

    def format_output(self, step: AIDEStep, target: Any, name: str, reply: Reply) -> Any:
        raise NotImplementedError


class Topic(CallUnit):
    """A node's analysis: its topic and related knowledge (at most ``max_attributes``). Returns the
    parse status; sets the node's ``topic`` and ``status``, and when a topic was found its ``attributes``."""

    def format_input(self, step: AIDEStep, node: Node, name: str) -> Call:
        return step.ask_one(P.AIDE_TOPIC, f"{node.seed_sid}/{node.path}/{name}", instruction=node.text)

    def format_output(self, step: AIDEStep, node: Node, name: str, reply: Reply) -> str:
        topic, attrs, status = parse_attributes(reply.text, step.params.max_attributes)
        node.topic, node.status = topic, status
        if topic is not None:
            node.attributes = attrs
        return status


class KGExpand(CallUnit):
    """Knowledge-graph expansion of an analysed node: up to ``num_triples`` new concepts, added to its
    ``attributes``. Returns them."""

    def format_input(self, step: AIDEStep, node: Node, name: str) -> Call:
        triples = "\n".join(f'["{node.topic}", "has", "{a}"]' for a in node.attributes)
        return step.ask_one(P.AIDE_KG_EXPAND, f"{node.seed_sid}/{node.path}/{name}", topic=node.topic, triples=triples,
                            n=step.params.num_triples)

    def format_output(self, step: AIDEStep, node: Node, name: str, reply: Reply) -> list[str]:
        new = parse_triples(reply.text, node.attributes, step.params.num_triples)
        node.attributes = node.attributes + new
        return new


@dataclass(frozen=True)
class Hop(CallUnit):
    """A child's instruction from its parent node's text; ``tag``: the reply's tag. Binary tasks: the
    prompt also asks for a ``<Response>`` (a reply to the question, its output shape added for
    ``decoding.constrain``), joined to the question by ``binary_layout``. Returns None, or why the child
    is rejected (``rewrite_parse_failed``, ``response_parse_failed``; the tag's status as its detail);
    sets the child's ``text``."""

    tag: str

    def prompt(self, step: AIDEStep, spec: ChildSpec, seed_text: str) -> tuple[P.Prompt, dict[str, Any]]:
        """The prompt and its fields but the answer and response forms."""
        raise NotImplementedError

    def format_input(self, step: AIDEStep, child: Child, name: str, seed_text: str) -> Call:
        prompt, fields = self.prompt(step, child.spec, seed_text)
        binary = step.params.choice_type == "binary"
        fields["answer_form"] = P.AIDE_ANSWER_FORM_BINARY.text if binary else ""
        fields["response_form"] = P.AIDE_RESPONSE_FORM.text if binary else ""
        shape = P.with_response(prompt.shape) if binary else None  # the binary <Response> follows the tag (constrain)
        return step.ask_one(prompt, child.where(name), shape=shape, instruction=child.spec.parent.text, **fields)

    def format_output(self, step: AIDEStep, child: Child, name: str, reply: Reply) -> str | None:
        text, status = parse_tag(reply.text, self.tag)
        child.statuses.append(f"{name}:{status}")
        if text is None:
            child.detail = status
            return "rewrite_parse_failed"
        if step.params.choice_type == "binary":
            # methods.md C4 2a: the <Response> is a reply inside the question; the label comes from the answer call
            response, status = parse_tag(reply.text, "Response")
            child.statuses.append(f"response:{status}")
            if response is None:
                child.detail = status
                return "response_parse_failed"
            text = join_reply(text, response, step.params.binary_layout)
        child.text = text
        return None


@dataclass(frozen=True)
class RelevanceHop(Hop):
    """A relevance hop: the node's text rewritten along the child's direction and skill; past layer
    ``sk_conn`` asked to stay close to the seed (``match_reference``: the reasoning direction only)."""

    tag: str = "Rewritten Prompt"

    def prompt(self, step: AIDEStep, spec: ChildSpec, seed_text: str) -> tuple[P.Prompt, dict[str, Any]]:
        p = step.params
        node = spec.parent
        residual = ""
        if node.layer > p.sk_conn and (not p.match_reference or spec.direction == "reasoning"):
            residual = P.AIDE_RESIDUAL.text.format(seed=seed_text)
        return REWRITE_PROMPTS[spec.direction], dict(use_case=p.use_case, topic=node.topic, skill=spec.skill, residual=residual,
                                                     examples=step.examples(spec.direction))


@dataclass(frozen=True)
class DiversityHop(Hop):
    """A diversity hop: a new instruction on the node's topic, different from its text, in the child's
    persona's voice (without a persona: a plain one)."""

    tag: str = "Created Prompt"

    def prompt(self, step: AIDEStep, spec: ChildSpec, seed_text: str) -> tuple[P.Prompt, dict[str, Any]]:
        p = step.params
        prompt = P.AIDE_CREATE_PERSONA if spec.persona else P.AIDE_CREATE
        fields = dict(use_case=p.use_case, topic=spec.parent.topic, examples=step.examples("create"))
        if spec.persona:
            fields["persona"] = spec.persona
        return prompt, fields


class Answer(CallUnit):
    """The answer to the child's instruction in ``<Choices>``, by ``choice_type``: ``Correct:`` /
    ``Incorrect:`` options, Yes or No (binary ``speakers``: whether Speaker 2 answers Speaker 1), or a
    free answer. Returns None, or why the child is rejected (``answer_parse_failed``); sets the child's
    ``answer``, ``answer_raw`` and ``answer_call`` (``name``)."""

    def format_input(self, step: AIDEStep, child: Child, name: str) -> Call:
        p = step.params
        speakers = p.choice_type == "binary" and p.binary_layout == "speakers"
        prompt = P.AIDE_ANSWER_BINARY_SPEAKERS if speakers else ANSWER_PROMPTS[p.choice_type]
        return step.ask_one(prompt, child.where(name), instruction=child.text)

    def format_output(self, step: AIDEStep, child: Child, name: str, reply: Reply) -> str | None:
        choice_type = step.params.choice_type
        body, status = parse_tag(reply.text, "Choices")
        child.statuses.append(f"{name}:{status}")
        if body is None:
            return "answer_parse_failed"
        if choice_type == "multi_choice":
            opts = parse_choices(body)
            if not opts:
                child.statuses.append(f"{name}:no_options")
                return "answer_parse_failed"
            child.answer, child.answer_raw = opts, body
        elif choice_type == "binary":
            yn = yes_no(body)  # the <Choices> body parsed above (what parse_yes_no would parse again)
            if yn is None:
                child.statuses.append(f"{name}:not_yes_no")
                return "answer_parse_failed"
            child.answer = child.answer_raw = "Yes" if yn else "No"
        else:
            child.answer = child.answer_raw = body
        child.answer_call = name
        return None


class Improve(CallUnit):
    """The child's instruction improved with a ``feedback`` prompt, against ``original``. Returns the
    improved text (None when the tag is missing or empty)."""

    def format_input(self, step: AIDEStep, child: Child, name: str, original: str, feedback: P.Prompt) -> Call:
        return step.ask_one(P.AIDE_IMPROVE, child.where(name), use_case=step.params.use_case, original=original, instruction=child.text,
                            feedback=feedback.text)

    def format_output(self, step: AIDEStep, child: Child, name: str, reply: Reply) -> str | None:
        text, status = parse_tag(reply.text, "Improved Prompt")
        child.statuses.append(f"{name}:{status}")
        return text


@dataclass(frozen=True)
class Grade(CallUnit):
    """A judge's grade of the child's instruction against ``original`` (``judge_max_tokens`` caps the
    reply); ``feedback``: what the improve call after a failed grade is told. Returns whether the
    grade accepts the child; the grade (None when it does not parse) is appended to its ``grades``."""

    prompt: P.Prompt
    feedback: P.Prompt

    def format_input(self, step: AIDEStep, child: Child, name: str, original: str) -> Call:
        return step.ask_one(self.prompt, child.where(name), judge=True, use_case=step.params.use_case, original=original,
                            instruction=child.text)

    def format_output(self, step: AIDEStep, child: Child, name: str, reply: Reply) -> bool:
        g, status = parse_grade(reply.text)
        child.grades.append(g)
        child.statuses.append(f"{name}:{status}")
        return g is not None and g > ACCEPT_ABOVE


class Check(CallUnit):
    """Whether the child's answer is among its choices (the teacher works it out first, so the call
    gets the whole ``decoding.max_tokens``). Returns True only for a parsed Yes."""

    def format_input(self, step: AIDEStep, child: Child, name: str) -> Call:
        return step.ask_one(P.AIDE_CHECK_CHOICES, child.where(name), instruction=child.text, choices=child.answer_raw)

    def format_output(self, step: AIDEStep, child: Child, name: str, reply: Reply) -> bool:
        ok, status = parse_yes_no(reply.text, "Response")
        child.statuses.append(f"{name}:{status}")
        return ok is True


TOPIC = Topic()
KG_EXPAND = KGExpand()
RELEVANCE_HOP = RelevanceHop()
DIVERSITY_HOP = DiversityHop()
ANSWER = Answer()
IMPROVE = Improve()
GRADE_RELEVANCE = Grade(P.AIDE_GRADE_RELEVANCE, P.AIDE_FEEDBACK_NOT_RELEVANT)
GRADE_DIVERSITY = Grade(P.AIDE_GRADE_DIVERSITY, P.AIDE_FEEDBACK_TOO_SIMILAR)
CHECK = Check()
