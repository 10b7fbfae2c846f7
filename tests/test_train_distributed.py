"""`curate train` in two processes on CPU: ``python -m torch.distributed.run --nproc_per_node 2``
(torchrun), DDP over gloo, the bundled SmolLM2, a real LoRA run on a tiny real export.

The launched script (tests/ddp_train.py) is ``python -m curate`` with each process's batches
recorded as the trainer gets them, so the test sees which rows each process trained in each epoch."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, write_flow
from curate.config import load_flow
from curate.errors import ConfigError
from curate.pipeline import execute

pytest.importorskip("trl")
pytest.importorskip("peft")

# 4 rows, 2 epochs; every row in each step (batch_tokens above the data), one row per forward: each process
# takes 2 rows per step (1 per forward × 2 accumulated), so one step is one epoch
SETTINGS = {"epochs": 2, "batch_tokens": 100000, "micro_batch_tokens": 256, "max_length": 256, "lora.r": 8, "lora.alpha": 16}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The four shortest of a few real rows (single- and multi-turn), exported as messages JSONL."""
    d = tmp_path_factory.mktemp("ddp")
    flow = write_flow(d, name="ddp", base_dir=str(ROOT), output_dir=str(d / "out"), store_dir=str(d / "store"),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 12},
                              {"path": str(FIXTURES / "mt_bench_two_turn.jsonl"), "limit": 2}],
                      score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 4, "descending": False}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"], "max_length": 256}, report={"plots": False})
    assert execute(load_flow(flow))["counts"]["selected"] == 4
    return d / "out"


