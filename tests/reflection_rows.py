"""Canonical records of data/sample rows for the reflection tests and their recorder script."""

from __future__ import annotations

import json
from pathlib import Path

from curate.ingest.formats import CONVERTERS
from curate.ingest.validate import normalise_messages
from curate.records import sample_id

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def alpaca_records(rows: tuple[int, ...], file: str = "alpaca_gpt4_en.json") -> list[dict]:
    """Rows of an alpaca JSON file as the ingest stage makes them (messages, format, original)."""
    data = json.loads((SAMPLE / file).read_text(encoding="utf-8"))
    out = []
    for i in rows:
        messages, tools = CONVERTERS["alpaca"](data[i], {})
        messages = normalise_messages(messages)
        out.append({"sample_id": sample_id(messages, tools), "messages": messages, "tools": tools, "format": "alpaca",
                    "original": json.dumps(data[i], ensure_ascii=False), "row": i})
    return out
