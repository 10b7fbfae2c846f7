"""Mistakes in a flow stop it before the expensive part, as one message with file, line and field
(issue 22 items 4-7): the scores selection steps read, budgets (also through --set), the output
folder; a budget larger than its pool warns and is recorded; --set reads keys as errors print them;
user text is never read as terminal markup. Heuristic scorer only, no model is loaded."""

from __future__ import annotations

import io
import json
import re
import shlex

import pytest
from rich.console import Console
from typer.testing import CliRunner

import curate.cli as cli
from curate.cli import app
from curate.config import load_flow, parse_override
from curate.errors import ConfigError
from conftest import ROOT, write_flow

runner = CliRunner()


def rows_file(directory, n=12):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rows.jsonl").write_text("".join(
        json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 3)))}) + "\n" for i in range(n)))
    return "rows.jsonl"


def flow(tmp_path, select, **kw):
    return write_flow(tmp_path, inputs=[{"path": rows_file(tmp_path)}], score=[{"method": "heuristic"}], select=select,
                      report={"plots": False}, **kw)


TOP = {"method": "top_k", "score": "heuristic.response_tokens", "budget": 5}


# -- item 4: everything a flow refers to is checked when it is read -------------------------------

def test_misspelled_score_is_named_with_a_suggestion_at_load_and_by_plan(tmp_path):
    p = flow(tmp_path, [{"method": "threshold", "score": "heuristic.respnse_tokens", "min": 2}, TOP])
    with pytest.raises(ConfigError) as e:
        load_flow(p)
    msg = str(e.value)
    assert re.match(rf"{re.escape(str(p))}:\d+: select\[0\]\.score: scorer 'heuristic' has no output 'respnse_tokens'", msg), msg
    assert "did you mean 'heuristic.response_tokens'?" in msg and "\n" not in msg
    r = runner.invoke(app, ["plan", str(p), "--no-warmup"])
    assert r.exit_code == 2 and "did you mean 'heuristic.response_tokens'?" in r.output and "Traceback" not in r.output
    # a scorer the flow does not have: also before anything runs, with the closest name
    with pytest.raises(ConfigError, match=r"select\[0\]\.score: 'heuristc.response_tokens' names no scorer of this flow "
                                          r"\(did you mean 'heuristic.response_tokens'\?"):
        load_flow(p, ["select[0].score=heuristc.response_tokens"])


def test_token_budget_count_is_checked_before_ingest(tmp_path):
    p = flow(tmp_path, [TOP, {"method": "token_budget", "tokens": 50, "count": ["heuristic.response_tokens", "heuristic.prompt_tokns"]}])
    with pytest.raises(ConfigError, match=r"select\[1\]\.count\[1\]: scorer 'heuristic' has no output 'prompt_tokns' "
                                          r"\(did you mean 'heuristic.prompt_tokens'\?"):
        load_flow(p)
    # no heuristic scorer for the default count: `curate plan` says so before it reads a row (the input is missing too)
    q = write_flow(tmp_path / "q", inputs=[{"path": "missing.jsonl"}], score=[],
                   select=[{"method": "token_budget", "tokens": 50}])
    r = runner.invoke(app, ["plan", str(q), "--no-warmup"])
    assert r.exit_code == 2 and "select[0].count[0]: 'heuristic.prompt_tokens' names no scorer of this flow" in r.output, r.output
    assert "add '- method: heuristic' to the score: section" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("value, expected", [
    ("1.5", "a fractional budget must be in (0, 1], got 1.5"),
    ("0", "budget must be at least 1 row, got 0"),
    ("-3", "budget must be at least 1 row, got -3"),
    ("true", "budget must be a number of rows"),
    ("5000.0", "for a count of rows write 5000"),
])
def test_budgets_out_of_range_through_set_name_file_line_and_override(tmp_path, value, expected):
    p = flow(tmp_path, [{"method": "threshold", "score": "heuristic.response_tokens", "min": 2}, TOP])
    with pytest.raises(ConfigError) as e:
        load_flow(p, [f"select[1].budget={value}"])
    msg = str(e.value)
    assert re.match(rf"{re.escape(str(p))}:\d+: select\[1\]\.budget: ", msg) and expected in msg, msg
    assert msg.endswith(f"(from --set select[1].budget={value})")
    r = runner.invoke(app, ["run", str(p), "--set", f"select.1.budget={value}"])
    assert r.exit_code == 2 and expected in r.output and "Traceback" not in r.output


def test_rates_out_of_range_through_set(tmp_path):
    p = flow(tmp_path, [TOP])
    with pytest.raises(ConfigError, match=r"test.yaml: runtime.max_error_rate: Input should be less than or equal to 1 "
                                          r"\(from --set runtime.max_error_rate=1.5\)"):
        load_flow(p, ["runtime.max_error_rate=1.5"])
    with pytest.raises(ConfigError, match=r"test.yaml: select\[0\]\.rate_base: Input should be 'input', 'pool' or 'valid'"):
        load_flow(p, ["select[0].budget=0.5", "select[0].rate_base=half"])


