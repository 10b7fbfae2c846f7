"""Shared machinery of prompt-based scorers: deita, SelectIT (next-token rating digits) and the
generative judges (LLM rating, DS2).

- Prompts come from :mod:`curate.prompts` (id, version, hash → fingerprint).
- ``chat`` rendering puts the prompt in a user message under the model's chat template (the reply
  starts right after the assistant cue); ``plain`` rendering uses the text as is (trained formats such
  as deita's, SelectIT's layout, base models).
- Truncation (methods.md E4): the fixed parts of a prompt always survive; when it is too long the
  longest body field is cut from its end (each body keeps at least ``min_body_tokens``), recorded as
  ``truncated_ok`` with the cut fields; if it still cannot fit the row is ``skipped_too_long``.
- Rating digits are resolved from the tokenizer (E6b): the token that follows the exact prompt for
  each digit; each must be one token and the ids distinct. Where the tokenizer merges the prompt's
  trailing whitespace with what follows (byte-level BPE: ``": \n" + "1"``), the prompt is encoded as
  it is when a digit follows — the same tokens for every digit, asserted — and the candidate is the
  digit's own token; anything else stops with an error instead of scoring the wrong tokens.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from curate.lm import LMParams, load_backend
from curate.prompts import Prompt
from curate.scorers.base import Scorer


class RatingParams(Scorer.Params, LMParams):
    max_length: int = Field(2048, gt=16, description="Prompt tokens; bodies are cut to fit, never the fixed parts.")
    min_body_tokens: int = Field(32, ge=1)
    match_reference: bool = False


class TooLong(Exception):
    pass


class PromptScorer(Scorer):
    """Base of scorers that render prompts from fields and read the model's answer."""

    Params = RatingParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._backends: dict[str, Any] = {}
        self._digits: dict[tuple, list[int]] = {}

    def backend(self, model: str | None = None):
        model = model or self.params.model
        if model not in self._backends:
            p = self.params
            self._backends[model] = load_backend(LMParams.of(p, model=model), self.context.torch_threads, self.context.extra.get("request_cache"))
        return self._backends[model]

    def base_fingerprint(self, prompts: list[Prompt], models: list[str] | None = None) -> dict[str, Any]:
        p = self.params
        lm_keys = set(LMParams.model_fields)
        fp = {
            "method": self.method,
            "scorer_version": self.version,
            "prompts": [q.ref() for q in prompts],
            "max_length": p.max_length,
            "truncation_policy": "bodies_from_end",
            "params": {k: v for k, v in p.model_dump(mode="json").items() if k not in lm_keys},
            "match_reference": p.match_reference,
        }
        fp["models"] = [self.backend(m).fingerprint() for m in (models or [p.model])]
        fp.update({k: v for k, v in fp["models"][0].items() if k in ("model_id", "model_revision", "dtype")})
        return fp

    # -- rendering --------------------------------------------------------------------------------
    def text(self, prompt: Prompt, fields: dict[str, str], chat: bool, model: str | None = None, system: Prompt | None = None):
        """(rendered text, add_special_tokens) for the prompt with these fields."""
        body = prompt.text.format(**fields)
        if not chat:
            return body, True
        tok = self.backend(model).tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"model '{model or self.params.model}' has no chat template: use a plain format")
        msgs = ([{"role": "system", "content": system.text}] if system else []) + [{"role": "user", "content": body}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False

    def encode(self, text: str, special: bool, model: str | None = None) -> list[int]:
        return self.backend(model).tokenizer(text, add_special_tokens=special)["input_ids"]

    def render(self, prompt: Prompt, fields: dict[str, str], chat: bool, model: str | None = None,
               system: Prompt | None = None, tail: str | None = None) -> tuple[list[int], list[str]]:
        """Token ids of the prompt, cutting body fields from their end to fit ``max_length``. With
        ``tail`` the prompt is encoded as when ``tail`` follows it (the tail's own token dropped)."""
        p = self.params
        tok = self.backend(model).tokenizer
        fields = dict(fields)
        cut: list[str] = []
        for _ in range(8):
            text, special = self.text(prompt, fields, chat, model, system)
            ids = self.encode(text + tail, special, model)[:-1] if tail else self.encode(text, special, model)
            over = len(ids) - p.max_length
            if over <= 0:
                return ids, cut
            lengths = {k: len(tok(v, add_special_tokens=False)["input_ids"]) for k, v in fields.items()}
            name = max(lengths, key=lambda k: (lengths[k], k))
            keep = max(p.min_body_tokens, lengths[name] - over - 2)
            if keep >= lengths[name]:
                break
            fields[name] = tok.decode(tok(fields[name], add_special_tokens=False)["input_ids"][:keep])
            if name not in cut:
                cut.append(name)
        raise TooLong(f"the prompt needs more than max_length={p.max_length} tokens even with its bodies cut to {p.min_body_tokens}")

    def digit_ids(self, prompt: Prompt, digits: list[str], chat: bool, model: str | None = None,
                  probe: dict[str, str] | None = None) -> tuple[list[int], str | None]:
        """(token id of each digit after the exact prompt, the ``tail`` to pass to :meth:`render` —
        None when the prompt's tokens are an unchanged prefix, else the first digit)."""
        key = (prompt.id, tuple(digits), chat, model)
        if key not in self._digits:
            fields = probe or {name: "x" for name in _field_names(prompt.text)}
            text, special = self.text(prompt, fields, chat, model)
            base = self.encode(text, special, model)
            fulls = [self.encode(text + d, special, model) for d in digits]
            where = f"prompt '{prompt.id}' with the tokenizer of '{model or self.params.model}'"
            if all(f[: len(base)] == base and len(f) == len(base) + 1 for f in fulls):
                tail = None
            else:  # the prompt's last characters merge with what follows: use its tokens as followed by a digit
                heads = {tuple(f[:-1]) for f in fulls}
                tok = self.backend(model).tokenizer
                if len(heads) != 1 or any(tok.decode([f[-1]]).strip() != d for f, d in zip(fulls, digits)):
                    raise ValueError(f"{where}: a rating digit is not one token after the prompt; use the chat format or a "
                                     "model trained on this format")
                tail = digits[0]
            ids = [f[-1] for f in fulls]
            if len(set(ids)) != len(ids):
                raise ValueError(f"{where}: the rating digits share token ids {ids}")
            self._digits[key] = (ids, tail)
        return self._digits[key]


def _field_names(text: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(text) if name]

