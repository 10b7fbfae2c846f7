"""Judge scorers (methods.md A4–A7, B6): golden values of every formula on fixed numbers, DS2
curation on synthetic ratings with a known noise matrix, and the real SmolLM2 end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.config import IngestSpec, InputSpec, load_flow
from curate.errors import StageError
from curate.pipeline import execute
from curate.prompts import DEITA_COMPLEXITY, DEITA_QUALITY, SELECTIT_LAYOUT, SELECTIT_LINES
from curate.scorers import ScorerContext, scorer_class
from curate.scorers.deita import expected_score
from curate.scorers.ds2 import compress, parse_ds2
from curate.scorers.judge import parse_rating
from curate.scorers.selectit import REFERENCE_WEIGHTS, model_weights, sentence_level, token_level
from curate.select import Pool, selector_class
from curate.select.ds2 import consensus, fit_transition, long_tail, simifeat
from curate.ingest.read import read_input
from conftest import ROOT, write_flow

CTX = ScorerContext(torch_threads=2)


# -- formulas on fixed numbers ------------------------------------------------------------------

def test_deita_expectation_and_trained_strings():
    assert expected_score(np.zeros(6)) == pytest.approx(3.5)
    z = np.array([2.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    w = np.exp(z) / np.exp(z).sum()
    assert expected_score(z) == pytest.approx(float((w * np.arange(1, 7)).sum()), rel=1e-12)
    assert expected_score(z + 100) == pytest.approx(expected_score(z))  # logits or log-probs: same value
    # the trained format, byte for byte (hkust-nlp/deita llama_scorer.py, Apache-2.0)
    q = DEITA_QUALITY.text.format(instruction="word to describe UI with helpful tooltips", output="User-friendly or intuitive UI")
    assert q == ("You are a helpful assistant. Please identify the quality score of the Response corresponding to the Question. \n"
                 " #Question#:\nword to describe UI with helpful tooltips\n#Response#:\nUser-friendly or intuitive UI \n##Quality: ")
    c = DEITA_COMPLEXITY.text.format(instruction="Say hi.")
    assert c.endswith("\n##Query: Say hi.  \n##Complexity: ")


def test_selectit_levels_both_formulas():
    one_hot = np.array([0.0, 0.0, 0.0, 0.8, 0.0])  # full-vocab probabilities; renormalised first
    assert token_level(one_hot, "paper") == (4.0, 1.0, 4.0)
    base, u, s = token_level(one_hot, "reference")  # double softmax flattens: q_max = e / (e + 4)
    q_max = math.e / (math.e + 4)
    assert base == 4.0 and u == pytest.approx((5 * q_max - 1) / 4) and s == pytest.approx(4 * (5 * q_max - 1) / 4)
    assert token_level(np.array([0, 0, 0, 0, 1.0]), "reference")[2] == pytest.approx(1.2789, abs=1e-4)  # S_token max
    uniform = np.full(5, 0.1)
    assert token_level(uniform, "paper") == (1.0, 0.0, 0.0)  # ties: the first maximum
    assert sentence_level([4.0, 4.0, 4.0], 0.2) == 4.0
    assert sentence_level([2.0, 4.0], 0.2) == pytest.approx(3.0 / (1 + 0.2 * 1.0))  # population std = 1
    assert model_weights([7, 13, 70], "paper") == pytest.approx([7 / 90, 13 / 90, 70 / 90])
    assert model_weights([7, 13, 70], "reference") == list(REFERENCE_WEIGHTS) and sum(REFERENCE_WEIGHTS) == pytest.approx(1.7778, abs=1e-4)
    with pytest.raises(ValueError, match="exactly three"):
        model_weights([1, 2], "reference")


def test_ds2_compress_and_parse():
    assert [compress(v) for v in range(1, 11)] == [0, 0, 0, 0, 1, 2, 3, 4, 5, 5]
    text = 'Sure. {"Rarity": 2} and then {"Rarity": 7, "Complexity": 8, "Informativeness": 6, "Overall rating": 9} done'
    assert parse_ds2(text) == {"Rarity": 7, "Complexity": 8, "Informativeness": 6, "Overall rating": 9}  # the last object
    assert parse_ds2('{"Rarity": "high", "Complexity": 8, "Informativeness": 6, "Overall rating": 9}') is None
    assert parse_ds2('{"Rarity": 7, "Complexity": 8, "Informativeness": 6}') is None
    assert parse_ds2("no json at all") is None


def test_judge_parsing_strict_then_one_tolerant_fallback():
    assert parse_rating("4.5\nThe response is accurate.", "first_line", 0, 5) == (4.5, "first_line")
    assert parse_rating("Score: 4\nClear.", "first_line", 0, 5, prefix="Score:") == (4.0, "first_line")  # the cue is ours
    assert parse_rating("Score: 3 because ...", "first_line", 0, 5) == (3.0, "fallback:score")
    assert parse_rating("The answer is fine. **Score:** 2", "first_line", 0, 5) == (2.0, "fallback:score")
    assert parse_rating('{"score": 7, "reason": "cut off by max_tok', "json", 1, 10) == (7.0, "fallback:score")
    # no guesses: a number that is not a declared rating is not taken (A7/E5)
    assert parse_rating("I rate it 4 out of 5", "first_line", 0, 5) == (None, "failed")
    assert parse_rating("1. The response names the capital.", "first_line", 0, 5) == (None, "failed")
    assert parse_rating("Score: 10 out of 10", "first_line", 0, 5) == (None, "failed")  # never clipped into range
    assert parse_rating('{"score": 8, "reason": "ok"}', "json", 1, 10) == (8.0, "json")
    assert parse_rating('{"reason": "good", "rating": 8}', "json", 1, 10) == (None, "failed")
    assert parse_rating("", "json", 1, 10) == (None, "empty")


# -- DS2 curation -------------------------------------------------------------------------------

def synthetic(n_per=350, seed=0, noise=0.25):
    """Six well-separated clusters (true classes) with ratings flipped to a neighbouring class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 32))
    X = np.concatenate([c + 0.15 * rng.normal(size=(n_per, 32)) for c in centres]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    clean = np.repeat(np.arange(6), n_per)
    T = np.zeros((6, 6))
    for a in range(6):
        T[a, a] = 1 - noise
        nbrs = [b for b in (a - 1, a + 1) if 0 <= b < 6]
        for b in nbrs:
            T[a, b] = noise / len(nbrs)
    y = np.array([rng.choice(6, p=T[c]) for c in clean])
    return X, clean, y, T


def test_ds2_recovers_the_noise_matrix_and_corrects_ratings():
    X, clean, y, T = synthetic()
    c1, c2, c3 = consensus(X, y, rounds=20, rng=np.random.default_rng(1))
    T_hat, p_hat = fit_transition(c1, c2, c3, steps=1501, seed=0)
    assert np.abs(T_hat - T).max() < 0.08 and np.abs(p_hat - 1 / 6).max() < 0.05
    cur = simifeat(X, y, T_hat, p_hat, epochs=21, k=10, rng=np.random.default_rng(2))
    before = (y == clean).mean()
    after = (cur.curated == clean).mean()
    assert before < 0.8 and after > before + 0.1  # confidently mis-rated rows are corrected
    assert cur.flagged.sum() > 0 and (cur.confidence[~cur.flagged] == 0).all()


def test_ds2_selection_order_and_long_tail():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(12, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    lt = long_tail(X, k=3)
    assert ((0 <= lt) & (lt <= math.tanh(1))).all()
    classes = np.array([5, 4, 4, 3, 5, 4, 0, 2, 4, np.nan, 1, 4], dtype=float)
    pool = Pool(rows=np.arange(12), ids=[f"r{i}" for i in range(12)], scores={"ds2.class": classes}, orientation={},
                embeddings=X, n_input=12)
    res = selector_class("ds2")("ds2", {"budget": 5, "curate": False, "k": 3}).select(pool)
    chosen = np.flatnonzero(res.keep)
    fours = [1, 2, 5, 8, 11]
    best_fours = sorted(fours, key=lambda i: (-lt[i], i))[:3]
    assert set(chosen) == {0, 4, *best_fours}  # both 5s, then the rarest 4s
    order = np.argsort(res.rank[res.keep])
    assert list(chosen[order][:2]) == sorted([0, 4], key=lambda i: -lt[i]) and list(chosen[order][2:]) == best_fours
    assert res.reason[9] == "unscored" and res.stats["cutoff_class"] == 4
    assert np.allclose(res.columns["long_tail"], lt)


# -- the real SmolLM2 -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    ref = read_input(InputSpec(path="data/sample/cherry_alpaca.jsonl", limit=4), 0, str(ROOT), str(tmp_path_factory.mktemp("j")), IngestSpec())
    return pq.read_table(ref.records_path).to_pylist()


def test_real_rating_scorers_end_to_end(rows, mt_rows):
    deita = scorer_class("deita")("deita", {}, CTX)
    out = deita.score_records(rows + mt_rows)
    for o in out:
        c = o.components
        assert o.status == "ok" and all(1 <= v <= 6 for v in c["complexity_per_turn"] + c["quality_per_turn"])
        assert o.values["evol"] == pytest.approx(sum(a * b for a, b in zip(c["complexity_per_turn"], c["quality_per_turn"])))
        assert all(len(r["quality_logits"]) == 6 for r in c["raw"])
    assert len(out[-1].components["quality_per_turn"]) == 2  # each turn alone, as the reference
    fp = deita.fingerprint()
    assert [p["id"] for p in fp["prompts"]] == ["deita_complexity_chat", "deita_quality_chat"]
    sel = scorer_class("selectit")("selectit", {"n_prompts": 3}, CTX).score_records(rows)
    for o in sel:
        m = o.components["models"][0]
        assert o.status == "ok" and 0 <= o.values["selectit"] <= 5 and len(m["p"]) == 3 and len(m["p"][0]) == 5
        assert all(0 < sum(p) <= 1 for p in m["p"])  # full-vocabulary probabilities of the five digits
    trained = scorer_class("deita")("deita", {"format": "trained"}, CTX)
    assert [p["id"] for p in trained.fingerprint()["prompts"]] == ["deita_complexity_trained", "deita_quality_trained"]
    assert 1 <= trained.score_records(rows[:1])[0].values["quality"] <= 6
    with pytest.raises(ValueError, match="not one token"):  # SmolLM2 splits "10" into two digit tokens
        trained.digit_ids(DEITA_QUALITY, ["9", "10"], chat=False)


@pytest.fixture(scope="module")
def mt_rows(tmp_path_factory):
    from conftest import FIXTURES

    ref = read_input(InputSpec(path=str(FIXTURES / "mt_bench_two_turn.jsonl"), limit=1), 0, str(ROOT), str(tmp_path_factory.mktemp("m")), IngestSpec())
    return pq.read_table(ref.records_path).to_pylist()


def test_generative_judges_store_raw_text(rows):
    judge = scorer_class("llm_rating")("llm_rating", {"max_tokens": 8}, CTX)
    out = judge.score_records(rows)
    assert all(o.raw_output and o.raw_output.startswith("Score:") for o in out)
    assert all((o.status == "ok" and 0 <= o.values["rating"] <= 5) or (o.status == "parse_failed" and math.isnan(o.values["rating"])) for o in out)
    assert any(o.status == "ok" for o in out)
    ds2 = scorer_class("ds2")("ds2", {"answer_prefix": '{"Rarity": ', "max_tokens": 40, "max_attempts": 2}, CTX)
    a = ds2.score_records(rows)
    b = scorer_class("ds2")("ds2", {"answer_prefix": '{"Rarity": ', "max_tokens": 40, "max_attempts": 2}, CTX).score_records(rows[::-1])[::-1]
    assert [x.raw_output for x in a] == [x.raw_output for x in b]  # per-sample seeds: order does not matter
    for o in a:
        if o.status == "ok":
            r = o.components["ratings"]
            assert o.values["class"] == compress(r["Overall rating"]) and parse_ds2(o.raw_output.split("\n---\n")[-1]) == r


def _long(rec: dict, n: int = 150) -> dict:
    """``rec`` with its last reply made ~2,000 tokens long (a real reply repeated)."""
    msgs = [dict(m) for m in rec["messages"]]
    msgs[-1]["content"] = " ".join([msgs[-1]["content"]] * n)[:12000]
    return {**rec, "messages": msgs, "sample_id": rec["sample_id"] + "-long"}


def test_judge_truncates_bodies_by_tokens_and_keeps_the_cue(rows, mt_rows):
    judge = scorer_class("llm_rating")("llm_rating", {"max_length": 256, "max_tokens": 8}, CTX)
    tok = judge.backend().tokenizer
    rec = _long(rows[0])
    fitted = judge.fitted_prompt(rec["messages"])
    text = tok.decode(fitted.ids)
    assert fitted.cut == ["response"] and len(fitted.ids) <= 256 < fitted.n_tokens_in
    instruction = rec["messages"][0]["content"]
    assert fitted.bodies["instruction"] == instruction and len(tok(fitted.bodies["response"])["input_ids"]) >= 32
    assert text.endswith("\n<|im_start|>assistant\nScore:")  # the assistant cue and the answer prefix survive
    assert "rate how accurate and helpful the response is" in text and f"Instruction:\n{instruction}\n\nResponse:\n" in text
    fitted = judge.fitted_prompt(rows[2]["messages"])  # a real row whose response needs a cut at 256 tokens
    out = judge.score_records([rows[2], rows[1]])
    assert fitted.cut == ["response"] and (out[0].n_tokens_in, out[0].n_tokens_used) == (fitted.n_tokens_in, len(fitted.ids))
    assert out[0].status == "truncated_ok" and out[0].components["truncated_fields"] == ["response"] and 0 <= out[0].values["rating"] <= 5
    assert out[1].status == "ok" and out[1].components["truncated_fields"] == [] and out[1].n_tokens_in == out[1].n_tokens_used <= 256
    # multi-turn: the longest message is cut, the closing line stays
    mt = _long(mt_rows[0])
    fitted = judge.fitted_prompt(mt["messages"])
    assert fitted.cut == [f"message_{len(mt['messages']) - 1}"] and len(fitted.ids) <= 256
    assert tok.decode(fitted.ids).endswith("Judge the last assistant response.<|im_end|>\n<|im_start|>assistant\nScore:")
    # a budget the fixed parts and min_body_tokens per text cannot meet: skipped, never sent
    tight = scorer_class("llm_rating")("llm_rating", {"max_length": 120}, CTX).score_records([rec])[0]
    assert tight.status == "skipped_too_long" and math.isnan(tight.values["rating"])


def test_ds2_and_selectit_truncate_bodies_by_tokens(rows):
    rec = _long(rows[1])
    ds2 = scorer_class("ds2")("ds2", {"max_length": 300, "answer_prefix": '{"Rarity": ', "max_tokens": 30, "max_attempts": 1}, CTX)
    fitted = ds2.fitted_prompt(rec["messages"])
    text = ds2.backend().tokenizer.decode(fitted.ids)
    assert fitted.cut == ["message_1"] and len(fitted.ids) <= 300 < fitted.n_tokens_in
    assert text.endswith('"Overall rating": n}<|im_end|>\n<|im_start|>assistant\n{"Rarity": ')  # closing instruction, cue, prefix
    (out,) = ds2.score_records([rec])
    assert out.components["truncated_fields"] == ["message_1"] and out.n_tokens_used == len(fitted.ids)
    assert out.status in ("truncated_ok", "parse_failed")  # a cut never hides behind "ok"
    sel = scorer_class("selectit")("selectit", {"n_prompts": 2, "max_length": 200}, CTX)
    out = sel.score_records([rec, rows[1]])
    assert out[0].status == "truncated_ok" and out[0].components["truncated_fields"] == ["response"] and 0 <= out[0].values["selectit"] <= 5
    assert out[1].status == "ok" and out[1].components["truncated_fields"] == []
    tail = sel.digit_ids(SELECTIT_LAYOUT, ["1", "2", "3", "4", "5"], False, probe={"rating": "r", "instruction": "x", "response": "x"})[1]
    ids, cut = sel.render(SELECTIT_LAYOUT, {"instruction": rec["messages"][0]["content"], "response": rec["messages"][1]["content"]},
                          False, tail=tail, fixed={"rating": SELECTIT_LINES[0].text})
    text = sel.backend().tokenizer.decode(ids)
    assert cut == ["response"] and len(ids) <= 200 and text.startswith(SELECTIT_LINES[0].text) and text.endswith("\nThe answer is: \n")


def test_default_judge_rates_with_the_default_model(rows):
    judge = scorer_class("llm_rating")("llm_rating", {"max_tokens": 16}, CTX)
    assert judge.fingerprint()["answer_prefix"] == "Score:"  # the default cue, part of the key
    hosted = scorer_class("llm_rating")("llm_rating", {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}, CTX)
    assert hosted._setup()[-1] == ""  # a plain OpenAI API cannot continue a reply: no cue by default
    cued = judge.score_records(rows)
    bare = scorer_class("llm_rating")("llm_rating", {"max_tokens": 16, "answer_prefix": "", "constrain": False}, CTX).score_records(rows)
    assert all(o.raw_output.startswith("Score:") for o in cued) and sum(o.status == "ok" for o in cued) >= 2
    assert all(o.status == "parse_failed" for o in bare)  # without the cue SmolLM2 writes prose, not a rating
    # "1. Invest in …" is a list item, not a rating: unrated, never 1.0 (the old first-number guess)
    assert bare[3].raw_output.startswith("1. ") and math.isnan(bare[3].values["rating"])


def test_hf_greedy_batches_equal_one_prompt_at_a_time():
    from curate.lm import LMParams, load_backend
    from curate.lm.hf import chat_prompt_ids, greedy_batches

    assert greedy_batches([5, 9, 9, 3], 20) == [[1, 2], [0, 3]] and greedy_batches([50, 5], 20) == [[0], [1]]
    batched, single = load_backend(LMParams(), 2), load_backend(LMParams(max_tokens_per_batch=1), 2)
    tok = batched.tokenizer
    asks = ["Reply with the single word: yes.", "Name three primary colours.",
            "Explain in two sentences why the sky looks blue during the day and red at sunset.", "What is 12 times 12?"]
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": a}]) for a in asks]
    assert len(greedy_batches([len(p) for p in prompts], batched.token_budget)) == 1  # one left-padded batch
    decoding = {"temperature": 0.0, "max_tokens": 24}
    one, many = single.generate(prompts, decoding), batched.generate(prompts, decoding)
    assert many == one and all(o["status"] == "ok" and o["text"] for o in many)
    assert min(o["n_tokens"] for o in many) < 24 == max(o["n_tokens"] for o in many)  # rows stop at their own EOS
    # a row that raises (a token id outside the vocabulary) fails alone; the others keep their text
    mixed = batched.generate(prompts[:2] + [[10**8]] + prompts[2:], decoding)
    assert mixed[2]["status"] == "error" and mixed[:2] + mixed[3:] == one


def test_unparseable_judge_answer_quarantines_only_its_row(tmp_path):
    from lm_server import LocalCompletionsServer

    from curate.lm import LMParams, load_backend

    backend = load_backend(LMParams(), torch_threads=2)
    rows = [{"instruction": f"Name the capital of country number {i}.", "output": f"The capital is city {i}."} for i in range(5)]
    rows[2]["instruction"] += " MARK-UNPARSEABLE"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with LocalCompletionsServer(backend.model, tokenizer=backend.tokenizer, canned={"MARK-UNPARSEABLE": "I would rather not say."}) as server:
        def flow(max_error_rate):
            return load_flow(write_flow(tmp_path, name="judge", inputs=[{"path": "rows.jsonl"}],
                                        score=[{"method": "llm_rating", "backend": "openai", "server": "vllm", "base_url": server.base_url,
                                                "served_name": "local-smollm2", "max_tokens": 6}],
                                        export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                                        runtime={"prefect": False, "max_error_rate": max_error_rate}))

        with pytest.raises(StageError, match=r"score:llm_rating: \d of 5 rows failed .* parse_failed \d \(\d+\.0%\): the judge's answers"):
            execute(flow(0.01))  # the default budget: an unparseable answer is a failure, not a silent pass
        summary = execute(flow(1.0))  # same store: the scores are not computed again
    ledger = pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()
    wide = pq.read_table(tmp_path / "out" / "select" / "scores.parquet").to_pydict()
    status = dict(zip(wide["row"], wide["llm_rating.status"]))
    assert status[2] == "parse_failed"
    bad = {r["row"]: r for r in ledger if r["outcome"] == "quarantined"}
    assert 2 in bad and bad[2]["stage"] == "score:llm_rating" and bad[2]["reason"] == "ParseError"
    assert set(bad) == {r for r, s in status.items() if s == "parse_failed"}  # only unparseable rows, each its own
    assert summary["counts"]["selected"] == sum(s == "ok" for s in status.values())


def _ref(shard_id: int, statuses: dict[str, int]):
    from curate.manifests import WorkRef

    return WorkRef(stage="score", name="x", key="k", shard_id=shard_id, shard_sha256=f"s{shard_id}", n_rows=sum(statuses.values()),
                   computed_rows=0, statuses=statuses)


def test_error_budget_counts_every_failure_status():
    from curate.pipeline.stage import check_error_budget, status_warnings

    judge_hints = scorer_class("llm_rating").status_hints
    check_error_budget("score:j", [_ref(0, {"ok": 90, "truncated_ok": 9, "parse_failed": 1})], 0.01)  # 1% is within 1%
    refs = [_ref(0, {"ok": 95, "parse_failed": 4, "skipped_too_long": 1}), _ref(1, {"ok": 99, "truncated_ok": 1})]
    with pytest.raises(StageError) as err:
        check_error_budget("score:j", refs, 0.01, judge_hints)
    msg = str(err.value)
    assert msg.startswith("score:j: 5 of 200 rows failed (2.5%), over runtime.max_error_rate=1.0%")
    assert "parse_failed 4 (2.0%): the judge's answers held no rating" in msg and "answer_prefix" in msg
    assert "skipped_too_long 1 (0.5%): the prompt does not fit max_length" in msg
    # deita (A6): a warning per shard where more than 1% of the rows fell back
    shares = scorer_class("deita").status_warn_share
    w = status_warnings([_ref(0, {"ok": 98, "fallback_needed": 2}), _ref(1, {"ok": 99, "fallback_needed": 1})], shares)
    assert len(w) == 1 and w[0].startswith("shard 0: 2 of 100 rows (2.0%) are fallback_needed, over 1% (a rating digit")


def test_ds2_flow_end_to_end(tmp_path, shared_store):
    flow = write_flow(tmp_path, name="ds2", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(shared_store),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 24}],
                      score=[{"method": "ds2", "answer_prefix": '{"Rarity": ', "max_tokens": 40, "max_attempts": 1, "temperature": 0.0}],
                      embed={"model": "all-MiniLM-L6-v2"},
                      select=[{"method": "ds2", "budget": 8, "k": 3, "hoc_rounds": 5, "hoc_steps": 200, "epochs": 5}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                      runtime={"prefect": False, "max_error_rate": 1.0})
    summary = execute(load_flow(flow))
    assert summary["reconciled"]
    wide = pq.read_table(tmp_path / "out" / "select" / "scores.parquet").to_pydict()
    ok = [i for i, s in enumerate(wide["ds2.status"]) if s == "ok"]
    assert summary["counts"]["selected"] == min(8, len(ok))
    for i in ok:
        assert 0 <= wide["ds2.class_curated"][i] <= 5 and 0 <= wide["ds2.long_tail"][i] <= math.tanh(1)
    step = summary["steps"][0]
    assert step["method"] == "ds2" and len(step["classes_before"]) == 6


def test_collapse_detectors():
    import pyarrow as pa

    from curate.stages.score import collapse_warnings

    def table(variant, values):
        return pa.table({"sample_id": [f"s{i}" for i in range(len(values))], "variant": [variant] * len(values), "score": values})

    deita = scorer_class("deita")("deita", {}, CTX)
    w = collapse_warnings(deita, "deita", 0, table("quality", [3.0] * 30 + [2.0] * 5))
    assert w == ["shard 0: deita.quality = 3 for 86% of 35 rows (collapsed?)"]
    w = collapse_warnings(deita, "deita", 1, table("quality", list(3.0 + np.linspace(0, 0.02, 30))))
    assert len(w) == 1 and "spread (std 0.0060) is below 0.05" in w[0]
    assert collapse_warnings(deita, "deita", 0, table("quality", list(np.linspace(1, 6, 40)))) == []
    ifd = scorer_class("ifd")("ifd", {}, CTX)
    w = collapse_warnings(ifd, "ifd", 3, table("ifd", list(np.linspace(0.9, 1.4, 40))))
    assert w == ["shard 3: 80% of ifd.ifd are ≥ 1 — does the model know this template?"]
    assert collapse_warnings(ifd, "ifd", 0, table("ifd", [1.2] * 10)) == []  # too few rows to judge
    heuristic = scorer_class("heuristic")("heuristic", {}, CTX)
    assert collapse_warnings(heuristic, "heuristic", 0, table("turns", [1.0] * 40)) == []  # statistics, not judgments
