"""Readers, layouts and validation on real sample rows and on every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from curate.config import IngestSpec, InputSpec
from curate.errors import IngestError, RecordError
from curate.ingest.formats import detect_format, from_sharegpt
from curate.ingest.read import read_input
from curate.ingest.readers import read_json, read_jsonl
from curate.ingest.validate import validate_messages
from curate.records import sample_id
from curate.stages.ingest import build_dataset
from conftest import SAMPLE


def ingest(tmp_path: Path, **spec) -> tuple:
    ref = read_input(InputSpec(**spec), 0, str(tmp_path), str(tmp_path / "work"), IngestSpec())
    records = pq.read_table(ref.records_path).to_pylist()
    quarantine = pq.read_table(ref.quarantine_path).to_pylist()
    return ref, records, quarantine


def test_real_layouts_convert_to_messages(tmp_path):
    base = SAMPLE.parent.parent
    cases = {
        "data/sample/alpaca_gpt4_en.json": ("alpaca", 400),
        "data/sample/cherry_alpaca.jsonl": ("alpaca", 300),
        "data/sample/code_alpaca.csv": ("alpaca", 150),
        "data/sample/glaive_toolcall.json": ("sharegpt", 40),
        "data/sample/sharegpt_dialogstudio.json": ("sharegpt", 5),
        "data/sample/t0_tasks.parquet": ("prompt_completion", 60),
    }
    for i, (path, (fmt, n)) in enumerate(cases.items()):
        ref = read_input(InputSpec(path=path, task_field="task" if "t0" in path else None), i, str(base), str(tmp_path), IngestSpec())
        assert (ref.format, ref.n_rows, ref.n_valid, ref.n_quarantined) == (fmt, n, n, 0), path
        recs = pq.read_table(ref.records_path).to_pylist()
        for r in recs:
            roles = [m["role"] for m in r["messages"]]
            assert roles[-1] == "assistant" and roles[0] in ("user", "system")
            assert r["sample_id"] == sample_id(r["messages"], r["tools"])
            assert json.loads(r["original"])  # every original field kept
        if "t0" in path:
            assert {r["task"] for r in recs} == {"ag_news_which_section", "samsum_Summarize_this_dialogue_"}
        if "glaive" in path:
            calls = [m for r in recs for m in r["messages"] if m["tool_calls"]]
            assert calls and all(json.loads(m["tool_calls"])["name"] for m in calls)
            assert all(r["tools"] is None or isinstance(json.loads(r["tools"]), list) for r in recs)


def test_alpaca_input_joined_and_line_numbers(tmp_path):
    ref, recs, _ = ingest(tmp_path, path=str(SAMPLE / "cherry_alpaca.jsonl"))
    with_input = next(r for r in recs if json.loads(r["original"])["input"])
    orig = json.loads(with_input["original"])
    assert with_input["messages"][0]["content"] == f"{orig['instruction'].strip()}\n{orig['input'].strip()}"
    assert [r["source_line"] for r in recs[:3]] == [1, 2, 3]
    ref, recs, _ = ingest(tmp_path, path=str(SAMPLE / "alpaca_gpt4_en.json"))
    text = (SAMPLE / "alpaca_gpt4_en.json").read_text().splitlines()
    assert text[recs[5]["source_line"] - 1].strip().startswith("{")


def test_openai_messages_and_parts(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ref, recs, q = ingest(tmp_path, path="chat.jsonl")
    assert ref.format == "openai" and not q
    assert [m["role"] for m in recs[0]["messages"]] == ["system", "user", "assistant"]
    assert recs[0]["messages"][1]["content"] == "Hi"
    assert recs[1]["messages"][0]["role"] == "system"


def test_sample_id_is_content_only():
    a = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    b = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a "}]
    same = [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}]  # equal content, another object and key order
    assert sample_id(same) == sample_id(a) and sample_id(a) != sample_id(b)
    assert sample_id(a, tools='[{"name":"f"}]') != sample_id(a)


BAD_LINES = [
    (b'{"instruction": "Name a colour.", "output": "Blue."}', None),
    (b'{"instruction": "x", "output": ', "invalid_json"),
    (b'{"instruction": "Say hi"}', "missing_field"),
    (b'{"instruction": 5, "output": "five"}', "wrong_type"),
    (b'{"instruction": "Say hi", "output": "   "}', "empty_response"),
    (b'{"instruction": "Name a colour.", "output": "Blue."}', "duplicate"),
    (b'{"instruction": "caf\xe9", "output": "ok"}', "invalid_utf8"),
    (b"[1, 2]", "not_an_object"),
    (b'{"instruction": "", "output": "text"}', "empty_prompt"),
]


def test_bad_jsonl_rows_are_quarantined_with_file_line_and_field(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    ref, recs, q = ingest(tmp_path, path="bad.jsonl")
    assert ref.n_rows == len(BAD_LINES)
    expected = {i + 1: cls for i, (_, cls) in enumerate(BAD_LINES) if cls not in (None, "duplicate")}
    got = {r["source_line"]: r["error_class"] for r in q}
    assert got == expected
    by_line = {r["source_line"]: r for r in q}
    assert by_line[3]["message"].startswith("bad.jsonl:3: output:") and "missing required field 'output'" in by_line[3]["message"]
    assert "bad.jsonl:4: instruction:" in by_line[4]["message"]
    assert "bad.jsonl:2:" in by_line[2]["message"] and "invalid JSON" in by_line[2]["message"]
    assert len(recs) == 2  # the valid row and its duplicate (dedup happens when shards are built)
    dataset = build_dataset([ref], str(tmp_path / "ds"), IngestSpec())
    assert (dataset.n_input, dataset.n_valid, dataset.n_duplicates, dataset.n_quarantined) == (9, 1, 1, 7)
    ledger = pq.read_table(dataset.ledger_path).to_pylist()
    dup = next(r for r in ledger if r["reason"] == "exact_duplicate")
    assert dup["source_line"] == 6 and "input row 0" in dup["detail"]


def test_conversation_rules():
    ok = [{"role": "user", "content": "q", "tool_calls": None}, {"role": "assistant", "content": "a", "tool_calls": None}]
    validate_messages(ok)
    cases = {
        "no_final_response": ok + [{"role": "user", "content": "more?", "tool_calls": None}],
        "role_order": [ok[1], ok[0], ok[1]],
        "empty_response": [ok[0], {"role": "assistant", "content": "", "tool_calls": None}],
        "too_long": ok,
    }
    for cls, msgs in cases.items():
        with pytest.raises(RecordError) as e:
            validate_messages(msgs, max_chars=1 if cls == "too_long" else None)
        assert e.value.error_class == cls
    with pytest.raises(RecordError) as e:
        from_sharegpt({"conversations": [{"from": "bot", "value": "hi"}]}, {})
    assert e.value.error_class == "unknown_role" and e.value.field == "conversations[0].from"


def test_sharegpt_unknown_role_and_ending_on_user_are_quarantined(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    ]
    (tmp_path / "s.json").write_text(json.dumps(rows, indent=1))
    ref, recs, q = ingest(tmp_path, path="s.json")
    assert [r["error_class"] for r in q] == ["unknown_role", "no_final_response"]
    assert "conversations[1].from" in q[0]["message"] and q[0]["message"].startswith("s.json:2:")
    assert len(recs) == 1


def test_one_megabyte_row_passes_whole(tmp_path):
    big = "word " * 200_000
    (tmp_path / "big.jsonl").write_text(json.dumps({"instruction": "Repeat.", "output": big}) + "\n")
    ref, recs, q = ingest(tmp_path, path="big.jsonl")
    assert not q and len(recs[0]["messages"][1]["content"]) == len(big.strip())
    ref2 = read_input(InputSpec(path="big.jsonl"), 0, str(tmp_path), str(tmp_path / "w2"), IngestSpec(max_chars=100_000))
    assert ref2.n_quarantined == 1
    assert pq.read_table(ref2.quarantine_path).to_pylist()[0]["error_class"] == "too_long"


def test_file_level_errors_name_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(IngestError, match="empty.jsonl: the input has no rows"):
        ingest(tmp_path, path="empty.jsonl")
    (tmp_path / "broken.json").write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": \n')
    with pytest.raises(IngestError, match=r"broken.json:\d+:\d+: invalid JSON in array item 1"):
        ingest(tmp_path, path="broken.json")
    with pytest.raises(IngestError, match=r"declared format 'sharegpt' needs field\(s\) 'conversations'.*looks like 'alpaca'"):
        ingest(tmp_path, path=str(SAMPLE / "cherry_alpaca.jsonl"), format="sharegpt")
    (tmp_path / "odd.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(IngestError, match="cannot tell the format.*'question'"):
        ingest(tmp_path, path="odd.jsonl")
    with pytest.raises(IngestError, match="matches no file"):
        ingest(tmp_path, path="nothing/*.jsonl")
    (tmp_path / "latin1.json").write_bytes(b'[{"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(IngestError, match="latin1.json:1: invalid UTF-8"):
        ingest(tmp_path, path="latin1.json")


def test_field_mapping_glob_and_hf_saved_dataset(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(6)]
    for part in range(2):
        (tmp_path / f"part{part}.jsonl").write_text("\n".join(json.dumps(r) for r in rows[part * 3:(part + 1) * 3]))
    ref, recs, q = ingest(tmp_path, path="part*.jsonl", format="alpaca", fields={"instruction": "q", "output": "a"}, name="qa")
    assert ref.n_valid == 6 and {r["source"] for r in recs} == {"qa/part0", "qa/part1"}
    ds = datasets.Dataset.from_list([json.loads(l) for l in (SAMPLE / "cherry_alpaca.jsonl").read_text().splitlines()[:20]])
    ds.save_to_disk(str(tmp_path / "hfds"))
    ref, recs, q = ingest(tmp_path, path="hfds")
    assert (ref.format, ref.n_valid) == ("alpaca", 20)


def test_hub_dataset_offline_gives_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match="hub dataset 'tatsu-lab/alpaca'.*offline"):
        ingest(tmp_path, hub="tatsu-lab/alpaca")


def test_detect_and_readers():
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"prompt": "p", "completion": "c"}) == "prompt_completion"
    assert detect_format({"text": "t"}) is None
    rows = list(read_json(SAMPLE / "sharegpt_dialogstudio.json"))
    assert len(rows) == 5 and all(r.record for r in rows)
    assert [r.index for r in read_jsonl(SAMPLE / "cherry_alpaca.jsonl")][:3] == [0, 1, 2]
