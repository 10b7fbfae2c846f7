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


class LabelChecks:
    """The per-row label checks both loader checks make, counted, with the first failure described:
    the prompt is masked and something is trained, the last trained span is the exported final answer
    (a prefix of it when the row was cut at ``cutoff`` tokens), one trained span per assistant-side
    turn, and the first user text lies in the masked part."""

    def __init__(self, tok, cutoff: int):
        self.tok, self.cutoff = tok, cutoff
        self.masked = self.answer_ok = self.turns_ok = self.user_masked = self.truncated = 0
        self.first_bad: str | None = None

    def _bad(self, text: str) -> None:
        self.first_bad = self.first_bad or text

    def row(self, i: int, row: dict, ids: list[int], labels: list[int]) -> None:
        tok = self.tok
        answer, first_user = final_answer_and_first_user(row)
        if labels and labels[0] == IGNORE and any(t != IGNORE for t in labels):
            self.masked += 1
        j = len(labels)  # the last contiguous trained span = the final answer (+ the template's end-of-turn)
        while j > 0 and labels[j - 1] == IGNORE:
            j -= 1
        k = j
        while k > 0 and labels[k - 1] != IGNORE:
            k -= 1
        span = tok.decode(labels[k:j], skip_special_tokens=False).replace(tok.eos_token, "").strip()
        cut = len(ids) >= self.cutoff
        self.truncated += cut
        if span == answer.strip() or (cut and answer.strip().startswith(span)):
            self.answer_ok += 1
        else:
            self._bad(f"row {i} ({str(row.get('id', '?'))[:12]}): trained span {span[:120]!r} vs answer {answer[:120]!r}")
        if spans(labels) == trained_turns(row) or cut:
            self.turns_ok += 1
        else:
            self._bad(f"row {i}: {spans(labels)} trained spans for {trained_turns(row)} assistant-side turns")
        if first_user.strip()[:200] in tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE], skip_special_tokens=False):
            self.user_masked += 1
        else:
            self._bad(f"row {i}: first user text not in the masked part")

    def problems(self, n: int) -> list[str]:
        out = []
        if self.turns_ok != n:
            out.append(f"{n - self.turns_ok} rows where trained spans != assistant-side turns; {self.first_bad}")
        if self.masked != n:
            out.append(f"{n - self.masked} rows with an unmasked prompt or nothing trained")
        if self.answer_ok != n:
            out.append(f"{n - self.answer_ok} rows whose last trained span is not the exported answer; {self.first_bad}")
        if self.user_masked != n:
            out.append(f"{n - self.user_masked} rows whose first user turn is not masked; {self.first_bad}")
        return out


def finish(results: list[dict], json_path: Path | None) -> int:
    """Write the results (when asked) and return the exit status: 0 only if every check ran and passed."""
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
    return 0 if results and all(r["ok"] for r in results) else 1
