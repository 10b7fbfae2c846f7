"""Mosaic-IT (methods.md C3): orderings, chunk sizes, rendering, and the external checks on real rows.

Rows come from data/sample (Alpaca-GPT4, Code Alpaca, ShareGPT, Glaive tool calls); tokens are
counted with the bundled SmolLM2 tokenizer and its chat template.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import random
from collections import Counter

import pytest
from conftest import SAMPLE

from curate.ingest.formats import CONVERTERS
from curate.ingest.validate import normalise_messages
from curate.records import sample_id
from curate.rewrite import mosaic as M
from curate.rewrite import mosaic_text as T
from curate.rewrite.tokens import TokenCounter, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def _record(fmt: str, row: dict) -> dict:
    messages, tools = CONVERTERS[fmt](row, {})
    messages = normalise_messages(messages)
    return {"sample_id": sample_id(messages, tools), "messages": messages, "tools": tools}


@functools.lru_cache(maxsize=None)
def _alpaca() -> tuple[dict, ...]:
    """400 Alpaca-GPT4 rows and 150 Code Alpaca rows (all single-turn)."""
    rows = [_record("alpaca", r) for r in json.loads((SAMPLE / "alpaca_gpt4_en.json").read_text())]
    with open(SAMPLE / "code_alpaca.csv", newline="") as f:
        rows += [_record("alpaca", r) for r in csv.DictReader(f)]
    unique = {r["sample_id"]: r for r in rows}  # the sample holds one exact duplicate
    return tuple(unique.values())


@pytest.fixture(scope="module")
def alpaca() -> list[dict]:
    return list(_alpaca())


@functools.lru_cache(maxsize=None)
def _run(params_json: str, every_prefix: bool = False) -> M.MosaicResult:
    return M.MosaicIT(json.loads(params_json), tokenizer=load_tokenizer("smollm2-135m-instruct")).run(
        list(_alpaca()), every_prefix=every_prefix)


def run(every_prefix: bool = False, **params) -> M.MosaicResult:
    """Mosaic-IT over the Alpaca rows (cached per parameter set)."""
    return _run(json.dumps(params, sort_keys=True), every_prefix)


def dumped(result: M.MosaicResult) -> str:
    return json.dumps([r.to_dict() for r in result.rows], sort_keys=True)


# -- orderings on constructed items ---------------------------------------------------------------

@pytest.mark.parametrize("method, instructions, expected", [
    ("FIX", ["a", "b", "c", "d"], [2, 0, 3, 1]),
    ("REVERSE", ["a", "b", "c", "d"], [3, 2, 1, 0]),
    ("ALPHA", ["banana", "Zebra crossing", "apple", "Cherry pie"], [2, 0, 3, 1]),
    ("REVERSE_ALPHA", ["banana", "Zebra crossing", "apple", "Cherry pie"], [1, 3, 0, 2]),
    ("LENGTH_WORD", ["a b c", "x", "p q", "y z"], [1, 2, 3, 0]),  # tie (2, 3) keeps order
    ("REVERSE_LENGTH_WORD", ["a b c", "x", "p q", "y z"], [0, 2, 3, 1]),  # also when reversed
    ("LENGTH_CHAR", ["aaaa", "b", "cc", "dd"], [1, 2, 3, 0]),
    ("REVERSE_LENGTH_CHAR", ["aaaa", "b", "cc", "dd"], [0, 2, 3, 1]),
    ("ODD_EVEN", list("abcde"), [0, 2, 4, 1, 3]),  # 1-based odd positions first
    ("EVEN_ODD", list("abcde"), [1, 3, 0, 2, 4]),
])
def test_permute_order(method, instructions, expected):
    assert M.permute_order(method, instructions, perm=(2, 0, 3, 1)) == expected


def test_alpha_case_sensitive_is_the_reference_string_order():
    ins = ["banana", "Zebra crossing", "apple", "Cherry pie"]
    assert M.permute_order("ALPHA", ins, casefold=False) == [3, 1, 2, 0]  # upper case sorts first
    assert M.permute_order("REVERSE_ALPHA", ins, casefold=False) == [0, 2, 1, 3]


def test_every_permute_method_is_covered():
    assert set(M.PERMUTE_METHODS) == {"FIX", "REVERSE", "ALPHA", "REVERSE_ALPHA", "LENGTH_WORD", "REVERSE_LENGTH_WORD",
                                      "LENGTH_CHAR", "REVERSE_LENGTH_CHAR", "ODD_EVEN", "EVEN_ODD"}
    assert set(M.MASKOUT_METHODS) == {"FIX", "WORD_LONG", "WORD_SHORT", "ODD", "EVEN"}


@pytest.mark.parametrize("method, k, expected", [
    ("FIX", 2, [1, 3]),  # first two of the permutation, sorted
    ("WORD_LONG", 2, [0, 4]),  # 5 and 3 words
    ("WORD_LONG", 3, [0, 2, 4]),  # tie between positions 2 and 3 (2 words): the lower one
    ("WORD_SHORT", 1, [1]),
    ("WORD_SHORT", 2, [1, 2]),
    ("ODD", None, [0, 2, 4]),  # 1-based odd positions
    ("EVEN", None, [1, 3]),
])
def test_maskout_positions(method, k, expected):
    ins = ["a b c", "x", "p q", "y z", "one two three four five"]
    assert M.maskout_positions(method, ins, k, perm=(3, 1, 4, 0, 2)) == expected


def test_mask_count():
    assert [M.mask_count(10, 0.45), M.mask_count(3, 0.1), M.mask_count(2, 0.5), M.mask_count(9, 0.5)] == [4, 1, 1, 4]


def _join(pieces: list, texts: list[str]) -> str:
    return "".join(p if isinstance(p, str) else texts[p] for p in pieces)


def test_render_maskout_keeps_tags_and_order():
    d = M.Draw(strategy="maskout", number=1, number_sep=0, number_newline=False, delimiters=(0, 1, False), format_meta=0,
               joiner=0, layout=0, method="EVEN", outer_meta=1, outer_layout=2)
    r = M.render(d, ["Q1", "Q2", "Q3"])
    texts = ["Q1", "A1", "Q2", "A2", "Q3", "A3"]
    assert _join(r.instruction, texts) == ("Put each of your answers between [BEGIN] and [END].\n"
                                           "(1): Q1\n(2): Q2\n(3): Q3\nIgnore every task with an even number.")
    assert _join(r.response, texts) == "(1): [BEGIN]A1[END]\n\n(3): [BEGIN]A3[END]"
    assert (r.order, r.masked) == ([0, 2], [1])


def test_render_permute_fix_states_its_sequence_and_strips_empty_meta():
    d = M.Draw(strategy="permute", number=7, number_sep=1, number_newline=True, delimiters=None, format_meta=None,
               joiner=1, layout=0, method="FIX", outer_meta=0, outer_layout=1, perm=(1, 2, 0), seq_wrap=1, seq_sep=0)
    r = M.render(d, ["Q1", "Q2", "Q3"])
    texts = ["Q1", "A1", "Q2", "A2", "Q3", "A3"]
    # no format meta-instruction: no stray newline before the block
    assert _join(r.instruction, texts) == "Give your answers in this order: [2, 3, 1].\n\nTask 1.\nQ1\n\nTask 2.\nQ2\n\nTask 3.\nQ3"
    assert _join(r.response, texts) == "Task 2.\nA2\n\nTask 3.\nA3\n\nTask 1.\nA1"


def test_wording_lists_have_their_placeholders():
    assert all("{begin}" in t and "{end}" in t for t in T.FORMAT_WRAP_META)
    assert all("{seq}" in t for t in T.PERMUTE_META["FIX"] + T.MASKOUT_META["FIX"])
    assert all("{k}" in t for t in T.MASKOUT_META["WORD_LONG"] + T.MASKOUT_META["WORD_SHORT"])
    assert all("{x}" in b for b in T.DELIMITER_BRACKETS) and all("{i}" in s for s in T.NUMBER_STYLES)
    assert not any("{" in t for m in M.PERMUTE_METHODS if m != "FIX" for t in T.PERMUTE_META[m])
    assert T.fill("{{x}}", x="END") == "{END}"
    assert T.fill_pieces("a {begin} b {end}", begin="{end}", end="E") == ["a ", "{end}", " b ", "E", ""]


# -- chunk sizes ----------------------------------------------------------------------------------

def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


CDFS = {  # of the tail draw r; chunk size = 10 - floor(r), r conditioned on 0 < r < 10
    "exp": lambda r: 1 - math.exp(-r),
    "lognormal": lambda r: _phi(math.log(r)) if r > 0 else 0.0,
    "logistic": lambda r: 1 / (1 + math.exp(-r / 2)),
}


@pytest.mark.parametrize("mode", sorted(CDFS))
def test_tail_chunk_sizes_follow_their_distribution(mode):
    F, top = CDFS[mode], 10
    pmf = {top - j: (F(j + 1) - F(j)) / (F(top) - F(0)) for j in range(top)}
    mean = sum(c * q for c, q in pmf.items())
    sd = math.sqrt(sum((c - mean) ** 2 * q for c, q in pmf.items()))
    rng, n = random.Random(7), 20_000
    draws = [M.chunk_size(rng, mode, top, 10**6) for _ in range(n)]
    assert set(draws) <= set(range(1, top + 1))
    assert abs(sum(draws) / n - mean) < 4 * sd / math.sqrt(n)
    assert draws.count(top) / n == pytest.approx(pmf[top], abs=0.02)


def test_pareto_chunk_sizes_are_the_references():
    """The reference draws ``r = np.random.pareto(1) - 1`` until r < max and takes ``max - int(r)``.
    numpy's pareto is Lomax (CDF x / (1 + x)), so r is in [-1, inf) and r in (-1, 1) gives max:
    P(10) = F(2) / F(11) = 8/11 (not the 0.55 of a Lomax r kept in (0, 10))."""
    import numpy as np

    top, n = 10, 40_000
    lomax = lambda x: x / (1 + x)  # noqa: E731
    pmf = {top: lomax(2) / lomax(top + 1), **{top - j: (lomax(j + 2) - lomax(j + 1)) / lomax(top + 1) for j in range(1, top)}}
    assert pmf[top] == pytest.approx(8 / 11) and sum(pmf.values()) == pytest.approx(1.0)
    rng = random.Random(11)
    ours = [M.chunk_size(rng, "pareto", top, 10**6) for _ in range(n)]
    # the reference's own draw, with numpy
    gen, ref = np.random.default_rng(5), []
    while len(ref) < n:
        r = gen.pareto(1) - 1
        if r < top:
            ref.append(top - int(r))
    assert set(ours) <= set(range(1, top + 1))
    for c in (top, top - 1, top - 2, 1):
        assert ours.count(c) / n == pytest.approx(pmf[c], abs=0.01)
        assert ref.count(c) / n == pytest.approx(pmf[c], abs=0.01)
    mean = sum(c * q for c, q in pmf.items())
    sd = math.sqrt(sum((c - mean) ** 2 * q for c, q in pmf.items()))
    assert abs(sum(ours) / n - mean) < 4 * sd / math.sqrt(n) and abs(sum(ref) / n - mean) < 4 * sd / math.sqrt(n)


def test_simple_chunk_modes():
    rng = random.Random(3)
    uniform = [M.chunk_size(rng, "uniform", 10, 10**6) for _ in range(20_000)]
    assert set(uniform) == set(range(1, 11)) and sum(uniform) / len(uniform) == pytest.approx(5.5, abs=0.1)
    assert M.chunk_size(rng, "fix_max", 10, 100) == 10 and M.chunk_size(rng, "fix_max", 10, 4) == 4
    assert M.chunk_size(rng, "max_length", 10, 77) == 77
    assert all(M.chunk_size(rng, "exp", 10, 3) <= 3 for _ in range(100))


# -- the external checks on real rows -------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {"epochs": 2, "max_length": 1024},
    {"epochs": 2, "max_length": 400, "chunk": "max_length"},
    {"epochs": 2, "max_length": 1024, "chunk": "exp", "version": "order"},
    {"epochs": 2, "max_length": 600, "match_reference": True, "version": "mask"},
])
def test_every_original_once_per_epoch(alpaca, params):
    result = run(**params)
    ids = {r["sample_id"] for r in alpaca}
    for e in range(params["epochs"]):
        seen = Counter(sid for row in result.rows if row.epoch == e for sid in row.parents)
        seen.update(result.overlong[e])
        assert set(seen) == ids and set(seen.values()) == {1}
    assert result.stats["n_overlong"] == sum(map(len, result.overlong))
    assert all(row.count == len(row.parents) >= 1 for row in result.rows)


def _tag(c: dict, i: int) -> str:
    if c["number"] == 0:
        return ""
    return T.NUMBER_STYLES[c["number"]].replace("{i}", str(i)) + T.NUMBER_SEPARATORS[c["number_sep"]] + (
        "\n" if c["number_newline"] else " ")


def _delimiters(c: dict) -> tuple[str, str]:
    if "delimiters" not in c:
        return "", ""
    w, b, lower = c["delimiters"]
    words = [x.lower() if lower else x for x in T.DELIMITER_WORDS[w]]
    return tuple(T.DELIMITER_BRACKETS[b].replace("{x}", x) for x in words)


def _expected_k(row: M.MosaicRow) -> int:
    c, m = row.choices, row.count
    return {"ODD": (m + 1) // 2, "EVEN": m // 2}.get(row.method) or max(int(m * c["mask_ratio"]), 1)


def _check_order(row: M.MosaicRow, ins: list[str]) -> None:
    """The permute methods' stated order, checked as a property of the written order."""
    order, method = [j - 1 for j in row.choices["order"]], row.method
    keys = {"ALPHA": lambda j: ins[j].casefold(), "LENGTH_WORD": lambda j: len(ins[j].split()),
            "LENGTH_CHAR": lambda j: len(ins[j])}
    if method == "FIX":
        assert order == list(row.choices["perm"])
    elif method == "REVERSE":
        assert order == sorted(order, reverse=True)
    elif method in ("ODD_EVEN", "EVEN_ODD"):
        first = 0 if method == "ODD_EVEN" else 1
        assert order == [j for j in range(row.count) if j % 2 == first] + [j for j in range(row.count) if j % 2 != first]
    else:
        values = [keys[method.removeprefix("REVERSE_")](j) for j in order]
        assert values == sorted(values, reverse=method.startswith("REVERSE_"))


