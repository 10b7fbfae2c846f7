"""The LLM call engine (curate.lm.calls) on the real SmolLM2: reply cache, resume after a SIGKILL in
the middle of generation, budget caps, stop strings, and a local OpenAI-compatible stand-in server
that answers 429, 500 and 400 (tests/lm_server.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lm_server import OPENAI_CHAT_FIELDS, LocalCompletionsServer

from conftest import ROOT, write_flow
from curate.lm import LMParams, load_backend
from curate.lm.calls import Budget, Call, CallEngine, Decoding
from curate.lm.hf import chat_prompt_ids
from curate.rewrite.llm import LLMRewriter

PROMPT = {"id": "test", "version": "1", "hash": "0" * 12}
#: a reply came back: complete, or cut by max_tokens (status truncated: kept, never parsed as complete)
ANSWERED = ("ok", "truncated")
QUESTIONS = [
    "Reply with one word: yes or no. Is water wet?", "Say OK.", "List three colors, one per line.", "What is 2+2?",
    "Name a fruit.", "Reply with one word: yes or no. Is the sun cold?", "Give one synonym of 'happy'.", "What colour is the sky?",
    "Name a planet.", "Translate 'hello' into French.", "List two animals, one per line.", "What is the capital of Italy?",
    "Name a musical instrument.", "Reply with a number: how many legs has a cat?", "Name a day of the week.", "Say hi.",
    "Name a metal.", "What is 3+5?",
]


@pytest.fixture(scope="module")
def hf():
    backend = load_backend(LMParams(), torch_threads=1)
    backend.model  # load once for the module
    return backend


def calls_of(questions, decoding: Decoding, attempt: int = 0, seed: int | None = None) -> list[Call]:
    return [Call([{"role": "user", "content": q}], PROMPT, decoding, seed, attempt) for q in questions]


def cached(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.json"))


def api(server, kind: str = "openai", **kw):
    return load_backend(LMParams(backend="openai", base_url=server.base_url, served_name="local-smollm2", server=kind, **kw))


def question_of(body: dict) -> str:
    return body["messages"][-1]["content"]


# -- cache ----------------------------------------------------------------------------------------
def test_a_second_run_is_read_from_the_cache_and_a_retry_is_its_own_call(hf, tmp_path):
    calls = calls_of(QUESTIONS[:4], Decoding(max_tokens=6))
    first = CallEngine(hf, tmp_path)
    r1 = first.run(calls)
    assert statuses(r1) == ["answered"] * 4 and first.spent.made == 4 and first.spent.cache_hits == 0
    assert len(cached(tmp_path)) == 4
    second = CallEngine(hf, tmp_path)
    r2 = second.run(calls)
    assert second.spent.made == 0 and second.spent.cache_hits == 4 and all(r.cached for r in r2)
    assert [r.text for r in r2] == [r.text for r in r1] and [r.n_tokens for r in r2] == [r.n_tokens for r in r1]
    (retry,) = second.run(calls_of(QUESTIONS[:1], Decoding(max_tokens=6), attempt=1))  # a deliberate retry is made again
    assert second.spent.made == 1 and not retry.cached and retry.key != r1[0].key and retry.text == r1[0].text
    (other,) = second.run(calls_of(QUESTIONS[:1], Decoding(max_tokens=5)))  # other decoding, other entry
    assert second.spent.made == 2 and other.key not in {r.key for r in r1}
    assert len(cached(tmp_path)) == 6


# -- resume after a kill --------------------------------------------------------------------------
CLIENT = """
import json, sys
from curate.lm import LMParams, load_backend
from curate.lm.calls import Call, CallEngine, Decoding
cache, questions, params = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
engine = CallEngine(load_backend(LMParams(**params), torch_threads=1), cache, flush_every=3)
decoding = Decoding(max_tokens=12)
engine.run([Call([{"role": "user", "content": q}], {"id": "test", "version": "1", "hash": "0" * 12}, decoding) for q in questions])
"""


def run_and_kill(cache: Path, params: dict, at_least: int) -> int:
    """Run all QUESTIONS through the engine in a subprocess (chunks of 3 calls), SIGKILL it once
    ``at_least`` replies are cached; the number of replies cached when it died."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(cache), json.dumps(QUESTIONS), json.dumps(params)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while len(cached(cache)) < at_least:
        assert proc.poll() is None, f"the client ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no reply cached within 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return len(cached(cache))


