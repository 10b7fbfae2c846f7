"""Flow spec validation: errors name the file, the line and the field; overrides apply."""

from __future__ import annotations

import pytest

from curate.config import load_flow
from curate.errors import ConfigError
from conftest import ROOT

GOOD = """\
name: demo
inputs:
  - path: data.jsonl
score:
  - method: heuristic
embed:
  model: all-MiniLM-L6-v2
select:
  - method: threshold
    score: heuristic.response_tokens
    min: 3
  - method: kcenter
    budget: 10
"""


def write(tmp_path, text):
    p = tmp_path / "flow.yaml"
    p.write_text(text)
    return p


def test_default_flow_is_valid():
    spec = load_flow(ROOT / "flows" / "select.yaml")
    assert spec.name == "select" and spec.out == ROOT / "out" / "select" and spec.store == ROOT / ".curate" / "store"
    assert [s.method for s in spec.select] == ["threshold", "threshold", "threshold", "top_k", "kcenter"]
    assert [s.method for s in spec.score] == ["heuristic", "superfiltering"]
    superfilter = load_flow(ROOT / "flows" / "superfilter.yaml")
    assert superfilter.score[0].method == "superfiltering" and superfilter.select[1].params["budget"] == 0.1


def test_unknown_key_names_file_line_and_field(tmp_path):
    p = write(tmp_path, GOOD.replace("  - path: data.jsonl", "  - path: data.jsonl\n    fromat: alpaca"))
    with pytest.raises(ConfigError) as e:
        load_flow(p)
    assert f"{p}:4: inputs[0].fromat: unknown key" in str(e.value)


def test_bad_step_parameter_names_the_step(tmp_path):
    p = write(tmp_path, GOOD.replace("budget: 10", "budget: 10\n    radius: 3"))
    with pytest.raises(ConfigError) as e:
        load_flow(p)
    assert f"{p}:14: select[1].radius: unknown key" in str(e.value)
    p = write(tmp_path, GOOD.replace("min: 3", "min: lots"))
    with pytest.raises(ConfigError, match=r"flow.yaml:11: select\[0\].min: Input should be a valid number"):
        load_flow(p)


def test_unknown_method_and_missing_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"score\[0\].method: unknown method 'heurstic' \(known: .*heuristic.*\); did you mean 'heuristic'\?"):
        load_flow(write(tmp_path, GOOD.replace("method: heuristic", "method: heurstic")))
    with pytest.raises(ConfigError, match=r"select\[1\] \(kcenter\) needs embeddings"):
        load_flow(write(tmp_path, GOOD.replace("embed:\n  model: all-MiniLM-L6-v2\n", "")))
    with pytest.raises(ConfigError, match="names no scorer of this flow"):
        load_flow(write(tmp_path, GOOD.replace("score: heuristic.response_tokens", "score: ifd.ifd")))
    with pytest.raises(ConfigError, match=r"inputs: List should have at least 1 item"):
        load_flow(write(tmp_path, "name: x\ninputs: []\n"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_flow(write(tmp_path, "name: [x\n"))
    with pytest.raises(ConfigError, match="no such flow file"):
        load_flow(tmp_path / "missing.yaml")


def test_overrides(tmp_path):
    p = write(tmp_path, GOOD)
    spec = load_flow(p, ["select.1.budget=0.25", "seed=7", "runtime.prefect=false", "export.layouts=[messages]"])
    assert spec.select[1].params["budget"] == 0.25 and spec.seed == 7 and spec.runtime.prefect is False
    assert spec.export.layouts == ["messages"]
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_flow(p, ["seed"])
    with pytest.raises(ConfigError, match="no list item 5"):
        load_flow(p, ["select.5.budget=3"])
    with pytest.raises(ConfigError, match=r"select\[1\].budget"):
        load_flow(p, ["select.1.budget=many"])


def test_fingerprint_tracks_content(tmp_path):
    p = write(tmp_path, GOOD)
    # where the run writes and how it runs are not part of what it computes
    assert load_flow(p).fingerprint() == load_flow(p, ["output_dir=elsewhere", "store_dir=other-store", "runtime.torch_threads=1"]).fingerprint()
    assert load_flow(p).fingerprint() != load_flow(p, ["seed=1"]).fingerprint()
