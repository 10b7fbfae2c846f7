"""The exports train in TRL 1.16's real SFTTrainer: a small flow with tool-call rows and plain rows,
its `messages` and `prompt_completion` JSONL loaded with `datasets`, two optimizer steps of SmolLM2 on
CPU, and the shipped `trl_load.py` snippet run the same way (docs/exports.md)."""

from __future__ import annotations

import json
import re
import runpy

import datasets
import pytest

from conftest import ROOT, write_flow
from curate.config import load_flow
from curate.pipeline import execute

pytest.importorskip("trl")

# bf16=False: SFTConfig's default (bf16=True) autocasts to bf16 on CPU too, where the backward's bf16 GEMMs run on
# torch's reference kernel (no oneDNN/AMX here): two steps took 40-80 s; in fp32 (MKL) they take 3-4 s. Precision
# is no part of what these tests check (the export loads, is tokenised and masked as its layout says, and trains)
TRAIN = dict(max_steps=2, per_device_train_batch_size=1, max_length=256, learning_rate=1e-5, report_to="none",
             save_strategy="no", logging_steps=1, activation_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True, seed=0,
             bf16=False)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("trl")
    flow = write_flow(d, name="trl", base_dir=str(ROOT), output_dir=str(d / "out"), store_dir=str(d / "store"),
                      inputs=[{"path": "data/sample/glaive_toolcall.json", "format": "sharegpt"},
                              {"path": "data/sample/cherry_alpaca.jsonl", "limit": 12},
                              {"path": "data/sample/sharegpt_dialogstudio.json"}],
                      score=[{"method": "heuristic"}],
                      # short rows only, so that every prompt fits in TRAIN's max_length with room for its answer
                      select=[{"method": "threshold", "score": "heuristic.prompt_tokens", "max": 60},
                              {"method": "threshold", "score": "heuristic.response_tokens", "max": 100}],
                      export={"layouts": ["messages", "prompt_completion"], "file_types": ["jsonl"]}, report={"plots": False})
    summary = execute(load_flow(flow))
    assert summary["counts"]["selected"] >= 6
    return d / "out" / "export"


@pytest.fixture(scope="module")
def smollm2_dir():
    from curate.models import resolve_model

    return resolve_model("smollm2-135m-instruct").location  # the bundled GGUF, dequantised to an HF dir once


def train_two_steps(model_dir, dataset, out_dir):
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(model=model_dir, args=SFTConfig(output_dir=str(out_dir), **TRAIN), train_dataset=dataset)
    return trainer, trainer.train()


@pytest.mark.parametrize("layout", ["messages", "prompt_completion"])
def test_export_trains_in_sft_trainer(layout, export_dir, smollm2_dir, tmp_path):
    path = export_dir / layout / f"curated_{layout}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    tools = [r["tools"] for r in rows]
    assert any(t is None for t in tools) and any(t for t in tools)  # both kinds of rows are in the file
    assert all(isinstance(json.loads(t), list) for t in tools if t is not None)
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    trainer, out = train_two_steps(smollm2_dir, ds, tmp_path / "ckpt")
    assert out.global_step == 2 and out.training_loss == out.training_loss > 0  # finite, positive
    masked = [sum(t == -100 for t in r["labels"]) for r in trainer.train_dataset]
    if layout == "prompt_completion":  # completion-only loss: the prompt tokens are masked, the answer is not
        assert all(0 < m < len(r["input_ids"]) for m, r in zip(masked, trainer.train_dataset))
    else:  # conversational LM: loss on the whole conversation (SmolLM2's template has no {% generation %} markers)
        assert not any(masked)


def test_assistant_only_loss_needs_generation_markers(export_dir, smollm2_dir, tmp_path):
    """Why prompt_completion is the TRL default: SmolLM2's chat template has no {% generation %} markers."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    assert not re.search(r"\{%-?\s*generation\s*-?%\}", AutoTokenizer.from_pretrained(smollm2_dir).chat_template)
    ds = datasets.load_dataset("json", data_files=str(export_dir / "messages" / "curated_messages.jsonl"), split="train")
    with pytest.raises(ValueError, match="generation %}` markers"):
        SFTTrainer(model=smollm2_dir, args=SFTConfig(output_dir=str(tmp_path / "ckpt"), assistant_only_loss=True, **TRAIN),
                   train_dataset=ds)


def test_shipped_trl_snippet_trains(export_dir, smollm2_dir, tmp_path):
    snippet = export_dir / "trl_load.py"
    ns = runpy.run_path(str(snippet), run_name="trl_load")
    n_rows = sum(1 for _ in (export_dir / "prompt_completion" / "curated_prompt_completion.jsonl").open())
    assert "prompt_completion" in snippet.read_text() and len(ns["dataset"]) == n_rows
    out = ns["trainer"](smollm2_dir, **{**TRAIN, "output_dir": str(tmp_path / "ckpt")}).train()
    assert out.global_step == 2


def test_snippet_loads_a_large_file_whose_first_rows_have_no_tools(tmp_path):
    """`datasets` reads JSONL in 10 MB blocks: a block of null tools followed by one with strings fails to
    cast ("Couldn't cast array of type string to null") unless the file is read as one block."""
    from curate.export.layouts import convert_rows
    from curate.export.trainers import trl_snippet

    def rec(i, tools=None):
        msgs = [{"role": "user", "content": f"Question {i}: " + "words " * 150}, {"role": "assistant", "content": f"Answer {i}."}]
        return {"sample_id": f"s{i}", "messages": msgs, "tools": tools}

    records = [rec(i) for i in range(12_000)] + [rec(12_000, json.dumps({"name": "f", "parameters": {}}))]
    rows, _ = convert_rows(records, "prompt_completion")
    assert rows[0]["tools"] is None and json.loads(rows[-1]["tools"]) == [{"name": "f", "parameters": {}}]  # one schema → a list
    data = tmp_path / "prompt_completion" / "curated_prompt_completion.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert data.stat().st_size > 10 << 20
    (tmp_path / "trl_load.py").write_text(trl_snippet([{"layout": "prompt_completion", "file_type": "jsonl",
                                                        "path": "prompt_completion/curated_prompt_completion.jsonl"}], 512))
    ds = runpy.run_path(str(tmp_path / "trl_load.py"), run_name="trl_load")["dataset"]
    assert len(ds) == 12_001 and ds[0]["tools"] is None and ds[12_000]["tools"] == rows[-1]["tools"]
