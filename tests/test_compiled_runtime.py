"""``runtime: openvino``: the hf backend's scoring forward exported once and compiled by OpenVINO (curate/lm/compiled.py,
``CompiledCE`` in curate/lm/engine.py). Its numbers are torch fp32's within 1e-4 (relative) on real rows, statuses and
token counts identical; ``runtime: auto`` (the loss scorers' default) picks it on a CPU where it is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.config import IngestSpec, InputSpec, StepSpec
from curate.errors import CurateError
from curate.ingest.read import read_input
from curate.lm import LMParams, load_backend
from curate.lm.base import openvino_installed
from curate.lm.engine import CompiledCE, MaskedCE, Seq
from curate.scorers import ScorerContext, scorer_class

#: the tests that run OpenVINO (the others check what happens with and without it)
needs_openvino = pytest.mark.skipif(not openvino_installed(), reason="runtime: openvino needs the cpu-fast extra: "
                                    "pip install 'curate[cpu-fast]'")

ROOT = Path(__file__).resolve().parents[1]
CTX = ScorerContext(torch_threads=2)


@pytest.fixture(scope="module")
def cherry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cherry")
    ref = read_input(InputSpec(path=str(ROOT / "data/sample/cherry_alpaca.jsonl"), limit=6), 0, str(ROOT), str(tmp), IngestSpec())
    return pq.read_table(ref.records_path).to_pylist()


def scorer(method, **params):
    return scorer_class(method)(method, {"device": "cpu", "max_length": 128, **params}, CTX)


@needs_openvino
@pytest.mark.parametrize("method", ["ifd", "superfiltering"])
def test_openvino_scores_like_torch_fp32(cherry, method):
    """Both loss passes of every row within 1e-4 (relative) of the torch engine in fp32, the same statuses and token
    counts; the store key names the runtime (torch's keys are unchanged)."""
    torch_sc, ov_sc = scorer(method, runtime="torch", dtype="float32"), scorer(method, runtime="openvino")
    ref, got = torch_sc.score_records(cherry), ov_sc.score_records(cherry)
    assert [o.status for o in got] == [o.status for o in ref]
    for a, b in zip(ref, got):
        for k, v in a.values.items():
            if isinstance(v, float) and np.isfinite(v):
                assert b.values[k] == pytest.approx(v, rel=1e-4), k
            elif isinstance(v, int):
                assert b.values[k] == v, k
    assert isinstance(ov_sc.backend.engine(), CompiledCE)
    assert ov_sc.fingerprint()["runtime"] == "openvino" and ov_sc.fingerprint()["dtype"] == "float32"
    assert "runtime" not in torch_sc.fingerprint() and ov_sc.key != torch_sc.key


@needs_openvino
def test_token_logprobs_and_batchings_agree(cherry):
    """Per-token log-probabilities equal torch's within 1e-4; a smaller batch budget (other batches, other padding) gives
    the same sums within 1e-5."""
    torch_b = load_backend(LMParams(device="cpu", runtime="torch"), torch_threads=2)
    ov_b = load_backend(LMParams(device="cpu", runtime="openvino"), torch_threads=2)
    tok = torch_b.tokenizer
    seqs = []
    for row in cherry:
        prompt = tok(row["messages"][0]["content"])["input_ids"]
        reply = tok(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"][:60]
        seqs.append(Seq(prompt + reply, [(1, len(prompt)), (len(prompt), len(prompt) + len(reply))]))
    assert isinstance(ov_b.engine(), CompiledCE) and not isinstance(torch_b.engine(), CompiledCE)
    ref = torch_b.score(seqs, token_logprobs=True)
    got = ov_b.score(seqs, token_logprobs=True)
    for a, b in zip(ref, got):
        assert b.status == "ok" and b.n == a.n
        np.testing.assert_allclose(b.nll, a.nll, rtol=1e-4)
        for x, y in zip(a.token_logprobs, b.token_logprobs):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)
    small = load_backend(LMParams(device="cpu", runtime="openvino", max_tokens_per_batch=96), torch_threads=2)
    again = small.score(seqs)
    assert small.last_plan.batches > ov_b.last_plan.batches
    for a, b in zip(got, again):
        np.testing.assert_allclose(b.nll, a.nll, rtol=1e-5)


@needs_openvino
def test_next_token_like_torch():
    """The rating-token path (deita, SelectIT): the candidates' logits and the log-sum-exp after each prompt (prompts of
    different lengths in one batch) within 1e-4 of torch's."""
    torch_b = load_backend(LMParams(device="cpu", runtime="torch"), torch_threads=2)
    ov_b = load_backend(LMParams(device="cpu", runtime="openvino"), torch_threads=2)
    tok = torch_b.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("Rate the answer from 1 to 6. Score:", "How good is this reply about the weather in "
                                             "Paris today, on a scale of 1 to 6? Score:", "Hi")]
    cand = [tok(str(i), add_special_tokens=False)["input_ids"][0] for i in range(1, 7)]
    assert isinstance(ov_b.engine(), CompiledCE)
    for a, b in zip(torch_b.next_token(prompts, cand), ov_b.next_token(prompts, cand)):
        assert b.status == "ok"
        np.testing.assert_allclose(b.logits, a.logits, rtol=1e-4, atol=1e-4)
        assert b.lse == pytest.approx(a.lse, rel=1e-5)
        np.testing.assert_allclose(b.probs, a.probs, rtol=1e-3, atol=1e-7)


