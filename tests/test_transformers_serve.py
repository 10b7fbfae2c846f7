"""The openai backend against a real OpenAI-compatible server: ``transformers serve
--continuous-batching`` serving the bundled SmolLM2 offline (the ``transformers_server`` fixture in
conftest.py). Checked on the server's own answers: replies, ``usage`` counted (the server's prompt and
completion tokens, not curate's estimate), ``finish_reason: length`` as status ``truncated``, a 4xx
that is that row's error and is not retried, requests in flight together, and the reflection flow
with ``backend: openai`` end to end. Retries on 429/500 use the stand-in server of tests/lm_server.py
(see that test's docstring for why)."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from curate.lm import LMParams, load_backend
from curate.lm.calls import Budget, Call, CallEngine, Decoding

pytestmark = pytest.mark.slow

PROMPT = {"id": "test", "version": "1", "hash": "0" * 12}
#: a reply came back: complete, or cut by max_tokens (status truncated)
ANSWERED = ("ok", "truncated")
INJECTED = '{"error": {"message": "injected HTTP 429 (test)"}}'  # the stand-in's 429 body


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def stand_in_backend(server):
    return load_backend(LMParams(backend="openai", base_url=server.base_url, served_name="local-smollm2", concurrency=1, max_retries=2))


def served(server, **kw):
    """The openai backend pointed at ``transformers serve``; no ``tokenizer`` key, as for a hosted model."""
    return load_backend(LMParams(backend="openai", base_url=server.base_url, served_name=server.model, **kw))


@pytest.fixture(scope="module")
def tokenizer(transformers_server):
    """The served model's own tokenizer (from the directory the server loads), to check the server's counts."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(transformers_server.model)


def test_replies_usage_and_finish_reason_length_is_truncated(transformers_server, tokenizer):
    """The server's ``usage`` is what the engine records and charges (prompt tokens included, although
    the backend has no local tokenizer and bounded them before the call); a reply cut by ``max_tokens``
    (``finish_reason: length``) is ``truncated`` with its text kept; a complete one is ``ok``."""
    from curate.lm.hf import chat_prompt_ids

    questions = ["What is the capital of France?", "Write a long story about a dragon and a knight."]
    calls = [Call(user(questions[0]), PROMPT, Decoding(max_tokens=48)), Call(user(questions[1]), PROMPT, Decoding(max_tokens=3))]
    engine = CallEngine(served(transformers_server), budget=Budget(max_new_tokens_total=1000, max_cost=1.0, price_input_per_mtok=1.0,
                                                                     price_output_per_mtok=2.0))
    complete, cut = engine.run(calls)
    assert (complete.status, complete.finish_reason) == ("ok", "stop") and "Paris" in complete.text, complete
    assert 0 < complete.n_tokens < 48 and not complete.usage_missing
    assert (cut.status, cut.finish_reason, cut.n_tokens) == ("truncated", "length", 3) and cut.text, cut
    for call, reply in zip(calls, (complete, cut)):  # the server's prompt count, the same model's chat template
        assert reply.n_prompt_tokens == len(chat_prompt_ids(tokenizer, call.messages)) and not reply.prompt_tokens_estimated
        assert reply.n_tokens == len(tokenizer(reply.raw, add_special_tokens=False)["input_ids"]) + (reply.finish_reason == "stop")
    s = engine.spent
    assert (s.calls, s.made, s.truncated, s.usage_missing, s.failed, s.prompt_tokens_estimated) == (2, 2, 1, 0, 0, 2)
    assert s.new_tokens == complete.n_tokens + 3 and s.prompt_tokens == complete.n_prompt_tokens + cut.n_prompt_tokens
    assert s.cost == pytest.approx((s.prompt_tokens * 1.0 + s.new_tokens * 2.0) / 1e6)


def test_a_4xx_is_that_rows_error_and_is_asked_again_next_run(transformers_server, tmp_path):
    """A prompt longer than the model's context: the real server answers 400. Not retried (a 4xx is
    the request's fault), that row's error only, not cached; the next run sends only that call."""
    too_long = "word " * 9000  # > SmolLM2's 8192 positions
    calls = [Call(user(q), PROMPT, Decoding(max_tokens=8)) for q in ("Name a fruit.", too_long, "Name a colour.")]
    backend = served(transformers_server, concurrency=3, max_retries=3)
    replies = CallEngine(backend, tmp_path).run(calls)
    assert replies[0].status in ANSWERED and replies[2].status in ANSWERED
    bad = replies[1]
    assert bad.status == "error" and "HTTP 400" in bad.error and "8192" in bad.error and bad.retries == 0, bad
    assert backend.requests_sent == 3  # the 400 was not retried
    again = CallEngine(served(transformers_server), tmp_path)
    assert [r.status for r in again.run(calls)] == [r.status for r in replies]
    assert (again.spent.made, again.spent.cache_hits) == (1, 2)


