"""The report's rows section: what rows of each outcome and reason look like.

For each (kind, outcome, reason) — input rows first, then derived rows — the first ``n`` rows by row
number (deterministic: the same run gives the same section) with a preview of their text and their
scores; a derived row has its parents' rows and text in the same table row, beside it. Above them,
rows per source and outcome (selected rows per source). Rows are read through
:func:`curate.view.rows.run_rows`; user text is escaped for the markdown and the HTML built from it
(``<script>`` stays text, ``[x](javascript:…)`` stays text, ``*`` and ``_`` do not format).
"""

from __future__ import annotations

import html
import re
from typing import Any

import polars as pl

from curate.ledger import OUTCOMES
from curate.view.rows import RunFiles, format_value, run_rows, score_columns, with_text

PREVIEW_CHARS = 160
MAX_GROUPS = 30
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")
_SPACE = re.compile(r"\s+")


def _code(text: str) -> str:
    """``text`` as a markdown code span, as written (markdown escapes its ``&``, ``<`` and ``>`` itself; a
    backtick inside widens the fence)."""
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def md_text(text: Any) -> str:
    """User text as one markdown table cell that renders as the text itself: markdown's inline syntax
    (links, emphasis, code, pipes) backslash-escaped, ``<`` ``>`` ``&`` as entities, whitespace runs
    (newlines too) as one space."""
    s = _SPACE.sub(" ", "" if text is None else str(text)).strip()
    return html.escape(_MD_SPECIAL.sub(r"\\\1", s), quote=False)


def preview(text: Any, chars: int = PREVIEW_CHARS) -> str:
    s = _SPACE.sub(" ", "" if text is None else str(text)).strip()
    return s if len(s) <= chars else s[:chars].rstrip() + " …"


_num = format_value


def _score_names(scores: list[str]) -> dict[str, str]:
    """Each score's label in a cell: the part after the scorer when no other scorer has that part."""
    short = [s.split(".", 1)[1] for s in scores]
    return {s: (k if short.count(k) == 1 else s) for s, k in zip(scores, short)}


def _row_text(r: dict) -> str:
    if r.get("messages") is None:
        return f"raw: {md_text(preview(r.get('raw')))}" if r.get("raw") else "–"
    return f"**prompt:** {md_text(preview(r.get('prompt')))}<br>**response:** {md_text(preview(r.get('response')))}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table whose cells are already escaped."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def per_source(frame: pl.LazyFrame) -> list[str]:
    """Rows per source and outcome, sources in order of appearance (derived sources after)."""
    counts = (frame.group_by("source", "outcome").agg(pl.len().alias("n"), pl.col("row").min().alias("first")).collect())
    order = counts.group_by("source").agg(pl.col("first").min()).sort("first").get_column("source").to_list()
    got = {(s, o): n for s, o, n, _ in counts.iter_rows()}
    rows = []
    for s in order:
        total = sum(got.get((s, o), 0) for o in OUTCOMES)
        sel = got.get((s, "selected"), 0)
        rows.append([md_text(s), str(total), f"{sel} ({sel / total:.0%})" if total else "0",
                     *(str(got.get((s, o), 0)) for o in OUTCOMES[1:])])
    return _table(["source", "rows", "selected", *OUTCOMES[1:]], rows)


def rows_markdown(files: RunFiles, n: int = 3, out_label: str = "OUT_DIR") -> list[str]:
    """The rows section (markdown lines); empty when ``n`` is 0."""
    if n <= 0:
        return []
    scores = score_columns(files)
    labels = _score_names(scores)
    frame = run_rows(files, text=False)
    ledgers = run_rows(files, text=False, scores=False)  # counting and sampling need no score: joined for the sample only
    groups = (ledgers.group_by("kind", "outcome", "reason").agg(pl.len().alias("n")).collect()
              .with_columns(pl.col("kind").replace_strict({"input": 0, "derived": 1}, default=2).alias("_k"),
                            pl.col("outcome").replace_strict({o: i for i, o in enumerate(OUTCOMES)}, default=len(OUTCOMES)).alias("_o"))
              .sort(["_k", "_o", "n", "reason"], descending=[False, False, True, False], nulls_last=False).head(MAX_GROUPS))
    taken = ledgers.sort("row").filter(pl.int_range(pl.len()).over("kind", "outcome", "reason") < n).select("row").collect()
    sample = with_text(frame.filter(pl.col("row").is_in(taken.get_column("row").to_list())).sort("row").collect(), files)
    wanted = sorted({p for ps in sample.get_column("parent_rows").to_list() if ps for p in ps})
    parents = ({r["row"]: r for r in with_text(frame.filter(pl.col("row").is_in(wanted)).collect(), files).iter_rows(named=True)}
               if wanted else {})
    by_group: dict[tuple, list[dict]] = {}
    for r in sample.iter_rows(named=True):
        by_group.setdefault((r["kind"], r["outcome"], r["reason"]), []).append(r)

    md = ["## Rows", "",
          f"The first {n} rows (by row number) of each outcome and reason, with a preview of their text and their scores. "
          f"{_code(f'curate show {out_label} --outcome OUTCOME --reason REASON --full')} prints any of them whole.", "",
          "### Rows per source", "", *per_source(ledgers), ""]
    for kind, outcome, reason, count, *_ in groups.iter_rows():
        rows = by_group.get((kind, outcome, reason), [])
        what = f"{outcome} · {reason}" if reason else outcome
        md += [f"### {'derived rows: ' if kind == 'derived' else ''}{md_text(what)} ({count} row{'s' if count != 1 else ''})", ""]
        header = ["row", "source", "text", "scores", "detail"]
        if kind == "derived":
            header = ["row", "origin", "derived row", "scores", "detail", "parent rows", "parent text"]
        cells = []
        for r in rows:
            sc = " · ".join(f"{labels[s]} {_num(r.get(s))}" for s in scores if r.get(s) is not None) or "–"
            where = md_text(r["source"]) + (f" line {r['source_line']}" if r.get("source_line") is not None else "")
            base = [str(r["row"]), where, _row_text(r), md_text(sc), md_text(preview(r.get("detail") or "", 200)) or "–"]
            if kind == "derived":
                ps = [parents[p] for p in r.get("parent_rows") or [] if p in parents]
                base[1] = md_text(r.get("origin") or "")
                why = lambda p: f"{p['outcome']}, {md_text(p['reason'])}" if p.get("reason") else p["outcome"]  # noqa: E731
                base += ["<br>".join(f"{p['row']} ({why(p)})" for p in ps) or "–",
                         "<br>".join(f"**row {p['row']}:** {_row_text(p)}" for p in ps) or "–"]
            cells.append(base)
        md += _table(header, cells) + [""]
    shown = groups.height
    total = ledgers.select("kind", "outcome", "reason").unique().select(pl.len()).collect().item()
    if total > shown:
        md += [f"({total - shown} more groups of rows not shown: `curate show` lists them.)", ""]
    return md