def test_responses_tags_and_counts(alpaca):
    result = run(epochs=2, max_length=1024)
    by_id = {r["sample_id"]: (r["messages"][0]["content"], r["messages"][1]["content"]) for r in alpaca}
    strategies = Counter()
    for row in result.rows:
        c, m = row.choices, row.count
        pairs = [by_id[sid] for sid in row.parents]
        begin, end = _delimiters(c)
        order, masked = c["order"], c["masked"]
        # response i is tag(i) + delimiters around response i, in the written order
        assert row.response == "\n\n".join(_tag(c, j) + begin + pairs[j - 1][1] + end for j in order)
        # instruction i carries the same tag as response i
        assert all(_tag(c, j) + pairs[j - 1][0] in row.instruction for j in range(1, m + 1))
        assert sorted(order + masked) == list(range(1, m + 1))
        if row.strategy == "maskout":
            assert len(order) == m - _expected_k(row) and order == sorted(order)
        else:
            assert len(order) == m
        if row.strategy == "format":
            assert order == list(range(1, m + 1))
        if row.strategy == "permute":
            _check_order(row, [p[0] for p in pairs])
        if row.strategy != "format":
            assert c["number"] != 0 and m >= 2  # numbering forced; one row is always format
        strategies[row.strategy, row.method] += 1
    assert len(strategies) >= 12  # the draw reaches most strategy/method pairs on 550 rows x 2 epochs


