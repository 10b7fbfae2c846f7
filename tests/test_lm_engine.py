"""The masked-CE engine on a tiny random-initialised Llama: batched = one row at a time = a plain
full-logits computation; chunked heads; failures isolated to their row; out-of-memory halving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curate.lm.engine import MaskedCE, Seq, plan_batches


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def seqs(n=12, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(5, 60))
        ids = rng.integers(3, 512, size=L).tolist()
        a = int(rng.integers(1, L))
        b = int(rng.integers(a, L + 1))
        spans = [(a, b)] + ([(1, a)] if a > 1 else [])
        out.append(Seq(ids, spans))
    return out


def reference(model, s: Seq) -> list[float]:
    """Full logits at every position, log-softmax, gather: the textbook computation."""
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([s.ids])).logits[0].double(), -1)
    return [-sum(float(logp[t - 1, s.ids[t]]) for t in range(a, b)) for a, b in s.spans]


def test_batched_equals_one_at_a_time_and_full_logits(tiny):
    items = seqs()
    eng = MaskedCE.for_model(tiny, pad_id=0, device="cpu", max_tokens_per_batch=256)
    batched = eng.score(items)
    assert eng.plan.batches < len(items)  # really batched
    single = MaskedCE.for_model(tiny, pad_id=0, device="cpu", max_tokens_per_batch=1)
    alone = single.score(items)
    assert single.plan.batches == len(items)
    for s, b, a in zip(items, batched, alone):
        ref = reference(tiny, s)
        assert b.n == a.n == [e - s_ for s_, e in s.spans]
        np.testing.assert_allclose(b.nll, a.nll, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.nll, ref, rtol=1e-5, atol=1e-5)


def test_head_chunks_and_token_logprobs(tiny):
    items = seqs(6, seed=2)
    base = MaskedCE.for_model(tiny, 0, "cpu").score(items, token_logprobs=True)
    small = MaskedCE(tiny.get_decoder(), tiny.get_output_embeddings(), 0, "cpu", head_chunk_bytes=4 * 512 * 3)
    assert small.chunk_rows == 16
    chunked = small.score(items, token_logprobs=True)
    for a, b in zip(base, chunked):
        np.testing.assert_allclose(a.nll, b.nll, rtol=1e-6)
        for ta, tb, nll in zip(a.token_logprobs, b.token_logprobs, a.nll):
            np.testing.assert_allclose(ta, tb, rtol=1e-5)
            assert abs(-ta.sum() - nll) < 1e-3


def test_failure_inside_a_batch_stays_with_its_row(tiny):
    items = seqs(8, seed=3)
    poison = 2  # the other rows draw ids from 3 up
    items[3].ids[0] = poison
    body = tiny.get_decoder()

    def faulty_body(*args, **kwargs):  # fault injection: the real body, failing on one row's token
        if (kwargs["input_ids"] == poison).any():
            raise RuntimeError("injected fault")
        return body(*args, **kwargs)

    eng = MaskedCE(faulty_body, tiny.get_output_embeddings(), 0, "cpu", 4096)
    out = eng.score(items)
    clean = MaskedCE.for_model(tiny, 0, "cpu", 4096).score(items)
    for i, (o, c) in enumerate(zip(out, clean)):
        if i == 3:
            assert o.status == "error" and o.error_class == "RuntimeError" and all(np.isnan(o.nll))
        else:
            assert o.status == "ok"
            np.testing.assert_allclose(o.nll, c.nll, rtol=1e-5, atol=1e-5)


def test_out_of_memory_halves_the_batch(tiny):
    items = seqs(10, seed=4)
    body = tiny.get_decoder()

    def small_memory_body(*args, **kwargs):  # fault injection: "OOM" above 2 rows per batch
        if kwargs["input_ids"].shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return body(*args, **kwargs)

    eng = MaskedCE(small_memory_body, tiny.get_output_embeddings(), 0, "cpu", 4096)
    out = eng.score(items)
    ref = MaskedCE.for_model(tiny, 0, "cpu", 4096).score(items)
    assert eng.plan.oom_splits >= 1 and eng.plan.max_tokens_per_batch < 4096
    assert all(o.status == "ok" for o in out)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o.nll, r.nll, rtol=1e-5, atol=1e-5)


def test_plan_batches_respects_the_budget():
    lengths = [5, 50, 20, 20, 3, 49, 100]
    batches = plan_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1
    assert batches[0] == [6]  # the longest runs first, alone when it fills the budget
    with pytest.raises(ValueError):
        MaskedCE.__new__(MaskedCE).score([Seq([1, 2], [(0, 1)])])


def test_large_vocabulary_is_chunked_not_materialised():
    """A 262k vocabulary (gemma-3's) is scored in chunks of ~24 rows: same numbers as full logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=262_144, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(5)
    items = [Seq(rng.integers(0, 262_144, size=40).tolist(), [(1, 40)]) for _ in range(3)]
    eng = MaskedCE.for_model(model, 0, "cpu")
    assert eng.chunk_rows == 24
    for got, s in zip(eng.score(items), items):
        np.testing.assert_allclose(got.nll, reference(model, s), rtol=1e-5)


def test_fp32_tail_norms_and_heads_only_the_scored_states(tiny):
    """With an fp32 model the fp32 tail (the final norm applied after the gather, through a hook that
    makes the body's own norm the identity) gives the plain engine's numbers; the hook is removed."""
    from curate.lm.engine import fp32_tail

    items = seqs(8, seed=6)
    plain = MaskedCE.for_model(tiny, 0, "cpu", 256).score(items)
    tail = fp32_tail(tiny)
    assert tail.norm_name == "norm" and tail.head.weight.dtype == torch.float32
    eng = MaskedCE.for_model(tiny, 0, "cpu", 256, fp32_tail=tail)
    for a, b in zip(plain, eng.score(items)):
        np.testing.assert_allclose(a.nll, b.nll, rtol=1e-5, atol=1e-5)
    prompts = [s.ids for s in items[:3]]
    for a, b in zip(MaskedCE.for_model(tiny, 0, "cpu").next_token(prompts, [5, 9]), eng.next_token(prompts, [5, 9])):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.lse, b.lse, rtol=1e-6)
    assert not tiny.get_decoder().norm._forward_hooks  # the body is left as it was


