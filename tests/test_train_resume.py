"""A killed `curate train` resumes from its last checkpoint: a real training in a subprocess,
SIGKILLed once a checkpoint of step 2 or later is complete, then run again (bundled SmolLM2, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, write_flow
from curate.config import load_flow
from curate.pipeline import execute

pytest.importorskip("trl")
pytest.importorskip("peft")

STEPS = 6
MAX_LENGTH = 48


def complete_checkpoints(ckpt_dir) -> dict[int, dict]:
    """Step → trainer state of the checkpoints whose trainer_state.json (written last) is complete."""
    out = {}
    for c in ckpt_dir.glob("checkpoint-*") if ckpt_dir.exists() else []:
        try:
            out[int(c.name.split("-")[-1])] = json.loads((c / "trainer_state.json").read_text())
        except (OSError, ValueError):
            pass
    return out


def test_a_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    from curate.train import TrainSpec, train

    flow = write_flow(tmp_path, name="tiny", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(tmp_path / "store"),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 8}], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 3, "descending": False}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"], "max_length": 256}, report={"plots": False})
    assert execute(load_flow(flow))["counts"]["selected"] == 3
    # one row per step, every row longer than MAX_LENGTH: each step trains exactly MAX_LENGTH tokens
    spec = TrainSpec(layout="messages", chat_template="chatml", max_steps=STEPS, save_steps=1, max_length=MAX_LENGTH,
                     batch_tokens=MAX_LENGTH, lora={"r": 4, "alpha": 8, "dropout": 0.0}, learning_rate=1e-3, warmup_ratio=0.0)
    out = tmp_path / "train"
    code = ("import json, sys; from curate.train import TrainSpec, train; "
            "train(TrainSpec.model_validate(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])")
    proc = subprocess.Popen([sys.executable, "-c", code, spec.model_dump_json(), str(tmp_path / "out"), str(out)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(step >= 2 for step in complete_checkpoints(out / "checkpoints")):
                break
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no clean-up runs
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -9, f"the training ended before it could be killed (rc {proc.returncode}): {err[-2000:]}"
    assert not (out / "train.json").exists() and not (out / "adapter").exists()
    before = complete_checkpoints(out / "checkpoints")
    last = max(before)
    assert 2 <= last < STEPS
    logged_before = [(h["step"], h["loss"]) for h in before[last]["log_history"] if "loss" in h]
    # a kill while the next checkpoint was being saved leaves it without trainer_state.json (the trainer writes it
    # last) and with files cut short: make that state (the kill may have left it already) — it must not be resumed
    half = out / "checkpoints" / f"checkpoint-{last + 1}"
    if not half.exists():
        shutil.copytree(out / "checkpoints" / f"checkpoint-{last}", half)
    (half / "trainer_state.json").unlink(missing_ok=True)
    for f in half.glob("*.pt"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    rec = train(spec, tmp_path / "out", out)
    assert rec["resumed"] and rec["resumed_from_step"] == last and rec["steps"] == STEPS
    curve = rec["loss_curve"]
    assert [c["step"] for c in curve] == list(range(1, STEPS + 1))  # continuous: each step once, the killed run's first
    assert [(c["step"], c["loss"]) for c in curve[:last]] == logged_before
    assert all(c["loss"] > 0 for c in curve)
    # tokens: the whole run's in tokens_trained, this process's steps in tokens/s
    assert rec["tokens_trained"] == STEPS * MAX_LENGTH
    assert rec["tokens_this_run"] == (STEPS - last) * MAX_LENGTH
    assert rec["tokens_per_s"] == pytest.approx(rec["tokens_this_run"] / rec["train_seconds"])
    assert not (out / "checkpoints").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    assert train(spec, tmp_path / "out", out) == rec  # finished: read back