def test_output_dir_that_cannot_be_made_is_a_clear_message(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    p = flow(tmp_path, [TOP], output_dir="afile/out")
    with pytest.raises(ConfigError, match=r"test.yaml:\d+: output_dir: .*afile/out cannot be made: .*afile is a file"):
        load_flow(p)
    with pytest.raises(ConfigError, match=r"output_dir: .*afile is a file; set output_dir to a folder \(from --set output_dir=afile\)"):
        load_flow(p, ["output_dir=afile"])
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2 and "is a file" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "store").exists()  # stopped before ingest


def test_output_dir_without_write_permission_is_a_clear_message(tmp_path, monkeypatch):
    import curate.config

    p = flow(tmp_path, [TOP], output_dir="ro/out")
    (tmp_path / "ro").mkdir()
    real = curate.config.os.access
    monkeypatch.setattr(curate.config.os, "access", lambda path, mode: False if str(path).endswith("ro") else real(path, mode))
    with pytest.raises(ConfigError, match=r"test.yaml:\d+: output_dir: .*ro/out cannot be made: .*ro is not writable by this user"):
        load_flow(p)


def test_every_row_quarantined_still_exports(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "", "output": ""}\n{"nothing": 1}\n')
    p = write_flow(tmp_path, inputs=[{"path": "bad.jsonl"}], score=[{"method": "heuristic"}], select=[TOP], report={"plots": False},
                   export={"layouts": ["messages", "prompt_completion", "alpaca", "sharegpt"]})
    r = runner.invoke(app, ["run", str(p), "--no-prefect", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "0 selected" in r.output and "2 quarantined" in r.output


# -- item 5: a budget larger than its pool warns, and both budgets are recorded -------------------

def test_budget_larger_than_pool_warns_and_records_asked_and_applied(tmp_path):
    p = flow(tmp_path, [TOP])
    r = runner.invoke(app, ["run", str(p), "--no-prefect", "--quiet", "--set", "select[0].budget=5000"])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    step = run["steps"][0]
    assert step["budget_asked"] == 5000 and step["budget_applied"] == 12 and step["kept"] == 12
    assert "the budget of 5000 rows is larger than the 12 rows that reach it" in step["warning"]
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## Warnings" in report and "budget of 5000 rows is larger than the 12 rows" in report
    assert "budget_asked=5000, budget_applied=12" in report
    # a fraction records the rows it came to; within the pool, no warning
    r = runner.invoke(app, ["run", str(p), "--no-prefect", "--quiet", "--set", "select[0].budget=0.5", "--set", "select[0].rate_base=pool"])
    assert r.exit_code == 0, r.output
    step = json.loads((tmp_path / "out" / "run.json").read_text())["steps"][0]
    assert (step["budget_asked"], step["budget_rows"], step["budget_applied"]) == (0.5, 6, 6) and "warning" not in step


def test_the_budget_applied_is_what_the_step_could_keep():
    """top_k keeps only scored rows: 100 asked of 120 rows, 50 scored → 50 applied, with a warning; a fraction of
    valid rows is resolved by the step on its scored rows: the rows it kept are the budget applied."""
    from curate.select import selector_class
    from curate.stages.select import budget_record

    params = selector_class("top_k").Params.model_validate({"score": "s.x", "budget": 100})
    rec = budget_record(params, 120, 120, {}, "step 0 (top_k)", kept=50)
    assert rec["budget_asked"] == 100 and rec["budget_applied"] == 50
    assert "larger than the 50 rows the step kept of the 120 that reach it" in rec["warning"]
    assert budget_record(params, 120, 120, {}, "step 0", kept=100) == {"budget_asked": 100, "budget_applied": 100}
    valid = selector_class("top_k").Params.model_validate({"score": "s.x", "budget": 0.5, "rate_base": "valid"})
    assert budget_record(valid, 120, 120, {}, "step 0", kept=25) == {"budget_asked": 0.5, "budget_applied": 25}


# -- item 7: --set -------------------------------------------------------------------------------

def test_set_reads_keys_as_errors_print_them_negative_indices_and_append(tmp_path):
    p = flow(tmp_path, [{"method": "threshold", "score": "heuristic.response_tokens", "min": 2}, TOP, dict(TOP, budget=8)])
    assert load_flow(p, ["select[2].budget=20"]).select[2].params["budget"] == 20
    assert load_flow(p, ["select.2.budget=20"]).select[2].params["budget"] == 20
    assert load_flow(p, ["select[-1].budget=3"]).select[2].params["budget"] == 3
    assert load_flow(p, ["select.-2.budget=4"]).select[1].params["budget"] == 4
    spec = load_flow(p, ["select[+]={method: random, budget: 2}"])
    assert [s.method for s in spec.select] == ["threshold", "top_k", "top_k", "random"] and spec.select[3].params["budget"] == 2
    spec = load_flow(p, ["select[+].method=random", "select[-1].budget=2"])
    assert spec.select[-1].method == "random" and spec.select[-1].params == {"budget": 2}
    with pytest.raises(ConfigError, match=r"no list item 3 at 'select' \(it has 3 items: 0 to 2; \[\+\] appends one\)"):
        load_flow(p, ["select[3].budget=1"])
    with pytest.raises(ConfigError, match=r"select\[1\]\.bugdet: unknown key .* \(from --set select\[1\]\.bugdet=3\)"):
        load_flow(p, ["select[1].bugdet=3"])


def test_set_values_quoted_text_stays_a_string():
    assert parse_override('description="hello world: with colon"') == (["description"], "hello world: with colon")
    assert parse_override("description=hello world: with colon") == (["description"], "hello world: with colon")
    assert parse_override("description=run #3") == (["description"], "run #3")  # not cut at a YAML comment
    assert parse_override("description=2024-01-01") == (["description"], "2024-01-01")  # not a date
    assert parse_override("description='run #3'") == (["description"], "run #3")  # quotes: the text inside them
    assert parse_override("description=#1 pick") == (["description"], "#1 pick")
    assert parse_override('seed="7"') == (["seed"], "7")
    assert parse_override("select[0].budget=0.5") == (["select", 0, "budget"], 0.5)
    assert parse_override("export.layouts=[messages, alpaca]") == (["export", "layouts"], ["messages", "alpaca"])
    assert parse_override("x={a: 1}") == (["x"], {"a": 1})


def _doc_set_examples():
    """(flow file, [--set items]) of every `curate run|plan|serve|deploy FLOW … --set …` example in the README and docs/flows.md
    (FLOW.yaml placeholders stand for the default flow)."""
    out = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "flows.md"):
        for line in doc.read_text(encoding="utf-8").splitlines():
            for m in re.finditer(r"curate (?:run|plan|serve|deploy) ([^`#\n]*?--set [^`#\n]*)", line):
                args = shlex.split(m.group(1))
                flows = [a for a in args if a.endswith(".yaml")]
                items = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--set", "-s")]
                if items:
                    name = flows[0] if flows and flows[0] != "FLOW.yaml" else "flows/select.yaml"
                    out.append((f"{doc.name}: {m.group(0)}", name, items))
    return out


def test_readme_set_examples_load_on_the_shipped_flows():
    examples = _doc_set_examples()
    assert len(examples) >= 2, examples
    for where, name, items in examples:
        assert (ROOT / name).exists(), where
        try:
            load_flow(ROOT / name, [i for i in items if "KEY=VALUE" not in i])
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")


# -- item 6: user text is never read as markup; help as the source says it -----------------------

def test_error_text_with_square_brackets_prints_as_written(tmp_path):
    p = flow(tmp_path, [TOP])
    r = runner.invoke(app, ["plan", str(p), "--set", "name=My Flow [v2]"])
    assert r.exit_code == 2, r.output
    assert "'My Flow [v2]' does not match the pattern ^[a-z0-9][a-z0-9-]*$" in r.output and "e.g. name: my-flow-v2" in r.output
    assert "(from --set name=My Flow [v2])" in r.output


def test_help_says_what_the_source_says():
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "pip install 'curate[train]'" in r.output
    r = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "scores nothing and a killed run resumes where it stopped" in r.output  # a docstring paragraph is not cut at its line ends
    assert "select[-1].budget=20" in r.output and "select[+]" in r.output
    flag = next(line for line in r.output.splitlines() if "--no-prefect" in line)
    assert "<bool>" not in flag
    for args in (["--help"], ["run", "--help"], ["show", "--help"], ["compare", "--help"]):  # click's own --help is a flag too
        out = runner.invoke(app, args, env={"COLUMNS": "200"}).output
        assert "--help" in out and "<bool>" not in out, args


def test_plan_is_readable_at_80_columns(tmp_path, monkeypatch):
    p = flow(tmp_path, [{"method": "threshold", "score": "heuristic.response_tokens", "min": 2}, TOP])
    from curate.pipeline import plan

    buf = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buf, width=80, color_system=None))
    cli._print_plan(plan(load_flow(p), warmup=False), 80)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text, text
    assert 'top_k {"budget": 5, "score": "heuristic.response_tokens"}' in text
    assert "heuristic: 0 rows cached, 12 to compute" in text
