"""Looking at a run: ``curate.view.run_rows`` (every row with its text, scores and outcome, lazily),
``curate show`` (filters, sorts, 80 columns, user text never read as markup, clear errors, parents
beside derived rows) and the report's rows section (a sample per outcome and reason, escaped)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import copy_sample, write_flow
from curate.cli import app
from curate.records import prompt_text, response_text
from curate.view import run_files, run_rows, with_text

runner = CliRunner()

ODD = [
    {"instruction": "Print [bold]not bold[/bold] and <script>alert(1)</script> as written", "input": "",
     "output": "Here: [bold]not bold[/bold] <script>alert(1)</script> [link](javascript:alert(2)) *star* _under_ | pipe & amp"},
    *[{"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep enough and move every day."}] * 2,
    "{\"instruction\": \"broken",
    {"instruction": "What is two plus two?", "input": "", "output": "Four."},
    {"instruction": "No output here [red]x[/red]", "input": ""},
]


def _run(flow: Path, *extra: str) -> dict:
    r = runner.invoke(app, ["run", str(flow), "--no-prefect", "--quiet", *extra])
    assert r.exit_code == 0, r.output
    return json.loads((Path(flow).parent / "out" / "run.json").read_text()) if not extra else {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run: 6 odd rows (markup in the text, an exact duplicate, a broken JSON line, a row without
    output; rows 0-5, so the report's samples include them), 30 alpaca and 20 code rows from data/sample,
    heuristic scores, two thresholds and a top-k."""
    d = tmp_path_factory.mktemp("show")
    copy_sample(d, "alpaca_gpt4_en.json", "code_alpaca.csv")
    (d / "odd.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in ODD) + "\n")
    flow = write_flow(d, name="show-test", inputs=[{"path": "odd.jsonl", "name": "odd"}, {"path": "alpaca_gpt4_en.json", "limit": 30},
                                                   {"path": "code_alpaca.csv", "limit": 20}],
                      score=[{"method": "heuristic"}],
                      select=[{"method": "threshold", "score": "heuristic.degenerate", "max": 0},
                              {"method": "threshold", "score": "heuristic.response_tokens", "min": 8},
                              {"method": "top_k", "score": "heuristic.response_tokens", "budget": 12}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    _run(flow)
    return d


def show(*args: str, columns: int = 80):
    r = runner.invoke(app, ["show", *map(str, args)], env={"COLUMNS": str(columns)})
    return r


def headers(output: str) -> list[tuple[int, str]]:
    """(row, outcome) of each row rule printed."""
    return [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^(?:derived )?row (\d+) · (\w+)", output, re.M)]


def ledger(out: Path) -> list[dict]:
    return pq.read_table(out / "ledger.parquet").to_pylist()


# -- the data layer ---------------------------------------------------------------------------------


def test_run_rows_has_every_row_with_text_scores_and_outcome(run_dir):
    out = run_dir / "out"
    lf = run_rows(out)
    assert isinstance(lf, pl.LazyFrame)
    df = lf.collect()
    led = ledger(out)
    assert df.get_column("row").to_list() == [r["row"] for r in led]  # one row per input row, in row order
    for c in ("outcome", "stage", "reason", "detail", "rank", "source", "source_line", "sample_id"):
        assert df.get_column(c).to_list() == [r[c] for r in led], c
    assert df.columns[:14] == ["row", "kind", "sample_id", "source", "source_index", "source_line", "outcome", "stage", "reason", "detail",
                               "rank", "origin", "parents", "parent_rows"]
    assert df.columns[14:20] == ["source_file", "task", "messages", "prompt", "response", "raw"]
    # text: the record set's messages, and prompt/response as curate.records computes them
    recs = {r["sample_id"]: r for r in pl.read_parquet(str(out / "recordsets" / "input" / "shard-*.parquet")).to_dicts()}
    by_row = {r["row"]: r for r in df.iter_rows(named=True)}
    for r in by_row.values():
        if r["sample_id"] in recs:
            assert r["prompt"] == prompt_text(recs[r["sample_id"]]["messages"])
            assert r["response"] == response_text(recs[r["sample_id"]]["messages"])
    # scores: every score column, equal to the selection table's by row
    scores = pq.read_table(out / "select" / "scores.parquet").to_pylist()
    names = [c for c in scores[0] if "." in c]
    assert set(names) <= set(df.columns) and "heuristic.response_tokens" in names
    for s in scores:
        assert all(by_row[s["row"]][n] == s[n] for n in names)
    # an exact duplicate: its first copy's text and scores; a quarantined row: no id, its raw text (or none)
    dup = next(r for r in by_row.values() if r["reason"] == "exact_duplicate")
    first = int(re.search(r"input row (\d+)", dup["detail"]).group(1))
    assert dup["response"] == by_row[first]["response"] and dup["heuristic.response_tokens"] == by_row[first]["heuristic.response_tokens"]
    missing = next(r for r in by_row.values() if r["reason"] == "missing_field")
    assert missing["sample_id"] is None and missing["messages"] is None and "[red]x[/red]" in missing["raw"]
    assert missing["source_file"] == "odd.jsonl"


def test_a_page_without_text_then_its_text_matches_the_full_frame(run_dir):
    out = run_dir / "out"
    page = (run_rows(out, text=False).filter(pl.col("outcome") == "not_selected")
            .sort("heuristic.response_tokens", descending=True).head(5).collect())
    assert "messages" not in page.columns and page.height == 5
    got = with_text(page, out)
    assert got.get_column("row").to_list() == page.get_column("row").to_list()  # the page's order
    full = run_rows(out).filter(pl.col("row").is_in(page.get_column("row").to_list())).collect()
    want = {r["row"]: r["response"] for r in full.iter_rows(named=True)}
    assert [want[r] for r in got.get_column("row")] == got.get_column("response").to_list()
    assert run_rows(out, text=False, scores=False).collect().columns == page.columns[:14]


def test_a_moved_run_folder_reads_its_own_files(run_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(run_dir / "out", moved)
    files = run_files(moved)
    paths = [files.ledger, *files.input_shards, *files.score_tables, *(q for q, _ in files.quarantine)]
    assert all(str(p).startswith(str(moved)) for p in paths)
    assert run_rows(moved).select(pl.len()).collect().item() == len(ledger(moved))


def test_input_columns_the_ledger_carries_are_passed_through(run_dir, tmp_path):
    """keep_columns puts an input's own columns after the ledger's: the frame and curate show carry them."""
    moved = tmp_path / "kept"
    shutil.copytree(run_dir / "out", moved)
    t = pq.read_table(moved / "ledger.parquet")
    pq.write_table(t.append_column("source_id", pa.array([f"id-{i}" for i in range(t.num_rows)])), moved / "ledger.parquet")
    df = run_rows(moved).collect()
    assert df.columns.index("source_id") == 14 and df.get_column("source_id").to_list() == [f"id-{i}" for i in range(t.num_rows)]
    r = show(moved, "--limit", "2")
    assert "columns source_id id-0" in r.output and "columns source_id id-1" in r.output


# -- curate show ------------------------------------------------------------------------------------


def test_show_filters_by_outcome_reason_and_source(run_dir):
    out = run_dir / "out"
    led = ledger(out)
    r = show(out, "--outcome", "filtered", "--limit", "100")
    assert r.exit_code == 0, r.output
    want = [x["row"] for x in led if x["outcome"] == "filtered"]
    assert headers(r.output) == [(n, "filtered") for n in want]
    assert f"{len(want)} of {len(led)} rows match (outcome filtered)" in r.output
    r = show(out, "--reason", "exact_duplicate")
    assert [n for n, _ in headers(r.output)] == [x["row"] for x in led if x["reason"] == "exact_duplicate"]
    assert "same content as input row" in r.output
    r = show(out, "--source", "code_alpaca", "--outcome", "not_selected", "--limit", "100")
    want = [x["row"] for x in led if x["source"] == "code_alpaca" and x["outcome"] == "not_selected"]
    assert want and [n for n, _ in headers(r.output)] == want and "code_alpaca.csv:" in r.output
    r = show(out, "--limit", "2")
    assert [n for n, _ in headers(r.output)] == [0, 1] and f"{len(led)} of {len(led)} rows; showing 2 by row" in r.output


def test_show_sorts_by_a_score(run_dir):
    out = run_dir / "out"
    scores = pq.read_table(out / "select" / "scores.parquet").to_pylist()
    led = {x["row"]: x for x in ledger(out)}
    pool = [s for s in scores if led[s["row"]]["outcome"] == "not_selected"]
    want = [s["row"] for s in sorted(pool, key=lambda s: (-s["heuristic.response_tokens"], s["row"]))][:4]
    r = show(out, "--outcome", "not_selected", "--sort", "heuristic.response_tokens", "--desc", "--limit", "4")
    assert r.exit_code == 0, r.output
    assert [n for n, _ in headers(r.output)] == want
    r2 = show(out, "--outcome", "not_selected", "--sort", "response_tokens", "--desc", "--limit", "4")  # the short name
    assert [n for n, _ in headers(r2.output)] == want
    asc = [s["row"] for s in sorted(pool, key=lambda s: (s["heuristic.response_tokens"], s["row"]))][:4]
    assert [n for n, _ in headers(show(out, "--outcome", "not_selected", "--sort", "response_tokens", "--limit", "4").output)] == asc
    ranked = sorted((x for x in led.values() if x["outcome"] == "selected"), key=lambda x: x["rank"])
    r = show(out, "--sort", "rank", "--outcome", "selected", "--limit", "3")
    assert [n for n, _ in headers(r.output)] == [x["row"] for x in ranked[:3]]


def test_show_prints_user_text_literally_within_80_columns(run_dir):
    r = show(run_dir / "out", "--source", "odd", "--limit", "10")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    flat = " ".join(r.output.split())
    assert "[bold]not bold[/bold]" in flat and "<script>alert(1)</script>" in flat and "[link](javascript:alert(2))" in flat
    assert "raw: {\"instruction\": \"No output here [red]x[/red]\"" in flat  # a quarantined row's text as read
    # scores, outcome, reason and detail are on the page
    assert "heuristic: prompt_chars" in r.output and "response_tokens" in r.output and "exact_duplicate" in r.output
    assert "detail odd.jsonl:6: output: missing required field 'output'" in flat


def test_show_cuts_previews_and_full_shows_everything(run_dir):
    out = run_dir / "out"
    longest = run_rows(out).sort(pl.col("response").str.len_chars(), descending=True, nulls_last=True).head(1).collect().row(0, named=True)
    assert len(longest["response"]) > 600
    r = show(out, "--sort", "response_chars", "--desc", "--limit", "1")
    flat = " ".join(r.output.split())
    assert headers(r.output)[0][0] == longest["row"] and " …" in r.output
    assert " ".join(longest["response"].split()) not in flat
    r = show(out, "--sort", "response_chars", "--desc", "--limit", "1", "--full")
    assert " ".join(longest["response"].split()) in " ".join(r.output.split())
    assert max(len(line) for line in r.output.splitlines()) <= 80


def test_show_errors_are_one_line_not_tracebacks(run_dir, tmp_path):
    out = run_dir / "out"
    cases = [
        ((tmp_path,), "not the output folder of a finished run"),
        ((tmp_path / "nope",), "no such folder"),
        ((out, "--sort", "response_tokenz"), "no such score; did you mean 'response_tokens'?"),
        ((out, "--sort", "heuristic.degenerat"), "did you mean 'heuristic.degenerate'?"),
        ((out, "--outcome", "selectd"), "no such outcome; did you mean 'selected'?"),
        ((out, "--reason", "below_mim"), "did you mean 'below_min'?"),
        ((out, "--source", "code_alpac"), "did you mean 'code_alpaca'? sources in this run: alpaca_gpt4_en, code_alpaca, odd"),
    ]
    for args, msg in cases:
        r = show(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.output and msg in " ".join(r.output.split()) and "Traceback" not in r.output, (args, r.output)


def test_show_follows_a_flow_file_to_its_output(run_dir, tmp_path):
    r = show(run_dir / "show-test.yaml", "--limit", "3")
    assert r.exit_code == 0, r.output and [n for n, _ in headers(r.output)] == [0, 1, 2]
    assert r.output == show(run_dir / "out", "--limit", "3").output
    fresh = write_flow(tmp_path, name="never-run", inputs=[{"path": "x.jsonl"}], score=[{"method": "heuristic"}])
    (tmp_path / "x.jsonl").write_text("{}\n")
    r = show(fresh)
    assert r.exit_code == 2 and "holds no finished run yet" in r.output


# -- the report's rows section ----------------------------------------------------------------------


def test_report_has_rows_per_outcome_and_reason_escaped(run_dir):
    out = run_dir / "out"
    md = (out / "report" / "report.md").read_text()
    page = (out / "report" / "report.html").read_text()
    assert "## Rows" in md and md.index("## Rows") < md.index("## Exports")
    led = ledger(out)
    groups: dict[tuple, list[int]] = {}
    for x in led:
        groups.setdefault((x["outcome"], x["reason"]), []).append(x["row"])
    section = md[md.index("## Rows"):md.index("## Exports")]
    for (outcome, reason), rows in groups.items():
        title = f"{outcome} · {reason}".replace("_", "\\_") if reason else outcome.replace("_", "\\_")
        m = re.search(rf"^### {re.escape(title)} \((\d+) rows?\)\n\n(.*?)\n\n", section, re.M | re.S)
        assert m, title
        assert int(m.group(1)) == len(rows)
        shown = [int(line.split("|")[1]) for line in m.group(2).splitlines()[2:]]
        assert shown == rows[:3]  # the first three by row number
    # selected rows per source
    per = {}
    for x in led:
        per.setdefault(x["source"], [0, 0])[0] += 1
        per[x["source"]][1] += x["outcome"] == "selected"
    for src, (n, sel) in per.items():
        assert re.search(rf"^\| {re.escape(src.replace('_', chr(92) + '_'))} \| {n} \| {sel} \(", section, re.M), src
    # user text is text in the HTML: no script element, no javascript: link, brackets kept
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="javascript' not in page and "[link](javascript:alert(2))" in page
    assert "[bold]not bold[/bold]" in page and "*star* _under_" in page and "<em>" not in page


def test_report_sample_size_comes_from_the_flow(run_dir):
    flow = run_dir / "show-test.yaml"
    r = runner.invoke(app, ["run", str(flow), "--no-prefect", "--quiet", "--set", "report.sample_rows=1", "--set", "output_dir=out1"])
    assert r.exit_code == 0, r.output
    md = (run_dir / "out1" / "report" / "report.md").read_text()
    section = md[md.index("## Rows"):md.index("## Exports")]
    tables = re.findall(r"^### .*?\n\n(.*?)\n\n", section, re.M | re.S)[1:]  # after "Rows per source"
    assert tables and all(len(t.splitlines()) == 3 for t in tables)  # header, rule, one row
    r = runner.invoke(app, ["run", str(flow), "--no-prefect", "--quiet", "--set", "report.sample_rows=0", "--set", "output_dir=out0"])
    assert r.exit_code == 0 and "## Rows" not in (run_dir / "out0" / "report" / "report.md").read_text()


# -- derived rows (Mosaic-IT: no model, the bundled tokenizer only) ---------------------------------


@pytest.mark.slow
def test_derived_rows_show_their_parents(tmp_path):
    copy_sample(tmp_path, "alpaca_gpt4_en.json")
    flow = write_flow(tmp_path, name="mosaic-show", inputs=[{"path": "alpaca_gpt4_en.json", "limit": 20}], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 8}],
                      rewrite={"steps": [{"method": "mosaic", "epochs": 1, "max_length": 700}],
                               "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0}]},
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    _run(flow)
    out = tmp_path / "out"
    lineage = {r["row"]: r["parent_rows"] for r in pq.read_table(out / "lineage.parquet").to_pylist()}
    assert lineage
    df = run_rows(out).collect()
    derived = df.filter(pl.col("kind") == "derived")
    assert derived.get_column("row").to_list() == sorted(lineage)
    assert {r["row"]: r["parent_rows"] for r in derived.iter_rows(named=True)} == lineage
    assert derived.get_column("messages").null_count() == 0 and derived.get_column("heuristic.response_tokens").null_count() == 0
    r = show(out, "--source", "rewrite:mosaic", "--limit", "3")
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= 80
    blocks = re.split(r"^derived row ", r.output, flags=re.M)[1:]
    assert len(blocks) == 3
    for b in blocks:
        row = int(b.split(" ", 1)[0])
        parents = [int(p) for p in re.findall(r"^\s+parent row (\d+)", b, re.M)]
        assert parents == lineage[row], b
        assert "origin mosaic:" in b
    wide = show(out, "--source", "rewrite:mosaic", "--limit", "1", columns=140)
    first = wide.output.splitlines()[2]  # beside the child's first line: its parent
    assert re.search(r"id [0-9a-f]{12}\s+parent row \d+", first), wide.output
    # the report: derived rows with their parents' rows and text in the same table row
    md = (out / "report" / "report.md").read_text()
    assert "### derived rows: selected" in md and "| row | origin | derived row | scores | detail | parent rows | parent text |" in md
    line = next(x for x in md.splitlines() if x.startswith(f"| {min(lineage)} | mosaic"))
    assert f"**row {lineage[min(lineage)][0]}:** **prompt:**" in line


def test_an_all_quarantined_run_shows_and_browses(tmp_path):
    """Nothing parses: the run still finishes, and show, the browse API and the report's rows section read
    its quarantined rows (raw text, file:line detail); a filter on an outcome no row has answers 0 rows."""
    from curate.view.browse import Browser

    (tmp_path / "bad.jsonl").write_text('{"instruction": "", "input": "", "output": ""}\n{"instruction": "no output [b]x[/b]"}\nnot json at all\n')
    flow = write_flow(tmp_path, name="all-bad", inputs=[{"path": "bad.jsonl"}], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 2}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    r = runner.invoke(app, ["run", str(flow), "--no-prefect", "--quiet"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert [x["outcome"] for x in ledger(out)] == ["quarantined"] * 3
    r = show(out)
    assert r.exit_code == 0, r.output
    assert headers(r.output) == [(0, "quarantined"), (1, "quarantined"), (2, "quarantined")]
    flat = " ".join(r.output.split())
    assert "raw: not json at all" in flat and "no output [b]x[/b]" in flat and "bad.jsonl:2" in flat
    r = show(out, "--outcome", "selected")
    assert r.exit_code == 0 and "0 of 3 rows match (outcome selected)" in r.output, r.output
    b = Browser(out)
    page = b.rows({})
    assert page["total"] == 3 and [x["outcome"] for x in page["rows"]] == ["quarantined"] * 3
    assert b.rows({"q": ["NOT JSON"]})["total"] == 1 and b.rows({"outcome": ["selected"]})["total"] == 0
    html = (out / "report" / "report.html").read_text()
    assert "not json at all" in html and "bad.jsonl:3" in html  # the rows section samples the quarantined rows, raw text included
