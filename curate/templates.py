"""Conversation templates for loss-based scorers (IFD family, perplexity).

A template renders a conversation to one string and reports where each assistant reply sits in it
(character spans), plus the *assistant cue* used as the direct-pass prefix (``direct_prefix:
header``). Whitespace is part of the contract: every string a template writes around the
conversation's own text is in its ``contract()`` (the fields of its :class:`Layout` plus the joins all
templates share), and ``template_hash`` is the sha256 of those exact bytes (methods.md A1/E1), so
changing one byte of a layout changes the score key.

=============  =====================================================================================
``alpaca``     Stanford Alpaca: preamble, ``### Instruction:``, optional ``### Input:``,
               ``### Response:`` — the reply follows the cue with no space (Cherry IFD's default).
               Multi-turn (ours): further ``### Instruction:``/``### Response:`` blocks.
``wiz``        ``{instruction}\\n\\n### Response:{reply}`` (Cherry's WizardLM form).
``vicuna``     Vicuna v1.1: system sentence, `` USER: {q} ASSISTANT:{reply}``, ``</s>`` between turns.
``none``       no template (Superfiltering): ``{q}\\n{reply}``; turns joined by ``\\n``.
``chat``       the model's own chat template (``tokenizer.apply_chat_template``); its hash covers the
               Jinja source and the special tokens it can print.
=============  =====================================================================================

Alpaca source rows keep their instruction/input split: the turn that came from the row's
``instruction``/``input`` fields (its last turn; earlier turns come from ``history``; recognised by its
user text, so a history turn with the very same text renders the same way) renders with the
``turn_input`` layout when the input is not empty (alpaca: an ``### Input:`` block and the
with-input preamble; vicuna: ``Input:``), in both context modes; every other turn renders its own
user text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from curate.prompts import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, VICUNA_SYSTEM
from curate.records import normalise_text

TEMPLATE_IDS = ("alpaca", "wiz", "vicuna", "none", "chat")

#: How the user side of a turn (user and tool messages) is joined, and how an assistant's text and
#: its tool call are joined. Part of every template's hashed layout.
USER_JOIN = "\n\n"
TOOL_CALL_JOIN = "\n"


@dataclass
class Rendered:
    text: str
    replies: list[tuple[int, int]]  # character [start, end) of each assistant reply
    add_special_tokens: bool  # tokenize with the tokenizer's own BOS/EOS handling


def message_text(m: dict) -> str:
    """A message's text; an assistant tool call is its JSON (as in the messages export)."""
    if m.get("tool_calls"):
        return f"{m['content']}{TOOL_CALL_JOIN}{m['tool_calls']}" if m["content"] else m["tool_calls"]
    return m["content"]