def test_reference_numbering_allows_unnumbered_permute_and_maskout():
    rows = [r for r in run(epochs=2, max_length=600, match_reference=True, version="mask").rows if r.strategy != "format"]
    unnumbered = sum(r.choices["number"] == 0 for r in rows)
    assert 0 < unnumbered < len(rows) / 4  # about 1 in 10


def _epoch0(result: M.MosaicResult) -> str:
    return json.dumps([r.to_dict() for r in result.rows if r.epoch == 0], sort_keys=True)


def test_same_seed_same_bytes_other_seed_differs(alpaca):
    """A fresh run (new tokenizer counter, new caches) repeats the bytes; an epoch does not depend on
    how many epochs follow it; another seed gives other mosaics."""
    again = M.MosaicIT({"epochs": 1, "max_length": 1024}).run(alpaca)
    other = M.MosaicIT({"epochs": 1, "max_length": 1024, "seed": 1}).run(alpaca)
    assert _epoch0(again) == _epoch0(run(epochs=2, max_length=1024)) != _epoch0(other)
    first, second = ([r.parents for r in run(epochs=2, max_length=1024).rows if r.epoch == e] for e in (0, 1))
    assert first != second  # each epoch has its own seed


def test_output_does_not_depend_on_input_order(alpaca):
    shuffled = list(alpaca)
    random.Random(5).shuffle(shuffled)
    assert _epoch0(M.MosaicIT({"epochs": 1, "max_length": 1024}).run(shuffled)) == _epoch0(run(epochs=2, max_length=1024))