def torchrun(run: Path, batches: Path, settings: dict | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    batches.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_train.py"), "train", str(run), "--no-prefect"]
    for k, v in (settings or SETTINGS).items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "CURATE_TEST_BATCHES": str(batches), "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_train_each_row_once_per_epoch_and_write_one_record(tiny_run, tmp_path, monkeypatch):
    from curate.evaluate import EvalSpec, evaluate
    from curate.models import resolve_model
    from curate.train import TrainSpec, locate_export
    from curate.train.sft import _tokenizer, run_key

    res = torchrun(tiny_run, tmp_path / "batches")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert res.stdout.count("weights: ") == 1  # one summary: rank 0's

    # one record, one adapter, no checkpoints left
    (record,) = (tiny_run / "train").glob("*/train.json")
    rec = json.loads(record.read_text())
    assert [p.name for p in record.parent.iterdir() if p.is_dir()] == ["adapter"]
    assert (record.parent / "adapter" / "adapter_model.safetensors").exists() and (record.parent / "loss.png").exists()
    b = rec["batch"]
    assert b["world_size"] == 2 and b["rows_per_step"] == 4 and b["rows_per_forward"] * b["accumulation"] * 2 == 4
    assert rec["steps"] == 2 and rec["epochs"] == 2.0 and rec["rows_trained"] == 4

    # the key: both processes computed the two-process key (the world size is in it; one process has another)
    spec = TrainSpec.model_validate({"epochs": 2, "batch_tokens": 100000, "micro_batch_tokens": 256, "max_length": 256,
                                     "lora": {"r": 8, "alpha": 16}})
    export = locate_export(tiny_run, "messages")
    one = run_key(spec, export)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_key(spec, export) == rec["key"] != one
    monkeypatch.delenv("WORLD_SIZE")

    # same rows seen once per epoch: over both processes, every export row exactly once in each epoch
    tok = _tokenizer(spec, resolve_model(spec.model).location)
    rows = [json.loads(line) for line in export.path.read_text(encoding="utf-8").splitlines()]
    expected = collections.Counter(tuple(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
                                   for r in rows)
    assert len(expected) == 4
    seen = {rank: [json.loads(line) for line in (tmp_path / "batches" / f"rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)}
    assert [len(seen[0]), len(seen[1])] == [4, 4]  # 2 epochs × 2 forwards of one row, in each process
    for epoch in (0, 1):
        got = collections.Counter(tuple(s["ids"]) for rank in (0, 1) for s in seen[rank] if s["epoch"] == epoch)
        assert got == expected, f"epoch {epoch}"
        assert not ({tuple(s["ids"]) for s in seen[0] if s["epoch"] == epoch} & {tuple(s["ids"]) for s in seen[1] if s["epoch"] == epoch})
    # tokens: every process's non-padding tokens, each row once per epoch
    assert rec["tokens_trained"] == sum(len(s["ids"]) for rank in (0, 1) for s in seen[rank]) == 2 * sum(len(ids) for ids in expected)
    assert rec["tokens_per_s"] * rec["train_seconds"] == pytest.approx(rec["tokens_trained"])  # all processes' tokens per second

    # the adapter loads onto its base (curate.models, PEFT) and scores the export's replies
    on_export = EvalSpec(eval_set={"path": str(export.path)}, judge=None, max_length=256, bootstrap=0)
    scored = evaluate(str(record.parent / "adapter"), on_export, tmp_path / "eval")
    assert scored["loss"]["n_rows"] == 4 and 0 < scored["loss"]["loss"] < 10

    # launched again: every process finds the finished run and returns its record; nothing trains
    stamp = record.stat().st_mtime_ns
    again = torchrun(tiny_run, tmp_path / "again")
    assert again.returncode == 0, again.stderr[-6000:]
    assert again.stdout.count("weights: ") == 1 and record.stat().st_mtime_ns == stamp
    assert not list((tmp_path / "again").iterdir())  # no training step in either process


@pytest.mark.slow
def test_when_rank_0_fails_to_write_the_record_every_process_fails(tiny_run, tmp_path):
    """Rank 0 cannot write the record (its loss plot raises, as a full disk would): it fails with that error, the
    other process stops waiting for it and fails naming rank 0, the launch exits non-zero, and no record is left."""
    settings = {**SETTINGS, "max_steps": 1}  # another key than the test above; one step
    res = torchrun(tiny_run, tmp_path / "batches", settings, env={"CURATE_TEST_FAIL_RANK0_WRITE": "1"})
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "OSError: No space left on device (test)" in out and "rank 0 did not write" in out, out[-6000:]
    records = [json.loads(p.read_text()) for p in (tiny_run / "train").glob("*/train.json")]
    assert all(r["config"].get("max_steps") != 1 for r in records)  # the failed run left no record


def test_launch_settings_pass_through_and_the_key(tiny_run, tmp_path, monkeypatch):
    """fsdp / fsdp_config / deepspeed reach the trainer's arguments unchanged; gloo on CPU with
    several processes; which of them change the key; DeepSpeed missing is named before anything loads."""
    import importlib.util

    from curate.train import TrainSpec, train
    from curate.train.distributed import launch_args
    from curate.train.sft import _token_batch

    fsdp = TrainSpec(fsdp=True, fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    assert launch_args(fsdp, "cuda") == {"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    assert launch_args(TrainSpec(), "cpu") == {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_args(TrainSpec(), "cpu") == {"ddp_find_unused_parameters": False, "ddp_backend": "gloo"}
    assert launch_args(TrainSpec(), "cuda:0") == {"ddp_find_unused_parameters": False}  # accelerate picks nccl
    monkeypatch.delenv("WORLD_SIZE")
    # the key: fsdp shards the same step (not in it); a DeepSpeed config can set its own optimizer (in it, a file by its content)
    assert fsdp.key("x") == TrainSpec().key("x") == TrainSpec(fsdp="full_shard auto_wrap").key("x")
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    k1 = TrainSpec(deepspeed=str(ds)).key("x")
    assert k1 != TrainSpec().key("x") and k1 != TrainSpec(deepspeed={"zero_optimization": {"stage": 3}}).key("x")
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    assert TrainSpec(deepspeed=str(ds)).key("x") != k1
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match=r"DeepSpeed is not installed here: pip install deepspeed"):
            train(TrainSpec(deepspeed=str(ds)), tiny_run, tmp_path / "t")
    with pytest.raises(ConfigError, match="give one of them"):
        train(TrainSpec(deepspeed=str(ds), fsdp=True), tiny_run, tmp_path / "t")
    # the batch maths: rows per step is the whole step; each process's share rounds up to whole rows
    spec = TrainSpec(batch_tokens=500)
    one, two = _token_batch(spec, [100] * 10, 4096), _token_batch(spec, [100] * 10, 4096, world=2)
    assert (one["rows_per_step"], one["rows_per_forward"], one["accumulation"], one["world_size"]) == (5, 5, 1, 1)
    assert (two["rows_per_step"], two["rows_per_forward"], two["accumulation"], two["world_size"]) == (6, 3, 1, 2)
    small = _token_batch(spec, [100] * 10, 200, world=2)  # 2 rows per forward at most: 3 rows a process = 3 forwards of 1, not 2 of 2
    assert (small["rows_per_step"], small["rows_per_forward"], small["accumulation"]) == (6, 1, 3)
    odd = _token_batch(TrainSpec(batch_tokens=700), [100] * 10, 200)  # 7 rows, 2 a forward at most: 7 forwards of 1 (within 2 × 4)
    assert (odd["rows_per_step"], odd["rows_per_forward"], odd["accumulation"]) == (7, 1, 7)
    big = _token_batch(TrainSpec(batch_tokens=1300), [100] * 20, 200)  # 13 rows: no divisor in 7..13 but 13 itself → 13 × 1
    assert big["rows_per_step"] == 13
    # steps_per_epoch (curate compare's tokens budgets): rows per step from the row count, not from batch_tokens
    per_pass = _token_batch(TrainSpec(batch_tokens=100, steps_per_epoch=2), [100] * 31, 1024)
    assert (per_pass["rows_per_step"], per_pass["rows_per_forward"] * per_pass["accumulation"]) == (16, 16)  # steps of 16 and 15
    assert _token_batch(TrainSpec(steps_per_epoch=4), [100] * 9, 1024)["rows_per_step"] == 3  # 3 steps a pass: compare warns
    # 7 rows a step at most 3 a forward: 7 forwards of 1, not 3 × 3 = 9 rows (16 steps a pass instead of 20)
    exact = _token_batch(TrainSpec(steps_per_epoch=20), [300] * 140, 1024)
    assert (exact["rows_per_step"], exact["steps_per_pass"], exact["rows_per_forward"], exact["accumulation"]) == (7, 20, 1, 7)
