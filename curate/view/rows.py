"""A finished run's rows as one lazy table: ids, provenance, outcome and reason, text, scores, lineage.

:func:`run_rows` is the entry point (``curate show`` and the report's rows section read rows through
it); :func:`run_files` is the one place that knows where a run keeps what. Both read only the run's
own files (never the store) and write nothing. The paths come from ``run.json`` and the manifests it
points at; paths recorded under the run's ``output_dir`` are re-based on the folder given, so a run
folder that was moved or copied still reads::

    <out>/run.json                          recordsets (name → dir, stage), selection_table, derived.rounds
    <out>/ledger.parquet                    one row per input row: outcome, stage, reason, detail, rank
    <out>/derived_ledger.parquet            one row per derived row: the same + origin, parents
    <out>/lineage.parquet                   derived row → parents' sample_ids and rows
    <out>/recordsets/<set>/manifest.json    a record set's shards (the rows' messages)
    <out>/<round>/scores.parquet            one row per pool row of a selection round, a column per score
    <out>/ingest/dataset.json               the ingest manifest: where quarantined rows' raw text is

Everything is ``pl.scan_parquet`` and joins on ``sample_id`` / ``row``: filter, sort and slice the
frame before collecting and Polars reads only the columns (and, for the ledgers, the rows) needed.
The text columns are the heavy part; to page through a large run, take the page without them and
fetch its text afterwards::

    page = run_rows(out, text=False).filter(pl.col("outcome") == "filtered").sort("row").slice(0, 50).collect()
    page = with_text(page, out)    # reads the messages of those 50 rows only
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from curate.errors import CurateError

#: the ledger columns, in order (curate.ledger.LEDGER_SCHEMA)
LEDGER_COLUMNS = ("row", "sample_id", "source", "source_index", "source_line", "outcome", "stage", "reason", "detail", "rank")
#: lineage columns (null for input rows)
LINEAGE_COLUMNS = ("origin", "parents", "parent_rows")
#: the text columns :func:`run_rows` adds with ``text=True`` (and :func:`with_text` adds to a page)
TEXT_COLUMNS = ("source_file", "task", "messages", "prompt", "response", "raw")

MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String, "tool_calls": pl.String}))
_TYPES: dict[str, pl.DataType] = {
    "row": pl.Int64, "kind": pl.String, "sample_id": pl.String, "source": pl.String, "source_index": pl.Int64, "source_line": pl.Int64,
    "source_file": pl.String, "task": pl.String, "outcome": pl.String, "stage": pl.String, "reason": pl.String, "detail": pl.String,
    "rank": pl.Int64, "origin": pl.String, "parents": pl.List(pl.String), "parent_rows": pl.List(pl.Int64), "messages": MESSAGES,
    "prompt": pl.String, "response": pl.String, "raw": pl.String,
}


def did_you_mean(name: str, known: list[str]) -> str:
    """``did you mean 'x'? `` for the closest of ``known`` (difflib), or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def listing(known: list[str], most: int = 12) -> str:
    """The first ``most`` of ``known``, comma-separated, with how many more; ``none`` when empty."""
    shown = ", ".join(known[:most])
    return (shown + (f", … ({len(known) - most} more)" if len(known) > most else "")) or "none"


def format_value(v: Any) -> str:
    """A score or count as ``curate show`` and the report print it: ``–`` for none, whole floats as
    integers, else 4 significant digits."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


class NotARun(CurateError):
    """The folder (or flow file) given does not lead to a finished run's output folder."""


@dataclass(frozen=True)
class RunFiles:
    """Where one finished run keeps its files (absolute paths; see the module docstring)."""

    out: Path
    summary: dict[str, Any] = field(repr=False)
    n_input: int
    ledger: Path
    derived_ledger: Path | None           # None: the flow has no rewrite: section
    lineage: Path | None
    input_shards: list[Path]              # the ``input`` record set (every valid, deduplicated input row)
    derived_shards: list[Path]            # the record sets rewrite steps wrote (derived rows)
    score_tables: list[Path]              # one per selection round, the first round first
    quarantine: list[tuple[Path, int]]    # quarantined input rows' parts and the global row of each part's local row 0


