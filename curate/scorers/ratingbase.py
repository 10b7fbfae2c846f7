"""Shared machinery of prompt-based scorers: deita, SelectIT (next-token rating digits) and the
generative judges (LLM rating, DS2).

- Prompts come from :mod:`curate.prompts` (id, version, hash → fingerprint).
- ``chat`` rendering puts the prompt in a user message under the model's chat template (the reply
  starts right after the assistant cue); ``plain`` rendering uses the text as is (trained formats such
  as deita's, SelectIT's layout, base models).
- Truncation (methods.md E4, :meth:`PromptScorer.fit`), in tokens of the model's tokenizer: the
  fixed parts of a prompt (instructions, labels, cue, closing line, chat template, answer prefix)
  always survive; when it is too long the longest body (the sample's own texts) is cut from its end
  (each body keeps at least ``min_body_tokens``), recorded as ``truncated_ok`` with the cut fields;
  if it still cannot fit the row is ``skipped_too_long``. deita and SelectIT fit through
  :meth:`PromptScorer.render`; the generative judges fit the whole chat prompt they send.
- Rating digits are resolved from the tokenizer (E6b): the token that follows the exact prompt for
  each digit; each must be one token and the ids distinct. Where the tokenizer merges the prompt's
  trailing whitespace with what follows (byte-level BPE: ``": \n" + "1"``), the prompt is encoded as
  it is when a digit follows — the same tokens for every digit, asserted — and the candidate is the
  digit's own token; anything else stops with an error instead of scoring the wrong tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from curate.lm import LMParams, load_backend
from curate.prompts import Prompt
from curate.scorers.base import Score, Scorer


class RatingParams(Scorer.Params, LMParams):
    max_length: int = Field(2048, gt=16, description="Prompt tokens; bodies are cut to fit, never the fixed parts.")
    min_body_tokens: int = Field(32, ge=1)
    match_reference: bool = False


class TooLong(Exception):
    pass


@dataclass
class Fitted:
    """A prompt fitted into ``max_length``: its token ids, the body texts as sent (cut ones
    shortened), the names of the cut bodies (in cut order) and the prompt's tokens before cutting."""

    ids: list[int]
    bodies: dict[str, str]
    cut: list[str]
    n_tokens_in: int

    @property
    def status(self) -> str:
        return "truncated_ok" if self.cut else "ok"

    def record(self, score: Score) -> Score:
        """``score`` with this fit's status (unless it already failed), token counts and cut fields."""
        if score.status == "ok":
            score.status = self.status
        score.n_tokens_in, score.n_tokens_used = self.n_tokens_in, len(self.ids)
        score.components = {**(score.components or {}), "truncated_fields": list(self.cut)}
        return score


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
            self._backends[model] = load_backend(LMParams.of(p, model=model), self.context.torch_threads,
                                                 self.context.extra.get("request_cache"))
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
               system: Prompt | None = None, tail: str | None = None, fixed: dict[str, str] | None = None) -> tuple[list[int], list[str]]:
        """(token ids of the prompt, names of the cut fields): the body ``fields`` are cut from their
        end to fit ``max_length`` (:meth:`fit`); ``fixed`` fields are never cut. With ``tail`` the
        prompt is encoded as when ``tail`` follows it (the tail's own token dropped)."""

        def build(bodies: dict[str, str]) -> list[int]:
            text, special = self.text(prompt, {**(fixed or {}), **bodies}, chat, model, system)
            return self.encode(text + tail, special, model)[:-1] if tail else self.encode(text, special, model)

        fitted = self.fit(build, fields, model)
        return fitted.ids, fitted.cut

    def fit(self, build: Callable[[dict[str, str]], list[int]], bodies: dict[str, str], model: str | None = None) -> Fitted:
        """Fit a prompt into ``max_length`` tokens (methods.md E4). ``build(bodies) -> token ids``
        renders the whole prompt (fixed parts, cue and closing instruction included) around the body
        texts; while it is too long, the longest body (in tokens; ties: the last name) is cut from
        its end, never below ``min_body_tokens``. Raises :class:`TooLong` when even that does not fit."""
        p = self.params
        tok = self.backend(model).tokenizer
        bodies, cut, n_in = dict(bodies), [], None
        for _ in range(2 * len(bodies) + 4):  # each round fits or cuts one body; retokenisation may need one more
            ids = build(bodies)
            n_in = len(ids) if n_in is None else n_in
            over = len(ids) - p.max_length
            if over <= 0:
                return Fitted(ids, bodies, cut, n_in)
            body_ids = {k: tok(v, add_special_tokens=False)["input_ids"] for k, v in bodies.items()}
            if not body_ids:
                break
            name = max(body_ids, key=lambda k: (len(body_ids[k]), k))
            keep = max(p.min_body_tokens, len(body_ids[name]) - over - 2)
            if keep >= len(body_ids[name]):
                break
            bodies[name] = tok.decode(body_ids[name][:keep])
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

