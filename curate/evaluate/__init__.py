"""Evaluation of a model on an eval set: ``curate eval`` (held-out loss, generation, pairwise judge).

    from curate.evaluate import EvalSpec, evaluate
    rec = evaluate("out/select/train/<key>/adapter", EvalSpec(eval_set={"path": "data/eval/alpaca_eval_40.json"}))
    rec["loss"]["loss"], rec["judge"]["win_rate"]
"""

from curate.evaluate.run import evaluate
from curate.evaluate.spec import EvalSpec, JudgeSpec

__all__ = ["EvalSpec", "JudgeSpec", "evaluate"]