def split_turns(messages: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system text, [(user-side text, reply)]): user-side messages of a turn joined by blank lines."""
    system = None
    msgs = messages
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    turns, user = [], []
    for m in msgs:
        if m["role"] == "assistant":
            turns.append((USER_JOIN.join(user), message_text(m)))
            user = []
        else:
            user.append(message_text(m))
    return system, turns


def alpaca_input(record: dict | None) -> tuple[str, str, str] | None:
    """(user text of the row's final turn, instruction, input) of an alpaca source row whose input is
    not empty. The final turn is the one built from the ``instruction``/``input`` fields."""
    if not record or record.get("format") != "alpaca" or not record.get("original"):
        return None
    orig = json.loads(record["original"])
    ins, inp = orig.get("instruction"), orig.get("input")
    if not (isinstance(ins, str) and isinstance(inp, str) and inp.strip()):
        return None
    _, turns = split_turns(record["messages"])
    return (turns[-1][0], normalise_text(ins), normalise_text(inp)) if turns else None


class Template:
    id: str = ""
    #: the composition code's version (how layout fields are put together); the bytes are hashed
    version: str = "2"
    cue: str = ""

    def render(self, messages: list[dict], record: dict | None = None) -> Rendered:
        raise NotImplementedError

    def header(self) -> str:
        """The assistant cue alone: the direct-pass prefix of ``direct_prefix: header``."""
        return self.cue

    def fingerprint(self) -> dict[str, str]:
        """``template_id`` and ``template_hash`` = sha256 of the canonical JSON of the layout bytes."""
        contract = json.dumps(self.contract(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return {"template_id": self.id, "template_hash": hashlib.sha256(contract.encode()).hexdigest()}

    def contract(self) -> dict[str, Any]:
        """Every string this template writes around the conversation's own text."""
        return {"id": self.id, "version": self.version, "cue": self.cue, "user_join": USER_JOIN, "tool_call_join": TOOL_CALL_JOIN}


@dataclass(frozen=True)
class Layout:
    """The exact strings of a concatenation template. Fields are ``str.format`` patterns over the
    conversation's own text: ``{system}``, ``{q}`` (user side of a turn), ``{instruction}``/``{input}``
    (an alpaca source turn with input)."""

    head: str  # before the first turn, when there is a system text (the row's or the default)
    turn: str  # one turn's prompt, ending with the assistant cue; the reply follows it directly
    turn_input: str  # the same for an alpaca source turn with a non-empty input ("": rendered with ``turn``)
    between: str  # after a reply, before the next turn
    cue: str  # the assistant cue (the direct-pass header)
    default_system: str = ""  # system text when the conversation has none
    default_system_input: str = ""  # ... when one of its turns renders with ``turn_input``

    def __post_init__(self):
        if not self.turn.endswith(self.cue) or (self.turn_input and not self.turn_input.endswith(self.cue)):
            raise ValueError("a turn layout must end with the assistant cue")
        if self.default_system_input and not self.turn_input:
            raise ValueError("default_system_input needs a turn_input layout")


class Joined(Template):
    """Templates built by concatenating the strings of a :class:`Layout` around each turn."""

    layout: Layout

    def __init__(self, layout: Layout | None = None):
        if layout is not None:  # a variant of a built-in layout (the template-hash tests edit one byte)
            self.layout = layout
        self.cue = self.layout.cue

    def contract(self):
        return {**super().contract(), "layout": asdict(self.layout)}

    def render(self, messages, record=None):
        lay = self.layout
        system, turns = split_turns(messages)
        split = alpaca_input(record)  # only the turn built from instruction/input (its user text) uses it
        own = [split[1:] if split and lay.turn_input and q == split[0] else None for q, _ in turns]
        if not system:
            system = lay.default_system_input if any(own) and lay.default_system_input else lay.default_system
        text = lay.head.format(system=system) if system else ""
        spans = []
        for t, (q, a) in enumerate(turns):
            if t:
                text += lay.between
            text += lay.turn_input.format(instruction=own[t][0], input=own[t][1]) if own[t] else lay.turn.format(q=q)
            spans.append((len(text), len(text) + len(a)))
            text += a
        return Rendered(text, spans, True)


class Alpaca(Joined):
    id = "alpaca"
    layout = Layout(
        head="{system}\n\n",
        turn="### Instruction:\n{q}\n\n### Response:",
        turn_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        between="\n\n",
        cue="### Response:",
        default_system=ALPACA_NO_INPUT.text,
        default_system_input=ALPACA_WITH_INPUT.text,
    )


class Wiz(Joined):
    id = "wiz"
    layout = Layout(head="{system}\n\n", turn="{q}\n\n### Response:", turn_input="", between="\n\n", cue="### Response:")


class Vicuna(Joined):
    id = "vicuna"
    layout = Layout(head="{system} ", turn="USER: {q} ASSISTANT:", turn_input="USER: {instruction}\nInput:\n{input} ASSISTANT:",
                    between="</s>", cue="ASSISTANT:", default_system=VICUNA_SYSTEM.text)


class NoTemplate(Joined):
    id = "none"
    layout = Layout(head="{system}\n", turn="{q}\n", turn_input="", between="\n", cue="")


class ChatTemplate(Template):
    """The tokenizer's own chat template; replies located by rendering each turn's prefix."""

    id = "chat"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template: use template: alpaca, vicuna, wiz or none")
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": "x"}]
        with_cue = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
        self.cue = with_cue[len(without):] if with_cue.startswith(without) else ""

    def contract(self):
        """The Jinja source byte for byte, and the special tokens a template can print."""
        tok = self.tokenizer
        specials = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
        return {**super().contract(), "chat_template": tok.chat_template, "special_tokens": specials}

    @staticmethod
    def _plain(messages):
        return [{"role": m["role"], "content": message_text(m)} for m in messages]

    def render(self, messages, record=None):
        msgs = self._plain(messages)
        full = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self.tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            if not full.startswith(prefix) or not full[len(prefix):].startswith(m["content"]):
                raise ValueError("the chat template does not reproduce the reply verbatim after its prefix")
            spans.append((len(prefix), len(prefix) + len(m["content"])))
        return Rendered(full, spans, False)


def get_template(name: str, tokenizer: Any = None) -> Template:
    if name == "chat":
        return ChatTemplate(tokenizer)
    table = {"alpaca": Alpaca, "wiz": Wiz, "vicuna": Vicuna, "none": NoTemplate}
    if name not in table:
        raise ValueError(f"unknown template '{name}' (known: {', '.join(TEMPLATE_IDS)})")
    return table[name]()
