"""Record real SmolLM2-135M-Instruct replies to every AIDE prompt (the parser fixtures of tests/test_aide.py).

Run once from the project root (one to two minutes on 2 CPU cores):

    .venv/bin/python tests/data/record_aide_smollm2.py

It sends each AIDE prompt, filled for two Code Alpaca instructions, through curate's call engine
(``AIDEStep.ask_one`` → ``ask``: the bundled model, hf backend, greedy — set here, AIDE samples by
default — max_tokens 96) and writes ``tests/data/aide_smollm2_replies.json``: per reply the prompt id,
what was filled in, its status (``truncated``: it hit the 96 tokens) and the raw text.
"""

from __future__ import annotations

import json
from pathlib import Path

from curate import prompts as P
from curate.rewrite import RewriteContext
from curate.rewrite.aide import AIDEStep

HERE = Path(__file__).resolve().parent
SEEDS = ["Write a Python function to calculate the factorial of a given number.",
         "What are the distinct values from the given list?\ndataList = [3, 9, 3, 5, 7, 9, 5]"]


def main() -> None:
    step = AIDEStep("aide", {"use_case": "Python code generation", "decoding": {"temperature": 0, "max_tokens": 96}},
                    RewriteContext(torch_threads=1))
    uc = "Python code generation"
    jobs = []
    for inst in SEEDS:
        jobs += [
            (P.AIDE_TOPIC, dict(instruction=inst)),
            (P.AIDE_KG_EXPAND, dict(topic="factorial", triples='["factorial", "has", "recursion"]', n=2)),
            (P.AIDE_REWRITE_CONSTRAINT, dict(use_case=uc, topic="functions", skill="loops", residual="", answer_form="",
                                             response_form="", examples=step.examples("constraint"), instruction=inst)),
            (P.AIDE_CREATE_PERSONA, dict(use_case=uc, topic="functions", persona="A data engineer who builds ETL pipelines.",
                                         answer_form="", response_form="", examples=step.examples("create"), instruction=inst)),
            (P.AIDE_ANSWER_MULTI, dict(instruction=inst)),
            (P.AIDE_ANSWER_BINARY, dict(instruction=inst)),
            (P.AIDE_ANSWER_FREE, dict(instruction=inst)),
            (P.AIDE_GRADE_RELEVANCE, dict(use_case=uc, original=SEEDS[0], instruction=inst)),
            (P.AIDE_GRADE_DIVERSITY, dict(use_case=uc, original=SEEDS[0], instruction=inst)),
            (P.AIDE_IMPROVE, dict(use_case=uc, original=SEEDS[0], instruction=inst, feedback=P.AIDE_FEEDBACK_TOO_LONG.text)),
            (P.AIDE_CHECK_CHOICES, dict(instruction=inst, choices="Correct: 120\nIncorrect: 24")),
        ]
    replies = step.ask([step.ask_one(prompt, f"record/{i}", **fields) for i, (prompt, fields) in enumerate(jobs)])
    rows = [{"prompt": prompt.id, "version": prompt.version, "fields": fields, "model": step.engine.backend_fingerprint.get("model_id"),
             "decoding": step.params.decoding.model_dump(mode="json"), "status": r.status, "text": r.text}
            for (prompt, fields), r in zip(jobs, replies)]
    (HERE / "aide_smollm2_replies.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
