"""Conversation rules that every record must meet before it enters the pipeline.

They are the rules trainers rely on (see ``docs/exports.md``): at most one system message, first;
then turns alternate between the user side (``user`` or ``tool``) and ``assistant``; a ``tool``
message answers an assistant tool call; the conversation ends on the assistant; no empty user or
assistant text. A broken rule raises :class:`~curate.errors.RecordError`; the row is quarantined.
"""

from __future__ import annotations

from curate.errors import RecordError
from curate.records import ROLES, normalise_text


def normalise_messages(messages: list[dict]) -> list[dict]:
    return [
        {"role": m["role"], "content": normalise_text(m["content"]), "tool_calls": m.get("tool_calls")}
        for m in messages
    ]


def validate_messages(messages: list[dict], max_chars: int | None = None) -> None:
    if not messages:
        raise RecordError("empty_conversation", "the conversation has no messages", "messages")
    total = 0
    prev = None
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        where = f"messages[{i}]"
        if role not in ROLES:  # converters map roles; this guards programmatic input
            raise RecordError("unknown_role", f"unknown role '{role}' at {where}", f"{where}.role")
        total += len(content)
        if role == "system":
            if i != 0:
                raise RecordError("role_order", f"system message at {where}: only a first system message is allowed", where)
            prev = role
            continue
        if prev in (None, "system"):
            if role != "user":
                raise RecordError("role_order", f"the conversation must start with a user message, found '{role}' at {where}", where)
        elif role == "assistant":
            if prev == "assistant":
                raise RecordError("role_order", f"two assistant messages in a row at {where}", where)
        elif role == "user":
            if prev != "assistant":
                raise RecordError("role_order", f"two user-side messages in a row at {where}", where)
        elif role == "tool":
            if prev != "assistant" or not messages[i - 1].get("tool_calls"):
                raise RecordError("role_order", f"tool message at {where} does not answer an assistant tool call", where)
        if role == "user" and not content:
            raise RecordError("empty_prompt", f"empty user message at {where}", f"{where}.content")
        if role == "assistant" and not content and not m.get("tool_calls"):
            raise RecordError("empty_response", f"empty assistant message at {where}", f"{where}.content")
        prev = role
    if prev != "assistant":
        raise RecordError(
            "no_final_response",
            f"the conversation ends on a '{prev}' message, not on an assistant response",
            f"messages[{len(messages) - 1}]",
        )
    if messages[-1].get("tool_calls") and not messages[-1]["content"]:
        raise RecordError("no_final_response", "the conversation ends on a tool call, not on a response", f"messages[{len(messages) - 1}]")
    if max_chars is not None and total > max_chars:
        raise RecordError("too_long", f"the conversation has {total} characters, over max_chars={max_chars}", "messages")
