"""``curate browse``: the JSON API over a real run (filters, search, sort, paging; counts reconcile with
the ledgers; bad requests are one clear 400), the server (127.0.0.1 only, blocks until Ctrl-C, a taken
port is one error), and the page in a real headless Chromium (Debian's, driven by Playwright as in
tests/test_browser.py): pick an outcome, search, sort by a score, go to page 2, expand a row; text
holding ``<script>`` or ``[bold]`` shows as written and runs nothing."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, copy_sample, write_flow
from curate.config import load_flow
from curate.pipeline import execute
from curate.view.browse import PAGE_SIZE, PortInUse, serve_browser

SCRIPT_ROW = {"instruction": "Print [bold]not bold[/bold] and <script>window.pwned=1</script> as written", "input": "",
              "output": "Here: [bold]not bold[/bold] <script>window.pwned=2</script><img src=x onerror=\"window.pwned=3\"> & amp "
                        + " ".join(["zebra"] * 80)}
ODD = [
    json.dumps(SCRIPT_ROW),
    *[json.dumps({"instruction": "Give three tips for staying healthy.", "input": "",
                  "output": "Eat well, sleep enough and move every day."})] * 2,
    "{\"instruction\": \"broken",
    json.dumps({"instruction": "No output here [red]x[/red]", "input": ""}),
    json.dumps({"instruction": "Où est le Café de Flore ?", "input": "",
                "output": "Boulevard Saint-Germain ; le café y est cher, à 300 \u212a."}, ensure_ascii=False),
    json.dumps({"instruction": "Ein Straßencafé ohne Antwort", "input": ""}, ensure_ascii=False),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run: odd rows (markup and HTML in the text, an exact duplicate, a broken line, a row with no
    output), 80 alpaca and 40 code rows from data/sample; heuristic scores, two thresholds, a top-k, and a
    Mosaic-IT rewrite (derived rows with parents; no model) selected again."""
    d = tmp_path_factory.mktemp("browse")
    copy_sample(d, "alpaca_gpt4_en.json", "code_alpaca.csv")
    (d / "odd.jsonl").write_text("\n".join(ODD) + "\n")
    flow = write_flow(d, name="browse-test", output_dir=str(d / "out"), store_dir=str(d / "store"),
                      inputs=[{"path": "odd.jsonl", "name": "odd"}, {"path": "alpaca_gpt4_en.json", "limit": 80},
                              {"path": "code_alpaca.csv", "limit": 40}],
                      score=[{"method": "heuristic"}],
                      select=[{"method": "threshold", "score": "heuristic.degenerate", "max": 0},
                              {"method": "threshold", "score": "heuristic.response_tokens", "min": 8},
                              {"method": "top_k", "score": "heuristic.response_tokens", "budget": 15}],
                      rewrite={"steps": [{"method": "mosaic", "epochs": 1, "max_length": 700}],
                               "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0}]},
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                      runtime={"prefect": False, "torch_threads": 1, "progress": False})
    execute(load_flow(flow))
    return d / "out"


@pytest.fixture(scope="module")
def server(run_dir):
    s = serve_browser(run_dir)
    yield s
    s.close()


def api(server, path: str, params: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    from urllib.parse import urlencode

    url = server.url.rstrip("/") + path + ("?" + urlencode(params, doseq=True) if params else "")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def rows_of(server, **params) -> dict:
    status, got = api(server, "/api/rows", params)
    assert status == 200, got
    return got


def every_row(server, **params) -> list[dict]:
    """All matching rows, page by page."""
    first = rows_of(server, **params)
    out = list(first["rows"])
    for p in range(2, first["pages"] + 1):
        got = rows_of(server, **params, page=p)
        assert got["page"] == p and got["total"] == first["total"]
        out += got["rows"]
    return out


@pytest.fixture(scope="module")
def truth(run_dir) -> pl.DataFrame:
    """Every row from the run's own files, read without curate.view: ledgers, scores by row, text."""
    led = pl.read_parquet(run_dir / "ledger.parquet").select("row", "sample_id", "source", "outcome", "reason")
    der = pl.read_parquet(run_dir / "derived_ledger.parquet").select("row", "sample_id", "source", "outcome", "reason")
    first = pl.read_parquet(run_dir / "select" / "scores.parquet").select("sample_id", "heuristic.response_tokens").unique("sample_id")
    rounds = [r["round"] for r in json.loads((run_dir / "run.json").read_text())["derived"]["rounds"]][1:]
    later = [pl.read_parquet(run_dir / r / "scores.parquet").select("row", "heuristic.response_tokens") for r in rounds]
    scores = pl.concat(later).filter(pl.col("row") >= led.height).unique("row")
    inp = led.join(first, on="sample_id", how="left")
    dv = der.join(scores, on="row", how="left")
    texts = {}
    for shard in (run_dir / "recordsets").glob("*/shard-*.parquet"):
        for r in pl.read_parquet(shard).select("sample_id", "row", "messages").iter_rows(named=True):
            t = "\n".join(m["content"] or "" for m in r["messages"])
            texts[("id", r["sample_id"])] = t
            texts[("row", r["row"])] = t
    df = pl.concat([inp, dv]).sort("row")
    text = [texts.get(("row", r["row"])) if r["row"] >= led.height else texts.get(("id", r["sample_id"])) for r in df.iter_rows(named=True)]
    return df.with_columns(pl.Series("text", text, dtype=pl.String))


# -- the API ----------------------------------------------------------------------------------------


def test_meta_counts_reconcile_with_the_ledgers(server, truth):
    status, meta = api(server, "/api/meta")
    assert status == 200
    assert meta["n_rows"] == truth.height and sum(meta["outcomes"].values()) == truth.height
    want = dict(truth.group_by("outcome").len().iter_rows())
    assert {k: v for k, v in meta["outcomes"].items() if v} == want
    assert meta["sources"] == dict(sorted(truth.group_by("source").len().iter_rows()))
    assert "rewrite:mosaic" in meta["sources"] and "heuristic.response_tokens" in meta["scores"]
    assert {"below_min", "beyond_budget", "exact_duplicate", "invalid_json", "missing_field"} <= set(meta["reasons"])


def test_filters_count_what_the_ledgers_hold(server, truth):
    for outcome in ("selected", "not_selected", "filtered", "quarantined"):
        got = every_row(server, outcome=outcome)
        want = truth.filter(pl.col("outcome") == outcome).get_column("row").to_list()
        assert [r["row"] for r in got] == want, outcome
    for reason in ("beyond_budget", "below_min", "exact_duplicate"):
        got = rows_of(server, reason=reason)
        assert got["total"] == truth.filter(pl.col("reason") == reason).height > 0, reason
        assert {r["reason"] for r in got["rows"]} == {reason}
    got = every_row(server, source="code_alpaca", outcome="not_selected")
    want = truth.filter((pl.col("source") == "code_alpaca") & (pl.col("outcome") == "not_selected"))
    assert [r["row"] for r in got] == want["row"].to_list() and want.height > 0
    two = rows_of(server, outcome=["selected", "quarantined"])  # any of several
    assert two["total"] == truth.filter(pl.col("outcome").is_in(["selected", "quarantined"])).height


def test_paging_covers_every_row_once(server, truth):
    first = rows_of(server)
    assert first["total"] == truth.height and first["pages"] == math.ceil(truth.height / PAGE_SIZE) >= 3
    got = every_row(server)
    assert [r["row"] for r in got] == truth.get_column("row").to_list()  # each row once, in row order
    assert all(len(rows_of(server, page=p)["rows"]) == PAGE_SIZE for p in range(1, first["pages"]))
    last = rows_of(server, page="last")
    assert last["page"] == first["pages"] and [r["row"] for r in last["rows"]] == [r["row"] for r in got[(first["pages"] - 1) * PAGE_SIZE:]]
    assert rows_of(server, page=999)["page"] == first["pages"]  # past the end: the last page
    desc = rows_of(server, order="desc")
    assert [r["row"] for r in desc["rows"]] == sorted(truth["row"].to_list(), reverse=True)[:PAGE_SIZE]


def test_sort_by_a_score_and_a_score_range(server, truth):
    key = "heuristic.response_tokens"
    got = every_row(server, sort=key, order="desc")
    want = truth.sort([key, "row"], descending=[True, False], nulls_last=True).get_column("row").to_list()
    assert [r["row"] for r in got] == want  # highest first, ties in row order, rows without the score last
    assert got[-1]["scores"][key] is None and got[0]["scores"][key] == truth[key].max()
    asc = rows_of(server, sort="response_tokens")  # the short name, as curate show takes it
    assert [r["row"] for r in asc["rows"]] == truth.sort([key, "row"], nulls_last=True)["row"].to_list()[:PAGE_SIZE]
    ranged = every_row(server, score=key, min=15, max=250, sort=key)
    inside = truth.filter(pl.col(key).is_between(15, 250))
    assert inside.height > PAGE_SIZE and len(ranged) == inside.height
    assert all(15 <= r["scores"][key] <= 250 for r in ranged)
    assert [r["scores"][key] for r in ranged] == sorted(inside[key].to_list())
    only_min = rows_of(server, score=key, min=200, outcome="not_selected")
    assert only_min["total"] == truth.filter((pl.col(key) >= 200) & (pl.col("outcome") == "not_selected")).height


def test_search_is_a_case_insensitive_substring_of_the_text(server, truth):
    for q in ("CREPES", "python", "zebra zebra", "<script>window", "[bold]not", "a.b", "(#"):
        want = [r["row"] for r in truth.iter_rows(named=True) if r["text"] and q.lower() in r["text"].lower()]
        got = every_row(server, q=q)
        assert [r["row"] for r in got] == want, q  # regex characters ([, ., () are searched as written
    assert rows_of(server, q="crepes")["total"] > 0
    both = rows_of(server, q="tips for staying healthy")
    assert both["total"] == 2 and "exact_duplicate" in {r["reason"] for r in both["rows"]}  # a duplicate shows its copy's text
    raw = rows_of(server, q="[RED]X[/red]")  # a quarantined row: its raw text
    assert [r["outcome"] for r in raw["rows"]] == ["quarantined"] and "[red]x[/red]" in raw["rows"][0]["raw"]
    combined = rows_of(server, q="the", outcome="not_selected", sort="heuristic.response_tokens", order="desc")
    want = truth.filter((pl.col("outcome") == "not_selected") & pl.col("text").str.to_lowercase().str.contains("the", literal=True))
    assert combined["total"] == want.height > 0
    assert rows_of(server, q="no such text anywhere 1234")["total"] == 0


def test_search_folds_case_beyond_ascii_reads_raw_text_and_matches_the_files(server, truth, run_dir):
    from curate.view.browse import Browser

    def want(q: str) -> list[int]:
        return [r["row"] for r in truth.iter_rows(named=True) if r["text"] and q.lower() in r["text"].lower()]

    cafe = every_row(server, q="CAFÉ")  # É finds é, in messages and in a quarantined row's raw text
    assert [r["row"] for r in cafe if r["outcome"] != "quarantined"] == want("café")
    assert any("Flore" in r["messages"][0]["content"] for r in cafe if r["messages"])
    assert [r["raw"] for r in cafe if r["outcome"] == "quarantined"] == [ODD[-1]]
    assert [r["row"] for r in every_row(server, q="cAfÉ dE fLoRe")] == want("café de flore")
    kelvin = every_row(server, q="300 k")  # the regex's Unicode folding: k finds the Kelvin sign
    assert [r["row"] for r in kelvin] == want("300 \u212a") != []
    raw = rows_of(server, q="EIN STRAẞENCAFÉ OHNE")  # a quarantined row's raw text, non-ASCII (ẞ finds ß)
    assert [r["outcome"] for r in raw["rows"]] == ["quarantined"] and "Straßencafé" in raw["rows"][0]["raw"]
    # the text index and a scan of the files find the same rows
    assert server.browser.wait_index() is not None and "MB, built in" in server.browser.index_note
    plain = Browser(run_dir, index_max_bytes=0)
    assert plain.wait_index() is None and "turned off" in plain.index_note
    assert Browser(run_dir, index_max_bytes=1000).wait_index() is None  # a run over the limit: no index
    import curate.view.browse as browse_module

    real = browse_module.available_memory
    browse_module.available_memory = lambda: 1000  # a machine with 1 kB free: the index would not fit in half of it
    try:
        tight = Browser(run_dir)
        assert tight.wait_index() is None and "free" in tight.index_note
        assert tight.search("CAFÉ").to_list() == server.browser.search("CAFÉ").to_list()  # the files are scanned instead
    finally:
        browse_module.available_memory = real
    with pytest.raises(browse_module.BrowseError, match="give the text to search for"):
        plain.search("")  # an empty query is an error, not every row
    for q in ("CAFÉ", "python", "PYTHON", "the", "[red]x", "straßencafé", "sk", "zebra zebra", "tips for staying", "a.b", "no 1234"):
        assert plain.search(q).to_list() == server.browser.search(q).to_list(), q


def test_rows_carry_text_scores_detail_and_parents(server, run_dir):
    got = rows_of(server, q="window.pwned=1")
    (row,) = got["rows"]
    assert row["messages"][0]["content"] == SCRIPT_ROW["instruction"] and row["messages"][1]["content"] == SCRIPT_ROW["output"]
    assert row["source"] == "odd" and row["source_line"] == 1 and row["detail"]
    assert isinstance(row["scores"]["heuristic.response_tokens"], float)
    lineage = {r["row"]: r["parent_rows"] for r in pq.read_table(run_dir / "lineage.parquet").to_pylist()}
    derived = every_row(server, source="rewrite:mosaic")
    assert lineage and [r["row"] for r in derived] == sorted(lineage)
    for r in derived:
        assert r["kind"] == "derived" and r["origin"].startswith("mosaic:") and r["parent_rows"] == lineage[r["row"]]
        assert [p["row"] for p in r["parents"]] == lineage[r["row"]] and all(p["messages"] for p in r["parents"])
    dup = rows_of(server, reason="exact_duplicate")["rows"][0]
    assert "input row" in dup["detail"] and dup["messages"]


def test_bad_requests_are_one_clear_error(server):
    cases = {(("outcome", "chosen"),): "outcome chosen: no such outcome",
             (("reason", "below_mn"),): "did you mean 'below_min'",
             (("sort", "response_tokenz"),): "did you mean 'response_tokens'",
             (("score", "heuristic.response_tokens"), ("min", "abc")): "min abc: not a number",
             (("min", "3"),): "give the score",
             (("page", "0"),): "pages count from 1",
             (("order", "up"),): "asc or desc",
             (("limit", "5"),): "unknown parameter limit"}
    for params, message in cases.items():
        status, got = api(server, "/api/rows", dict(params))
        assert status == 400 and message in got["error"], (params, got)
    status, got = api(server, "/nothing")
    assert status == 404


def test_the_server_listens_on_loopback_only(server):
    assert server.server_address[0] == "127.0.0.1"
    status, got = api(server, "/api/meta", headers={"Host": "evil.example:80"})  # a DNS-rebinding page
    assert status == 403
    with urllib.request.urlopen(server.url, timeout=30) as r:
        csp = r.headers["Content-Security-Policy"]
        page = r.read().decode()
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_browse_blocks_until_ctrl_c_and_a_taken_port_is_one_error(run_dir, server):
    with pytest.raises(PortInUse, match=f"--port {server.server_address[1]}"):
        serve_browser(run_dir, port=server.server_address[1])
    port = _free_port()
    # Ctrl-C as in a terminal, even where the test runs as a background job (which starts with SIGINT ignored)
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from curate.view.browse import browse; browse(sys.argv[1], int(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line and "browse-test" in line, line + proc.stderr.read() if proc.poll() is not None else line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=30) as r:
            assert json.loads(r.read())["flow"] == "browse-test"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=5)


# -- the page in a headless Chromium ----------------------------------------------------------------


def test_the_page_filters_searches_sorts_pages_and_expands(browser, server, truth, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    dialogs, errors = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    shot = lambda name: page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)  # noqa: E731
    status = page.locator("#status")
    try:
        page.goto(server.url)
        expect(status).to_have_text(re.compile(rf"^{truth.height} of {truth.height} rows match · showing 1–50 · page 1 of \d+"))
        assert page.locator("article").count() == PAGE_SIZE
        shot("1-all")
        # an outcome
        n = truth.filter(pl.col("outcome") == "not_selected").height
        page.select_option("#outcome", "not_selected")
        expect(status).to_have_text(re.compile(rf"^{n} of {truth.height} rows match"))
        assert set(page.locator("article .outcome").all_inner_texts()) == {"not_selected"}
        # sort by a score, highest first
        key = "heuristic.response_tokens"
        page.select_option("#sort", key)
        page.select_option("#order", "desc")
        want = truth.filter(pl.col("outcome") == "not_selected").sort([key, "row"], descending=[True, False])["row"].to_list()
        expect(page.locator("article").first).to_have_attribute("data-row", str(want[0]))
        assert [int(a) for a in page.eval_on_selector_all("article", "as => as.map(a => a.dataset.row)")] == want[:PAGE_SIZE]
        assert page.locator("article").first.locator("td.key").inner_text() == str(int(truth.filter(pl.col("row") == want[0])[key].item()))
        # page 2
        page.click("#next")
        expect(status).to_have_text(re.compile(rf"^{n} of .* showing 51–{min(100, n)} · page 2 of"))
        assert [int(a) for a in page.eval_on_selector_all("article", "as => as.map(a => a.dataset.row)")] == want[PAGE_SIZE:2 * PAGE_SIZE]
        assert page.input_value("#page") == "2"
        shot("2-not-selected-by-score-page-2")
        # a search (back to page 1), and the text of a long row expanded
        page.fill("#q", "Zebra")
        expect(status).to_have_text(re.compile(r"^0 of "))  # the <script> row is not among the not_selected ones
        page.select_option("#outcome", "")
        expect(status).to_have_text(re.compile(r"^1 of .* page 1 of 1$"))
        row = page.locator("article").first
        text = row.locator(".text").inner_text()
        assert "<script>window.pwned=1</script>" in text and "[bold]not bold[/bold]" in text  # as written
        assert text.count("zebra") < 80  # a preview
        row.locator("button.expand").click()
        expect(row.locator("button.expand")).to_have_text("show less")
        full = row.locator(".text").inner_text()
        assert full.count("zebra") == 80 and '<img src=x onerror="window.pwned=3">' in full
        assert page.locator("#rows script, #rows img, #rows b").count() == 0  # no element made from the data
        assert page.evaluate("window.pwned") is None and not dialogs
        shot("3-search-expanded")
        # a derived row with its parents
        page.fill("#q", "")
        page.select_option("#source", "rewrite:mosaic")
        expect(page.locator("article.derived").first).to_be_visible()
        first = page.locator("article.derived").first
        parents = [int(re.match(r"parent row (\d+)", t).group(1)) for t in first.locator(".parent .head").all_inner_texts()]
        row_no = int(first.get_attribute("data-row"))
        lineage = {r["row"]: r["parent_rows"] for r in pq.read_table(server.browser.files.lineage).to_pylist()}
        assert parents == lineage[row_no]
        # the URL keeps the view: a reload shows the same rows
        page.reload()
        expect(page.locator("article.derived").first).to_have_attribute("data-row", str(row_no))
        assert page.input_value("#source") == "rewrite:mosaic"
        assert not errors, errors
    finally:
        page.close()


def test_the_cli_command_names_a_folder_that_is_not_a_run(tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    res = CliRunner().invoke(app, ["browse", str(tmp_path / "nowhere [v2]")])
    assert res.exit_code == 2 and "error:" in res.output and "nowhere [v2]" in res.output, res.output
