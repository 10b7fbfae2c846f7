"""``python -m curate`` with each process's training batches recorded, for
tests/test_train_distributed.py: launched as ``python -m torch.distributed.run --nproc_per_node 2
tests/ddp_train.py <curate arguments>``. Every call of the trainer's ``training_step`` (one forward
and backward) appends the rows it got — their non-padding token ids, the epoch it runs in and the
optimizer step — to ``$CURATE_TEST_BATCHES/rank<RANK>.jsonl``, then runs the real step. With
``$CURATE_TEST_FAIL_RANK0_WRITE`` set, rank 0's loss plot (written before its train.json) raises
OSError, as a full disk would."""

from __future__ import annotations

import json
import math
import os
import runpy
import sys
from pathlib import Path

from trl import SFTTrainer

_step = SFTTrainer.training_step
_out = Path(os.environ["CURATE_TEST_BATCHES"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"


def training_step(self, model, inputs, *args, **kwargs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    epoch = math.floor((self.state.epoch or 0.0) + 1e-9)  # the epoch this batch belongs to: whole at an epoch's first step
    with _out.open("a", encoding="utf-8") as f:
        for row, keep in zip(ids.tolist(), mask.tolist()):
            f.write(json.dumps({"epoch": epoch, "step": self.state.global_step, "ids": [t for t, k in zip(row, keep) if k]}) + "\n")
    return _step(self, model, inputs, *args, **kwargs)


SFTTrainer.training_step = training_step

if os.environ.get("CURATE_TEST_FAIL_RANK0_WRITE") and os.environ.get("RANK") == "0":  # rank 0 cannot write its record
    import curate.train.sft

    def _plot(*args, **kwargs):
        raise OSError("No space left on device (test)")

    curate.train.sft._plot = _plot
sys.argv = ["curate", *sys.argv[1:]]
runpy.run_module("curate", run_name="__main__", alter_sys=True)