@needs_openvino
def test_a_bad_token_id_fails_its_row_only():
    """A token id outside the vocabulary (OpenVINO's lookup would not check it) fails that row with IndexError, as torch
    does; the other row in the batch is scored."""
    ov_b = load_backend(LMParams(device="cpu", runtime="openvino"), torch_threads=2)
    out = ov_b.score([Seq([1, 2, 3, 4, 5], [(2, 5)]), Seq([1, 10**6, 3, 4, 5], [(3, 5)])])
    assert out[0].status == "ok" and np.isfinite(out[0].nll[0]) and out[0].n == [3]
    assert out[1].status == "error" and out[1].error_class == "IndexError" and np.isnan(out[1].nll[0])


@needs_openvino
def test_sliding_window_model_matches_torch(tmp_path, monkeypatch):
    """A (small, random) Gemma-3 with sliding-window layers of 8 tokens, a soft-capped head and right-padded batches
    narrower and wider than the window: the compiled graph's log-probabilities equal the torch engine's. The export is
    made once: a second request for it does not load the model."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from curate.lm.compiled import CompiledGraph, graph_folder
    from curate.lm.engine import CompiledCE

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32, sliding_window=8, max_position_embeddings=256,
                           final_logit_softcapping=30.0,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    folder = graph_folder("tiny-gemma3", "random-0", lambda: model)

    def refuse():
        raise AssertionError("exported twice")

    assert graph_folder("tiny-gemma3", "random-0", refuse) == folder
    compiled = CompiledCE(CompiledGraph(folder, threads=2), pad_id=0, max_tokens_per_batch=256)
    reference = MaskedCE.for_model(model, 0, "cpu", 256)
    rng = np.random.default_rng(0)
    seqs = [Seq(rng.integers(0, 300, n).tolist(), [(1, n)]) for n in (2, 7, 40, 100, 23)]
    ref, got = reference.score(seqs, token_logprobs=True), compiled.score(seqs, token_logprobs=True)
    for a, b in zip(ref, got):
        assert b.status == "ok"
        np.testing.assert_allclose(b.token_logprobs[0], a.token_logprobs[0], rtol=1e-4, atol=1e-5)


def test_runtime_auto_follows_what_is_installed(monkeypatch):
    """``runtime: auto`` is openvino on a CPU where it is installed (dtype float32, keyed with the runtime), torch where it
    is not (dtype auto resolved as before, the key of an explicit ``runtime: torch``), torch with a dtype OpenVINO does not
    run; each choice says why."""
    from curate.lm import base

    monkeypatch.setattr(base, "openvino_installed", lambda: True)
    auto = scorer("superfiltering")
    fp = auto.fingerprint()
    assert fp["runtime"] == "openvino" and fp["dtype"] == "float32" and "openvino installed" in fp["dtype_reason"]
    assert auto.key == scorer("superfiltering", runtime="openvino", dtype="float32").key
    bf16 = scorer("superfiltering", dtype="bfloat16").fingerprint()
    assert "runtime" not in bf16 and bf16["dtype"] == "bfloat16" and "dtype bfloat16 runs in torch" in bf16["dtype_reason"]
    monkeypatch.setattr(base, "openvino_installed", lambda: False)
    absent = scorer("superfiltering")
    assert "runtime" not in absent.fingerprint() and "openvino is not installed" in absent.fingerprint()["dtype_reason"]
    assert absent.key == scorer("superfiltering", runtime="torch").key
    with pytest.raises(CurateError, match=r"pip install 'curate\[cpu-fast\]'"):
        scorer("superfiltering", runtime="openvino").key


def test_refused_combinations():
    """openvino runs the fp32 model on the CPU in the hf backend: other dtypes, devices and backends are refused when the
    flow is read."""
    for bad in ({"dtype": "bfloat16"}, {"dtype": "bf16-matmul"}, {"device": "cuda"}, {"backend": "vllm"}):
        with pytest.raises(Exception, match="runtime: openvino"):
            LMParams(runtime="openvino", **bad)
    assert LMParams(runtime="auto", backend="openai").runtime == "auto"  # auto leaves the other backends as they are


@needs_openvino
def test_a_model_the_graph_cannot_run_fails_the_step_at_once(tmp_path, monkeypatch):
    """A model the traced graph would get wrong (a small random Llama with dynamic RoPE scaling, saved to a folder) fails
    every row with a message naming ``runtime: torch``, and the export is not tried again for the next batch (the
    first failure is kept: the second call takes no export time)."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny-dynamic")
    load_backend(LMParams()).tokenizer.save_pretrained(tmp_path / "tiny-dynamic")  # the bundled model's (ids below 128 here)
    backend = load_backend(LMParams(model=str(tmp_path / "tiny-dynamic"), runtime="openvino", device="cpu"), torch_threads=2)
    seqs = [Seq([1, 2, 3, 4], [(1, 4)]), Seq([5, 6, 7], [(2, 3)])]
    with pytest.raises(CurateError, match="dynamic RoPE.*runtime: torch"):
        backend.score(seqs)
    t = time.perf_counter()
    with pytest.raises(CurateError, match="dynamic RoPE"):
        backend.score(seqs)
    assert time.perf_counter() - t < 1.0
    assert not list((tmp_path / "cache" / "lm-graphs").glob("*/logits.xml"))
    # a scorer stops with it (the step cannot run), instead of storing it on every row
    sc = scorer_class("superfiltering")("superfiltering", {"model": str(tmp_path / "tiny-dynamic"), "runtime": "openvino",
                                                           "device": "cpu", "template": "none"}, CTX)
    with pytest.raises(CurateError, match="dynamic RoPE"):
        sc.score_records([{"sample_id": "a", "messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello there"}]}])