def find_run(path: str | os.PathLike) -> Path:
    """The output folder of a finished run from ``path``: a run's output folder (a versioned one: its
    ``latest`` run) or a flow YAML (followed to its ``output_dir``). Raises :class:`NotARun` with what
    to give instead."""
    from curate.history import run_dir

    p = Path(path)
    flow_note = ""
    if p.is_file():
        if p.suffix.lower() not in (".yaml", ".yml"):
            raise NotARun(f"{p}: a file, not a run's output folder (one with run.json) or a flow file (.yaml)")
        from curate.config import load_flow

        spec = load_flow(p, check_output=False)
        flow_note = f" (the output_dir of {p})"
        p = spec.out
    out = run_dir(p)
    if not (out / "run.json").is_file():
        if flow_note:
            raise NotARun(f"{out}{flow_note} holds no finished run yet: run `curate run {path}` first")
        if not out.exists():
            raise NotARun(f"{out}: no such folder; give a run's output_dir (or its flow file)")
        raise NotARun(f"{out}: not the output folder of a finished run (no run.json in it); give a run's output_dir (or its flow file)")
    return out


def run_files(out_dir: str | os.PathLike, summary: dict[str, Any] | None = None) -> RunFiles:
    """Where the run in ``out_dir`` keeps its files, read from ``summary`` (the run's ``run.json``; the
    report stage passes the summary it is about to write) and the manifests it names."""
    out = Path(out_dir)
    if summary is None:
        try:
            summary = json.loads((out / "run.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotARun(f"{out}: not the output folder of a finished run (no run.json in it)") from None
        except (OSError, ValueError) as exc:
            raise NotARun(f"{out / 'run.json'}: cannot be read ({exc})") from None
    recorded = Path(summary.get("output_dir") or out)

    def local(p: str | os.PathLike) -> Path:
        p = Path(p)
        try:
            return out / p.relative_to(recorded)
        except ValueError:
            return p

    ledger = out / "ledger.parquet"
    if not ledger.is_file():
        raise NotARun(f"{out}: the run has no ledger.parquet (it stopped before its ledger stage)")
    shards: dict[str, list[Path]] = {}
    for name, rs in (summary.get("recordsets") or {}).items():
        folder = local(rs["dir"])
        manifest = folder / "manifest.json"
        if manifest.is_file():
            shards[name] = [local(s["path"]) for s in json.loads(manifest.read_text(encoding="utf-8"))["shards"]]
        else:
            shards[name] = sorted(folder.glob("shard-*.parquet"))
    derived = summary.get("derived")
    rounds = [r["round"] for r in derived["rounds"]] if derived else ["select"]
    tables = [out / r / "scores.parquet" for r in rounds]
    if summary.get("selection_table"):
        tables[-1] = local(summary["selection_table"])
    quarantine: list[tuple[Path, int]] = []
    dataset = out / "ingest" / "dataset.json"
    if dataset.is_file():
        offset = 0
        for src in json.loads(dataset.read_text(encoding="utf-8"))["sources"]:
            if src.get("n_quarantined"):
                parts = sorted(local(src["quarantine_path"]).glob("part-*.parquet"))
                quarantine += [(p, offset + c["row_offset"]) for p, c in zip(parts, src["chunks"]) if c["n_quarantined"]]
            offset += src["n_rows"]
    has = lambda p: p if p.is_file() else None  # noqa: E731
    return RunFiles(out=out, summary=summary, n_input=int(summary.get("n_input") or 0), ledger=ledger,
                    derived_ledger=has(out / "derived_ledger.parquet") if derived else None,
                    lineage=has(out / "lineage.parquet") if derived else None,
                    input_shards=[p for p in shards.get("input", []) if p.is_file()],
                    derived_shards=[p for name in (derived or {}).get("rewrites", {}) for p in shards.get(name, []) if p.is_file()],
                    score_tables=[t for t in tables if t.is_file()], quarantine=quarantine)


def _files(run: str | os.PathLike | RunFiles) -> RunFiles:
    return run if isinstance(run, RunFiles) else run_files(run)


def _is_score(name: str) -> bool:
    return "." in name and not name.endswith(".status")


def score_columns(run: str | os.PathLike | RunFiles, statuses: bool = False) -> list[str]:
    """The run's score columns, ``<scorer>.<output>`` (e.g. ``heuristic.response_tokens``), in the order
    the selection tables hold them; with ``statuses`` also each scorer's ``<scorer>.status``."""
    names: list[str] = []
    for t in _files(run).score_tables:
        names += [c for c in pl.scan_parquet(t).collect_schema().names() if "." in c and (statuses or _is_score(c)) and c not in names]
    return names


def kept_columns(run: str | os.PathLike | RunFiles, scores: list[str] | None = None) -> list[str]:
    """The inputs' own columns the ledger carries after its own (``inputs[].keep_columns``: ``source_id``,
    ``lang``, …), less any whose name :func:`run_rows` uses for a column of its own."""
    files = _files(run)
    scores = scores if scores is not None else score_columns(files, statuses=True)
    own = {*LEDGER_COLUMNS, "kind", *LINEAGE_COLUMNS, *TEXT_COLUMNS, *scores}
    return [c for c in pl.scan_parquet(str(files.ledger)).collect_schema().names() if c not in own]


def _empty(columns: dict[str, pl.DataType]) -> pl.LazyFrame:
    return pl.LazyFrame(schema=columns)


def _scan(paths: list[Path]) -> pl.LazyFrame | None:
    return pl.scan_parquet([str(p) for p in paths]) if paths else None


DUP = "exact_duplicate"  # the ledger's reason for a row whose content an earlier row has (no pool or set holds it)
_SUFFIX = "\x00first"


def _scores(files: RunFiles, names: list[str]) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """The score columns by row (the first round's pool is every valid input row; later rounds add
    the derived rows, rows from n_input on), and the first round's by sample_id, for exact duplicates
    (the same content has the same scores)."""
    by_row, by_id = [], None
    for i, t in enumerate(files.score_tables):
        have = pl.scan_parquet(t).collect_schema().names()
        cols = [pl.col(n) if n in have else pl.lit(None, dtype=pl.String if n.endswith(".status") else pl.Float64).alias(n) for n in names]
        scan = pl.scan_parquet(t)
        if i == 0:
            by_row.append(scan.select("row", *cols))
            by_id = scan.select("sample_id", *cols)
        else:
            by_row.append(scan.filter(pl.col("row") >= files.n_input).select("row", *cols))
    types = {n: (pl.String if n.endswith(".status") else pl.Float64) for n in names}
    rows = (pl.concat(by_row, how="diagonal_relaxed") if len(by_row) > 1 else by_row[0] if by_row else _empty({"row": pl.Int64, **types}))
    if len(by_row) > 2:  # several later rounds may hold the same derived row
        rows = rows.unique(subset="row", keep="first", maintain_order=True)
    return rows, by_id if by_id is not None else _empty({"sample_id": pl.String, **types})


def _first_copies(rows: pl.LazyFrame, by_id: pl.LazyFrame, columns: list[str]) -> pl.LazyFrame:
    """(row, <column><_SUFFIX> …) for the exact duplicates among ``rows``: the columns of the first row
    in ``by_id`` with the same sample_id. Reads ``by_id`` for those ids only."""
    dups = rows.filter(pl.col("reason") == DUP).select("row", "sample_id")
    firsts = (by_id.select("sample_id", *columns).join(dups.select("sample_id").unique(), on="sample_id", how="semi")
              .unique(subset="sample_id", keep="any"))
    return dups.join(firsts, on="sample_id", how="inner").select("row", *(pl.col(c).alias(c + _SUFFIX) for c in columns))


def _fill_from(frame: pl.LazyFrame, firsts: pl.LazyFrame, columns: list[str]) -> pl.LazyFrame:
    return (frame.join(firsts, on="row", how="left", maintain_order="left")
            .with_columns(pl.coalesce(c, c + _SUFFIX).alias(c) for c in columns).drop([c + _SUFFIX for c in columns]))


def _joined_text(assistant: bool) -> pl.Expr:
    """All assistant (or all other) message contents of ``messages``, joined by blank lines
    (curate.records.response_text / prompt_text)."""
    role = pl.element().struct.field("role")
    pick = role == "assistant" if assistant else role != "assistant"
    contents = pl.col("messages").list.eval(pl.element().filter(pick).struct.field("content"))
    return contents.list.eval(pl.element().filter(pl.element().is_not_null() & (pl.element() != ""))).list.join("\n\n")


def _add_text(files: RunFiles, base: pl.LazyFrame, only: pl.DataFrame | None = None) -> pl.LazyFrame:
    """``base`` (row, kind, sample_id, reason, …) with the text columns: a row's own record by its row
    (the input set for input rows, the rewrite steps' sets for derived rows), an exact duplicate's
    messages from its first copy (no set holds it; its file and task stay null), a quarantined row's
    raw text and file by its row. ``only``: the rows to fetch text for (a page); None for every row."""
    cols = ["source_file", "task", "messages"]
    wanted = only.get_column("row").to_list() if only is not None else None
    sets = [pl.scan_parquet([str(p) for p in paths]).select("row", *cols) for paths in (files.input_shards, files.derived_shards) if paths]
    if wanted is not None:
        sets = [t.filter(pl.col("row").is_in(wanted)) for t in sets]
    text = pl.concat(sets, how="vertical_relaxed") if sets else _empty({"row": pl.Int64, "source_file": pl.String, "task": pl.String,
                                                                         "messages": MESSAGES})
    raws = [pl.scan_parquet(str(p)).select((pl.col("local_row") + base_row).alias("row"), pl.col("raw"),
                                           pl.col("source_file").alias("_file")) for p, base_row in files.quarantine]
    raw = pl.concat(raws) if raws else _empty({"row": pl.Int64, "raw": pl.String, "_file": pl.String})
    if wanted is not None:
        raw = raw.filter(pl.col("row").is_in(wanted))
    out = base.join(text, on="row", how="left", maintain_order="left").join(raw, on="row", how="left", maintain_order="left")
    if files.input_shards:
        by_id = pl.scan_parquet([str(p) for p in files.input_shards]).select("sample_id", "messages")
        out = _fill_from(out, _first_copies(base.filter(pl.col("kind") == "input"), by_id, ["messages"]), ["messages"])
    return (out.with_columns(pl.coalesce("source_file", "_file").alias("source_file"),
                             prompt=_joined_text(False), response=_joined_text(True)).drop("_file"))


def run_rows(run: str | os.PathLike | RunFiles, *, text: bool = True, scores: bool = True) -> pl.LazyFrame:
    """Every row of a finished run, one frame row per input row (``ledger.parquet``) and per derived
    row (``derived_ledger.parquet``), in row order. ``run``: the run's output folder (or its
    :func:`run_files`). Columns, in this order:

    ============  ================  ==========================================================================
    row           Int64             the run's row number: input rows 0 … n_input-1 in ingest order, derived after
    kind          String            ``input`` | ``derived``
    sample_id     String            content id (sha256 of the normalised messages); null for a quarantined row
    source        String            the input's name; ``rewrite:<step>`` for a derived row
    source_index  Int64             the row's index within its input (within its rewrite step)
    source_line   Int64             the line of the input file it came from (null for derived rows)
    outcome       String            ``selected`` | ``not_selected`` | ``filtered`` | ``quarantined``
    stage         String            where that was decided: ``ingest``, ``select:<i>:<method>``, ``rewrite:<step>``, …
    reason        String            short code (``below_min``, ``beyond_budget``, ``exact_duplicate``, …); null if selected
    detail        String            a sentence: threshold and value, blocking row, error message
    rank          Int64             order of selection among its round's selected rows (0 first); null otherwise
    origin        String            what made a derived row, ``<method>:<variant>`` (``mosaic:permute``); null for input rows
    parents       List(String)      a derived row's parents' sample_ids; null for input rows
    parent_rows   List(Int64)       their row numbers
    ============  ================  ==========================================================================

    with ``text`` (the default) also:

    ============  ================  ==========================================================================
    source_file   String            the input file (null for derived rows)
    task          String            the row's task label, if its input has one
    messages      List(Struct)      the conversation: ``{role, content, tool_calls}`` (null for a quarantined row)
    prompt        String            every non-assistant message's content, joined by blank lines
    response      String            every assistant message's content, joined by blank lines
    raw           String            a quarantined row's text as read (cut at 10,000 characters); null otherwise
    ============  ================  ==========================================================================

    (after the lineage columns and any input columns the ledger carries, :func:`kept_columns`: with
    ``keep_columns`` in a flow's inputs, e.g. ``source_id``; null for derived rows), and then one Float64
    column per score, ``<scorer>.<output>`` (:func:`score_columns`), and one
    String column per scorer, ``<scorer>.status`` (``ok``, ``error``, …): null for rows no scorer saw
    (quarantined rows; a row a rewrite quarantined). An exact duplicate (reason ``exact_duplicate``:
    no set or pool holds it) shows its first copy's messages and scores, the same content; its
    ``source_file`` and ``task`` stay null.

    The frame is lazy: ``run_rows(out, text=False).filter(...).sort(...).head(50).collect()`` reads the
    ledgers and the score columns only; :func:`with_text` then fetches the text of the rows taken.
    Without ``scores`` the frame has no score columns and reads no score table (counting rows per
    outcome needs only the ledgers: the score join is most of the time of a query over a large run).
    """
    files = _files(run)
    names = score_columns(files, statuses=True) if scores else []
    scores_by_row, scores_by_id = _scores(files, names) if names else (None, None)
    null = lambda c: pl.lit(None, dtype=_TYPES[c]).alias(c)  # noqa: E731
    base = [*LEDGER_COLUMNS[:1], "kind", *LEDGER_COLUMNS[1:], *LINEAGE_COLUMNS]
    kept = kept_columns(files, names)
    inp = (pl.scan_parquet(str(files.ledger)).select(*LEDGER_COLUMNS, *kept)
           .with_columns(pl.lit("input").alias("kind"), *map(null, LINEAGE_COLUMNS)).select(*base, *kept))
    if scores_by_row is not None:
        ledger = inp
        inp = inp.join(scores_by_row, on="row", how="left", maintain_order="left")
        inp = _fill_from(inp, _first_copies(ledger, scores_by_id, names), names)
    frames = [inp]
    if files.derived_ledger is not None:
        der = (pl.scan_parquet(str(files.derived_ledger)).select(*LEDGER_COLUMNS, "origin", "parents")
               .with_columns(pl.lit("derived").alias("kind")))
        if files.lineage is not None:
            der = der.join(pl.scan_parquet(str(files.lineage)).select("row", "parent_rows"), on="row", how="left", maintain_order="left")
        else:
            der = der.with_columns(null("parent_rows"))
        der = der.select(base)
        frames.append(der.join(scores_by_row, on="row", how="left", maintain_order="left") if scores_by_row is not None else der)
    rows = pl.concat(frames, how="diagonal_relaxed").select(*base, *kept, *names) if len(frames) > 1 else inp
    if not text:
        return rows
    return _add_text(files, rows).select(*base, *kept, *TEXT_COLUMNS, *names)


def with_text(page: pl.DataFrame, run: str | os.PathLike | RunFiles) -> pl.DataFrame:
    """``page`` (rows of ``run_rows(run, text=False)``, collected: it needs their row, kind, sample_id
    and reason) with the text columns of :func:`run_rows` added after its own, reading the text of
    those rows only; row order kept."""
    files = _files(run)
    if not page.height:
        return page.with_columns(pl.lit(None, dtype=_TYPES[c]).alias(c) for c in TEXT_COLUMNS)
    return _add_text(files, page.lazy(), only=page.select("row", "sample_id")).select(*page.columns, *TEXT_COLUMNS).collect()