def test_no_mosaic_over_the_cap_with_the_target_template(tokenizer):
    result = run(epochs=2, max_length=700)  # shared with test_estimates_give_the_prefix_loop_output
    for row in result.rows:
        pair = [{"role": "user", "content": row.instruction}, {"role": "assistant", "content": row.response}]
        n = len(tokenizer.apply_chat_template(pair, tokenize=True, return_dict=True)["input_ids"])
        assert n == row.n_tokens and n + 16 <= 700
    assert max(r.n_tokens for r in result.rows) > 600  # the cap binds


def test_raw_count_is_the_reference_count(tokenizer):
    result = run(epochs=2, max_length=500, match_reference=True)
    for row in result.rows:
        n = len(tokenizer.tokenize(row.instruction + row.response))
        assert n == row.n_tokens and n < 500
    assert max(r.n_tokens for r in result.rows) > 450


@pytest.mark.parametrize("params", [{"max_length": 700}, {"max_length": 500, "match_reference": True},
                                    {"max_length": 400, "chunk": "max_length"}])
def test_estimates_give_the_prefix_loop_output(params):
    fast, slow = run(epochs=2, **params), run(every_prefix=True, epochs=2, **params)
    assert dumped(fast) == dumped(slow)
    assert fast.overlong == slow.overlong
    assert fast.stats["n_exact_counts"] < slow.stats["n_exact_counts"] / 2
    assert slow.stats["n_exact_counts"] == slow.stats["n_prefixes"]


