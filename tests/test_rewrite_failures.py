"""A rewrite step's failed calls are never final, and its budget caps hold across runs (issue 20, items 1–3).

- a unit with a failed call is not stored: the next run asks exactly the failed calls again, the rest
  come from the reply cache;
- a step checks ``runtime.max_error_rate``; a unit whose calls all failed (a wrong API key) stops the
  run with a message naming the step, the count and the first error;
- a run killed between units and resumed spends what an uninterrupted run spends (the stored units
  carry what their calls were charged), against a real ``transformers serve``.

The 400 and 401 faults come from tests/lm_server.py, a stand-in server over the real SmolLM2:
``transformers serve`` checks no API key and cannot be told to refuse one request, so the faults a
hosted API produces on its own are injected there; everything else runs against the real server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from lm_server import LocalCompletionsServer

from conftest import write_flow
from curate.config import load_flow
from curate.pipeline import execute

ROWS = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
    {"instruction": "Give a synonym of quick. FLAKY", "input": "", "output": "Fast."},
    {"instruction": "What is the capital of Spain?", "input": "", "output": "Madrid."},
    {"instruction": "Name a planet of the solar system.", "input": "", "output": "Mars."},
    {"instruction": "Say hello in French.", "input": "", "output": "Bonjour."},
]


def reflection_flow(directory: Path, base_url: str, model: str, *, rows: int = 3, max_error_rate: float = 0.01, **step) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rows.json").write_text(json.dumps(ROWS[:rows]))
    step = {"method": "reflection", "mode": "response", "backend": "openai", "base_url": base_url, "model": model, "max_retries": 0,
            "parse_retry": False, "decoding": {"max_tokens": 8}, **step}
    return write_flow(directory, name="failures", inputs=[{"path": "rows.json"}], score=[{"method": "heuristic"}],
                      rewrite={"steps": [step], "select": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0}]},
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                      runtime={"torch_threads": 1, "max_error_rate": max_error_rate})


def units(store: Path) -> list[Path]:
    return sorted(store.glob("rewrites/*/unit-*.json"))


def dispositions(out: Path) -> list[dict]:
    return pq.read_table(out / "rewrite" / "reflection" / "dispositions.parquet").to_pylist()


@pytest.fixture(scope="module")
def smollm2():
    from curate.lm import LMParams, load_backend

    backend = load_backend(LMParams(), torch_threads=1)
    backend.model  # noqa: B018 - load once for the module
    return backend


def test_a_failed_call_is_asked_again_by_the_next_run_and_only_it(smollm2, tmp_path):
    """Row 2's call is refused (HTTP 400) in the first runs: over the error budget the step stops;
    with the budget raised it finishes with that row dropped and its unit not stored; once the server
    answers, the next run sends exactly the failed request again and nothing else."""
    with LocalCompletionsServer(smollm2.model, tokenizer=smollm2.tokenizer, reject="FLAKY") as server:
        flow = reflection_flow(tmp_path, server.base_url, server.model_name)
        with pytest.raises(Exception, match=r"rewrite:reflection: 33\.3% of 3 calls failed, over runtime\.max_error_rate=1\.0% — "
                                            r"1 failed call\(s\); first error: HTTP 400"):
            execute(load_flow(flow))
        failed = [b for b, code in zip(server.bodies, server.statuses) if code == 400]
        assert len(server.bodies) == 3 and len(failed) == 1 and "FLAKY" in json.dumps(failed[0])
        assert units(tmp_path / "store") == []  # the unit with the failed call was not stored
        flow = reflection_flow(tmp_path, server.base_url, server.model_name, max_error_rate=1.0)
        n0 = len(server.bodies)
        s = execute(load_flow(flow))
        assert server.bodies[n0:] == failed  # asked again (still refused); the two answered calls come from the cache
        disp = {d["row"]: d for d in dispositions(Path(s["output_dir"]))}
        assert disp[1]["disposition"] == "dropped" and "HTTP 400" in disp[1]["detail"]
        rewrite = next(st for st in s["stages"] if st["stage"] == "rewrite:reflection")["rewrite"]
        assert rewrite["calls"]["failed"] == 1 and rewrite["units_not_stored"] == 1 and "HTTP 400" in rewrite["calls"]["first_error"]
        assert units(tmp_path / "store") == []

        server.reject = None  # the cause is fixed
        n1 = len(server.bodies)
        s = execute(load_flow(flow))
        assert server.bodies[n1:] == failed  # exactly the failed request, the other two come from the cache
        assert len(units(tmp_path / "store")) == 1
        disp = {d["row"]: d for d in dispositions(Path(s["output_dir"]))}
        assert "HTTP 400" not in (disp[1]["detail"] or "")
        n2 = len(server.bodies)
        execute(load_flow(flow))
        assert len(server.bodies) == n2  # stored: nothing is asked


def test_a_unit_whose_calls_all_fail_stops_the_step_with_the_first_error(smollm2, tmp_path, monkeypatch):
    """A wrong API key (HTTP 401 for every call) stops the run naming the step, the count and the
    error; with the key fixed, the next run asks every call and stores the unit."""
    monkeypatch.setenv("CURATE_TEST_KEY", "sk-wrong")
    with LocalCompletionsServer(smollm2.model, tokenizer=smollm2.tokenizer, api_key="sk-right") as server:
        flow = reflection_flow(tmp_path, server.base_url, server.model_name, api_key_env="CURATE_TEST_KEY", max_error_rate=1.0)
        with pytest.raises(Exception, match=r"rewrite:reflection: every call of unit rows-0-3 failed — 3 failed call\(s\); "
                                            r"first error: HTTP 401"):
            execute(load_flow(flow))
        assert units(tmp_path / "store") == [] and set(server.statuses) == {401}
        monkeypatch.setenv("CURATE_TEST_KEY", "sk-right")
        n0 = len(server.bodies)
        s = execute(load_flow(flow))
        assert server.statuses[n0:] == [200, 200, 200] and len(units(tmp_path / "store")) == 1
        assert {d["reason"] for d in dispositions(Path(s["output_dir"]))}.isdisjoint({"call_failed", "error"})


def _spend(summary: dict) -> dict:
    calls = next(st for st in summary["stages"] if st["stage"] == "rewrite:reflection")["rewrite"]["calls"]
    return {k: calls[k] for k in ("calls", "new_tokens", "prompt_tokens", "refused")}


@pytest.mark.slow
def test_a_run_killed_between_units_resumes_and_spends_what_an_uninterrupted_run_spends(transformers_server, tmp_path):
    """max_calls 3 over 5 one-row units: rows 0–2 are asked, rows 3–4 refused. The same flow killed
    (SIGKILL) after its second unit was stored, then resumed, charges the same 3 calls, refuses the
    same rows and writes the same derived rows — without the stored units' spending it asked 5."""
    kw = dict(rows=5, unit_rows=1, budget={"max_calls": 3})
    server = transformers_server
    whole = execute(load_flow(reflection_flow(tmp_path / "whole", server.base_url, server.model, **kw)))
    spend = _spend(whole)
    assert spend["calls"] == 3 and spend["refused"] == 2

    flow = reflection_flow(tmp_path / "killed", server.base_url, server.model, **kw)
    store = tmp_path / "killed" / "store"
    proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(flow), "--no-prefect", "--quiet"], cwd=tmp_path / "killed",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(units(store)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = len(units(store))
    assert 2 <= stored < 5, f"the kill did not land between units ({stored} of 5 stored)"
    resumed = execute(load_flow(flow))
    assert _spend(resumed) == spend
    calls = next(st for st in resumed["stages"] if st["stage"] == "rewrite:reflection")["rewrite"]["calls"]
    assert calls["carried"] >= 2  # the stored units' calls were counted, not asked again

    def rows(summary):
        out = Path(summary["output_dir"])
        derived = sorted(json.dumps(json.loads(x)) for f in sorted((out / "export").rglob("*.jsonl")) for x in f.read_text().splitlines())
        return [(d["row"], d["disposition"], d["reason"]) for d in dispositions(out)], derived

    assert rows(resumed) == rows(whole)


def test_a_hosted_api_caps_without_a_local_tokenizer_null_content_is_one_rows_error_missing_usage_is_flagged(smollm2, tmp_path):
    """``gpt-4o-mini`` names no tokenizer here (offline: loading one would raise), so a cost cap
    bounds each prompt from its bytes and settles on the server's ``usage``; a reply with
    ``content: null`` is that row's error and the others stand; a reply without ``usage`` is flagged
    and charged its worst case (max_tokens), never zero. The null content and the missing usage are
    the stand-in's canned replies: a real server always sends both."""
    from curate.lm import LMParams, load_backend
    from curate.lm.calls import Budget, Call, CallEngine, Decoding, prompt_token_bound

    canned = {"NULL-ME": None, "NO-USAGE": "A canned reply."}
    questions = ["Say OK.", "NULL-ME: say anything.", "NO-USAGE: say anything.", "Name a fruit."]
    with LocalCompletionsServer(smollm2.model, tokenizer=smollm2.tokenizer, model_name="gpt-4o-mini", canned=canned) as server:
        backend = load_backend(LMParams(backend="openai", base_url=server.base_url, model="gpt-4o-mini", max_retries=0))
        assert not backend.has_local_tokenizer
        budget = Budget(max_cost=1.0, price_input_per_mtok=0.15, price_output_per_mtok=0.6)
        engine = CallEngine(backend, tmp_path, budget)
        calls = [Call([{"role": "user", "content": q}], {"id": "t", "version": "1", "hash": "0"}, Decoding(max_tokens=8)) for q in questions]
        replies = engine.run(calls)
        usage = [json.loads(json.dumps(b)) for b in server.bodies]
    assert len(usage) == 4
    ok, null, no_usage, fruit = replies
    assert null.status == "error" and "content is NoneType" in null.error and null.text is None
    assert ok.status in ("ok", "truncated") and fruit.status in ("ok", "truncated") and no_usage.text == "A canned reply."
    assert no_usage.usage_missing and no_usage.n_tokens == 8 and not ok.usage_missing
    spent = engine.spent
    assert spent.usage_missing == 1 and spent.prompt_tokens_estimated == 4 and spent.failed == 1 and spent.calls == 4
    # answered calls are charged the server's prompt count; the others keep their bound
    bound = [prompt_token_bound(c.messages) for c in calls]
    assert ok.n_prompt_tokens < bound[0] and fruit.n_prompt_tokens < bound[3]
    assert spent.prompt_tokens == ok.n_prompt_tokens + bound[1] + bound[2] + fruit.n_prompt_tokens
    assert spent.new_tokens == ok.n_tokens + 0 + 8 + fruit.n_tokens
    assert spent.cost == pytest.approx(budget.cost(spent.prompt_tokens, spent.new_tokens))
