"""The command line: real --help, clear errors with exit code 2, plan and inspect."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from curate.cli import app
from conftest import ROOT, write_flow

runner = CliRunner()


def test_help_lists_commands_and_options():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and all(c in r.output for c in ("run", "plan", "inspect"))
    r = runner.invoke(app, ["run", "--help"])
    assert r.exit_code == 0 and "--set" in r.output and "--no-prefect" in r.output


def test_bad_flow_gives_one_clear_line(tmp_path):
    p = tmp_path / "f.yaml"
    p.write_text("name: x\ninputs:\n  - path: a.jsonl\n    colour: red\n")
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2
    assert "inputs[0].colour: unknown key" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["plan", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "no such flow file" in r.output


def test_missing_input_file_is_named(tmp_path):
    flow = write_flow(tmp_path, name="x", inputs=[{"path": "nope.jsonl"}])
    r = runner.invoke(app, ["plan", str(flow)])
    assert r.exit_code == 2 and "nope.jsonl: no such file or directory" in r.output


def test_plan_and_inspect_the_default_flow(tmp_path):
    r = runner.invoke(app, ["plan", str(ROOT / "flows" / "select.yaml"), "--json", "--no-warmup"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["n_input"] == 158 and p["n_duplicates"] == 0
    assert [s["stage"] for s in p["stages"]][:3] == ["embed", "score:heuristic", "score:superfiltering"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 3)))}) + "\n" for i in range(12)))
    flow = write_flow(tmp_path, name="tiny", inputs=[{"path": "rows.jsonl"}], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 5}], report={"plots": False})
    r = runner.invoke(app, ["run", str(flow), "--no-prefect", "--quiet", "--set", "select.0.budget=4"])
    assert r.exit_code == 0, r.output
    assert "4 selected" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "beyond_budget" in r.output and "4 selected" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "run.json" in r.output