def test_a_final_count_over_the_cap_recomputes_the_chunk_exactly(monkeypatch, alpaca):
    """With a negative slack the estimates accept renders a little over the cap: the accepted
    render's exact count catches them and the chunk is redone prefix by prefix."""
    monkeypatch.setattr(M, "JOIN_SLACK", -2)
    records = alpaca[:150]
    result = M.MosaicIT({"epochs": 1, "max_length": 600}).run(records)
    assert result.stats["n_estimate_fallbacks"] > 0
    assert all(row.n_tokens <= 600 - 16 for row in result.rows)
    seen = Counter(sid for row in result.rows for sid in row.parents) + Counter(result.overlong[0])
    assert set(seen.values()) == {1} and len(seen) == len(records)


def test_mosaics_per_epoch_match_the_chunk_mean(alpaca):
    n = len(alpaca)
    uniform = run(epochs=4, max_length=10**6, count_with="raw")
    per_epoch = uniform.stats["n_mosaics_per_epoch"]
    # renewal process: sd of the count per epoch = sqrt(N * var(c) / E[c]^3), var(c) = 8.25 for U{1..10}
    sd = math.sqrt(n * 8.25 / 5.5**3) / math.sqrt(len(per_epoch))
    assert abs(sum(per_epoch) / len(per_epoch) - n / 5.5) < 4 * sd
    assert uniform.stats["n_overlong"] == 0 and all(r.count <= 10 for r in uniform.rows)
    fixed = run(epochs=2, max_length=10**6, count_with="raw", chunk="fix_max")
    assert fixed.stats["n_mosaics_per_epoch"] == [math.ceil(n / 10)] * 2


def test_passthrough_of_multiturn_tool_and_system_rows(alpaca):
    sharegpt = [_record("sharegpt", r) for r in json.loads((SAMPLE / "sharegpt_dialogstudio.json").read_text())]
    tools = [_record("sharegpt", r) for r in json.loads((SAMPLE / "glaive_toolcall.json").read_text())[:10]]
    system = [_record("alpaca", {"instruction": "Say hi.", "output": "Hi!", "system": "Be brief."})]
    records = alpaca[:60] + sharegpt + tools + system
    result = M.MosaicIT({"epochs": 2, "max_length": 1024}).run(records)
    multi = [r["sample_id"] for r in sharegpt + tools if [m["role"] for m in r["messages"]] != ["user", "assistant"] or r["tools"]]
    assert len(multi) >= 3 + 10
    assert [(p.sample_id, p.reason) for p in result.passthrough] == (
        [(s, "multiturn") for s in multi] + [(system[0]["sample_id"], "system")])
    st = result.stats
    assert (st["n_input"], st["n_multiturn_passthrough"], st["n_system_passthrough"]) == (len(records), len(multi), 1)
    parents = {sid for row in result.rows for sid in row.parents}
    assert not parents & {p.sample_id for p in result.passthrough}
    assert len(parents) == len(records) - len(multi) - 1  # single-turn ShareGPT rows are composed too


