"""What an evaluation is: ``curate eval MODEL --on EVAL_SET`` or the ``eval:`` section of a compare flow::

    eval:
      eval_set: {path: data/eval/alpaca_eval_40.json}   # an input like any other (path, format, limit, …)
      max_length: 1024                             # held-out loss: tokens per row
      generate: {max_tokens: 256}                  # greedy answers to the eval prompts
      judge: {model: smollm2-135m-instruct}        # any backend (hf, vllm, openai …); null: no judging
      reference: answers                           # the eval set's own answers, or a model whose answers are the reference
      bootstrap: 1000                              # resamples of the eval rows for the 95% intervals (seeded by seed)

The judge's ``validity`` thresholds decide whether its verdicts are reported as a finding
(:class:`JudgeValidity`; docs/training.md gives the measurement that set the defaults).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.config import InputSpec
from curate.lm.calls import Decoding
from curate.lm.spec import LMParams


class JudgeValidity(BaseModel):
    """When a judge's verdicts count. A judgment set that fails any check is reported ``valid: false``
    with the reasons, and its win rates are null. Defaults: docs/training.md (the bundled SmolLM2
    judge, measured, fails them)."""

    model_config = ConfigDict(extra="forbid")

    max_position_bias: float = Field(0.25, ge=0, le=0.5, description="The share of decisive verdicts (A or B) that picked the answer "
                                     "shown first may differ from 0.5 by at most this (0.25: 0.25 to 0.75).")
    min_consistent: float = Field(0.4, ge=0, le=1, description="At least this share of the rows judged in both orders gets the same "
                                  "verdict once the swap is undone.")
    min_verdict_mass: float = Field(0.5, ge=0, le=1, description="verdict_token mode: the mean next-token probability held by the "
                                    "verdict tokens A, B and C together must be at least this.")


class JudgeSpec(LMParams):
    """The judge model (flat LM keys, as for scorers) and how it replies."""

    mode: Literal["verdict_token", "generate"] | None = Field(
        None, description="null: verdict_token for the hf and vllm backends, generate for openai. "
        "verdict_token: the judge's reply is prefilled up to the verdict and the next-token "
        "probabilities of A, B and C decide (one forward per comparison, nothing to parse; small local judges); generate: "
        "the judge reasons in free text and its last [[A]]/[[B]]/[[C]] is the verdict (strong judges, any API).")
    decoding: Decoding = Field(default_factory=lambda: Decoding(max_tokens=512), description="mode generate: how the judge replies.")
    validity: JudgeValidity = Field(default_factory=JudgeValidity, description="The checks a judgment set must pass for its win rates "
                                    "to be reported.")

    @model_validator(mode="after")
    def _mode_for_backend(self):
        # a hosted API gives at most the top 20 log-probabilities, often without all of A, B and C: let it reason instead
        if self.mode is None:
            self.mode = "generate" if self.backend == "openai" else "verdict_token"
        return self


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    eval_set: InputSpec = Field(description="The eval set: an input spec (path or hub, format, fields, limit …).")
    prompt_field: str | None = Field(None, description="A prompts-only set (Vicuna, Koala, LIMA, WizardLM tests): the field holding "
                                     "each request (a list: its first item). No held-out loss; the reference must be a model.")
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="How the evaluated model runs: auto = vllm when it is "
                                                   "importable and a GPU is present, else hf.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_tokens_per_batch: int | None = Field(None, gt=0, description="Padded tokens per forward batch (default: the backend's).")
    loss: bool = Field(True, description="Held-out loss and perplexity of the model on the eval set's reference answers.")
    max_length: int = Field(1024, gt=1, description="Held-out loss: tokens per row (replies past it are not scored).")
    generate: Decoding = Field(default_factory=lambda: Decoding(max_tokens=256), description="How the model answers the eval prompts.")
    judge: JudgeSpec | None = Field(default_factory=JudgeSpec, description="The pairwise judge; null = no generation or judging.")
    reference: str = Field("answers", description="answers: the eval set's own final replies; else a model (name or dir) whose "
                           "greedy answers, made with the same decoding, are the reference.")
    bootstrap: int = Field(1000, ge=0, description="Resamples of the eval rows (with replacement, drawn with seed) for the 95% "
                           "intervals of the win rates and the held-out loss; 0: none.")
    seed: int = 0
    torch_threads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _prompts_need_a_reference_model(self):
        if self.prompt_field and self.reference == "answers":
            raise ValueError("a prompts-only eval set (prompt_field) has no reference answers: "
                             "set reference to a model whose answers are the reference")
        return self

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return "hf"
        import torch

        return "vllm" if torch.cuda.is_available() else "hf"
