"""Training chat templates: ours (named, for ``train.chat_template: <name>``) and the choice of the
template a run trains with (:func:`training_template`).

``chatml`` renders the ChatML turn format (``<|im_start|>role\\n…<|im_end|>\\n``, the format SmolLM2
and Qwen were trained on) with ``{% generation %}`` markers around each assistant reply, so TRL's
``assistant_only_loss`` can put the loss on every assistant turn of a ``messages`` export. Unlike
SmolLM2's own template it adds no default system prompt.

``smollm2`` is SmolLM2-Instruct's own template with the markers added: the same text, byte for byte,
including the default system prompt SmolLM2's template puts before a conversation that has none
("You are a helpful AI assistant named SmolLM, trained by Hugging Face").
"""

from __future__ import annotations

from pathlib import Path

def _chatml(default_system: str | None = None) -> str:
    """ChatML with ``{% generation %}`` markers around each assistant reply (and its ``<|im_end|>``);
    ``default_system``: a system turn put first when the conversation has none."""
    first = ("{%- if loop.first and messages[0]['role'] != 'system' -%}"
             "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}"
             "{%- endif -%}") if default_system else ""
    return (
        "{%- for message in messages -%}"
        + first
        + "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{%- else -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


CHATML = _chatml()
SMOLLM2 = _chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face")

NAMED = {"chatml": CHATML, "smollm2": SMOLLM2}

# conversations both templates must render identically for ours to stand in for a model's own
PROBES: list[tuple[list[dict], bool]] = [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], False),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}], False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}], False),
    ([{"role": "user", "content": "Q"}], True),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], True),
]


def chat_template_text(name_or_path: str) -> str:
    """The template named ``name_or_path`` (see :data:`NAMED`), or the text of that .jinja file."""
    if name_or_path in NAMED:
        return NAMED[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".jinja", ".j2") and path.exists():
        return path.read_text(encoding="utf-8")
    from curate.errors import ConfigError

    raise ConfigError(f"train.chat_template: {name_or_path!r} is neither a named template ({', '.join(NAMED)}) nor a .jinja file")


def has_generation_markers(template: str | None) -> bool:
    import re

    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def renders_same(tok, template: str, other: str) -> bool:
    """Whether ``template`` and ``other`` render every :data:`PROBES` conversation to the same text."""
    for conv, prompt in PROBES:
        try:
            a = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt, chat_template=template)
            b = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt, chat_template=other)
        except Exception:  # noqa: BLE001 - a template that cannot render a probe does not stand in for the other
            return False
        if a != b:
            return False
    return True


def training_template(tok, chat_template: str | None, layout: str, model: str) -> tuple[str, str]:
    """The chat template a run trains with and where it came from (``named:<name>``, ``file:<path>``,
    ``model``, ``trl``, ``model-equivalent:<name>``).

    ``chat_template`` set: that one (for ``layout: messages`` it must have ``{% generation %}``
    markers). Unset: the model's own; for ``layout: messages`` (the loss on every assistant reply)
    a template without markers is replaced, in this order, by TRL's training variant of it (when the
    installed TRL has one for that template) or by the first of ours (:data:`NAMED`) that renders
    the :data:`PROBES` exactly as the model's own does. Neither: ConfigError naming the fixes.
    Raises ConfigError before any weights load."""
    from curate.errors import ConfigError

    own = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    if chat_template:
        text = chat_template_text(chat_template)
        if layout == "messages" and not has_generation_markers(text):
            raise ConfigError(f"train.layout messages puts the loss on every assistant reply, which needs a chat template with "
                              f"{{% generation %}} markers; train.chat_template {chat_template!r} has none: add them, use one "
                              f"of ours ({', '.join(NAMED)}) or layout: prompt_completion (the final reply only)")
        return text, (f"named:{chat_template}" if chat_template in NAMED else f"file:{chat_template}")
    if not own:
        raise ConfigError(f"train.model {model!r}: its tokenizer has no chat template; set train.chat_template (e.g. chatml)")
    if layout != "messages" or has_generation_markers(own):
        return own, "model"
    try:
        from trl.chat_template_utils import get_training_chat_template

        patched = get_training_chat_template(tok)
    except (ImportError, ValueError, TypeError):
        patched = None
    if isinstance(patched, str) and has_generation_markers(patched):
        return patched, "trl"
    for name, text in NAMED.items():
        if renders_same(tok, text, own):
            return text, f"model-equivalent:{name}"
    raise ConfigError(f"train.layout messages puts the loss on every assistant reply, which needs a chat template with "
                      f"{{% generation %}} markers; {model!r}'s own has none, TRL has no training variant of it and none of "
                      f"ours ({', '.join(NAMED)}) renders the same text: set train.chat_template (chatml, or a .jinja file "
                      f"with markers — the model then trains on that format), or use layout: prompt_completion (the final reply only)")


def end_of_turn_id(tok, template: str) -> int | None:
    """The special token ``template`` ends an assistant reply with (ChatML: ``<|im_end|>``), or None
    when the text after a reply does not start with one."""
    reply = "Hello there."
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}],
                                       tokenize=False, chat_template=template)
        after = text[text.rindex(reply) + len(reply):]
    except Exception:  # noqa: BLE001 - a template that cannot render a plain exchange names no end-of-turn token
        return None
    ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return ids[0] if ids[0] in special else None