def test_bf16_body_with_fp32_tail_stays_close_to_fp32(tiny):
    """A bf16 body with the final norm and head in fp32: every span's loss within 2e-2 (relative) of fp32."""
    import copy

    from curate.lm.engine import fp32_tail

    items = seqs(8, seed=7)
    ref = MaskedCE.for_model(tiny, 0, "cpu", 256).score(items)
    bf16 = copy.deepcopy(tiny).to(torch.bfloat16)
    eng = MaskedCE.for_model(bf16, 0, "cpu", 256, fp32_tail=fp32_tail(bf16))
    assert eng.head.weight.dtype == torch.float32 and eng.tail.norm.weight.dtype == torch.float32
    for a, b in zip(ref, eng.score(items)):
        assert b.status == "ok"
        np.testing.assert_allclose(b.nll, a.nll, rtol=2e-2, atol=1e-2)


def test_dtype_auto_resolves_from_the_device_and_cpu_flags(monkeypatch):
    from curate.errors import CurateError
    from curate.lm import base

    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx2", "fma"})  # an AVX2-only CPU: no bf16 instructions
    dtype, why = base.resolve_dtype("auto", "cpu")
    assert dtype == "float32" and "neither avx512_bf16 nor AMX" in why
    with pytest.raises(CurateError, match="avx512_bf16 or AMX"):
        base.resolve_dtype("bf16-matmul", "cpu")
    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx2", "avx512_bf16"})  # an AMD EPYC: bf16 instructions, no AMX
    assert base.resolve_dtype("auto", "cpu") == ("bf16-matmul", "auto: this CPU has avx512_bf16: fp32 weights, matmuls in oneDNN's "
                                                                 "bf16 math mode")
    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx512_bf16", "amx_tile", "amx_bf16"})
    assert base.resolve_dtype("auto", "cpu")[0] == "bf16-matmul"
    assert base.resolve_dtype("bf16-matmul", "cpu") == ("bf16-matmul", "set in the flow")
    assert base.resolve_dtype("float32", "cpu") == ("float32", "set in the flow")  # explicit values are kept
    assert base.resolve_dtype("auto", "mps")[0] == "float32"
    with pytest.raises(CurateError, match="for CPUs"):
        base.resolve_dtype("bf16-matmul", "mps")


@pytest.mark.skipif(not __import__("curate.lm.base", fromlist=["x"]).cpu_flags() & {"avx512_bf16", "amx_bf16"},
                    reason="oneDNN's bf16 math mode needs a CPU with avx512_bf16 or AMX")
def test_bf16_math_mode_keeps_fp32_numbers_and_restores_the_mode():
    """``math="bf16"`` (``dtype: bf16-matmul``) on a model wide enough for oneDNN's bf16 kernels: every span's loss within
    1e-4 (relative) of plain fp32 but not bit-equal (the bf16 math ran), the weights untouched, torch's mode back as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    items = seqs(8, seed=9)
    ref = MaskedCE.for_model(model, 0, "cpu", 256).score(items)
    before = torch.backends.mkldnn.matmul.fp32_precision
    got = MaskedCE.for_model(model, 0, "cpu", 256, math="bf16").score(items)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    for a, b in zip(ref, got):
        assert b.status == "ok"
        np.testing.assert_allclose(b.nll, a.nll, rtol=1e-4)
    assert any(a.nll != b.nll for a, b in zip(ref, got))
    assert next(model.parameters()).dtype == torch.float32


def test_matmul_math_modes_take_turns_and_one_mode_runs_together():
    """Blocks of one math mode overlap; a block of the other mode waits until they end; torch's setting is the block's
    inside it and what it was before after the last one."""
    import threading

    from curate.models import matmul_math

    before = torch.backends.mkldnn.matmul.fp32_precision
    inside, release, seen = threading.Event(), threading.Event(), {}

    def hold_bf16():
        with matmul_math("bf16"):
            inside.set()
            release.wait(10)

    def other(name, mode, entered):
        with matmul_math(mode):
            seen[name] = torch.backends.mkldnn.matmul.fp32_precision
            entered.set()

    holder = threading.Thread(target=hold_bf16)
    holder.start()
    assert inside.wait(10)
    same, different = threading.Event(), threading.Event()
    threading.Thread(target=other, args=("same", "bf16", same)).start()
    waiting = threading.Thread(target=other, args=("different", "ieee", different))
    waiting.start()
    assert same.wait(10) and seen["same"] == "bf16"  # the same mode runs beside the holder
    assert not different.wait(0.5)  # the other mode waits for it
    late = threading.Event()
    threading.Thread(target=other, args=("late", "bf16", late)).start()
    assert not late.wait(0.5)  # a newcomer of the holder's mode waits behind the other mode's waiter
    release.set()
    holder.join(10)
    waiting.join(10)
    assert different.is_set() and seen["different"] == "ieee"
    assert late.wait(10) and seen["late"] == "bf16"
    with pytest.raises(RuntimeError, match="inside"):  # a block of another mode inside a block raises (it would wait forever)
        with matmul_math("ieee"):
            with matmul_math("bf16"):
                pass
    assert torch.backends.mkldnn.matmul.fp32_precision == before
