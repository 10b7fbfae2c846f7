"""Instruction-data layouts and their conversion to canonical messages.

Supported layouts (``format:`` in an input spec):

- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], …]}``
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}],
  "system"?, "tools"?}``
- ``openai``: ``{"messages": [{"role", "content", "tool_calls"?}], "tools"?}``
- ``prompt_completion``: ``{"prompt": str | [messages], "completion": str | [messages]}``

``fields`` in the input spec renames source columns to these names (``{"output": "response"}``).
Every converter raises :class:`~curate.errors.RecordError` naming the offending field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from curate.errors import RecordError
from curate.records import message

FORMATS = ("alpaca", "sharegpt", "openai", "prompt_completion")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _get(record: dict, name: str, fields: dict[str, str]) -> tuple[str, Any]:
    """Return (source field name, value) for canonical field ``name``; value is ... when absent."""
    src = fields.get(name, name)
    return src, record.get(src, ...)


def _string(record: dict, name: str, fields: dict[str, str], required: bool = True) -> str | None:
    src, value = _get(record, name, fields)
    if value is ... or value is None:
        if required:
            raise RecordError("missing_field", f"missing required field '{src}'", src)
        return None
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"field '{src}' must be a string, got {type(value).__name__}", src)
    return value


def _tools(record: dict, fields: dict[str, str]) -> str | None:
    src, value = _get(record, "tools", fields)
    if value is ... or value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError("invalid_json", f"field '{src}' is not valid JSON: {exc.msg}", src) from None
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    raise RecordError("wrong_type", f"field '{src}' must be a JSON string or a list", src)


def from_alpaca(record: dict, fields: dict[str, str]) -> tuple[list[dict], str | None]:
    instruction = _string(record, "instruction", fields)
    inp = _string(record, "input", fields, required=False) or ""
    output = _string(record, "output", fields)
    system = _string(record, "system", fields, required=False)
    msgs = []
    if system and system.strip():
        msgs.append(message("system", system))
    src, history = _get(record, "history", fields)
    if history not in (..., None):
        if not isinstance(history, list):
            raise RecordError("wrong_type", f"field '{src}' must be a list of [query, response] pairs", src)
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RecordError("wrong_type", f"field '{src}[{i}]' must be a [query, response] pair of strings", f"{src}[{i}]")
            msgs += [message("user", pair[0]), message("assistant", pair[1])]
    prompt = instruction if not inp.strip() else f"{instruction}\n{inp}"
    msgs += [message("user", prompt), message("assistant", output)]
    return msgs, None


def from_sharegpt(record: dict, fields: dict[str, str]) -> tuple[list[dict], str | None]:
    src, conv = _get(record, "conversations", fields)
    if conv is ... or conv is None:
        raise RecordError("missing_field", f"missing required field '{src}'", src)
    if not isinstance(conv, list):
        raise RecordError("wrong_type", f"field '{src}' must be a list of messages", src)
    msgs = []
    system = _string(record, "system", fields, required=False)
    if system and system.strip():
        msgs.append(message("system", system))
    for i, turn in enumerate(conv):
        where = f"{src}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", f"field '{where}' must be an object", where)
        role_key = "from" if "from" in turn else "role"
        text_key = "value" if "value" in turn else "content"
        raw_role = turn.get(role_key)
        if not isinstance(raw_role, str):
            raise RecordError("missing_field", f"field '{where}.from' is missing or not a string", f"{where}.from")
        role = SHAREGPT_ROLES.get(raw_role.lower())
        if role is None:
            raise RecordError(
                "unknown_role",
                f"unknown role '{raw_role}' in '{where}.{role_key}' (known: {', '.join(sorted(SHAREGPT_ROLES))})",
                f"{where}.{role_key}",
            )
        value = turn.get(text_key)
        if not isinstance(value, str):
            raise RecordError("wrong_type", f"field '{where}.{text_key}' must be a string", f"{where}.{text_key}")
        if raw_role.lower() == "function_call":
            msgs.append(message("assistant", "", tool_calls=value))
        else:
            msgs.append(message(role, value))
    return msgs, _tools(record, fields)


def _openai_content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):  # content parts
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RecordError("wrong_type", f"field '{where}[{j}]' is not a text part", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise RecordError("wrong_type", f"field '{where}' must be a string or a list of text parts", where)


def _openai_messages(value: Any, src: str) -> list[dict]:
    if not isinstance(value, list):
        raise RecordError("wrong_type", f"field '{src}' must be a list of messages", src)
    msgs = []
    for i, m in enumerate(value):
        where = f"{src}[{i}]"
        if not isinstance(m, dict):
            raise RecordError("wrong_type", f"field '{where}' must be an object", where)
        raw_role = m.get("role")
        if not isinstance(raw_role, str):
            raise RecordError("missing_field", f"field '{where}.role' is missing or not a string", f"{where}.role")
        role = OPENAI_ROLES.get(raw_role)
        if role is None:
            raise RecordError(
                "unknown_role", f"unknown role '{raw_role}' in '{where}.role' (known: {', '.join(OPENAI_ROLES)})", f"{where}.role"
            )
        content = _openai_content(m.get("content"), f"{where}.content")
        calls = m.get("tool_calls")
        tool_calls = json.dumps(calls, ensure_ascii=False, sort_keys=True) if calls else None
        msgs.append(message(role, content, tool_calls))
    return msgs


def from_openai(record: dict, fields: dict[str, str]) -> tuple[list[dict], str | None]:
    src, value = _get(record, "messages", fields)
    if value is ... or value is None:
        raise RecordError("missing_field", f"missing required field '{src}'", src)
    return _openai_messages(value, src), _tools(record, fields)


def from_prompt_completion(record: dict, fields: dict[str, str]) -> tuple[list[dict], str | None]:
    psrc, prompt = _get(record, "prompt", fields)
    csrc, completion = _get(record, "completion", fields)
    for src, value in ((psrc, prompt), (csrc, completion)):
        if value is ... or value is None:
            raise RecordError("missing_field", f"missing required field '{src}'", src)
    if isinstance(prompt, str):
        msgs = [message("user", prompt)]
    else:
        msgs = _openai_messages(prompt, psrc)
    if isinstance(completion, str):
        msgs.append(message("assistant", completion))
    else:
        msgs += _openai_messages(completion, csrc)
    return msgs, _tools(record, fields)


CONVERTERS: dict[str, Callable[[dict, dict[str, str]], tuple[list[dict], str | None]]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "openai": from_openai,
    "prompt_completion": from_prompt_completion,
}

# Fields whose presence identifies a layout, in order of preference.
SIGNATURES = (
    ("openai", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
)


def detect_format(record: dict, fields: dict[str, str] | None = None) -> str | None:
    """The layout whose identifying fields ``record`` has, or None."""
    fields = fields or {}
    for name, keys in SIGNATURES:
        if all(fields.get(k, k) in record for k in keys):
            return name
    return None


def required_fields(fmt: str, fields: dict[str, str] | None = None) -> tuple[str, ...]:
    fields = fields or {}
    return tuple(fields.get(k, k) for k in dict(SIGNATURES)[fmt])
