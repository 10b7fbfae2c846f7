"""``curate show``: a run's rows in the terminal — text, scores, outcome and reason, wrapped at the
terminal's width; a derived row with its parents beside it (under it below 120 columns).

User text (prompts, responses, reasons, file names) is put in ``rich.text.Text`` objects, never
parsed as markup: ``[bold]`` and ``<script>`` print as written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import polars as pl
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from curate.errors import CurateError
from curate.ledger import OUTCOMES
from curate.view.rows import RunFiles, did_you_mean, format_value, kept_columns, listing, run_rows, score_columns, with_text

#: a preview: at most this many characters and lines of each message, at most this many messages
PREVIEW_CHARS, PREVIEW_LINES, PREVIEW_MESSAGES = 300, 6, 4
PARENT_CHARS = 160
#: at least this many columns: parents beside their derived row; fewer: under it
SIDE_BY_SIDE = 120
STYLE = {"selected": "bold green", "not_selected": "yellow", "filtered": "dark_orange", "quarantined": "bold red"}
#: sort keys besides the scores
ROW_KEYS = ("row", "rank")


class ShowError(CurateError):
    """A filter or sort key that names nothing in the run."""


def sort_key(name: str, scores: list[str]) -> str:
    """The column ``--sort NAME`` means: a score's full name (``heuristic.response_tokens``), the part
    after its scorer when no other scorer has it (``response_tokens``), ``row`` or ``rank``."""
    if name in scores or name in ROW_KEYS:
        return name
    short = [s for s in scores if s.split(".", 1)[1] == name]
    if len(short) == 1:
        return short[0]
    if len(short) > 1:
        raise ShowError(f"--sort {name}: more than one scorer has it; give one of {', '.join(short)}")
    if not scores:
        raise ShowError(f"--sort {name}: this run has no scores; sort by row or rank")
    raise ShowError(f"--sort {name}: no such score; {did_you_mean(name, scores + [s.split('.', 1)[1] for s in scores])}"
                    f"scores in this run: {listing(scores)} (or row, rank)")


@dataclass
class Page:
    """What ``curate show`` prints: the rows taken (with text), their parents, and the counts."""

    rows: pl.DataFrame
    parents: pl.DataFrame
    n_match: int
    n_rows: int
    scores: list[str]
    sort: str | None
    kept: list[str] = ()  # the inputs' own columns the ledger carries (keep_columns)


def take_rows(files: RunFiles, outcome: str | None = None, reason: str | None = None, source: str | None = None,
              sort: str | None = None, descending: bool = False, limit: int = 10) -> Page:
    """The rows matching the filters, sorted (by row when ``sort`` is None; ties by row, missing
    values last), the first ``limit`` of them with their text and their parents' rows. Raises
    :class:`ShowError` for an unknown outcome, reason, source or sort key, naming what there is."""
    scores = score_columns(files)
    lazy = run_rows(files, text=False)
    if outcome is not None and outcome not in OUTCOMES:
        raise ShowError(f"--outcome {outcome}: no such outcome; {did_you_mean(outcome, list(OUTCOMES))}outcomes: {', '.join(OUTCOMES)}")
    key = sort_key(sort, scores) if sort is not None else None
    ledgers = run_rows(files, text=False, scores=False)  # filters and counts need no score
    facts = ledgers.select("outcome", "reason", "source").unique().collect()
    for flag, col, value in (("--reason", "reason", reason), ("--source", "source", source)):
        if value is not None:
            known = sorted(v for v in facts.get_column(col).unique().to_list() if v is not None)
            if value not in known:
                raise ShowError(f"{flag} {value}: no row of this run has it; {did_you_mean(value, known)}"
                                f"{'reasons' if col == 'reason' else 'sources'} in this run: {listing(known)}")
    cond = pl.lit(True)  # the filters (on ledger columns): Polars pushes them below the score join
    if outcome is not None:
        cond &= pl.col("outcome") == outcome
    if reason is not None:
        cond &= pl.col("reason") == reason
    if source is not None:
        cond &= pl.col("source") == source
    matching = lazy.filter(cond)
    counts = ledgers.filter(cond).select(pl.len()).collect().item(), ledgers.select(pl.len()).collect().item()
    if key is not None and key != "row":
        matching = matching.sort([key, "row"], descending=[descending, False], nulls_last=True)
    elif descending:
        matching = matching.sort("row", descending=True)
    page = with_text(matching.head(max(limit, 0)).collect(), files)
    wanted = sorted({r for rs in page.get_column("parent_rows").to_list() if rs for r in rs})
    parents = with_text(lazy.filter(pl.col("row").is_in(wanted)).collect(), files) if wanted else page.clear()
    return Page(page, parents, counts[0], counts[1], scores, key, kept_columns(files))


# -- rendering --------------------------------------------------------------------------------------


_num = format_value


def cut(text: str, chars: int | None, lines: int | None = None) -> str:
    """``text`` cut to ``chars`` characters and ``lines`` lines, with "…" where it was cut (None: whole)."""
    out = text
    if lines is not None:
        parts = out.split("\n")
        if len(parts) > lines:
            out = "\n".join(parts[:lines])
    if chars is not None and len(out) > chars:
        out = out[:chars].rstrip()
    return out if out == text else out.rstrip() + " …"


def _messages(row: dict, full: bool, chars: int = PREVIEW_CHARS, most: int = PREVIEW_MESSAGES) -> list[Text]:
    """The conversation, one Text per message (``role: content``), previews cut unless ``full``."""
    if row.get("messages") is None:
        raw = row.get("raw")
        return [Text.assemble(("raw: ", "bold"), cut(raw, None if full else chars * 2, None if full else PREVIEW_LINES * 2))] if raw else []
    msgs = row["messages"]
    shown = msgs if full or len(msgs) <= most else msgs[:most]
    out = []
    for m in shown:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            content = f"{content}\n[tool_calls] {m['tool_calls']}" if content else f"[tool_calls] {m['tool_calls']}"
        label = m["role"] + ": "
        out.append(Text.assemble((label, "bold cyan" if m["role"] == "assistant" else "bold"),
                                 cut(content, None if full else chars, None if full else PREVIEW_LINES)))
    if len(shown) < len(msgs):
        out.append(Text(f"… {len(msgs) - len(shown)} more messages (--full shows them)", style="dim"))
    return out


def _scores(row: dict, scores: list[str], sort: str | None) -> Text:
    """``scorer: output value · output value …`` per scorer, the sort key in bold; a status other than ok named."""
    t = Text()
    scorers: dict[str, list[str]] = {}
    for s in scores:
        scorer, name = s.split(".", 1)
        scorers.setdefault(scorer, []).append(name)
    for i, (scorer, names) in enumerate(scorers.items()):
        if i:
            t.append("\n")
        t.append(f"{scorer}: ", style="dim")
        status = row.get(f"{scorer}.status")
        for j, name in enumerate(names):
            if j:
                t.append(" · ", style="dim")
            t.append(f"{name} {_num(row.get(f'{scorer}.{name}'))}", style="bold" if f"{scorer}.{name}" == sort else "")
        if status not in (None, "ok"):
            t.append(f" (status {status})", style="red")
    return t


def _where(row: dict) -> Text:
    parts = [row["source"] or "?"]
    if row.get("source_file"):
        parts.append(str(row["source_file"]) + (f":{row['source_line']}" if row.get("source_line") is not None else ""))
    elif row.get("source_line") is not None:
        parts.append(f"line {row['source_line']}")
    if row.get("task"):
        parts.append(f"task {row['task']}")
    if row.get("sample_id"):
        parts.append(f"id {row['sample_id'][:12]}")
    return Text(" · ".join(parts), style="dim")


def _title(row: dict, prefix: str = "row") -> Text:
    t = Text.assemble(f"{prefix} {row['row']} · ", (row["outcome"], STYLE.get(row["outcome"], "")))
    if row.get("reason"):
        t.append(f" · {row['reason']}")
    if row.get("rank") is not None:
        t.append(f" · rank {row['rank']}")
    return t


def _parent_block(row: dict, full: bool) -> RenderableType:
    head = _title(row, "parent row")
    head.append(f" · {row['source']}", style="dim")
    return Group(head, Padding(Group(*_messages(row, full, PARENT_CHARS, 2)), (0, 0, 0, 2), expand=False))


def _row_block(row: dict, page: Page, full: bool) -> list[RenderableType]:
    lines: list[RenderableType] = [_where(row), Text.assemble(("stage ", "dim"), row["stage"] or "")]
    if row.get("detail"):
        lines.append(Text.assemble(("detail ", "dim"), row["detail"]))
    if row.get("origin"):
        ids = ", ".join(str(r) for r in row.get("parent_rows") or []) or ", ".join(p[:12] for p in row.get("parents") or [])
        lines.append(Text.assemble(("origin ", "dim"), row["origin"], ("  parents ", "dim"), f"row {ids}" if ids else "–"))
    own = [f"{c} {row[c]}" for c in page.kept if row.get(c) is not None]
    if own:
        lines.append(Text.assemble(("columns ", "dim"), " · ".join(own)))
    if page.scores and any(row.get(s) is not None for s in page.scores):
        lines.append(_scores(row, page.scores, page.sort))
    lines += _messages(row, full)
    return lines


def render(console: Console, page: Page, title: str, full: bool = False) -> None:
    """Print the page: a line of counts, then each row under a rule with its outcome."""
    console.print(Text(title), soft_wrap=False)
    if not page.rows.height:
        console.print(Text("no rows match", style="yellow"))
        return
    parents = {r["row"]: r for r in page.parents.iter_rows(named=True)}
    side = console.width >= SIDE_BY_SIDE
    for i, row in enumerate(page.rows.iter_rows(named=True)):
        if i:
            console.print()
        console.print(Rule(_title(row, "derived row" if row["kind"] == "derived" else "row"), align="left", style="dim"))
        block = Padding(Group(*_row_block(row, page, full)), (0, 0, 0, 2), expand=False)
        mine = [parents[r] for r in row.get("parent_rows") or [] if r in parents]
        if not mine:
            console.print(block)
            continue
        blocks = [_parent_block(p, full) for p in mine]
        if side:
            grid = Table.grid(padding=(0, 2), expand=True)
            grid.add_column(ratio=1)
            grid.add_column(ratio=1)
            grid.add_row(block, Group(*blocks))
            console.print(grid)
        else:
            console.print(block)
            console.print(Padding(Group(*blocks), (0, 0, 0, 4), expand=False))


def describe(page: Page, flow: str, outcome: str | None, reason: str | None, source: str | None, descending: bool) -> str:
    """The first line: how many rows match which filters, how many are shown, in what order."""
    filters = [f"{k} {v}" for k, v in (("outcome", outcome), ("reason", reason), ("source", source)) if v is not None]
    order = f"by {page.sort or 'row'}{' descending' if descending else ''}"
    what = f"{page.n_match} of {page.n_rows} rows" + (f" match ({', '.join(filters)})" if filters else "")
    return f"{flow}: {what}; showing {min(page.rows.height, page.n_match)} {order}"


def show(out_dir: os.PathLike | str, console: Console, outcome: str | None = None, reason: str | None = None, source: str | None = None,
         sort: str | None = None, descending: bool = False, limit: int = 10, full: bool = False) -> Page:
    """``curate show``: find the run, take the rows, print them."""
    from curate.view.rows import find_run, run_files

    files = run_files(find_run(out_dir))
    page = take_rows(files, outcome, reason, source, sort, descending, limit)
    with console.capture() as captured:  # then written without the spaces rich pads lines with
        render(console, page, describe(page, files.summary.get("flow") or str(files.out), outcome, reason, source, descending), full)
    console.file.write("\n".join(line.rstrip() for line in captured.get().split("\n")))
    console.file.flush()
    return page