def test_overlong_originals_are_counted_and_optionally_passed_through(alpaca):
    # no maskout here: a masked-out response could let a long row into a mosaic by its instruction alone
    dropped = run(epochs=2, max_length=300, version="order")
    kept = run(epochs=2, max_length=300, version="order", passthrough_overlong=True)
    assert dropped.stats["n_overlong"] > 10 and dropped.passthrough == []
    assert dumped(dropped) == dumped(kept)  # the option adds passthrough rows only
    composed = {sid for row in kept.rows for sid in row.parents}
    never = {sid for epoch in kept.overlong for sid in epoch} - composed
    assert never and {p.sample_id for p in kept.passthrough} == never
    assert {p.reason for p in kept.passthrough} == {"overlong"}
    assert kept.stats["n_overlong_never_composed"] == len(never)
    counter = TokenCounter(load_tokenizer("smollm2-135m-instruct"), "template")
    bare = {r["sample_id"]: counter.exact(r["messages"][0]["content"], r["messages"][1]["content"]) for r in alpaca}
    too_long = {sid for sid, n in bare.items() if n > 300 - 16 + 8}  # over the cap even without tags or wording
    fits_bare = {sid for sid, n in bare.items() if n <= 300 - 16 - 60}
    assert too_long and too_long <= never and not never & fits_bare


def test_inputs_are_not_mutated(alpaca):
    records = copy.deepcopy(alpaca[:80])
    before = copy.deepcopy(records)
    M.MosaicIT({"epochs": 2, "max_length": 1024}).run(records)
    assert records == before


def test_token_counter_matches_the_chat_template(tokenizer, alpaca):
    counter = TokenCounter(tokenizer, "template")
    assert counter.frame.linear
    for rec in alpaca[:20] + [{"messages": [{"content": "(1): a\n\n[2] b"}, {"content": "x\n\ny"}]}]:
        q, a = rec["messages"][0]["content"], rec["messages"][1]["content"]
        pair = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        assert counter.exact(q, a) == len(tokenizer.apply_chat_template(pair, tokenize=True, return_dict=True)["input_ids"])
    raw = TokenCounter(tokenizer, "raw")
    texts = [r["messages"][0]["content"] + r["messages"][1]["content"] for r in alpaca[:20]]
    assert raw.count_many(texts) == [len(tokenizer.tokenize(t)) for t in texts]


def test_params_and_fingerprint():
    ours, ref = M.MosaicParams(), M.MosaicParams(match_reference=True)
    assert (ours.count_with, ours.force_numbering, ours.alpha_sort) == ("template", True, "casefold")
    assert (ref.count_with, ref.force_numbering, ref.alpha_sort) == ("raw", False, "case_sensitive")
    assert M.MosaicParams(match_reference=True, count_with="template").count_with == "template"
    assert (ours.budget, ref.budget) == (2000 - 16, 1999)
    with pytest.raises(ValueError):
        M.MosaicParams(chunk="poisson")
    with pytest.raises(ValueError, match="leaves no tokens"):
        M.MosaicParams(max_length=16)
    a, b = M.MosaicIT({}).fingerprint(), M.MosaicIT({"seed": 1}).fingerprint()
    assert a != b and a["text"] == T.text_ref() and len(a["text"]["hash"]) == 64


def test_bundled_tokenizer_is_read_from_the_gguf_once_and_kept(tmp_path, monkeypatch, tokenizer):
    from curate.rewrite.tokens import _load_tokenizer

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path))
    fresh = _load_tokenizer("smollm2-135m-instruct")  # from the GGUF, saved under the cache
    (saved,) = (tmp_path / "tokenizers").iterdir()
    assert saved.name.startswith("smollm2-135m-instruct-") and (saved / "tokenizer.json").exists()
    again = _load_tokenizer("smollm2-135m-instruct")  # from the saved dir
    text = "(3): Write a function.\n[BEGIN]def f(x):\n    return x[END]"
    assert fresh(text)["input_ids"] == again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert fresh.chat_template == again.chat_template == tokenizer.chat_template
