"""Named training chat templates (ours), for ``train.chat_template: <name>``.

``chatml`` renders the ChatML turn format (``<|im_start|>role\\n…<|im_end|>\\n``, the format SmolLM2
and Qwen were trained on) with ``{% generation %}`` markers around each assistant reply, so TRL's
``assistant_only_loss`` can put the loss on every assistant turn of a ``messages`` export. Unlike
SmolLM2's own template it adds no default system prompt.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

NAMED = {"chatml": CHATML}


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