def test_resume_after_a_kill_in_the_middle_of_generation_repeats_no_call(hf, tmp_path):
    """hf backend: a subprocess generates in chunks and is killed; the rerun makes exactly the calls
    that were not cached, and its texts equal an uninterrupted run's."""
    cache = tmp_path / "calls"
    before = run_and_kill(cache, {}, at_least=3)
    assert 3 <= before < len(QUESTIONS)  # killed in the middle
    calls = calls_of(QUESTIONS, Decoding(max_tokens=12))
    rerun = CallEngine(hf, cache, flush_every=3)
    replies = rerun.run(calls)
    assert rerun.spent.made == len(QUESTIONS) - before and rerun.spent.cache_hits == before
    assert sum(r.cached for r in replies) == before and all(r.status in ANSWERED for r in replies)
    assert len(cached(cache)) == len(QUESTIONS)
    whole = CallEngine(hf).run(calls)  # no cache: an uninterrupted run
    assert [r.text for r in replies] == [r.text for r in whole]


def test_resume_over_the_server_sends_only_the_requests_not_cached(hf, tmp_path):
    """openai backend: the server's request log shows the rerun sends exactly the calls whose
    replies the killed client had not cached, each once."""
    cache = tmp_path / "calls"
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer) as server:
        params = {"backend": "openai", "base_url": server.base_url, "served_name": "local-smollm2", "concurrency": 2}
        before = run_and_kill(cache, params, at_least=3)
        assert 3 <= before < len(QUESTIONS)
        done = {json.loads(p.read_text())["key"] for p in cached(cache)}
        time.sleep(0.5)  # let the server finish the dead client's request in flight
        n0 = len(server.bodies)
        engine = CallEngine(api(server, concurrency=2), cache, flush_every=3)
        calls = calls_of(QUESTIONS, Decoding(max_tokens=12))
        replies = engine.run(calls)
        sent = [question_of(b) for b in server.bodies[n0:]]
    assert all(r.status in ANSWERED for r in replies)
    assert engine.spent.made == len(sent) == len(QUESTIONS) - before and len(set(sent)) == len(sent)
    assert set(sent) == {q for q, c in zip(QUESTIONS, calls) if engine.key(c) not in done}
    assert len(cached(cache)) == len(QUESTIONS)


# -- budget caps ----------------------------------------------------------------------------------
def statuses(replies) -> list[str]:
    """Each reply's status, with a reply cut by max_tokens (these tests keep replies short) counted as answered."""
    return ["answered" if r.status in ANSWERED else r.status for r in replies]


def test_max_calls_stops_exactly_and_refused_calls_are_never_sent(hf):
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer) as server:
        engine = CallEngine(api(server), budget=Budget(max_calls=3))
        replies = engine.run(calls_of(QUESTIONS[:6], Decoding(max_tokens=4)))
        assert statuses(replies) == ["answered"] * 3 + ["budget_exhausted"] * 3
        assert len(server.bodies) == 3 and {question_of(b) for b in server.bodies} == set(QUESTIONS[:3])
        assert engine.spent.calls == engine.spent.made == 3 and engine.spent.refused == 3
        assert statuses(engine.run(calls_of(QUESTIONS[6:8], Decoding(max_tokens=4)))) == ["budget_exhausted"] * 2
        assert len(server.bodies) == 3


def test_max_new_tokens_total_reserves_max_tokens(hf):
    engine = CallEngine(hf, budget=Budget(max_new_tokens_total=30))
    replies = engine.run(calls_of(QUESTIONS[:5], Decoding(max_tokens=12)))
    assert statuses(replies) == ["answered"] * 2 + ["budget_exhausted"] * 3  # 2 × 12 ≤ 30 < 3 × 12
    assert engine.spent.made == 2 and engine.spent.new_tokens == sum(r.n_tokens for r in replies[:2]) <= 30


def test_max_cost_counts_prompt_and_new_tokens_at_their_prices(hf):
    budget = Budget(price_input_per_mtok=1_000, price_output_per_mtok=10_000)  # 0.001 and 0.01 per token
    calls = calls_of(QUESTIONS[:6], Decoding(max_tokens=8))
    worst = [(len(chat_prompt_ids(hf.tokenizer, c.messages)) * 1_000 + 8 * 10_000) / 1e6 for c in calls]
    cap = sum(worst[:3]) + worst[3] / 2  # room for three calls and half of the fourth
    engine = CallEngine(hf, budget=budget.model_copy(update={"max_cost": cap}))
    replies = engine.run(calls)
    assert statuses(replies) == ["answered"] * 3 + ["budget_exhausted"] * 3
    assert engine.spent.made == 3 and 0 < engine.spent.cost <= cap
    assert engine.spent.prompt_tokens == sum(len(chat_prompt_ids(hf.tokenizer, c.messages)) for c in calls[:3])


