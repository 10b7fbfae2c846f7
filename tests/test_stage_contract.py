"""The stage contract: a stage reads only names an earlier stage writes, and the run refuses any
name a stage does not declare (issue 23: stages read only what they declare)."""

from __future__ import annotations

import pytest

from conftest import copy_sample, write_flow
from curate.config import load_flow
from curate.executors import LocalExecutor
from curate.pipeline import Run, build_stages
from curate.pipeline.stage import UndeclaredOutput


def _spec(tmp_path, **over):
    copy_sample(tmp_path, "alpaca_gpt4_en.json")
    spec = dict(name="contract", inputs=[{"path": "alpaca_gpt4_en.json", "limit": 5}], score=[{"method": "heuristic"}],
                embed={"model": "all-MiniLM-L6-v2"}, select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 3}],
                rewrite={"steps": [{"method": "mosaic"}], "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0}]})
    spec.update(over)
    return load_flow(write_flow(tmp_path, **spec))


@pytest.mark.parametrize("rewrite", [True, False])
def test_every_read_is_written_by_an_earlier_stage(tmp_path, rewrite):
    spec = _spec(tmp_path) if rewrite else _spec(tmp_path, rewrite=None)
    written = {"inputs"}  # the flow's own inputs
    for stage in build_stages(spec):
        missing = [name for name in stage.reads if name not in written]
        assert not missing, f"{stage.name} reads {missing}, which no earlier stage writes"
        written.update(stage.writes)
    by = {s.name: s for s in build_stages(spec)}
    if rewrite:
        assert by["ledger"].reads == ("input", "select", "select-2", "mosaic")
        assert by["export"].reads == ("select-2", "ledger", "input")
    else:
        assert by["export"].reads == ("select", "ledger", "input")


def test_the_run_refuses_undeclared_names(tmp_path):
    spec = _spec(tmp_path)
    stages = {s.name: s for s in build_stages(spec)}
    run = Run(spec=spec, executor=LocalExecutor())
    run.write(stages["ingest"], "input", object())
    with pytest.raises(UndeclaredOutput, match="ingest writes 'select'"):
        run.write(stages["ingest"], "select", object())
    with pytest.raises(UndeclaredOutput, match="rewrite:mosaic reads 'input'"):
        run.read(stages["rewrite:mosaic"], "input")
    with pytest.raises(UndeclaredOutput, match="export reads the record set 'mosaic'"):
        run.records(stages["export"], "mosaic")
    assert run.read(stages["select"], "input") is run.outputs["input"]
