"""Conversion from canonical records to the trainer layouts (docs/exports.md).

=====================  ======================================================================
``messages``           ``{"id", "messages": [{"role", "content"}], "tools"?}`` — roles system,
                       user, assistant, tool; message dicts are exactly ``{role, content}``
                       (uniform Arrow structs). An assistant tool call is written as an assistant
                       message whose content is the call's JSON; ``tools`` is a JSON string of a
                       list of tool schemas, or null for a row without tools.
``prompt_completion``  ``{"id", "prompt": [messages before the last reply], "completion": [reply]}``,
                       ``tools`` as in ``messages``
``alpaca``             ``{"id", "instruction", "input", "output", "system"?, "history"?}`` —
                       earlier turns go to ``history`` pairs; rows with tool turns cannot be
                       written (reported in the manifest, still in the other layouts)
``sharegpt``           ``{"id", "conversations": [{"from", "value"}], "system"?, "tools"?}`` —
                       human / gpt / function_call / observation; system as a field;
                       ``tools`` as in ``messages``
=====================  ======================================================================

Empty optional strings are ``""``, never null (mixed types break Arrow inference) — except
``tools`` in every layout that has it: TRL's SFTTrainer and axolotl's ``chat_template`` ``json.loads``
every string ``tools`` (``""`` raises) and pass null on as "no tools", which LLaMA-Factory reads the
same way.
"""

from __future__ import annotations

import json
from typing import Any

from curate.records import chat_messages, normalise_text, tools_list_json

LAYOUTS = ("messages", "prompt_completion", "alpaca", "sharegpt")


class Unrepresentable(ValueError):
    """The row cannot be written in this layout (e.g. tool turns in alpaca)."""


def to_messages(rec: dict) -> dict[str, Any]:
    return {"messages": chat_messages(rec["messages"])}


def to_prompt_completion(rec: dict) -> dict[str, Any]:
    msgs = chat_messages(rec["messages"])
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def _alpaca_split(rec: dict, user_text: str) -> tuple[str, str]:
    """Keep an alpaca source row's own instruction/input split when it matches the user text."""
    if rec.get("format") == "alpaca" and rec.get("original"):
        orig = json.loads(rec["original"])
        ins, inp = orig.get("instruction"), orig.get("input") or ""
        if isinstance(ins, str) and isinstance(inp, str):
            ins, inp = normalise_text(ins), normalise_text(inp)
            joined = ins if not inp else f"{ins}\n{inp}"
            if ins and normalise_text(joined) == user_text:  # a blank instruction: the input alone is the instruction
                return ins, inp
    return user_text, ""


def to_alpaca(rec: dict) -> dict[str, Any]:
    msgs = rec["messages"]
    if any(m["role"] == "tool" or m.get("tool_calls") for m in msgs):
        raise Unrepresentable("tool turns have no alpaca form")
    system = ""
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    pairs = [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs), 2)]
    instruction, inp = _alpaca_split(rec, pairs[-1][0])
    return {"instruction": instruction, "input": inp, "output": pairs[-1][1], "system": system, "history": [list(p) for p in pairs[:-1]]}


SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "tool": "observation"}


def to_sharegpt(rec: dict) -> dict[str, Any]:
    msgs = rec["messages"]
    system = ""
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    conv = []
    for m in msgs:
        if m.get("tool_calls"):
            conv.append({"from": "function_call", "value": m["tool_calls"]})
        else:
            conv.append({"from": SHAREGPT_FROM[m["role"]], "value": m["content"]})
    return {"conversations": conv, "system": system, "tools": tools_list_json(rec.get("tools"))}


CONVERT = {"messages": to_messages, "prompt_completion": to_prompt_completion, "alpaca": to_alpaca, "sharegpt": to_sharegpt}


def convert_rows(records: list[dict], layout: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows with ``id`` first, [(sample_id, why) for rows the layout cannot hold])."""
    out, skipped = [], []
    convert = CONVERT[layout]
    any_tools = any(r.get("tools") for r in records)
    for rec in records:
        try:
            body = convert(rec)
        except Unrepresentable as exc:
            skipped.append((rec["sample_id"], str(exc)))
            continue
        row = {"id": rec["sample_id"], **body}
        if layout in ("messages", "prompt_completion") and any_tools:
            row["tools"] = tools_list_json(rec.get("tools"))
        out.append(row)
    # optional columns: present in every row or in none (uniform structure)
    if layout == "alpaca":
        for col, empty in (("system", ""), ("history", [])):
            if all(r[col] == empty for r in out):
                for r in out:
                    del r[col]
    if layout == "sharegpt":
        for col, empty in (("system", ""), ("tools", None)):
            if all(r[col] == empty for r in out):
                for r in out:
                    del r[col]
    return out, skipped


def check_rules(row: dict, layout: str) -> str | None:
    """The trainers' structural rules for one exported row; returns the broken rule or None."""
    if layout == "messages":
        roles = [m["role"] for m in row["messages"]]
    elif layout == "prompt_completion":
        roles = [m["role"] for m in row["prompt"]] + [m["role"] for m in row["completion"]]
        if len(row["completion"]) != 1 or row["completion"][0]["role"] != "assistant":
            return "completion must be exactly one assistant message"
    elif layout == "sharegpt":
        back = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
        roles = [back.get(c["from"], "?") for c in row["conversations"]]
        if len(roles) % 2:
            return "sharegpt conversations need an even message count"
    else:
        return None if row["instruction"] and row["output"] else "empty instruction or output"
    if roles and roles[0] == "system":
        roles = roles[1:]
    for i, role in enumerate(roles):
        want = ("user", "tool") if i % 2 == 0 else ("assistant",)
        if role not in want:
            return f"role '{role}' at position {i} breaks user/assistant alternation"
    if not roles or roles[-1] != "assistant":
        return "the last message must be the assistant's"
    return None