def test_requests_are_in_flight_together(transformers_server):
    """``concurrency: 8``: the server receives (and logs) several requests before it answers the first
    of them, and every reply comes back with its usage."""
    log = transformers_server.log
    start = len(log.read_text(errors="replace"))
    questions = [f"Name {n} animals." for n in ("two", "three", "four", "five", "six", "seven", "eight", "nine")]
    engine = CallEngine(served(transformers_server, concurrency=8))
    replies = engine.run([Call(user(q), PROMPT, Decoding(max_tokens=24)) for q in questions])
    assert all(r.status in ANSWERED and r.n_tokens > 0 and not r.usage_missing for r in replies), replies
    lines = log.read_text(errors="replace")[start:].splitlines()
    received = [i for i, line in enumerate(lines) if re.search(r"Request \S+: model ", line)]
    answered = [i for i, line in enumerate(lines) if '"POST /v1/chat/completions HTTP/1.1" 200' in line]
    assert len(received) == len(answered) == 8, lines
    in_flight = sum(i < answered[0] for i in received)  # received before the first answer went out
    assert in_flight >= 2, lines


def test_reflection_flow_with_backend_openai_end_to_end(transformers_server, tmp_path):
    """``curate run flows/reflection.yaml`` with the teacher on the real server (the student, which
    scores IFD, stays local): every call the step made was answered by the server (200, usage
    reported), and both ledgers reconcile — each input row and each derived row has one outcome."""
    from typer.testing import CliRunner

    from curate.cli import app

    out, store = tmp_path / "out", tmp_path / "store"
    overrides = [f"output_dir={out}", f"store_dir={store}", "rewrite.steps.0.backend=openai",
                 f"rewrite.steps.0.base_url={transformers_server.base_url}", f"rewrite.steps.0.served_name={transformers_server.model}",
                 "rewrite.steps.0.concurrency=4",
                 "rewrite.steps.0.decoding.max_tokens=32",  # quick: the replies are cut (truncated rows are dropped, not parsed)
                 "runtime.torch_threads=1"]  # the local student: two threads are much slower on shared cores
    args = ["run", str(ROOT / "flows" / "reflection.yaml"), "--no-prefect", "--quiet"]
    for o in overrides:
        args += ["--set", o]
    start = len(transformers_server.log.read_text(errors="replace"))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "run.json").read_text())
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert [x["row"] for x in ledger] == list(range(s["n_input"])) and s["reconciled"]
    assert all(x["outcome"] in ("selected", "not_selected", "filtered", "quarantined") for x in ledger)
    d = s["derived"]
    derived = pq.read_table(out / "derived_ledger.parquet").to_pylist()
    assert d["reconciled"] and [x["row"] for x in derived] == list(range(s["n_input"], s["n_input"] + d["n_derived"]))
    assert all(x["outcome"] in ("selected", "not_selected", "filtered", "quarantined") for x in derived)
    disp = pq.read_table(next((out / "rewrite").rglob("dispositions.parquet"))).to_pylist()
    assert len(disp) == 3 and all(x["disposition"] for x in disp)  # the flow's three rows, each decided
    # the teacher's replies came from the server: one answered request per call the step made
    spent = d["rewrites"]["selective_reflection"]["calls"]
    answered = transformers_server.log.read_text(errors="replace")[start:].count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert spent["made"] == answered > 0 and (spent["failed"], spent["usage_missing"]) == (0, 0), spent
    gens = [json.loads(x["generation"]) for x in pq.read_table(out / "lineage.parquet").to_pylist()]
    assert all((g["backend"], g["model"]) == ("openai", transformers_server.model) for g in gens), gens  # derived rows, if any


def test_429_and_500_are_retried_against_the_stand_in(tmp_path):
    """Why a stand-in here: ``transformers serve`` cannot be made to answer 429 or 500 on demand, so the
    retry path runs against tests/lm_server.py (the same model in-process; ``fail_every``: the first
    attempt of every 2nd distinct request fails with 429, then 500; ``fail_first``: the first N
    requests get 429). Retried replies are complete and record their retries; a call whose retries run
    out is an error, not cached, and the next run asks exactly that call again."""
    from lm_server import LocalCompletionsServer

    hf = load_backend(LMParams(), torch_threads=1)  # one thread: two are much slower on shared cores
    calls = [Call(user(q), PROMPT, Decoding(max_tokens=6)) for q in ("Say hi.", "Name a metal.", "What is 2+2?", "Name a planet.")]
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, fail_every=2) as server:
        backend = stand_in_backend(server)
        replies = CallEngine(backend).run(calls)
        assert sorted(server.statuses) == [200] * 4 + [429, 500]
        assert [r.status in ANSWERED for r in replies] == [True] * 4 and sorted(r.retries for r in replies) == [0, 0, 1, 1]
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, fail_first=3) as server:
        backend = stand_in_backend(server)
        (failed,) = CallEngine(backend, tmp_path).run(calls[:1])  # the first 3 requests: 429, 429, 429
        assert (failed.status, failed.error, failed.retries) == ("error", f"HTTP 429: gave up after 3 attempts: {INJECTED}", 2)
        assert CallEngine(backend, tmp_path).run(calls[1:2])[0].status in ANSWERED  # the 4th: answered and cached
        assert server.statuses == [429, 429, 429, 200]
        again = CallEngine(backend, tmp_path)
        assert [r.status in ANSWERED for r in again.run(calls[:2])] == [True, True]
        assert (again.spent.made, again.spent.cache_hits) == (1, 1) and server.bodies[4]["messages"] == calls[0].messages
