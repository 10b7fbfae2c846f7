"""What both loader checks share: reading the exported rows and counting what a trainer should train."""

from __future__ import annotations

import json
import re
from pathlib import Path

IGNORE = -100


def rows_of(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def trained_turns(row: dict) -> int:
    """How many turns of the exported row a trainer should put loss on (assistant side)."""
    if "messages" in row:
        return sum(m["role"] == "assistant" for m in row["messages"])
    if "conversations" in row:
        return sum(c["from"] in ("gpt", "function_call") for c in row["conversations"])
    return 1 + len(row.get("history") or [])


def spans(labels: list[int]) -> int:
    """Number of contiguous runs of trained (not ignored) labels."""
    return sum(1 for i, t in enumerate(labels) if t != IGNORE and (i == 0 or labels[i - 1] == IGNORE))


ROLE_HEADER = re.compile(r"<\|im_start\|>(\w+)")
CHAT_ROLES = {"system", "user", "assistant", "tool"}


def final_answer_and_first_user(row: dict) -> tuple[str, str]:
    """(text the last turn trains on, text of the first user turn) for any exported layout."""
    if "messages" in row:
        msgs = [m for m in row["messages"] if m["role"] != "system"]
        return msgs[-1]["content"], msgs[0]["content"]
    if "conversations" in row:
        return row["conversations"][-1]["value"], row["conversations"][0]["value"]
    first = row["history"][0][0] if row.get("history") else "\n".join(p for p in (row["instruction"], row["input"]) if p)
    return row["output"], first