def test_empty_prompts_are_refused():
    """``next_token`` after an empty prompt has no position to score (the compiled graph would read the row before's
    last position): refused up front by both engines."""
    for runtime in ("torch", "openvino") if openvino_installed() else ("torch",):
        backend = load_backend(LMParams(device="cpu", runtime=runtime), torch_threads=2)
        with pytest.raises(ValueError, match="empty prompt"):
            backend.next_token([[1, 2, 3], []], [4, 5])


def test_the_compiled_batch_keeps_its_logits_under_a_gib():
    """The compiled graph materialises a batch's scored logits: the default budget shrinks for large vocabularies (a
    budget set in the flow is kept)."""
    backend = load_backend(LMParams(device="cpu", runtime="torch"))
    assert backend._engine_budget(49152) == 2048 and backend._engine_budget(262144) == 512
    assert load_backend(LMParams(device="cpu", max_tokens_per_batch=4096))._engine_budget(262144) == 4096


@pytest.mark.parametrize("method,params", [("superfiltering", {"dtype": "float32"}), ("deita", {})])
def test_a_worker_whose_auto_runtime_differs_is_told_why(monkeypatch, tmp_path, method, params):
    """A shard task whose ``runtime: auto`` resolves otherwise than the driver's (openvino installed on one machine, not
    on the other) stops with a key mismatch naming what it resolved and saying to set it in the flow — for a loss
    scorer with its dtype set, and for a rating-token judge."""
    from curate.lm import base
    from curate.stages.score import score_shard

    step = StepSpec(method=method, device="cpu", **params)
    monkeypatch.setattr(base, "openvino_installed", lambda: False)
    driver_key = scorer_class(method)(step.label, step.params, CTX).key
    monkeypatch.setattr(base, "openvino_installed", lambda: True)
    with pytest.raises(RuntimeError, match="resolved .*runtime 'openvino'.*runtime: auto differently: set them in the flow"):
        score_shard(None, step, driver_key, str(tmp_path), CTX)


@needs_openvino
def test_nothing_to_score_runs_nothing():
    """Zero sequences and zero prompts: empty results, no batch run (the compiled engine's plan stays empty)."""
    ov_b = load_backend(LMParams(device="cpu", runtime="openvino"), torch_threads=2)
    assert ov_b.score([]) == [] and ov_b.last_plan.batches == 0
    assert ov_b.next_token([], [1, 2]) == [] and ov_b.last_plan.batches == 0
