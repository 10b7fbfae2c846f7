"""A row's tokens as a model's chat template renders it: the tokens a training run on that model sees.

Output ``tokens`` (per row, a count): the whole conversation — system, user, tool and assistant
messages, a message's ``tool_calls`` on a line after its content, the row's tool schemas — rendered by
the tokenizer's own chat template (``apply_chat_template``, with the special tokens and any default
system prompt the template adds), cut at ``max_length`` when it is set. That is the count
:func:`curate.train.sft.row_lengths` makes for a ``messages`` or ``prompt_completion`` export, so a
``token_budget`` step counting ``chat_tokens.tokens`` budgets the tokens the trainer will see
(``curate compare`` with ``budget_unit: tokens`` adds this scorer for its ``train.model``). A training
run with its own ``train.chat_template`` that renders other text than the model's template counts
differently; curate compare compares the two counts and says so.

    score:
      - {method: chat_tokens, model: smollm2-135m-instruct, max_length: 512}

Only the tokenizer loads (no weights); about 1–2 ms a row on one core.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from curate.records import chat_messages, tool_schemas
from curate.scorers.base import Score, Scorer


class ChatTokensScorer(Scorer):
    method = "chat_tokens"
    version = "1.0"
    outputs = {"tokens": "higher_is_better"}
    batch_rows = 512
    collapse_check = False  # a count, not a quality score

    class Params(Scorer.Params):
        model: str = Field(description="The model whose tokenizer and chat template count: a bundled name "
                           "(smollm2-135m-instruct), an HF id or a local dir.")
        revision: str | None = Field(None, description="Hub revision (hub models only).")
        max_length: int | None = Field(None, gt=0, description="Cut each row's count here, as training cuts rows; null: no cut.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            from curate.models import load_tokenizer

            self._tok = load_tokenizer(self.params.model, revision=self.params.revision)
            if not isinstance(getattr(self._tok, "chat_template", None), str):
                from curate.errors import ConfigError

                raise ConfigError(f"scorer '{self.name}': the tokenizer of {self.params.model} has no chat template to count with")
        return self._tok

    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        tok = self._tokenizer()
        out = []
        for rec in records:
            ids = tok.apply_chat_template(chat_messages(rec["messages"]), tools=tool_schemas(rec.get("tools")), tokenize=True,
                                          return_dict=False)
            n = len(ids) if self.params.max_length is None else min(len(ids), self.params.max_length)
            out.append(Score({"tokens": float(n)}, n_tokens_in=len(ids), n_tokens_used=n))
        return out

    def fingerprint(self) -> dict[str, Any]:
        from curate.models import model_revision

        fp = super().fingerprint()
        fp["model_revision"] = model_revision(self.params.model, self.params.revision)
        return fp
