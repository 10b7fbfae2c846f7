"""The canonical record every stage works on.

A *record* is one instruction/response sample in chat form::

    {"sample_id": "9f2c…",                 # sha256 of the normalised messages (+ tools)
     "row": 17,                            # global input row index (ingest order over all inputs)
     "source": "alpaca_gpt4", "source_index": 16, "source_file": "data/…", "source_line": 18,
     "task": None, "format": "alpaca",
     "messages": [{"role": "user", "content": "…", "tool_calls": None},
                  {"role": "assistant", "content": "…", "tool_calls": None}],
     "tools": None,                        # JSON string of tool schemas, or None
     "original": "{…}",                    # the original record as JSON: nothing is lost on export
     "origin": "input",                    # "input", or the rewrite that made the row ("mosaic:permute")
     "parents": None,                      # derived rows: the sample_ids they were made from
     "generation": None}                   # derived rows: JSON of what made them (method, version,
                                           # seed, and what that method records: see curate.rewrite.base)

Roles are ``system``, ``user``, ``assistant`` and ``tool``. An assistant message that calls tools
keeps the calls as a JSON string in ``tool_calls``.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

import pyarrow as pa

ROLES = ("system", "user", "assistant", "tool")

MESSAGE_TYPE = pa.struct(
    [("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.string())]
)

RECORD_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("row", pa.int64()),
        ("source", pa.string()),
        ("source_index", pa.int64()),
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("task", pa.string()),
        ("format", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("tools", pa.string()),
        ("original", pa.string()),
        ("origin", pa.string()),
        ("parents", pa.list_(pa.string())),
        ("generation", pa.string()),
    ]
)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys, UTF-8 text and no insignificant whitespace (the hashing form)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def drop_defaults(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the keys of ``defaults`` whose value is still that default: settings added after
    keys were first recorded enter a hash only once set, so a key recorded before they existed stays valid
    (flow fingerprints, training keys, compare's cell keys)."""
    return {k: v for k, v in data.items() if not (k in defaults and v == defaults[k])}


def sha256_hex(*parts: str | bytes) -> str:
    """sha256 over the parts, each length-prefixed so that ("ab", "c") != ("a", "bc")."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def normalise_text(text: str) -> str:
    """Unicode NFC, ``\\r\\n`` → ``\\n``, outer whitespace stripped."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def message(role: str, content: str, tool_calls: str | None = None) -> dict[str, Any]:
    return {"role": role, "content": content, "tool_calls": tool_calls}


def sample_id(messages: list[dict[str, Any]], tools: str | None = None) -> str:
    """Stable content id: sha256 of the canonical JSON of roles, contents, tool calls and tools.

    Position-independent: the same conversation gets the same id in any file, at any row.
    """
    msgs = []
    for m in messages:
        item = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            item["tool_calls"] = m["tool_calls"]
        msgs.append(item)
    payload: dict[str, Any] = {"messages": msgs}
    if tools:
        payload["tools"] = tools
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def turns(messages: list[dict[str, Any]]) -> list[tuple[list[dict], dict]]:
    """Split a conversation into turns: (context messages before the assistant reply, the reply).

    Each assistant message closes a turn; its context is everything before it.
    """
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            out.append((messages[:i], m))
    return out


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation as chat templates take it: ``{"role", "content"}`` per message, a message's
    ``tool_calls`` (JSON text) on a line after its content — what the ``messages`` and
    ``prompt_completion`` exports write, and so the text a training run's chat template renders."""
    return [{"role": m["role"], "content": _flat_content(m)} for m in messages]


def _flat_content(m: dict[str, Any]) -> str:
    if m.get("tool_calls"):
        return f"{m['content']}\n{m['tool_calls']}" if m["content"] else m["tool_calls"]
    return m["content"]


def tools_list_json(tools: str | None) -> str | None:
    """A record's tool schemas as the JSON string of a list (a single schema object is wrapped), or
    None when it has none — what TRL's ``json.loads`` + ``apply_chat_template(tools=…)`` expects."""
    if not tools:
        return None
    value = json.loads(tools)
    return tools if isinstance(value, list) else json.dumps([value], ensure_ascii=False, sort_keys=True)


def tool_schemas(tools: str | None) -> list | None:
    """A record's tool schemas as the list a chat template's ``tools=`` takes, parsed from
    :func:`tools_list_json` (the text every export writes), so a count made from the record renders
    what training on the export renders; None when it has none."""
    text = tools_list_json(tools)
    return json.loads(text) if text else None


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """All non-assistant text (system, user, tool), joined by blank lines."""
    return "\n\n".join(m["content"] for m in messages if m["role"] != "assistant" and m["content"])


def response_text(messages: list[dict[str, Any]]) -> str:
    """All assistant text, joined by blank lines."""
    return "\n\n".join(m["content"] for m in messages if m["role"] == "assistant" and m["content"])


ROLE_LABEL = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def conversation_text(messages: list[dict[str, Any]]) -> str:
    """Role-prefixed concatenation (``User: …\\nAssistant: …``), the text embedders see."""
    parts = []
    for m in messages:
        content = m["content"] or (m.get("tool_calls") or "")
        parts.append(f"{ROLE_LABEL[m['role']]}: {content}")
    return "\n".join(parts)
