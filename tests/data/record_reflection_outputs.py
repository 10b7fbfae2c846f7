"""Make ``tests/data/reflection_smollm2_outputs.json``: real teacher replies for the reflection parser tests.

The bundled SmolLM2-135M-Instruct (hf backend, greedy, ``max_tokens`` 256, torch threads 1) answers
curate's own Reflection-Tuning prompts through :class:`curate.rewrite.reflection.ReflectionTuning`
(``mode: both``, ``input_policy: compress``, no parse retry: a greedy retry repeats the same text) on
rows 0–4, 5, 8 and 12 of ``data/sample/alpaca_gpt4_en.json`` (5, 8 and 12 have an input). Each
reply's raw text is saved with its call kind, prompt id and row; the tests parse the texts again.
Run from the repository root: ``.venv/bin/python tests/data/record_reflection_outputs.py`` (a few
minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from reflection_rows import alpaca_records  # noqa: E402

from curate.rewrite.base import RewriteContext  # noqa: E402
from curate.rewrite.base import UnitResult  # noqa: E402
from curate.rewrite.reflection import Job, ReflectionTuning, reflect  # noqa: E402

ROWS = (0, 1, 2, 3, 4, 5, 8, 12)


def main() -> None:
    records = alpaca_records(ROWS)
    with tempfile.TemporaryDirectory() as store:
        step = ReflectionTuning("reflection", {"mode": "both", "input_policy": "compress", "parse_retry": False,
                                               "decoding": {"max_tokens": 256}},
                                RewriteContext(seed=0, torch_threads=1, store_dir=store))
        # the steps of ReflectionTuning.run_unit, keeping every call
        pairs = step.prepare(records, UnitResult())
        merged = step.compress(pairs)
        kept, jobs, _ = step.instruction_jobs(pairs, merged)
        outcomes = list(merged.values()) + reflect(step, jobs)
        outcomes += reflect(step, [Job(x.sample_id, "response", x.instruction, x.input, x.answer_shown) for x in pairs])
    row_of = {r["sample_id"]: r["row"] for r in records}
    sids = list(merged) + [j.key for j in jobs] + [x.sample_id for x in pairs]
    out = [{"row": row_of[sid], "call": name, "prompt": call.prompt["id"], "status": reply.status, "text": reply.text}
           for sid, o in zip(sids, outcomes) for name, call, reply in o.exchanges]
    doc = {"how": __doc__.strip(), "model": "smollm2-135m-instruct", "decoding": {"temperature": 0, "max_tokens": 256}, "replies": out}
    path = Path(__file__).with_name("reflection_smollm2_outputs.json")
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(out)} replies -> {path}")


if __name__ == "__main__":
    main()