def test_a_resumed_run_stops_at_the_same_call(hf, tmp_path):
    """Short answers end before max_tokens: cached replies used fewer tokens than reserved, yet a
    resumed run admits exactly the calls an uninterrupted one does."""
    decoding = Decoding(max_tokens=24)
    calls = calls_of(QUESTIONS[:8], decoding)
    cap = Budget(max_new_tokens_total=3 * 24)
    whole = CallEngine(hf, budget=cap).run(calls)
    assert statuses(whole) == ["answered"] * 3 + ["budget_exhausted"] * 5
    assert sum(r.n_tokens for r in whole[:2]) < 2 * 24  # the cached part used less than it reserved
    CallEngine(hf, tmp_path, budget=cap).run(calls[:2])  # the killed run got this far
    resumed = CallEngine(hf, tmp_path, budget=cap)
    replies = resumed.run(calls)
    assert statuses(replies) == statuses(whole) and [r.text for r in replies] == [r.text for r in whole]
    assert resumed.spent.cache_hits == 2 and resumed.spent.made == 1
    capped = CallEngine(hf, tmp_path, budget=Budget(max_calls=1))  # a lower cap refuses cached replies too
    assert statuses(capped.run(calls[:3])) == ["answered", "budget_exhausted", "budget_exhausted"] and capped.spent.made == 0


# -- stop strings and the hosted-API server kind --------------------------------------------------
def test_stop_strings_cut_the_text_the_same_on_hf_and_over_the_server(hf):
    questions = ["List three colors, one per line.", "List two animals, one per line.", "Name a fruit.", "Write two short lines about the sea."]
    decoding = Decoding(max_tokens=16, stop=("\n",))
    local = CallEngine(hf).run(calls_of(questions, decoding))
    assert all(r.status in ANSWERED and "\n" not in r.text for r in local)
    assert sum(r.raw != r.text for r in local) >= 2  # the stop string did cut some replies
    for r in local:
        assert r.raw.startswith(r.text) and (r.raw == r.text or r.raw[len(r.text):].startswith("\n"))
    # a stop string that straddles the end of the prompt ("assistant\n" + "The …") ends nothing:
    # only the new text counts, as on an API
    straddle = calls_of(["What is 2+2?"], Decoding(max_tokens=12, stop=("\nThe",)))
    (local_straddle,) = CallEngine(hf).run(straddle)
    assert local_straddle.text.startswith("The ") and local_straddle.n_tokens == 12
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, strict=True) as server:  # 400 for any non-OpenAI field
        (remote_straddle,) = CallEngine(api(server, "openai")).run(straddle)
        assert remote_straddle.text == local_straddle.text
        del server.bodies[:]
        remote = CallEngine(api(server, "openai")).run(calls_of(questions, decoding))
        sampled = CallEngine(api(server, "openai")).run(calls_of(questions[:1], Decoding(temperature=0.7, top_p=0.9, max_tokens=4), seed=5))
        bodies = list(server.bodies)
    assert [r.text for r in remote] == [r.text for r in local]
    assert sampled[0].status in ANSWERED
    assert all(set(b) <= OPENAI_CHAT_FIELDS for b in bodies) and all(b["stop"] == ["\n"] for b in bodies[:-1])
    assert bodies[-1]["seed"] == 5 and bodies[-1]["temperature"] == 0.7 and "top_k" not in bodies[-1]


# -- a server that fails ---------------------------------------------------------------------------
def test_429_and_500_are_retried_and_nothing_is_lost_a_400_is_that_rows_error(hf, tmp_path):
    questions = QUESTIONS[:9] + ["REJECT-THIS question, please."]
    calls = calls_of(questions, Decoding(max_tokens=8))
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, fail_every=3, reject="REJECT-THIS") as server:
        engine = CallEngine(api(server, concurrency=4, max_retries=3), tmp_path)
        replies = engine.run(calls)
        log = list(zip((question_of(b) for b in server.bodies), server.statuses))
        failed = {q for q, code in log if code in (429, 500)}
        assert {code for _, code in log} == {200, 429, 500, 400} and len(failed) == 3  # every 3rd of 9 distinct requests
        for q, r in zip(questions[:9], replies):
            codes = [c for qq, c in log if qq == q]
            assert r.status in ANSWERED and r.retries == len(codes) - 1
            assert codes == ([codes[0], 200] if q in failed else [200]) and codes[0] in (200, 429, 500)
        bad = replies[-1]
        assert bad.status == "error" and "HTTP 400" in bad.error and bad.retries == 0
        assert [c for q, c in log if q == questions[-1]] == [400]  # not retried
        assert len(cached(tmp_path)) == 9  # the failed call is not cached
        n0 = len(server.bodies)
        again = CallEngine(api(server), tmp_path)
        assert statuses(again.run(calls)) == statuses(replies) and again.spent.made == 1  # only the failed call is tried again
        assert [question_of(b) for b in server.bodies[n0:]] == [questions[-1]]
    reference = CallEngine(hf).run(calls[:9])  # nothing garbled: the same texts as the local model's
    assert [r.text for r in replies[:9]] == [r.text for r in reference]


