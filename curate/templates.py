"""Conversation templates for loss-based scorers (IFD family, perplexity).

A template renders a conversation to one string and reports where each assistant reply sits in it
(character spans), plus the *assistant cue* used as the direct-pass prefix (``direct_prefix:
header``). Whitespace is part of the contract; every template has an id and a hash.

=============  =====================================================================================
``alpaca``     Stanford Alpaca: preamble, ``### Instruction:``, optional ``### Input:``,
               ``### Response:`` — the reply follows the cue with no space (Cherry IFD's default).
               Multi-turn (ours): further ``### Instruction:``/``### Response:`` blocks.
``wiz``        ``{instruction}\\n\\n### Response:{reply}`` (Cherry's WizardLM form).
``vicuna``     Vicuna v1.1: system sentence, `` USER: {q} ASSISTANT:{reply}``, ``</s>`` between turns.
``none``       no template (Superfiltering): ``{q}\\n{reply}``; turns joined by ``\\n``.
``chat``       the model's own chat template (``tokenizer.apply_chat_template``).
=============  =====================================================================================

For an alpaca source row with a non-empty ``input`` the templates that distinguish it (alpaca,
vicuna) use the original instruction/input split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from curate.prompts import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, VICUNA_SYSTEM
from curate.records import normalise_text

TEMPLATE_IDS = ("alpaca", "wiz", "vicuna", "none", "chat")


@dataclass
class Rendered:
    text: str
    replies: list[tuple[int, int]]  # character [start, end) of each assistant reply
    add_special_tokens: bool  # tokenize with the tokenizer's own BOS/EOS handling


def message_text(m: dict) -> str:
    """A message's text; an assistant tool call is its JSON (as in the messages export)."""
    if m.get("tool_calls"):
        return f"{m['content']}\n{m['tool_calls']}" if m["content"] else m["tool_calls"]
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
            turns.append(("\n\n".join(user), message_text(m)))
            user = []
        else:
            user.append(message_text(m))
    return system, turns


def alpaca_input(record: dict | None) -> tuple[str, str] | None:
    """(instruction, input) of an alpaca source row whose input is not empty."""
    if not record or record.get("format") != "alpaca" or not record.get("original"):
        return None
    orig = json.loads(record["original"])
    ins, inp = orig.get("instruction"), orig.get("input")
    if isinstance(ins, str) and isinstance(inp, str) and inp.strip():
        return normalise_text(ins), normalise_text(inp)
    return None


class Template:
    id: str = ""
    version: str = "1"
    cue: str = ""

    def render(self, messages: list[dict], record: dict | None = None) -> Rendered:
        raise NotImplementedError

    def header(self) -> str:
        """The assistant cue alone: the direct-pass prefix of ``direct_prefix: header``."""
        return self.cue

    def fingerprint(self) -> dict[str, str]:
        return {"template_id": self.id, "template_hash": hashlib.sha256(self._contract().encode()).hexdigest()}

    def _contract(self) -> str:
        return f"{self.id}\x00{self.version}\x00{self.cue}"


class _Joined(Template):
    """Templates built by concatenating strings around each turn."""

    def _parts(self, system, q: str, first: bool, split: tuple[str, str] | None) -> str:
        raise NotImplementedError

    between = ""

    def render(self, messages, record=None):
        system, turns = split_turns(messages)
        split = alpaca_input(record) if len(turns) == 1 else None
        text, spans = "", []
        for t, (q, a) in enumerate(turns):
            if t:
                text += self.between
            text += self._parts(system, q, t == 0, split)
            spans.append((len(text), len(text) + len(a)))
            text += a
        return Rendered(text, spans, True)


class Alpaca(_Joined):
    id, cue, between = "alpaca", "### Response:", "\n\n"

    def _parts(self, system, q, first, split):
        head = ""
        if first:
            preamble = system or (ALPACA_WITH_INPUT.text if split else ALPACA_NO_INPUT.text)
            head = preamble + "\n\n"
        if split:
            return head + f"### Instruction:\n{split[0]}\n\n### Input:\n{split[1]}\n\n### Response:"
        return head + f"### Instruction:\n{q}\n\n### Response:"

    def _contract(self):
        return super()._contract() + ALPACA_NO_INPUT.hash + ALPACA_WITH_INPUT.hash + "multi:###Instruction-blocks"


class Wiz(_Joined):
    id, cue, between = "wiz", "### Response:", "\n\n"

    def _parts(self, system, q, first, split):
        head = f"{system}\n\n" if (first and system) else ""
        return head + f"{q}\n\n### Response:"


class Vicuna(_Joined):
    id, cue, between = "vicuna", "ASSISTANT:", "</s>"

    def _parts(self, system, q, first, split):
        if split:
            q = f"{split[0]}\nInput:\n{split[1]}"
        head = (system or VICUNA_SYSTEM.text) + " " if first else ""
        return head + f"USER: {q} ASSISTANT:"

    def _contract(self):
        return super()._contract() + VICUNA_SYSTEM.hash


class NoTemplate(_Joined):
    id, cue, between = "none", "", "\n"

    def _parts(self, system, q, first, split):
        head = f"{system}\n" if (first and system) else ""
        return head + f"{q}\n"


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

    def _contract(self):
        return super()._contract() + self.tokenizer.chat_template

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