# -- curate plan ---------------------------------------------------------------------------------
class TinyLLM(LLMRewriter):
    """A stand-in LLM rewriter for the plan: two calls per row at most."""

    method = "tiny_llm"

    def plan_calls(self, n_records: int) -> int:
        return 2 * n_records


def test_plan_shows_the_most_model_calls_of_an_llm_rewrite_step(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from curate.cli import app
    from curate.rewrite import REWRITERS

    monkeypatch.setitem(REWRITERS.targets, "tiny_llm", "test_calls:TinyLLM")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n"
                                                 for w in ("one", "two", "three", "four", "five")))
    flow = write_flow(tmp_path, inputs=[{"path": "rows.jsonl"}], rewrite={"steps": [{"method": "tiny_llm", "budget": {"max_calls": 4}}]})
    runner = CliRunner()
    r = runner.invoke(app, ["plan", str(flow), "--json", "--no-warmup"])
    assert r.exit_code == 0, r.output
    (row,) = [s for s in json.loads(r.output)["stages"] if s.get("what") == "tiny_llm"]
    assert row["max_calls"] == 4  # 2 per row over 5 rows, capped by the budget
    r = runner.invoke(app, ["plan", str(flow), "--no-warmup"])
    assert r.exit_code == 0, r.output
    assert "at most 4 model calls (budget max_calls 4; 10 over all 5 input rows)" in r.output


def test_the_stand_in_server_batches_requests_that_arrive_together(hf):
    """Dynamic batching (used by bench/generation.py): 4 requests in flight are generated in one call,
    with the texts the hf backend gives."""
    calls = calls_of(QUESTIONS[:4], Decoding(max_tokens=6))
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, max_batch=4, batch_window_s=0.2) as server:  # a wide window: robust under load
        remote = CallEngine(api(server, concurrency=4)).run(calls)
        sequential = CallEngine(api(server, concurrency=1)).run(calls)
        assert server.batches == [4, 1, 1, 1, 1]
    assert [r.text for r in remote] == [r.text for r in sequential] == [r.text for r in CallEngine(hf).run(calls)]


def test_a_two_replica_stand_in_server_shares_concurrent_requests_and_answers_as_one_replica(hf):
    """Replicas (used by bench/generation.py): 8 requests in flight against 2 replicas batching at most 4
    rows each are generated by both, with the texts one replica and the hf backend give."""
    calls = calls_of(QUESTIONS[:8], Decoding(max_tokens=6))
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, max_batch=4, batch_window_s=0.2) as one:
        single = CallEngine(api(one, concurrency=8)).run(calls)
        assert one.batch_replicas and set(one.batch_replicas) == {0}
    with LocalCompletionsServer(hf.model, tokenizer=hf.tokenizer, max_batch=4, batch_window_s=0.2, replicas=2) as server:
        assert len(server.replicas) == 2 and server.replicas[0] is hf.model and server.replicas[1] is not hf.model
        remote = CallEngine(api(server, concurrency=8)).run(calls)
        assert statuses(remote) == ["answered"] * 8
        assert sum(server.batches) == 8 and max(server.batches) <= 4  # no request generated twice, no batch over max_batch
        assert set(server.batch_replicas) == {0, 1}, (server.batches, server.batch_replicas)  # both replicas served requests
    assert [r.text for r in remote] == [r.text for r in single] == [r.text for r in CallEngine(hf).run(calls)]


def test_plan_shows_the_most_calls_of_the_reflection_step(tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app
    from curate.rewrite import rewriter_class

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("one", "two", "three")))
    flow = write_flow(tmp_path, inputs=[{"path": "rows.jsonl"}], rewrite={"steps": [{"method": "reflection"}]})
    r = CliRunner().invoke(app, ["plan", str(flow), "--json", "--no-warmup"])
    assert r.exit_code == 0, r.output
    (row,) = [s for s in json.loads(r.output)["stages"] if s.get("what") == "reflection"]
    assert row["max_calls"] == rewriter_class("reflection")("reflection").plan_calls(3) > 0
